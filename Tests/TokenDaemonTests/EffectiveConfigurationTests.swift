import Foundation
import Testing

@testable import TokenDaemon

/// `fts-tokend check --show`: the configuration in force as a document that parses back to it, with
/// every key the parser accepts, and no secret's value.
@Suite struct EffectiveConfigurationTests {
    static let secrets = LoginSecrets(email: "svc@example.com", password: "pw-\(UUID())", apiKey: "key-\(UUID())")

    /// A config that sets every optional key, with its secrets `inline` or from files.
    static func everyKey(inline: Bool) throws -> LoadedConfiguration {
        let bytes = config { object in
            ManualPageTests.everything(&object)
            if inline {
                set(&object, "api.passwordFile", nil)
                set(&object, "api.apiKeyFile", nil)
                set(&object, "api.password", secrets.password)
                set(&object, "api.apiKey", secrets.apiKey)
            } else {
                set(&object, "api.email", nil)
                set(&object, "api.emailFile", "/etc/fts-tokend/email")
            }
            set(&object, "api.caFile", "/etc/ssl/private-ca.pem")
            set(&object, "refresh.minForcedRefreshSeconds", 45)
            set(&object, "outputs.headersFile.authorizationScheme", "")
            set(
                &object,
                "outputs.socket",
                [
                    "path": "/run/fts-tokend/tokend.sock", "mode": "0600", "allowUIDs": [1001],
                    "allowGIDs": [2001, 2002],
                    "maxConnections": 64, "serveHeaders": true,
                ]
            )
            set(
                &object,
                "outputs.proxy",
                [
                    "path": "/run/fts-tokend/api.sock", "mode": "0660", "allowUIDs": [1001], "allowGIDs": [],
                    "listen": "127.0.0.1:8089", "upstream": "https://api.example.com",
                    "caFile": "/etc/ssl/upstream.pem",
                    "rejectedStatuses": [403, 401], "allowBrowsers": true, "maxRequestBodyBytes": 1024,
                    "connectTimeoutSeconds": 2.5, "timeoutSeconds": 90, "maxConnections": 100,
                    "maxUpstreamConnections": 8,
                ]
            )
            object["onRotate"] = [
                ["exec": ["/usr/bin/systemctl", "reload", "app.service"], "timeoutSeconds": 5],
                ["signal": "USR1", "pidFile": "/run/app.pid"],
            ]
            object["logLevel"] = "debug"
            set(
                &object,
                "fleet",
                [
                    "url": "postgresql://fts_tokend@db.internal:5433/fts_tokend?sslmode=require",
                    "passwordFile": "/etc/fts-tokend/fleet-password", "caFile": "/etc/fts-tokend/db-ca.pem",
                    "member": "web-01",
                ]
            )
        }
        return LoadedConfiguration(configuration: try ConfigurationParser().parse(bytes), secrets: secrets)
    }

    /// Dotted paths of every key in `value`, arrays of objects as `[]`.
    static func keys(_ value: JSONValue, prefix: String = "") -> Set<String> {
        switch value {
        case .object(let members):
            return members.reduce(into: Set<String>()) { keys, member in
                let path = prefix.isEmpty ? member.key : prefix + "." + member.key
                keys.insert(path)
                keys.formUnion(Self.keys(member.value, prefix: path))
            }
        case .array(let items):
            return items.reduce(into: Set<String>()) { $0.formUnion(Self.keys($1, prefix: prefix + "[]")) }
        default:
            return []
        }
    }

    @Test(arguments: [true, false])
    func theShownDocumentParsesBackToTheSameConfiguration(inline: Bool) throws {
        let loaded = try Self.everyKey(inline: inline)
        let reparsed = try ConfigurationParser().parse(Array(loaded.effectiveDocument.rendered().utf8))
        var expected = loaded.configuration
        // Inline secrets come back as their fingerprints: the only difference allowed.
        for path in [\Configuration.API.email, \.password, \.apiKey] {
            if case .inline(let value) = expected.api[keyPath: path] {
                expected.api[keyPath: path] = .inline(LoadedConfiguration.redacted(value))
            }
        }
        #expect(reparsed == expected)
    }

    @Test func everyKeyTheParserAcceptsIsShown() throws {
        let accepted = ManualPageTests.allAcceptedKeys()
        let fileForms: Set = ["api.emailFile", "api.passwordFile", "api.apiKeyFile"]
        let inlineKeys = Self.keys(try Self.everyKey(inline: true).effectiveDocument)
        #expect(
            accepted.subtracting(fileForms).subtracting(inlineKeys).isEmpty,
            "accepted but not shown: \(accepted.subtracting(fileForms).subtracting(inlineKeys).sorted())"
        )
        #expect(
            inlineKeys.subtracting(accepted).isEmpty,
            "shown but not accepted: \(inlineKeys.subtracting(accepted).sorted())"
        )
        let fileKeys = Self.keys(try Self.everyKey(inline: false).effectiveDocument)
        #expect(fileKeys.isSuperset(of: fileForms))
        #expect(fileKeys.isDisjoint(with: ["api.email", "api.password", "api.apiKey"]))
    }

    @Test func noSecretIsShownOnlyItsFingerprint() throws {
        let loaded = try Self.everyKey(inline: true)
        let text =
            loaded.effectiveDocument.rendered()
            + loaded.secretSources.map { "\($0.key) \($0.fingerprint) \($0.source)" }.joined(separator: "\n")
        for secret in [Self.secrets.email, Self.secrets.password, Self.secrets.apiKey] {
            #expect(!text.contains(secret))
            #expect(text.contains("sha256:" + Fingerprint.of(secret)))
        }
        let fromFiles = try Self.everyKey(inline: false).secretSources
        #expect(
            fromFiles.map(\.source) == [
                "file /etc/fts-tokend/email", "file /etc/fts-tokend/password", "file /etc/fts-tokend/api-key",
            ]
        )
    }
}
