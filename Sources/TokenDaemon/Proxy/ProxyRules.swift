import NIOHTTP1

/// What the API proxy lets through and how it rewrites it: pure functions of a request or answer
/// head, unit-tested without a socket (README "Consumers").
enum ProxyRules {
    /// Hop-by-hop fields (RFC 9110 §7.6.1, and the legacy ones it names): they describe one
    /// connection, so they never cross the proxy in either direction. Fields that a `Connection`
    /// header lists are hop-by-hop too.
    static let hopByHop: Set<String> = [
        "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer",
        "proxy-authenticate", "proxy-authorization",
    ]

    /// The client's credentials, replaced by the daemon's.
    static let credentials: Set<String> = ["authorization", "x-api-key"]

    /// Set by the proxy itself: the upstream's `Host`, and the framing of the body it sends
    /// (`Content-Length` or chunked encoding). `Expect` is answered by the proxy (it reads the body
    /// before it calls the upstream).
    static let setByProxy: Set<String> = ["host", "content-length", "expect"]

    /// RFC 9110 §7.6.3: a proxy names itself in every message it forwards.
    static let via = "1.1 fts-tokend"

    /// Answers on an upstream rejection, say what the proxy did about it (README "Consumers").
    static let refreshHeader = "X-Token-Refresh"

    /// A request's headers as the upstream gets them, but for the daemon's credentials (added to
    /// each attempt): the client's, less hop-by-hop fields, the client's credentials and what the
    /// proxy sets itself, with `Via`.
    static func forwardedHeaders(_ client: HTTPHeaders) -> HTTPHeaders {
        copy(client, dropping: droppedFromRequests, reserving: 3)
    }

    /// An answer's headers as the client gets them: the upstream's, less hop-by-hop fields, with
    /// `Via`. `Content-Length` passes (the body passes byte for byte); a chunked body is chunked
    /// again by the client connection.
    static func clientHeaders(_ upstream: HTTPHeaders) -> HTTPHeaders {
        copy(upstream, dropping: droppedFromAnswers, reserving: 1)
    }

    /// `message`'s fields less `dropped` and those its `Connection` header names, then `Via` with
    /// this proxy's hop; room for `reserving` more.
    private static func copy(_ message: HTTPHeaders, dropping dropped: [FieldName], reserving: Int) -> HTTPHeaders {
        var headers = HTTPHeaders()
        headers.reserveCapacity(message.count + reserving)
        let listed = connectionListed(message)
        for (name, value) in message {
            guard !dropped.contains(where: { $0.matches(name) }), !isListed(name, in: listed) else { continue }
            headers.add(name: name, value: value)
        }
        headers.add(name: "Via", value: withOurVia(message))
        return headers
    }

    /// Field names compared without allocating (this runs for every header of every request), in
    /// any case and with every byte but a letter or digit read as `-`: CGI, WSGI and PHP turn `-`,
    /// `_` and `.` into `_`, lighttpd every other byte, so `X_Api_Key` or `X.Api.Key` reaches such
    /// an upstream as the API key.
    struct FieldName: Sendable {
        let folded: [UInt8]

        init(_ name: String) { folded = name.utf8.map(Self.fold) }

        static func fold(_ byte: UInt8) -> UInt8 {
            switch byte {
            case 0x41...0x5A: byte + 0x20
            case 0x30...0x39, 0x61...0x7A: byte
            default: 0x2D
            }
        }

        func matches(_ name: String) -> Bool {
            name.utf8.count == folded.count && zip(name.utf8, folded).allSatisfy { Self.fold($0) == $1 }
        }
    }

    /// `Via` is rewritten with this proxy's hop added, not copied.
    static let droppedFromRequests = (hopByHop.union(credentials).union(setByProxy).union(["via"])).map(FieldName.init)
    static let droppedFromAnswers = hopByHop.union(["via"]).map(FieldName.init)

    private static func isListed(_ name: String, in listed: Set<String>) -> Bool {
        !listed.isEmpty && listed.contains(name.lowercased())
    }

    /// The message's `Via` hops with this proxy's last.
    static func withOurVia(_ headers: HTTPHeaders) -> String {
        (headers[canonicalForm: "via"].map(String.init) + [via]).joined(separator: ", ")
    }

    /// The field names a `Connection` header lists, lowercased.
    static func connectionListed(_ headers: HTTPHeaders) -> Set<String> {
        var names = Set<String>()
        for value in headers[canonicalForm: "connection"] { names.insert(value.lowercased()) }
        return names
    }

    /// How an answer's body is delimited for the client. The proxy frames every answer itself (the
    /// client connection's encoder adds nothing), from the request and the upstream's head:
    enum AnswerFraming: Equatable {
        /// No body can follow: an answer to HEAD, or a 1xx, 204 or 304. The upstream's
        /// `Content-Length` passes, saying what a GET would have returned; no chunked terminator
        /// is written (a client would read its five bytes as the start of the next answer).
        case none
        /// The upstream's `Content-Length`: the body passes byte for byte.
        case length
        /// Chunked again for an HTTP/1.1 client (the upstream's was chunked or ran to its close).
        case chunked
        /// An HTTP/1.0 client and no length: the body runs until the connection closes, and it does.
        case untilClose
    }

    static func answerFraming(
        status: HTTPResponseStatus,
        requestMethod: HTTPMethod,
        clientVersion: HTTPVersion,
        hasLength: Bool
    ) -> AnswerFraming {
        if requestMethod == .HEAD || !status.mayHaveResponseBody { return .none }
        if hasLength { return .length }
        return clientVersion.major == 1 && clientVersion.minor >= 1 ? .chunked : .untilClose
    }

    /// What the proxy does with a request of each method: the one table of method rules.
    struct MethodRule: Sendable, Equatable {
        /// Forwarded at all; otherwise 405 and the upstream never sees it.
        var forwarded: Bool
        /// Sent once more with the next token after the upstream rejected one: idempotent methods
        /// (RFC 9110 §9.2.2) whose body was kept whole.
        var replayable: Bool
        /// NIO's request encoder frames a body of this method (`Content-Length` or chunked). A body
        /// it would send unframed reaches the upstream as the start of another request: smuggling.
        var framesBody: Bool
    }

    /// - TRACE: an upstream that answers it echoes the request, the daemon's credentials with it;
    ///   NIO's encoder also drops its framing, so a body after it is a second, smuggled request.
    /// - CONNECT: a tunnel, not an API request.
    /// - GET, HEAD, OPTIONS, PUT, DELETE: replayable. Every other method is forwarded, not replayed.
    static func rule(for method: HTTPMethod) -> MethodRule {
        switch method {
        case .TRACE: MethodRule(forwarded: false, replayable: false, framesBody: false)
        case .CONNECT: MethodRule(forwarded: false, replayable: false, framesBody: true)
        case .GET, .HEAD, .OPTIONS, .PUT, .DELETE: MethodRule(forwarded: true, replayable: true, framesBody: true)
        default: MethodRule(forwarded: true, replayable: false, framesBody: true)
        }
    }

    /// The `Allow` field of a 405: the methods the table forwards by name.
    static let allowedMethods = "GET, HEAD, OPTIONS, PUT, DELETE, POST, PATCH"

    /// Bodies up to this size are kept until the answer is in, so that the request can be replayed
    /// with a new token; a larger body streams through and its request is not replayed.
    static let replayBufferBytes = 64 * 1024

    /// Where a request came in, for the checks that depend on it.
    enum Listener: Sendable, Equatable {
        /// The Unix socket: only the socket's mode and allow lists decide who gets in.
        case unixSocket
        /// Loopback TCP: every local user, and every web page a local browser shows, can send here.
        case tcp(Configuration.ListenAddress)
    }

    /// Whether `target` is a path every server reads alike: it starts with one `/` (URL parsers read
    /// `//x/auth/token` as host `x` and path `/auth/token`), and has no `#` (not allowed in a request
    /// target: a server may cut there, or not) and no `\` (read as `/` by some: `/\x/auth/token`).
    static func isOriginForm(_ target: String) -> Bool {
        var bytes = target.utf8.makeIterator()
        guard bytes.next() == UInt8(ascii: "/") else { return false }
        if let second = bytes.next(), second == UInt8(ascii: "/") { return false }
        return !target.utf8.contains { $0 == UInt8(ascii: "#") || $0 == UInt8(ascii: "\\") }
    }

    /// What decides whether a request goes upstream: the listener it came in on and the settings
    /// in force (a reload's apply from the next request on).
    struct RequestPolicy: Sendable {
        var listener: Listener
        var allowBrowsers: Bool
        var maxBodyBytes: Int
        /// Paths on the upstream that are never proxied (`outputs.proxy.denyPaths`).
        var denyPaths: [DeniedPath]
    }

    /// A request the proxy answers itself: the status, a reason for the metrics and the log, a
    /// message for the client, and header fields the status calls for.
    struct Refusal: Sendable, Equatable {
        var status: HTTPResponseStatus
        var reason: Reason
        var message: String
        var headers: [(String, String)] = []

        /// The `reason` label of `fts_tokend_proxy_refusals_total` and of `event=proxy_refused`.
        enum Reason: String, Sendable, CaseIterable {
            case method
            case target
            case coding
            case unframedBody = "unframed_body"
            case tooLarge = "too_large"
            case deniedPath = "denied_path"
            case host
            case browser
            case peer
            case noToken = "no_token"
            case busy
            case stalled
        }

        static func == (a: Refusal, b: Refusal) -> Bool {
            a.status == b.status && a.reason == b.reason && a.message == b.message
                && a.headers.map { "\($0.0):\($0.1)" } == b.headers.map { "\($0.0):\($0.1)" }
        }
    }

    /// Why `head` is refused before anything is sent upstream, or nil. `upstreamTarget` is the
    /// target as the upstream would receive it (its base path, then the client's target). The
    /// rules, in order:
    /// 1. a method the table does not forward: 405;
    /// 2. a target that is not a path (absolute URL, `*`): 400, this is not a forward proxy;
    /// 3. a transfer coding other than `chunked` alone: 501 (the proxy re-frames bodies, and would
    ///    drop the other codings silently);
    /// 4. a body on a method the encoder sends unframed: 400;
    /// 5. a declared body over the limit: 413;
    /// 6. a denied path, judged on `upstreamTarget` in its canonical spelling: 403;
    /// 7. on TCP, a foreign `Host` (421) or a web page (403).
    static func refusal(_ head: HTTPRequestHead, upstreamTarget: String, policy: RequestPolicy) -> Refusal? {
        let method = rule(for: head.method)
        guard method.forwarded else {
            return Refusal(
                status: .methodNotAllowed,
                reason: .method,
                message: "\(head.method.rawValue) is not proxied: this proxy forwards API requests only",
                headers: [("Allow", allowedMethods)]
            )
        }
        guard isOriginForm(head.uri) else {
            return Refusal(
                status: .badRequest,
                reason: .target,
                message: "the request target must be a path (\"/v1/…\"): this is not a forward proxy"
            )
        }
        let codings = head.headers[canonicalForm: "transfer-encoding"].map { $0.lowercased() }
        if !codings.isEmpty, codings != ["chunked"] {
            return Refusal(
                status: .notImplemented,
                reason: .coding,
                message: "Transfer-Encoding other than chunked alone is not passed on"
            )
        }
        let declared = head.headers.first(name: "content-length").flatMap { Int($0) }
        if !method.framesBody, !codings.isEmpty || (declared ?? 0) > 0 {
            return Refusal(
                status: .badRequest,
                reason: .unframedBody,
                message: "\(head.method.rawValue) requests may not carry a body"
            )
        }
        if let declared, declared > policy.maxBodyBytes {
            return Refusal(
                status: .payloadTooLarge,
                reason: .tooLarge,
                message: "request body of \(declared) bytes is over outputs.proxy.maxRequestBodyBytes"
            )
        }
        let path = CanonicalPath(upstreamTarget)
        if let denied = policy.denyPaths.first(where: { $0.covers(path) }) {
            return Refusal(
                status: .forbidden,
                reason: .deniedPath,
                message: "\(denied.configured) is not proxied (outputs.proxy.denyPaths): log-ins are the daemon's own"
            )
        }
        guard case .tcp(let address) = policy.listener else { return nil }
        // DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
        // `Host: evil.example`.
        let host = head.headers.first(name: "host")?.lowercased() ?? ""
        guard allowedHosts(address).contains(host) else {
            return Refusal(
                status: .misdirectedRequest,
                reason: .host,
                message: "Host \"\(host)\" is not this proxy's address (\(address) or localhost)"
            )
        }
        if !policy.allowBrowsers {
            let site = head.headers.first(name: "sec-fetch-site")?.lowercased()
            if head.headers.contains(name: "origin") || (site != nil && site != "none") {
                return Refusal(
                    status: .forbidden,
                    reason: .browser,
                    message:
                        "requests from web pages are refused (Origin or Sec-Fetch-Site): a page in a local browser "
                        + "must not spend the account; set outputs.proxy.allowBrowsers to serve them"
                )
            }
        }
        return nil
    }

    /// The `Host` values a request to the TCP listener may carry: its address or `localhost`, with
    /// its port (without it too on port 80).
    static func allowedHosts(_ address: Configuration.ListenAddress) -> Set<String> {
        var hosts: Set<String> = ["\(address)", "localhost:\(address.port)"]
        if address.host == "127.0.0.1" { hosts.insert("127.0.0.1:\(address.port)") }
        if address.port == 80 {
            hosts.formUnion([address.host.contains(":") ? "[\(address.host)]" : address.host, "localhost"])
        }
        return hosts
    }
}
