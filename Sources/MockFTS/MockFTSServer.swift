import Crypto
import Glibc
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A stand-in for the FTS auth API on loopback, for the tests, the demo and `fts-tokend mock-server`.
///
/// Endpoints:
/// - `POST /auth/token` and `POST /auth/login`: checks `x-api-key`, then `{email, password}`; answers
///   `{token, expires, userId, tenantId}` with an HS256 JWT valid for `tokenTTL` (`expires` in seconds
///   or milliseconds), 401 for a wrong key or password, 400 for a malformed body.
/// - `GET /api/whoami`: 200 `{userId}` only for the right key and a valid, unexpired, unrevoked token
///   of ours (`Authorization: Bearer <token>` or the bare token), else 401.
/// - `GET|POST /api/echo`: what arrived: `{method, path, query, bodyLength, bodySHA256, keyValid,
///   tokenValid, headers}`, the headers without `Authorization` and `x-api-key` (whose validity it
///   reports instead); 401 when the key or token is not valid, as the API would.
/// - `GET /api/slow?ms=N`: the echo, N milliseconds late (at most 60,000).
/// - `GET /api/stream?bytes=N`: N bytes of `streamByte(at:)`, written only as the client reads them.
/// - `dropReusedConnections(_:)`: the next requests that come on a kept-alive connection that already
///   served one are not answered; the connection closes, as when a server's idle timeout ran out
///   just as a client reused the connection.
/// - `POST /_mock/revoke`: every token issued so far is refused by the API from now on (a
///   server-side revocation); logins still work.
/// - `POST /_mock/faults` (a `MockFaultScript` as JSON) and `GET /_mock/stats`: control for tests in
///   other processes.
public final class MockFTSServer: Sendable {
    public struct Configuration: Sendable {
        public var apiKey: String
        public var email: String
        public var password: String
        public var tokenTTL: TimeInterval
        public var expiresInMilliseconds: Bool
        public var userId: String
        public var tenantId: String?
        /// Like a provider that keeps one active token per user: each login revokes every token
        /// issued before it (the API refuses them from then on).
        public var oneTokenPerUser = false

        public init(
            apiKey: String,
            email: String,
            password: String,
            tokenTTL: TimeInterval = 20,
            expiresInMilliseconds: Bool = false,
            userId: String = "user-1",
            tenantId: String? = "tenant-1"
        ) {
            self.apiKey = apiKey
            self.email = email
            self.password = password
            self.tokenTTL = tokenTTL
            self.expiresInMilliseconds = expiresInMilliseconds
            self.userId = userId
            self.tenantId = tenantId
        }
    }

    /// What the mock has seen.
    public struct Stats: Sendable, Codable, Equatable {
        /// Requests to the login paths, whatever their outcome.
        public var loginRequests = 0
        /// Tokens issued.
        public var tokensIssued = 0
        public var whoamiAccepted = 0
        public var whoamiRejected = 0
        /// API requests (`/api/…`) answered 200 and 401.
        public var apiAccepted = 0
        public var apiRejected = 0
        public var revocations = 0
        /// TCP connections accepted (logins and API alike).
        public var connectionsAccepted = 0
        /// Requests not answered by `dropReusedConnections`.
        public var reusedConnectionsDropped = 0
        /// `User-Agent` of the last login request.
        public var lastUserAgent: String?
        /// Arrival of every login request, in seconds since 1970.
        public var loginTimes: [Double] = []
    }

    private struct State {
        var configuration: Configuration
        var script = MockFaultScript()
        var stats = Stats()
        /// Every token issued, so tests can search output for them (never served over HTTP).
        var issuedTokens: [String] = []
        /// Tokens refused by the API whatever their expiry (`revokeAll`).
        var revoked: Set<String> = []
        var reusedConnectionsToDrop = 0
    }

    private let state: NIOLockedValueBox<State>
    private let jwt = MockJWT()
    private let channel = NIOLockedValueBox<(any Channel)?>(nil)

    public init(_ configuration: Configuration) {
        state = NIOLockedValueBox(State(configuration: configuration))
    }

    /// PEM files for serving HTTPS.
    public struct TLSFiles: Sendable {
        public var certificateChain: String
        public var privateKey: String
        /// The newest protocol the mock offers (an outdated server, for the client's minimum).
        public var maximumVersion: TLSVersion?

        public init(certificateChain: String, privateKey: String, maximumVersion: TLSVersion? = nil) {
            self.certificateChain = certificateChain
            self.privateKey = privateKey
            self.maximumVersion = maximumVersion
        }
    }

    /// Listens on `host:port` (port 0 picks a free one) and returns the bound port. With `tls`, it
    /// speaks HTTPS.
    public func start(host: String = "127.0.0.1", port: Int = 0, tls: TLSFiles? = nil) async throws -> Int {
        let context = try tls.map { files in
            var configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMFile(files.certificateChain).map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(file: files.privateKey, format: .pem))
            )
            if let maximum = files.maximumVersion {
                configuration.maximumTLSVersion = maximum
                configuration.minimumTLSVersion = .tlsv1
            }
            return try NIOSSLContext(configuration: configuration)
        }
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let context {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(MockHTTPHandler(server: self))
                }
            }
        let bound = try await bootstrap.bind(host: host, port: port).get()
        channel.withLockedValue { $0 = bound }
        return bound.localAddress?.port ?? port
    }

    public func stop() async {
        let bound = channel.withLockedValue { value in
            defer { value = nil }
            return value
        }
        try? await bound?.close()
    }

    // MARK: Control

    public var stats: Stats { state.withLockedValue { $0.stats } }

    /// Every token issued so far.
    public var issuedTokens: [String] { state.withLockedValue { $0.issuedTokens } }

    /// Whether `token` is one of ours, unexpired and not revoked now: what `whoami` checks, without HTTP.
    public func accepts(_ token: String) -> Bool {
        verdict(on: token, at: Date()) == .accepted && !state.withLockedValue { $0.revoked.contains(token) }
    }

    /// Every token issued so far is refused by the API from now on (logins go on issuing new ones).
    /// Returns how many were revoked.
    @discardableResult
    public func revokeAll() -> Int {
        state.withLockedValue { state in
            state.revoked.formUnion(state.issuedTokens)
            state.stats.revocations += 1
            return state.revoked.count
        }
    }

    /// What `whoami` would have answered for `token` at `instant`, by expiry alone (revocation aside).
    public func verdict(on token: String, at instant: Date) -> TokenVerdict {
        guard let expiry = expiry(of: token) else { return .unknown }
        return expiry > instant ? .accepted : .expired
    }

    /// The JWT `exp` of a whole token this mock issued; nil for anything else.
    public func expiry(of token: String) -> Date? {
        jwt.expiry(of: token)
    }

    public enum TokenVerdict: Sendable {
        case accepted
        /// Issued by this mock, but past its `exp`.
        case expired
        /// Not a whole token of this mock: partial, mixed or foreign.
        case unknown
    }

    public func script(_ script: MockFaultScript) {
        state.withLockedValue { $0.script = script }
    }

    /// Applies `faults` to the coming logins, one each, keeping `always`.
    public func enqueue(_ faults: MockFault...) {
        state.withLockedValue { $0.script.next += faults }
    }

    /// Applies `fault` to every login until called again with nil.
    public func always(_ fault: MockFault?) {
        state.withLockedValue { $0.script.always = fault }
    }

    /// The next `count` requests that arrive on a connection that already served one close it instead
    /// of being answered.
    public func dropReusedConnections(_ count: Int) {
        state.withLockedValue { $0.reusedConnectionsToDrop = count }
    }

    /// Whether to drop a request that came on a connection that already served one (and counts it).
    fileprivate func takeReusedConnectionDrop() -> Bool {
        state.withLockedValue { state in
            guard state.reusedConnectionsToDrop > 0 else { return false }
            state.reusedConnectionsToDrop -= 1
            state.stats.reusedConnectionsDropped += 1
            return true
        }
    }

    fileprivate func connectionAccepted() {
        state.withLockedValue { $0.stats.connectionsAccepted += 1 }
    }

    public func update(_ change: @Sendable (inout Configuration) -> Void) {
        state.withLockedValue { change(&$0.configuration) }
    }

    // MARK: Handling

    struct Response: Sendable {
        var status: HTTPResponseStatus
        var headers: [(String, String)] = []
        var body: String
        /// Wait this long before answering.
        var delay: TimeInterval = 0
        /// Never answer.
        var hang = false
        /// The token issued in this answer, if any.
        var token: String?
        /// Instead of `body`: this many bytes of `streamByte(at:)`, written as the client reads them.
        var streamBytes: Int?
    }

    /// Byte `index` of a `/api/stream` body (`index % 251`: a prime, so that no power-of-two chunk
    /// repeats, and a reader can check every byte it got).
    public static func streamByte(at index: Int) -> UInt8 { UInt8(index % 251) }

    /// 256 periods of the stream from byte 0 (64,256 bytes): the bytes from `index` on are this
    /// pattern's bytes from `index % 251` on, so a writer copies and a reader compares them with
    /// memcpy and memcmp rather than byte by byte (in a debug build, byte by byte over 20 MB held a
    /// thread for seconds).
    fileprivate static let streamPattern: [UInt8] = (0..<(251 * 256)).map(streamByte(at:))

    /// Calls `body` with spans of the stream that together are `count` bytes from `start` on.
    fileprivate static func forEachStreamSpan(
        from start: Int,
        count: Int,
        _ body: (UnsafeRawBufferPointer) -> Bool
    ) -> Bool {
        streamPattern.withUnsafeBytes { pattern in
            var position = start
            let end = start + count
            while position < end {
                let phase = position % 251
                let length = min(end - position, pattern.count - phase)
                guard body(UnsafeRawBufferPointer(rebasing: pattern[phase..<(phase + length)])) else { return false }
                position += length
            }
            return true
        }
    }

    /// Whether `bytes` are exactly the stream's bytes from `start` on.
    public static func isStream(_ bytes: some ContiguousBytes, from start: Int = 0) -> Bool {
        bytes.withUnsafeBytes { received in
            var offset = 0
            return forEachStreamSpan(from: start, count: received.count) { span in
                defer { offset += span.count }
                return memcmp(received.baseAddress! + offset, span.baseAddress!, span.count) == 0
            }
        }
    }

    /// What arrived of a request's body: its length and SHA-256 over every byte, and its first
    /// 64 KiB (all the login and control paths read).
    struct ReceivedBody: Sendable {
        var head: [UInt8] = []
        var length = 0
        var sha256 = ""
    }

    func respond(method: HTTPMethod, uri: String, headers: HTTPHeaders, body received: ReceivedBody) -> Response {
        let now = Date()
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = String(parts.first ?? "")
        let query = parts.count == 2 ? String(parts[1]) : ""
        let body = received.head
        switch (method, path) {
        case (.GET, "/api/echo"), (.POST, "/api/echo"):
            return echo(method: method, path: path, query: query, headers: headers, body: received, now: now)
        case (.GET, "/api/stream"):
            // Refused as the echo refuses (401) without valid credentials.
            let bytes = Self.queryValue("bytes", in: query).flatMap(Int.init) ?? 0
            guard case (true, _?) = authenticate(headers, now: now), bytes >= 0, bytes <= 1 << 34 else {
                return echo(method: method, path: path, query: query, headers: headers, body: received, now: now)
            }
            state.withLockedValue { $0.stats.apiAccepted += 1 }
            return Response(
                status: .ok,
                headers: [("Content-Type", "application/octet-stream")],
                body: "",
                streamBytes: bytes
            )
        case (.GET, "/api/slow"):
            let milliseconds = Self.queryValue("ms", in: query).flatMap(Int.init) ?? 0
            var response = echo(method: method, path: path, query: query, headers: headers, body: received, now: now)
            response.delay = Double(min(max(milliseconds, 0), 60_000)) / 1000
            return response
        case (.POST, "/_mock/revoke"):
            return Response(status: .ok, body: #"{"revoked":\#(revokeAll())}"#)
        case (.POST, "/auth/token"), (.POST, "/auth/login"):
            return login(headers: headers, body: body, now: now)
        case (.GET, "/api/whoami"):
            return whoami(headers: headers, now: now)
        case (.POST, "/_mock/faults"):
            guard let script = try? JSONDecoder().decode(MockFaultScript.self, from: Data(body)) else {
                return Response(status: .badRequest, body: #"{"error":"expected a MockFaultScript"}"#)
            }
            self.script(script)
            return Response(status: .ok, body: "{}")
        case (.GET, "/_mock/stats"):
            let encoded = (try? JSONEncoder().encode(stats)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
            return Response(status: .ok, body: encoded)
        default:
            return Response(status: .notFound, body: #"{"error":"not found"}"#)
        }
    }

    private struct Credentials: Decodable {
        var email: String
        var password: String
    }

    private func login(headers: HTTPHeaders, body: [UInt8], now: Date) -> Response {
        let (configuration, fault, serial) = state.withLockedValue { state -> (Configuration, MockFault?, Int) in
            state.stats.loginRequests += 1
            state.stats.loginTimes.append(now.timeIntervalSince1970)
            state.stats.lastUserAgent = headers.first(name: "User-Agent")
            var fault = state.script.next.isEmpty ? state.script.always : state.script.next.removeFirst()
            if let chance = fault?.chance, Double.random(in: 0..<1) >= chance { fault = nil }
            return (state.configuration, fault, state.stats.loginRequests)
        }
        var response = answer(configuration, fault: fault, headers: headers, body: body, now: now, serial: serial)
        response.delay = fault?.delaySeconds ?? 0
        response.hang = fault?.hang ?? false
        response.headers.append(("Date", Self.httpDate(now)))
        if response.status == .ok, fault?.body == nil, let token = response.token {
            state.withLockedValue {
                $0.stats.tokensIssued += 1
                if $0.configuration.oneTokenPerUser { $0.revoked.formUnion($0.issuedTokens) }
                $0.issuedTokens.append(token)
            }
        }
        return response
    }

    private func answer(
        _ configuration: Configuration,
        fault: MockFault?,
        headers: HTTPHeaders,
        body: [UInt8],
        now: Date,
        serial: Int
    ) -> Response {
        if let status = fault?.status {
            var response = Response(status: HTTPResponseStatus(statusCode: status), body: #"{"error":"injected"}"#)
            if let retryAfter = fault?.retryAfter { response.headers.append(("Retry-After", retryAfter)) }
            return response
        }
        if let text = fault?.body {
            return Response(
                status: .ok,
                headers: [("Content-Type", fault?.contentType ?? "application/json")],
                body: text
            )
        }
        guard headers.first(name: "x-api-key") == configuration.apiKey else {
            return Response(status: .unauthorized, body: #"{"error":"invalid api key"}"#)
        }
        guard let credentials = try? JSONDecoder().decode(Credentials.self, from: Data(body)) else {
            return Response(status: .badRequest, body: #"{"error":"expected {email, password}"}"#)
        }
        guard credentials.email == configuration.email, credentials.password == configuration.password else {
            return Response(status: .unauthorized, body: #"{"error":"invalid credentials"}"#)
        }
        let expiresAt =
            (fault?.expired ?? false) ? now.addingTimeInterval(-60) : now.addingTimeInterval(configuration.tokenTTL)
        let token = jwt.issue(subject: configuration.userId, issuedAt: now, expiresAt: expiresAt, serial: serial)
        let stated = expiresAt.timeIntervalSince1970.rounded(.down) + (fault?.expiresSkewSeconds ?? 0)
        let expires = configuration.expiresInMilliseconds ? Int64(stated * 1000) : Int64(stated)
        var fields = [#""token":"\#(token)""#, #""expires":\#(expires)"#, #""userId":"\#(configuration.userId)""#]
        if let tenant = configuration.tenantId { fields.append(#""tenantId":"\#(tenant)""#) }
        return Response(
            status: .ok,
            headers: [("Content-Type", "application/json")],
            body: "{" + fields.joined(separator: ",") + "}",
            token: token
        )
    }

    static func queryValue(_ name: String, in query: String) -> String? {
        query.split(separator: "&").lazy.compactMap { pair -> String? in
            pair.hasPrefix(name + "=") ? String(pair.dropFirst(name.count + 1)) : nil
        }.first
    }

    /// The API's check of a request's credentials: the right key, and a token of ours that is
    /// unexpired and not revoked (its subject then).
    private func authenticate(_ headers: HTTPHeaders, now: Date) -> (keyValid: Bool, subject: String?) {
        let (configuration, revoked) = state.withLockedValue { ($0.configuration, $0.revoked) }
        var token = headers.first(name: "Authorization") ?? ""
        if token.hasPrefix("Bearer ") { token.removeFirst("Bearer ".count) }
        let subject = revoked.contains(token) ? nil : jwt.verify(token, now: now)
        return (headers.first(name: "x-api-key") == configuration.apiKey, subject)
    }

    /// What `/api/echo` answers (and tests decode).
    public struct Echo: Codable, Sendable {
        public var method: String
        public var path: String
        public var query: String
        public var bodyLength: Int
        public var bodySHA256: String
        public var keyValid: Bool
        public var tokenValid: Bool
        /// The headers received (names lowercased), without `Authorization` and `x-api-key`.
        public var headers: [String: String]
    }

    private func echo(
        method: HTTPMethod,
        path: String,
        query: String,
        headers: HTTPHeaders,
        body: ReceivedBody,
        now: Date
    ) -> Response {
        let (keyValid, subject) = authenticate(headers, now: now)
        let valid = keyValid && subject != nil
        state.withLockedValue { state in
            if valid { state.stats.apiAccepted += 1 } else { state.stats.apiRejected += 1 }
        }
        // The secrets themselves never go back; only whether they were valid.
        var shown: [String: String] = [:]
        for (name, value) in headers where !["authorization", "x-api-key"].contains(name.lowercased()) {
            shown[name.lowercased()] = shown[name.lowercased()].map { $0 + ", " + value } ?? value
        }
        let echo = Echo(
            method: method.rawValue,
            path: path,
            query: query,
            bodyLength: body.length,
            bodySHA256: body.sha256,
            keyValid: keyValid,
            tokenValid: subject != nil,
            headers: shown
        )
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let text = (try? encoder.encode(echo)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return Response(
            status: valid ? .ok : .unauthorized,
            headers: [("Content-Type", "application/json")],
            body: text
        )
    }

    private func whoami(headers: HTTPHeaders, now: Date) -> Response {
        guard case (true, let subject?) = authenticate(headers, now: now) else {
            state.withLockedValue { $0.stats.whoamiRejected += 1 }
            return Response(status: .unauthorized, body: #"{"error":"invalid or expired token"}"#)
        }
        state.withLockedValue { $0.stats.whoamiAccepted += 1 }
        return Response(
            status: .ok,
            headers: [("Content-Type", "application/json")],
            body: #"{"userId":"\#(subject)"}"#
        )
    }

    /// IMF-fixdate for the `Date` header.
    public static func httpDate(_ date: Date) -> String {
        let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        var seconds = time_t(date.timeIntervalSince1970.rounded(.down))
        var f = tm()
        gmtime_r(&seconds, &f)
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        return
            "\(days[Int(f.tm_wday)]), \(two(f.tm_mday)) \(months[Int(f.tm_mon)]) \(f.tm_year + 1900) \(two(f.tm_hour)):\(two(f.tm_min)):\(two(f.tm_sec)) GMT"
    }
}

/// Collects one request (head and body up to 64 KiB) and writes the server's answer; a streamed
/// answer is written 64 KiB at a time, only while the client keeps reading (channel writable).
private final class MockHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let server: MockFTSServer
    private var head: HTTPRequestHead?
    private var body = MockFTSServer.ReceivedBody()
    private var hash = SHA256()
    /// A streamed answer under way: bytes written so far, of how many, and whether to keep the connection.
    private var stream: (written: Int, total: Int, keepAlive: Bool)?
    /// Requests this connection has answered (or begun to).
    private var served = 0

    init(server: MockFTSServer) {
        self.server = server
    }

    func channelActive(context: ChannelHandlerContext) {
        server.connectionAccepted()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            if served > 0, server.takeReusedConnectionDrop() {
                context.close(promise: nil)
                return
            }
            self.head = head
            body = MockFTSServer.ReceivedBody()
            hash = SHA256()
        case .body(let chunk):
            body.length += chunk.readableBytes
            chunk.withUnsafeReadableBytes { hash.update(bufferPointer: $0) }
            if body.head.count < 64 * 1024 { body.head += chunk.readableBytesView.prefix(64 * 1024 - body.head.count) }
        case .end:
            guard let head else { return }
            self.head = nil
            served += 1
            body.sha256 = hash.finalize().map { byte in (byte < 16 ? "0" : "") + String(byte, radix: 16) }.joined()
            let response = server.respond(method: head.method, uri: head.uri, headers: head.headers, body: body)
            guard !response.hang else { return }
            let keepAlive = head.isKeepAlive
            let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            if response.delay > 0 {
                context.eventLoop.scheduleTask(in: .milliseconds(Int64(response.delay * 1000))) {
                    let (handler, context) = loopBound.value
                    handler.write(response, keepAlive: keepAlive, context: context)
                }
            } else {
                write(response, keepAlive: keepAlive, context: context)
            }
        }
    }

    private func write(_ response: MockFTSServer.Response, keepAlive: Bool, context: ChannelHandlerContext) {
        guard context.channel.isActive else { return }
        var headers = HTTPHeaders(response.headers)
        if !headers.contains(name: "Content-Type") { headers.add(name: "Content-Type", value: "application/json") }
        headers.add(name: "Content-Length", value: String(response.streamBytes ?? response.body.utf8.count))
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        context.write(
            wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: response.status, headers: headers))),
            promise: nil
        )
        if let total = response.streamBytes {
            stream = (0, total, keepAlive)
            return continueStream(context: context)
        }
        context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: response.body)))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, stream != nil { continueStream(context: context) }
        context.fireChannelWritabilityChanged()
    }

    /// Inside `continueStream`: a flush in it can report writability at once, and must not start
    /// a second writer inside the first.
    private var continuing = false

    /// Chunks written per turn of the event loop. The loop is NIO's shared one, which every other
    /// mock and test server in the test process uses too: a stream to a fast reader wrote for as
    /// long as it was read (a debug build fills each byte by hand), and stalled every other server
    /// on its loop for a minute in a loaded full run.
    static let chunksPerTurn = 4

    /// Writes chunks while the channel takes them, at most `chunksPerTurn` per turn of the loop; the
    /// rest waits for `channelWritabilityChanged`, or the next turn.
    private func continueStream(context: ChannelHandlerContext) {
        guard !continuing else { return }
        continuing = true
        defer { continuing = false }
        var budget = Self.chunksPerTurn
        while var current = stream, context.channel.isActive {
            guard current.written < current.total else {
                stream = nil
                let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
                if !current.keepAlive {
                    let channel = context.channel
                    done.whenComplete { _ in channel.close(promise: nil) }
                }
                return
            }
            guard context.channel.isWritable else {
                context.flush()
                // The flush drained it: its writability event found this writer busy, so go on.
                if context.channel.isWritable { continue }
                return
            }
            guard budget > 0 else {
                context.flush()
                context.eventLoop.assumeIsolated().execute { self.continueStream(context: context) }
                return
            }
            budget -= 1
            let count = min(64 * 1024, current.total - current.written)
            var chunk = context.channel.allocator.buffer(capacity: count)
            let start = current.written
            _ = MockFTSServer.forEachStreamSpan(from: start, count: count) { span in
                chunk.writeBytes(span)
                return true
            }
            current.written += count
            stream = current
            context.write(wrapOutboundOut(.body(.byteBuffer(chunk))), promise: nil)
        }
    }
}
