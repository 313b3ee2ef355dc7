import Foundation
import MockFTS
import TestSupport
import Testing

/// Hostile login answers against the real daemon (issue 5, list 6): for each, the clear error in the
/// log, every read of the files a whole valid token (the one held, then the next good one), nothing
/// of the answer echoed, and the next good answer adopted. The parser's unit tests cover the same inputs one by one; redirects are covered by
/// `AuthClientTests.redirectsAreNotFollowed` (the mock cannot send a Location header).
@Suite struct HostileAnswerTests {
    struct Hostile: Sendable, CustomTestStringConvertible {
        var name: String
        var body: String
        var contentType = "application/json"
        /// What the daemon's log must say.
        var error: String
        var testDescription: String { name }
    }

    static let expires = Int(Date().timeIntervalSince1970) + 3600
    static let cases: [Hostile] = [
        Hostile(
            name: "not JSON",
            body: "token=abc",
            contentType: "text/plain",
            error: "answer is not JSON (Content-Type: text/plain)"
        ),
        Hostile(
            name: "an HTML page",
            body: "<html><body>EVIL maintenance</body></html>",
            contentType: "text/html",
            error: "answer is not JSON (Content-Type: text/html)"
        ),
        Hostile(name: "truncated JSON", body: #"{"token":"EVIL.b.c","expi"#, error: "answer is not JSON"),
        Hostile(
            name: "20 MB",
            body: #"{"token":""# + String(repeating: "E", count: 20 << 20) + #""}"#,
            error: "answer body larger than 64 KiB"
        ),
        Hostile(
            name: "JSON nested 30,000 deep",
            body: String(repeating: "[", count: 30_000) + String(repeating: "]", count: 30_000),
            error: "answer is not JSON"
        ),
        Hostile(
            name: "wrong types",
            body: #"{"token":12345,"expires":"soon"}"#,
            error: #"answer has no "token" string"#
        ),
        Hostile(
            name: "an empty token",
            body: #"{"token":"","expires":\#(expires)}"#,
            error: "answer has an unusable token: empty"
        ),
        Hostile(
            name: "a token with a newline (header injection)",
            body: #"{"token":"a.b.c\nX-EVIL: 1","expires":\#(expires)}"#,
            error: "answer has an unusable token: contains whitespace, control or non-ASCII characters"
        ),
        Hostile(
            name: "a token with control characters",
            body: #"{"token":"a.b\u0007EVIL","expires":\#(expires)}"#,
            error: "answer has an unusable token: contains whitespace, control or non-ASCII characters"
        ),
        Hostile(
            name: "a huge expires",
            body: #"{"token":"EVIL.b.c","expires":1e300}"#,
            error: #"answer has an unusable "expires": "#
        ),
        Hostile(
            name: "a negative expires",
            body: #"{"token":"EVIL.b.c","expires":-5}"#,
            error: #"answer has an unusable "expires": "#
        ),
    ]

    @Test(arguments: cases)
    func aHostileAnswerIsRefusedAndTheTokenHeldStaysWhole(_ hostile: Hostile) async throws {
        let harness = try await DaemonHarness(ttl: 600, refresh: .chaos)
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let held = try #require(harness.token)
        // Reads all three files until the good answer after the hostile one is in place: every read
        // must be a whole token of the mock's (the hostile one never is).
        let watcher = TokenWatcher(harness)

        harness.mock.enqueue(.body(hostile.body, contentType: hostile.contentType))
        child.signal(SIGUSR1)
        let logged = await eventually { child.standardError.contains("login failed: \(hostile.error)") }
        // The next login gets a good answer (after the backoff): it is adopted.
        let recovered = await eventually { harness.token.map { $0 != held && harness.mock.accepts($0) } == true }
        let seen = watcher.stop()
        let whole = seen.bad == 0 && seen.expiredReads == 0 && seen.reads > 0
        let echoed = child.allOutput.contains("EVIL")
        let fine = logged && whole && recovered && !echoed && child.isRunning
        Scenario.report(
            fine,
            "auth answer with \(hostile.name): error \"\(hostile.error)\" logged \(logged), token held whole \(whole), "
                + "answer echoed \(echoed), next good answer adopted \(recovered)"
        )
        #expect(logged, "log: \(child.standardError.suffix(600))")
        #expect(whole, "\(seen.bad) bad and \(seen.expiredReads) expired of \(seen.reads) reads: \(seen.examples)")
        #expect(recovered)
        #expect(!echoed, "nothing of the answer reaches the log")
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }
}
