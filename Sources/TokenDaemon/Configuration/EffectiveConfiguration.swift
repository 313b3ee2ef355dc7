#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The configuration in force as a config document (`fts-tokend check --show`): every key with its
/// value, defaults filled in, in the parser's spelling, so that the document parses back to the same
/// configuration. An inline secret appears as its fingerprint, never its value.
extension LoadedConfiguration {
    /// How each secret shows: `sha256:` and the first 8 hex characters of the value's SHA-256.
    public static func redacted(_ secret: String) -> String { "sha256:" + Fingerprint.of(secret) }

    /// Each secret with where it comes from and its fingerprint, for the lines below the document.
    /// The three secrets: their key under `api`, where each comes from, and its value.
    private var secretsByKey: [(key: String, source: SecretSource, value: String)] {
        let api = configuration.api
        return [
            ("email", api.email, secrets.email), ("password", api.password, secrets.password),
            ("apiKey", api.apiKey, secrets.apiKey),
        ]
    }

    public var secretSources: [(key: String, source: String, fingerprint: String)] {
        secretsByKey.map { key, source, value in
            let origin: String
            switch source {
            case .inline: origin = "the config file (inline)"
            case .file(let path): origin = "file \(path)"
            case .credential(let name): origin = "systemd credential \(name)"
            }
            return ("api." + key, origin, Self.redacted(value))
        }
    }

    public var effectiveDocument: JSONValue {
        let c = configuration
        var root: [String: JSONValue] = [
            "api": api(c.api),
            "refresh": refresh(c.refresh),
            "outputs": outputs(c.outputs),
            "logLevel": .string(c.logLevel.rawValue),
        ]
        root["stateFile"] = c.stateFile.map(JSONValue.string)
        root["metricsFile"] = c.metricsFile.map(JSONValue.string)
        if !c.onRotate.isEmpty { root["onRotate"] = .array(c.onRotate.map(rotateAction)) }
        if let fleet = c.fleet {
            // The URL holds no password (`DatabaseURL` rule 1).
            var object: [String: JSONValue] = ["url": .string(fleet.url.text)]
            object["passwordFile"] = fleet.passwordFile.map(JSONValue.string)
            object["caFile"] = fleet.caFile.map(JSONValue.string)
            object["member"] = fleet.member.map(JSONValue.string)
            root["fleet"] = .object(object)
        }
        return .object(root)
    }

    private func api(_ api: Configuration.API) -> JSONValue {
        var object: [String: JSONValue] = [
            "baseURL": .string(api.baseURL),
            "tokenPath": .string(api.tokenPath),
            "timeoutSeconds": .number(api.timeoutSeconds),
        ]
        object["caFile"] = api.caFile.map(JSONValue.string)
        for (key, source, value) in secretsByKey {
            switch source {
            case .inline: object[key] = .string(Self.redacted(value))
            case .file(let path): object[key + "File"] = .string(path)
            // No key at all is what names the credential.
            case .credential: break
            }
        }
        return .object(object)
    }

    private func refresh(_ refresh: Configuration.Refresh) -> JSONValue {
        .object([
            "refreshAt": .number(refresh.refreshAt),
            "minRemainingSeconds": .number(refresh.minRemainingSeconds),
            "jitter": .number(refresh.jitter),
            "backoffInitialSeconds": .number(refresh.backoffInitialSeconds),
            "backoffMaxSeconds": .number(refresh.backoffMaxSeconds),
            "minForcedRefreshSeconds": .number(refresh.minForcedRefreshSeconds),
        ])
    }

    private func outputs(_ outputs: Configuration.Outputs) -> JSONValue {
        func file(_ file: Configuration.OutputFile) -> [String: JSONValue] {
            ["path": .string(file.path), "mode": .string(FileMode.format(file.mode))]
        }
        func ids(_ ids: [UInt32]) -> JSONValue { .array(ids.map { .number(Double($0)) }) }
        var object: [String: JSONValue] = [:]
        object["tokenFile"] = outputs.tokenFile.map { .object(file($0)) }
        object["jsonFile"] = outputs.jsonFile.map { .object(file($0)) }
        object["headersFile"] = outputs.headersFile.map { headers in
            .object(file(headers.file).merging(["authorizationScheme": .string(headers.authorizationScheme)]) { $1 })
        }
        object["socket"] = outputs.socket.map { socket in
            .object([
                "path": .string(socket.path), "mode": .string(FileMode.format(socket.mode)),
                "allowUIDs": ids(socket.allowUIDs), "allowGIDs": ids(socket.allowGIDs),
                "maxConnections": .number(Double(socket.maxConnections)), "serveHeaders": .bool(socket.serveHeaders),
            ])
        }
        object["proxy"] = outputs.proxy.map { proxy in
            var members: [String: JSONValue] = [
                "path": .string(proxy.path), "mode": .string(FileMode.format(proxy.mode)),
                "allowUIDs": ids(proxy.allowUIDs), "allowGIDs": ids(proxy.allowGIDs),
                "upstream": .string(proxy.upstream),
                "rejectedStatuses": .array(proxy.rejectedStatuses.sorted().map { .number(Double($0)) }),
                "allowBrowsers": .bool(proxy.allowBrowsers),
                "maxRequestBodyBytes": .number(Double(proxy.maxRequestBodyBytes)),
                "connectTimeoutSeconds": .number(proxy.connectTimeoutSeconds),
                "timeoutSeconds": .number(proxy.timeoutSeconds),
                "maxConnections": .number(Double(proxy.maxConnections)),
                "maxUpstreamConnections": .number(Double(proxy.maxUpstreamConnections)),
                "denyPaths": .array(proxy.denyPaths.map(JSONValue.string)),
                "maxUpstreamConnectionsPerPeer": .number(Double(proxy.maxUpstreamConnectionsPerPeer)),
                "idleTimeoutSeconds": .number(proxy.idleTimeoutSeconds),
            ]
            members["listen"] = proxy.listen.map { .string($0.description) }
            members["caFile"] = proxy.caFile.map(JSONValue.string)
            return .object(members)
        }
        return .object(object)
    }

    private func rotateAction(_ action: RotateAction) -> JSONValue {
        switch action {
        case .exec(let argv, let timeoutSeconds):
            .object(["exec": .array(argv.map(JSONValue.string)), "timeoutSeconds": .number(timeoutSeconds)])
        case .signal(_, let name, let pidFile):
            .object(["signal": .string(name), "pidFile": .string(pidFile)])
        }
    }
}

extension JSONValue: Encodable {
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .object(let members): try container.encode(members)
        case .array(let items): try container.encode(items)
        case .string(let text): try container.encode(text)
        // Whole numbers as integers: a mode of 640 seconds reads as 640, not 640.0.
        case .number(let number) where number.rounded() == number && abs(number) < 1e15:
            try container.encode(Int64(number))
        case .number(let number): try container.encode(number)
        case .bool(let value): try container.encode(value)
        case .null: try container.encodeNil()
        }
    }

    /// Pretty-printed with sorted keys, slashes as they are.
    public func rendered() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        // Strings, numbers, booleans and nulls always encode.
        let text = (try? encoder.encode(self)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        // The encoder writes an empty array over three lines ("[", "", "]"): one reads better.
        var lines: [Substring] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.drop(while: { $0 == " " }).hasPrefix("]"), lines.count >= 2, lines[lines.count - 1].isEmpty,
                lines[lines.count - 2].hasSuffix("[")
            {
                lines.removeLast()
                lines[lines.count - 1] += line.drop(while: { $0 == " " })
            } else {
                lines.append(line)
            }
        }
        return lines.joined(separator: "\n")
    }
}
