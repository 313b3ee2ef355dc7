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
            "Writes the token files to a new temporary folder and serves the token socket and the API proxy there. Every 3 seconds three consumers call the mock's /api/whoami: one reads the token file, one asks the socket (and its /healthz), one goes through the proxy with no credentials at all; a fourth long-polls the socket and shows each new token as it arrives. The second round revokes every token server-side, to show the proxy recover with one forced login. Ctrl-C stops the demo and removes the folder."
    )

    @Option(help: "Stop after this many seconds (default: run until Ctrl-C).")
    var duration: Double?

    @Option(help: "Token lifetime the mock server hands out, in seconds.")
    var ttl: Double = 20

    @Flag(help: "Also show the daemon's own log lines (info and above; without it, warnings and above).")
    var verbose = false

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

        let configPath = try Self.writeFiles(in: folder, port: port, ttl: ttl, logLevel: verbose ? "info" : "warning")
        Console.out(
            """
            fts-tokend demo: the mock FTS auth server and the daemon in one process; tokens live \(FormatTime.seconds(ttl)).
              mock auth server  http://127.0.0.1:\(port)
              token files       \(folder)/run/  (token, token.json, headers: read one per request)
              token socket      \(folder)/run/tokend.sock  (GET /token, /healthz; long poll /token?wait=S&after=FP)
              API proxy         \(folder)/run/api.sock  (the API with the daemon's credentials; the caller has none)
              config            \(configPath)
              in another shell  fts-tokend status --socket \(folder)/run/tokend.sock  (add --json for the document)
            Every 3 s each consumer calls the API's /api/whoami; the second round revokes every token first.
            Ctrl-C stops the demo and removes the folder.

            time       consumer  what it did
            """
        )
        let loader = ConfigurationLoader(environment: [:])
        let daemon = Daemon(
            configPath: configPath,
            loaded: try loader.load(path: configPath),
            dependencies: .init(loader: loader, watchdogInterval: nil, version: FTSTokend.version),
            logger: logger
        )
        let consumers = DemoConsumers(folder: folder, port: port, mock: mock)
        let rounds = Task { await consumers.callEveryThreeSeconds() }
        let poller = Task { await consumers.longPoll() }
        let stopper = Task {
            guard let duration else { return }
            try await Task.sleep(for: .milliseconds(Int(duration * 1000)))
            kill(getpid(), SIGTERM)
        }
        let status = await daemon.run()
        rounds.cancel()
        poller.cancel()
        stopper.cancel()
        await mock.stop()
        let stats = mock.stats
        Console.out(
            "\ndemo finished: \(stats.tokensIssued) tokens issued, \(stats.whoamiAccepted) whoami calls accepted, \(stats.whoamiRejected) rejected (revoked tokens)"
        )
        if status != ExitStatus.success { throw ExitCode(status) }
    }

    static func makeFolder() throws -> String {
        var template = Array("/tmp/fts-tokend-demo-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw ValidationError("cannot create a temporary folder") }
        return String(cString: created)
    }

    /// Config and secret files for the demo account, each 0600.
    static func writeFiles(in folder: String, port: Int, ttl: Double, logLevel: String) throws -> String {
        let config = """
            {
              "api": { "baseURL": "http://127.0.0.1:\(port)", "email": "\(DemoAccount.email)",
                       "passwordFile": "\(folder)/password", "apiKeyFile": "\(folder)/api-key", "timeoutSeconds": 5 },
              "refresh": { "refreshAt": 0.75, "minRemainingSeconds": \(Int(ttl / 5)), "jitter": 0.05,
                           "backoffInitialSeconds": 1, "backoffMaxSeconds": \(Int(ttl / 2)) },
              "outputs": { "tokenFile":   { "path": "\(folder)/run/token",      "mode": "0640" },
                           "jsonFile":    { "path": "\(folder)/run/token.json", "mode": "0640" },
                           "headersFile": { "path": "\(folder)/run/headers",    "mode": "0640" },
                           "socket":      { "path": "\(folder)/run/tokend.sock" },
                           "proxy":       { "path": "\(folder)/run/api.sock" } },
              "stateFile": "\(folder)/state/state.json",
              "logLevel": "\(logLevel)"
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

/// The demo's consumers, one of each kind a host has, each printing one line per call.
struct DemoConsumers: Sendable {
    let folder: String
    let port: Int
    let mock: MockFTSServer

    var whoami: String { "http://127.0.0.1:\(port)/api/whoami" }

    /// `path` on the Unix socket `socket` (a file name in run/), as AsyncHTTPClient spells it.
    func unixURL(_ socket: String, _ path: String) -> String {
        "http+unix://"
            + (folder + "/run/" + socket).split(separator: "/", omittingEmptySubsequences: false)
            .joined(separator: "%2F") + path
    }

    static func say(_ consumer: String, _ what: String) {
        Console.out(
            FormatTime.timeOfDay(Date()) + "  " + consumer + String(repeating: " ", count: max(1, 10 - consumer.count))
                + what
        )
    }

    /// A GET with a 30 s budget: the status and body, or nil.
    func get(_ url: String, headers: [(String, String)] = []) async -> (status: UInt, body: String)? {
        var request = HTTPClientRequest(url: url)
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        guard let response = try? await HTTPClient.shared.execute(request, timeout: .seconds(30)),
            let body = try? await response.body.collect(upTo: 1 << 20)
        else { return nil }
        return (response.status.code, String(buffer: body))
    }

    /// whoami with `token` as a consumer that holds it sends it: the key and a Bearer header.
    func callAPI(with token: String) async -> String {
        let answer = await get(
            whoami,
            headers: [("x-api-key", DemoAccount.apiKey), ("Authorization", "Bearer " + token)]
        )
        return answer.map { "HTTP \($0.status)" } ?? "no answer"
    }

    func callEveryThreeSeconds() async {
        var round = 0
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(3))
            guard !Task.isCancelled else { return }
            round += 1
            if let token = try? SmallFile.read(folder + "/run/token", limit: 64 * 1024).bytes {
                let text = String(decoding: token, as: UTF8.self)
                Self.say("files", "read run/token: \(Fingerprint.of(text)); whoami -> \(await callAPI(with: text))")
            } else {
                Self.say("files", "no token file yet")
            }
            if let answer = await get(unixURL("tokend.sock", "/token")), answer.status == 200 {
                var line = "GET /token: \(Fingerprint.of(answer.body)); whoami -> \(await callAPI(with: answer.body))"
                if let health = await get(unixURL("tokend.sock", "/healthz")),
                    let document = try? JSONDecoder().decode(TokenBoard.Health.self, from: Data(health.body.utf8))
                {
                    line += "; /healthz: \(document.status)"
                    if let next = document.nextRefreshAt { line += ", next refresh \(next.dropFirst(11))" }
                }
                Self.say("socket", line)
            } else {
                Self.say("socket", "no token served yet")
            }
            let loginsBefore = mock.stats.loginRequests
            if round == 2 {
                Self.say("revoke", "the API refuses every token issued so far (\(mock.revokeAll())), before any expiry")
            }
            let proxied = await get(unixURL("api.sock", "/api/whoami"))
            var line = "GET /api/whoami with no credentials -> \(proxied.map { "HTTP \($0.status)" } ?? "no answer")"
            if round == 2 {
                let forced = mock.stats.loginRequests - loginsBefore
                line += " (the 401 reported and replayed: \(forced) forced login\(forced == 1 ? "" : "s"))"
            }
            Self.say("proxy", line)
        }
    }

    /// Waits on the socket for each token after the one it has, as a consumer that keeps a token in
    /// memory does: one line per rotation, as it happens.
    func longPoll() async {
        var current: String?
        while !Task.isCancelled {
            let query = "/token?wait=60" + (current.map { "&after=" + $0 } ?? "")
            guard let answer = await get(unixURL("tokend.sock", query)), answer.status == 200 else {
                try? await Task.sleep(for: .seconds(1))
                continue
            }
            let fingerprint = Fingerprint.of(answer.body)
            guard fingerprint != current else { continue }
            Self.say(
                "longpoll",
                current.map { "new token \(fingerprint) (was \($0))" } ?? "first token \(fingerprint)"
            )
            current = fingerprint
        }
    }
}
