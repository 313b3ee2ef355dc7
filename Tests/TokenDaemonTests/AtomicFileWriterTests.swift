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
            #expect(error.description.contains("\(folder.file("file")) is not a folder"))
        }
        #expect(folder.read("token") == "old")
        _ = path
    }

    @Test func missingFoldersAreCreatedAndFchmodedWhateverTheUmask() throws {
        let folder = try TemporaryDirectory()
        let old = umask(0o077)
        defer { umask(old) }
        try AtomicFileWriter.write(Array("x".utf8), to: folder.file("a/b/c/token"), mode: 0o640, directoryMode: 0o710)
        #expect([folder.mode("a"), folder.mode("a/b"), folder.mode("a/b/c")] == [0o710, 0o710, 0o710])
        #expect(folder.read("a/b/c/token") == "x")
    }

    /// The attack: after the daemon checked its folder at start, whoever can rename it (or a
    /// parent) puts a symlink in its place, to make the next rotation write the token elsewhere.
    @Test func aTokenFolderSwappedForASymlinkAfterStartGetsNothing() throws {
        let folder = try TemporaryDirectory()
        try AtomicFileWriter.write(Array("old".utf8), to: folder.file("run/token"), mode: 0o640)
        #expect(rename(folder.file("run"), folder.file("run-moved")) == 0)
        try FileManager.default.createDirectory(atPath: folder.file("elsewhere"), withIntermediateDirectories: false)
        #expect(symlink(folder.file("elsewhere"), folder.file("run")) == 0)
        do {
            try AtomicFileWriter.write(Array("new".utf8), to: folder.file("run/token"), mode: 0o640)
            Issue.record("expected an error")
        } catch {
            #expect(error.description.hasPrefix("\(folder.file("run")) is a symbolic link"))
        }
        #expect(folder.entries("elsewhere").isEmpty)
        #expect(folder.read("run-moved/token") == "old")
        // Removing (a withdrawal) leaves what is behind the link alone too.
        try folder.write("elsewhere/token", "someone else's")
        #expect(throws: SystemError.self) { try AtomicFileWriter.remove(folder.file("run/token")) }
        #expect(folder.read("elsewhere/token") == "someone else's")
    }

    @Test func aParentSwappedForASymlinkAfterStartGetsNothing() throws {
        let folder = try TemporaryDirectory()
        try AtomicFileWriter.write(Array("old".utf8), to: folder.file("srv/run/token"), mode: 0o640)
        #expect(rename(folder.file("srv"), folder.file("srv-moved")) == 0)
        try FileManager.default.createDirectory(atPath: folder.file("elsewhere/run"), withIntermediateDirectories: true)
        #expect(symlink(folder.file("elsewhere"), folder.file("srv")) == 0)
        do {
            try AtomicFileWriter.write(Array("new".utf8), to: folder.file("srv/run/token"), mode: 0o640)
            Issue.record("expected an error")
        } catch {
            #expect(error.description.hasPrefix("\(folder.file("srv")) is a symbolic link"))
        }
        #expect(folder.entries("elsewhere/run").isEmpty)
        #expect(folder.read("srv-moved/run/token") == "old")
    }

    @Test(.enabled(if: geteuid() == 0)) func aTokenFolderSwappedForAnotherUsersFolderGetsNothing() throws {
        let folder = try TemporaryDirectory()
        try AtomicFileWriter.write(Array("old".utf8), to: folder.file("run/token"), mode: 0o640)
        #expect(rename(folder.file("run"), folder.file("run-moved")) == 0)
        try FileManager.default.createDirectory(atPath: folder.file("run"), withIntermediateDirectories: false)
        #expect(chown(folder.file("run"), 65534, 65534) == 0)
        do {
            try AtomicFileWriter.write(Array("new".utf8), to: folder.file("run/token"), mode: 0o640)
            Issue.record("expected an error")
        } catch {
            #expect(error.description.contains("\(folder.file("run")) belongs to uid 65534, another user"))
        }
        #expect(folder.entries("run").isEmpty)
        #expect(folder.read("run-moved/token") == "old")
    }

    @Test func aTokenFolderMadeWritableByOthersAfterStartGetsNothing() throws {
        let folder = try TemporaryDirectory()
        try AtomicFileWriter.write(Array("old".utf8), to: folder.file("run/token"), mode: 0o640)
        #expect(chmod(folder.file("run"), 0o777) == 0)
        #expect(throws: SystemError.self) {
            try AtomicFileWriter.write(Array("new".utf8), to: folder.file("run/token"), mode: 0o640)
        }
        #expect(folder.read("run/token") == "old")
        // The metrics file's rule follows links and takes shared folders: it holds no secret.
        try AtomicFileWriter.write(Array("m".utf8), to: folder.file("run/m.prom"), mode: 0o644, rule: .shared)
        #expect(folder.read("run/m.prom") == "m")
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
