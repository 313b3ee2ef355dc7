import ArgumentParser
import AsyncHTTPClient
import Glibc
import Logging
import MockFTS
import TokenDaemon

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "See it work: the mock auth server and the daemon in one process, tokens rotating.",
        discussion:
            "Writes the token files to a new temporary folder and serves the API proxy there; every few seconds calls the mock's /api/whoami through the proxy with no credentials at all and with the current token file, revokes every token server-side once to show the proxy recover with one forced login, and removes the folder on Ctrl-C."
    )

    @Option(help: "Stop after this many seconds (default: run until Ctrl-C).")
    var duration: Double?

    @Option(help: "Token lifetime the mock server hands out, in seconds.")
    var ttl: Double = 20

    func validate() throws {
        guard ttl >= 4 else { throw ValidationError("--ttl must be at least 4 seconds") }
        if let duration, duration <= 0 { throw ValidationError("--duration must be more than 0 seconds") }
    }

    func run() async throws {
        let logger = LogSetup.bootstrap(environment: [:])
        let mock = MockFTSServer(
            .init(apiKey: DemoAccount.apiKey, email: DemoAccount.email, password: DemoAccount.password, tokenTTL: ttl)
        )
        let port = try await mock.start()
        let folder = try Self.makeFolder()
        defer { Self.removeFolder(folder) }

        let configPath = try Self.writeFiles(in: folder, port: port, ttl: ttl)
        Console.out(
            """
            mock FTS auth server: http://127.0.0.1:\(port) (tokens live \(FormatTime.seconds(ttl)))
            token files:          \(folder)/run/  (token, token.json, headers)
            API proxy:            \(folder)/run/api.sock  (calls the API with the daemon's credentials)
            config:               \(configPath)
            Ctrl-C stops the demo and removes the folder.

            """
        )
        let loader = ConfigurationLoader(environment: [:])
        let daemon = Daemon(
            configPath: configPath,
            loaded: try loader.load(path: configPath),
            dependencies: .init(loader: loader, watchdogInterval: nil, version: FTSTokend.version),
            logger: logger
        )
        let checker = Task { await Self.proveTokens(folder: folder, port: port, mock: mock) }
        let stopper = Task {
            guard let duration else { return }
            try await Task.sleep(for: .milliseconds(Int(duration * 1000)))
            kill(getpid(), SIGTERM)
        }
        let status = await daemon.run()
        checker.cancel()
        stopper.cancel()
        await mock.stop()
        let stats = mock.stats
        Console.out(
            "\ndemo finished: \(stats.tokensIssued) tokens issued, \(stats.whoamiAccepted) whoami calls accepted, \(stats.whoamiRejected) rejected"
        )
        if status != ExitStatus.success { throw ExitCode(status) }
    }

    /// Every 3 s: call whoami through the proxy with no credentials, then with the token file as a
    /// consumer reading files would. At the second round every token is revoked server-side first:
    /// the proxy's call meets a 401, reports it, and is replayed with the token of one forced login.
    static func proveTokens(folder: String, port: Int, mock: MockFTSServer) async {
        let url = "http://127.0.0.1:\(port)/api/whoami"
        let proxied =
            "http+unix://"
            + (folder + "/run/api.sock").split(separator: "/", omittingEmptySubsequences: false).joined(
                separator: "%2F"
            ) + "/api/whoami"
        var round = 0
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(3))
            guard !Task.isCancelled else { return }
            round += 1
            let loginsBefore = mock.stats.loginRequests
            if round == 2 {
                Console.out(
                    "revoke: every token issued so far is refused by the API from now on (\(mock.revokeAll()) tokens)"
                )
            }
            let viaProxy =
                (try? await HTTPClient.shared.execute(HTTPClientRequest(url: proxied), timeout: .seconds(30)))?
                .status.code
            Console.out(
                "proxy: GET /api/whoami through api.sock, no credentials -> \(viaProxy.map { "HTTP \($0)" } ?? "no answer")"
            )
            if round == 2 {
                let forced = mock.stats.loginRequests - loginsBefore
                Console.out("proxy: recovered from the revocation with \(forced) forced login\(forced == 1 ? "" : "s")")
            }
            guard let token = try? SmallFile.read(folder + "/run/token", limit: 64 * 1024).bytes else {
                Console.out("check: no token file yet")
                continue
            }
            let text = String(decoding: token, as: UTF8.self)
            var request = HTTPClientRequest(url: url)
            request.headers.add(name: "x-api-key", value: DemoAccount.apiKey)
            request.headers.add(name: "Authorization", value: "Bearer " + text)
            let status = (try? await HTTPClient.shared.execute(request, timeout: .seconds(5)))?.status.code
            Console.out(
                "check: GET /api/whoami with token \(Fingerprint.of(text)) -> \(status.map { "HTTP \($0)" } ?? "no answer")"
            )
        }
    }

    static func makeFolder() throws -> String {
        var template = Array("/tmp/fts-tokend-demo-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw ValidationError("cannot create a temporary folder") }
        return String(cString: created)
    }

    /// Config and secret files for the demo account, each 0600.
    static func writeFiles(in folder: String, port: Int, ttl: Double) throws -> String {
        let config = """
            {
              "api": { "baseURL": "http://127.0.0.1:\(port)", "email": "\(DemoAccount.email)",
                       "passwordFile": "\(folder)/password", "apiKeyFile": "\(folder)/api-key", "timeoutSeconds": 5 },
              "refresh": { "refreshAt": 0.75, "minRemainingSeconds": \(Int(ttl / 5)), "jitter": 0.05,
                           "backoffInitialSeconds": 1, "backoffMaxSeconds": \(Int(ttl / 2)) },
              "outputs": { "tokenFile":   { "path": "\(folder)/run/token",      "mode": "0640" },
                           "jsonFile":    { "path": "\(folder)/run/token.json", "mode": "0640" },
                           "headersFile": { "path": "\(folder)/run/headers",    "mode": "0640" },
                           "proxy":       { "path": "\(folder)/run/api.sock" } },
              "stateFile": "\(folder)/state/state.json",
              "logLevel": "info"
            }
            """
        try AtomicFileWriter.write(Array(DemoAccount.password.utf8), to: folder + "/password", mode: 0o600)
        try AtomicFileWriter.write(Array(DemoAccount.apiKey.utf8), to: folder + "/api-key", mode: 0o600)
        try AtomicFileWriter.write(Array(config.utf8), to: folder + "/config.json", mode: 0o600)
        return folder + "/config.json"
    }

    static func removeFolder(_ folder: String) {
        for file in [
            "run/token", "run/token.json", "run/headers", "state/state.json", "password", "api-key", "config.json",
        ] {
            unlink(folder + "/" + file)
        }
        for directory in ["run", "state", ""] {
            rmdir(folder + "/" + directory)
        }
    }
}
