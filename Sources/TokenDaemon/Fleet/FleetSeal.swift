import Crypto
import CryptoExtras

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What the fleet's table holds of a token (README "Fleet"): sealed, so that the database never
/// holds a usable token.
///
/// What a reader of the database gets, even one who also holds the API key (as every consumer of
/// the headers file does):
/// 1. no token, no fingerprint of it, no password: the row holds the account's identity (a hash
///    that includes a hash of the API key, as the state file's), the generation, the expiry and
///    the sealed bytes;
/// 2. no fast test of a guessed password: the key is scrypt of the password, with parameters that
///    cost as much as OWASP's least for scrypt (N = 2^17, r = 8, p = 1) in a quarter of its memory:
///    N = 2^15, r = 8, p = 3, so 32 MiB at the peak (`MemoryMax=192M` leaves room) and a tenth of a
///    second or so, once at start and at each reload that changes a secret;
/// 3. no row moved to another account, generation or expiry: AES-GCM's associated data binds all
///    three, so a row edited in place fails to open (`open` throws) and is never served.
/// Every member derives the same key from the same account; a member with another password (or
/// API key, or email) derives another and can neither open nor forge a row the others open.
struct FleetSeal: Sendable {
    /// The scrypt parameters.
    struct Cost: Sendable, Equatable {
        /// N, a power of 2.
        var rounds: Int
        /// r.
        var blockSize: Int
        /// p.
        var parallelism: Int

        /// 2. above: what every member uses.
        static let standard = Cost(rounds: 1 << 15, blockSize: 8, parallelism: 3)

        /// Bytes at the peak: 128 × r × N.
        var memory: Int { 128 * blockSize * rounds }
    }

    /// BoringSSL refuses a derivation that needs more than its limit (32 MiB by default): the
    /// standard cost needs 32 MiB and a little more.
    static let maxMemory = 64 << 20

    private let key: SymmetricKey
    /// `StateStore.identity` of the account: the row's key, bound into every seal.
    let account: String

    /// Derives the account's key: slow on purpose (2.); run it off the serving loop.
    /// `cost`: `.standard` but in tests of other rules (a debug build takes seconds for it).
    init(secrets: LoginSecrets, baseURL: String, cost: Cost = .standard) throws {
        account = StateStore.identity(baseURL: baseURL, email: secrets.email, apiKey: secrets.apiKey)
        let salt = Array(SHA256.hash(data: Array("fts-tokend fleet key v1\n\(account)".utf8)))
        key = try KDF.Scrypt.deriveKey(
            from: Array(secrets.password.utf8),
            salt: salt,
            outputByteCount: 32,
            rounds: cost.rounds,
            blockSize: cost.blockSize,
            parallelism: cost.parallelism,
            maxMemory: Self.maxMemory
        )
    }

    /// What a seal carries: the token and what the login answer said with it.
    struct Contents: Codable, Equatable, Sendable {
        var token: String
        var userId: String?
        var tenantId: String?
    }

    enum OpenError: Error, Equatable {
        /// Another key sealed it (another password), or the row was edited: the seal does not open.
        case doesNotOpen
        /// It opened, but what is inside is not a seal's contents (a bug, or another version).
        case unreadable
    }

    /// Seals `contents` as generation `generation` with expiry `expiresAt` (Unix seconds, in the
    /// server's time, as the login answer stated it). A fresh random nonce each time.
    func seal(_ contents: Contents, generation: Int64, expiresAt: Int64) throws -> [UInt8] {
        let plain = try JSONEncoder().encode(contents)
        let box = try AES.GCM.seal(
            plain,
            using: key,
            authenticating: associatedData(generation: generation, expiresAt: expiresAt)
        )
        guard let combined = box.combined else { throw OpenError.unreadable }
        return Array(combined)
    }

    /// Opens a row's seal, checking that it was sealed for this account, `generation` and
    /// `expiresAt` (3.).
    func open(_ sealed: [UInt8], generation: Int64, expiresAt: Int64) throws(OpenError) -> Contents {
        let plain: Data
        do {
            let box = try AES.GCM.SealedBox(combined: sealed)
            plain = try AES.GCM.open(
                box,
                using: key,
                authenticating: associatedData(generation: generation, expiresAt: expiresAt)
            )
        } catch {
            throw .doesNotOpen
        }
        guard let contents = try? JSONDecoder().decode(Contents.self, from: plain) else { throw .unreadable }
        return contents
    }

    private func associatedData(generation: Int64, expiresAt: Int64) -> [UInt8] {
        Array("fts-tokend fleet seal v1\n\(account)\n\(generation)\n\(expiresAt)".utf8)
    }
}
