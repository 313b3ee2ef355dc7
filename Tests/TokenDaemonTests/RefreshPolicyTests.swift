import Foundation
import Testing

@testable import TokenDaemon

@Suite struct RefreshPolicyTests {
    let policy = RefreshPolicy(.defaults)
    let start = Date(timeIntervalSince1970: 1_800_000_000)

    func grant(lifetime: TimeInterval, obtainedAt: Date? = nil) -> TokenGrant {
        let obtained = obtainedAt ?? start
        return TokenGrant(
            token: "t",
            expiresAt: obtained.addingTimeInterval(lifetime),
            obtainedAt: obtained,
            userId: nil,
            tenantId: nil,
            clockSkew: 0
        )
    }

    @Test func refreshesAtRefreshAtShareOfTheLifetimeWithoutJitter() {
        let time = policy.refreshTime(for: grant(lifetime: 3600), now: start, random: 0)
        #expect(time == start.addingTimeInterval(2880))
    }

    @Test(arguments: [0.0, 0.25, 0.5, 0.999_999])
    func jitterOnlyMovesTheRefreshEarlierByAtMostJitterTimesLifetime(random: Double) {
        let time = policy.refreshTime(for: grant(lifetime: 3600), now: start, random: random)
        #expect(time <= start.addingTimeInterval(2880))
        #expect(time >= start.addingTimeInterval(2880 - 0.05 * 3600))
    }

    @Test func neverLaterThanMinRemainingBeforeExpiry() {
        // 0.8 × 300 s = 240 s would leave 60 s; minRemainingSeconds 120 pulls it to 180 s.
        let time = policy.refreshTime(for: grant(lifetime: 300), now: start, random: 0)
        #expect(time == start.addingTimeInterval(180))
    }

    @Test func evenWithNoMarginTheLoginStartsBeforeTheTokenIsWithdrawn() {
        // refreshAt 0.75 of 4 s would start the login at expiry − 1 s, the instant the token is
        // withdrawn (handOutMargin): readers would find no token until the login ends.
        let noMargin = RefreshPolicy(
            .init(refreshAt: 0.75, minRemainingSeconds: 0, jitter: 0, backoffInitialSeconds: 1, backoffMaxSeconds: 300)
        )
        #expect(noMargin.refreshTime(for: grant(lifetime: 4), now: start, random: 0) == start.addingTimeInterval(2))
        #expect(
            noMargin.refreshTime(for: grant(lifetime: 3600), now: start, random: 0) == start.addingTimeInterval(2700)
        )
    }

    @Test func aTokenShorterThanTwiceTheMarginIsRefreshedAtHalfItsLifetimeNotEverySecond() {
        // expiry − minRemainingSeconds would be before the token was obtained.
        let short = grant(lifetime: 60)
        #expect(policy.isShorterThanMargin(short))
        #expect(!policy.isShorterThanMargin(grant(lifetime: 240)))
        #expect(policy.refreshTime(for: short, now: start, random: 0) == start.addingTimeInterval(30))
    }

    @Test func neverSoonerThanOneSecondFromNow() {
        // A stored token well past its planned refresh time.
        let old = grant(lifetime: 3600, obtainedAt: start.addingTimeInterval(-3500))
        #expect(policy.refreshTime(for: old, now: start, random: 0) == start.addingTimeInterval(1))
    }

    @Test func theFirstRefreshAfterAColdStartSpansAWholeRefreshPeriod() {
        // refreshAt 0.8, jitter 0.05: the period is 0.775 lifetimes, so the window is [0.025, 0.8].
        let policy = RefreshPolicy(
            .init(
                refreshAt: 0.8,
                minRemainingSeconds: 60,
                jitter: 0.05,
                backoffInitialSeconds: 1,
                backoffMaxSeconds: 300
            )
        )
        let cold = { (random: Double) in
            policy.refreshTime(for: grant(lifetime: 3600), now: start, random: random, coldStart: true)
        }
        #expect(cold(0) == start.addingTimeInterval(0.8 * 3600))
        #expect(abs(cold(0.999_999).timeIntervalSince(start) - 0.025 * 3600) < 0.01)
        #expect(abs(cold(0.5).timeIntervalSince(start) - 0.4125 * 3600) < 0.01)
        // Never sooner than a second from now, even at the window's start.
        let tiny = RefreshPolicy(
            .init(
                refreshAt: 0.8,
                minRemainingSeconds: 1,
                jitter: 0.05,
                backoffInitialSeconds: 1,
                backoffMaxSeconds: 300
            )
        )
        #expect(
            tiny.refreshTime(for: grant(lifetime: 10), now: start, random: 0.999, coldStart: true)
                == start.addingTimeInterval(1)
        )
    }

    @Test func clockSkewMovesTheScheduleEarlier() {
        var skewed = grant(lifetime: 3600)
        skewed.clockSkew = 100
        // L = 3500 s by the local clock.
        #expect(policy.refreshTime(for: skewed, now: start, random: 0) == start.addingTimeInterval(0.8 * 3500))
    }

    @Test func transientFailuresBackOffExponentiallyUpToTheMaximum() {
        let ceilings = (1...12).map {
            policy.retryDelay(after: .transient, attempt: $0, current: nil, now: start, random: 0)
        }
        #expect(ceilings == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300])
        #expect(policy.retryDelay(after: .transient, attempt: 10_000, current: nil, now: start, random: 0) == 300)
    }

    @Test(arguments: [0.0, 0.3, 0.999])
    func backoffJitterStaysWithinHalfToFullDelay(random: Double) {
        let delay = policy.retryDelay(after: .transient, attempt: 6, current: nil, now: start, random: random)
        #expect(delay <= 32)
        #expect(delay >= 16)
    }

    @Test func backoffNeverBelowTheInitialDelay() {
        #expect(policy.retryDelay(after: .transient, attempt: 1, current: nil, now: start, random: 0.999) == 1)
    }

    @Test func noWaitExceedsHalfTheRemainingValidity() {
        let held = grant(lifetime: 200, obtainedAt: start.addingTimeInterval(-100))
        // 100 s left: waits are capped at 50 s even after many failures.
        #expect(policy.retryDelay(after: .transient, attempt: 9, current: held, now: start, random: 0) == 50)
        #expect(
            policy.retryDelay(after: .rateLimited(retryAfter: nil), attempt: 9, current: held, now: start, random: 0)
                == 50
        )
        // An expired token does not cap anything.
        let expired = grant(lifetime: 10, obtainedAt: start.addingTimeInterval(-100))
        #expect(policy.retryDelay(after: .transient, attempt: 9, current: expired, now: start, random: 0) == 256)
    }

    @Test func retryAfterIsAlwaysHonouredEvenAboveTheCap() {
        let held = grant(lifetime: 200, obtainedAt: start.addingTimeInterval(-100))
        #expect(
            policy.retryDelay(after: .rateLimited(retryAfter: 120), attempt: 1, current: held, now: start, random: 0)
                == 120
        )
        #expect(
            policy.retryDelay(after: .rateLimited(retryAfter: 0), attempt: 3, current: nil, now: start, random: 0) == 4
        )
    }

    @Test func rejectedCredentialsWaitTheMaximum() {
        let held = grant(lifetime: 200, obtainedAt: start.addingTimeInterval(-100))
        #expect(policy.retryDelay(after: .rejected, attempt: 1, current: held, now: start, random: 0) == 300)
        #expect(policy.retryDelay(after: .rejected, attempt: 1, current: nil, now: start, random: 0.5) == 300)
    }

    @Test(arguments: [
        (LoginError.httpStatus(401, retryAfter: nil), LoginError.Kind.rejected),
        (.httpStatus(403, retryAfter: nil), .rejected),
        (.httpStatus(400, retryAfter: nil), .rejected),
        (.httpStatus(302, retryAfter: nil), .rejected),
        (.httpStatus(408, retryAfter: nil), .transient),
        (.httpStatus(500, retryAfter: nil), .transient),
        (.httpStatus(503, retryAfter: nil), .transient),
        (.httpStatus(503, retryAfter: 30), .rateLimited(retryAfter: 30)),
        (.httpStatus(429, retryAfter: nil), .rateLimited(retryAfter: nil)),
        (.httpStatus(429, retryAfter: 5), .rateLimited(retryAfter: 5)),
        (.timedOut(seconds: 30), .transient),
        (.transport("refused"), .transient),
        (.bodyTooLarge(limit: 65536), .transient),
    ])
    func failuresAreClassified(_ error: LoginError, _ kind: LoginError.Kind) {
        #expect(error.kind == kind)
    }
}
