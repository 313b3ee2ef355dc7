import Foundation

/// A raw client on a Unix stream socket: for requests no well-behaved client would send, and for many
/// connections open at once.
///
/// Its calls block in poll(2) and send(2), for as long as the server takes. From async code they are
/// called through their async overloads, which block a thread of their own (`onOwnThread`), never
/// one of the concurrency pool's. The blocking versions are unavailable from async code, so the
/// compiler finds every such call.
public final class UnixSocketClient: Sendable {
    private let fd: Int32

    public init(socket path: String) throws {
        fd = try UnixSocket.open(SOCK_STREAM, .connect, path: path)
    }

    deinit {
        Glibc.close(fd)
    }

    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public func send(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let count = bytes[offset...].withUnsafeBytes {
                Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
            }
            guard count > 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
            offset += count
        }
    }

    /// How `flood` ended.
    public enum FloodEnd: Equatable, Sendable {
        /// Everything was sent.
        case sent
        /// The server closed the connection (EPIPE or ECONNRESET).
        case closedByServer
        /// The server took nothing for `stallTimeout`.
        case stalled
    }

    /// Sends `chunk` again and again without ever reading, up to `total` bytes; calls `between`
    /// after each chunk. Returns how it ended and how many bytes the server took.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public func flood(
        _ chunk: [UInt8],
        total: Int,
        stallTimeout: TimeInterval,
        between: () -> Void = {}
    ) -> (FloodEnd, sent: Int) {
        var sent = 0
        while sent < total {
            var offset = 0
            while offset < chunk.count {
                var poller = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                guard poll(&poller, 1, Int32(stallTimeout * 1000)) > 0 else { return (.stalled, sent) }
                let count = chunk[offset...].withUnsafeBytes {
                    Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
                }
                if count < 0 {
                    if errno == EAGAIN || errno == EINTR { continue }
                    return (errno == EPIPE || errno == ECONNRESET ? .closedByServer : .stalled, sent)
                }
                offset += count
                sent += count
            }
            between()
        }
        return (.sent, sent)
    }

    public func shutdownWrite() {
        Glibc.shutdown(fd, Int32(SHUT_WR))
    }

    /// Everything the server sends until it closes the connection or `timeout` passes.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public func readAll(timeout: TimeInterval = 15) -> String {
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, Int32(max(1, deadline.timeIntervalSinceNow * 1000))) > 0 else { break }
            let count = recv(fd, &buffer, buffer.count, 0)
            if count <= 0 { break }
            received += buffer[0..<count]
        }
        return String(decoding: received, as: UTF8.self)
    }

    /// One answer on a kept-alive connection: its head and a body of its `Content-Length`; nil when
    /// the server closed first or `timeout` passed.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public func readAnswer(timeout: TimeInterval = 15) -> String? {
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        let deadline = Date().addingTimeInterval(timeout)
        let separator = Array("\r\n\r\n".utf8)
        while Date() < deadline {
            if let end = received.indices.first(where: { received[$0...].starts(with: separator) }) {
                let head = String(decoding: received[..<end], as: UTF8.self)
                let length =
                    head.split(separator: "\r\n").lazy
                    .compactMap { line -> Int? in
                        let parts = line.split(separator: ":", maxSplits: 1)
                        guard parts.count == 2, parts[0].lowercased() == "content-length" else { return nil }
                        return Int(parts[1].trimmingCharacters(in: .whitespaces))
                    }
                    .first ?? 0
                if received.count >= end + separator.count + length {
                    return String(decoding: received[..<(end + separator.count + length)], as: UTF8.self)
                }
            }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, Int32(max(1, deadline.timeIntervalSinceNow * 1000))) > 0 else { return nil }
            let count = recv(fd, &buffer, buffer.count, 0)
            if count <= 0 { return nil }
            received += buffer[0..<count]
        }
        return nil
    }

    /// What one recv(2) returns within `timeout`: part of an answer; empty when nothing came or the
    /// server closed.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public func readSome(timeout: TimeInterval = 15) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 65536)
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, Int32(timeout * 1000)) > 0 else { return [] }
        let count = recv(fd, &buffer, buffer.count, 0)
        return count > 0 ? Array(buffer[0..<count]) : []
    }

    /// Whether the server closes the connection within `timeout`.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public func waitForClose(timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while Date() < deadline {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 100) > 0 else { continue }
            if recv(fd, &buffer, buffer.count, 0) <= 0 { return true }
        }
        return false
    }

    /// Sends `bytes` on a new connection and returns all the server answers.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public static func exchange(_ bytes: [UInt8], socket: String, shutdownWrite: Bool = false) throws -> String {
        let client = try UnixSocketClient(socket: socket)
        try client.send(bytes)
        if shutdownWrite { client.shutdownWrite() }
        return client.readAll()
    }

    /// One `GET target` per connection, all connections open before any request is sent, so that the
    /// server has them all at once. Returns each answer's status and body.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public static func concurrentGets(
        _ target: String,
        count: Int,
        socket: String
    ) throws -> [(status: Int, body: String)] {
        try concurrentRequests(
            "GET \(target) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            count: count,
            socket: socket
        )
    }

    /// `request` (a whole HTTP/1.1 request that closes its connection) on `count` connections, all
    /// open before any request is sent. Returns each answer's status and body.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public static func concurrentRequests(
        _ requestText: String,
        count: Int,
        socket: String
    ) throws -> [(status: Int, body: String)] {
        let clients = try (0..<count).map { _ in try UnixSocketClient(socket: socket) }
        let request = Array(requestText.utf8)
        for client in clients { try client.send(request) }
        return clients.map { client in
            let answer = client.readAll()
            let status = Int(answer.split(separator: " ", maxSplits: 2).dropFirst().first ?? "") ?? 0
            let body = answer.range(of: "\r\n\r\n").map { String(answer[$0.upperBound...]) } ?? ""
            return (status, body)
        }
    }

}

extension UnixSocketClient {
    /// The status of a plain `GET target` on a new connection: for polling without a child process.
    @available(*, noasync, message: "blocks a thread of the concurrency pool: call the async overload")
    public static func status(of target: String, socket: String) throws -> Int {
        let answer = try UnixSocketClient.exchange(
            Array("GET \(target) HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8),
            socket: socket
        )
        return Int(answer.split(separator: " ", maxSplits: 2).dropFirst().first ?? "") ?? 0
    }
}

// MARK: From async code

extension UnixSocketClient {
    /// Connects on a thread of its own: connect(2) blocks while the server's backlog is full.
    public static func connect(_ path: String) async throws -> UnixSocketClient {
        try await onOwnThread { try UnixSocketClient(socket: path) }
    }

    /// Connects and sends `bytes` in one step on a thread of its own: against a short idle timeout,
    /// no gap between the two that a loaded machine could stretch past it.
    public static func connect(_ path: String, sending bytes: [UInt8]) async throws -> UnixSocketClient {
        try await onOwnThread {
            let client = try UnixSocketClient(socket: path)
            try client.send(bytes)
            return client
        }
    }

    public func send(_ bytes: [UInt8]) async throws {
        try await onOwnThread { try self.send(bytes) }
    }

    public func readAll(timeout: TimeInterval = 15) async -> String {
        await onOwnThread { self.readAll(timeout: timeout) }
    }

    public func readSome(timeout: TimeInterval = 15) async -> [UInt8] {
        await onOwnThread { self.readSome(timeout: timeout) }
    }

    public func readAnswer(timeout: TimeInterval = 15) async -> String? {
        await onOwnThread { self.readAnswer(timeout: timeout) }
    }

    public func waitForClose(timeout: TimeInterval) async -> Bool {
        await onOwnThread { self.waitForClose(timeout: timeout) }
    }

    public static func exchange(_ bytes: [UInt8], socket: String, shutdownWrite: Bool = false) async throws -> String {
        try await onOwnThread { try exchange(bytes, socket: socket, shutdownWrite: shutdownWrite) }
    }

    public static func concurrentGets(
        _ target: String,
        count: Int,
        socket: String
    ) async throws -> [(status: Int, body: String)] {
        try await onOwnThread { try concurrentGets(target, count: count, socket: socket) }
    }

    public static func concurrentRequests(
        _ requestText: String,
        count: Int,
        socket: String
    ) async throws -> [(status: Int, body: String)] {
        try await onOwnThread { try concurrentRequests(requestText, count: count, socket: socket) }
    }

    public static func status(of target: String, socket: String) async throws -> Int {
        try await onOwnThread { try status(of: target, socket: socket) }
    }
}
