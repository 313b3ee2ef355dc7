import Glibc

/// Reads small files (config, secrets, state) whole, with their permission bits, refusing anything
/// larger than a limit so a wrong path (a log, /dev/zero) cannot exhaust memory.
public enum SmallFile {
    public struct Contents: Sendable {
        public var bytes: [UInt8]
        public var mode: UInt32
    }

    public static func read(_ path: String, limit: Int) throws(SystemError) -> Contents {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open", errno: errno) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw SystemError("fstat", errno: errno) }
        guard info.st_mode & S_IFMT == S_IFREG else { throw SystemError("not a regular file", errno: nil) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16 * 1024)
        while true {
            let count = try POSIX.read(fd, into: &chunk, operation: "read")
            if count == 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
            guard bytes.count <= limit else { throw SystemError("larger than \(limit) bytes", errno: nil) }
        }
        return Contents(bytes: bytes, mode: UInt32(info.st_mode) & 0o7777)
    }
}
