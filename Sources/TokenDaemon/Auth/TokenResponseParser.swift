#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Turns a successful login answer into a `TokenGrant`, accepting every variant FTS is known to send
/// (`../shared/fts-api.md`): `expires` in seconds or milliseconds, as a number or a numeric string;
/// `tenantId`; unknown fields ignored.
public struct TokenResponseParser: Sendable {
    /// `expires` values above this are milliseconds (10^11 s is the year 5138).
    static let millisecondsThreshold: Double = 100_000_000_000
    /// Latest expiry accepted: 9999-12-31T23:59:59Z.
    static let latestExpiry: Double = 253_402_300_799
    /// `expires` and JWT `exp` may disagree by this much before we warn.
    static let expiryDisagreementTolerance: TimeInterval = 60
    /// Clock skew (from the `Date` header) above which we warn.
    public static let skewWarningThreshold: TimeInterval = 30

    public struct Result: Sendable, Equatable {
        public var grant: TokenGrant
        /// Things an operator should hear about, already phrased for a log line.
        public var warnings: [String]
    }

    public init() {}

    /// - Parameters:
    ///   - body: the response body (already capped in size).
    ///   - contentType: the `Content-Type` header, for the error message only.
    ///   - serverDate: the `Date` header, to measure the server's clock against ours.
    ///   - sentAt: the local time the request went out (nil: the same as `now`).
    ///   - now: the local time the answer arrived.
    public func parse(
        body: [UInt8],
        contentType: String?,
        serverDate: String?,
        sentAt: Date? = nil,
        now: Date
    ) throws(LoginError) -> Result {
        guard case .object(let fields)? = try? JSONValue.parse(body) else {
            throw LoginError.notJSON(contentType: contentType.map(LoginError.serverText))
        }
        guard case .string(let token)? = fields["token"] else { throw LoginError.missingToken }
        try Self.validate(token: token)

        var warnings: [String] = []
        var expiresAt = try Self.expiry(fields["expires"])
        if let exp = JWT.expiry(of: token) {
            if abs(exp.timeIntervalSince(expiresAt)) > Self.expiryDisagreementTolerance {
                warnings.append(
                    "expires (\(FormatTime.iso8601(expiresAt))) and the JWT exp (\(FormatTime.iso8601(exp))) differ by more than a minute; using the earlier"
                )
            }
            expiresAt = min(expiresAt, exp)
        }

        var skew: TimeInterval = 0
        if let serverDate, let serverNow = HTTPDate.parse(serverDate) {
            skew = Self.clockSkew(serverDate: serverNow, sentAt: sentAt ?? now, receivedAt: now)
            if abs(skew) > Self.skewWarningThreshold {
                warnings.append(
                    "local clock differs from the auth server's by \(Int(skew.rounded())) s (positive: server ahead); check NTP"
                )
            }
        }

        // A token too close to expiry to be handed out counts as expired: adopting it would only
        // withdraw it at once and log in again without a pause.
        guard expiresAt.addingTimeInterval(-skew) > now.addingTimeInterval(TokenGrant.handOutMargin) else {
            throw LoginError.alreadyExpired(expiresAt: expiresAt)
        }
        let grant = TokenGrant(
            token: token,
            expiresAt: expiresAt,
            obtainedAt: now,
            userId: Self.identifier(fields["userId"]),
            tenantId: Self.identifier(fields["tenantId"]),
            clockSkew: skew
        )
        return Result(grant: grant, warnings: warnings)
    }

    /// How far the server's clock is ahead of ours (negative: behind), as far as one exchange can tell.
    ///
    /// Expiry is scheduled in server time (the server judges it by its clock), so a local clock ahead
    /// by more than a token's lifetime would otherwise make every token look expired on arrival.
    /// The `Date` header was stamped somewhere between sending and receiving, truncated to the
    /// second, so the true difference lies in [date − receivedAt, date + 1 − sentAt]. We take the
    /// value of that interval closest to zero: no correction when the clocks may agree (a slow or
    /// stale answer must not stretch a token's life), and towards an earlier expiry when the server
    /// is behind.
    static func clockSkew(serverDate: Date, sentAt: Date, receivedAt: Date) -> TimeInterval {
        let least = serverDate.timeIntervalSince(receivedAt)
        let most = serverDate.addingTimeInterval(1).timeIntervalSince(sentAt)
        if least > 0 { return least }
        if most < 0 { return most }
        return 0
    }

    /// A token must fit in a header line: visible ASCII only. Anything else (a newline above all) could
    /// inject a header into the headers file.
    static func validate(token: String) throws(LoginError) {
        guard !token.isEmpty else { throw LoginError.invalidToken("empty") }
        guard token.utf8.count <= 16 * 1024 else { throw LoginError.invalidToken("longer than 16 KiB") }
        guard token.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw LoginError.invalidToken("contains whitespace, control or non-ASCII characters")
        }
    }

    static func expiry(_ value: JSONValue?) throws(LoginError) -> Date {
        let number: Double
        switch value {
        case .number(let n)?:
            number = n
        case .string(let text)?:
            guard let n = Double(text.trimmedSpaces), !text.isEmpty else {
                throw LoginError.invalidExpires("\"\(LoginError.serverText(text.prefix(32)))\" is not a number")
            }
            number = n
        case nil, .null?:
            throw LoginError.invalidExpires("missing")
        case let other?:
            throw LoginError.invalidExpires("\(other.typeName), not a number")
        }
        guard number.isFinite, number > 0 else { throw LoginError.invalidExpires("\(number) is not a positive time") }
        let seconds = number > millisecondsThreshold ? number / 1000 : number
        guard seconds <= latestExpiry else { throw LoginError.invalidExpires("\(number) is after the year 9999") }
        return Date(timeIntervalSince1970: seconds)
    }

    /// `userId`/`tenantId` as sent, whether a string or a number.
    static func identifier(_ value: JSONValue?) -> String? {
        switch value {
        case .string(let text)?: return text
        case .number(let number)? where number.rounded() == number && abs(number) < 1e15: return String(Int64(number))
        case .number(let number)?: return String(number)
        default: return nil
        }
    }
}
