import Foundation
import TestSupport
import Testing

/// The API proxy as a trust boundary (README "API proxy", docs/reliability.md "Trust boundaries"):
/// each test is an attack a consumer can make on `api.sock`, judged on the exact bytes the upstream
/// receives (`CapturingUpstream`), not only on what the client is told.
@Suite struct ProxyBoundaryTests {
    /// A daemon whose proxy forwards to `upstream`, with more proxy `settings` (JSON members).
    static func harness(_ upstream: CapturingUpstream, _ settings: String = "") async throws -> DaemonHarness {
        let port = try await upstream.start()
        return try await ProxyTests.harness(
            #""upstream": "http://127.0.0.1:\#(port)""# + (settings.isEmpty ? "" : ", " + settings)
        )
    }

    /// The lines of one HTTP request's head as the upstream received it, by field name (lowercased).
    static func fields(_ request: CapturingUpstream.Request, _ name: String) -> [String] {
        request.headers.filter { $0.0.lowercased() == name }.map(\.1)
    }

    /// Every request the upstream parsed carries exactly one `Authorization` and one `x-api-key`,
    /// both the daemon's, and no field that normalises to either.
    static func expectOnlyTheDaemonsCredentials(
        _ upstream: CapturingUpstream,
        harness: DaemonHarness,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let token = harness.token ?? "?"
        for request in upstream.requests {
            #expect(Self.fields(request, "authorization") == ["Bearer \(token)"], sourceLocation: sourceLocation)
            #expect(Self.fields(request, "x-api-key") == [harness.apiKey], sourceLocation: sourceLocation)
            let normalised = request.headers.map { $0.0.lowercased().replacingOccurrences(of: "_", with: "-") }
            #expect(normalised.filter { $0 == "authorization" || $0 == "x-api-key" }.count == 2)
        }
    }

    /// Attack (the review's smuggling): `TRACE` with a body whose bytes are a second request. Before,
    /// the head went out unframed and the upstream parsed the body as a request of its own, which
    /// echoed the next client's head, credentials included. Now: 405 from the proxy, and the
    /// upstream receives not one byte of it; the next client's request goes out alone.
    @Test func aTraceWithASmuggledRequestInItsBodyNeverReachesTheUpstream() async throws {
        let upstream = CapturingUpstream()
        let harness = try await Self.harness(upstream)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n"
        let trace =
            "TRACE /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: \(smuggled.utf8.count)\r\n\r\n" + smuggled
        let answer = try await UnixSocketClient.exchange(Array(trace.utf8), socket: ProxyTests.apiSocket(harness))
        #expect(answer.hasPrefix("HTTP/1.1 405"), "\(answer)")
        #expect(ProxyTests.header("Allow", in: answer)?.contains("TRACE") == false)
        let plain = try await UnixSocketClient.exchange(
            Array("TRACE /api/echo HTTP/1.1\r\nHost: x\r\n\r\n".utf8),
            socket: ProxyTests.apiSocket(harness)
        )
        #expect(plain.hasPrefix("HTTP/1.1 405"), "a plain TRACE echoes the credentials too: \(plain)")
        let next = try await Command.curl("/api/next", socket: ProxyTests.apiSocket(harness))
        #expect(next.status == 200 && next.body == "request 1\n", "\(next.body)")
        #expect(upstream.requests.map(\.uri) == ["/api/next"], "the upstream parsed one request, the client's")
        #expect(!upstream.rawText.contains("smuggled") && !upstream.rawText.contains("TRACE"))
        Self.expectOnlyTheDaemonsCredentials(upstream, harness: harness)
        let metrics = try await Command.curl("/metrics", socket: harness.socketPath).body
        #expect(metrics.contains(#"fts_tokend_proxy_refusals_total{reason="method"} 2"#), "\(metrics)")
        harness.expectNoSecretsInOutput()
        await harness.stop()
        await upstream.stop()
    }

    /// The exact bytes: requests of every framing, pipelined on one connection, each with the
    /// client's own attempts at credentials (under every spelling a CGI upstream reads as one).
    /// The upstream parses exactly as many requests as the client sent, each body intact, each
    /// with one `Authorization` and one `x-api-key`, the daemon's.
    @Test func theUpstreamReceivesExactlyOneFramedRequestPerClientRequest() async throws {
        let upstream = CapturingUpstream()
        let harness = try await Self.harness(upstream)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let credentials =
            "Authorization: Bearer stolen\r\nX_Api_Key: stolen\r\nx-api_key: stolen\r\nAUTHORIZATION_: x\r\n"
            + "X-API-KEY: stolen\r\nauthorization: Basic eDp4\r\n"
        let requests: [(method: String, framing: String, body: String)] = [
            ("GET", "", ""),
            ("GET", "Content-Length: 5\r\n", "hello"),
            ("DELETE", "Transfer-Encoding: chunked\r\n", "5\r\nworld\r\n0\r\n\r\n"),
            ("POST", "Content-Length: 11\r\n", "a=1&b=2&c=3"),
            ("POST", "Transfer-Encoding: chunked\r\n", "3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"),
            ("OPTIONS", "", ""),
            ("PATCH", "Content-Length: 2\r\n", "{}"),
            ("HEAD", "", ""),
            ("PROPFIND", "Content-Length: 3\r\n", "xyz"),
        ]
        var bytes = ""
        for (index, request) in requests.enumerated() {
            // The last asks the proxy to close once it is answered: the client reads to the end.
            let close = index == requests.count - 1 ? "Connection: close\r\n" : ""
            bytes +=
                "\(request.method) /api/r\(index) HTTP/1.1\r\nHost: x\r\n\(credentials)\(close)\(request.framing)\r\n"
                + request.body
        }
        let client = try UnixSocketClient(socket: ProxyTests.apiSocket(harness))
        try await client.send(Array(bytes.utf8))
        let answers = await client.readAll(timeout: 60)
        #expect(answers.components(separatedBy: "HTTP/1.1 200 OK\r\n").count == requests.count + 1, "\(answers)")
        let received = upstream.requests
        #expect(received.map(\.uri) == requests.indices.map { "/api/r\($0)" }, "one request per client request")
        #expect(received.map(\.method) == requests.map(\.method))
        let bodies = ["", "hello", "world", "a=1&b=2&c=3", "abcdef", "", "{}", "", "xyz"]
        #expect(received.map { String(decoding: $0.body, as: UTF8.self) } == bodies)
        Self.expectOnlyTheDaemonsCredentials(upstream, harness: harness)
        #expect(!upstream.rawText.contains("stolen") && !upstream.rawText.lowercased().contains("basic"))
        // Nothing after the last request: the last byte the upstream got ends the last request.
        #expect(upstream.rawText.hasSuffix("\r\n\r\nxyz"))
        harness.expectNoSecretsInOutput()
        await harness.stop()
        await upstream.stop()
    }

    /// Attack: `POST /auth/token` through the proxy reached the auth server with the organisation's
    /// key (password guessing, account lock-out). Every spelling is refused 403; the upstream sees
    /// nothing and the mock's log-in count does not move.
    @Test func theLoginEndpointIsNeverProxiedUnderAnySpelling() async throws {
        let upstream = CapturingUpstream()
        let harness = try await Self.harness(upstream)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let spellings = [
            "/auth/token", "/AUTH/Token", "//auth//token", "/api/../auth/token", "/./auth/token", "/auth/%74oken",
            "/%2561uth/token", "/auth%2Ftoken", "/auth;x=1/token", "/auth/token.json", "/auth/token?email=x",
            "/auth/refresh", "/auth",
        ]
        for path in spellings {
            let answer = try await Command.run(
                "/usr/bin/curl",
                [
                    "-s", "--path-as-is", "--max-time", "60", "--unix-socket", ProxyTests.apiSocket(harness), "-o",
                    "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "Content-Type: application/json",
                    "--data-binary", #"{"email":"svc@example.com","password":"guess"}"#, "http://localhost" + path,
                ]
            )
            #expect(answer.output == "403", "\(path): \(answer.output)")
        }
        #expect(upstream.connections == 0 && upstream.rawBytes.isEmpty, "the upstream saw nothing")
        #expect(harness.mock.stats.loginRequests == 1, "only the daemon's own log-in")
        #expect(
            await eventually(timeout: 60) {
                harness.child?.standardError.contains("event=proxy_refused listener=proxy") == true
            }
        )
        let refusedLines = harness.child?.standardError.components(separatedBy: "event=proxy_refused").count ?? 0
        #expect(refusedLines == 2, "logged once a minute per peer, not per request")
        let metrics = try await Command.curl("/metrics", socket: harness.socketPath).body
        #expect(metrics.contains(#"fts_tokend_proxy_refusals_total{reason="denied_path"} \#(spellings.count)"#))
        harness.expectNoSecretsInOutput()
        await harness.stop()
        await upstream.stop()
    }

    /// Attack: a transfer coding list the proxy re-frames (`gzip, chunked` lost its gzip): refused.
    @Test func aCodingListTheProxyWouldAlterIsRefusedNotForwarded() async throws {
        let upstream = CapturingUpstream()
        let harness = try await Self.harness(upstream)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let request =
            "POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        let answer = try await UnixSocketClient.exchange(Array(request.utf8), socket: ProxyTests.apiSocket(harness))
        #expect(answer.hasPrefix("HTTP/1.1 501"), "\(answer)")
        #expect(upstream.rawBytes.isEmpty)
        await harness.stop()
        await upstream.stop()
    }
}
