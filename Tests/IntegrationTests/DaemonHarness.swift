import Foundation
import MockFTS
import TestSupport
import Testing

/// One daemon under test: the real binary as a child process, the mock FTS server on loopback, a real
/// NOTIFY_SOCKET, and outputs in a temporary folder. Credentials are fresh per harness so that the
/// output can be searched for them.
final class DaemonHarness: @unchecked Sendable {
    // @unchecked: `child` is set by start(), and the config settings (`refresh`, `socket`,
    // `extraConfig`) are changed before writeConfig(), from the test's own task only; the rest is immutable.
    let folder: TemporaryDirectory
    let mock: MockFTSServer
    let port: Int
    let notify: NotifyListener
    let password: String
    let apiKey: String
    /// The mock is another harness's (fleet members of one account): that harness stops it.
    private let sharesMock: Bool
    var child: ChildProcess?
    private var children: [ChildProcess] = []

    struct Refresh {
        var refreshAt = 0.8
        var minRemainingSeconds = 1.0
        /// 0 by default: no random refresh times, and no cold-start spread either (its first refresh
        /// may come seconds after the start), so that a test sees the token it got for a while.
        var jitter = 0.0
        var backoffInitialSeconds = 0.2
        var backoffMaxSeconds = 1.0
        /// `api.timeoutSeconds`: the whole login's budget. Far above a login's round trip here, so
        /// that a test counting logins does not count a retry: with the whole suite and both cores
        /// loaded, 5 s timed out answers that were on their way (an extra login in tests that expect
        /// exactly one). Tests about timeouts set their own.
        var loginTimeoutSeconds = 30.0
        var minForcedRefreshSeconds = 30.0
    }

    /// The refresh and timeout settings the config is written with.
    var refresh: Refresh

    /// `outputs.socket` in the config, as a JSON object; nil leaves it out.
    var socket: String?

    /// The output files, as JSON members of `outputs` (default: token, JSON and headers files under
    /// `run/`); `{folder}` stands for the harness's folder.
    var outputFiles = """
        "tokenFile":   { "path": "{folder}/run/token",      "mode": "0640" },
        "jsonFile":    { "path": "{folder}/run/token.json", "mode": "0600" },
        "headersFile": { "path": "{folder}/run/headers",    "mode": "0640" }
        """

    /// More top-level config keys, as JSON members (`"onRotate": [...]`); `{folder}` stands for the
    /// harness's folder.
    var extraConfig: String?

    init(
        ttl: TimeInterval = 60,
        refresh: Refresh = Refresh(),
        socket: String? = nil,
        extraConfig: String? = nil,
        sharingMockOf owner: DaemonHarness? = nil
    ) async throws {
        let folder = try TemporaryDirectory()
        self.folder = folder
        self.extraConfig = extraConfig
        self.refresh = refresh
        self.socket = socket.map { "{ \"path\": \"\(folder.file("run/tokend.sock"))\"\($0.isEmpty ? "" : ", " + $0) }" }
        if let owner {
            (mock, port, password, apiKey, sharesMock) = (owner.mock, owner.port, owner.password, owner.apiKey, true)
        } else {
            (password, apiKey, sharesMock) = ("pw-" + UUID().uuidString, UUID().uuidString.lowercased(), false)
            mock = MockFTSServer(.init(apiKey: apiKey, email: "svc@example.com", password: password, tokenTTL: ttl))
            port = try await mock.start()
        }
        notify = try NotifyListener(in: folder)
        try folder.write("secrets/password", password + "\n")
        try folder.write("secrets/api-key", apiKey + "\n")
        try writeConfig()
    }

    var configPath: String { folder.file("config.json") }

    /// Writes config.json; SIGHUP makes a running daemon read it again.
    func writeConfig(logLevel: String = "debug") throws {
        try folder.write(
            "config.json",
            """
            {
              "api": { "baseURL": "http://127.0.0.1:\(port)", "email": "svc@example.com",
                       "passwordFile": "\(folder.file("secrets/password"))", "apiKeyFile": "\(folder.file("secrets/api-key"))",
                       "timeoutSeconds": \(refresh.loginTimeoutSeconds) },
              "refresh": { "refreshAt": \(refresh.refreshAt), "minRemainingSeconds": \(refresh.minRemainingSeconds),
                           "jitter": \(refresh.jitter), "backoffInitialSeconds": \(refresh.backoffInitialSeconds),
                           "backoffMaxSeconds": \(refresh.backoffMaxSeconds),
                           "minForcedRefreshSeconds": \(refresh.minForcedRefreshSeconds) },
              "outputs": { \(outputFiles.replacingOccurrences(of: "{folder}", with: folder.path))
                           \(socket.map { ", \"socket\": " + $0 } ?? "") },
              "stateFile": "\(folder.file("state/state.json"))",
              \(extraConfig.map { $0.replacingOccurrences(of: "{folder}", with: folder.path) + "," } ?? "")
              "logLevel": "\(logLevel)"
            }
            """
        )
    }

    /// Starts `fts-tokend run` (or other `arguments`) with NOTIFY_SOCKET and `environment`.
    @discardableResult
    func start(
        _ arguments: [String]? = nil,
        environment: [String: String] = [:],
        executable: String? = nil,
        environmentForStandardError: (String) -> [String: String] = { _ in [:] }
    ) throws -> ChildProcess {
        let process = try ChildProcess(
            arguments ?? ["run", "--config", configPath],
            environment: environment.merging(["NOTIFY_SOCKET": notify.path]) { mine, _ in mine },
            in: folder,
            name: "child\(children.count)",
            executable: executable,
            environmentForStandardError: environmentForStandardError
        )
        children.append(process)
        child = process
        return process
    }

    /// Waits for `READY=1` and returns that message.
    func waitUntilReady(timeout: TimeInterval = 30) async -> String? {
        await notify.waitFor(timeout: timeout) { $0.contains("READY=1") }
    }

    var token: String? { folder.read("run/token") }

    var socketPath: String { folder.file("run/tokend.sock") }

    /// Searches for the password, the key and every token issued (or its signature, as good as the
    /// token): everything every child printed, every file in the folder but the ones meant to hold
    /// them (and `alsoHolding`, files a test configured), and the command line and environment of the
    /// children still running.
    func expectNoSecretsInOutput(alsoHolding: Set<String> = [], sourceLocation: SourceLocation = #_sourceLocation) {
        let output = children.map(\.allOutput).joined()
        #expect(!output.isEmpty, "the daemon logs something", sourceLocation: sourceLocation)
        var places = [("output", output)]
        let holders: Set<String> = alsoHolding.union([
            "run/token", "run/token.json", "run/headers", "state/state.json",
            "secrets/password", "secrets/api-key", "config.json",
        ])
        // A holder's temporary twin (AtomicFileWriter's ".name.tmp-…") may exist while it is written.
        func isHolder(_ name: String) -> Bool {
            holders.contains(name)
                || holders.contains { holder in
                    let (folder, file) = (
                        holder.split(separator: "/").first ?? "", holder.split(separator: "/").last ?? ""
                    )
                    return name.hasPrefix("\(folder)/.\(file).tmp-")
                }
        }
        for name in folder.allFiles() where !isHolder(name) && !name.hasPrefix("child") {
            places.append((name, folder.read(name) ?? ""))
        }
        for process in children where process.isRunning {
            for part in ["cmdline", "environ"] {
                let bytes = FileManager.default.contents(atPath: "/proc/\(process.pid)/\(part)") ?? Data()
                places.append(("/proc/PID/\(part)", String(decoding: bytes, as: UTF8.self)))
            }
        }
        let tokens = mock.issuedTokens
        for (place, text) in places {
            for (kind, secret) in [("password", password), ("API key", apiKey)] where text.contains(secret) {
                Issue.record("\(kind) leaked into \(place)", sourceLocation: sourceLocation)
            }
            let runs = Self.tokenRuns(in: text)
            for token in tokens {
                if runs.contains(Substring(token)) {
                    Issue.record("token leaked into \(place)", sourceLocation: sourceLocation)
                }
                if let signature = token.split(separator: ".").last, runs.contains(signature) {
                    Issue.record("token signature leaked into \(place)", sourceLocation: sourceLocation)
                }
            }
        }
    }

    /// Every run of token characters (ASCII letters, digits, `-`, `_`, `.`) in `text`, and each run's
    /// dot-separated parts. Hundreds of tokens against megabytes of log (the soak): one pass over the
    /// bytes collects the runs, then each token and signature is a lookup. Over bytes, not
    /// Characters: splitting 20 MB by Character in a debug build held a thread of the concurrency
    /// pool for seconds (`onOwnThread`).
    static func tokenRuns(in text: String) -> Set<Substring> {
        var text = text
        text.makeContiguousUTF8()
        let utf8 = text.utf8
        var runs = Set<Substring>()
        func add(_ start: Int, _ end: Int) {
            guard start < end else { return }
            let run = text[utf8.index(utf8.startIndex, offsetBy: start)..<utf8.index(utf8.startIndex, offsetBy: end)]
            runs.insert(run)
            for part in run.split(separator: ".") { runs.insert(part) }
        }
        utf8.withContiguousStorageIfAvailable { bytes in
            var start = 0
            for offset in 0..<bytes.count {
                switch bytes[offset] {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."):
                    continue
                default:
                    add(start, offset)
                    start = offset + 1
                }
            }
            add(start, bytes.count)
        }
        return runs
    }

    /// Stops the children and the mock.
    func stop() async {
        for process in children where process.isRunning {
            process.signal(SIGKILL)
            _ = await process.waitForExit(timeout: 10)
        }
        notify.stop()
        if !sharesMock { await mock.stop() }
    }
}
