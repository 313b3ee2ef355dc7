import Foundation
import TestSupport
import Testing

@testable import TokenDaemon

/// The fleet's seal (README "Fleet"): what the database holds of a token opens only with the
/// account's password, for the account, generation and expiry it was sealed for.
@Suite struct FleetSealTests {
    static let secrets = LoginSecrets(email: "svc@example.com", password: "pw-fleet-1", apiKey: "key-fleet-1")
    /// The rules do not depend on the cost: a cheap one, but in the test of the standard one.
    static let cheap = FleetSeal.Cost(rounds: 1 << 10, blockSize: 8, parallelism: 1)
    static let seal = try! FleetSeal(secrets: secrets, baseURL: "https://auth.example", cost: cheap)
    static let contents = FleetSeal.Contents(token: "eyJ.fleet-token.sig", userId: "u-1", tenantId: nil)

    @Test func aSealOpensWithTheSameAccountsKeyOnAnotherMember() throws {
        let sealed = try Self.seal.seal(Self.contents, generation: 7, expiresAt: 2_000_000_000)
        let other = try FleetSeal(secrets: Self.secrets, baseURL: "https://auth.example", cost: Self.cheap)
        #expect(try other.open(sealed, generation: 7, expiresAt: 2_000_000_000) == Self.contents)
    }

    @Test func theSealHoldsNoTokenNoFingerprintNoPassword() throws {
        let sealed = try Self.seal.seal(Self.contents, generation: 1, expiresAt: 2_000_000_000)
        let text = String(decoding: sealed, as: UTF8.self)
        for secret in [Self.contents.token, Fingerprint.of(Self.contents.token), Self.secrets.password] {
            #expect(!text.contains(secret))
            #expect(!sealed.indices.contains { sealed[$0...].starts(with: Array(secret.utf8)) })
        }
        // A fresh nonce each time: the same token never seals to the same bytes.
        #expect(try Self.seal.seal(Self.contents, generation: 1, expiresAt: 2_000_000_000) != sealed)
    }

    @Test func aRowMovedToAnotherGenerationOrExpiryDoesNotOpen() throws {
        let sealed = try Self.seal.seal(Self.contents, generation: 7, expiresAt: 2_000_000_000)
        #expect(throws: FleetSeal.OpenError.doesNotOpen) {
            try Self.seal.open(sealed, generation: 8, expiresAt: 2_000_000_000)
        }
        #expect(throws: FleetSeal.OpenError.doesNotOpen) {
            try Self.seal.open(sealed, generation: 7, expiresAt: 2_000_003_600)
        }
        var flipped = sealed
        flipped[flipped.count / 2] ^= 1
        #expect(throws: FleetSeal.OpenError.doesNotOpen) {
            try Self.seal.open(flipped, generation: 7, expiresAt: 2_000_000_000)
        }
        #expect(throws: FleetSeal.OpenError.doesNotOpen) { try Self.seal.open([1, 2, 3], generation: 7, expiresAt: 1) }
    }

    /// A member with a wrong password, or another API key, can neither open the fleet's rows nor
    /// write one the others open.
    @Test(arguments: [
        LoginSecrets(email: "svc@example.com", password: "pw-wrong", apiKey: "key-fleet-1"),
        LoginSecrets(email: "svc@example.com", password: "pw-fleet-1", apiKey: "key-old"),
        LoginSecrets(email: "other@example.com", password: "pw-fleet-1", apiKey: "key-fleet-1"),
    ])
    func anotherAccountsKeyOpensNothingAndForgesNothing(_ secrets: LoginSecrets) throws {
        let bad = try FleetSeal(secrets: secrets, baseURL: "https://auth.example", cost: Self.cheap)
        let sealed = try Self.seal.seal(Self.contents, generation: 3, expiresAt: 2_000_000_000)
        #expect(throws: FleetSeal.OpenError.doesNotOpen) {
            try bad.open(sealed, generation: 3, expiresAt: 2_000_000_000)
        }
        let forged = try bad.seal(Self.contents, generation: 3, expiresAt: 2_000_000_000)
        #expect(throws: FleetSeal.OpenError.doesNotOpen) {
            try Self.seal.open(forged, generation: 3, expiresAt: 2_000_000_000)
        }
    }

    @Test func theRowsKeyIsTheStateFilesAccountIdentity() {
        #expect(
            Self.seal.account
                == StateStore.identity(baseURL: "https://auth.example", email: "svc@example.com", apiKey: "key-fleet-1")
        )
        #expect(!Self.seal.account.contains("key-fleet-1"))
    }

    /// The standard cost, as README states it: 32 MiB at the peak, within the unit's MemoryMax;
    /// a key of another cost opens nothing of it.
    @Test func theStandardCostDerivesTheFleetsKeyIn32MiB() async throws {
        #expect(FleetSeal.Cost.standard.memory == 32 << 20)
        #expect(FleetSeal.maxMemory < 192 << 20)
        // On a thread of its own: seconds of CPU in a debug build, which must not hold one of the
        // few threads every other test's tasks run on.
        let standard = try await onOwnThread {
            try FleetSeal(secrets: Self.secrets, baseURL: "https://auth.example")
        }
        let sealed = try standard.seal(Self.contents, generation: 1, expiresAt: 2_000_000_000)
        #expect(try standard.open(sealed, generation: 1, expiresAt: 2_000_000_000) == Self.contents)
        #expect(throws: FleetSeal.OpenError.doesNotOpen) {
            try Self.seal.open(sealed, generation: 1, expiresAt: 2_000_000_000)
        }
    }
}
