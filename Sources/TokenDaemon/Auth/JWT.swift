#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Reads the claims of a JWT (RFC 7519) that the daemon needs.
///
/// The signature is not checked: the daemon is not the audience of the token and has no key to check it
/// with. `exp` is used only to refresh earlier, never later, than the response's `expires` says.
enum JWT {
    /// The `exp` claim, or nil when `token` is not a JWT or has no numeric `exp`.
    static func expiry(of token: String) -> Date? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let payload = base64URLDecode(parts[1]),
            case .object(let claims) = try? JSONValue.parse(payload),
            case .number(let exp) = claims["exp"], exp.isFinite, exp > 0, exp < 253_402_300_800
        else { return nil }
        return Date(timeIntervalSince1970: exp)
    }

    static func base64URLDecode(_ text: Substring) -> Data? {
        var base64 = String(text).replacing("-", with: "+").replacing("_", with: "/")
        base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4)
        return Data(base64Encoded: base64)
    }

}
