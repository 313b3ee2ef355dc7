#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The one human line sent as `STATUS=` after every event (shown by `systemctl status`).
public enum StatusLine {
    /// - Parameters:
    ///   - token: the token held, if any (valid or not).
    ///   - nextLogin: when the next login starts; nil while one is in flight.
    ///   - lastError: the last login's failure, nil after a success.
    ///   - writeError: why the output files could not be written, if they could not.
    public static func describe(
        token: TokenGrant?,
        nextLogin: Date?,
        lastError: LoginError?,
        writeError: String?,
        now: Date
    ) -> String {
        var parts: [String] = []
        if let lastError {
            var failure = lastError.description
            if let nextLogin { failure += ", retry in \(FormatTime.duration(nextLogin.timeIntervalSince(now)))" }
            parts.append(failure)
        }
        switch token {
        case let token? where token.isValid(at: now):
            let validity =
                lastError == nil
                ? "token valid until \(FormatTime.timeOfDay(token.localExpiry)) (\(FormatTime.duration(token.remaining(at: now))) left)"
                : "token still valid \(FormatTime.duration(token.remaining(at: now)))"
            parts.append(validity)
            if lastError == nil {
                parts[parts.count - 1] +=
                    nextLogin.map { ", next refresh \(FormatTime.timeOfDay($0))" } ?? ", refreshing"
            }
        case let token?:
            parts.append("token expired at \(FormatTime.timeOfDay(token.localExpiry)), files removed")
        case nil:
            if lastError == nil { parts.append("logging in") } else { parts.insert("no token", at: 0) }
        }
        if let writeError { parts.append("writing outputs failed: \(writeError)") }
        return parts.joined(separator: "; ")
    }
}
