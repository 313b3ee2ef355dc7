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

    @Test func onlyIdempotentMethodsAreReplayable() {
        #expect([HTTPMethod.GET, .HEAD, .OPTIONS, .PUT, .DELETE].allSatisfy(ProxyRules.isIdempotent))
        #expect(![HTTPMethod.POST, .PATCH].contains(where: ProxyRules.isIdempotent))
    }

    @Test func theUnixSocketChecksNeitherHostNorOrigin() {
        let head = Self.head([("Host", "anything"), ("Origin", "https://x.example")])
        #expect(ProxyRules.refusal(head, listener: .unixSocket, allowBrowsers: false, maxBodyBytes: 10) == nil)
    }

    @Test(arguments: ["127.0.0.1:8089", "localhost:8089", "LOCALHOST:8089"])
    func theTCPListenerServesItsOwnHost(_ host: String) {
        let head = Self.head([("Host", host)])
        #expect(ProxyRules.refusal(head, listener: Self.tcp, allowBrowsers: false, maxBodyBytes: 10) == nil)
    }

    @Test(arguments: ["evil.example:8089", "127.0.0.1", "127.0.0.1:8090", "localhost", "", "127.0.0.1.nip.io:8089"])
    func aForeignHostIsDNSRebindingAndRefused(_ host: String) {
        let head = Self.head(host.isEmpty ? [] : [("Host", host)])
        #expect(
            ProxyRules.refusal(head, listener: Self.tcp, allowBrowsers: false, maxBodyBytes: 10)?.0
                == .misdirectedRequest
        )
    }

    @Test(arguments: [
        ("Origin", "null"), ("Origin", "http://localhost:3000"), ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-site"),
    ])
    func aWebPageIsRefusedUnlessBrowsersAreAllowed(_ name: String, _ value: String) {
        let head = Self.head([("Host", "localhost:8089"), (name, value)])
        #expect(ProxyRules.refusal(head, listener: Self.tcp, allowBrowsers: false, maxBodyBytes: 10)?.0 == .forbidden)
        #expect(ProxyRules.refusal(head, listener: Self.tcp, allowBrowsers: true, maxBodyBytes: 10) == nil)
    }

    @Test func aURLTypedInTheAddressBarIsNotAPage() {
        let head = Self.head([("Host", "localhost:8089"), ("Sec-Fetch-Site", "none")])
        #expect(ProxyRules.refusal(head, listener: Self.tcp, allowBrowsers: false, maxBodyBytes: 10) == nil)
    }

    @Test func port80MayBeLeftOut() {
        let listener = ProxyRules.Listener.tcp(.init(host: "::1", port: 80))
        for host in ["[::1]", "[::1]:80", "localhost", "localhost:80"] {
            #expect(
                ProxyRules.refusal(
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
        #expect(ProxyRules.refusal(head, listener: .unixSocket, allowBrowsers: false, maxBodyBytes: 10)?.0 == status)
    }
}
