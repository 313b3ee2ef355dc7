import NIOHTTP1
import Testing

@testable import TokenDaemon

/// What the API proxy lets through and how it rewrites headers (`ProxyRules`).
@Suite struct ProxyRulesTests {
    static func head(
        _ headers: [(String, String)] = [],
        uri: String = "/v1/x",
        method: HTTPMethod = .GET
    ) -> HTTPRequestHead {
        HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: HTTPHeaders(headers))
    }

    static let tcp = ProxyRules.Listener.tcp(.init(host: "127.0.0.1", port: 8089))

    @Test func theClientsCredentialsHopByHopFieldsAndFramingNeverGoUpstream() {
        let forwarded = ProxyRules.forwardedHeaders(
            HTTPHeaders([
                ("Authorization", "Bearer theirs"), ("X-API-Key", "theirs"), ("Connection", "close, X-Private"),
                ("X-Private", "1"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Transfer-Encoding", "chunked"),
                ("Upgrade", "websocket"), ("Proxy-Authorization", "Basic eA=="), ("Host", "localhost"),
                ("Content-Length", "5"), ("Expect", "100-continue"), ("Accept", "application/json"),
                ("X-Request-Id", "abc"), ("Via", "1.1 edge"),
            ])
        )
        #expect(forwarded.map(\.name) == ["Accept", "X-Request-Id", "Via"])
        #expect(forwarded.first(name: "via") == "1.1 edge, 1.1 fts-tokend")
    }

    @Test func answersKeepEndToEndFieldsAndContentLength() {
        let headers = ProxyRules.clientHeaders(
            HTTPHeaders([
                ("Content-Type", "application/json"), ("Content-Length", "12"), ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"), ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"), ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", "Basic"),
            ])
        )
        #expect(headers.map(\.name) == ["Content-Type", "Content-Length", "Set-Cookie", "Via"])
    }

    /// `ProxyRules.refusal` on a request to `/v1/x` unless `target` says otherwise.
    static func refusal(
        _ head: HTTPRequestHead,
        target: String? = nil,
        listener: ProxyRules.Listener,
        allowBrowsers: Bool,
        maxBodyBytes: Int,
        denyPaths: [String] = ["/auth/token", "/auth/"]
    ) -> ProxyRules.Refusal? {
        ProxyRules.refusal(
            head,
            upstreamTarget: target ?? head.uri,
            policy: .init(
                listener: listener,
                allowBrowsers: allowBrowsers,
                maxBodyBytes: maxBodyBytes,
                denyPaths: denyPaths.map(DeniedPath.init)
            )
        )
    }

    @Test func onlyIdempotentMethodsAreReplayableAndTraceNever() {
        #expect([HTTPMethod.GET, .HEAD, .OPTIONS, .PUT, .DELETE].allSatisfy { ProxyRules.rule(for: $0).replayable })
        #expect(![HTTPMethod.POST, .PATCH, .TRACE, .CONNECT].contains { ProxyRules.rule(for: $0).replayable })
    }

    /// Attack: TRACE echoes the request (the daemon's credentials with it), and NIO's encoder sends
    /// it without framing, so a body after it is a smuggled second request.
    @Test(arguments: [HTTPMethod.TRACE, .CONNECT])
    func traceAndConnectAreRefusedWith405(_ method: HTTPMethod) {
        let refusal = Self.refusal(
            Self.head(uri: "/v1/x", method: method),
            listener: .unixSocket,
            allowBrowsers: false,
            maxBodyBytes: 10
        )
        #expect(refusal?.status == .methodNotAllowed && refusal?.reason == .method)
        #expect(refusal?.headers.contains { $0.0 == "Allow" && !$0.1.contains("TRACE") } == true)
    }

    /// The one rule behind the TRACE smuggling: a method whose body the encoder would not frame
    /// never carries one, whatever else the table says of it.
    @Test func everyMethodTheEncoderSendsUnframedIsNeverForwardedWithABody() {
        let methods: [HTTPMethod] = [
            .GET, .PUT, .ACL, .HEAD, .POST, .COPY, .LOCK, .MOVE, .BIND, .LINK, .PATCH, .TRACE, .MKCOL, .MERGE,
            .PURGE, .NOTIFY, .SEARCH, .UNLOCK, .REBIND, .UNBIND, .REPORT, .DELETE, .UNLINK, .CONNECT, .MSEARCH,
            .OPTIONS, .PROPFIND, .CHECKOUT, .PROPPATCH, .SUBSCRIBE, .MKCALENDAR, .MKACTIVITY, .UNSUBSCRIBE,
            .SOURCE, .RAW(value: "FOO"),
        ]
        for method in methods where !ProxyRules.rule(for: method).framesBody {
            for framing in [("Content-Length", "5"), ("Transfer-Encoding", "chunked")] {
                let head = Self.head([framing], method: method)
                #expect(
                    Self.refusal(head, listener: .unixSocket, allowBrowsers: false, maxBodyBytes: 10) != nil,
                    "\(method) with \(framing.0)"
                )
            }
        }
        #expect(!ProxyRules.rule(for: .TRACE).framesBody, "NIO's encoder drops TRACE's framing")
    }

    /// Attack: `Transfer-Encoding: gzip, chunked` lost its gzip on the way (the proxy re-frames
    /// bodies): a coding list other than `chunked` alone is refused, not altered.
    @Test(arguments: ["gzip, chunked", "gzip", "chunked, chunked", "identity"])
    func aCodingListTheProxyCannotPassOnIsRefused(_ coding: String) {
        let head = Self.head([("Transfer-Encoding", coding)], method: .POST)
        let refusal = Self.refusal(head, listener: .unixSocket, allowBrowsers: false, maxBodyBytes: 10)
        #expect(refusal?.status == .notImplemented && refusal?.reason == .coding)
        let chunked = Self.head([("Transfer-Encoding", "Chunked")], method: .POST)
        #expect(Self.refusal(chunked, listener: .unixSocket, allowBrowsers: false, maxBodyBytes: 10) == nil)
    }

    /// Attack: `X_Api_Key` or `authorization` spelt otherwise reaches CGI, WSGI or PHP upstreams as
    /// the credential (they read `_` as `-`, in any case).
    @Test func headerNamesThatNormaliseToACredentialNeverGoUpstream() {
        let forwarded = ProxyRules.forwardedHeaders(
            HTTPHeaders([
                ("X_Api_Key", "theirs"), ("x-api_key", "theirs"), ("X_API-KEY", "theirs"), ("AUTHORIZATION", "x"),
                ("Transfer_Encoding", "chunked"), ("Content_Length", "3"), ("Proxy_Authorization", "x"),
                ("Host_", "x"), ("X_Request_Id", "kept"), ("X.Api.Key", "theirs"), ("X~API~KEY", "theirs"),
                ("X+Api+Key", "theirs"), ("Authorization.", "kept: another name"),
            ])
        )
        #expect(forwarded.map(\.name) == ["Host_", "X_Request_Id", "Authorization.", "Via"])
    }

    /// Attack: the log-in endpoint through the proxy reaches the auth server with the organisation's
    /// key (password guessing, lock-out). Every spelling of it is refused 403.
    @Test(arguments: [
        "/auth/token", "/AUTH/TOKEN", "/auth/token?x=1", "//auth//token", "/x/../auth/token", "/./auth/./token",
        "/auth/%74oken", "/%61uth/token", "/auth%2ftoken", "/auth%252Ftoken", "/auth;a=1/token;b=2", "/auth\\token",
        "/auth/token.json", "/auth/token/", "/auth/tokens", "/auth.", "/auth", "/auth/", "/auth/refresh",
        "/../../auth/token", "/auth /token", "/auth/token#frag",
    ])
    func everySpellingOfADeniedPathIsRefused(_ target: String) {
        let refusal = Self.refusal(
            Self.head(uri: target, method: .POST),
            listener: .unixSocket,
            allowBrowsers: false,
            maxBodyBytes: 10
        )
        // A target servers read differently (`//`, `\\`, `#`) is refused before its path is judged.
        let refused = refusal?.reason == .deniedPath || refusal?.reason == .target
        #expect(refused, "\(CanonicalPath(target))")
        #expect(DeniedPath("/auth/").covers(CanonicalPath(target)), "\(CanonicalPath(target))")
    }

    /// Attack (the second review): `//x/auth/token` is host `x` and path `/auth/token` to URL
    /// parsers (Node's, the JDK's); `/\\x/…` too; a `#` may or may not cut the path. Refused 400.
    @Test(arguments: ["//x/auth/token", "//127.0.0.1/auth/token", "/\\x/auth/token", "/x#/../auth/token", "/a\\b"])
    func targetsThatServersReadDifferentlyAreRefused(_ target: String) {
        let refusal = Self.refusal(
            Self.head(uri: target),
            listener: .unixSocket,
            allowBrowsers: false,
            maxBodyBytes: 10
        )
        #expect(refusal?.status == .badRequest && refusal?.reason == .target, "\(target)")
    }

    /// Attack (the second review): a segment of dots and spaces (`..%20`) is a dot segment to a
    /// server that strips trailing spaces.
    @Test(arguments: ["/x/..%20/auth/token", "/x/..%2e/auth/token", "/x/.../auth/token", "/x/.%20/../auth/token"])
    func dotSegmentsSpeltWithSpacesOrMoreDotsAreJudgedAsDotSegments(_ target: String) {
        let refusal = Self.refusal(
            Self.head(uri: target),
            listener: .unixSocket,
            allowBrowsers: false,
            maxBodyBytes: 10
        )
        #expect(refusal?.reason == .deniedPath, "\(CanonicalPath(target))")
    }

    @Test func answersAreFramedByTheProxy() {
        let framing = { (status: HTTPResponseStatus, method: HTTPMethod, version: HTTPVersion, length: Bool) in
            ProxyRules.answerFraming(status: status, requestMethod: method, clientVersion: version, hasLength: length)
        }
        #expect(framing(.ok, .HEAD, .http1_1, false) == ProxyRules.AnswerFraming.none, "no body after HEAD")
        #expect(framing(.ok, .HEAD, .http1_1, true) == ProxyRules.AnswerFraming.none)
        #expect(framing(.notModified, .GET, .http1_1, false) == ProxyRules.AnswerFraming.none)
        #expect(framing(.noContent, .DELETE, .http1_0, false) == ProxyRules.AnswerFraming.none)
        #expect(framing(.ok, .GET, .http1_1, true) == .length)
        #expect(framing(.ok, .GET, .http1_1, false) == .chunked)
        #expect(framing(.ok, .GET, .http1_0, false) == .untilClose)
        #expect(framing(.ok, .GET, .http1_0, true) == .length)
    }

    @Test(arguments: ["/v1/auth/token", "/authors", "/api/echo", "/v1/x?next=/auth/token", "/", "/author/token"])
    func pathsBesideTheDeniedOnesAreForwarded(_ target: String) {
        #expect(
            Self.refusal(Self.head(uri: target), listener: .unixSocket, allowBrowsers: false, maxBodyBytes: 10) == nil
        )
    }

    /// The upstream's base path is part of what is judged: `/v2` + `/auth/token` is not denied by
    /// `/auth/token`, and `/gw` + `/login` is denied by `/gw/login`.
    @Test func deniedPathsAreJudgedOnThePathTheUpstreamReceives() {
        let head = Self.head(uri: "/login", method: .POST)
        let denied = Self.refusal(
            head,
            target: "/gw/login",
            listener: .unixSocket,
            allowBrowsers: false,
            maxBodyBytes: 10,
            denyPaths: ["/gw/login"]
        )
        #expect(denied?.reason == .deniedPath)
        #expect(
            Self.refusal(
                head,
                target: "/v2/login",
                listener: .unixSocket,
                allowBrowsers: false,
                maxBodyBytes: 10,
                denyPaths: ["/gw/login"]
            ) == nil
        )
    }

    @Test func theUnixSocketChecksNeitherHostNorOrigin() {
        let head = Self.head([("Host", "anything"), ("Origin", "https://x.example")])
        #expect(Self.refusal(head, listener: .unixSocket, allowBrowsers: false, maxBodyBytes: 10) == nil)
    }

    @Test(arguments: ["127.0.0.1:8089", "localhost:8089", "LOCALHOST:8089"])
    func theTCPListenerServesItsOwnHost(_ host: String) {
        let head = Self.head([("Host", host)])
        #expect(Self.refusal(head, listener: Self.tcp, allowBrowsers: false, maxBodyBytes: 10) == nil)
    }

    @Test(arguments: ["evil.example:8089", "127.0.0.1", "127.0.0.1:8090", "localhost", "", "127.0.0.1.nip.io:8089"])
    func aForeignHostIsDNSRebindingAndRefused(_ host: String) {
        let head = Self.head(host.isEmpty ? [] : [("Host", host)])
        #expect(
            Self.refusal(head, listener: Self.tcp, allowBrowsers: false, maxBodyBytes: 10)?.status
                == .misdirectedRequest
        )
    }

    @Test(arguments: [
        ("Origin", "null"), ("Origin", "http://localhost:3000"), ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-site"),
    ])
    func aWebPageIsRefusedUnlessBrowsersAreAllowed(_ name: String, _ value: String) {
        let head = Self.head([("Host", "localhost:8089"), (name, value)])
        #expect(Self.refusal(head, listener: Self.tcp, allowBrowsers: false, maxBodyBytes: 10)?.status == .forbidden)
        #expect(Self.refusal(head, listener: Self.tcp, allowBrowsers: true, maxBodyBytes: 10) == nil)
    }

    @Test func aURLTypedInTheAddressBarIsNotAPage() {
        let head = Self.head([("Host", "localhost:8089"), ("Sec-Fetch-Site", "none")])
        #expect(Self.refusal(head, listener: Self.tcp, allowBrowsers: false, maxBodyBytes: 10) == nil)
    }

    @Test func port80MayBeLeftOut() {
        let listener = ProxyRules.Listener.tcp(.init(host: "::1", port: 80))
        for host in ["[::1]", "[::1]:80", "localhost", "localhost:80"] {
            #expect(
                Self.refusal(
                    Self.head([("Host", host)]),
                    listener: listener,
                    allowBrowsers: false,
                    maxBodyBytes: 1
                ) == nil
            )
        }
    }

    @Test(arguments: [
        (head([("Host", "x")], uri: "http://api.example/v1"), HTTPResponseStatus.badRequest),
        (head(uri: "*", method: .OPTIONS), .badRequest),
        (head(uri: "api.example:443", method: .CONNECT), .methodNotAllowed),
        (head([("Content-Length", "11")], method: .POST), .payloadTooLarge),
    ])
    func notAForwardProxyAndBodiesAreBounded(_ head: HTTPRequestHead, _ status: HTTPResponseStatus) {
        #expect(Self.refusal(head, listener: .unixSocket, allowBrowsers: false, maxBodyBytes: 10)?.status == status)
    }
}
