#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Reads the expiry back out of any of the output formats, for `fts-tokend token --file`.
public enum TokenFileInspector {
    /// The `expires` of a jsonFile document, else the `exp` of the JWT in a tokenFile or headersFile;
    /// nil when neither can be found (an opaque token: the caller cannot judge it).
    public static func expiry(of text: String) -> Date? {
        if case .object(let fields)? = try? JSONValue.parse(Array(text.utf8)),
            case .number(let expires)? = fields["expires"]
        {
            return Date(timeIntervalSince1970: expires)
        }
        let token =
            text.split(separator: "\n").first { $0.hasPrefix("Authorization:") }
            .map { $0.split(separator: " ").last.map(String.init) ?? "" } ?? text
        return JWT.expiry(of: token)
    }
}
