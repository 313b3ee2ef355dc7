import Foundation
import TestSupport
import Testing

@testable import TokenDaemon

let sampleGrant = TokenGrant(
    token: "aaa.bbb.ccc",
    expiresAt: Date(timeIntervalSince1970: 1_800_003_600),
    obtainedAt: Date(timeIntervalSince1970: 1_800_000_000),
    userId: "u-1",
    tenantId: "acme",
    clockSkew: 0
)

@Suite struct TokenOutputsTests {
    func outputs(in folder: TemporaryDirectory, scheme: String = "Bearer") -> TokenOutputs {
        TokenOutputs(
            Configuration.Outputs(
                tokenFile: .init(path: folder.file("run/token"), mode: 0o640),
                jsonFile: .init(path: folder.file("run/token.json"), mode: 0o600),
                headersFile: .init(
                    file: .init(path: folder.file("run/headers"), mode: 0o640),
                    authorizationScheme: scheme
                )
            )
        )
    }

    @Test func writesTheThreeFormats() throws {
        let folder = try TemporaryDirectory()
        try outputs(in: folder).write(sampleGrant, apiKey: "key-1")
        #expect(folder.read("run/token") == "aaa.bbb.ccc")
        #expect(folder.read("run/headers") == "x-api-key: key-1\nAuthorization: Bearer aaa.bbb.ccc\n")
        #expect(folder.mode("run/token.json") == 0o600)
        let json = try JSONSerialization.jsonObject(with: Data(folder.read("run/token.json")!.utf8)) as! [String: Any]
        #expect(json["token"] as? String == "aaa.bbb.ccc")
        #expect(json["expires"] as? Int == 1_800_003_600)
        #expect(json["expiresAt"] as? String == "2027-01-15T09:00:00Z")
        #expect(json["obtainedAt"] as? String == "2027-01-15T08:00:00Z")
        #expect(json["userId"] as? String == "u-1")
        #expect(json["tenantId"] as? String == "acme")
    }

    @Test func bareSchemeWritesTheTokenAlone() throws {
        let folder = try TemporaryDirectory()
        try outputs(in: folder, scheme: "").write(sampleGrant, apiKey: "key-1")
        #expect(folder.read("run/headers") == "x-api-key: key-1\nAuthorization: aaa.bbb.ccc\n")
    }

    @Test func tenantIdIsLeftOutWhenAbsent() throws {
        var grant = sampleGrant
        grant.tenantId = nil
        let text = String(decoding: TokenOutputs.jsonDocument(grant), as: UTF8.self)
        #expect(!text.contains("tenantId"))
    }

    @Test func removeDeletesEveryFile() throws {
        let folder = try TemporaryDirectory()
        let outputs = outputs(in: folder)
        try outputs.write(sampleGrant, apiKey: "k")
        try outputs.remove()
        #expect(folder.entries("run").isEmpty)
    }
}

@Suite struct StateStoreTests {
    let identity = StateStore.identity(baseURL: "https://x.example", email: "e@x", apiKey: "k-1")

    @Test func roundTripsAPrivateStateFile() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state/state.json"))
        try store.save(sampleGrant, identity: identity)
        #expect(folder.mode("state/state.json") == 0o600)
        #expect(folder.mode("state") == 0o700)
        #expect(try store.load(identity: identity) == sampleGrant)
    }

    @Test func refusesAnotherAccountsToken() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state.json"))
        try store.save(sampleGrant, identity: identity)
        #expect(throws: StateStore.LoadProblem.otherAccount) {
            try store.load(identity: StateStore.identity(baseURL: "https://x.example", email: "other@x", apiKey: "k-1"))
        }
    }

    /// A rotated API key must not reuse the old key's token: the key (hashed) is part of the identity,
    /// and the state file never holds the key itself.
    @Test func aRotatedAPIKeyDoesNotReuseTheOldKeysToken() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state.json"))
        try store.save(sampleGrant, identity: identity)
        #expect(throws: StateStore.LoadProblem.otherAccount) {
            try store.load(identity: StateStore.identity(baseURL: "https://x.example", email: "e@x", apiKey: "k-2"))
        }
        #expect(folder.read("state.json")?.contains("k-1") == false)
    }

    @Test func reportsMissingAndCorruptState() throws {
        let folder = try TemporaryDirectory()
        #expect(throws: StateStore.LoadProblem.missing) {
            try StateStore(path: folder.file("none")).load(identity: identity)
        }
        let corrupt = try folder.write("state.json", "{\"version\":1,")
        #expect(throws: StateStore.LoadProblem.self) { try StateStore(path: corrupt).load(identity: identity) }
    }

    @Test func refusesAStoredTokenThatCouldInjectAHeader() throws {
        let folder = try TemporaryDirectory()
        var bad = sampleGrant
        bad.token = "abc\nX-Evil: 1"
        let store = StateStore(path: folder.file("state.json"))
        try store.save(bad, identity: identity)
        #expect(throws: StateStore.LoadProblem.self) { try store.load(identity: identity) }
    }
}

@Suite struct StatusLineTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000 + 13 * 60)

    @Test func healthy() {
        let line = StatusLine.describe(
            token: sampleGrant,
            nextLogin: Date(timeIntervalSince1970: 1_800_002_890),
            lastError: nil,
            writeError: nil,
            now: now
        )
        #expect(line == "token valid until 09:00:00Z (47m left), next refresh 08:48:10Z")
    }

    @Test func failingWithAValidToken() {
        let line = StatusLine.describe(
            token: sampleGrant,
            nextLogin: now.addingTimeInterval(12),
            lastError: .httpStatus(503, retryAfter: nil),
            writeError: nil,
            now: now
        )
        #expect(line == "auth server unavailable (HTTP 503), retry in 12s; token still valid 47m")
    }

    @Test func failingWithoutAToken() {
        let line = StatusLine.describe(
            token: nil,
            nextLogin: now.addingTimeInterval(4),
            lastError: .transport("connection refused"),
            writeError: nil,
            now: now
        )
        #expect(line == "no token; auth server unreachable (connection refused), retry in 4s")
    }

    @Test func startingAndWriteFailures() {
        #expect(
            StatusLine.describe(token: nil, nextLogin: nil, lastError: nil, writeError: nil, now: now) == "logging in"
        )
        let line = StatusLine.describe(
            token: sampleGrant,
            nextLogin: nil,
            lastError: nil,
            writeError: "write /run/t: No space left on device",
            now: now
        )
        #expect(
            line
                == "token valid until 09:00:00Z (47m left), refreshing; writing outputs failed: write /run/t: No space left on device"
        )
    }

    @Test func expired() {
        let line = StatusLine.describe(
            token: sampleGrant,
            nextLogin: nil,
            lastError: nil,
            writeError: nil,
            now: now.addingTimeInterval(3600)
        )
        #expect(line == "token expired at 09:00:00Z, files removed")
    }
}
