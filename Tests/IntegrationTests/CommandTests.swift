import Foundation
import MockFTS
import TestSupport
import Testing
import TokenDaemon

@Suite struct CommandTests {
    @Test func checkValidatesAndLogsInWithoutPrintingTheToken() async throws {
        let harness = try await DaemonHarness()
        let check = try harness.start(["check", "--config", harness.configPath, "--login"])
        #expect(await check.waitForExit(timeout: 30) == 0)
        #expect(check.standardOutput.contains("configuration OK"))
        #expect(check.standardOutput.contains("login OK: token "))
        #expect(harness.mock.stats.tokensIssued == 1)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func aWorldReadableTokenFileIsAWarningNotAnError() async throws {
        let harness = try await DaemonHarness()
        harness.outputFiles = #""headersFile": { "path": "{folder}/run/headers", "mode": "0644" }"#
        try harness.writeConfig()
        let check = try harness.start(["check", "--config", harness.configPath])
        #expect(await check.waitForExit(timeout: 30) == 0)
        #expect(
            check.standardOutput.contains(
                "warning: outputs.headersFile.mode 0644 lets every local user read the token and the API key"
            )
        )
        let daemon = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        #expect(daemon.standardError.contains("event=config_warning"))
        await harness.stop()
    }

    @Test func checkReportsRejectedCredentialsWith78() async throws {
        let harness = try await DaemonHarness()
        harness.mock.always(.status(403))
        let check = try harness.start(["check", "--config", harness.configPath, "--login"])
        #expect(await check.waitForExit(timeout: 30) == 78)
        #expect(check.standardError.contains("HTTP 403"))
        await harness.stop()
    }

    /// An operator sees the configuration in force, defaults filled in, and which secret is which
    /// by fingerprint; the secrets themselves never appear.
    @Test func checkShowPrintsTheConfigurationInForceWithSecretsAsFingerprints() async throws {
        let harness = try await DaemonHarness()
        let check = try harness.start(["check", "--config", harness.configPath, "--show"])
        #expect(await check.waitForExit(timeout: 30) == 0)
        let output = check.standardOutput
        #expect(output.contains(#""minForcedRefreshSeconds" : 30"#), "a default filled in")
        #expect(output.contains(#""passwordFile" : "\#(harness.folder.file("secrets/password"))""#))
        #expect(output.contains(#""email" : "sha256:\#(Fingerprint.of("svc@example.com"))""#))
        #expect(output.contains("api.password  sha256:\(Fingerprint.of(harness.password))  from file "))
        #expect(output.contains("api.apiKey    sha256:\(Fingerprint.of(harness.apiKey))  from file "))
        #expect(!output.contains("svc@example.com"))
        #expect(harness.mock.stats.loginRequests == 0)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func checkWithoutLoginMakesNoRequest() async throws {
        let harness = try await DaemonHarness()
        let check = try harness.start(["check", "--config", harness.configPath])
        #expect(await check.waitForExit(timeout: 30) == 0)
        #expect(harness.mock.stats.loginRequests == 0)
        await harness.stop()
    }

    @Test func versionPrintsTheVersion() async throws {
        let harness = try await DaemonHarness()
        let version = try harness.start(["--version"])
        #expect(await version.waitForExit(timeout: 30) == 0)
        #expect(version.standardOutput.hasPrefix("0."))
        await harness.stop()
    }

    @Test func theDemoRotatesTokensAndProvesThem() async throws {
        let harness = try await DaemonHarness()
        // 20 s tokens; the cold-start spread may still put one scheduled refresh within the run
        // (seen in CI), so the forced login is counted by the demo around its proxy call. Round 2
        // (the revocation) starts 6 s in: 12 s leave it 6 s on a loaded machine.
        let demo = try harness.start(["demo", "--duration", "12", "--ttl", "20"])
        #expect(await demo.waitForExit(timeout: 60) == 0)
        let output = demo.standardOutput
        #expect(output.contains("time       consumer  what it did\n"), "\(output)")
        #expect(output.contains("  files     read run/token: "), "\(output)")
        #expect(output.contains("; whoami -> HTTP 200\n"), "\(output)")
        #expect(output.contains("  socket    GET /token: "), "\(output)")
        #expect(output.contains("/healthz: ok, next refresh "), "\(output)")
        #expect(output.contains("  proxy     GET /api/whoami with no credentials -> HTTP 200\n"), "\(output)")
        #expect(output.contains("  longpoll  first token "), "\(output)")
        #expect(
            output.contains(
                "  proxy     GET /api/whoami with no credentials -> HTTP 200 (the 401 reported and replayed: 1 forced login)\n"
            ),
            "\(output)"
        )
        // The forced login's token reaches the long poll as it lands.
        #expect(output.contains("  longpoll  new token "), "\(output)")
        #expect(!output.contains("-> HTTP 401"), "\(output)")
        #expect(output.contains("demo finished: "), "\(output)")
        #expect(!demo.standardError.contains(" error "), "\(demo.standardError)")
        // The temporary folder it printed is gone.
        let folder = output.split(separator: "\n").first { $0.hasPrefix("  token files") }?.split(separator: " ").first(
            where: { $0.hasPrefix("/") })
        let path = String(try #require(folder)).replacingOccurrences(of: "/run/", with: "")
        #expect(!FileManager.default.fileExists(atPath: path))
        await harness.stop()
    }

    @Test func mockServerRefusesNonLoopbackAddresses() async throws {
        let harness = try await DaemonHarness()
        let mock = try harness.start(["mock-server", "--listen", "0.0.0.0:0"])
        #expect(await mock.waitForExit(timeout: 30) == 64)
        #expect(mock.standardError.contains("loopback"))
        await harness.stop()
    }

    @Test func mockServerWantsACertificateAndAKeyTogether() async throws {
        let harness = try await DaemonHarness()
        let mock = try harness.start([
            "mock-server", "--listen", "127.0.0.1:0", "--tls-certificate", harness.folder.file("server.pem"),
        ])
        #expect(await mock.waitForExit(timeout: 30) == 64)
        #expect(mock.standardError.contains("--tls-certificate and --tls-key go together"))
        await harness.stop()
    }
}
