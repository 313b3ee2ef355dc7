import Foundation
import MockFTS
import TestSupport
import Testing

@testable import TokenDaemon

/// The real client against the real mock server on loopback.
@Suite struct AuthClientTests {
    static let secrets = LoginSecrets(email: "svc@example.com", password: "pw-1", apiKey: "key-1")

    /// A client against a fresh mock. The login timeout is generous (60 s) unless a test is about
    /// timeouts: at the suite's start a loaded machine stalled a 100 KiB answer past 5 s (CI).
    func withMock(
        ttl: TimeInterval = 600,
        milliseconds: Bool = false,
        timeout: Double = 60,
        tokenPath: String = "/auth/token",
        _ body: (MockFTSServer, AuthClient) async throws -> Void
    ) async throws {
        let mock = MockFTSServer(
            .init(
                apiKey: "key-1",
                email: "svc@example.com",
                password: "pw-1",
                tokenTTL: ttl,
                expiresInMilliseconds: milliseconds
            )
        )
        let port = try await mock.start()
        let client = Self.client(
            baseURL: "http://127.0.0.1:\(port)",
            tokenPath: tokenPath,
            timeoutSeconds: timeout,
            version: "9.9.9"
        )
        do {
            try await body(mock, client)
        } catch {
            await client.shutdown()
            await mock.stop()
            throw error
        }
        await client.shutdown()
        await mock.stop()
    }

    func failure(_ client: AuthClient, _ secrets: LoginSecrets = secrets) async -> LoginError? {
        do {
            _ = try await client.login(secrets, now: { Date() })
            return nil
        } catch {
            return error
        }
    }

    @Test(arguments: [false, true])
    func logsInAndGetsATokenTheServerAccepts(milliseconds: Bool) async throws {
        try await withMock(milliseconds: milliseconds) { mock, client in
            let sent = Date()
            let answer = try await client.login(Self.secrets, now: { Date() })
            let took = Date().timeIntervalSince(sent)
            #expect(mock.accepts(answer.grant.token))
            // 600 s from when the mock minted it, less the time the answer took (measured: seconds
            // when the machine is busy) and the second a whole-second `exp` may drop.
            #expect(answer.grant.lifetime <= 600 && answer.grant.lifetime >= 600 - took - 1)
            #expect(answer.grant.userId == "user-1")
            #expect(answer.grant.tenantId == "tenant-1")
            #expect(answer.warnings.isEmpty)
            #expect(mock.stats.lastUserAgent == "fts-tokend/9.9.9")
        }
    }

    @Test func theLoginPathIsConfigurable() async throws {
        try await withMock(tokenPath: "/auth/login") { mock, client in
            _ = try await client.login(Self.secrets, now: { Date() })
            #expect(mock.stats.tokensIssued == 1)
        }
    }

    @Test func wrongPasswordOrKeyIsRejected() async throws {
        try await withMock { _, client in
            let password = await failure(
                client,
                LoginSecrets(email: "svc@example.com", password: "wrong", apiKey: "key-1")
            )
            #expect(password == .httpStatus(401, retryAfter: nil))
            #expect(password?.kind == .rejected)
            let key = await failure(client, LoginSecrets(email: "svc@example.com", password: "pw-1", apiKey: "wrong"))
            #expect(key == .httpStatus(401, retryAfter: nil))
        }
    }

    @Test func rateLimitCarriesRetryAfterInBothForms() async throws {
        try await withMock { mock, client in
            mock.enqueue(.status(429, retryAfter: "7"))
            #expect(await failure(client) == .httpStatus(429, retryAfter: 7))
            // An HTTP date has whole seconds, and the wait counts from the answer's arrival: the
            // bounds come from the instants measured around the call, however long it took.
            let asked = Date().addingTimeInterval(60)
            let stated = asked.timeIntervalSince1970.rounded(.down)
            mock.enqueue(.status(503, retryAfter: MockFTSServer.httpDate(asked)))
            let sent = Date()
            let kind = await failure(client)?.kind
            let answered = Date()
            guard case .rateLimited(let wait?) = kind else {
                Issue.record("expected rate limiting with a wait, got \(String(describing: kind))")
                return
            }
            #expect(wait >= stated - answered.timeIntervalSince1970 - 0.001, "wait \(wait)")
            #expect(wait <= stated - sent.timeIntervalSince1970 + 0.001, "wait \(wait)")
        }
    }

    @Test func unusableBodiesAreDistinctErrors() async throws {
        try await withMock { mock, client in
            mock.enqueue(
                .body("<html>proxy</html>", contentType: "text/html"),
                .body(String(repeating: "x", count: 100 * 1024)),
                .body(#"{"expires":1}"#),
                .expiredToken
            )
            #expect(await failure(client) == .notJSON(contentType: "text/html"))
            #expect(await failure(client) == .bodyTooLarge(limit: 65536))
            #expect(await failure(client) == .missingToken)
            guard case .alreadyExpired = await failure(client) else {
                Issue.record("expected alreadyExpired")
                return
            }
        }
    }

    @Test func aHangingServerTimesOut() async throws {
        try await withMock(timeout: 1) { mock, client in
            mock.enqueue(.hang)
            #expect(await failure(client) == .timedOut(seconds: 1))
        }
    }

    @Test func redirectsAreNotFollowed() async throws {
        try await withMock { mock, client in
            mock.enqueue(MockFault(status: 307, retryAfter: nil))
            let error = await failure(client)
            #expect(error == .httpStatus(307, retryAfter: nil))
            #expect(error?.kind == .rejected)
            #expect(mock.stats.loginRequests == 1)
        }
    }

    @Test func anUnreachableServerIsATransportError() async throws {
        // async-http-client retries a refused connection until the connect timeout (half the
        // login's, at most 10 s), then reports it; the rest of the budget is the margin a busy
        // machine needs for that report to beat the overall timeout (with 5 s it lost once, with 20 s
        // in a run under stress-ng --cpu 2).
        let client = Self.client(baseURL: "http://127.0.0.1:1", timeoutSeconds: 60)
        let error = await failure(client)
        await client.shutdown()
        guard case .transport = error else {
            Issue.record("expected a transport error, got \(String(describing: error))")
            return
        }
    }

    /// A throw-away CA and a server certificate for 127.0.0.1 (`TestCertificates`).
    static func makeCertificates(
        in folder: TemporaryDirectory
    ) async throws -> (ca: String, tls: MockFTSServer.TLSFiles) {
        let made = try await TestCertificates.make(in: folder)
        return (made.ca, .init(certificateChain: made.certificate, privateKey: made.key))
    }

    /// A client of `baseURL` (the credentials come with each login), trusting `caFile` besides the
    /// system's roots.
    static func client(
        baseURL: String,
        tokenPath: String = "/auth/token",
        timeoutSeconds: Double = 60,
        caFile: String? = nil,
        version: String = "1"
    ) -> AuthClient {
        AuthClient(
            api: Configuration.API(
                baseURL: baseURL,
                tokenPath: tokenPath,
                email: .inline(""),
                password: .inline(""),
                apiKey: .inline(""),
                timeoutSeconds: timeoutSeconds,
                caFile: caFile
            ),
            version: version
        )
    }

    /// A client of the mock's HTTPS on `port`.
    /// 60 s for the login: the connect phase gets 10 s of it (AuthClient's cap), and a refused
    /// handshake is reported as itself once the connect phase gives up, not as the whole login's
    /// timeout (which a loaded machine reached first with 5 s).
    static func httpsClient(port: Int, caFile: String?) -> AuthClient {
        client(baseURL: "https://127.0.0.1:\(port)", timeoutSeconds: 60, caFile: caFile)
    }

    @Test func httpsIsVerifiedAgainstTheSystemRootsPlusCAFile() async throws {
        let folder = try TemporaryDirectory()
        let (ca, tls) = try await Self.makeCertificates(in: folder)
        let mock = MockFTSServer(.init(apiKey: "key-1", email: "svc@example.com", password: "pw-1"))
        let port = try await mock.start(tls: tls)

        // Shut down whatever the login throws: a client dropped unshut stops the test process
        // (async-http-client's deinit check), and every daemon the other suites started with it.
        let trusting = Self.httpsClient(port: port, caFile: ca)
        let answer: Result<TokenResponseParser.Result, LoginError>
        do { answer = .success(try await trusting.login(Self.secrets, now: { Date() })) } catch {
            answer = .failure(error)
        }
        await trusting.shutdown()
        guard case .success(let trusted) = answer else {
            Issue.record("the CA file's certificate was not trusted: \(answer)")
            await mock.stop()
            return
        }
        #expect(mock.accepts(trusted.grant.token))

        // Without the CA the certificate is not trusted and no credentials are sent.
        let strict = Self.httpsClient(port: port, caFile: nil)
        let error = await failure(strict)
        await strict.shutdown()
        guard case .transport(let reason) = error else {
            Issue.record("expected a TLS failure, got \(String(describing: error))")
            await mock.stop()
            return
        }
        #expect(
            reason.lowercased().contains("certificate") || reason.contains("handshake") || reason.contains("TLS"),
            "\(reason)"
        )
        #expect(mock.stats.loginRequests == 1)
        await mock.stop()
    }

    @Test func aServerOfferingOnlyTLS11GetsNoCredentials() async throws {
        let folder = try TemporaryDirectory()
        var (ca, tls) = try await Self.makeCertificates(in: folder)
        tls.maximumVersion = .tlsv11
        let mock = MockFTSServer(.init(apiKey: "key-1", email: "svc@example.com", password: "pw-1"))
        let port = try await mock.start(tls: tls)
        let client = Self.httpsClient(port: port, caFile: ca)
        let error = await failure(client)
        await client.shutdown()
        await mock.stop()
        guard case .transport(let reason) = error else {
            Issue.record("expected a TLS failure, got \(String(describing: error))")
            return
        }
        // BoringSSL's 1000042e is SSL_R_TLSV1_ALERT_PROTOCOL_VERSION: refused for its version.
        #expect(reason.contains("1000042e"), "\(reason)")
        #expect(mock.stats.loginRequests == 0)
    }
}
