import Foundation
import MockFTS
import TestSupport
import Testing

@Suite struct RotationTests {
    /// A reader polling every 2 ms while tokens rotate every ~2 s for 20 s: every read is a whole
    /// token the server accepts at that moment. (4 s tokens: refreshed at 2 s, withdrawn at 3 s,
    /// so a login has a second even on a busy machine.)
    @Test func readersNeverSeeAPartialEmptyOrExpiredToken() async throws {
        let harness = try await DaemonHarness(
            ttl: 4,
            refresh: .init(refreshAt: 0.5, minRemainingSeconds: 1, jitter: 0.05)
        )
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)

        var reads = 0
        var bad = 0
        var seen = Set<String>()
        let end = Date().addingTimeInterval(20)
        while Date() < end {
            reads += 1
            if let token = harness.token, !token.isEmpty, harness.mock.accepts(token) {
                seen.insert(token)
            } else {
                bad += 1
            }
            try await Task.sleep(for: .milliseconds(2))
        }
        #expect(bad == 0, "\(bad) of \(reads) reads were missing, partial or expired")
        #expect(seen.count >= 6, "tokens seen: \(seen.count)")
        // One login per rotation: no extra logins.
        #expect(harness.mock.stats.loginRequests <= seen.count + 1)
        #expect(harness.folder.entries("run").allSatisfy { !$0.hasPrefix(".") })
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }
}
