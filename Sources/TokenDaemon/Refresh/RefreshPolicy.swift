#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// When to log in next: a pure function of the time, the token held and the failures so far.
///
/// The contract (README "Refresh timing"):
/// - A token of lifetime L obtained at T is refreshed at T + refreshAt·L − u·jitter·L (u uniform in
///   [0, 1)), never later than expiry − minRemainingSeconds and never sooner than 1 s from now.
///   Whatever minRemainingSeconds says, the login starts at least `latestLead` (2 s) before expiry:
///   the token is withdrawn 1 s before it (`TokenGrant.handOutMargin`), and a login takes time.
///   The first token after a cold start (no stored token) uses a whole refresh period instead of
///   jitter·L, which de-synchronises hosts that boot together.
///   A token shorter than 2·minRemainingSeconds cannot honour that margin: it is refreshed at
///   T + L/2 at the latest rather than every second, which would hammer the server.
/// - After a network error, timeout, 5xx or unusable answer: exponential backoff from
///   backoffInitialSeconds to backoffMaxSeconds, each wait drawn from [d/2, d]; while a valid token
///   remains no wait exceeds half of its remaining validity, so several attempts fit before expiry.
/// - 429, or 503 with Retry-After: wait at least what the server asked.
/// - 401, 403 and other 4xx: wait backoffMaxSeconds; no fast retries against an account lock-out.
public struct RefreshPolicy: Sendable, Equatable {
    public var settings: Configuration.Refresh
    /// The least time before expiry at which a refresh starts (see the contract above).
    static let latestLead = 2 * TokenGrant.handOutMargin

    public init(_ settings: Configuration.Refresh) {
        self.settings = settings
    }

    /// The instant to refresh `grant`. `random` is uniform in [0, 1).
    ///
    /// `coldStart`: `grant` is the first token of a process that found no stored token. Hosts that
    /// boot together (a rollout, a power cut) would otherwise refresh in step for many lifetimes, as
    /// each refresh adds at most jitter × lifetime of spread; so this one refresh is drawn from one
    /// whole refresh period, `(refreshAt − jitter/2) × lifetime`, ending at the usual instant. That
    /// spreads the fleet in one lifetime, at the cost of one early login per cold start. With
    /// `jitter` 0 nothing is random, this included.
    public func refreshTime(for grant: TokenGrant, now: Date, random: Double, coldStart: Bool = false) -> Date {
        let lifetime = max(0, grant.lifetime)
        let spread = coldStart && settings.jitter > 0 ? settings.refreshAt - settings.jitter / 2 : settings.jitter
        let planned = grant.obtainedAt.addingTimeInterval((settings.refreshAt - random * spread) * lifetime)
        let latest = max(
            grant.localExpiry.addingTimeInterval(-max(settings.minRemainingSeconds, Self.latestLead)),
            grant.obtainedAt.addingTimeInterval(lifetime / 2)
        )
        return max(min(planned, latest), now.addingTimeInterval(1))
    }

    /// Seconds to wait after the `attempt`-th consecutive failed login (1 for the first).
    /// - Parameters:
    ///   - current: the token still held, if any; its remaining validity bounds transient waits.
    ///   - random: uniform in [0, 1).
    public func retryDelay(
        after failure: LoginError.Kind,
        attempt: Int,
        current: TokenGrant?,
        now: Date,
        random: Double
    ) -> TimeInterval {
        switch failure {
        case .rejected:
            return settings.backoffMaxSeconds
        case .rateLimited(let retryAfter?):
            return max(retryAfter, backoff(attempt: attempt, current: current, now: now, random: random))
        case .rateLimited(nil), .transient:
            return backoff(attempt: attempt, current: current, now: now, random: random)
        }
    }

    /// Whether `grant` is too short to keep `minRemainingSeconds` (see `refreshTime`).
    public func isShorterThanMargin(_ grant: TokenGrant) -> Bool {
        grant.lifetime < 2 * settings.minRemainingSeconds
    }

    private func backoff(attempt: Int, current: TokenGrant?, now: Date, random: Double) -> TimeInterval {
        let doublings = min(max(attempt, 1), 62) - 1
        let ceiling = min(settings.backoffMaxSeconds, settings.backoffInitialSeconds * Double(1 << doublings))
        var delay = ceiling - random * ceiling / 2
        if let current, current.isValid(at: now) {
            delay = min(delay, current.remaining(at: now) / 2)
        }
        return max(delay, settings.backoffInitialSeconds)
    }
}
