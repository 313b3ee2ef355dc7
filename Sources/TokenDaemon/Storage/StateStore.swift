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
        /// The longest lifetime (receipt to expiry) of any token this identity was granted, in
        /// seconds: a stored token claiming more is not believed. Absent in files written before it
        /// existed (then the stored token's own lifetime stands in).
        var longestLifetimeSeconds: Double?
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

    /// Saves `grant`, carrying over the longest lifetime the file recorded for `identity`.
    public func save(_ grant: TokenGrant, identity: String) throws(SystemError) {
        var longest = grant.lifetime
        if let previous = try? readDocument(), previous.identity == identity {
            longest = max(longest, previous.longestLifetimeSeconds ?? previous.grant.lifetime)
        }
        let document = Document(
            version: Self.version,
            identity: identity,
            grant: grant,
            longestLifetimeSeconds: longest
        )
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .secondsSince1970
        encoder.outputFormatting = [.sortedKeys]
        guard let bytes = try? encoder.encode(document) else {
            throw SystemError("encode state", errno: nil)
        }
        try AtomicFileWriter.write(Array(bytes), to: path, mode: 0o600, directoryMode: 0o700)
    }

    /// Why a stored token was not loaded.
    public enum LoadProblem: Error, Sendable, Equatable, CustomStringConvertible {
        case missing
        case unreadable(String)
        case otherAccount
        /// The stored times contradict the token or what the account has been seen to issue: the
        /// file was edited or damaged, and believing it could keep an expired or forged token in use.
        case implausible(String)
        public var description: String {
            switch self {
            case .missing: return "no state file"
            case .unreadable(let reason): return "state file unusable (\(reason))"
            case .otherAccount: return "stored token belongs to another account or server"
            case .implausible(let reason): return "stored token is implausible (\(reason))"
            }
        }
    }

    /// Slack for rounding (`expires` may carry fractions, the JWT's `exp` does not) and for the
    /// clock moving a little between saving and loading.
    static let plausibilitySlack: TimeInterval = 1
    /// How far in the future a stored receipt time may be (a small clock step back after saving).
    static let receiptInFutureLimit: TimeInterval = 60

    /// The stored token for `identity`, whatever its remaining validity (the caller decides), if
    /// it is plausible at `now`:
    /// 1. its expiry is not later than the `exp` its JWT carries (the daemon stores the earlier of
    ///    `expires` and `exp`, so a later one was edited);
    /// 2. it was received no later than `receiptInFutureLimit` from now;
    /// 3. its lifetime is within the longest this identity has been seen to be granted.
    public func load(identity: String, now: Date) throws(LoadProblem) -> TokenGrant {
        let document: Document
        do {
            document = try readDocument()
        } catch {
            if error.errno == ENOENT { throw LoadProblem.missing }
            throw LoadProblem.unreadable(error.description)
        }
        guard document.version == Self.version else {
            throw LoadProblem.unreadable("not a version \(Self.version) state document")
        }
        guard document.identity == identity else { throw LoadProblem.otherAccount }
        let grant = document.grant
        do {
            try TokenResponseParser.validate(token: grant.token)
        } catch {
            throw LoadProblem.unreadable(error.description)
        }
        // 1.
        if let exp = JWT.expiry(of: grant.token), grant.expiresAt > exp.addingTimeInterval(Self.plausibilitySlack) {
            throw LoadProblem.implausible(
                "its expiry \(FormatTime.iso8601(grant.expiresAt)) is later than the JWT's exp \(FormatTime.iso8601(exp))"
            )
        }
        // 2.
        guard grant.obtainedAt <= now.addingTimeInterval(Self.receiptInFutureLimit) else {
            throw LoadProblem.implausible("received \(FormatTime.iso8601(grant.obtainedAt)), in the future")
        }
        // 3.
        let longest = document.longestLifetimeSeconds ?? grant.lifetime
        guard grant.lifetime <= longest + Self.plausibilitySlack else {
            throw LoadProblem.implausible(
                "a lifetime of \(Int(grant.lifetime)) s, longer than the \(Int(longest)) s this account was ever granted"
            )
        }
        return grant
    }

    private struct ReadFailure: Error {
        var errno: Int32?
        var description: String
    }

    private func readDocument() throws(ReadFailure) -> Document {
        let contents: SmallFile.Contents
        do {
            contents = try SmallFile.read(path, limit: 256 * 1024)
        } catch {
            throw ReadFailure(errno: error.errno, description: error.description)
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .secondsSince1970
        guard let document = try? decoder.decode(Document.self, from: Data(contents.bytes)) else {
            throw ReadFailure(errno: nil, description: "not a version \(Self.version) state document")
        }
        return document
    }
}
