import NIOSSL

/// A configuration with its secrets resolved: everything a login needs.
public struct LoadedConfiguration: Sendable, Equatable {
    public var configuration: Configuration
    public var secrets: LoginSecrets

    /// The account this configuration logs in as (see `StateStore.identity`).
    public var identity: String {
        StateStore.identity(baseURL: configuration.api.baseURL, email: secrets.email)
    }
}

/// Reads, validates and resolves a config file. Used at start and on every reload.
public struct ConfigurationLoader: Sendable {
    public var environment: [String: String]

    public init(environment: [String: String]) {
        self.environment = environment
    }

    public func load(path: String) throws(ConfigurationError) -> LoadedConfiguration {
        let contents: SmallFile.Contents
        do {
            contents = try SmallFile.read(path, limit: 1024 * 1024)
        } catch {
            throw ConfigurationError("(file)", "cannot read \(path): \(error)")
        }
        let configuration = try ConfigurationParser().parse(contents.bytes)
        let secrets = try SecretResolver(environment: environment).resolve(configuration.api, configFileMode: contents.mode)
        // Both end up in header lines: a newline would inject a header.
        guard secrets.apiKey.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw ConfigurationError("api.apiKey", "contains whitespace, control or non-ASCII characters")
        }
        guard !secrets.email.contains(where: { $0.isNewline }) else {
            throw ConfigurationError("api.email", "contains a line break")
        }
        if let caFile = configuration.api.caFile {
            // Checked now so that a wrong path is a configuration error, not a failed login per retry.
            do {
                guard !(try NIOSSLCertificate.fromPEMFile(caFile)).isEmpty else {
                    throw ConfigurationError("api.caFile", "\(caFile) holds no certificate")
                }
            } catch let error as ConfigurationError {
                throw error
            } catch {
                throw ConfigurationError("api.caFile", "cannot read \(caFile) as PEM certificates: \(error)")
            }
        }
        return LoadedConfiguration(configuration: configuration, secrets: secrets)
    }
}
