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
    ///   - now: the local time the answer arrived.
    public func parse(body: [UInt8], contentType: String?, serverDate: String?, now: Date) throws(LoginError) -> Result {
        guard case .object(let fields)? = try? JSONValue.parse(body) else {
            throw LoginError.notJSON(contentType: contentType)
        }
        guard case .string(let token)? = fields["token"] else { throw LoginError.missingToken }
        try Self.validate(token: token)

        var warnings: [String] = []
        var expiresAt = try Self.expiry(fields["expires"])
        if let exp = JWT.expiry(of: token) {
            if abs(exp.timeIntervalSince(expiresAt)) > Self.expiryDisagreementTolerance {
                warnings.append("expires (\(FormatTime.iso8601(expiresAt))) and the JWT exp (\(FormatTime.iso8601(exp))) differ by more than a minute; using the earlier")
            }
            expiresAt = min(expiresAt, exp)
        }

        var skew: TimeInterval = 0
        if let serverDate, let serverNow = HTTPDate.parse(serverDate) {
            let measured = serverNow.timeIntervalSince(now)
            if abs(measured) > Self.skewWarningThreshold {
                warnings.append("local clock differs from the auth server's by \(Int(measured.rounded())) s (positive: server ahead); check NTP")
            }
            // Schedule in server time: the server judges expiry by its clock. The Date header has
            // one-second resolution, so smaller differences are noise. A local clock ahead by more than
            // a token's lifetime would otherwise make every token look expired on arrival.
            skew = abs(measured) > 1 ? measured : 0
        }

        guard expiresAt.addingTimeInterval(-skew) > now else {
            throw LoginError.alreadyExpired(expiresAt: expiresAt)
        }
        let grant = TokenGrant(
            token: token, expiresAt: expiresAt, obtainedAt: now,
            userId: Self.identifier(fields["userId"]), tenantId: Self.identifier(fields["tenantId"]),
            clockSkew: skew)
        return Result(grant: grant, warnings: warnings)
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
                throw LoginError.invalidExpires("\"\(text.prefix(32))\" is not a number")
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
