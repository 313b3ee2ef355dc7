import ArgumentParser
import Logging
import Systemd
import TokenDaemon

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the daemon: log in, keep the token files fresh, report to systemd."
    )

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let environment = ProcessInfo.processInfo.environment
        let logger = LogSetup.bootstrap(environment: environment)
        let loader = ConfigurationLoader(environment: environment)
        let loaded: LoadedConfiguration
        do {
            loaded = try loader.load(path: options.config)
        } catch {
            logger.critical("configuration error in \(options.config): \(error)", metadata: ["event": "config_error"])
            Notifier().notify(.status("configuration error: \(error)"))
            throw ExitCode(ExitStatus.configuration)
        }
        let daemon = Daemon(
            configPath: options.config,
            loaded: loaded,
            dependencies: .init(
                loader: loader,
                watchdogInterval: Watchdog.interval(),
                activatedSocket: SocketActivation.listenFDs().first,
                version: FTSTokend.version
            ),
            logger: logger
        )
        logger.info(
            "fts-tokend \(FTSTokend.version) starting",
            metadata: ["event": "starting", "config": "\(options.config)"]
        )
        let status = await daemon.run()
        if status != ExitStatus.success { throw ExitCode(status) }
    }
}
