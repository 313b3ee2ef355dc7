import Foundation
import MockFTS
import TestSupport
import Testing

/// The auth server misbehaves while readers check every token the daemon hands out (issue 5, list 1).
/// Each test prints `scenario: held|FAILED (figures)`; `FTS_CHAOS=long` runs more lifetimes.
@Suite struct AuthServerChaosTests {
    @Test func downAtStartIsRetriedWithinTheBackoffBoundAndRecovers() async throws {
        let outage = Double(ChaosMode.lifetimes(4, long: 60))
        // The window is measured around the daemon's whole life so far, not taken from the sleep:
        // on a loaded machine the start and the sleep both run long, and the daemon keeps retrying.
        let began = Date()
        let run = try await ChaosRun.start(ttl: 6, fault: .status(503), waitUntilReady: false)
        try await Task.sleep(for: .seconds(outage))
        let attempts = run.logins
        let bound = DaemonHarness.Refresh.chaos.maximumAttempts(in: Date().timeIntervalSince(began))
        run.mock.always(nil)
        let recoveryStart = Date()
        let ready = await run.harness.waitUntilReady(timeout: 30) != nil
        let recovery = Date().timeIntervalSince(recoveryStart)
        await run.finish(
            ready && attempts <= bound,
            String(
                format:
                    "auth server down at start for %.0f s: %d login requests (backoff bound %d), READY %.2f s after it came back",
                outage,
                attempts,
                bound,
                recovery
            )
        )
    }

    @Test func anOutageOfThreeLifetimesRemovesTheTokenAtExpiryAndRecovers() async throws {
        let ttl = 4.0
        let run = try await ChaosRun.start(ttl: ttl)
        var attempts = 0
        var bound = 0
        var recoveries: [TimeInterval] = []
        for _ in 0..<ChaosMode.lifetimes(1, long: 10) {
            let before = run.logins
            let token = run.harness.token
            let opened = Date()
            run.mock.always(.status(503))
            try await Task.sleep(for: .seconds(3 * ttl))
            attempts += run.logins - before
            bound += DaemonHarness.Refresh.chaos.maximumAttempts(in: Date().timeIntervalSince(opened), validFor: ttl)
            run.mock.always(nil)
            let back = Date()
            #expect(await run.waitForFreshToken(after: token, timeout: 30))
            recoveries.append(Date().timeIntervalSince(back))
        }
        await run.finish(
            attempts <= bound,
            String(
                format:
                    "%d outage(s) of 3 lifetimes (%.0f s tokens): %d login requests (backoff bound %d), new token %.2f s after recovery at worst",
                recoveries.count,
                ttl,
                attempts,
                bound,
                recoveries.max() ?? -1
            )
        )
    }

    @Test func aFlappingServerNeverLeavesAnExpiredTokenToReaders() async throws {
        let ttl = 6.0
        let lifetimes = ChaosMode.lifetimes(6, long: 60)
        let run = try await ChaosRun.start(ttl: ttl)
        run.mock.always(MockFault(status: 500, chance: 0.5))
        let before = run.mock.stats
        try await Task.sleep(for: .seconds(Double(lifetimes) * ttl))
        let after = run.mock.stats
        let requests = after.loginRequests - before.loginRequests
        let issued = after.tokensIssued - before.tokensIssued
        await run.finish(
            issued >= lifetimes,
            String(
                format:
                    "random 50%% 5xx for %d lifetimes of %.0f s: %d login requests, %d tokens (%.2f per lifetime, %.2f requests per token)",
                lifetimes,
                ttl,
                requests,
                issued,
                Double(issued) / Double(lifetimes),
                Double(requests) / Double(max(issued, 1))
            )
        )
    }

    @Test func hangingConnectionsTimeOutAndAreRetriedWithinTheBound() async throws {
        let ttl = 6.0
        var refresh = DaemonHarness.Refresh.chaos
        refresh.loginTimeoutSeconds = 1
        let run = try await ChaosRun.start(ttl: ttl, refresh: refresh)
        let token = run.harness.token
        let outage = Double(ChaosMode.lifetimes(2, long: 20)) * ttl
        let before = run.logins
        let opened = Date()
        run.mock.always(.hang)
        try await Task.sleep(for: .seconds(outage))
        let attempts = run.logins - before
        // Every attempt also waits out its timeout: the policy's bound is loose here.
        let bound = refresh.maximumAttempts(in: Date().timeIntervalSince(opened), validFor: ttl)
        run.mock.always(nil)
        let back = Date()
        let recovered = await run.waitForFreshToken(after: token, timeout: 30)
        await run.finish(
            recovered && attempts <= bound,
            String(
                format:
                    "connections hang for %.0f s (1 s login timeout): %d login requests (bound %d), new token %.2f s after recovery",
                outage,
                attempts,
                bound,
                Date().timeIntervalSince(back)
            )
        )
    }

    @Test func slowAnswersWithinTheTimeoutAreWaitedForNotRepeated() async throws {
        let ttl = 30.0
        var refresh = DaemonHarness.Refresh.chaos
        refresh.loginTimeoutSeconds = 15
        let lifetimes = ChaosMode.lifetimes(2, long: 10)
        let run = try await ChaosRun.start(ttl: ttl, refresh: refresh, fault: .delay(10))
        try await Task.sleep(for: .seconds(Double(lifetimes) * ttl))
        let stats = run.mock.stats
        await run.finish(
            stats.loginRequests == stats.tokensIssued && stats.tokensIssued >= lifetimes,
            String(
                format:
                    "every answer 10 s late for %d lifetimes of %.0f s (15 s timeout): %d login requests, %d tokens (%.2f requests per token)",
                lifetimes,
                ttl,
                stats.loginRequests,
                stats.tokensIssued,
                Double(stats.loginRequests) / Double(max(stats.tokensIssued, 1))
            )
        )
    }

    @Test func retryAfterIsHonouredInSecondsAndAsAnHTTPDate() async throws {
        // Both answers are queued before the daemon starts (a test that scripted the second after
        // seeing the first lost the race on a loaded machine). The date is 4 s out: the retry after
        // the first answer's 2 s gets it, or, if the machine stalled past it, nothing is early.
        let date = Date().addingTimeInterval(4)
        let run = try await ChaosRun.start(
            ttl: 60,
            queued: [.status(429, retryAfter: "2"), .status(429, retryAfter: MockFTSServer.httpDate(date))],
            waitUntilReady: false
        )
        let ready = await run.harness.waitUntilReady(timeout: 30) != nil
        let times = run.mock.stats.loginTimes
        let firstWait = times.count > 1 ? times[1] - times[0] : -1
        let notBefore = date.timeIntervalSince1970.rounded(.down)
        let secondEarly = times.count > 2 ? notBefore - times[2] : .infinity
        await run.finish(
            // Three requests to READY; a fourth may follow (the chaos policy's jitter draws the
            // first refresh after a cold start from the whole refresh period).
            ready && times.count >= 3 && firstWait >= 1.95 && secondEarly <= 0.05,
            String(
                format:
                    "429 with Retry-After: 2 then with an HTTP date: next requests %.2f s later and %.2f s after the date (goal: not before), %d requests",
                firstWait,
                -secondEarly,
                times.count
            )
        )
    }

    @Test func aPasswordRotatedMidRunIsPickedUpOnSIGHUP() async throws {
        // Long enough to stay valid through the rejected logins however slow the machine: the
        // test is that it is kept, not that it expires.
        let ttl = 120.0
        let run = try await ChaosRun.start(ttl: ttl)
        let token = try #require(run.harness.token)
        let rotated = "pw-" + UUID().uuidString
        run.mock.update { $0.password = rotated }
        let before = run.logins
        let asked = Date()
        run.child.signal(SIGUSR1)
        let rejected =
            await run.harness.notify.waitFor(timeout: 60) { $0.contains("STATUS=") && $0.contains("401") } != nil
        try await Task.sleep(for: .seconds(3))
        let attempts = run.logins - before
        // Measured, not assumed: a loaded machine may sleep much longer than asked.
        let window = Date().timeIntervalSince(asked)
        // 401 waits backoffMaxSeconds between attempts: no fast retries against an account lock-out.
        let bound = Int(window / DaemonHarness.Refresh.chaos.backoffMaxSeconds) + 2
        let oldTokenKept = run.harness.token == token
        try run.harness.folder.write("secrets/password", rotated + "\n")
        let reload = Date()
        run.child.signal(SIGHUP)
        let recovered = await run.waitForFreshToken(after: token, timeout: 30)
        await run.finish(
            rejected && oldTokenKept && recovered && attempts <= bound,
            String(
                format:
                    "password rotated mid-run: 401 in STATUS %@, %d login requests in %.0f s (bound %d), valid token kept %@, new token %.2f s after SIGHUP",
                rejected ? "yes" : "no",
                attempts,
                window,
                bound,
                oldTokenKept ? "yes" : "no",
                Date().timeIntervalSince(reload)
            )
        )
        #expect(!run.harness.child!.allOutput.contains(rotated), "the new password leaked")
    }

    @Test func anAlreadyExpiredTokenIsNeverHandedOut() async throws {
        let ttl = 6.0
        let run = try await ChaosRun.start(ttl: ttl)
        let token = run.harness.token
        let before = run.mock.stats.tokensIssued
        run.mock.always(.expiredToken)
        try await Task.sleep(for: .seconds(Double(ChaosMode.lifetimes(2, long: 20)) * ttl))
        let expiredIssued = run.mock.stats.tokensIssued - before
        let rejectedInLog = run.child.standardError.contains("returned a token that expired")
        run.mock.always(nil)
        let recovered = await run.waitForFreshToken(after: token, timeout: 30)
        await run.finish(
            expiredIssued > 0 && recovered,
            String(
                format:
                    "the server answers with expired tokens: %d refused (in the log: %@), never written; a good token %@ once it stops",
                expiredIssued,
                rejectedInLog ? "yes" : "no",
                recovered ? "adopted" : "NOT adopted"
            )
        )
    }

    @Test func anExpiresFieldLaterThanTheJWTExpIsNotBelieved() async throws {
        let ttl = 4.0
        let lifetimes = ChaosMode.lifetimes(4, long: 40)
        let run = try await ChaosRun.start(ttl: ttl, fault: MockFault(expiresSkewSeconds: 600))
        try await Task.sleep(for: .seconds(Double(lifetimes) * ttl))
        let issued = run.mock.stats.tokensIssued
        await run.finish(
            issued >= lifetimes,
            String(
                format:
                    "`expires` 10 min later than the JWT exp, %.0f s tokens for %d lifetimes: %d tokens, rotated by exp",
                ttl,
                lifetimes,
                issued
            )
        )
    }
}
