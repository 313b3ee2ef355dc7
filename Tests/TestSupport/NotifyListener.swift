import Foundation

/// A real datagram socket to pass as `NOTIFY_SOCKET`: collects what a child sends with sd_notify(3).
public final class NotifyListener: @unchecked Sendable {
    // @unchecked: `messages` is guarded by `lock`; `fd` is immutable after init.
    public let path: String
    private let fd: Int32
    private let lock = NSLock()
    private var messages: [(time: Date, text: String)] = []

    public init(in directory: TemporaryDirectory) throws {
        path = directory.file("notify.sock")
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8)
            raw.copyBytes(from: bytes.prefix(raw.count - 1))
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
    }

    deinit {
        close(fd)
    }

    /// Reads datagrams until one satisfies `predicate` or `timeout` passes; returns that message.
    /// Messages seen before are checked first, so nothing is missed between calls.
    public func waitFor(timeout: TimeInterval = 30, _ predicate: (String) -> Bool) -> String? {
        if let seen = lock.withLock({ messages.first(where: { predicate($0.text) }) }) { return seen.text }
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            guard let message = receive(until: deadline) else { continue }
            if predicate(message) { return message }
        }
        return nil
    }

    /// Every message received so far, with its arrival time.
    public var received: [(time: Date, text: String)] {
        drain()
        return lock.withLock { messages }
    }

    /// Forgets the messages received so far.
    public func reset() {
        drain()
        lock.withLock { messages.removeAll() }
    }

    private func drain() {
        while receive(until: Date()) != nil {}
    }

    private func receive(until deadline: Date) -> String? {
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let milliseconds = max(0, Int32(deadline.timeIntervalSinceNow * 1000))
        guard poll(&poller, 1, milliseconds) > 0 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = recv(fd, &buffer, buffer.count, 0)
        guard count > 0 else { return nil }
        let text = String(decoding: buffer[0..<count], as: UTF8.self)
        lock.withLock { messages.append((Date(), text)) }
        return text
    }
}
