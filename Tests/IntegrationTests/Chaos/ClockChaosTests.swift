import Foundation
import Logging
import MockFTS
import NIOConcurrencyHelpers
import TestSupport
import Testing
import TokenDaemon

/// Clock trouble (issue 5, list 4). Wall-clock steps are made with an injected clock: the daemon runs
/// in this process (the library `Daemon`, real files, the real mock), its clock the system clock plus
/// an offset the test moves. libfaketime would do it to the real binary, but Debian's libfaketime
/// 0.9.10 preloaded into a Swift program empties `CommandLine.arguments` (docs/reliability.md).
/// Late timer fires are made on the real binary with SIGSTOP/SIGCONT.
@Suite(.serialized) struct ClockChaosTests {
    /// The system clock plus an offset the test steps.
    final class SteppedClock: Sendable {
        private let offset = NIOLockedValueBox<TimeInterval>(0)
        func step(by seconds: TimeInterval) { offset.withLockedValue { $0 += seconds } }
        func wall() -> Date { Date().addingTimeInterval(offset.withLockedValue { $0 }) }
    }

    /// The daemon in this process with `clock` under its `SteadyWallClock`, as `fts-tokend run`
    /// builds it; ticks every 0.5 s (a 1 s watchdog), as with WatchdogSec=1.
    private func runDaemon(_ harness: DaemonHarness, clock: SteppedClock) throws -> Task<Int32, Never> {
        let loader = ConfigurationLoader(environment: [:])
        let daemon = try Daemon(
            configPath: harness.configPath,
            loaded: try loader.load(path: harness.configPath),
            dependencies: .init(
                loader: loader,
                clock: SteadyWallClock(wall: { clock.wall() }).now,
                watchdogInterval: .seconds(1),
                version: "test"
            ),
            logger: Logger(label: "fts-tokend", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        return Task { await daemon.run() }
    }

    @Test func aForwardStepPastExpiryReplacesTheTokenOnTheNextTick() async throws {
        // 120 s tokens: the replacement must come before the unstepped refresh (a share of the
        // lifetime), and with 20 s tokens a loaded full run took longer than that margin.
        let harness = try await DaemonHarness(ttl: 120, refresh: .chaos)
        let clock = SteppedClock()
        let daemon = try runDaemon(harness, clock: clock)
        #expect(await eventually { harness.token.map(harness.mock.accepts) == true })
        let first = try #require(harness.token)
        // Without the step, the token would be replaced at its refresh (refreshAt × 120 s, less the
        // jitter): a replacement before then is the step's doing, however slow the machine.
        let chaos = DaemonHarness.Refresh.chaos
        let unsteppedRefresh = Date().addingTimeInterval(120 * (chaos.refreshAt - chaos.jitter))
        let watcher = TokenWatcher(harness)

        clock.step(by: 3600)
        let stepped = Date()
        // By the daemon's clock the token has expired: it must not be handed out one tick longer.
        let replaced = await eventually { harness.token != first }
        let removedAfter = Date().timeIntervalSince(stepped)
        let renewed = await eventually { harness.token.map { $0 != first && harness.mock.accepts($0) } == true }
        let renewedAfter = Date().timeIntervalSince(stepped)
        // The next login measured the step against the server's Date: the new token is kept for its life.
        try await Task.sleep(for: .seconds(3))
        let kept = harness.mock.stats.tokensIssued == 2

        daemon.cancel()
        #expect(await daemon.value == 0)
        let seen = watcher.stop()
        let held =
            replaced && stepped.addingTimeInterval(removedAfter) < unsteppedRefresh && renewed && kept && seen.bad == 0
            && seen.expiredReads == 0
        Scenario.report(
            held,
            String(
                format: "clock stepped 1 h forward, past expiry: old token gone after %.2f s, new token after %.2f s, "
                    + "then kept (%d tokens issued); readers: %d reads, %d bad, %d expired",
                removedAfter,
                renewedAfter,
                harness.mock.stats.tokensIssued,
                seen.reads,
                seen.bad,
                seen.expiredReads
            )
        )
        #expect(held)
        await harness.stop()
    }

    @Test func aBackwardStepDoesNotPostponeRefreshOrExpiry() async throws {
        let ttl = 4.0
        let lifetimes = ChaosMode.lifetimes(3, long: 30)
        let harness = try await DaemonHarness(ttl: ttl, refresh: .chaos)
        let clock = SteppedClock()
        let daemon = try runDaemon(harness, clock: clock)
        #expect(await eventually { harness.token.map(harness.mock.accepts) == true })
        let watcher = TokenWatcher(harness)

        // An hour back: by a naive wall clock the token would now have an hour and more to live.
        clock.step(by: -3600)
        let before = harness.mock.stats.tokensIssued
        try await Task.sleep(for: .seconds(Double(lifetimes) * ttl))
        let issued = harness.mock.stats.tokensIssued - before

        daemon.cancel()
        #expect(await daemon.value == 0)
        let seen = watcher.stop()
        let held = issued >= lifetimes && seen.bad == 0 && seen.expiredReads == 0
        Scenario.report(
            held,
            String(
                format: "clock stepped 1 h back: %d tokens in %d lifetimes of %.0f s (refreshes kept their pace); "
                    + "readers: %d reads, %d bad, %d expired (%.3f s)",
                issued,
                lifetimes,
                ttl,
                seen.reads,
                seen.bad,
                seen.expiredReads,
                seen.expiredSeconds
            )
        )
        #expect(held)
        await harness.stop()
    }

    @Test func aLateTimerFireAfterASuspendRefreshesAtOnce() async throws {
        let ttl = 4.0
        let harness = try await DaemonHarness(ttl: ttl, refresh: .chaos)
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        // Stopped past expiry, like a host suspended: every timer is overdue when it resumes. The
        // expired token stays on disk meanwhile (so would every reader stay suspended): readers are
        // judged from the resume on.
        child.signal(SIGSTOP)
        try await Task.sleep(for: .seconds(ttl + 2))
        let watcher = TokenWatcher(harness)
        child.signal(SIGCONT)
        let resumed = Date()
        let gone = await eventually { harness.token != first }
        let goneAfter = Date().timeIntervalSince(resumed)
        let renewed = await eventually { harness.token.map { $0 != first && harness.mock.accepts($0) } == true }
        let renewedAfter = Date().timeIntervalSince(resumed)
        let seen = watcher.stop()
        let held = gone && goneAfter < 1 && renewed && seen.bad == 0 && child.isRunning
        Scenario.report(
            held,
            String(
                format:
                    "stopped %.0f s (past expiry) then resumed: expired token gone %.3f s after resume, new token after %.2f s; "
                    + "readers after resume: %d reads, %d bad, %d expired for %.3f s",
                ttl + 2,
                goneAfter,
                renewedAfter,
                seen.reads,
                seen.bad,
                seen.expiredReads,
                seen.expiredSeconds
            )
        )
        #expect(held)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }
}
