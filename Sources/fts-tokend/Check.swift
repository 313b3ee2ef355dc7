import ArgumentParser
import TokenDaemon

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate the configuration and secrets; with --login, log in once.",
        discussion:
            "Prints the token's expiry and fingerprint, never the token. Exit 0 when all is well, 78 for a configuration error or rejected credentials, 1 for another login failure."
    )

    @OptionGroup var options: ConfigOption

    @Flag(help: "Also log in once and report the token's expiry and fingerprint.")
    var login = false

    @Flag(
        help:
            "Also print the configuration in force, defaults filled in, with each secret as its fingerprint (sha256: and 8 hex characters)."
    )
    var show = false

    func run() async throws {
        let loaded: LoadedConfiguration
        do {
            loaded = try ConfigurationLoader(environment: ProcessInfo.processInfo.environment).load(
                path: options.config
            )
        } catch {
            Console.error("configuration error in \(options.config): \(error)")
            throw ExitCode(ExitStatus.configuration)
        }
        let configuration = loaded.configuration
        Console.out("configuration OK: \(options.config)")
        for warning in loaded.warnings { Console.out("warning: \(warning)") }
        Console.out("  login:   POST \(configuration.api.tokenURL)")
        Console.out(
            "  outputs: \(configuration.outputs.files.map { "\($0.path) (\(FileMode.format($0.mode)))" }.joined(separator: ", "))"
        )
        Console.out("  state:   \(configuration.stateFile ?? "none (every start logs in)")")
        if show {
            Console.out("effective configuration (defaults filled in; secrets as their fingerprints):")
            Console.out(loaded.effectiveDocument.rendered())
            Console.out("secrets:")
            let width = loaded.secretSources.map(\.key.count).max() ?? 0
            for secret in loaded.secretSources {
                let key = secret.key + String(repeating: " ", count: width - secret.key.count)
                Console.out("  \(key)  \(secret.fingerprint)  from \(secret.source)")
            }
        }
        guard login else { return }

        let client = AuthClient(api: configuration.api, version: FTSTokend.version)
        do {
            let answer = try await client.login(loaded.secrets, now: { Date() })
            await client.shutdown()
            for warning in answer.warnings { Console.out("warning: \(warning)") }
            let grant = answer.grant
            Console.out(
                "login OK: token \(grant.fingerprint), expires \(FormatTime.iso8601(grant.expiresAt)) (valid \(FormatTime.duration(grant.lifetime)))"
            )
        } catch {
            await client.shutdown()
            Console.error("login failed: \(error)")
            throw ExitCode(error.kind == .rejected ? ExitStatus.configuration : ExitStatus.failure)
        }
    }
}
