import Foundation

/// A real datagram socket to pass as `NOTIFY_SOCKET`: collects what a child sends with sd_notify(3).
///
/// A background thread drains the socket continuously, as systemd does: a Unix datagram socket queues
/// only a few messages (net.unix.max_dgram_qlen), after which sd_notify in the child blocks.
public final class NotifyListener: @unchecked Sendable {
    // @unchecked: `messages` and `closed` are guarded by `lock`; `fd` and `path` are immutable.
    public let path: String
    private let fd: Int32
    private let lock = NSLock()
    private var messages: [(time: Date, text: String)] = []
    private var closed = false

    public init(in directory: TemporaryDirectory) throws {
        path = directory.file("notify.sock")
        fd = try UnixSocket.open(SOCK_DGRAM, .bind, path: path)
        let thread = Thread { [self] in drain() }
        thread.start()
    }

    deinit {
        Glibc.close(fd)
    }

    /// Stops the background reader; the listener then only answers from what it has.
    public func stop() {
        lock.withLock { closed = true }
    }

    /// Waits until a message satisfying `predicate` has arrived (or had arrived) and returns it, or nil
    /// after `timeout`.
    public func waitFor(timeout: TimeInterval = 30, _ predicate: (String) -> Bool) async -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        repeat {
            if let found = lock.withLock({ messages.first(where: { predicate($0.text) }) }) { return found.text }
            try? await Task.sleep(for: .milliseconds(5))
        } while Date() < deadline
        return nil
    }

    /// Every message received so far, with its arrival time.
    public var received: [(time: Date, text: String)] {
        lock.withLock { messages }
    }

    /// Forgets the messages received so far.
    public func reset() {
        lock.withLock { messages.removeAll() }
    }

    private func drain() {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !lock.withLock({ closed }) {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 100) > 0 else { continue }
            let count = recv(fd, &buffer, buffer.count, 0)
            guard count > 0 else { continue }
            let text = String(decoding: buffer[0..<count], as: UTF8.self)
            lock.withLock { messages.append((Date(), text)) }
        }
    }
}
