import Foundation
import TestSupport
import Testing

@testable import TokenDaemon

@Suite struct SecretResolverTests {
    func api(
        email: SecretSource = .inline("svc@example.com"),
        password: SecretSource,
        apiKey: SecretSource
    ) -> Configuration.API {
        Configuration.API(
            baseURL: "https://x.example",
            tokenPath: "/auth/token",
            email: email,
            password: password,
            apiKey: apiKey,
            timeoutSeconds: 30,
            caFile: nil
        )
    }

    func resolveError(
        _ api: Configuration.API,
        mode: UInt32 = 0o600,
        environment: [String: String] = [:]
    ) -> ConfigurationError? {
        do {
            _ = try SecretResolver(environment: environment).resolve(api, configFileMode: mode)
            return nil
        } catch {
            return error
        }
    }

    @Test func inlineSecretsInAPrivateConfigAreAccepted() throws {
        let secrets = try SecretResolver(environment: [:]).resolve(
            api(password: .inline("pw"), apiKey: .inline("key")),
            configFileMode: 0o600
        )
        #expect(secrets == LoginSecrets(email: "svc@example.com", password: "pw", apiKey: "key"))
    }

    @Test(arguments: [UInt32(0o640), 0o644, 0o604])
    func inlineSecretsInAReadableConfigAreRefused(mode: UInt32) {
        let error = resolveError(api(password: .inline("pw"), apiKey: .file("/nonexistent")), mode: mode)
        #expect(error?.keyPath == "api.password")
        #expect(error?.problem.contains("chmod 600") == true)
        #expect(error?.problem.contains("pw") == false)
    }

    @Test func inlineEmailInAReadableConfigIsFine() throws {
        let folder = try TemporaryDirectory()
        let secrets = try SecretResolver(environment: [:]).resolve(
            api(
                password: .file(try folder.write("pw", "secret\n")),
                apiKey: .file(try folder.write("key", "k-1\r\n\n"))
            ),
            configFileMode: 0o644
        )
        #expect(secrets.password == "secret")
        #expect(secrets.apiKey == "k-1")
    }

    @Test func secretFilesKeepInnerWhitespaceAndTrimOnlyTrailingNewlines() throws {
        let folder = try TemporaryDirectory()
        let path = try folder.write("pw", " two words \n\n")
        let secrets = try SecretResolver(environment: [:]).resolve(
            api(password: .file(path), apiKey: .file(path)),
            configFileMode: 0o600
        )
        #expect(secrets.password == " two words ")
    }

    @Test func worldReadableSecretFileIsRefused() throws {
        let folder = try TemporaryDirectory()
        let path = try folder.write("pw", "secret", mode: 0o644)
        let error = resolveError(api(password: .file(path), apiKey: .file(path)))
        #expect(error?.keyPath == "api.passwordFile")
        #expect(error?.problem.contains("readable by everyone") == true)
        #expect(error?.problem.contains("chmod o-rwx") == true)
    }

    @Test func missingAndEmptySecretFilesAreNamed() throws {
        let folder = try TemporaryDirectory()
        let missing = resolveError(api(password: .file(folder.file("nope")), apiKey: .inline("k")))
        #expect(missing?.keyPath == "api.passwordFile")
        #expect(missing?.problem.contains("No such file") == true)
        let empty = resolveError(api(password: .file(try folder.write("pw", "\n")), apiKey: .inline("k")))
        #expect(empty?.problem.contains("is empty") == true)
    }

    @Test func credentialsComeFromTheCredentialsDirectory() throws {
        let folder = try TemporaryDirectory()
        try folder.write("creds/email", "svc@example.com\n")
        try folder.write("creds/password", "pw\n")
        try folder.write("creds/api-key", "key\n")
        let secrets = try SecretResolver(environment: ["CREDENTIALS_DIRECTORY": folder.file("creds")]).resolve(
            api(email: .credential("email"), password: .credential("password"), apiKey: .credential("api-key")),
            configFileMode: 0o644
        )
        #expect(secrets == LoginSecrets(email: "svc@example.com", password: "pw", apiKey: "key"))
    }

    @Test func missingCredentialSaysHowToProvideIt() {
        let error = resolveError(api(password: .credential("password"), apiKey: .inline("k")))
        #expect(error?.keyPath == "api.password")
        #expect(error?.problem.contains("LoadCredential=password") == true)
    }

    @Test func loginSecretsNeverPrintThemselves() {
        let secrets = LoginSecrets(email: "e", password: "hunter2", apiKey: "key-123")
        #expect(!"\(secrets)".contains("hunter2"))
        #expect(!String(reflecting: secrets).contains("key-123"))
    }
}

@Suite struct ConfigurationLoaderTests {
    @Test func loadsConfigAndSecrets() throws {
        let folder = try TemporaryDirectory()
        let key = try folder.write("key", "k-1\n")
        let path = try folder.write(
            "config.json",
            #"{"api":{"baseURL":"https://x.example","email":"e@x","password":"pw","apiKeyFile":"\#(key)"},"outputs":{"tokenFile":{"path":"/run/t"}}}"#,
            mode: 0o600
        )
        let loaded = try ConfigurationLoader(environment: [:]).load(path: path)
        #expect(loaded.secrets == LoginSecrets(email: "e@x", password: "pw", apiKey: "k-1"))
        #expect(loaded.identity == StateStore.identity(baseURL: "https://x.example", email: "e@x", apiKey: "k-1"))
    }

    @Test func missingConfigFileIsAConfigurationError() throws {
        let folder = try TemporaryDirectory()
        #expect(throws: ConfigurationError.self) {
            try ConfigurationLoader(environment: [:]).load(path: folder.file("none.json"))
        }
    }

    @Test func apiKeyThatCouldInjectAHeaderIsRefused() throws {
        let folder = try TemporaryDirectory()
        let key = try folder.write("key", "k-1\nX-Evil: 1")
        let path = try folder.write(
            "config.json",
            #"{"api":{"baseURL":"https://x.example","email":"e@x","password":"pw","apiKeyFile":"\#(key)"},"outputs":{"tokenFile":{"path":"/run/t"}}}"#
        )
        do {
            _ = try ConfigurationLoader(environment: [:]).load(path: path)
            Issue.record("expected an error")
        } catch {
            #expect(error.keyPath == "api.apiKey")
            #expect(!error.description.contains("Evil"))
        }
    }

    /// A config whose token file is `run/token` under `folder` and whose metrics file is `metrics/m.prom`.
    private func configWithOutputs(in folder: TemporaryDirectory) throws -> String {
        try folder.write(
            "config.json",
            #"{"api":{"baseURL":"https://x.example","email":"e@x","password":"pw","apiKey":"k"},"#
                + #""outputs":{"tokenFile":{"path":"\#(folder.file("run/token"))"}},"metricsFile":"\#(folder.file("metrics/m.prom"))"}"#,
            mode: 0o600
        )
    }

    /// The error loading `config` gives, or nil (recorded as an issue) when it loads.
    private func loadError(_ config: String, sourceLocation: SourceLocation = #_sourceLocation) -> ConfigurationError? {
        do {
            _ = try ConfigurationLoader(environment: [:]).load(path: config)
            Issue.record("expected an error", sourceLocation: sourceLocation)
            return nil
        } catch {
            return error
        }
    }

    @Test func aTokenFolderOthersCanWriteIsRefused() throws {
        let folder = try TemporaryDirectory()
        let config = try configWithOutputs(in: folder)
        let previous = try folder.write("run/token", "previous-token")
        chmod(folder.file("run"), 0o777)
        let error = loadError(config)
        #expect(error?.keyPath == "outputs.tokenFile.path")
        #expect(error?.description.contains("(mode 0777) is writable by other users") == true)
        #expect(folder.read("run/token") == "previous-token", "nothing written: \(previous)")
        // The same folder mode for the metrics file is fine: it holds no secret.
        chmod(folder.file("run"), 0o750)
        try FileManager.default.createDirectory(atPath: folder.file("metrics"), withIntermediateDirectories: true)
        chmod(folder.file("metrics"), 0o777)
        #expect(throws: Never.self) { try ConfigurationLoader(environment: [:]).load(path: config) }
    }

    @Test(.enabled(if: geteuid() == 0)) func aTokenFolderOfAnotherUserIsRefused() throws {
        let folder = try TemporaryDirectory()
        let config = try configWithOutputs(in: folder)
        try FileManager.default.createDirectory(atPath: folder.file("run"), withIntermediateDirectories: true)
        chown(folder.file("run"), 65534, 65534)
        chmod(folder.file("run"), 0o755)
        let error = loadError(config)
        #expect(error?.keyPath == "outputs.tokenFile.path")
        #expect(error?.description.contains("belongs to uid 65534, another user") == true)
    }

    /// A symlink the operator configured (as `/var/run` → `/run`) is resolved at load, so that the
    /// writes, which follow none, still reach the folder the operator meant.
    @Test func aSymlinkInAConfiguredPathIsResolvedAtLoad() throws {
        let folder = try TemporaryDirectory()
        try FileManager.default.createDirectory(atPath: folder.file("real"), withIntermediateDirectories: false)
        #expect(symlink(folder.file("real"), folder.file("link")) == 0)
        let config = try folder.write(
            "config.json",
            #"{"api":{"baseURL":"https://x.example","email":"e@x","password":"pw","apiKey":"k"},"#
                + #""outputs":{"tokenFile":{"path":"\#(folder.file("link/token"))"},"#
                + #""jsonFile":{"path":"\#(folder.file("link/new/token.json"))"}},"#
                + #""stateFile":"\#(folder.file("state/token.state"))"}"#
        )
        let loaded = try ConfigurationLoader(environment: [:]).load(path: config)
        #expect(loaded.configuration.outputs.tokenFile?.path == folder.file("real/token"))
        #expect(loaded.configuration.outputs.jsonFile?.path == folder.file("real/new/token.json"))
        #expect(loaded.configuration.stateFile == folder.file("state/token.state"))
    }

    @Test func aCAFileThatIsNotPEMIsAConfigurationError() throws {
        let folder = try TemporaryDirectory()
        let notPEM = try folder.write("ca.pem", "hello")
        let path = try folder.write(
            "config.json",
            #"{"api":{"baseURL":"https://x.example","email":"e@x","password":"pw","apiKey":"k","caFile":"\#(notPEM)"},"outputs":{"tokenFile":{"path":"/run/t"}}}"#
        )
        #expect(throws: ConfigurationError.self) { try ConfigurationLoader(environment: [:]).load(path: path) }
        let missing = try folder.write(
            "config2.json",
            #"{"api":{"baseURL":"https://x.example","email":"e@x","password":"pw","apiKey":"k","caFile":"\#(folder.file("none.pem"))"},"outputs":{"tokenFile":{"path":"/run/t"}}}"#
        )
        do {
            _ = try ConfigurationLoader(environment: [:]).load(path: missing)
            Issue.record("expected an error")
        } catch {
            #expect(error.keyPath == "api.caFile")
        }
    }
}
