import Foundation
import TestSupport
import Testing

@testable import TokenDaemon

/// A valid config; tests change one key at a time.
let validConfig = """
    {
      "api": { "baseURL": "https://global-api.fintechstudios.com", "tokenPath": "/auth/token",
               "email": "svc@example.com", "passwordFile": "/etc/fts-tokend/password",
               "apiKeyFile": "/etc/fts-tokend/api-key", "timeoutSeconds": 30 },
      "refresh": { "refreshAt": 0.8, "minRemainingSeconds": 120, "jitter": 0.05,
                   "backoffInitialSeconds": 1, "backoffMaxSeconds": 300 },
      "outputs": { "tokenFile":   { "path": "/run/fts-tokend/token",      "mode": "0640" },
                   "jsonFile":    { "path": "/run/fts-tokend/token.json", "mode": "0640" },
                   "headersFile": { "path": "/run/fts-tokend/headers",    "mode": "0640" } },
      "stateFile": "/var/lib/fts-tokend/state.json",
      "logLevel": "info"
    }
    """

/// `validConfig` with `change` applied to its parsed form.
func config(_ change: (inout [String: Any]) -> Void) -> [UInt8] {
    var object = try! JSONSerialization.jsonObject(with: Data(validConfig.utf8)) as! [String: Any]
    change(&object)
    return Array(try! JSONSerialization.data(withJSONObject: object))
}

func set(_ object: inout [String: Any], _ path: String, _ value: Any?) {
    let keys = path.split(separator: ".").map(String.init)
    func apply(_ dict: inout [String: Any], _ keys: ArraySlice<String>) {
        let key = keys.first!
        if keys.count == 1 {
            dict[key] = value
        } else {
            var child = dict[key] as? [String: Any] ?? [:]
            apply(&child, keys.dropFirst())
            dict[key] = child
        }
    }
    apply(&object, keys[...])
}

func parseError(_ bytes: [UInt8]) -> ConfigurationError? {
    do {
        _ = try ConfigurationParser().parse(bytes)
        return nil
    } catch {
        return error
    }
}

@Suite struct ConfigurationParserTests {
    @Test func parsesTheDocumentedExample() throws {
        let parsed = try ConfigurationParser().parse(Array(validConfig.utf8))
        #expect(parsed.api.tokenURL == "https://global-api.fintechstudios.com/auth/token")
        #expect(parsed.api.email == .inline("svc@example.com"))
        #expect(parsed.api.password == .file("/etc/fts-tokend/password"))
        #expect(parsed.api.apiKey == .file("/etc/fts-tokend/api-key"))
        #expect(parsed.refresh == .defaults)
        #expect(
            parsed.outputs.files.map(\.path) == [
                "/run/fts-tokend/token", "/run/fts-tokend/token.json", "/run/fts-tokend/headers",
            ]
        )
        #expect(parsed.outputs.files.allSatisfy { $0.mode == 0o640 })
        #expect(parsed.outputs.headersFile?.authorizationScheme == "Bearer")
        #expect(parsed.stateFile == "/var/lib/fts-tokend/state.json")
        #expect(parsed.logLevel == .info)
    }

    @Test func theShippedExampleConfigParses() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let bytes = try Data(contentsOf: root.appendingPathComponent("config.example.json"))
        var parsed = try ConfigurationParser().parse(Array(bytes))
        // The example's proxy spells out its defaults.
        #expect(
            parsed.outputs.proxy
                == (try ConfigurationParser().parse(config { set(&$0, "outputs.proxy", [:]) })).outputs.proxy
        )
        parsed.outputs.proxy = nil
        #expect(parsed == (try ConfigurationParser().parse(Array(validConfig.utf8))))
    }

    @Test func appliesDefaultsAndCredentialFallbacks() throws {
        let minimal = #"{"api":{"baseURL":"https://fts.example/"},"outputs":{"tokenFile":{"path":"/run/t"}}}"#
        let parsed = try ConfigurationParser().parse(Array(minimal.utf8))
        #expect(parsed.api.baseURL == "https://fts.example")
        #expect(parsed.api.tokenPath == "/auth/token")
        #expect(parsed.api.timeoutSeconds == 30)
        #expect(parsed.api.email == .credential("email"))
        #expect(parsed.api.password == .credential("password"))
        #expect(parsed.api.apiKey == .credential("api-key"))
        #expect(parsed.outputs.tokenFile?.mode == 0o640)
        #expect(parsed.stateFile == nil)
        #expect(parsed.refresh == .defaults)
    }

    @Test func acceptsLoopbackHTTPAndBareAuthorizationScheme() throws {
        let parsed = try ConfigurationParser().parse(
            config {
                set(&$0, "api.baseURL", "http://127.0.0.1:8080")
                set(&$0, "outputs.headersFile.authorizationScheme", "")
                set(&$0, "outputs.tokenFile.mode", "600")
            }
        )
        #expect(parsed.api.baseURL == "http://127.0.0.1:8080")
        #expect(parsed.outputs.headersFile?.authorizationScheme == "")
        #expect(parsed.outputs.tokenFile?.mode == 0o600)
    }

    struct BadInput: Sendable, CustomTestStringConvertible {
        var name: String
        var bytes: [UInt8]
        var keyPath: String
        var message: String
        var testDescription: String { name }
    }

    static let badInputs: [BadInput] = [
        BadInput(name: "not JSON", bytes: Array("{api:".utf8), keyPath: "(file)", message: "not valid JSON"),
        BadInput(name: "top level array", bytes: Array("[]".utf8), keyPath: "(file)", message: "must be a JSON object"),
        BadInput(
            name: "unknown top-level key",
            bytes: config { set(&$0, "refreshAT", 1) },
            keyPath: "refreshAT",
            message: "unknown key"
        ),
        BadInput(
            name: "unknown api key",
            bytes: config { set(&$0, "api.pasword", "x") },
            keyPath: "api.pasword",
            message: "unknown key"
        ),
        BadInput(
            name: "unknown refresh key",
            bytes: config { set(&$0, "refresh.jiter", 0.1) },
            keyPath: "refresh.jiter",
            message: "unknown key"
        ),
        BadInput(
            name: "unknown output",
            bytes: config { set(&$0, "outputs.pipe", ["path": "/run/x"]) },
            keyPath: "outputs.pipe",
            message: "unknown key"
        ),
        BadInput(
            name: "socket without path",
            bytes: config { set(&$0, "outputs.socket", ["mode": "0660"]) },
            keyPath: "outputs.socket.path",
            message: "is required"
        ),
        BadInput(
            name: "socket mode as a number",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/s.sock", "mode": 660]) },
            keyPath: "outputs.socket.mode",
            message: "not the number 660"
        ),
        BadInput(
            name: "socket open to everyone",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/s.sock", "mode": "0666"]) },
            keyPath: "outputs.socket.mode",
            message: "every local user"
        ),
        BadInput(
            name: "socket path too long",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/" + String(repeating: "s", count: 110)]) },
            keyPath: "outputs.socket.path",
            message: "107 bytes"
        ),
        BadInput(
            name: "negative uid",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/s.sock", "allowUIDs": [-1]]) },
            keyPath: "outputs.socket.allowUIDs",
            message: "numeric IDs"
        ),
        BadInput(
            name: "gid as a name",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/s.sock", "allowGIDs": ["fts-token"]]) },
            keyPath: "outputs.socket.allowGIDs",
            message: "numeric IDs"
        ),
        BadInput(
            name: "uids not a list",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/s.sock", "allowUIDs": 0]) },
            keyPath: "outputs.socket.allowUIDs",
            message: "an array"
        ),
        BadInput(
            name: "zero connections",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/s.sock", "maxConnections": 0]) },
            keyPath: "outputs.socket.maxConnections",
            message: "whole number"
        ),
        BadInput(
            name: "socket on a token file's path",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/fts-tokend/token"]) },
            keyPath: "outputs",
            message: "same file"
        ),
        BadInput(
            name: "unknown output file key",
            bytes: config { set(&$0, "outputs.tokenFile.owner", "root") },
            keyPath: "outputs.tokenFile.owner",
            message: "unknown key"
        ),
        BadInput(name: "missing api", bytes: config { $0["api"] = nil }, keyPath: "api", message: "is required"),
        BadInput(
            name: "api not an object",
            bytes: config { $0["api"] = "x" },
            keyPath: "api",
            message: "must be a JSON object, not a string"
        ),
        BadInput(
            name: "missing baseURL",
            bytes: config { set(&$0, "api.baseURL", nil) },
            keyPath: "api.baseURL",
            message: "is required"
        ),
        BadInput(
            name: "baseURL a number",
            bytes: config { set(&$0, "api.baseURL", 5) },
            keyPath: "api.baseURL",
            message: "must be a string, not a number"
        ),
        BadInput(
            name: "baseURL not a URL",
            bytes: config { set(&$0, "api.baseURL", "global-api.fintechstudios.com") },
            keyPath: "api.baseURL",
            message: "is not a URL"
        ),
        BadInput(
            name: "plain http to another host",
            bytes: config { set(&$0, "api.baseURL", "http://global-api.fintechstudios.com") },
            keyPath: "api.baseURL",
            message: "only to loopback"
        ),
        // Names that only start like a loopback address are resolved by DNS, which can answer anything.
        BadInput(
            name: "plain http to a name starting with 127.",
            bytes: config { set(&$0, "api.baseURL", "http://127.evil.example") },
            keyPath: "api.baseURL",
            message: "only to loopback"
        ),
        BadInput(
            name: "plain http to a loopback-looking DNS name",
            bytes: config { set(&$0, "api.baseURL", "http://127.0.0.1.nip.io:8080") },
            keyPath: "api.baseURL",
            message: "only to loopback"
        ),
        BadInput(
            name: "plain http to a name ending in localhost",
            bytes: config { set(&$0, "api.baseURL", "http://localhost.evil.example") },
            keyPath: "api.baseURL",
            message: "only to loopback"
        ),
        BadInput(
            name: "plain http to a short-form IPv4",
            bytes: config { set(&$0, "api.baseURL", "http://127.1") },
            keyPath: "api.baseURL",
            message: "only to loopback"
        ),
        BadInput(
            name: "ftp scheme",
            bytes: config { set(&$0, "api.baseURL", "ftp://x.example") },
            keyPath: "api.baseURL",
            message: "not supported"
        ),
        BadInput(
            name: "baseURL with user info",
            bytes: config { set(&$0, "api.baseURL", "https://u:p@x.example") },
            keyPath: "api.baseURL",
            message: "user info"
        ),
        BadInput(
            name: "tokenPath without slash",
            bytes: config { set(&$0, "api.tokenPath", "auth/token") },
            keyPath: "api.tokenPath",
            message: "starting with \"/\""
        ),
        BadInput(
            name: "timeout zero",
            bytes: config { set(&$0, "api.timeoutSeconds", 0) },
            keyPath: "api.timeoutSeconds",
            message: "more than 0"
        ),
        BadInput(
            name: "timeout a string",
            bytes: config { set(&$0, "api.timeoutSeconds", "30") },
            keyPath: "api.timeoutSeconds",
            message: "must be a number, not a string"
        ),
        BadInput(
            name: "password and passwordFile",
            bytes: config { set(&$0, "api.password", "x") },
            keyPath: "api.password",
            message: "not both"
        ),
        BadInput(
            name: "empty inline email",
            bytes: config { set(&$0, "api.email", "") },
            keyPath: "api.email",
            message: "must not be empty"
        ),
        BadInput(
            name: "relative secret file",
            bytes: config { set(&$0, "api.apiKeyFile", "api-key") },
            keyPath: "api.apiKeyFile",
            message: "absolute path"
        ),
        BadInput(
            name: "relative caFile",
            bytes: config { set(&$0, "api.caFile", "ca.pem") },
            keyPath: "api.caFile",
            message: "absolute path"
        ),
        BadInput(
            name: "refreshAt 1",
            bytes: config { set(&$0, "refresh.refreshAt", 1) },
            keyPath: "refresh.refreshAt",
            message: "less than 1"
        ),
        BadInput(
            name: "refreshAt 0",
            bytes: config { set(&$0, "refresh.refreshAt", 0) },
            keyPath: "refresh.refreshAt",
            message: "more than 0"
        ),
        BadInput(
            name: "negative minRemaining",
            bytes: config { set(&$0, "refresh.minRemainingSeconds", -1) },
            keyPath: "refresh.minRemainingSeconds",
            message: "0 or more"
        ),
        BadInput(
            name: "jitter above refreshAt",
            bytes: config { set(&$0, "refresh.jitter", 0.9) },
            keyPath: "refresh.jitter",
            message: "less than refreshAt"
        ),
        BadInput(
            name: "backoff initial too small",
            bytes: config { set(&$0, "refresh.backoffInitialSeconds", 0) },
            keyPath: "refresh.backoffInitialSeconds",
            message: "at least 0.1"
        ),
        BadInput(
            name: "backoff max below initial",
            bytes: config { set(&$0, "refresh.backoffMaxSeconds", 0.5) },
            keyPath: "refresh.backoffMaxSeconds",
            message: "at least backoffInitialSeconds"
        ),
        BadInput(
            name: "forced refresh floor of 0 (every report a login: the account would be throttled)",
            bytes: config { set(&$0, "refresh.minForcedRefreshSeconds", 0) },
            keyPath: "refresh.minForcedRefreshSeconds",
            message: "at least 1 and at most 86400"
        ),
        BadInput(
            name: "no outputs",
            bytes: config { $0["outputs"] = [String: Any]() },
            keyPath: "outputs",
            message: "at least one"
        ),
        BadInput(
            name: "two outputs on one file",
            bytes: config { set(&$0, "outputs.jsonFile.path", "/run/fts-tokend/token") },
            keyPath: "outputs",
            message: "same file"
        ),
        BadInput(
            name: "mode as a JSON number",
            bytes: config { set(&$0, "outputs.tokenFile.mode", 640) },
            keyPath: "outputs.tokenFile.mode",
            message: "not the number 640"
        ),
        BadInput(
            name: "mode not octal",
            bytes: config { set(&$0, "outputs.tokenFile.mode", "0980") },
            keyPath: "outputs.tokenFile.mode",
            message: "not an octal file mode"
        ),
        BadInput(
            name: "mode world-writable",
            bytes: config { set(&$0, "outputs.jsonFile.mode", "0666") },
            keyPath: "outputs.jsonFile.mode",
            message: "lets anyone write"
        ),
        // Under a user namespace every unmapped peer appears as 65534: listing it would admit all.
        BadInput(
            name: "allow list naming the overflow uid",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/s.sock", "allowUIDs": [1001, 65534]]) },
            keyPath: "outputs.socket.allowUIDs",
            message: "overflow id"
        ),
        BadInput(
            name: "allow list naming the overflow gid",
            bytes: config { set(&$0, "outputs.socket", ["path": "/run/s.sock", "allowGIDs": [65534]]) },
            keyPath: "outputs.socket.allowGIDs",
            message: "overflow id"
        ),
        // A consumer in the group could rewrite the token or headers file every other consumer reads.
        BadInput(
            name: "mode group-writable",
            bytes: config { set(&$0, "outputs.headersFile.mode", "0660") },
            keyPath: "outputs.headersFile.mode",
            message: "lets the group write"
        ),
        BadInput(
            name: "mode owner cannot read",
            bytes: config { set(&$0, "outputs.headersFile.mode", "0040") },
            keyPath: "outputs.headersFile.mode",
            message: "owner read"
        ),
        BadInput(
            name: "mode a boolean",
            bytes: config { set(&$0, "outputs.tokenFile.mode", true) },
            keyPath: "outputs.tokenFile.mode",
            message: "not a boolean"
        ),
        BadInput(
            name: "relative output path",
            bytes: config { set(&$0, "outputs.tokenFile.path", "token") },
            keyPath: "outputs.tokenFile.path",
            message: "absolute path"
        ),
        BadInput(
            name: "output path with ..",
            bytes: config { set(&$0, "outputs.tokenFile.path", "/run/../etc/passwd") },
            keyPath: "outputs.tokenFile.path",
            message: "\"..\""
        ),
        BadInput(
            name: "output path a folder",
            bytes: config { set(&$0, "outputs.tokenFile.path", "/run/fts-tokend/") },
            keyPath: "outputs.tokenFile.path",
            message: "not a folder"
        ),
        BadInput(
            name: "scheme with a space",
            bytes: config { set(&$0, "outputs.headersFile.authorizationScheme", "Bearer x") },
            keyPath: "outputs.headersFile.authorizationScheme",
            message: "letters only"
        ),
        BadInput(
            name: "relative stateFile",
            bytes: config { $0["stateFile"] = "state.json" },
            keyPath: "stateFile",
            message: "absolute path"
        ),
        BadInput(
            name: "onRotate not a list",
            bytes: config { $0["onRotate"] = ["exec": ["/bin/true"]] },
            keyPath: "onRotate",
            message: "must be an array"
        ),
        BadInput(
            name: "onRotate empty action",
            bytes: config { $0["onRotate"] = [[String: Any]()] },
            keyPath: "onRotate[0]",
            message: "needs exec"
        ),
        BadInput(
            name: "onRotate exec and signal",
            bytes: config { $0["onRotate"] = [["exec": ["/bin/true"], "signal": "HUP"]] },
            keyPath: "onRotate[0]",
            message: "not both"
        ),
        BadInput(
            name: "onRotate exec a string",
            bytes: config { $0["onRotate"] = [["exec": "systemctl reload app"]] },
            keyPath: "onRotate[0].exec",
            message: "no shell"
        ),
        BadInput(
            name: "onRotate relative program",
            bytes: config { $0["onRotate"] = [["exec": ["systemctl", "reload", "app"]]] },
            keyPath: "onRotate[0].exec[0]",
            message: "absolute path"
        ),
        BadInput(
            name: "onRotate zero timeout",
            bytes: config { $0["onRotate"] = [["exec": ["/bin/true"], "timeoutSeconds": 0]] },
            keyPath: "onRotate[0].timeoutSeconds",
            message: "more than 0"
        ),
        BadInput(
            name: "onRotate unknown key",
            bytes: config { $0["onRotate"] = [["exec": ["/bin/true"], "shell": true]] },
            keyPath: "onRotate[0].shell",
            message: "unknown key"
        ),
        BadInput(
            name: "onRotate unknown signal",
            bytes: config { $0["onRotate"] = [["signal": "KILLALL", "pidFile": "/run/a.pid"]] },
            keyPath: "onRotate[0].signal",
            message: "is not one of"
        ),
        BadInput(
            name: "onRotate signal without pidFile",
            bytes: config { $0["onRotate"] = [["signal": "HUP"]] },
            keyPath: "onRotate[0].pidFile",
            message: "is required"
        ),
        BadInput(
            name: "relative metricsFile",
            bytes: config { $0["metricsFile"] = "m.prom" },
            keyPath: "metricsFile",
            message: "absolute path"
        ),
        BadInput(
            name: "unknown log level",
            bytes: config { $0["logLevel"] = "verbose" },
            keyPath: "logLevel",
            message: "is not one of"
        ),
    ]

    @Test func parsesAProxyWithItsDefaults() throws {
        let parsed = try ConfigurationParser().parse(config { set(&$0, "outputs.proxy", [String: Any]()) })
        let proxy = try #require(parsed.outputs.proxy)
        #expect(proxy.path == "/run/fts-tokend/api.sock" && proxy.mode == 0o660)
        #expect(proxy.upstream == "https://global-api.fintechstudios.com", "api.baseURL")
        #expect(proxy.rejectedStatuses == [401] && !proxy.allowBrowsers && proxy.listen == nil)
        #expect(
            proxy.maxRequestBodyBytes == 16 << 20 && proxy.timeoutSeconds == 60 && proxy.connectTimeoutSeconds == 10
        )
        #expect(proxy.maxConnections == 512 && proxy.maxUpstreamConnections == 64)
        #expect(proxy.denyPaths == ["/auth/token", "/auth/"], "the log-in endpoint and the auth API")
        #expect(proxy.maxUpstreamConnectionsPerPeer == 48, "three quarters of the pool")
    }

    /// The default denies the log-in endpoint where it really is: under `api.baseURL`'s own path.
    @Test func theDefaultDeniedPathsFollowTheLoginEndpoint() throws {
        let text =
            #"{"api":{"baseURL":"https://x.example/gw","tokenPath":"/login"},"outputs":{"proxy":{}}}"#
        #expect(try ConfigurationParser().parse(Array(text.utf8)).outputs.proxy?.denyPaths == ["/gw/login", "/auth/"])
    }

    @Test(arguments: [#"["auth/"]"#, #"["/auth?x=1"]"#, #"[1]"#, #""/auth/""#])
    func deniedPathsMustBePaths(_ value: String) {
        let text = #"{"api":{"baseURL":"https://x.example"},"outputs":{"proxy":{"denyPaths":"# + value + "}}}"
        #expect(throws: ConfigurationError.self) { try ConfigurationParser().parse(Array(text.utf8)) }
    }

    @Test func aProxyAloneIsAValidOutput() throws {
        let text = #"{"api":{"baseURL":"https://x.example"},"outputs":{"proxy":{}}}"#
        let outputs = try ConfigurationParser().parse(Array(text.utf8)).outputs
        #expect(outputs.proxy?.upstream == "https://x.example" && outputs.files.isEmpty && outputs.socket == nil)
    }

    @Test func parsesAProxyWithEverySetting() throws {
        let parsed = try ConfigurationParser().parse(
            config {
                set(
                    &$0,
                    "outputs.proxy",
                    [
                        "path": "/run/x/api.sock", "mode": "0600", "allowUIDs": [1001], "allowGIDs": [998],
                        "listen": "localhost:8089", "upstream": "https://api.example/v2/", "caFile": "/etc/ca.pem",
                        "rejectedStatuses": [401, 403], "allowBrowsers": true, "maxRequestBodyBytes": 1000,
                        "connectTimeoutSeconds": 2, "timeoutSeconds": 5, "maxConnections": 9,
                        "maxUpstreamConnections": 3, "denyPaths": ["/v2/login"],
                        "maxUpstreamConnectionsPerPeer": 2,
                    ] as [String: Any]
                )
            }
        )
        let proxy = try #require(parsed.outputs.proxy)
        #expect(
            proxy
                == Configuration.Proxy(
                    path: "/run/x/api.sock",
                    mode: 0o600,
                    allowUIDs: [1001],
                    allowGIDs: [998],
                    listen: .init(host: "127.0.0.1", port: 8089),
                    upstream: "https://api.example/v2",
                    caFile: "/etc/ca.pem",
                    rejectedStatuses: [401, 403],
                    allowBrowsers: true,
                    maxRequestBodyBytes: 1000,
                    connectTimeoutSeconds: 2,
                    timeoutSeconds: 5,
                    maxConnections: 9,
                    maxUpstreamConnections: 3,
                    denyPaths: ["/v2/login"],
                    maxUpstreamConnectionsPerPeer: 2
                )
        )
    }

    @Test(arguments: [
        ("127.0.0.1:8089", "127.0.0.1:8089"), ("[::1]:8089", "[::1]:8089"), ("127.1.2.3:1", "127.1.2.3:1"),
        ("LOCALHOST:80", "127.0.0.1:80"),
    ])
    func acceptsLoopbackListenAddresses(_ text: String, _ bound: String) throws {
        let parsed = try ConfigurationParser().parse(config { set(&$0, "outputs.proxy", ["listen": text]) })
        #expect(parsed.outputs.proxy?.listen?.description == bound)
    }

    @Test(arguments: [
        "0.0.0.0:8089", "10.0.0.1:8089", "[::]:8089", "127.0.0.1.nip.io:8089", "127.evil.example:80", "127.0.0.1",
        "127.0.0.1:0", "127.0.0.1:70000", ":8089",
    ])
    func refusesListenAddressesOffLoopback(_ text: String) {
        let error = parseError(config { set(&$0, "outputs.proxy", ["listen": text]) })
        #expect(error?.keyPath == "outputs.proxy.listen", "\(text): \(String(describing: error))")
    }

    @Test(arguments: [
        (#"{"upstream": "http://api.example"}"#, "outputs.proxy.upstream", "loopback"),
        (#"{"rejectedStatuses": [200]}"#, "outputs.proxy.rejectedStatuses", "400 to 599"),
        (#"{"rejectedStatuses": []}"#, "outputs.proxy.rejectedStatuses", "one or more"),
        (#"{"mode": "0666"}"#, "outputs.proxy.mode", "every local user"),
        (#"{"allowUIDs": [65534]}"#, "outputs.proxy.allowUIDs", "overflow id"),
        (#"{"maxRequestBodyBytes": -1}"#, "outputs.proxy.maxRequestBodyBytes", "whole number"),
        (#"{"timeoutSeconds": 0}"#, "outputs.proxy.timeoutSeconds", "more than 0"),
        (#"{"path": "/run/fts-tokend/token"}"#, "outputs", "two outputs write the same file"),
        (#"{"upsteam": "https://x.example"}"#, "outputs.proxy.upsteam", "unknown key"),
    ])
    func refusesBadProxySettings(_ settings: String, _ keyPath: String, _ message: String) throws {
        let object = try JSONSerialization.jsonObject(with: Data(settings.utf8))
        let error = parseError(config { set(&$0, "outputs.proxy", object) })
        #expect(error?.keyPath == keyPath, "\(String(describing: error))")
        #expect(error?.problem.contains(message) == true, "\(String(describing: error))")
    }

    @Test(arguments: badInputs)
    func refusesWithKeyPathAndReason(_ input: BadInput) {
        let error = parseError(input.bytes)
        #expect(error?.keyPath == input.keyPath)
        #expect(error?.problem.contains(input.message) == true, "\(String(describing: error))")
    }

    @Test func parsesRotateActionsAndMetricsFile() throws {
        let parsed = try ConfigurationParser().parse(
            config {
                $0["onRotate"] = [
                    ["exec": ["/usr/bin/systemctl", "reload", "app.service"], "timeoutSeconds": 5],
                    ["signal": "sighup", "pidFile": "/run/app.pid"],
                ]
                $0["metricsFile"] = "/var/lib/node_exporter/fts-tokend.prom"
            }
        )
        #expect(
            parsed.onRotate == [
                .exec(argv: ["/usr/bin/systemctl", "reload", "app.service"], timeoutSeconds: 5),
                .signal(number: SIGHUP, name: "HUP", pidFile: "/run/app.pid"),
            ]
        )
        #expect(parsed.metricsFile == "/var/lib/node_exporter/fts-tokend.prom")
    }

    @Test func parsesASocketAlone() throws {
        let text =
            #"{"api":{"baseURL":"https://x.example"},"outputs":{"socket":{"path":"/run/fts-tokend/tokend.sock","allowUIDs":[0,1001],"allowGIDs":[998]}}}"#
        let socket = try #require(try ConfigurationParser().parse(Array(text.utf8)).outputs.socket)
        #expect(
            socket
                == Configuration.Socket(
                    path: "/run/fts-tokend/tokend.sock",
                    mode: 0o660,
                    allowUIDs: [0, 1001],
                    allowGIDs: [998],
                    maxConnections: 512
                )
        )
        #expect(socket.restrictsPeers)
    }

    @Test(arguments: [
        "http://127.0.0.1:8080", "http://127.255.0.9", "http://localhost:8080", "http://LOCALHOST", "http://[::1]:8080",
    ])
    func plainHTTPToALoopbackLiteralIsAccepted(_ url: String) throws {
        #expect(try ConfigurationParser().parse(config { set(&$0, "api.baseURL", url) }).api.baseURL == url)
    }

    @Test func loopbackIsALiteralNotAPrefix() {
        for host in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"] {
            #expect(Loopback.isLoopback(host: host), "\(host)")
        }
        for host in [
            "127.evil.example", "127.0.0.1.nip.io", "128.0.0.1", "::2", "::ffff:10.0.0.1", "localhost.", "127.1", "",
        ] {
            #expect(!Loopback.isLoopback(host: host), "\(host)")
        }
    }

    @Test func fileModeRoundTrip() {
        #expect(FileMode.parse("0640") == 0o640)
        #expect(FileMode.parse("640") == 0o640)
        #expect(FileMode.parse("01640") == nil)
        #expect(FileMode.parse("64") == nil)
        #expect(FileMode.format(0o600) == "0600")
    }

    @Test func anAllowedIDOutsideTheUserNamespaceIsRefusedAtLoad() throws {
        let folder = try TemporaryDirectory()
        // As under PrivateUsers=: root and the daemon's own uid mapped, nobody else.
        let map = try folder.write("uid_map", "         0          0          1\n       998        998          1\n")
        #expect(throws: ConfigurationError.self) {
            try ConfigurationLoader.checkVisible([998, 1001], key: "outputs.socket.allowUIDs", map: map)
        }
        try ConfigurationLoader.checkVisible([0, 998], key: "outputs.socket.allowUIDs", map: map)
        // The initial namespace sees every id.
        try ConfigurationLoader.checkVisible(
            [1001, 4_000_000_000],
            key: "outputs.socket.allowUIDs",
            map: "/proc/self/uid_map"
        )
    }
}
