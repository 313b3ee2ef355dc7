import Logging

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The daemon's validated configuration. Every key is documented in README.md ("Configuration").
public struct Configuration: Sendable, Equatable {
    public var api: API
    public var refresh: Refresh
    public var outputs: Outputs
    /// Where the last token is kept (mode 0600) so that a restart needs no login; nil keeps nothing.
    public var stateFile: String?
    public var logLevel: Logger.Level
    /// Run after every new token is on disk.
    public var onRotate: [RotateAction] = []
    /// node_exporter textfile to write the metrics to, atomically.
    public var metricsFile: String?

    public struct API: Sendable, Equatable {
        public var baseURL: String
        public var tokenPath: String
        public var email: SecretSource
        public var password: SecretSource
        public var apiKey: SecretSource
        public var timeoutSeconds: Double
        /// PEM bundle of extra trust roots for a private CA, added to the system's.
        public var caFile: String?

        /// The full login URL.
        public var tokenURL: String { baseURL + tokenPath }
    }

    public struct Refresh: Sendable, Equatable {
        /// Share of a token's lifetime after which it is refreshed (0 < refreshAt < 1).
        public var refreshAt: Double
        /// A refresh is never scheduled later than this many seconds before expiry.
        public var minRemainingSeconds: Double
        /// Up to this share of the lifetime is taken off the refresh time at random, to spread a fleet.
        public var jitter: Double
        public var backoffInitialSeconds: Double
        public var backoffMaxSeconds: Double
        /// Least time between two logins forced by rejected-token reports: FTS throttles or
        /// disables accounts that log in too often, whatever the reason.
        public var minForcedRefreshSeconds: Double = 30

        public static let defaults = Refresh(
            refreshAt: 0.8,
            minRemainingSeconds: 120,
            jitter: 0.05,
            backoffInitialSeconds: 1,
            backoffMaxSeconds: 300
        )
    }

    public struct OutputFile: Sendable, Equatable {
        public var path: String
        /// Permission bits, applied exactly (the umask does not matter).
        public var mode: UInt32
    }

    public struct HeadersFile: Sendable, Equatable {
        public var file: OutputFile
        /// Scheme before the token in the `Authorization` line; empty writes the bare token.
        public var authorizationScheme: String
    }

    /// The Unix socket server (README "Socket API").
    public struct Socket: Sendable, Equatable {
        public var path: String
        public var mode: UInt32
        /// When either list is non-empty, only peers whose uid is in `allowUIDs` or whose gid is in
        /// `allowGIDs` are served; root is not implicitly allowed.
        public var allowUIDs: [UInt32]
        public var allowGIDs: [UInt32]
        public var maxConnections: Int
        /// Serve `/headers` (which carries the API key) even without `outputs.headersFile`.
        public var serveHeaders = false

        public static let defaultMaxConnections = 512

        public var restrictsPeers: Bool { !allowUIDs.isEmpty || !allowGIDs.isEmpty }
    }

    public struct Outputs: Sendable, Equatable {
        public var tokenFile: OutputFile?
        public var jsonFile: OutputFile?
        public var headersFile: HeadersFile?
        public var socket: Socket?

        /// Whether the socket serves `/headers`: the API key goes out only where the operator put it
        /// in a file already, or asked for it (`outputs.socket.serveHeaders`).
        public var servesHeaders: Bool { headersFile != nil || socket?.serveHeaders == true }

        /// Every configured file, in the order they are written.
        public var files: [OutputFile] {
            [tokenFile, jsonFile, headersFile?.file].compactMap { $0 }
        }
    }
}

/// Where a secret comes from. Resolved to its value by `SecretResolver`.
public enum SecretSource: Sendable, Equatable {
    /// Written in the config file itself.
    case inline(String)
    /// Read from a file (`…File` key); trailing newlines are trimmed.
    case file(String)
    /// Read from the systemd credential of this name in `$CREDENTIALS_DIRECTORY`.
    case credential(String)
}

/// Something to do after every new token is on disk (README "onRotate").
public enum RotateAction: Sendable, Equatable {
    /// Run `argv` (no shell) and kill its process group after `timeoutSeconds`.
    case exec(argv: [String], timeoutSeconds: Double)
    /// Send `signal` to the process whose PID is in `pidFile`.
    case signal(number: Int32, name: String, pidFile: String)
}
