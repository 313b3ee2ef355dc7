import AsyncHTTPClient
import Crypto
import Foundation
import MockFTS
import NIOCore
import NIOHTTP1
import TestSupport
import Testing

/// The mock over real HTTP, as the daemon and the tests in other processes see it.
@Suite struct MockFTSServerTests {
    struct Answer {
        var status: Int
        var headers: [String: String]
        var json: [String: Any]
    }

    func request(
        _ method: HTTPMethod,
        _ url: String,
        headers: [String: String] = [:],
        body: String? = nil
    ) async throws -> Answer {
        var request = HTTPClientRequest(url: url)
        request.method = method
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        if let body { request.body = .bytes(ByteBuffer(string: body)) }
        let response = try await HTTPClient.shared.execute(request, timeout: .seconds(10))
        let bytes = try await response.body.collect(upTo: 1 << 20)
        let json = (try? JSONSerialization.jsonObject(with: Data(bytes.readableBytesView))) as? [String: Any] ?? [:]
        return Answer(
            status: Int(response.status.code),
            headers: Dictionary(response.headers.map { ($0.name, $0.value) }) { a, _ in a },
            json: json
        )
    }

    func withMock(ttl: TimeInterval = 60, _ body: (MockFTSServer, String) async throws -> Void) async throws {
        let mock = MockFTSServer(.init(apiKey: "key-1", email: "e@x", password: "pw", tokenTTL: ttl))
        let port = try await mock.start()
        do {
            try await body(mock, "http://127.0.0.1:\(port)")
        } catch {
            await mock.stop()
            throw error
        }
        await mock.stop()
    }

    let credentials = #"{"email":"e@x","password":"pw"}"#

    /// A token from a successful login.
    func login(_ base: String) async throws -> String {
        try #require(
            try await request(.POST, base + "/auth/token", headers: ["x-api-key": "key-1"], body: credentials)
                .json["token"] as? String
        )
    }

    /// Whether a whole-second timestamp falls between two instants (the earlier one truncated).
    static func within(_ seconds: Double, _ earliest: Date, _ latest: Date) -> Bool {
        seconds >= earliest.timeIntervalSince1970.rounded(.down) && seconds <= latest.timeIntervalSince1970
    }

    @Test func issuesTokensThatWhoamiAccepts() async throws {
        try await withMock { (mock, base) async throws in
            let sent = Date()
            let login = try await request(
                .POST,
                base + "/auth/token",
                headers: ["x-api-key": "key-1"],
                body: credentials
            )
            let received = Date()
            #expect(login.status == 200)
            #expect(login.headers["Date"] != nil)
            let token = try #require(login.json["token"] as? String)
            let expires = try #require(login.json["expires"] as? Int)
            // 60 s from when the mock answered, in whole seconds (however long the exchange took).
            #expect(Self.within(Double(expires), sent.addingTimeInterval(60), received.addingTimeInterval(60)))
            #expect(login.json["userId"] as? String == "user-1")
            #expect(login.json["tenantId"] as? String == "tenant-1")

            #expect(
                try await request(
                    .GET,
                    base + "/api/whoami",
                    headers: ["x-api-key": "key-1", "Authorization": "Bearer " + token]
                ).status == 200
            )
            #expect(
                try await request(.GET, base + "/api/whoami", headers: ["x-api-key": "key-1", "Authorization": token])
                    .status == 200
            )
            #expect(
                try await request(.GET, base + "/api/whoami", headers: ["x-api-key": "other", "Authorization": token])
                    .status == 401
            )
            #expect(
                try await request(
                    .GET,
                    base + "/api/whoami",
                    headers: ["x-api-key": "key-1", "Authorization": token + "x"]
                ).status == 401
            )
            #expect(mock.stats.tokensIssued == 1)
            #expect(mock.stats.whoamiAccepted == 2)
            #expect(mock.stats.whoamiRejected == 2)
            #expect(mock.issuedTokens == [token])
        }
    }

    @Test func refusesWrongKeyPasswordAndBody() async throws {
        try await withMock { (_, base) async throws in
            #expect(
                try await request(.POST, base + "/auth/token", headers: ["x-api-key": "nope"], body: credentials).status
                    == 401
            )
            #expect(
                try await request(
                    .POST,
                    base + "/auth/login",
                    headers: ["x-api-key": "key-1"],
                    body: #"{"email":"e@x","password":"x"}"#
                ).status == 401
            )
            #expect(
                try await request(.POST, base + "/auth/token", headers: ["x-api-key": "key-1"], body: "not json").status
                    == 400
            )
            #expect(try await request(.GET, base + "/elsewhere").status == 404)
        }
    }

    @Test func expiredTokensAreRefusedByWhoami() async throws {
        try await withMock(ttl: 2) { (mock, base) async throws in
            let login = try await request(
                .POST,
                base + "/auth/token",
                headers: ["x-api-key": "key-1"],
                body: credentials
            )
            let token = try #require(login.json["token"] as? String)
            // Judged at instants, not "now": a busy machine may take seconds between the lines.
            let expiry = try #require(mock.expiry(of: token))
            #expect(mock.verdict(on: token, at: expiry.addingTimeInterval(-0.5)) == .accepted)
            #expect(await eventually(timeout: 30) { Date() > expiry.addingTimeInterval(0.1) })
            #expect(!mock.accepts(token))
            #expect(
                try await request(.GET, base + "/api/whoami", headers: ["x-api-key": "key-1", "Authorization": token])
                    .status == 401
            )
        }
    }

    @Test func faultsScriptedOverHTTPApplyInOrderThenAlways() async throws {
        try await withMock { (mock, base) async throws in
            let script =
                #"{"next":[{"status":429,"retryAfter":"3"},{"body":"<html>","contentType":"text/html"}],"always":{"status":503}}"#
            #expect(try await request(.POST, base + "/_mock/faults", body: script).status == 200)
            let limited = try await request(
                .POST,
                base + "/auth/token",
                headers: ["x-api-key": "key-1"],
                body: credentials
            )
            #expect(limited.status == 429)
            #expect(limited.headers["Retry-After"] == "3")
            let html = try await request(
                .POST,
                base + "/auth/token",
                headers: ["x-api-key": "key-1"],
                body: credentials
            )
            #expect(html.status == 200)
            #expect(html.headers["Content-Type"] == "text/html")
            #expect(
                try await request(.POST, base + "/auth/token", headers: ["x-api-key": "key-1"], body: credentials)
                    .status == 503
            )
            #expect(
                try await request(.POST, base + "/auth/token", headers: ["x-api-key": "key-1"], body: credentials)
                    .status == 503
            )
            #expect(try await request(.POST, base + "/_mock/faults", body: #"{"always":{"status":401}}"#).status == 200)
            #expect(
                try await request(.POST, base + "/auth/token", headers: ["x-api-key": "key-1"], body: credentials)
                    .status == 401
            )
            #expect(try await request(.POST, base + "/_mock/faults", body: "{}").status == 200)
            #expect(
                try await request(.POST, base + "/auth/token", headers: ["x-api-key": "key-1"], body: credentials)
                    .status == 200
            )
            let stats = try await request(.GET, base + "/_mock/stats")
            #expect(stats.json["loginRequests"] as? Int == 6)
            #expect(stats.json["tokensIssued"] as? Int == 1)
        }
    }

    @Test func aFaultWithAChanceAppliesToAboutThatShareOfLogins() async throws {
        try await withMock { (mock, base) async throws in
            mock.always(MockFault(status: 500, chance: 0.5))
            var failed = 0
            for _ in 0..<200 {
                let status = try await request(
                    .POST,
                    base + "/auth/token",
                    headers: ["x-api-key": "key-1"],
                    body: credentials
                ).status
                #expect(status == 500 || status == 200)
                if status == 500 { failed += 1 }
            }
            // Binomial(200, 0.5): outside 60...140 once in about 10^8 runs.
            #expect((60...140).contains(failed), "\(failed) of 200 failed")
            mock.always(MockFault(status: 500, chance: 0))
            #expect(
                try await request(.POST, base + "/auth/token", headers: ["x-api-key": "key-1"], body: credentials)
                    .status == 200
            )
            // The verdict on a token at any instant, as whoami would give it then.
            let token = try #require(mock.issuedTokens.last)
            #expect(mock.verdict(on: token, at: Date()) == .accepted)
            #expect(mock.verdict(on: token, at: Date().addingTimeInterval(120)) == .expired)
            #expect(mock.verdict(on: String(token.dropLast(2)), at: Date()) == .unknown)
        }
    }

    @Test func delayedAnswersArriveLate() async throws {
        try await withMock { (mock, base) async throws in
            mock.enqueue(.delay(0.5))
            let started = Date()
            #expect(
                try await request(.POST, base + "/auth/token", headers: ["x-api-key": "key-1"], body: credentials)
                    .status == 200
            )
            #expect(Date().timeIntervalSince(started) >= 0.5)
        }
    }

    @Test func millisecondExpiresAndSkewedExpires() async throws {
        try await withMock { (mock, base) async throws in
            mock.update { $0.expiresInMilliseconds = true }
            mock.enqueue(MockFault(expiresSkewSeconds: 600))
            let sent = Date()
            let login = try await request(
                .POST,
                base + "/auth/token",
                headers: ["x-api-key": "key-1"],
                body: credentials
            )
            let received = Date()
            let expires = try #require(login.json["expires"] as? Int)
            #expect(expires > 100_000_000_000)
            #expect(Self.within(Double(expires) / 1000, sent.addingTimeInterval(660), received.addingTimeInterval(660)))
        }
    }

    /// What a proxy's tests compare: the echo shows what arrived, never the secrets themselves.
    @Test func echoShowsWhatArrivedWithoutTheSecrets() async throws {
        try await withMock { (mock, base) async throws in
            let token = try await login(base)
            let body = String(repeating: "x", count: 100_000)
            let echo = try await request(
                .POST,
                base + "/api/echo?a=1&b=2",
                headers: ["x-api-key": "key-1", "Authorization": "Bearer " + token, "X-Custom": "yes"],
                body: body
            )
            #expect(echo.status == 200)
            #expect(echo.json["method"] as? String == "POST")
            #expect(echo.json["path"] as? String == "/api/echo")
            #expect(echo.json["query"] as? String == "a=1&b=2")
            #expect(echo.json["bodyLength"] as? Int == 100_000)
            let digest = SHA256.hash(data: Array(body.utf8)).map { String(format: "%02x", $0) }.joined()
            #expect(echo.json["bodySHA256"] as? String == digest)
            #expect(echo.json["keyValid"] as? Bool == true && echo.json["tokenValid"] as? Bool == true)
            let headers = try #require(echo.json["headers"] as? [String: String])
            #expect(headers["x-custom"] == "yes")
            #expect(headers["authorization"] == nil && headers["x-api-key"] == nil)
            #expect(!headers.values.contains { $0.contains(token) || $0.contains("key-1") })
            let anonymous = try await request(.GET, base + "/api/echo")
            #expect(anonymous.status == 401)
            #expect(anonymous.json["keyValid"] as? Bool == false)
            #expect(mock.stats.apiAccepted == 1 && mock.stats.apiRejected == 1)
        }
    }

    @Test func revokeMakesTheAPIRefuseEveryTokenIssuedSoFar() async throws {
        try await withMock { (mock, base) async throws in
            let first = try await login(base)
            let bearer = { (token: String) in ["x-api-key": "key-1", "Authorization": "Bearer " + token] }
            #expect(try await request(.GET, base + "/api/whoami", headers: bearer(first)).status == 200)
            let revoked = try await request(.POST, base + "/_mock/revoke")
            #expect(revoked.json["revoked"] as? Int == 1)
            #expect(try await request(.GET, base + "/api/whoami", headers: bearer(first)).status == 401)
            #expect(try await request(.GET, base + "/api/echo", headers: bearer(first)).status == 401)
            #expect(!mock.accepts(first))
            // A new login brings a token the API accepts.
            let second = try await login(base)
            #expect(try await request(.GET, base + "/api/whoami", headers: bearer(second)).status == 200)
            #expect(mock.stats.revocations == 1)
        }
    }

    @Test func slowAnswersTheEchoLate() async throws {
        try await withMock { (mock, base) async throws in
            let token = try await login(base)
            let sent = Date()
            let slow = try await request(
                .GET,
                base + "/api/slow?ms=300",
                headers: ["x-api-key": "key-1", "Authorization": "Bearer " + token]
            )
            #expect(slow.status == 200)
            #expect(Date().timeIntervalSince(sent) >= 0.3)
            #expect(slow.json["query"] as? String == "ms=300")
        }
    }

    @Test func streamSendsExactlyTheBytesAskedFor() async throws {
        try await withMock { (mock, base) async throws in
            let token = try await login(base)
            var streamed = HTTPClientRequest(url: base + "/api/stream?bytes=4000000")
            streamed.headers.add(name: "x-api-key", value: "key-1")
            streamed.headers.add(name: "Authorization", value: "Bearer " + token)
            let response = try await HTTPClient.shared.execute(streamed, timeout: .seconds(60))
            #expect(response.status == .ok)
            var index = 0
            var mismatches = 0
            for try await chunk in response.body {
                if !chunk.withUnsafeReadableBytes({ MockFTSServer.isStream($0, from: index) }) { mismatches += 1 }
                index += chunk.readableBytes
            }
            #expect(index == 4_000_000)
            #expect(mismatches == 0)
            #expect(try await request(.GET, base + "/api/stream?bytes=10").status == 401)
        }
    }
}
