#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Logging

/// Turns a JSON config document into a `Configuration`, or the first problem found.
///
/// Unknown keys are errors: a typo (`refreshAT`) silently ignored would run the daemon on defaults.
public struct ConfigurationParser {
    public init() {}

    public func parse(_ bytes: some Collection<UInt8>) throws(ConfigurationError) -> Configuration {
        let document: JSONValue
        do {
            document = try JSONValue.parse(bytes)
        } catch {
            throw ConfigurationError("(file)", "not valid JSON: \(Self.describe(decodingError: error))")
        }
        let root = try Object(document, path: "")
        try root.allowOnly(["api", "refresh", "outputs", "stateFile", "logLevel", "onRotate", "metricsFile"])

        let configuration = Configuration(
            api: try parseAPI(try root.object("api")),
            refresh: try parseRefresh(try root.optionalObject("refresh")),
            outputs: try parseOutputs(try root.object("outputs")),
            stateFile: try root.optionalString("stateFile").map { (path) throws(ConfigurationError) in try Self.absolutePath(path, at: root.path("stateFile")) },
            logLevel: try parseLogLevel(root),
            onRotate: try parseRotateActions(root),
            metricsFile: try root.optionalString("metricsFile").map { (path) throws(ConfigurationError) in try Self.absolutePath(path, at: root.path("metricsFile")) })
        return configuration
    }

    private func parseAPI(_ api: Object) throws(ConfigurationError) -> Configuration.API {
        try api.allowOnly([
            "baseURL", "tokenPath", "email", "emailFile", "password", "passwordFile", "apiKey", "apiKeyFile",
            "timeoutSeconds", "caFile",
        ])
        let baseURL = try api.string("baseURL")
        try Self.validateBaseURL(baseURL, at: api.path("baseURL"))
        let tokenPath = try api.optionalString("tokenPath") ?? "/auth/token"
        guard tokenPath.hasPrefix("/"), !tokenPath.contains(where: { $0 == "?" || $0 == "#" || $0.isWhitespace }) else {
            throw ConfigurationError(api.path("tokenPath"), "must be a path starting with \"/\" such as \"/auth/token\"")
        }
        let timeout = try api.optionalNumber("timeoutSeconds") ?? 30
        guard timeout > 0, timeout <= 300 else {
            throw ConfigurationError(api.path("timeoutSeconds"), "must be more than 0 and at most 300 seconds")
        }
        return Configuration.API(
            baseURL: baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL,
            tokenPath: tokenPath,
            email: try secret(api, key: "email", credential: "email"),
            password: try secret(api, key: "password", credential: "password"),
            apiKey: try secret(api, key: "apiKey", credential: "api-key"),
            timeoutSeconds: timeout,
            caFile: try api.optionalString("caFile").map { (path) throws(ConfigurationError) in try Self.absolutePath(path, at: api.path("caFile")) })
    }

    private func secret(_ api: Object, key: String, credential: String) throws(ConfigurationError) -> SecretSource {
        let inline = try api.optionalString(key)
        let file = try api.optionalString(key + "File")
        switch (inline, file) {
        case (.some, .some):
            throw ConfigurationError(api.path(key), "give either \(key) or \(key)File, not both")
        case (.some(let value), nil):
            guard !value.isEmpty else { throw ConfigurationError(api.path(key), "must not be empty") }
            return .inline(value)
        case (nil, .some(let path)):
            return .file(try Self.absolutePath(path, at: api.path(key + "File")))
        case (nil, nil):
            return .credential(credential)
        }
    }

    private func parseRefresh(_ refresh: Object?) throws(ConfigurationError) -> Configuration.Refresh {
        var result = Configuration.Refresh.defaults
        guard let refresh else { return result }
        try refresh.allowOnly(["refreshAt", "minRemainingSeconds", "jitter", "backoffInitialSeconds", "backoffMaxSeconds"])
        result.refreshAt = try refresh.optionalNumber("refreshAt") ?? result.refreshAt
        guard result.refreshAt > 0, result.refreshAt < 1 else {
            throw ConfigurationError(refresh.path("refreshAt"), "must be a share of the token lifetime, more than 0 and less than 1 (0.8 refreshes after 80%)")
        }
        result.minRemainingSeconds = try refresh.optionalNumber("minRemainingSeconds") ?? result.minRemainingSeconds
        guard result.minRemainingSeconds >= 0 else {
            throw ConfigurationError(refresh.path("minRemainingSeconds"), "must be 0 or more seconds")
        }
        result.jitter = try refresh.optionalNumber("jitter") ?? result.jitter
        guard result.jitter >= 0, result.jitter < result.refreshAt else {
            throw ConfigurationError(refresh.path("jitter"), "must be 0 or more and less than refreshAt (\(result.refreshAt))")
        }
        result.backoffInitialSeconds = try refresh.optionalNumber("backoffInitialSeconds") ?? result.backoffInitialSeconds
        guard result.backoffInitialSeconds >= 0.1 else {
            throw ConfigurationError(refresh.path("backoffInitialSeconds"), "must be at least 0.1 seconds")
        }
        result.backoffMaxSeconds = try refresh.optionalNumber("backoffMaxSeconds") ?? result.backoffMaxSeconds
        guard result.backoffMaxSeconds >= result.backoffInitialSeconds, result.backoffMaxSeconds <= 86_400 else {
            throw ConfigurationError(refresh.path("backoffMaxSeconds"), "must be at least backoffInitialSeconds (\(result.backoffInitialSeconds)) and at most 86400")
        }
        return result
    }

    private func parseOutputs(_ outputs: Object) throws(ConfigurationError) -> Configuration.Outputs {
        try outputs.allowOnly(["tokenFile", "jsonFile", "headersFile", "socket"])
        let headers = try outputs.optionalObject("headersFile")
        let result = Configuration.Outputs(
            tokenFile: try outputs.optionalObject("tokenFile").map { (o) throws(ConfigurationError) in try outputFile(o) },
            jsonFile: try outputs.optionalObject("jsonFile").map { (o) throws(ConfigurationError) in try outputFile(o) },
            headersFile: try headers.map { (o) throws(ConfigurationError) in
                Configuration.HeadersFile(
                    file: try outputFile(o, extraKeys: ["authorizationScheme"]),
                    authorizationScheme: try parseScheme(o))
            },
            socket: try outputs.optionalObject("socket").map { (o) throws(ConfigurationError) in try parseSocket(o) })
        guard !result.files.isEmpty || result.socket != nil else {
            throw ConfigurationError(outputs.path(nil), "configure at least one of tokenFile, jsonFile, headersFile, socket")
        }
        let paths = result.files.map(\.path) + (result.socket.map { [$0.path] } ?? [])
        if let duplicate = paths.first(where: { path in paths.filter { $0 == path }.count > 1 }) {
            throw ConfigurationError(outputs.path(nil), "two outputs write the same file \(duplicate)")
        }
        return result
    }

    private func parseScheme(_ headers: Object) throws(ConfigurationError) -> String {
        let scheme = try headers.optionalString("authorizationScheme") ?? TokenOutputs.defaultScheme
        guard scheme.utf8.allSatisfy({ ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) }) else {
            throw ConfigurationError(headers.path("authorizationScheme"), "must be letters only, such as \"Bearer\", or \"\" for the bare token")
        }
        return scheme
    }

    private func outputFile(_ file: Object, extraKeys: Set<String> = []) throws(ConfigurationError) -> Configuration.OutputFile {
        try file.allowOnly(Set(["path", "mode"]).union(extraKeys))
        let path = try Self.absolutePath(try file.string("path"), at: file.path("path"))
        guard !path.hasSuffix("/") else {
            throw ConfigurationError(file.path("path"), "must name a file, not a folder")
        }
        let mode = try parseMode(file, default: 0o640)
        guard mode & 0o002 == 0 else {
            throw ConfigurationError(file.path("mode"), "\(FileMode.format(mode)) lets anyone write the token; use \"0640\" or \"0600\"")
        }
        guard mode & 0o400 != 0 else {
            throw ConfigurationError(file.path("mode"), "\(FileMode.format(mode)) does not let the owner read the file")
        }
        return Configuration.OutputFile(path: path, mode: mode)
    }

    private func parseMode(_ object: Object, default defaultMode: UInt32) throws(ConfigurationError) -> UInt32 {
        switch object.value("mode") {
        case nil:
            return defaultMode
        case .string(let text):
            guard let parsed = FileMode.parse(text) else {
                throw ConfigurationError(object.path("mode"), "\"\(text)\" is not an octal file mode such as \"0640\"")
            }
            return parsed
        case .number(let number):
            throw ConfigurationError(object.path("mode"), "must be an octal string such as \"0640\", not the number \(FileMode.formatNumber(number)) (JSON numbers are decimal: 640 would mean 0o1200)")
        case .some(let other):
            throw ConfigurationError(object.path("mode"), "must be an octal string such as \"0640\", not \(other.typeName)")
        }
    }

    private func parseSocket(_ socket: Object) throws(ConfigurationError) -> Configuration.Socket {
        try socket.allowOnly(["path", "mode", "allowUIDs", "allowGIDs", "maxConnections"])
        let path = try Self.absolutePath(try socket.string("path"), at: socket.path("path"))
        // sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
        guard path.utf8.count <= 107 else {
            throw ConfigurationError(socket.path("path"), "longer than the 107 bytes a Unix socket path can have")
        }
        // Connecting needs write permission on the socket file: "0660" lets the group in.
        let mode = try parseMode(socket, default: 0o660)
        guard mode & 0o002 == 0 else {
            throw ConfigurationError(socket.path("mode"), "\(FileMode.format(mode)) lets every local user connect; use \"0660\" and a group, or allowUIDs/allowGIDs")
        }
        let maxConnections = try socket.optionalNumber("maxConnections") ?? Double(Configuration.Socket.defaultMaxConnections)
        guard maxConnections >= 1, maxConnections <= 65_536, maxConnections.rounded() == maxConnections else {
            throw ConfigurationError(socket.path("maxConnections"), "must be a whole number from 1 to 65536")
        }
        return Configuration.Socket(
            path: path, mode: mode,
            allowUIDs: try socket.optionalIDs("allowUIDs"), allowGIDs: try socket.optionalIDs("allowGIDs"),
            maxConnections: Int(maxConnections))
    }

    static let signalNames: [String: Int32] = ["HUP": SIGHUP, "INT": SIGINT, "TERM": SIGTERM, "USR1": SIGUSR1, "USR2": SIGUSR2]

    private func parseRotateActions(_ root: Object) throws(ConfigurationError) -> [RotateAction] {
        guard let value = root.value("onRotate") else { return [] }
        guard case .array(let items) = value else {
            throw ConfigurationError(root.path("onRotate"), "must be an array of actions, not \(value.typeName)")
        }
        var actions: [RotateAction] = []
        for (index, item) in items.enumerated() {
            let action = try Object(item, path: root.path("onRotate") + "[\(index)]")
            switch (action.value("exec"), action.value("signal")) {
            case (.some(let exec), nil):
                try action.allowOnly(["exec", "timeoutSeconds"])
                guard case .array(let words) = exec, !words.isEmpty else {
                    throw ConfigurationError(action.path("exec"), "must be a non-empty array of strings: the program and its arguments (no shell)")
                }
                var argv: [String] = []
                for word in words {
                    guard case .string(let text) = word, !text.contains("\0") else {
                        throw ConfigurationError(action.path("exec"), "must hold strings only")
                    }
                    argv.append(text)
                }
                _ = try Self.absolutePath(argv[0], at: action.path("exec") + "[0]")
                let timeout = try action.optionalNumber("timeoutSeconds") ?? 10
                guard timeout > 0, timeout <= 3600 else {
                    throw ConfigurationError(action.path("timeoutSeconds"), "must be more than 0 and at most 3600 seconds")
                }
                actions.append(.exec(argv: argv, timeoutSeconds: timeout))
            case (nil, .some):
                try action.allowOnly(["signal", "pidFile"])
                let text = try action.string("signal").uppercased()
                let name = text.hasPrefix("SIG") ? String(text.dropFirst(3)) : text
                guard let number = Self.signalNames[name] else {
                    throw ConfigurationError(action.path("signal"), "\"\(text)\" is not one of \(Self.signalNames.keys.sorted().joined(separator: ", "))")
                }
                let pidFile = try Self.absolutePath(try action.string("pidFile"), at: action.path("pidFile"))
                actions.append(.signal(number: number, name: name, pidFile: pidFile))
            case (.some, .some):
                throw ConfigurationError(action.path(nil), "give either exec or signal, not both")
            case (nil, nil):
                throw ConfigurationError(action.path(nil), "needs exec (a command) or signal with pidFile")
            }
        }
        return actions
    }

    private func parseLogLevel(_ root: Object) throws(ConfigurationError) -> Logger.Level {
        guard let text = try root.optionalString("logLevel") else { return .info }
        guard let level = Logger.Level(rawValue: text.lowercased()) else {
            let names = Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")
            throw ConfigurationError(root.path("logLevel"), "\"\(text)\" is not one of \(names)")
        }
        return level
    }

    static func absolutePath(_ path: String, at keyPath: String) throws(ConfigurationError) -> String {
        guard path.hasPrefix("/") else {
            throw ConfigurationError(keyPath, "must be an absolute path, got \"\(path)\"")
        }
        guard !path.split(separator: "/").contains(".."), !path.contains("\0") else {
            throw ConfigurationError(keyPath, "must not contain \"..\" or NUL")
        }
        return path
    }

    /// HTTPS always; plain HTTP only to this host, where nothing on the wire can read the password.
    static func validateBaseURL(_ text: String, at keyPath: String) throws(ConfigurationError) {
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), let host = url.host, !host.isEmpty else {
            throw ConfigurationError(keyPath, "\"\(text)\" is not a URL such as \"https://global-api.fintechstudios.com\"")
        }
        guard url.query == nil, url.fragment == nil, url.user == nil, url.password == nil else {
            throw ConfigurationError(keyPath, "must not carry a query, fragment or user info")
        }
        switch scheme {
        case "https":
            return
        case "http":
            let loopback = host == "localhost" || host.hasPrefix("127.") || host == "::1" || host == "[::1]"
            guard loopback else {
                throw ConfigurationError(keyPath, "plain http:// is allowed only to loopback (127.0.0.0/8, ::1, localhost); use https://")
            }
        default:
            throw ConfigurationError(keyPath, "scheme \"\(scheme)\" is not supported; use https://")
        }
    }

    static func describe(decodingError error: any Error) -> String {
        guard let decodingError = error as? DecodingError else { return "\(error)" }
        switch decodingError {
        case .dataCorrupted(let context): return (context.underlyingError.map { "\($0)" }) ?? context.debugDescription
        default: return "\(decodingError)"
        }
    }
}

/// Octal permission strings ("0640").
public enum FileMode {
    public static func parse(_ text: String) -> UInt32? {
        guard (3...4).contains(text.count), text.allSatisfy({ ("0"..."7").contains($0) }),
              let value = UInt32(text, radix: 8), value <= 0o777 else { return nil }
        return value
    }

    public static func format(_ mode: UInt32) -> String {
        let digits = String(mode, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    static func formatNumber(_ number: Double) -> String {
        number.rounded() == number && abs(number) < 1e15 ? String(Int64(number)) : String(number)
    }
}

/// A JSON object being validated, with the key path that leads to it.
private struct Object {
    let members: [String: JSONValue]
    let prefix: String

    init(_ value: JSONValue, path: String) throws(ConfigurationError) {
        guard case .object(let members) = value else {
            throw ConfigurationError(path.isEmpty ? "(file)" : path, "must be a JSON object, not \(value.typeName)")
        }
        self.members = members
        self.prefix = path
    }

    func path(_ key: String?) -> String {
        guard let key else { return prefix.isEmpty ? "(file)" : prefix }
        return prefix.isEmpty ? key : prefix + "." + key
    }

    func allowOnly(_ keys: Set<String>) throws(ConfigurationError) {
        if let unknown = members.keys.sorted().first(where: { !keys.contains($0) }) {
            throw ConfigurationError(path(unknown), "unknown key (known here: \(keys.sorted().joined(separator: ", ")))")
        }
    }

    /// The member, treating JSON null as absent.
    func value(_ key: String) -> JSONValue? {
        guard let value = members[key], value != .null else { return nil }
        return value
    }

    func object(_ key: String) throws(ConfigurationError) -> Object {
        guard let object = try optionalObject(key) else { throw ConfigurationError(path(key), "is required") }
        return object
    }

    func optionalObject(_ key: String) throws(ConfigurationError) -> Object? {
        guard let value = value(key) else { return nil }
        return try Object(value, path: path(key))
    }

    func string(_ key: String) throws(ConfigurationError) -> String {
        guard let string = try optionalString(key) else { throw ConfigurationError(path(key), "is required") }
        return string
    }

    func optionalString(_ key: String) throws(ConfigurationError) -> String? {
        switch value(key) {
        case nil: return nil
        case .string(let text): return text
        case .some(let other): throw ConfigurationError(path(key), "must be a string, not \(other.typeName)")
        }
    }

    /// A list of numeric user or group IDs.
    func optionalIDs(_ key: String) throws(ConfigurationError) -> [UInt32] {
        switch value(key) {
        case nil:
            return []
        case .array(let items):
            var ids: [UInt32] = []
            for item in items {
                guard case .number(let number) = item, number >= 0, number < 4_294_967_295, number.rounded() == number else {
                    throw ConfigurationError(path(key), "must list numeric IDs (whole numbers, 0 or more) such as [0, 1001]")
                }
                ids.append(UInt32(number))
            }
            return ids
        case .some(let other):
            throw ConfigurationError(path(key), "must be an array of numeric IDs, not \(other.typeName)")
        }
    }

    func optionalNumber(_ key: String) throws(ConfigurationError) -> Double? {
        switch value(key) {
        case nil: return nil
        case .number(let number) where number.isFinite: return number
        case .some(let other): throw ConfigurationError(path(key), "must be a number, not \(other.typeName)")
        }
    }
}
