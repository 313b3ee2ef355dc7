import Foundation
import TestSupport
import Testing

@testable import TokenDaemon

/// Serialized: one test changes the process umask.
@Suite(.serialized) struct AtomicFileWriterTests {
    @Test func writesContentsWithTheExactModeWhateverTheUmask() throws {
        let folder = try TemporaryDirectory()
        let old = umask(0o077)
        defer { umask(old) }
        try AtomicFileWriter.write(Array("one".utf8), to: folder.file("out/token"), mode: 0o640)
        #expect(folder.read("out/token") == "one")
        #expect(folder.mode("out/token") == 0o640)
        // The missing parent was created 0750, not 0700 as the umask would make it.
        #expect(folder.mode("out") == 0o750)
    }

    @Test func replacesExistingContentsAndMode() throws {
        let folder = try TemporaryDirectory()
        let path = try folder.write("token", "old", mode: 0o644)
        try AtomicFileWriter.write(Array("new".utf8), to: path, mode: 0o600)
        #expect(folder.read("token") == "new")
        #expect(folder.mode("token") == 0o600)
    }

    @Test func aSymlinkAtTheTargetIsReplacedNotFollowed() throws {
        let folder = try TemporaryDirectory()
        let victim = try folder.write("victim", "keep me", mode: 0o644)
        #expect(symlink(victim, folder.file("token")) == 0)
        try AtomicFileWriter.write(Array("token".utf8), to: folder.file("token"), mode: 0o640)
        #expect(folder.read("victim") == "keep me")
        #expect(folder.mode("victim") == 0o644)
        var info = stat()
        #expect(lstat(folder.file("token"), &info) == 0)
        #expect(info.st_mode & S_IFMT == S_IFREG)
        #expect(folder.read("token") == "token")
    }

    @Test func leavesNoTemporaryFilesAfterSuccessOrFailure() throws {
        let folder = try TemporaryDirectory()
        try AtomicFileWriter.write(Array("a".utf8), to: folder.file("token"), mode: 0o640)
        // A directory at the target makes rename(2) fail after the temporary file was written.
        try FileManager.default.createDirectory(atPath: folder.file("busy"), withIntermediateDirectories: false)
        #expect(throws: SystemError.self) {
            try AtomicFileWriter.write(Array("b".utf8), to: folder.file("busy"), mode: 0o640)
        }
        #expect(folder.entries() == ["busy", "token"])
    }

    @Test func failureNamesTheOperationAndKeepsTheOldContents() throws {
        let folder = try TemporaryDirectory()
        let path = try folder.write("token", "old")
        try folder.write("file", "not a folder")
        do {
            try AtomicFileWriter.write(Array("x".utf8), to: folder.file("file/token"), mode: 0o640)
            Issue.record("expected an error")
        } catch {
            #expect(error.description.contains("is not a directory"))
        }
        #expect(folder.read("token") == "old")
        _ = path
    }

    @Test func removesStaleTemporaryFilesOnlyOfItsTarget() throws {
        let folder = try TemporaryDirectory()
        try folder.write(".token.tmp-abc", "partial")
        try folder.write(".token.json.tmp-abc", "other target")
        try folder.write("token", "whole")
        AtomicFileWriter.removeStaleTemporaryFiles(for: folder.file("token"))
        #expect(folder.entries() == [".token.json.tmp-abc", "token"])
    }

    @Test func removeIgnoresAMissingFile() throws {
        let folder = try TemporaryDirectory()
        try AtomicFileWriter.remove(folder.file("none"))
        let path = try folder.write("token", "x")
        try AtomicFileWriter.remove(path)
        #expect(folder.entries().isEmpty)
    }
}
