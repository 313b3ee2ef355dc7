import Foundation
import MockFTS
import TestSupport
import Testing
import TokenDaemon

/// Rejected-token reports (`POST /token/invalidate`, README "Socket API") against the real daemon:
/// a consumer whose token the API refused before its expiry gets the next one with one login, and
/// no consumer can make the daemon log in more often than `refresh.minForcedRefreshSeconds`.
@Suite struct RejectedTokenTests {
    /// `POST /token/invalidate` naming `fingerprint` in the header.
    static func report(
        _ fingerprint: String,
        socket: String,
        extra: [String] = []
    ) async throws -> (
        status: Int, body: String, headers: String
    ) {
        try await Command.curl(
            "/token/invalidate",
            socket: socket,
            extra: ["-X", "POST", "-H", "X-Token-Fingerprint: \(fingerprint)"] + extra
        )
    }

    @Test func aReportOfTheCurrentTokenBringsTheNextWithOneLoginThenTheFloorHolds() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        let rejected = Fingerprint.of(first)

        let accepted = try await Self.report(rejected, socket: harness.socketPath)
        #expect(accepted.status == 202)
        #expect(accepted.body.contains(#""status":"accepted""#))
        // The consumer long-polls for a token other than the rejected one.
        let next = try await Command.curl("/token?wait=30&after=\(rejected)", socket: harness.socketPath)
        #expect(next.status == 200)
        #expect(Fingerprint.of(next.body) != Fingerprint.of(first) && harness.mock.accepts(next.body))
        #expect(harness.mock.stats.loginRequests == 2)
        #expect(await eventually { harness.token == next.body }, "the files follow")
        #expect(
            await eventually { child.standardError.contains("token reported rejected by the API, logging in now") }
        )
        #expect(child.standardError.contains("uid=\(geteuid())"))

        // The new token reported at once: within the floor, no second login.
        let current = Fingerprint.of(next.body)
        let limited = try await Self.report(current, socket: harness.socketPath)
        #expect(limited.status == 429)
        #expect(limited.headers.contains("Retry-After: "))
        // The old token reported again: stale, the answer names the current one.
        let stale = try await Self.report(rejected, socket: harness.socketPath)
        #expect(stale.status == 409)
        #expect(stale.body.contains(#""current":"\#(current)""#))
        #expect(stale.headers.contains("X-Token-Fingerprint: \(current)"))
        #expect(harness.mock.stats.loginRequests == 2)

        let metrics = try await Command.curl("/metrics", socket: harness.socketPath)
        #expect(metrics.body.contains(#"fts_tokend_forced_refresh_total{outcome="accepted"} 1"#))
        #expect(metrics.body.contains(#"fts_tokend_forced_refresh_total{outcome="rate_limited"} 1"#))
        #expect(metrics.body.contains(#"fts_tokend_forced_refresh_total{outcome="stale"} 1"#))
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    /// The way a fleet of consumers sees a revocation: every one of them reports at once. One login.
    @Test func aHundredConcurrentReportsMakeOneLogin() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        let rejected = Fingerprint.of(first)
        let answers = try await UnixSocketClient.concurrentRequests(
            "POST /token/invalidate HTTP/1.1\r\nHost: localhost\r\nX-Token-Fingerprint: \(rejected)\r\n"
                + "Content-Length: 0\r\nConnection: close\r\n\r\n",
            count: 100,
            socket: harness.socketPath
        )
        let statuses = Dictionary(grouping: answers.map(\.status), by: { $0 }).mapValues(\.count)
        // 202 while the login is due or in flight; 409 (read again) once the new token is current.
        #expect(Set(statuses.keys).isSubset(of: [202, 409]), "statuses: \(statuses)")
        #expect((statuses[202] ?? 0) >= 1)
        #expect(await eventually { harness.token != first })
        #expect(harness.mock.stats.loginRequests == 2)
        Scenario.report(
            harness.mock.stats.loginRequests == 2,
            "100 concurrent reports of one rejected token: answers \(statuses.sorted { $0.key < $1.key }), "
                + "\(harness.mock.stats.loginRequests - 1) forced login"
        )
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func theFingerprintMayComeInTheQueryOrTheBodyAndAnythingElseIsRefused() async throws {
        var refresh = DaemonHarness.Refresh()
        refresh.minForcedRefreshSeconds = 1
        let harness = try await DaemonHarness(ttl: 600, refresh: refresh, socket: "")
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let socket = harness.socketPath
        let first = try #require(harness.token)

        let byQuery = try await Command.curl(
            "/token/invalidate?fingerprint=\(Fingerprint.of(first).uppercased())",
            socket: socket,
            extra: ["-X", "POST"]
        )
        #expect(byQuery.status == 202)
        let second = try await Command.curl("/token?wait=30&after=\(Fingerprint.of(first))", socket: socket).body
        #expect(second != first)
        // After the (1 s) floor, by the body.
        try await Task.sleep(for: .milliseconds(1100))
        let byBody = try await Command.curl(
            "/token/invalidate",
            socket: socket,
            extra: ["--data-binary", Fingerprint.of(second) + "\n"]
        )
        #expect(byBody.status == 202)
        #expect(try await Command.curl("/token?wait=30&after=\(Fingerprint.of(second))", socket: socket).status == 200)
        #expect(harness.mock.stats.loginRequests == 3)

        let noName = try await Command.curl("/token/invalidate", socket: socket, extra: ["-X", "POST"])
        #expect(noName.status == 400)
        #expect(noName.body.contains("8 hex characters"))
        #expect(try await Self.report("not-a-fp", socket: socket).status == 400)
        #expect(try await Command.curl("/token/invalidate", socket: socket).status == 405)
        let huge = try await Command.curl(
            "/token/invalidate",
            socket: socket,
            extra: ["--data-binary", String(repeating: "a", count: 4096)]
        )
        #expect(huge.status == 413)
        #expect(harness.mock.stats.loginRequests == 3)
        await harness.stop()
    }

    /// A peer that may not read the token may not make the daemon log in either.
    @Test(.enabled(if: geteuid() == 0)) func aPeerOutsideTheAllowListsCannotForceALogin() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: #""allowUIDs": [0]"#)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        // Let uid/gid 65534 reach the socket file, so that only the peer check can refuse it.
        chmod(harness.folder.path, 0o711)
        chown(harness.folder.file("run"), 0, 65534)
        chown(harness.socketPath, 0, 65534)
        let first = try #require(harness.token)
        let refused = try await Command.curl(
            "/token/invalidate",
            socket: harness.socketPath,
            as: (uid: 65534, gid: 65534),
            extra: ["-X", "POST", "-H", "X-Token-Fingerprint: \(Fingerprint.of(first))"]
        )
        #expect(refused.status == 403)
        #expect(harness.mock.stats.loginRequests == 1)
        #expect(harness.token == first)
        await harness.stop()
    }

    @Test func theTokenCommandReportsWaitsAndPrintsTheNextToken() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        let command = try harness.start(
            ["token", "--socket", harness.socketPath, "--rejected", Fingerprint.of(first), "--timeout", "30"]
        )
        #expect(await command.waitForExit() == 0)
        let printed = command.standardOutput.trimmingCharacters(in: .newlines)
        #expect(printed != first && harness.mock.accepts(printed))
        #expect(harness.mock.stats.loginRequests == 2)
        let bad = try harness.start(["token", "--socket", harness.socketPath, "--rejected", "xyz"])
        #expect(await bad.waitForExit() != 0)
        #expect(bad.standardError.contains("8 hex characters"))
        await harness.stop()
    }

    /// The whole story with the mock's API: the server revokes the token before its expiry, the
    /// consumer's call gets 401, it reports, and its next call (with the next token) succeeds.
    @Test func aTokenRevokedServerSideRecoversWithOneReport() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let whoami = { () async throws -> Int in
            let result = try await Command.run(
                "/usr/bin/curl",
                [
                    "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "@" + harness.folder.file("run/headers"),
                    "http://127.0.0.1:\(harness.port)/api/whoami",
                ]
            )
            return Int(result.output) ?? 0
        }
        #expect(try await whoami() == 200)
        let first = try #require(harness.token)
        #expect(harness.mock.revokeAll() == 1)
        #expect(try await whoami() == 401)
        #expect(try await Self.report(Fingerprint.of(first), socket: harness.socketPath).status == 202)
        #expect(
            await eventually { harness.token != first && harness.folder.read("run/headers")?.contains(first) == false }
        )
        #expect(try await whoami() == 200)
        #expect(
            harness.mock.stats.loginRequests == 2,
            "stderr: \(harness.child?.standardError.suffix(1500) ?? "")"
        )
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }
}
