import CLinux
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// HTTP/1.1 on a Unix socket (README "Socket API"), on one event loop: this load needs no more.
///
/// Limits: request heads up to 8 KiB, idle connections closed after 10 s, at most
/// `maxConnections` at once (past that a new connection replaces the longest-idle one; see
/// `ConnectionTable`). Each connection's errors stay with it.
public final class SocketServer: Sendable {
    static let headLimit = 8 * 1024
    static let idleTimeout = TimeAmount.seconds(10)

    private let channel: any Channel
    /// The path we bound and must remove at shutdown, with the identity (device, inode) of what we
    /// put there: nil when systemd owns the socket.
    private let ownedPath: String?
    private let ownedIdentity: FileIdentity?
    private let access: SocketAccess
    private let connections: ConnectionTable
    private let logger: Logger

    private init(
        channel: any Channel,
        ownedPath: String?,
        access: SocketAccess,
        connections: ConnectionTable,
        logger: Logger
    ) {
        self.channel = channel
        self.ownedPath = ownedPath
        self.ownedIdentity = ownedPath.flatMap(FileIdentity.init(path:))
        self.access = access
        self.connections = connections
        self.logger = logger
    }

    /// A reload's socket settings, applied live: the allow lists and `/headers` from the next
    /// request on (open connections included), the connection limit from the next accept, and the
    /// mode of a socket file we bound (a socket passed by systemd keeps the socket unit's
    /// `SocketMode=`).
    public func apply(_ outputs: Configuration.Outputs, capacity: Int) throws(SystemError) {
        access.update(outputs)
        connections.setCapacity(capacity)
        guard let socket = outputs.socket else { return }
        guard let ownedPath else { return }
        try Listener.setMode(ofSocketAt: ownedPath, socket.mode)
    }

    /// Starts serving `board`, on the socket systemd passed (`activatedFD`) or on `socket.path`, with
    /// at most `capacity` connections at once (the token socket's part of the `DescriptorBudget`).
    public static func start(
        outputs: Configuration.Outputs,
        capacity: Int,
        activatedFD: Int32?,
        board: TokenBoard,
        metrics: DaemonMetrics,
        logger: Logger,
        clock: @escaping @Sendable () -> Date
    ) async throws -> SocketServer {
        let socket = outputs.socket
        let connections = ConnectionTable(capacity: capacity)
        let access = SocketAccess(outputs)
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderFieldSize = headLimit
        limits.maxHeaderListSize = headLimit
        limits.maxHeaderFieldCount = 100
        let decoderLimits = limits
        let listener = Listener(
            name: "socket",
            connections: connections,
            access: access,
            dropped: { metrics.socketConnectionDropped($0) }
        )
        let bootstrap = listener.bootstrap(
            on: MultiThreadedEventLoopGroup.singleton.next(),
            idleTimeout: idleTimeout
        ) { channel in
            let sync = channel.pipeline.syncOperations
            // NIO's request decoder only: the handler writes its answers as bytes and keeps them
            // in request order itself (see SocketRequestHandler).
            try sync.addHandler(
                ByteToMessageHandler(
                    HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, limitConfiguration: decoderLimits)
                )
            )
            try sync.addHandler(
                SocketRequestHandler(
                    board: board,
                    listener: listener,
                    metrics: metrics,
                    logger: logger,
                    clock: clock
                )
            )
        }
        if let fd = activatedFD {
            let channel = try await bootstrap.withBoundSocket(fd).get()
            logger.info(
                "serving on the socket passed by systemd",
                metadata: ["event": "socket_listening", "fd": "\(fd)"]
            )
            return SocketServer(
                channel: channel,
                ownedPath: nil,
                access: access,
                connections: connections,
                logger: logger
            )
        }
        guard let socket else { throw SystemError("no socket configured", errno: nil) }
        let channel = try await Listener.bind(bootstrap, path: socket.path, mode: socket.mode)
        logger.info(
            "serving on \(socket.path)",
            metadata: ["event": "socket_listening", "mode": "\(FileMode.format(socket.mode))"]
        )
        return SocketServer(
            channel: channel,
            ownedPath: socket.path,
            access: access,
            connections: connections,
            logger: logger
        )
    }

    /// Stops serving; removes the socket file only if it is still the one this daemon bound (a
    /// newer daemon may have replaced a socket it found stale).
    public func stop() async {
        try? await channel.close()
        if let ownedPath, let ownedIdentity, FileIdentity(path: ownedPath) == ownedIdentity { unlink(ownedPath) }
    }

}

/// Which file a path names: device and inode.
struct FileIdentity: Equatable, Sendable {
    var device: UInt64
    var inode: UInt64

    init?(path: String) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return nil }
        device = UInt64(info.st_dev)
        inode = UInt64(info.st_ino)
    }
}
