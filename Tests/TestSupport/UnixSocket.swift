import Foundation

/// Creating Unix sockets for the tests' clients and listeners.
public enum UnixSocket {
    public enum Operation {
        case bind, connect
    }

    /// A new socket of `type` (SOCK_STREAM, SOCK_DGRAM) bound or connected to `path`; the caller owns
    /// the descriptor.
    public static func open(_ type: __socket_type, _ operation: Operation, path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(type.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8).prefix(raw.count - 1))
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                let length = socklen_t(MemoryLayout<sockaddr_un>.size)
                return operation == .bind ? bind(fd, pointer, length) : connect(fd, pointer, length)
            }
        }
        guard result == 0 else {
            let error = errno
            close(fd)
            throw POSIXError(.init(rawValue: error) ?? .EIO)
        }
        return fd
    }
}
