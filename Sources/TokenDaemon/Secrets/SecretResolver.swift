import Glibc
import Systemd

/// Reads each secret from where the configuration says it lives.
///
/// Rules (README "Secrets"): inline values are refused for `password` and `apiKey` when the config file
/// is readable by group or others; secret files readable by others are refused; trailing newlines are
/// trimmed; an empty secret is an error. Every failure is a `ConfigurationError` naming the key.
public struct SecretResolver: Sendable {
    public var environment: [String: String]

    public init(environment: [String: String]) {
        self.environment = environment
    }

    /// - Parameter configFileMode: permission bits of the config file, to judge inline secrets.
    public func resolve(_ api: Configuration.API, configFileMode: UInt32) throws(ConfigurationError) -> LoginSecrets {
        LoginSecrets(
            email: try value(api.email, key: "api.email", configFileMode: nil),
            password: try value(api.password, key: "api.password", configFileMode: configFileMode),
            apiKey: try value(api.apiKey, key: "api.apiKey", configFileMode: configFileMode)
        )
    }

    /// The fleet database's password: `fleet.passwordFile`, else the systemd credential
    /// `fleet-password` when present, else none (peer authentication on a Unix socket).
    public func fleetPassword(_ fleet: Configuration.Fleet) throws(ConfigurationError) -> String? {
        if let path = fleet.passwordFile {
            return try read(path, key: "fleet.passwordFile", refuseWorldReadable: true)
        }
        let name = Configuration.Fleet.passwordCredential
        guard let directory = Credentials.directory(environment: environment),
            access(directory + "/" + name, F_OK) == 0
        else { return nil }
        return try read(directory + "/" + name, key: "credential \"\(name)\"", refuseWorldReadable: false)
    }

    private func value(
        _ source: SecretSource,
        key: String,
        configFileMode: UInt32?
    ) throws(ConfigurationError) -> String {
        switch source {
        case .inline(let value):
            if let mode = configFileMode, mode & 0o077 != 0 {
                throw ConfigurationError(
                    key,
                    "inline secret in a config file readable by group or others (mode \(FileMode.format(mode))): run `chmod 600` on the config file, or move the value to \(key)File or the systemd credential"
                )
            }
            return value
        case .file(let path):
            return try read(path, key: key + "File", refuseWorldReadable: true)
        case .credential(let name):
            guard let directory = Credentials.directory(environment: environment) else {
                throw ConfigurationError(
                    key,
                    "not set: give \(key) or \(key)File in the config, or the systemd credential \"\(name)\" (LoadCredential=\(name):/etc/fts-tokend/credentials/\(name))"
                )
            }
            return try read(directory + "/" + name, key: "credential \"\(name)\"", refuseWorldReadable: false)
        }
    }

    private func read(_ path: String, key: String, refuseWorldReadable: Bool) throws(ConfigurationError) -> String {
        let contents: SmallFile.Contents
        do {
            contents = try SmallFile.read(path, limit: 64 * 1024)
        } catch {
            throw ConfigurationError(key, "cannot read \(path): \(error)")
        }
        if refuseWorldReadable, contents.mode & 0o004 != 0 {
            throw ConfigurationError(
                key,
                "\(path) is readable by everyone (mode \(FileMode.format(contents.mode))): run `chmod o-rwx \(path)`"
            )
        }
        var text = String(decoding: contents.bytes, as: UTF8.self)
        while let last = text.last, last.isNewline { text.removeLast() }
        guard !text.isEmpty else { throw ConfigurationError(key, "\(path) is empty") }
        return text
    }
}
