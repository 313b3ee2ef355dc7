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
        let outcome = outputs(in: folder).write(sampleGrant, apiKey: "key-1")
        #expect(outcome == .init(written: ["run/token", "run/token.json", "run/headers"].map(folder.file)))
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

    /// `/healthz` reports each file on its own: the outcome says which were written before the one
    /// that failed, and that the files after it were not tried.
    @Test func aFailedFileIsNamedAndTheFilesAfterItAreNotTried() throws {
        let folder = try TemporaryDirectory()
        // The JSON file's folder is a regular file: its write fails with ENOTDIR.
        _ = try folder.write("run/token.json.d", "not a folder")
        var outputs = outputs(in: folder)
        outputs.outputs.jsonFile = .init(path: folder.file("run/token.json.d/token.json"), mode: 0o600)
        let outcome = outputs.write(sampleGrant, apiKey: "k")
        #expect(outcome.written == [folder.file("run/token")])
        #expect(outcome.failure?.path == folder.file("run/token.json.d/token.json"))
        #expect(outcome.failure?.error.contains("token.json.d") == true, "\(outcome)")
        #expect(folder.read("run/headers") == nil)
    }

    @Test func bareSchemeWritesTheTokenAlone() throws {
        let folder = try TemporaryDirectory()
        #expect(outputs(in: folder, scheme: "").write(sampleGrant, apiKey: "key-1").failure == nil)
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
        #expect(outputs.write(sampleGrant, apiKey: "k").failure == nil)
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
        #expect(try store.load(identity: identity, now: sampleGrant.obtainedAt) == sampleGrant)
    }

    @Test func refusesAnotherAccountsToken() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state.json"))
        try store.save(sampleGrant, identity: identity)
        #expect(throws: StateStore.LoadProblem.otherAccount) {
            try store.load(
                identity: StateStore.identity(baseURL: "https://x.example", email: "other@x", apiKey: "k-1"),
                now: sampleGrant.obtainedAt
            )
        }
    }

    /// A rotated API key must not reuse the old key's token: the key (hashed) is part of the identity,
    /// and the state file never holds the key itself.
    @Test func aRotatedAPIKeyDoesNotReuseTheOldKeysToken() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state.json"))
        try store.save(sampleGrant, identity: identity)
        #expect(throws: StateStore.LoadProblem.otherAccount) {
            try store.load(
                identity: StateStore.identity(baseURL: "https://x.example", email: "e@x", apiKey: "k-2"),
                now: sampleGrant.obtainedAt
            )
        }
        #expect(folder.read("state.json")?.contains("k-1") == false)
    }

    @Test func reportsMissingAndCorruptState() throws {
        let folder = try TemporaryDirectory()
        #expect(throws: StateStore.LoadProblem.missing) {
            try StateStore(path: folder.file("none")).load(identity: identity, now: sampleGrant.obtainedAt)
        }
        let corrupt = try folder.write("state.json", "{\"version\":1,")
        #expect(throws: StateStore.LoadProblem.self) {
            try StateStore(path: corrupt).load(identity: identity, now: sampleGrant.obtainedAt)
        }
    }

    /// The attack on a stored token: whoever can edit the state file pushes the expiry out (or
    /// plants a forged token with a far one) so that a restarted daemon keeps handing it out.
    @Test func aStoredExpiryLaterThanTheJWTsExpIsNotBelieved() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state.json"))
        var grant = sampleGrant
        grant.token = jwt(exp: sampleGrant.expiresAt.timeIntervalSince1970)
        try store.save(grant, identity: identity)
        #expect(try store.load(identity: identity, now: grant.obtainedAt) == grant)
        // The same token with its expiry pushed a day later (the lifetime record raised to match).
        try edit(folder.file("state.json")) { document in
            var grantObject = document["grant"] as! [String: Any]
            grantObject["expiresAt"] = (grantObject["expiresAt"] as! Double) + 86_400
            document["grant"] = grantObject
            document["longestLifetimeSeconds"] = 90_000.0
        }
        do {
            _ = try store.load(identity: identity, now: grant.obtainedAt)
            Issue.record("expected an error")
        } catch {
            #expect(error.description.contains("stored token is implausible (its expiry"))
            #expect(error.description.contains("is later than the JWT's exp"))
        }
    }

    @Test func aStoredLifetimeLongerThanEverGrantedIsNotBelieved() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state.json"))
        // Granted 2 h once, then 1 h: the record keeps the longest.
        var long = sampleGrant
        long.expiresAt = sampleGrant.obtainedAt.addingTimeInterval(7200)
        try store.save(long, identity: identity)
        try store.save(sampleGrant, identity: identity)
        #expect(folder.read("state.json")?.contains("\"longestLifetimeSeconds\":7200") == true)
        // A token (not a JWT) whose stored expiry was pushed to 30 days.
        try edit(folder.file("state.json")) { document in
            var grantObject = document["grant"] as! [String: Any]
            grantObject["expiresAt"] = sampleGrant.obtainedAt.timeIntervalSince1970 + 30 * 86_400
            document["grant"] = grantObject
        }
        do {
            _ = try store.load(identity: identity, now: sampleGrant.obtainedAt)
            Issue.record("expected an error")
        } catch {
            #expect(error.description.contains("a lifetime of 2592000 s, longer than the 7200 s"))
        }
    }

    @Test func aStoredTokenReceivedInTheFutureIsNotBelieved() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state.json"))
        try store.save(sampleGrant, identity: identity)
        let hourEarlier = sampleGrant.obtainedAt.addingTimeInterval(-3600)
        #expect(throws: StateStore.LoadProblem.self) { try store.load(identity: identity, now: hourEarlier) }
        // Within a minute (a small clock step back since saving) it is believed.
        #expect(try store.load(identity: identity, now: sampleGrant.obtainedAt.addingTimeInterval(-30)) == sampleGrant)
    }

    /// Files from before the lifetime record: the stored token's own lifetime stands in (no extra login).
    @Test func aStateFileWithoutTheLifetimeRecordStillLoads() throws {
        let folder = try TemporaryDirectory()
        let store = StateStore(path: folder.file("state.json"))
        try store.save(sampleGrant, identity: identity)
        try edit(folder.file("state.json")) { $0["longestLifetimeSeconds"] = nil }
        #expect(try store.load(identity: identity, now: sampleGrant.obtainedAt) == sampleGrant)
    }

    private func edit(_ path: String, _ change: (inout [String: Any]) -> Void) throws {
        var document =
            try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        change(&document)
        try JSONSerialization.data(withJSONObject: document).write(to: URL(fileURLWithPath: path))
    }

    @Test func refusesAStoredTokenThatCouldInjectAHeader() throws {
        let folder = try TemporaryDirectory()
        var bad = sampleGrant
        bad.token = "abc\nX-Evil: 1"
        let store = StateStore(path: folder.file("state.json"))
        try store.save(bad, identity: identity)
        #expect(throws: StateStore.LoadProblem.self) { try store.load(identity: identity, now: sampleGrant.obtainedAt) }
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
