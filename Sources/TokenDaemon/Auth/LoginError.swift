#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Why a login produced no usable token. Descriptions never contain the body or any secret.
public enum LoginError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No HTTP answer: connection refused, DNS, TLS, reset.
    case transport(String)
    /// No complete answer within `api.timeoutSeconds`.
    case timedOut(seconds: Double)
    /// The server answered with a non-2xx status.
    case httpStatus(Int, retryAfter: TimeInterval?)
    /// The body exceeded the cap (an HTML error page, a misrouted download).
    case bodyTooLarge(limit: Int)
    /// The body is not JSON (a proxy's HTML page, say). `contentType` as sent, if any.
    case notJSON(contentType: String?)
    /// The JSON has no usable `token` field.
    case missingToken
    /// The token is empty or has characters a header cannot carry.
    case invalidToken(String)
    /// `expires` is missing, not a number, negative or implausible.
    case invalidExpires(String)
    /// The server handed out a token that is already expired (by its own clock).
    case alreadyExpired(expiresAt: Date)

    /// Text the server chose (a `Content-Type`, an `expires` value), as it may appear in a log
    /// line, `STATUS=` or `/healthz`: printable ASCII only (anything else becomes `?`) and at most
    /// 64 characters, so that a hostile answer cannot forge a log field, a line or a document.
    public static func serverText(_ text: some StringProtocol) -> String {
        var result = ""
        for scalar in text.unicodeScalars {
            guard result.unicodeScalars.count < 64 else { return result + "…" }
            result.unicodeScalars.append(scalar.value >= 0x20 && scalar.value < 0x7F ? scalar : "?")
        }
        return result
    }

    /// How the refresh policy treats this failure.
    public enum Kind: Sendable, Equatable {
        /// Worth retrying soon, with backoff.
        case transient
        /// The server asked us to slow down; wait at least `retryAfter` when given.
        case rateLimited(retryAfter: TimeInterval?)
        /// Credentials, key or URL rejected: retrying fast risks an account lock-out.
        case rejected
    }

    public var kind: Kind {
        guard case .httpStatus(let status, let retryAfter) = self else { return .transient }
        switch status {
        case 429: return .rateLimited(retryAfter: retryAfter)
        case 503 where retryAfter != nil: return .rateLimited(retryAfter: retryAfter)
        case 408, 500...599: return .transient
        default: return .rejected
        }
    }

    /// The HTTP status, when the server sent one.
    public var httpStatus: Int? {
        if case .httpStatus(let status, _) = self { return status }
        return nil
    }

    public var description: String {
        switch self {
        case .transport(let reason): return "auth server unreachable (\(reason))"
        case .timedOut(let seconds): return "no answer from the auth server within \(FormatTime.seconds(seconds))"
        case .httpStatus(let status, _):
            switch status {
            case 401, 403: return "credentials or API key rejected (HTTP \(status))"
            case 429: return "rate limited by the auth server (HTTP 429)"
            case 300...399:
                return
                    "auth server redirects (HTTP \(status)); redirects are not followed with credentials: check api.baseURL"
            case 500...599: return "auth server unavailable (HTTP \(status))"
            default: return "auth server refused the login (HTTP \(status))"
            }
        case .bodyTooLarge(let limit): return "answer body larger than \(limit / 1024) KiB"
        case .notJSON(let contentType): return "answer is not JSON (Content-Type: \(contentType ?? "none"))"
        case .missingToken: return "answer has no \"token\" string"
        case .invalidToken(let reason): return "answer has an unusable token: \(reason)"
        case .invalidExpires(let reason): return "answer has an unusable \"expires\": \(reason)"
        case .alreadyExpired(let expiresAt):
            return "auth server returned a token that expired at \(FormatTime.iso8601(expiresAt))"
        }
    }
}
