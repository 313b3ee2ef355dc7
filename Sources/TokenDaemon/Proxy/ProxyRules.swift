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

    /// Field names compared without allocating (this runs for every header of every request).
    struct FieldName: Sendable {
        let lowercased: [UInt8]

        init(_ name: String) { lowercased = Array(name.lowercased().utf8) }

        func matches(_ name: String) -> Bool {
            name.utf8.count == lowercased.count
                && zip(name.utf8, lowercased).allSatisfy { byte, lower in
                    (byte >= 0x41 && byte <= 0x5A ? byte + 0x20 : byte) == lower
                }
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

    /// Methods whose request can be sent twice with the effect of once (RFC 9110 §9.2.2): the only
    /// ones the proxy replays after a rejected token.
    static func isIdempotent(_ method: HTTPMethod) -> Bool {
        switch method {
        case .GET, .HEAD, .OPTIONS, .TRACE, .PUT, .DELETE: true
        default: false
        }
    }

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

    /// Why `head` is refused before anything is sent upstream (status and message), or nil.
    static func refusal(
        _ head: HTTPRequestHead,
        listener: Listener,
        allowBrowsers: Bool,
        maxBodyBytes: Int
    ) -> (HTTPResponseStatus, String)? {
        if head.method == .CONNECT {
            return (.methodNotAllowed, "CONNECT is not proxied: this proxy forwards API requests only")
        }
        guard head.uri.hasPrefix("/") else {
            return (.badRequest, "the request target must be a path (\"/v1/…\"): this is not a forward proxy")
        }
        if let length = head.headers.first(name: "content-length").flatMap({ Int($0) }), length > maxBodyBytes {
            return (.payloadTooLarge, "request body of \(length) bytes is over outputs.proxy.maxRequestBodyBytes")
        }
        guard case .tcp(let address) = listener else { return nil }
        // DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
        // `Host: evil.example`.
        let host = head.headers.first(name: "host")?.lowercased() ?? ""
        guard allowedHosts(address).contains(host) else {
            return (.misdirectedRequest, "Host \"\(host)\" is not this proxy's address (\(address) or localhost)")
        }
        if !allowBrowsers {
            let site = head.headers.first(name: "sec-fetch-site")?.lowercased()
            if head.headers.contains(name: "origin") || (site != nil && site != "none") {
                return (
                    .forbidden,
                    "requests from web pages are refused (Origin or Sec-Fetch-Site): a page in a local browser must not "
                        + "spend the account; set outputs.proxy.allowBrowsers to serve them"
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
