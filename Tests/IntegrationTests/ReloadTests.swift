import Foundation
import Glibc
import MockFTS
import TestSupport
import Testing

/// SIGHUP on the real binary: each kind of `ConfigChange` and the defects the core fixed. The
/// decisions themselves are tested in `DaemonCoreReloadTests`; these prove the wiring.
@Suite struct ReloadTests {
    /// The `/healthz` document, parsed.
    static func health(_ harness: DaemonHarness) async throws -> [String: Any] {
        let answer = try await Command.curl("/healthz", socket: harness.socketPath)
        return try JSONSerialization.jsonObject(with: Data(answer.body.utf8)) as? [String: Any] ?? [:]
    }

    @Test func aBrokenReloadWhileTheFirstLoginFailsSendsNoReady() async throws {
        // Regression (issue 12): READY=1 went out with no token on disk.
        let harness = try await DaemonHarness(ttl: 600)
        harness.mock.always(.status(503))
        let child = try harness.start()
        #expect(await harness.notify.waitFor { $0.contains("auth server unavailable") } != nil)
        try harness.folder.write("config.json", "{ broken")
        child.signal(SIGHUP)
        #expect(await harness.notify.waitFor { $0.contains("reload failed") } != nil)
        #expect(!harness.notify.received.contains { $0.text.contains("READY=1") })
        #expect(harness.token == nil)

        // The first token, when it comes, brings READY=1, with the file already there.
        harness.mock.always(nil)
        try harness.writeConfig()
        child.signal(SIGHUP)
        let ready = await harness.waitUntilReady(timeout: 60)
        #expect(ready != nil)
        let readyAt = try #require(harness.notify.received.first { $0.text.contains("READY=1") }?.time)
        #expect(harness.token.map(harness.mock.accepts) == true)
        #expect(harness.folder.modificationDate("run/token").map { $0 <= readyAt } == true)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func healthzFollowsSigusr1AndAReloadAtOnce() async throws {
        // Regression (issue 12): reload and SIGUSR1 left /healthz's nextRefreshAt stale.
        // The login's budget is far above the mock's delay: with the default 5 s, a loaded machine
        // timed the 4 s answer out (seen in CI), and the retry was in flight during the reload.
        let answerDelay = 4.0
        let harness = try await DaemonHarness(
            ttl: 600,
            refresh: .init(loginTimeoutSeconds: 120),
            socket: ""
        )
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try await Self.health(harness)
        #expect(first["nextRefreshAt"] as? String != nil)

        // A login in flight has no next refresh. Once the mock holds the request, the login is in
        // flight until at least `answerDelay` after the signal: reads that begin in between must see
        // it. (If the machine stalls past that window before one can begin, nothing can be judged.)
        harness.mock.enqueue(MockFault(delaySeconds: answerDelay))
        let signalled = Date()
        child.signal(SIGUSR1)
        #expect(await eventually(timeout: 120) { harness.mock.stats.loginRequests == 2 })
        let windowEnd = signalled.addingTimeInterval(answerDelay)
        var inFlight = false
        var judged = false
        while !inFlight, Date() < windowEnd {
            judged = true
            inFlight = try await Self.health(harness)["nextRefreshAt"] == nil
            if !inFlight { try await Task.sleep(for: .milliseconds(10)) }
        }
        #expect(inFlight || !judged, "no read within \(answerDelay) s of SIGUSR1 saw the login in flight")
        #expect(await eventually(timeout: 120) { harness.mock.stats.tokensIssued == 2 })

        // A new policy moves the refresh, and /healthz says so without waiting for another event.
        // The new token is adopted once /healthz carries its fingerprint; then it is the only login
        // (no error, no retry) and its refresh is scheduled.
        let firstFingerprint = try #require(first["tokenFingerprint"] as? String)
        var adopted: [String: Any] = [:]
        let adoptionDeadline = Date().addingTimeInterval(120)
        while Date() < adoptionDeadline {
            adopted = try await Self.health(harness)
            if let fingerprint = adopted["tokenFingerprint"] as? String, fingerprint != firstFingerprint,
                adopted["nextRefreshAt"] != nil
            {
                break
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(adopted["lastError"] == nil)
        #expect(harness.mock.stats.loginRequests == 2)
        let scheduledAgain = try #require(adopted["nextRefreshAt"] as? String)
        harness.refresh.refreshAt = 0.5
        try harness.writeConfig()
        // The listener keeps what it received: without this the start's READY=1 answers at once,
        // before the reload (seen in CI: the health read was the old one).
        harness.notify.reset()
        child.signal(SIGHUP)
        #expect(await harness.notify.waitFor { $0.contains("READY=1") && !$0.contains("reload failed") } != nil)
        let after = try #require(try await Self.health(harness)["nextRefreshAt"] as? String)
        #expect(after < scheduledAgain, "refreshAt 0.8 → 0.5 moves the refresh earlier: \(scheduledAgain) → \(after)")
        await harness.stop()
    }

    @Test func aReloadAppliesTheSocketsAllowListsAndModeLive() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: #""allowUIDs": [0, 65533]"#)
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        // Let uid 65533 (group 65534) reach the socket file, so that only the peer check can refuse it.
        chmod(harness.folder.path, 0o711)
        chown(harness.folder.file("run"), 0, 65534)
        chown(harness.socketPath, 0, 65534)
        #expect(try await Command.curl("/token", socket: harness.socketPath, as: (65533, 65534)).status == 200)

        harness.socket = #"{ "path": "\#(harness.socketPath)", "allowUIDs": [0], "mode": "0600" }"#
        try harness.writeConfig()
        harness.notify.reset()
        child.signal(SIGHUP)
        #expect(await harness.notify.waitFor { $0.contains("READY=1") } != nil)
        #expect(harness.child?.standardError.contains("changed=socket_access") == true)
        #expect(harness.folder.mode("run/tokend.sock") == 0o600)
        // The socket file lets group 65534 in again: only the allow list refuses it now.
        chmod(harness.socketPath, 0o660)
        let removed = try await Command.curl("/token", socket: harness.socketPath, as: (65533, 65534))
        #expect(removed.status == 403)
        #expect(!removed.body.contains("eyJ"))
        #expect(try await Command.curl("/token", socket: harness.socketPath).status == 200, "uid 0 is still listed")
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    /// The attack: between the start and a reload that changes the socket's mode, its file is moved
    /// away and another file put at its path. The reload changes the mode of a socket only, never of
    /// the file put there, and its READY=1 says in STATUS (and `/healthz` degraded) what was not
    /// applied; at the stop the daemon removes only its own socket file.
    @Test func aSocketPathSwappedForAnotherFileIsNotChmodedByAReload() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let moved = harness.folder.file("run/moved.sock")
        #expect(rename(harness.socketPath, moved) == 0)
        try harness.folder.write("run/tokend.sock", "planted\n", mode: 0o644)

        harness.socket = #"{ "path": "\#(harness.socketPath)", "mode": "0600" }"#
        try harness.writeConfig()
        harness.notify.reset()
        child.signal(SIGHUP)
        let ready = try #require(await harness.notify.waitFor(timeout: 60) { $0.contains("READY=1") })
        #expect(
            ready.contains("reload applied, except the socket's mode (\(harness.socketPath) is no longer a socket)"),
            "\(ready)"
        )
        #expect(harness.folder.mode("run/tokend.sock") == 0o644, "the planted file's mode is untouched")
        #expect(child.standardError.contains("event=reload_failed"))
        // The daemon still serves on its socket, wherever it was moved, and says it is degraded.
        let health =
            try JSONSerialization.jsonObject(
                with: Data(try await Command.curl("/healthz", socket: moved).body.utf8)
            ) as? [String: Any]
        #expect(health?["status"] as? String == "degraded")
        #expect((health?["lastError"] as? String)?.hasPrefix("reload applied, except the socket's mode") == true)

        child.signal(SIGTERM)
        #expect(await child.waitForExit(timeout: 60) == 0)
        #expect(harness.folder.read("run/tokend.sock") == "planted\n", "only its own socket file is removed")
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func aLowerConnectionLimitTakesEffectOnTheNextConnection() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        harness.socket = #"{ "path": "\#(harness.socketPath)", "maxConnections": 2 }"#
        try harness.writeConfig()
        harness.notify.reset()
        child.signal(SIGHUP)
        #expect(await harness.notify.waitFor { $0.contains("READY=1") } != nil)
        let idle = try (0..<3).map { _ in try UnixSocketClient(socket: harness.socketPath) }
        // The third connection took the place of the first: the limit is 2.
        #expect(await eventually { (try? UnixSocketClient.status(of: "/metrics", socket: harness.socketPath)) == 200 })
        let metrics = try await Command.curl("/metrics", socket: harness.socketPath)
        #expect(metrics.body.contains(#"fts_tokend_socket_connections_dropped_total{reason="evicted"}"#))
        withExtendedLifetime(idle) {}
        await harness.stop()
    }

    @Test func movedAndDroppedOutputsLeaveNoTokenOrKeyBehind() async throws {
        let harness = try await DaemonHarness(ttl: 600)
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let token = try #require(harness.token)
        #expect(harness.folder.read("run/headers")?.contains(harness.apiKey) == true)

        harness.outputFiles = #""tokenFile": { "path": "{folder}/run/moved/token", "mode": "0640" }"#
        try harness.writeConfig()
        harness.notify.reset()
        child.signal(SIGHUP)
        #expect(await harness.notify.waitFor { $0.contains("READY=1") } != nil)
        #expect(await eventually { harness.folder.read("run/moved/token") == token })
        #expect(harness.folder.read("run/token") == nil)
        #expect(harness.folder.read("run/token.json") == nil)
        #expect(harness.folder.read("run/headers") == nil, "the headers file held the API key")
        #expect(harness.mock.stats.tokensIssued == 1, "moving files needs no login")
        harness.expectNoSecretsInOutput(alsoHolding: ["run/moved/token"])
        await harness.stop()
    }

    @Test func aRotatedAPIKeyLogsInAtOnceAndReplacesTheHeaders() async throws {
        let harness = try await DaemonHarness(ttl: 600)
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        let newKey = UUID().uuidString.lowercased()
        harness.mock.update { $0.apiKey = newKey }
        try harness.folder.write("secrets/api-key", newKey + "\n")
        child.signal(SIGHUP)
        #expect(await eventually { harness.token != first && harness.token.map(harness.mock.accepts) == true })
        #expect(await eventually { harness.folder.read("run/headers")?.contains("x-api-key: \(newKey)\n") == true })
        #expect(harness.child?.standardError.contains("account_changed=true") == true)
        #expect(harness.mock.stats.tokensIssued == 2)
        await harness.stop()
    }

    @Test func anAddedOutputIsWrittenWithTheCurrentToken() async throws {
        let harness = try await DaemonHarness(ttl: 600)
        harness.outputFiles = #""tokenFile": { "path": "{folder}/run/token", "mode": "0640" }"#
        try harness.writeConfig()
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        #expect(harness.folder.read("run/token.json") == nil)
        harness.outputFiles += #", "jsonFile": { "path": "{folder}/run/token.json", "mode": "0600" }"#
        try harness.writeConfig()
        child.signal(SIGHUP)
        #expect(await eventually { harness.folder.read("run/token.json")?.contains(harness.token ?? "-") == true })
        #expect(harness.folder.mode("run/token.json") == 0o600)
        #expect(harness.mock.stats.tokensIssued == 1)
        await harness.stop()
    }

    /// `/headers` carries the API key: served only with a headers file or when the socket asks.
    @Test func headersAreServedOnlyWhereConfiguredAndAReloadCanTurnThemOn() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        harness.outputFiles = #""tokenFile": { "path": "{folder}/run/token", "mode": "0640" }"#
        try harness.writeConfig()
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let refused = try await Command.curl("/headers", socket: harness.socketPath)
        #expect(refused.status == 404)
        #expect(!refused.body.contains(harness.apiKey))
        #expect(try await Command.curl("/headers?wait=30&after=x", socket: harness.socketPath).status == 404)

        harness.socket = #"{ "path": "\#(harness.socketPath)", "serveHeaders": true }"#
        try harness.writeConfig()
        harness.notify.reset()
        child.signal(SIGHUP)
        #expect(await harness.notify.waitFor { $0.contains("READY=1") } != nil)
        let served = try await Command.curl("/headers", socket: harness.socketPath)
        #expect(served.status == 200)
        #expect(served.body.contains("x-api-key: \(harness.apiKey)"))
        await harness.stop()
    }

    @Test func aMovedSocketIsRefusedLoudlyAndTheOldOneKeepsServing() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let moved = harness.folder.file("run/other.sock")
        harness.socket = #"{ "path": "\#(moved)" }"#
        harness.outputFiles = #""tokenFile": { "path": "{folder}/run/token", "mode": "0640" }"#
        try harness.writeConfig()
        harness.notify.reset()
        child.signal(SIGHUP)
        let status = await harness.notify.waitFor { $0.contains("READY=1") }
        #expect(status?.contains("needs a restart") == true)
        #expect(harness.child?.standardError.contains("needs_restart=true") == true)
        #expect(try await Command.curl("/token", socket: harness.socketPath).status == 200)
        #expect(access(moved, F_OK) != 0)
        // The whole reload was refused: the headers file is still configured and still there.
        #expect(harness.folder.read("run/headers") != nil)
        let health = try await Self.health(harness)
        #expect(health["status"] as? String == "degraded")
        #expect((health["lastError"] as? String)?.contains("needs a restart") == true)
        await harness.stop()
    }
}
