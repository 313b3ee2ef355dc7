import ArgumentParser
import Glibc
import Logging
import Systemd
import TokenDaemon

/// The root command; `Entry` runs it.
struct FTSTokend: AsyncParsableCommand {
    static let version = "0.1.0"

    static let configuration = CommandConfiguration(
        commandName: "fts-tokend",
        abstract: "Keeps a valid FinTech Studios API token on disk for the other processes of a host.",
        discussion: """
            Exit codes: 0 success; 1 failure (a restart may help); 64 usage error; \
            78 configuration invalid or credentials rejected at start (a restart will not help).
            """,
        version: version,
        subcommands: [
            Run.self, Check.self, TokenCommand.self, StatusCommand.self, MockServer.self, Demo.self,
            SimulateCommand.self,
        ],
        defaultSubcommand: nil
    )
}

/// Options shared by the commands that read a config file.
struct ConfigOption: ParsableArguments {
    @Option(name: .shortAndLong, help: "Path of the JSON configuration.")
    var config = "/etc/fts-tokend/config.json"
}

/// Sets up swift-log once per process: structured journald entries when stderr is the journal,
/// else one line per event on stderr (with sd-daemon priority prefixes when journald reads it).
enum LogSetup {
    static func bootstrap(environment: [String: String]) -> Logger {
        switch (JournalStream.isStandardErrorJournal(environment: environment), Journal.isAvailable) {
        case (true, true): LoggingSystem.bootstrap { _ in JournalLogHandler(identifier: "fts-tokend") }
        case (true, false): LoggingSystem.bootstrap { _ in LineLogHandler(journalPrefixes: true) }
        case (false, _): LoggingSystem.bootstrap { _ in LineLogHandler(journalPrefixes: false) }
        }
        return Logger(label: "fts-tokend")
    }
}

/// Output for the person at the terminal, unbuffered so that it interleaves with log lines in order.
enum Console {
    /// Results, on stdout.
    static func out(_ message: String) {
        LineLogHandler.writeAll(message + "\n", to: STDOUT_FILENO)
    }

    /// Errors, on stderr.
    static func error(_ message: String) {
        LineLogHandler.standardError("fts-tokend: " + message + "\n")
    }
}
