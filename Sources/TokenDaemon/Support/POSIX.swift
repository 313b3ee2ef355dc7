import Glibc

/// A failed system call: the operation and errno, described as `open: Permission denied`.
public struct SystemError: Error, Sendable, Equatable, CustomStringConvertible {
    public var operation: String
    public var errno: Int32?

    public init(_ operation: String, errno: Int32?) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        guard let errno else { return operation }
        return "\(operation): \(String(cString: strerror(errno)))"
    }
}

/// System calls with the retries every caller needs.
enum POSIX {
    /// Writes all of `bytes` to `fd`, retrying short writes and EINTR. Throws the errno of a failed
    /// write (`operation` names it), or `zeroWrite` when write(2) returns 0.
    static func writeAll(_ fd: Int32, _ bytes: [UInt8], operation: @autoclosure () -> String) throws(SystemError) {
        var offset = 0
        while offset < bytes.count {
            let count = bytes.withUnsafeBytes { raw in
                Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
            }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { throw SystemError(operation(), errno: count < 0 ? errno : nil) }
            offset += count
        }
    }

    /// One read(2) into `buffer`, retrying EINTR: the count read (0 at the end).
    static func read(
        _ fd: Int32,
        into buffer: inout [UInt8],
        operation: @autoclosure () -> String
    ) throws(SystemError) -> Int {
        while true {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count >= 0 { return count }
            if errno != EINTR { throw SystemError(operation(), errno: errno) }
        }
    }
}
