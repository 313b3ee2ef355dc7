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
        try Self.setMode(ofSocketAt: ownedPath, socket.mode)
    }

    /// Changes the mode of the socket file at `path` through an O_PATH descriptor of what is there,
    /// checked to be a socket, so that nothing else that might have been put there is chmod'ed
    /// (chmod would follow a symlink).
    static func setMode(ofSocketAt path: String, _ mode: UInt32) throws(SystemError) {
        let descriptor = open(path, clinux_O_PATH | O_NOFOLLOW | O_CLOEXEC)
        guard descriptor >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(descriptor) }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw SystemError("fstat \(path)", errno: errno) }
        guard info.st_mode & S_IFMT == S_IFSOCK else {
            throw SystemError("\(path) is no longer a socket", errno: nil)
        }
        guard chmod("/proc/self/fd/\(descriptor)", mode_t(mode)) == 0 else {
            throw SystemError("chmod \(path)", errno: errno)
        }
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
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton.next())
            .serverChannelOption(.backlog, value: 256)
            .childChannelInitializer { channel in
                let admission = connections.admit(channel)
                if admission != .admitted {
                    metrics.socketConnectionDropped(admission == .refused ? "refused" : "evicted")
                }
                guard admission != .refused else {
                    return channel.close()
                }
                channel.closeFuture.whenComplete { [loop = channel.eventLoop] _ in
                    // glibc keeps freed heap for reuse: after a storm of connections the daemon would
                    // otherwise hold a few MB more for the rest of its life (measured: +4 MB after
                    // 1,000 connections). Trimmed a second later, once the storm's connections have
                    // all been torn down; a storm is rare and the trim takes well under a millisecond.
                    if connections.remove(channel) {
                        loop.scheduleTask(in: .seconds(1)) { malloc_trim(0) }
                    }
                }
                return channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(IdleStateHandler(readTimeout: idleTimeout))
                    // NIO's request decoder only: the handler writes its answers as bytes and keeps
                    // them in request order itself (see SocketRequestHandler).
                    try sync.addHandler(
                        ByteToMessageHandler(
                            HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, limitConfiguration: decoderLimits)
                        )
                    )
                    try sync.addHandler(
                        SocketRequestHandler(
                            board: board,
                            connections: connections,
                            metrics: metrics,
                            access: access,
                            logger: logger,
                            clock: clock
                        )
                    )
                }
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
        let channel = try await bind(bootstrap, path: socket.path, mode: socket.mode)
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

    /// Binds so that the socket never exists with wider permissions than configured, and never
    /// takes the place of a socket another process serves:
    /// 0. a socket at the path that accepts a connection belongs to a running daemon (a second
    ///    `fts-tokend run` with the same config): refuse; one that refuses connections is stale;
    /// 1. bind a temporary name under umask 0177, so the socket file starts as 0600;
    /// 2. chmod it to the configured mode;
    /// 3. rename it over the configured path (replacing a stale socket from a previous run).
    /// Connections made through the final path reach the same socket.
    static func bind(_ bootstrap: ServerBootstrap, path: String, mode: UInt32) async throws -> any Channel {
        let (directory, name) = AtomicFileWriter.split(path)
        _ = try OpenedFolder(directory, rule: .secret, createMode: 0o750)
        let temporary = directory + "/." + name + ".tmp-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        guard temporary.utf8.count <= 107 else {
            throw SystemError("socket path \(path) too long for its temporary name", errno: nil)
        }
        // 0.
        if Self.isServed(path) {
            throw SystemError(
                "\(path) is served by another process (a second fts-tokend with this config?)",
                errno: nil
            )
        }
        // 1. The umask is process-wide: this runs at start, before any other file is created.
        let previous = umask(0o177)
        let bound: any Channel
        do {
            bound = try await bootstrap.bind(unixDomainSocketPath: temporary).get()
            umask(previous)
        } catch {
            umask(previous)
            throw error
        }
        do {
            // 2.
            guard chmod(temporary, mode_t(mode)) == 0 else {
                throw SystemError("chmod \(temporary)", errno: errno)
            }
            // 3.
            guard rename(temporary, path) == 0 else {
                throw SystemError("rename to \(path)", errno: errno)
            }
        } catch {
            unlink(temporary)
            try? await bound.close()
            throw error
        }
        return bound
    }

    /// Stops accepting, closes the listening socket and removes the socket file we created.
    /// Stops serving; removes the socket file only if it is still the one this daemon bound (a
    /// newer daemon may have replaced a socket it found stale).
    public func stop() async {
        try? await channel.close()
        if let ownedPath, let ownedIdentity, FileIdentity(path: ownedPath) == ownedIdentity { unlink(ownedPath) }
    }

    /// Whether a process accepts connections on the Unix socket at `path`.
    static func isServed(_ path: String) -> Bool {
        var info = stat()
        guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { return false }
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0 else { return false }
        defer { close(probe) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in path.utf8.prefix(raw.count - 1).enumerated() { raw[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(probe, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        // EAGAIN: listening with a full backlog, which is served all the same.
        return connected == 0 || errno == EAGAIN
    }
}

/// A socket's allow lists as currently configured (the token socket's or the proxy's), shared by
/// every connection.
final class SocketAccess: Sendable {
    /// Peers served: when both lists are empty, everyone who can connect.
    struct AllowList: Sendable, Equatable {
        var uids: [UInt32] = []
        var gids: [UInt32] = []

        var restrictsPeers: Bool { !uids.isEmpty || !gids.isEmpty }
    }

    private struct Rules {
        var allow: AllowList
        var servesHeaders: Bool
        /// When each refused uid was last logged.
        var refusalsLogged: [UInt32?: NIODeadline] = [:]
    }

    /// A refused peer is logged once per uid per this long: a client refused in a loop must not
    /// flood the journal and push real events out.
    static let refusalLogInterval = TimeAmount.seconds(60)

    private let rules: NIOLockedValueBox<Rules>

    init(allow: AllowList, servesHeaders: Bool = false) {
        rules = NIOLockedValueBox(Rules(allow: allow, servesHeaders: servesHeaders))
    }

    /// The token socket's rules.
    convenience init(_ outputs: Configuration.Outputs) {
        self.init(allow: Self.allowList(outputs.socket), servesHeaders: outputs.servesHeaders)
    }

    func update(_ outputs: Configuration.Outputs) {
        update(allow: Self.allowList(outputs.socket), servesHeaders: outputs.servesHeaders)
    }

    func update(allow: AllowList, servesHeaders: Bool = false) {
        rules.withLockedValue {
            $0.allow = allow
            $0.servesHeaders = servesHeaders
        }
    }

    private static func allowList(_ socket: Configuration.Socket?) -> AllowList {
        AllowList(uids: socket?.allowUIDs ?? [], gids: socket?.allowGIDs ?? [])
    }

    /// Whether a refusal of `uid` at `now` is to be logged (the first in `refusalLogInterval`).
    func shouldLogRefusal(of uid: UInt32?, now: NIODeadline = .now()) -> Bool {
        rules.withLockedValue { rules in
            if let last = rules.refusalsLogged[uid], now - last < Self.refusalLogInterval { return false }
            if rules.refusalsLogged.count >= 1024 {
                rules.refusalsLogged = rules.refusalsLogged.filter { now - $0.value < Self.refusalLogInterval }
            }
            rules.refusalsLogged[uid] = now
            return true
        }
    }

    /// Whether `peer` may be served: always when no allow list is set; otherwise only a peer whose
    /// uid, primary gid or one of whose supplementary groups is listed (an unknown peer never).
    func allows(_ peer: PeerCredentials?) -> Bool {
        rules.withLockedValue { rules in
            let allow = rules.allow
            guard allow.restrictsPeers else { return true }
            guard let peer else { return false }
            return allow.uids.contains(peer.uid) || allow.gids.contains(peer.gid)
                || (peer.groups ?? []).contains { allow.gids.contains($0) }
        }
    }

    /// Whether `/headers` (with the API key) is served (`Configuration.Outputs.servesHeaders`).
    var servesHeaders: Bool { rules.withLockedValue { $0.servesHeaders } }
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
