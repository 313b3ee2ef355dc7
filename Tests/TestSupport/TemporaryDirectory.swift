import Foundation

/// A fresh folder on tmpfs (`/dev/shm`, else `/tmp`), removed with everything in it when the value
/// is released.
///
/// tmpfs because that is where the daemon's outputs live in production (`/run`): on this machine's
/// disk an fsync took up to half a second while the suite ran under load, and the daemon, which
/// writes on its event loop, then withdrew 4-second test tokens late. Slow disks have tests of
/// their own (`DiskFaultTests`).
public final class TemporaryDirectory: Sendable {
    public let path: String

    static let base = access("/dev/shm", W_OK | X_OK) == 0 ? "/dev/shm" : "/tmp"

    public init() throws {
        var template = Array("\(Self.base)/fts-tokend-test-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        path = String(cString: created)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: path)
    }

    public func file(_ name: String) -> String { path + "/" + name }

    /// Writes `text` to `name` and sets `mode` explicitly (tests must not depend on the umask).
    @discardableResult
    public func write(_ name: String, _ text: String, mode: mode_t = 0o600) throws -> String {
        let target = file(name)
        try FileManager.default.createDirectory(
            atPath: (target as NSString).deletingLastPathComponent,
            withIntermediateDirectories: true
        )
        try Data(text.utf8).write(to: URL(fileURLWithPath: target))
        guard chmod(target, mode) == 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        return target
    }

    /// The file's text, or nil when it cannot be read (`readFileWithoutThrowing`).
    public func read(_ name: String) -> String? {
        readFileWithoutThrowing(file(name)).map { String(decoding: $0, as: UTF8.self) }
    }

    public func mode(_ name: String) -> mode_t? {
        var info = stat()
        guard lstat(file(name), &info) == 0 else { return nil }
        return info.st_mode & 0o7777
    }

    /// When the file was last modified (its inode's mtime, to the nanosecond).
    public func modificationDate(_ name: String) -> Date? {
        var info = stat()
        guard lstat(file(name), &info) == 0 else { return nil }
        return Date(timeIntervalSince1970: Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) / 1e9)
    }

    /// Every regular file below the folder, as relative paths.
    public func allFiles() -> [String] {
        let enumerator = FileManager.default.enumerator(atPath: path)
        var files: [String] = []
        while let name = enumerator?.nextObject() as? String {
            if (enumerator?.fileAttributes?[.type] as? FileAttributeType) == .typeRegular { files.append(name) }
        }
        return files.sorted()
    }

    public func entries(_ folder: String = "") -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: folder.isEmpty ? path : file(folder))) ?? []).sorted()
    }
}

/// The bytes of the file at `path`, or nil when it cannot be read. With open(2) and read(2), not
/// Foundation: Foundation throws inside for a missing file, and Swift Testing captures a backtrace,
/// under one lock for the whole process, for every error thrown. Tests poll files every 10 ms while
/// they wait; in a loaded full run those captures held every test's threads for a minute (seen in
/// stack dumps).
public func readFileWithoutThrowing(_ path: String) -> [UInt8]? {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else { return nil }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = read(descriptor, &buffer, buffer.count)
        if count < 0, errno == EINTR { continue }
        guard count >= 0 else { return nil }
        if count == 0 { return bytes }
        bytes += buffer[0..<count]
    }
}
