import Glibc
import Logging

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Turns a JSON config document into a `Configuration`, or the first problem found.
///
/// Unknown keys are errors: each section accepts exactly the keys its code below reads
/// (`ConfigurationObject` records them), so a typo cannot leave a default in force.
public struct ConfigurationParser {
    public init() {}

    public func parse(_ bytes: some Collection<UInt8>) throws(ConfigurationError) -> Configuration {
        let document: JSONValue
        do {
            document = try JSONValue.parse(bytes)
        } catch {
            throw ConfigurationError("(file)", "not valid JSON: \(Self.describe(decodingError: error))")
        }
        return try ConfigurationObject.read(document, path: "") { (root) throws(ConfigurationError) in
            let api = try root.object("api", parseAPI)
            return Configuration(
                api: api,
                refresh: try root.optionalObject("refresh", parseRefresh) ?? .defaults,
                outputs: try root.object("outputs") { (outputs) throws(ConfigurationError) in
                    try parseOutputs(outputs, api: api)
                },
                stateFile: try root.optionalPath("stateFile"),
                logLevel: try parseLogLevel(root),
                onRotate: try parseRotateActions(root),
                metricsFile: try root.optionalPath("metricsFile"),
                fleet: try root.optionalObject("fleet", parseFleet)
            )
        }
    }

    private func parseAPI(_ api: ConfigurationObject) throws(ConfigurationError) -> Configuration.API {
        let baseURL = try api.string("baseURL")
        try ConfigurationValues.validateBaseURL(baseURL, at: api.path("baseURL"))
        let tokenPath = try api.optionalString("tokenPath") ?? "/auth/token"
        guard tokenPath.hasPrefix("/"), !tokenPath.contains(where: { $0 == "?" || $0 == "#" || $0.isWhitespace }) else {
            throw ConfigurationError(
                api.path("tokenPath"),
                "must be a path starting with \"/\" such as \"/auth/token\""
            )
        }
        return Configuration.API(
            baseURL: baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL,
            tokenPath: tokenPath,
            email: try secret(api, key: "email", credential: "email"),
            password: try secret(api, key: "password", credential: "password"),
            apiKey: try secret(api, key: "apiKey", credential: "api-key"),
            timeoutSeconds: try api.number("timeoutSeconds", default: 30, "must be more than 0 and at most 300 seconds")
            { $0 > 0 && $0 <= 300 },
            caFile: try api.optionalPath("caFile")
        )
    }

    private func parseFleet(_ fleet: ConfigurationObject) throws(ConfigurationError) -> Configuration.Fleet {
        let member = try fleet.optionalString("member")
        if let member {
            let allowed = member.unicodeScalars.allSatisfy {
                $0.isASCII
                    && ($0.properties.isAlphabetic || $0.properties.numericType != nil
                        || "._-@".unicodeScalars.contains($0))
            }
            guard allowed, !member.isEmpty, member.utf8.count <= Configuration.Fleet.maxMemberLength else {
                throw ConfigurationError(
                    fleet.path("member"),
                    "must be 1 to \(Configuration.Fleet.maxMemberLength) letters, digits, \".\", \"_\", \"-\" or \"@\""
                )
            }
        }
        return Configuration.Fleet(
            url: try DatabaseURL(try fleet.string("url"), at: fleet.path("url")),
            passwordFile: try fleet.optionalPath("passwordFile"),
            caFile: try fleet.optionalPath("caFile"),
            member: member
        )
    }

    private func secret(
        _ api: ConfigurationObject,
        key: String,
        credential: String
    ) throws(ConfigurationError) -> SecretSource {
        let inline = try api.optionalString(key)
        let file = try api.optionalString(key + "File")
        switch (inline, file) {
        case (.some, .some):
            throw ConfigurationError(api.path(key), "give either \(key) or \(key)File, not both")
        case (.some(let value), nil):
            guard !value.isEmpty else { throw ConfigurationError(api.path(key), "must not be empty") }
            return .inline(value)
        case (nil, .some(let path)):
            return .file(try ConfigurationValues.absolutePath(path, at: api.path(key + "File")))
        case (nil, nil):
            return .credential(credential)
        }
    }

    private func parseRefresh(_ refresh: ConfigurationObject) throws(ConfigurationError) -> Configuration.Refresh {
        let defaults = Configuration.Refresh.defaults
        let refreshAt = try refresh.number(
            "refreshAt",
            default: defaults.refreshAt,
            "must be a share of the token lifetime, more than 0 and less than 1 (0.8 refreshes after 80%)"
        ) { $0 > 0 && $0 < 1 }
        let backoffInitial = try refresh.number(
            "backoffInitialSeconds",
            default: defaults.backoffInitialSeconds,
            "must be at least 0.1 seconds"
        ) { $0 >= 0.1 }
        return Configuration.Refresh(
            refreshAt: refreshAt,
            minRemainingSeconds: try refresh.number(
                "minRemainingSeconds",
                default: defaults.minRemainingSeconds,
                "must be 0 or more seconds"
            ) { $0 >= 0 },
            jitter: try refresh.number(
                "jitter",
                default: defaults.jitter,
                "must be 0 or more and less than refreshAt (\(refreshAt))"
            ) { $0 >= 0 && $0 < refreshAt },
            backoffInitialSeconds: backoffInitial,
            backoffMaxSeconds: try refresh.number(
                "backoffMaxSeconds",
                default: defaults.backoffMaxSeconds,
                "must be at least backoffInitialSeconds (\(backoffInitial)) and at most 86400"
            ) {
                $0 >= backoffInitial && $0 <= 86_400
            },
            minForcedRefreshSeconds: try refresh.number(
                "minForcedRefreshSeconds",
                default: defaults.minForcedRefreshSeconds,
                "must be at least 1 and at most 86400 seconds (FTS throttles accounts that log in too often)"
            ) { $0 >= 1 && $0 <= 86_400 }
        )
    }

    private func parseOutputs(
        _ outputs: ConfigurationObject,
        api: Configuration.API
    ) throws(ConfigurationError) -> Configuration.Outputs {
        let result = Configuration.Outputs(
            tokenFile: try outputs.optionalObject("tokenFile") { (file) throws(ConfigurationError) in
                try outputFile(file)
            },
            jsonFile: try outputs.optionalObject("jsonFile") { (file) throws(ConfigurationError) in try outputFile(file)
            },
            headersFile: try outputs.optionalObject("headersFile") { (file) throws(ConfigurationError) in
                Configuration.HeadersFile(file: try outputFile(file), authorizationScheme: try parseScheme(file))
            },
            socket: try outputs.optionalObject("socket", parseSocket),
            proxy: try outputs.optionalObject("proxy") { (proxy) throws(ConfigurationError) in
                try parseProxy(proxy, api: api)
            }
        )
        guard !result.files.isEmpty || result.socket != nil || result.proxy != nil else {
            throw ConfigurationError(
                outputs.path(nil),
                "configure at least one of tokenFile, jsonFile, headersFile, socket, proxy"
            )
        }
        let paths = result.files.map(\.path) + [result.socket?.path, result.proxy?.path].compactMap { $0 }
        if let duplicate = paths.first(where: { path in paths.filter { $0 == path }.count > 1 }) {
            throw ConfigurationError(outputs.path(nil), "two outputs write the same file \(duplicate)")
        }
        return result
    }

    private func parseScheme(_ headers: ConfigurationObject) throws(ConfigurationError) -> String {
        let scheme = try headers.optionalString("authorizationScheme") ?? TokenOutputs.defaultScheme
        guard scheme.utf8.allSatisfy({ ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) }) else {
            throw ConfigurationError(
                headers.path("authorizationScheme"),
                "must be letters only, such as \"Bearer\", or \"\" for the bare token"
            )
        }
        return scheme
    }

    private func outputFile(_ file: ConfigurationObject) throws(ConfigurationError) -> Configuration.OutputFile {
        let path = try ConfigurationValues.absolutePath(try file.string("path"), at: file.path("path"))
        guard !path.hasSuffix("/") else {
            throw ConfigurationError(file.path("path"), "must name a file, not a folder")
        }
        let mode = try parseMode(file, default: 0o640)
        // Every consumer trusts what these files say: a reader who could also write could hand
        // the others a token (or a header line) of their own.
        guard mode & 0o022 == 0 else {
            throw ConfigurationError(
                file.path("mode"),
                "\(FileMode.format(mode)) lets \(mode & 0o002 != 0 ? "anyone" : "the group") write the token, which every "
                    + "consumer trusts; use \"0640\" or \"0600\""
            )
        }
        guard mode & 0o400 != 0 else {
            throw ConfigurationError(file.path("mode"), "\(FileMode.format(mode)) does not let the owner read the file")
        }
        return Configuration.OutputFile(path: path, mode: mode)
    }

    private func parseMode(
        _ object: ConfigurationObject,
        default defaultMode: UInt32
    ) throws(ConfigurationError) -> UInt32 {
        switch object.value("mode") {
        case nil:
            return defaultMode
        case .string(let text):
            guard let parsed = FileMode.parse(text) else {
                throw ConfigurationError(object.path("mode"), "\"\(text)\" is not an octal file mode such as \"0640\"")
            }
            return parsed
        case .number(let number):
            throw ConfigurationError(
                object.path("mode"),
                "must be an octal string such as \"0640\", not the number \(FileMode.formatNumber(number)) (JSON numbers are decimal: 640 would mean 0o1200)"
            )
        case .some(let other):
            throw ConfigurationError(
                object.path("mode"),
                "must be an octal string such as \"0640\", not \(other.typeName)"
            )
        }
    }

    private func parseSocket(_ socket: ConfigurationObject) throws(ConfigurationError) -> Configuration.Socket {
        let path = try unixSocketPath(socket)
        let mode = try socketMode(socket)
        return Configuration.Socket(
            path: path,
            mode: mode,
            allowUIDs: try allowList(socket, "allowUIDs"),
            allowGIDs: try allowList(socket, "allowGIDs"),
            maxConnections: try connectionLimit(
                socket,
                "maxConnections",
                default: Configuration.Socket.defaultMaxConnections
            ),
            serveHeaders: try socket.optionalBool("serveHeaders") ?? false
        )
    }

    private func parseProxy(
        _ proxy: ConfigurationObject,
        api: Configuration.API
    ) throws(ConfigurationError) -> Configuration.Proxy {
        let path = try unixSocketPath(proxy, default: Configuration.Proxy.defaultPath)
        let mode = try socketMode(proxy)
        var upstream = api.baseURL
        if let text = try proxy.optionalString("upstream") {
            try ConfigurationValues.validateBaseURL(text, at: proxy.path("upstream"))
            upstream = text.hasSuffix("/") ? String(text.dropLast()) : text
        }
        let listen = try proxy.optionalString("listen").map { (text) throws(ConfigurationError) in
            try ConfigurationValues.listenAddress(text, at: proxy.path("listen"))
        }
        let statuses = try proxy.optionalNumbers("rejectedStatuses") ?? [401]
        guard !statuses.isEmpty, statuses.allSatisfy({ $0.rounded() == $0 && (400...599).contains($0) }) else {
            throw ConfigurationError(
                proxy.path("rejectedStatuses"),
                "must list one or more HTTP error statuses (400 to 599) such as [401]"
            )
        }
        let maxUpstream = try connectionLimit(
            proxy,
            "maxUpstreamConnections",
            default: Configuration.Proxy.defaultMaxUpstreamConnections
        )
        let perPeer = Int(
            try proxy.number(
                "maxUpstreamConnectionsPerPeer",
                default: Double(Configuration.Proxy.defaultPerPeer(maxUpstream)),
                "must be a whole number from 1 to maxUpstreamConnections (\(maxUpstream))"
            ) { $0 >= 1 && $0 <= Double(maxUpstream) && $0.rounded() == $0 }
        )
        let denyPaths = try proxy.optionalStrings("denyPaths") ?? Configuration.Proxy.defaultDenyPaths(api)
        guard denyPaths.allSatisfy({ $0.hasPrefix("/") && !$0.contains(where: { $0 == "?" || $0 == "#" }) }) else {
            throw ConfigurationError(
                proxy.path("denyPaths"),
                "must list paths on the upstream (\"/auth/\", \"/auth/token\"), with no query"
            )
        }
        return Configuration.Proxy(
            path: path,
            mode: mode,
            allowUIDs: try allowList(proxy, "allowUIDs"),
            allowGIDs: try allowList(proxy, "allowGIDs"),
            listen: listen,
            upstream: upstream,
            caFile: try proxy.optionalPath("caFile") ?? api.caFile,
            rejectedStatuses: Set(statuses.map { Int($0) }),
            allowBrowsers: try proxy.optionalBool("allowBrowsers") ?? false,
            maxRequestBodyBytes: Int(
                try proxy.number(
                    "maxRequestBodyBytes",
                    default: Double(Configuration.Proxy.defaultMaxRequestBodyBytes),
                    "must be a whole number of bytes from 0 to 1099511627776"
                ) { $0 >= 0 && $0 <= 1_099_511_627_776 && $0.rounded() == $0 }
            ),
            connectTimeoutSeconds: try proxy.number(
                "connectTimeoutSeconds",
                default: 10,
                "must be more than 0 and at most 300 seconds"
            ) { $0 > 0 && $0 <= 300 },
            timeoutSeconds: try proxy.number(
                "timeoutSeconds",
                default: 60,
                "must be more than 0 and at most 3600 seconds"
            ) { $0 > 0 && $0 <= 3600 },
            maxConnections: try connectionLimit(
                proxy,
                "maxConnections",
                default: Configuration.Socket.defaultMaxConnections
            ),
            maxUpstreamConnections: maxUpstream,
            denyPaths: denyPaths,
            maxUpstreamConnectionsPerPeer: perPeer,
            idleTimeoutSeconds: try proxy.number(
                "idleTimeoutSeconds",
                default: Configuration.Proxy.defaultIdleTimeoutSeconds,
                "must be more than 0 and at most 3600 seconds"
            ) { $0 > 0 && $0 <= 3600 }
        )
    }

    private func connectionLimit(
        _ object: ConfigurationObject,
        _ key: String,
        default defaultValue: Int
    ) throws(ConfigurationError) -> Int {
        Int(
            try object.number(key, default: Double(defaultValue), "must be a whole number from 1 to 65536") {
                $0 >= 1 && $0 <= 65_536 && $0.rounded() == $0
            }
        )
    }

    /// `path` of a Unix socket (`defaultPath` when absent and not nil).
    private func unixSocketPath(
        _ object: ConfigurationObject,
        default defaultPath: String? = nil
    ) throws(ConfigurationError) -> String {
        let text: String
        if let defaultPath {
            text = try object.optionalString("path") ?? defaultPath
        } else {
            text = try object.string("path")
        }
        let path = try ConfigurationValues.absolutePath(text, at: object.path("path"))
        // sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
        guard path.utf8.count <= 107 else {
            throw ConfigurationError(object.path("path"), "longer than the 107 bytes a Unix socket path can have")
        }
        return path
    }

    /// A socket's `mode`: connecting needs write permission on the socket file, so "0660" lets the
    /// group in, and a mode that lets every local user in is refused.
    private func socketMode(_ object: ConfigurationObject) throws(ConfigurationError) -> UInt32 {
        let mode = try parseMode(object, default: 0o660)
        guard mode & 0o002 == 0 else {
            throw ConfigurationError(
                object.path("mode"),
                "\(FileMode.format(mode)) lets every local user connect; use \"0660\" and a group, or allowUIDs/allowGIDs"
            )
        }
        return mode
    }

    /// The overflow id: in a user namespace every peer that cannot be mapped appears as it.
    static let overflowID: UInt32 = 65534

    private func allowList(_ socket: ConfigurationObject, _ key: String) throws(ConfigurationError) -> [UInt32] {
        let ids = try socket.optionalIDs(key)
        guard !ids.contains(Self.overflowID) else {
            throw ConfigurationError(
                socket.path(key),
                "65534 is the overflow id (nobody/nogroup): wherever the daemon runs in a user namespace, every peer it "
                    + "cannot map appears as 65534, so listing it would let everyone in"
            )
        }
        return ids
    }

    static let signalNames: [String: Int32] = [
        "HUP": SIGHUP, "INT": SIGINT, "TERM": SIGTERM, "USR1": SIGUSR1, "USR2": SIGUSR2,
    ]

    private func parseRotateActions(_ root: ConfigurationObject) throws(ConfigurationError) -> [RotateAction] {
        guard let value = root.value("onRotate") else { return [] }
        guard case .array(let items) = value else {
            throw ConfigurationError(root.path("onRotate"), "must be an array of actions, not \(value.typeName)")
        }
        var actions: [RotateAction] = []
        for (index, item) in items.enumerated() {
            actions.append(
                try ConfigurationObject.read(item, path: root.path("onRotate") + "[\(index)]", parseRotateAction)
            )
        }
        return actions
    }

    private func parseRotateAction(_ action: ConfigurationObject) throws(ConfigurationError) -> RotateAction {
        switch (action.value("exec"), action.value("signal")) {
        case (.some(let exec), nil):
            guard case .array(let words) = exec, !words.isEmpty else {
                throw ConfigurationError(
                    action.path("exec"),
                    "must be a non-empty array of strings: the program and its arguments (no shell)"
                )
            }
            var argv: [String] = []
            for word in words {
                guard case .string(let text) = word, !text.contains("\0") else {
                    throw ConfigurationError(action.path("exec"), "must hold strings only")
                }
                argv.append(text)
            }
            _ = try ConfigurationValues.absolutePath(argv[0], at: action.path("exec") + "[0]")
            let timeout = try action.number(
                "timeoutSeconds",
                default: 10,
                "must be more than 0 and at most 3600 seconds"
            ) { $0 > 0 && $0 <= 3600 }
            return .exec(argv: argv, timeoutSeconds: timeout)
        case (nil, .some):
            let text = try action.string("signal").uppercased()
            let name = text.hasPrefix("SIG") ? String(text.dropFirst(3)) : text
            guard let number = Self.signalNames[name] else {
                throw ConfigurationError(
                    action.path("signal"),
                    "\"\(text)\" is not one of \(Self.signalNames.keys.sorted().joined(separator: ", "))"
                )
            }
            let pidFile = try ConfigurationValues.absolutePath(try action.string("pidFile"), at: action.path("pidFile"))
            return .signal(number: number, name: name, pidFile: pidFile)
        case (.some, .some):
            throw ConfigurationError(action.path(nil), "give either exec or signal, not both")
        case (nil, nil):
            throw ConfigurationError(action.path(nil), "needs exec (a command) or signal with pidFile")
        }
    }

    private func parseLogLevel(_ root: ConfigurationObject) throws(ConfigurationError) -> Logger.Level {
        guard let text = try root.optionalString("logLevel") else { return .info }
        guard let level = Logger.Level(rawValue: text.lowercased()) else {
            let names = Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")
            throw ConfigurationError(root.path("logLevel"), "\"\(text)\" is not one of \(names)")
        }
        return level
    }

    static func describe(decodingError error: any Error) -> String {
        guard let decodingError = error as? DecodingError else { return "\(error)" }
        switch decodingError {
        case .dataCorrupted(let context): return (context.underlyingError.map { "\($0)" }) ?? context.debugDescription
        default: return "\(decodingError)"
        }
    }
}
