import Crypto
import Glibc

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Keeps the last token on disk (mode 0600) so that a restart reuses it instead of logging in.
public struct StateStore: Sendable {
    public var path: String

    /// Bumped when the file's shape or the identity changes; other versions are ignored (one extra
    /// login). 2: the identity covers the API key.
    static let version = 2

    struct Document: Codable {
        var version: Int
        /// SHA-256 of base URL, email and the API key's SHA-256: the token belongs to that account on
        /// that server, obtained with that key.
        var identity: String
        var grant: TokenGrant
    }

    public init(path: String) {
        self.path = path
    }

    /// Identity of the account a token belongs to. The API key is part of it (as a hash: the
    /// state file never holds the key), so a rotated key never reuses the old key's token.
    public static func identity(baseURL: String, email: String, apiKey: String) -> String {
        let key = Hex.encode(SHA256.hash(data: Array(apiKey.utf8)))
        return Hex.encode(SHA256.hash(data: Array((baseURL + "\n" + email + "\n" + key).utf8)))
    }

    public func save(_ grant: TokenGrant, identity: String) throws(SystemError) {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .secondsSince1970
        encoder.outputFormatting = [.sortedKeys]
        guard let bytes = try? encoder.encode(Document(version: Self.version, identity: identity, grant: grant)) else {
            throw SystemError("encode state", errno: nil)
        }
        try AtomicFileWriter.write(Array(bytes), to: path, mode: 0o600, directoryMode: 0o700)
    }

    /// Why a stored token was not loaded.
    public enum LoadProblem: Error, Sendable, Equatable, CustomStringConvertible {
        case missing
        case unreadable(String)
        case otherAccount
        public var description: String {
            switch self {
            case .missing: return "no state file"
            case .unreadable(let reason): return "state file unusable (\(reason))"
            case .otherAccount: return "stored token belongs to another account or server"
            }
        }
    }

    /// The stored token for `identity`, whatever its remaining validity (the caller decides).
    public func load(identity: String) throws(LoadProblem) -> TokenGrant {
        let contents: SmallFile.Contents
        do {
            contents = try SmallFile.read(path, limit: 256 * 1024)
        } catch {
            if error.errno == ENOENT { throw LoadProblem.missing }
            throw LoadProblem.unreadable(error.description)
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .secondsSince1970
        guard let document = try? decoder.decode(Document.self, from: Data(contents.bytes)),
            document.version == Self.version
        else {
            throw LoadProblem.unreadable("not a version \(Self.version) state document")
        }
        guard document.identity == identity else { throw LoadProblem.otherAccount }
        do {
            try TokenResponseParser.validate(token: document.grant.token)
        } catch {
            throw LoadProblem.unreadable(error.description)
        }
        return document.grant
    }
}
