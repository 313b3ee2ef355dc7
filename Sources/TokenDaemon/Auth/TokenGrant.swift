import Crypto

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A token the auth server granted, with the times the daemon schedules by.
public struct TokenGrant: Sendable, Equatable, Codable {
    /// The JWT. Never log it: log `fingerprint`.
    public var token: String
    /// Expiry as the server states it (the earlier of `expires` and the JWT's `exp`), in server time.
    public var expiresAt: Date
    /// When the answer arrived, by the local clock.
    public var obtainedAt: Date
    public var userId: String?
    public var tenantId: String?
    /// Seconds the server's clock is ahead of ours (negative when behind; 0 within a second). Expiry is
    /// converted to local time with it, so the schedule follows the server's clock.
    public var clockSkew: TimeInterval

    public init(
        token: String,
        expiresAt: Date,
        obtainedAt: Date,
        userId: String?,
        tenantId: String?,
        clockSkew: TimeInterval
    ) {
        self.token = token
        self.expiresAt = expiresAt
        self.obtainedAt = obtainedAt
        self.userId = userId
        self.tenantId = tenantId
        self.clockSkew = clockSkew
    }

    /// The instant of expiry by the local clock.
    public var localExpiry: Date { expiresAt.addingTimeInterval(-clockSkew) }

    /// Validity from receipt to expiry.
    public var lifetime: TimeInterval { localExpiry.timeIntervalSince(obtainedAt) }

    public func remaining(at now: Date) -> TimeInterval { localExpiry.timeIntervalSince(now) }

    /// Validity a token must have left to be handed out. The timer that withdraws an expiring token
    /// may fire a few milliseconds late, and a reader needs a moment to use what it read: the
    /// daemon withdraws a token (removes its files, stops serving it) this long before it expires,
    /// so no reader ever sees one past its expiry.
    public static let handOutMargin: TimeInterval = 1

    /// Whether the token may still be handed out: more than `handOutMargin` left.
    public func isValid(at now: Date) -> Bool { remaining(at: now) > Self.handOutMargin }

    /// Seconds until the token is withdrawn (`handOutMargin` before expiry).
    public func usable(at now: Date) -> TimeInterval { remaining(at: now) - Self.handOutMargin }

    /// First 8 hex characters of the token's SHA-256: names a token in logs without revealing it.
    public var fingerprint: String { Fingerprint.of(token) }
}

/// Short, non-reversible names for secrets in logs.
public enum Fingerprint {
    public static func of(_ secret: String) -> String {
        Hex.encode(SHA256.hash(data: Array(secret.utf8)).prefix(4))
    }

    /// `text` as a fingerprint `of` could have written (8 hex characters; any case and surrounding
    /// whitespace accepted), or nil.
    public static func parse(_ text: String) -> String? {
        let trimmed = String(text.drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
            .lowercased()
        guard trimmed.utf8.count == 8,
            trimmed.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) })
        else { return nil }
        return trimmed
    }
}
