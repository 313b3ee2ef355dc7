import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The API proxy (README "Consumers"): HTTP/1.1 on a Unix socket, and optionally on a loopback TCP
/// address, forwarded to `outputs.proxy.upstream` with the daemon's credentials in place of the
/// client's. One event loop, as the token socket.
///
/// Limits: request heads up to 32 KiB, bodies up to `maxRequestBodyBytes`, connections that send
/// nothing (between requests or inside a body) or take nothing of their answer for
/// `idleTimeoutSeconds` closed, at most `maxConnections` at once (the longest-idle one without a
/// request in flight gives way, as on the token socket), at most `maxUpstreamConnections` kept open
/// to the upstream, of which one peer holds at most `maxUpstreamConnectionsPerPeer`.
public final class ProxyServer: Sendable {
    static let headLimit = 32 * 1024

    private let channels: [any Channel]
    private let shared: ProxyShared
    private let ownedPath: String
    private let ownedIdentity: FileIdentity?
    private let logger: Logger

    private init(channels: [any Channel], shared: ProxyShared, ownedPath: String, logger: Logger) {
        self.channels = channels
        self.shared = shared
        self.ownedPath = ownedPath
        self.ownedIdentity = FileIdentity(path: ownedPath)
        self.logger = logger
    }

    /// Starts listening on `proxy.path` (and `proxy.listen`), with at most `capacity` client
    /// connections and `upstreamCapacity` upstream ones (the proxy's parts of the `DescriptorBudget`).
    public static func start(
        _ proxy: Configuration.Proxy,
        capacity: Int,
        upstreamCapacity: Int,
        board: TokenBoard,
        metrics: DaemonMetrics,
        logger: Logger,
        clock: @escaping @Sendable () -> Date
    ) async throws -> ProxyServer {
        // One loop for the listeners, their connections and the upstream pool (the pool is used from it only).
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let shared = try await loop.submit {
            try ProxyShared(
                proxy,
                capacity: capacity,
                upstreamCapacity: upstreamCapacity,
                board: board,
                metrics: metrics,
                logger: logger,
                clock: clock,
                loop: loop
            )
        }.get()
        func bootstrap(_ listener: ProxyRules.Listener) -> ServerBootstrap {
            shared.listener.bootstrap(on: loop, idleTimeout: shared.settings.idleTimeout) { channel in
                try addHandlers(to: channel, shared: shared, listener: listener, upstream: shared.pool.value)
            }
            // At most 16 KiB per read from a client: a body that waits (for an upstream connection,
            // or past the `BodyBudget`) holds one read, not NIO's 64 KiB.
            .childChannelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 16 << 10)
            )
        }
        var channels: [any Channel] = []
        do {
            channels.append(try await Listener.bind(bootstrap(.unixSocket), path: proxy.path, mode: proxy.mode))
            if let listen = proxy.listen {
                channels.append(try await Listener.bind(bootstrap(.tcp(listen)), tcp: listen))
            }
        } catch {
            for channel in channels { try? await channel.close() }
            if !channels.isEmpty { unlink(proxy.path) }
            await shared.shutdown()
            throw error
        }
        logger.info(
            "API proxy on \(proxy.path)\(proxy.listen.map { " and \($0)" } ?? "") to \(proxy.upstream)",
            metadata: ["event": "proxy_listening", "mode": "\(FileMode.format(proxy.mode))"]
        )
        return ProxyServer(channels: channels, shared: shared, ownedPath: proxy.path, logger: logger)
    }

    /// The proxy's handlers after the idle timer, on `channel`'s loop: what a connection is served by
    /// (the server's pipeline and the handler's tests build it here alike).
    static func addHandlers(
        to channel: any Channel,
        shared: ProxyShared,
        listener: ProxyRules.Listener,
        upstream: any UpstreamSource
    ) throws {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderFieldSize = headLimit
        limits.maxHeaderListSize = headLimit
        limits.maxHeaderFieldCount = 200
        let sync = channel.pipeline.syncOperations
        // The proxy frames every answer itself (`ProxyRules.AnswerFraming`): the encoder would
        // chunk an answer to HEAD, which has no body.
        var encoder = HTTPResponseEncoder.Configuration()
        encoder.automaticallySetFramingHeaders = false
        try sync.addHandler(HTTPResponseEncoder(configuration: encoder))
        try sync.addHandler(
            ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, limitConfiguration: limits))
        )
        // One request at a time per connection, answers in order; a few pipelined requests wait,
        // and reading stops while they do.
        try sync.addHandler(ProxyRequestQueue(bodies: shared.bodies))
        try sync.addHandler(HTTPServerProtocolErrorHandler())
        try sync.addHandler(
            ProxyHandler(shared: shared, listener: listener, upstream: upstream, loop: channel.eventLoop)
        )
    }

    /// A reload's proxy settings that apply live (ConfigChange says which need a restart): the
    /// allow lists and limits from the next request on, the socket's mode now.
    public func apply(_ proxy: Configuration.Proxy, capacity: Int, logLevel: Logger.Level) throws(SystemError) {
        shared.apply(proxy, capacity: capacity, logLevel: logLevel)
        try Listener.setMode(ofSocketAt: ownedPath, proxy.mode)
    }

    /// Stops listening, removes the socket file if it is still ours, and closes the upstream
    /// connections (requests in flight fail).
    public func stop() async {
        for channel in channels { try? await channel.close() }
        if let ownedIdentity, FileIdentity(path: ownedPath) == ownedIdentity { unlink(ownedPath) }
        await shared.shutdown()
    }
}

/// What every proxy connection shares: the board, the upstream client, the access rules and the
/// settings a reload may change (read per request).
final class ProxyShared: Sendable {
    /// The settings that apply live.
    struct Live: Sendable {
        var rejectedStatuses: Set<Int>
        var allowBrowsers: Bool
        var maxRequestBodyBytes: Int
        /// Longest wait for a new token after the upstream rejected one, before answering 503.
        var tokenWaitSeconds: Double
        var denyPaths: [DeniedPath]
        /// `idleTimeoutSeconds`: for connections accepted from now on.
        var idleTimeout: TimeAmount

        func policy(_ listener: ProxyRules.Listener) -> ProxyRules.RequestPolicy {
            ProxyRules.RequestPolicy(
                listener: listener,
                allowBrowsers: allowBrowsers,
                maxBodyBytes: maxRequestBodyBytes,
                denyPaths: denyPaths
            )
        }
    }

    let board: TokenBoard
    let metrics: DaemonMetrics
    /// The daemon's logger at the level in force: a reload's `logLevel` reaches the next request.
    var logger: Logger { loggerBox.withLockedValue { $0 } }
    private let loggerBox: NIOLockedValueBox<Logger>
    let clock: @Sendable () -> Date
    /// The upstream's keep-alive connections, on `loop`.
    let pool: NIOLoopBound<UpstreamPool>
    /// Request bodies kept for replays, all connections together, on `loop`.
    let bodies: NIOLoopBound<BodyBudget>
    let target: UpstreamTarget
    let upstream: String
    /// Its clients' admission, identity, allow lists and refusal logs.
    let listener: Listener
    var access: SocketAccess { listener.access }
    var connections: ConnectionTable { listener.connections }
    private let live: NIOLockedValueBox<Live>
    private let upstreamErrorLogged = NIOLockedValueBox<NIODeadline?>(nil)

    init(
        _ proxy: Configuration.Proxy,
        capacity: Int,
        upstreamCapacity: Int,
        board: TokenBoard,
        metrics: DaemonMetrics,
        logger: Logger,
        clock: @escaping @Sendable () -> Date,
        loop: any EventLoop
    ) throws {
        self.board = board
        self.metrics = metrics
        self.loggerBox = NIOLockedValueBox(logger)
        self.clock = clock
        self.upstream = proxy.upstream
        self.listener = Listener(
            name: "proxy",
            connections: ConnectionTable(capacity: capacity),
            access: SocketAccess(allow: .init(uids: proxy.allowUIDs, gids: proxy.allowGIDs)),
            dropped: { metrics.proxyConnectionClosed($0) }
        )
        self.live = NIOLockedValueBox(Self.live(proxy))
        target = try UpstreamTarget(proxy.upstream)
        // Built once: it reads the system's trust roots and the CA file.
        let tls =
            target.secure ? try NIOSSLContext(configuration: AuthClient.tlsConfiguration(caFile: proxy.caFile)) : nil
        bodies = NIOLoopBound(BodyBudget(limit: BodyBudget.defaultLimit), eventLoop: loop)
        pool = NIOLoopBound(
            UpstreamPool(
                target: target,
                tls: tls,
                connectTimeout: .milliseconds(Int64(proxy.connectTimeoutSeconds * 1000)),
                readTimeout: .milliseconds(Int64(proxy.timeoutSeconds * 1000)),
                limit: upstreamCapacity,
                // A pool the descriptor budget made smaller keeps the configured share in proportion.
                perPeerLimit: max(
                    1,
                    proxy.maxUpstreamConnectionsPerPeer * upstreamCapacity / proxy.maxUpstreamConnections
                ),
                loop: loop,
                gauges: metrics.proxyUpstreamPoolGauges()
            ),
            eventLoop: loop
        )
    }

    private static func live(_ proxy: Configuration.Proxy) -> Live {
        Live(
            rejectedStatuses: proxy.rejectedStatuses,
            allowBrowsers: proxy.allowBrowsers,
            maxRequestBodyBytes: proxy.maxRequestBodyBytes,
            tokenWaitSeconds: min(proxy.timeoutSeconds, 30),
            denyPaths: proxy.denyPaths.map(DeniedPath.init),
            idleTimeout: .milliseconds(Int64(proxy.idleTimeoutSeconds * 1000))
        )
    }

    var settings: Live { live.withLockedValue { $0 } }

    func apply(_ proxy: Configuration.Proxy, capacity: Int, logLevel: Logger.Level) {
        loggerBox.withLockedValue { $0.logLevel = logLevel }
        live.withLockedValue { $0 = Self.live(proxy) }
        access.update(allow: .init(uids: proxy.allowUIDs, gids: proxy.allowGIDs))
        connections.setCapacity(capacity)
    }

    /// Logs an upstream failure at most once a minute: an unreachable upstream fails every request,
    /// and the journal must keep room for other events (every failure is counted in the metrics).
    func logUpstreamFailure(_ message: String, now: NIODeadline = .now()) {
        let due = upstreamErrorLogged.withLockedValue { last -> Bool in
            if let last, now - last < .seconds(60) { return false }
            last = now
            return true
        }
        if due {
            logger.warning(
                "API proxy: \(message)",
                metadata: ["event": "proxy_upstream_failed", "upstream": "\(upstream)"]
            )
        }
    }

    func shutdown() async {
        let pool = self.pool
        try? await pool.eventLoop.submit { pool.value.shutdown() }.get()
    }
}
