import CLinux
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The listener layer of the token socket and the API proxy, written once: what happens to a
/// client between its connect and its first request, and what both servers' handlers ask of it.
///
/// What a listener guarantees:
/// 1. binding: a Unix socket never exists with wider permissions than configured and never takes
///    the place of a socket another process serves (`bind(_:path:mode:)`); a TCP listener binds
///    at every restart (`bind(_:tcp:)`);
/// 2. admission: at most the `ConnectionTable`'s capacity of clients (its part of the
///    `DescriptorBudget`); past it the longest-idle client without a request in flight gives way,
///    a peer the allow lists refuse first; each client dropped is counted (`dropped`);
/// 3. identity: the peer's uid, gids and pid are read once at connect, before any request
///    (`identify`); a TCP client has none;
/// 4. idle: a client that sends nothing for the idle timeout gets an `IdleStateEvent`, and its
///    handler decides (a long poll or a request in flight is not idle);
/// 5. refusals: logged at most once a minute per peer uid (`logRefusal`), with the listener's
///    name and the peer's ids, so that a client refused in a loop cannot flood the journal;
/// 6. memory: once a storm of connections is over, freed heap goes back to the system.
struct Listener: Sendable {
    /// The `listener` field of its log lines: `socket` or `proxy`.
    let name: String
    let connections: ConnectionTable
    let access: SocketAccess
    /// Counts a client dropped at admission: `evicted` (it gave way) or `refused` (no room).
    let dropped: @Sendable (String) -> Void

    /// A server bootstrap on `loop` that admits each client (2., 6.), arms its idle timer (4.: the
    /// timeout is read per client, so a reload's applies to clients accepted from then on),
    /// then adds `handlers`.
    func bootstrap(
        on loop: any EventLoop,
        idleTimeout: @autoclosure @escaping @Sendable () -> TimeAmount,
        handlers: @escaping @Sendable (any Channel) throws -> Void
    ) -> ServerBootstrap {
        let connections = self.connections
        let dropped = self.dropped
        return ServerBootstrap(group: loop)
            .serverChannelOption(.backlog, value: 256)
            .childChannelInitializer { channel in
                let admission = connections.admit(channel)
                if admission != .admitted { dropped(admission == .refused ? "refused" : "evicted") }
                guard admission != .refused else { return channel.close() }
                channel.closeFuture.whenComplete { [loop = channel.eventLoop] _ in
                    // glibc keeps freed heap for reuse: after a storm of connections the daemon
                    // would otherwise hold a few MB more for the rest of its life (measured: +4 MB
                    // after 1,000 connections). Trimmed a second later, once the storm's
                    // connections have all been torn down; a storm is rare and the trim takes well
                    // under a millisecond.
                    if connections.remove(channel) {
                        loop.scheduleTask(in: .seconds(1)) { malloc_trim(0) }
                    }
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: idleTimeout()))
                    try handlers(channel)
                }
            }
    }

    /// Reads who is at the other end of `channel` (3.): on a Unix socket `found` runs before any
    /// request is read; a TCP client has no identity, and `found` is not called. A peer the allow
    /// lists refuse (a TCP client whenever they are set) gives way first when the table is full.
    /// Call from `channelActive`.
    func identify(_ channel: any Channel, unixSocket: Bool, found: @escaping (PeerCredentials) -> Void) {
        guard unixSocket else {
            if !access.allows(nil) { connections.markRefused(channel) }
            return
        }
        let access = self.access
        let connections = self.connections
        PeerCredentials.read(channel) { peer in
            found(peer)
            if !access.allows(peer) { connections.markRefused(channel) }
        }
    }

    /// Logs a refusal of `peer` as `event` (5.): at most once a minute per uid.
    func logRefusal(
        _ message: String,
        event: String,
        peer: PeerCredentials?,
        logger: Logger,
        metadata: Logger.Metadata = [:]
    ) {
        guard access.shouldLogRefusal(of: peer?.uid) else { return }
        var fields = metadata
        fields["event"] = "\(event)"
        fields["listener"] = "\(name)"
        fields["uid"] = "\(peer.map { "\($0.uid)" } ?? "?")"
        fields["gid"] = "\(peer.map { "\($0.gid)" } ?? "?")"
        fields["pid"] = "\(peer.map { "\($0.pid)" } ?? "?")"
        logger.warning("\(message)", metadata: fields)
    }

    // MARK: Binding (1.)

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

    /// Binds a loopback TCP address. `SO_REUSEADDR`: a consumer's connection left in TIME_WAIT by
    /// the previous run must not fail the next bind ("Address already in use"), or a few restarts
    /// use up the unit's StartLimitBurst and leave the host without tokens.
    static func bind(_ bootstrap: ServerBootstrap, tcp address: Configuration.ListenAddress) async throws -> any Channel
    {
        try await bootstrap
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(host: address.host, port: address.port).get()
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

/// The identity of a connected peer (SO_PEERCRED, SO_PEERGROUPS), read once per connection.
struct PeerCredentials: Sendable, Equatable {
    var pid: Int32
    var uid: UInt32
    var gid: UInt32
    /// Supplementary groups; nil when they could not be read (more than 256, say).
    var groups: [UInt32]? = nil

    /// The groups in what SO_PEERGROUPS returned into a zeroed buffer: the kernel writes them
    /// sorted ascending and leaves the rest zero, so zeros after the first entry are padding. A
    /// buffer of zeros alone cannot tell "no groups" from "group 0": read as none (fails closed).
    static func groups(from raw: [UInt32]) -> [UInt32] {
        guard let first = raw.first else { return [] }
        let rest = raw.dropFirst().prefix { $0 != 0 }
        return first == 0 && rest.isEmpty ? [] : [first] + rest
    }
}

extension PeerCredentials {
    /// Reads who is at the other end of a Unix socket connection. Called on the channel's loop,
    /// where the options are read at once: `found` runs before any request is read. A connection
    /// that is not a Unix socket (TCP) has no peer credentials: `found` is not called.
    static func read(_ channel: any Channel, found: @escaping (PeerCredentials) -> Void) {
        guard let provider = channel as? any SocketOptionProvider else { return }
        let credentials: EventLoopFuture<RawPeerCredentials> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET),
            name: SocketOptionName(SO_PEERCRED)
        )
        let groups: EventLoopFuture<clinux_peer_groups> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET),
            name: SocketOptionName(clinux_SO_PEERGROUPS)
        )
        credentials.assumeIsolated().whenSuccess { raw in
            var peer = PeerCredentials(pid: raw.pid, uid: raw.uid, gid: raw.gid)
            // Unreadable groups (more than 256) leave the peer judged on its uid and primary gid.
            groups.assumeIsolated().whenComplete { result in
                if case .success(let list) = result {
                    let gids = withUnsafeBytes(of: list.gids) { Array($0.bindMemory(to: UInt32.self)) }
                    peer.groups = PeerCredentials.groups(from: gids)
                }
                found(peer)
            }
        }
    }
}

/// Mirrors glibc's `struct ucred` (pid_t, uid_t, gid_t: three 32-bit fields), which Glibc exposes to
/// Swift only under _GNU_SOURCE. Read through NIO's `unsafeGetSocketOption`, which copies the bytes
/// getsockopt(2) returns; a unit test checks the layout.
struct RawPeerCredentials: Sendable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}
