import Foundation
import MockFTS
import TestSupport
import Testing

/// kill -9 at random instants while tokens rotate, with a reader polling the files every millisecond.
/// Prints `scenario: held|FAILED (figures)`, the line docs/reliability.md collects.
@Suite struct CrashSafetyTests {
    static let kills = Int(ProcessInfo.processInfo.environment["FTS_CRASH_KILLS"] ?? "") ?? 40

    @Test func killNineDuringRotationsLosesNothing() async throws {
        let harness = try await DaemonHarness(ttl: 600, refresh: .init(refreshAt: 0.8, minRemainingSeconds: 60))
        let reader = TokenWatcher(harness)

        var loginsCausedByRestarts = 0
        var random = SystemRandomNumberGenerator()
        for round in 0..<Self.kills {
            harness.notify.reset()
            let child = try harness.start()
            #expect(await harness.waitUntilReady() != nil)
            // From the second start on the state file holds a valid token: starting must not log in.
            // Judged by this process's own log (the mock may count the killed predecessor's last
            // login late, on a loaded machine).
            let log = child.standardError
            if round > 0, !log.contains("event=token_reused") || log.contains("event=login_started") {
                loginsCausedByRestarts += 1
            }
            // One rotation, killed at a random instant: often while the files are being written.
            child.signal(SIGUSR1)
            try await Task.sleep(for: .microseconds(Int.random(in: 0...8000, using: &random)))
            child.signal(SIGKILL)
            _ = await child.waitForExit(timeout: 10)
        }
        // One clean start afterwards: it removes what the killed writers left behind.
        let last = try harness.start()
        #expect(await eventually { harness.folder.entries("run").allSatisfy { !$0.hasPrefix(".") } })
        let leftovers = harness.folder.entries("run").filter { $0.hasPrefix(".") }.count
        last.signal(SIGTERM)
        _ = await last.waitForExit(timeout: 10)
        let result = reader.stop()

        let held =
            result.bad == 0 && result.expiredReads == 0 && leftovers == 0 && loginsCausedByRestarts == 0
            && result.reads > 1000
        Scenario.report(
            held,
            "kill -9 ×\(Self.kills) during rotations: \(result.reads) reads, "
                + "\(result.bad + result.expiredReads) partial/empty/mixed/invalid, \(leftovers) temporary files after the next start, "
                + "\(loginsCausedByRestarts) logins caused by restarts with a valid state file"
        )
        #expect(result.bad == 0, "\(result.examples)")
        #expect(result.expiredReads == 0)
        #expect(leftovers == 0)
        #expect(loginsCausedByRestarts == 0)
        #expect(result.reads > 1000)
        await harness.stop()
    }
}
