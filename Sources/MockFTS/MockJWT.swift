import Crypto

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// HS256 JWTs signed with the mock's own random key, so `whoami` can tell its tokens from forgeries.
struct MockJWT: Sendable {
    /// Raw key bytes: `SymmetricKey` itself is not `Sendable`.
    private let keyBytes: [UInt8] = (0..<32).map { _ in UInt8.random(in: 0...255) }
    private var key: SymmetricKey { SymmetricKey(data: keyBytes) }

    private struct Claims: Codable {
        var sub: String
        var iat: Int
        var exp: Int
        var jti: String
    }

    func issue(subject: String, issuedAt: Date, expiresAt: Date, serial: Int) -> String {
        let claims = Claims(
            sub: subject,
            iat: Int(issuedAt.timeIntervalSince1970),
            exp: Int(expiresAt.timeIntervalSince1970),
            jti: String(serial)
        )
        let payload = (try? JSONEncoder().encode(claims)).map(Array.init) ?? []
        let signingInput = Self.base64URL(Array(#"{"alg":"HS256","typ":"JWT"}"#.utf8)) + "." + Self.base64URL(payload)
        return signingInput + "."
            + Self.base64URL(Array(HMAC<SHA256>.authenticationCode(for: Array(signingInput.utf8), using: key)))
    }

    /// The `sub` claim of a token this mock signed that has not expired at `now`, else nil.
    func verify(_ token: String, now: Date) -> String? {
        guard let claims = claims(of: token), Double(claims.exp) > now.timeIntervalSince1970 else { return nil }
        return claims.sub
    }

    /// `exp` of a token signed with our key, whether or not it has expired.
    func expiry(of token: String) -> Date? {
        claims(of: token).map { Date(timeIntervalSince1970: Double($0.exp)) }
    }

    private func claims(of token: String) -> Claims? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let signature = Self.decode(parts[2]),
            HMAC<SHA256>.isValidAuthenticationCode(
                signature,
                authenticating: Array((parts[0] + "." + parts[1]).utf8),
                using: key
            ),
            let payload = Self.decode(parts[1])
        else { return nil }
        return try? JSONDecoder().decode(Claims.self, from: Data(payload))
    }

    static func base64URL(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString().replacing("+", with: "-").replacing("/", with: "_").replacing("=", with: "")
    }

    static func decode(_ text: Substring) -> [UInt8]? {
        var base64 = String(text).replacing("-", with: "+").replacing("_", with: "/")
        base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4)
        return Data(base64Encoded: base64).map(Array.init)
    }
}
