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
    /// Fleet mode (README "Fleet"): the hosts of one account share one token through PostgreSQL.
    /// Nil: this host alone, as without it.
    public var fleet: Fleet? = nil

    /// `fleet`: where the members meet, and who this one is.
    public struct Fleet: Sendable, Equatable {
        public var url: DatabaseURL
        /// `fleet.passwordFile`; without it the systemd credential `fleet-password` is read when
        /// present, and with neither no password is sent (peer authentication on a Unix socket).
        public var passwordFile: String?
        /// PEM bundle of extra trust roots for the database's certificate, added to the system's.
        public var caFile: String?
        /// This member's name in the table and the logs; nil: the host name (with the instance's
        /// name for `fts-tokend@NAME`).
        public var member: String?

        public static let passwordCredential = "fleet-password"
        /// At most this long, of letters, digits and `.`, `_`, `-`, `@`: a name that reads the same
        /// in SQL, logs and metrics labels.
        public static let maxMemberLength = 64
    }

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
        /// The log-in endpoint's path on its server: `baseURL`'s own path, then `tokenPath`.
        public var tokenPathOnServer: String {
            // "https://host:port/base": the path starts at the first "/" after the scheme's "//".
            let afterScheme = baseURL.split(separator: "/", maxSplits: 3, omittingEmptySubsequences: false)
            guard afterScheme.count == 4 else { return tokenPath }
            return "/" + afterScheme[3] + tokenPath
        }
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

    /// The API proxy (README "Consumers"): forwards requests to `upstream` with the daemon's
    /// credentials in place of the client's.
    public struct Proxy: Sendable, Equatable {
        /// The Unix socket; same mode and allow-list rules as `outputs.socket`.
        public var path: String
        public var mode: UInt32
        public var allowUIDs: [UInt32]
        public var allowGIDs: [UInt32]
        /// A loopback TCP listener besides the socket; any local user can reach it.
        public var listen: ListenAddress?
        /// Where requests go: `api.baseURL` unless set; same https/loopback rule.
        public var upstream: String
        /// Extra trust roots for the upstream (`api.caFile` unless set).
        public var caFile: String?
        /// Upstream answers meaning "this token is rejected" (reported, then replayed once).
        public var rejectedStatuses: Set<Int>
        /// Serve requests with `Origin` or `Sec-Fetch-Site: cross-site` on the TCP listener.
        public var allowBrowsers: Bool
        public var maxRequestBodyBytes: Int
        /// Longest wait for the upstream: its connection (`connectTimeoutSeconds`), and each read of
        /// its answer (`timeoutSeconds`).
        public var connectTimeoutSeconds: Double
        public var timeoutSeconds: Double
        public var maxConnections: Int
        /// Connections kept open to the upstream (AsyncHTTPClient's per-host limit).
        public var maxUpstreamConnections: Int
        /// Paths on the upstream answered 403 and never forwarded (the log-in endpoints).
        public var denyPaths: [String]
        /// Upstream connections one peer's requests may hold at once (one uid on the socket; all
        /// TCP clients together), so that another peer always finds one.
        public var maxUpstreamConnectionsPerPeer: Int
        /// A client connection that sends nothing (between requests, or in a request body) or
        /// takes nothing of its answer for this long is closed.
        public var idleTimeoutSeconds: Double = defaultIdleTimeoutSeconds

        public static let defaultIdleTimeoutSeconds: Double = 60

        public static let defaultPath = "/run/fts-tokend/api.sock"
        public static let defaultMaxRequestBodyBytes = 16 << 20
        public static let defaultMaxUpstreamConnections = 64

        /// `maxUpstreamConnectionsPerPeer` unless set: three quarters of the pool.
        public static func defaultPerPeer(_ maxUpstreamConnections: Int) -> Int {
            max(1, maxUpstreamConnections * 3 / 4)
        }

        /// `denyPaths` unless set: the log-in endpoint's path and the auth API's folder.
        public static func defaultDenyPaths(_ api: API) -> [String] {
            var paths = [api.tokenPathOnServer]
            if !paths.contains("/auth/") { paths.append("/auth/") }
            return paths
        }

        public var restrictsPeers: Bool { !allowUIDs.isEmpty || !allowGIDs.isEmpty }
    }

    /// A loopback TCP address, `127.0.0.1:8089` or `[::1]:8089` (`localhost` is 127.0.0.1).
    public struct ListenAddress: Sendable, Equatable, CustomStringConvertible {
        /// The IP literal bound (no brackets).
        public var host: String
        public var port: Int

        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    public struct Outputs: Sendable, Equatable {
        public var tokenFile: OutputFile?
        public var jsonFile: OutputFile?
        public var headersFile: HeadersFile?
        public var socket: Socket?
        public var proxy: Proxy? = nil

        /// The `Authorization` scheme of the headers file, the socket's `/headers` and the proxy.
        public var authorizationScheme: String { headersFile?.authorizationScheme ?? TokenOutputs.defaultScheme }

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
