import Foundation

/// A real datagram socket to pass as `NOTIFY_SOCKET`: collects what a child sends with sd_notify(3).
///
/// A thread of its own drains the socket continuously, as systemd does: a Unix datagram socket queues
/// only a few messages (net.unix.max_dgram_qlen), after which sd_notify in the child blocks. Each
/// message's time is the kernel's, taken as it queued the datagram (SO_TIMESTAMP): a loaded machine
/// that runs the reader late does not move it. The thread ends, and the socket closes, at `stop()` or
/// when the listener is released, whichever comes first.
public final class NotifyListener: Sendable {
    public let path: String
    private let inbox: Inbox

    public init(in directory: TemporaryDirectory) throws {
        path = directory.file("notify.sock")
        let fd = try UnixSocket.open(SOCK_DGRAM, .bind, path: path)
        var on: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_TIMESTAMP, &on, socklen_t(MemoryLayout<Int32>.size))
        inbox = Inbox(fd: fd)
        Thread { [inbox] in inbox.drain() }.start()
    }

    deinit {
        inbox.close()
    }

    /// Stops the reader; the listener then only answers from what it has.
    public func stop() {
        inbox.close()
    }

    /// Waits until a message satisfying `predicate` has arrived (or had arrived) and returns it, or nil
    /// after `timeout`.
    public func waitFor(timeout: TimeInterval = 30, _ predicate: (String) -> Bool) async -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        repeat {
            if let found = received.first(where: { predicate($0.text) }) { return found.text }
            try? await Task.sleep(for: .milliseconds(5))
        } while Date() < deadline
        return nil
    }

    /// Every message received so far, with the time it arrived.
    public var received: [(time: Date, text: String)] {
        inbox.messages
    }

    /// Forgets the messages received so far.
    public func reset() {
        inbox.removeAll()
    }
}

/// The socket and what arrived on it, shared by the listener and its reader thread (which must not
/// hold the listener, or the listener would never be released).
private final class Inbox: @unchecked Sendable {
    // @unchecked: `stored` and `closed` are guarded by `lock`; `fd` is immutable and closed once, by
    // the reader thread as it ends.
    private let fd: Int32
    private let lock = NSLock()
    private var stored: [(time: Date, text: String)] = []
    private var closed = false

    init(fd: Int32) { self.fd = fd }

    var messages: [(time: Date, text: String)] { lock.withLock { stored } }
    func removeAll() { lock.withLock { stored.removeAll() } }
    func close() { lock.withLock { closed = true } }

    func drain() {
        defer { Glibc.close(fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        // One control message: a cmsghdr (16 bytes on x86_64 and arm64) and a timeval.
        var control = [UInt8](repeating: 0, count: 64)
        while !lock.withLock({ closed }) {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 100) > 0 else { continue }
            let (count, time) = buffer.withUnsafeMutableBytes { data in
                control.withUnsafeMutableBytes { control in
                    var vector = iovec(iov_base: data.baseAddress, iov_len: data.count)
                    return withUnsafeMutablePointer(to: &vector) { vector in
                        var message = msghdr()
                        message.msg_iov = vector
                        message.msg_iovlen = 1
                        message.msg_control = control.baseAddress
                        message.msg_controllen = control.count
                        let count = recvmsg(fd, &message, 0)
                        return (count, Self.kernelTime(control, length: message.msg_controllen))
                    }
                }
            }
            guard count > 0 else { continue }
            let text = String(decoding: buffer[0..<count], as: UTF8.self)
            lock.withLock { stored.append((time ?? Date(), text)) }
        }
    }

    /// The SCM_TIMESTAMP in a control buffer of `length` bytes, if it holds one.
    private static func kernelTime(_ control: UnsafeMutableRawBufferPointer, length: Int) -> Date? {
        let header = MemoryLayout<cmsghdr>.stride
        guard length >= header + MemoryLayout<timeval>.size else { return nil }
        let first = control.load(as: cmsghdr.self)
        guard first.cmsg_level == SOL_SOCKET, first.cmsg_type == SCM_TIMESTAMP else { return nil }
        let time = control.loadUnaligned(fromByteOffset: header, as: timeval.self)
        return Date(timeIntervalSince1970: TimeInterval(time.tv_sec) + TimeInterval(time.tv_usec) / 1_000_000)
    }
}
