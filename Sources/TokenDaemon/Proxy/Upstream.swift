import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Where the proxy sends requests: `outputs.proxy.upstream`, parsed once.
struct UpstreamTarget: Sendable, Equatable {
    var secure: Bool
    var host: String
    var port: Int
    /// The upstream URL's path, put before each request's target ("" or "/v2").
    var basePath: String
    /// The `Host` header: the host, with the port unless it is the scheme's default.
    var hostHeader: String

    init(_ url: String) throws(SystemError) {
        guard let parsed = URL(string: url), let scheme = parsed.scheme?.lowercased(), let host = parsed.host,
            scheme == "http" || scheme == "https"
        else { throw SystemError("\(url) is not an http(s) URL", errno: nil) }
        secure = scheme == "https"
        // URL keeps an IPv6 literal's brackets in `host` on some platforms and not on others.
        self.host = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        port = parsed.port ?? (secure ? 443 : 80)
        basePath = parsed.path == "/" ? "" : parsed.path
        let shown = self.host.contains(":") ? "[\(self.host)]" : self.host
        hostHeader = parsed.port == nil ? shown : "\(shown):\(port)"
    }

    /// Whether `host` is an IP literal: TLS then checks the certificate against the address (no SNI).
    var hostIsAddress: Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }
}

/// Why an upstream request failed.
enum UpstreamError: Error, CustomStringConvertible {
    /// No connection could be made (refused, unreachable, TLS handshake failed, connect timeout).
    case connect(String)
    /// The upstream was silent for longer than `outputs.proxy.timeoutSeconds`.
    case timeout
    /// The connection closed before the answer was whole.
    case closed
    /// The answer was not valid HTTP.
    case malformed(String)
    /// Every upstream connection stayed busy for as long as a request may wait for one.
    case busy

    var description: String {
        switch self {
        case .connect(let reason): "cannot connect: \(reason)"
        case .timeout: "no answer in time"
        case .closed: "the connection closed before the answer was whole"
        case .malformed(let reason): "not a valid HTTP answer: \(reason)"
        case .busy: "every upstream connection stayed busy"
        }
    }
}

/// Receives one upstream answer, on the pool's loop. The upstream is read no faster than the
/// futures complete: each part is handed on only once the future of the one before has.
protocol UpstreamResponder: AnyObject {
    func upstreamHead(_ head: HTTPResponseHead, attempt: Int) -> EventLoopFuture<Void>
    func upstreamBody(_ part: ByteBuffer, attempt: Int) -> EventLoopFuture<Void>
    func upstreamEnd(attempt: Int)
    func upstreamFailed(_ error: UpstreamError, attempt: Int)
    /// The upstream's read burst ended: what was handed on may be flushed.
    func upstreamReadComplete(attempt: Int)
}

/// Who a request through the proxy is for, in the pool's fair shares: the peer's uid on the Unix
/// socket; every TCP client (no identity to tell them apart) shares one key.
struct PeerKey: Hashable, Sendable {
    var uid: UInt32?
}

/// Keep-alive HTTP/1.1 connections to the upstream, all on one event loop (the proxy's; used from
/// there only, so it needs no lock).
///
/// Guarantees:
/// 1. at most `limit` connections open or being made; requests beyond wait, first come first
///    served, each at most `waitTimeout` (then it fails with `.busy`: the client gets 503);
/// 2. no peer holds more than `perPeerLimit` of them (connections serving its requests or being
///    made for them), counting the requests of unknown peers (TCP clients) as every uid's: its
///    further requests wait while another peer's are served, so one user, on either listener or
///    both, cannot starve the others;
/// 3. a slot is taken when a connection is begun and given back exactly once, when that
///    connection's close future fires, whatever state it closed in (made, connecting, cancelled
///    before it was active, idle, busy), or when no channel was ever made: nothing can leak it;
///    a peer's share is given back when its request's connection is released or closes;
/// 4. a connection serves one request at a time and returns to the pool only after a whole answer
///    that allows keep-alive (or unused, when its request went away while it was made); idle
///    connections close after `idleTimeout`, and any the upstream closes leave the pool at once;
/// 5. a waiter whose client went away is withdrawn (`cancelWait`) and takes no connection.
final class UpstreamPool: UpstreamSource {

    static let idleTimeout = TimeAmount.seconds(60)

    let loop: any EventLoop
    let target: UpstreamTarget
    private let tls: NIOSSLContext?
    private let connectTimeout: TimeAmount
    let readTimeout: TimeAmount
    private let waitTimeout: TimeAmount
    private let limit: Int
    private let perPeerLimit: Int
    private let gauges: @Sendable (_ busy: Int, _ idle: Int, _ waiting: Int) -> Void
    /// Most recently used last: reuse the warmest, let the coldest time out.
    private var idle: [UpstreamConnection] = []
    /// Slots taken: connections open or being made.
    private(set) var open = 0
    /// Connections serving (or being made for) each peer's requests.
    private var busyByPeer: [PeerKey: Int] = [:]
    private var waiters = CircularBuffer<Waiter>()
    private var nextWaiterID = 0
    private var isShutDown = false

    private struct Waiter {
        let id: Int
        let peer: PeerKey
        let then: Acquired
        let deadline: Scheduled<Void>
    }

    /// One slot of `limit`, given back once (guarantee 3), and the peer it serves now.
    final class Slot {
        var released = false
        var owner: PeerKey?
    }

    init(
        target: UpstreamTarget,
        tls: NIOSSLContext?,
        connectTimeout: TimeAmount,
        readTimeout: TimeAmount,
        limit: Int,
        perPeerLimit: Int,
        loop: any EventLoop,
        gauges: @escaping @Sendable (_ busy: Int, _ idle: Int, _ waiting: Int) -> Void = { _, _, _ in }
    ) {
        self.target = target
        self.tls = tls
        self.connectTimeout = connectTimeout
        self.readTimeout = readTimeout
        self.waitTimeout = connectTimeout
        self.limit = limit
        self.perPeerLimit = max(1, min(perPeerLimit, limit))
        self.loop = loop
        self.gauges = gauges
    }

    typealias Acquired = (Result<UpstreamConnection, UpstreamError>) -> Void

    /// Counts, for tests and the gauges.
    var counts: (busy: Int, idle: Int, waiting: Int) { (open - idle.count, idle.count, waiters.count) }

    /// The counts last given to `gauges`: they are set only when one changes (this runs several
    /// times per request).
    private var published: (busy: Int, idle: Int, waiting: Int) = (-1, -1, -1)

    private func publish() {
        let now = counts
        guard now != published else { return }
        published = now
        gauges(now.busy, now.idle, now.waiting)
    }

    /// Hands `then` a connection for one request of `peer`: an idle one, a new one, or the next to
    /// be released; or why none could be had. Called back on the loop, possibly before returning.
    /// Returns the waiter's id when the request waits (for `cancelWait`).
    @discardableResult
    func acquire(for peer: PeerKey, _ then: @escaping Acquired) -> Int? {
        defer { publish() }
        guard !isShutDown else {
            then(.failure(.connect("the proxy is stopping")))
            return nil
        }
        if waiters.isEmpty, hasShare(peer) {
            if let connection = takeIdle() {
                begin(connection.slot, for: peer)
                then(.success(connection))
                return nil
            }
            if open < limit {
                connect(for: peer, then)
                return nil
            }
        }
        let id = nextWaiterID
        nextWaiterID += 1
        let bound = NIOLoopBound(self, eventLoop: loop)
        let deadline = loop.scheduleTask(in: waitTimeout) { bound.value.waitExpired(id) }
        waiters.append(Waiter(id: id, peer: peer, then: then, deadline: deadline))
        serveWaiters()
        return waiters.contains { $0.id == id } ? id : nil
    }

    /// Whether `peer` may have one more connection (guarantee 2). Requests of unknown peers (every
    /// TCP client: any local user may be behind one) count against every uid's share, and the
    /// busiest uid's against theirs: one user who sends through both listeners still leaves
    /// `limit - perPeerLimit` connections to the others (with separate shares, ¾ + ¾ took the pool).
    private func hasShare(_ peer: PeerKey) -> Bool {
        let unknown = busyByPeer[PeerKey(uid: nil), default: 0]
        guard peer.uid != nil else {
            let busiest = busyByPeer.lazy.filter { $0.key.uid != nil }.map(\.value).max() ?? 0
            return unknown + busiest < perPeerLimit
        }
        return busyByPeer[peer, default: 0] + unknown < perPeerLimit
    }

    private func begin(_ slot: Slot, for peer: PeerKey) {
        slot.owner = peer
        busyByPeer[peer, default: 0] += 1
    }

    /// The request `slot` served ended: its peer's share comes back.
    private func end(_ slot: Slot) {
        guard let owner = slot.owner else { return }
        slot.owner = nil
        let remaining = busyByPeer[owner, default: 1] - 1
        busyByPeer[owner] = remaining > 0 ? remaining : nil
    }

    private func takeIdle() -> UpstreamConnection? {
        while let connection = idle.popLast() {
            if connection.takeFromPool() { return connection }
        }
        return nil
    }

    /// Hands connections to waiters, in order, skipping those whose peer has its whole share. Each
    /// turn looks afresh: a waiter's callback may withdraw other waiters or release connections.
    private func serveWaiters() {
        while !isShutDown, idle.count > 0 || open < limit,
            let index = waiters.firstIndex(where: { hasShare($0.peer) })
        {
            let waiter = waiters.remove(at: index)
            waiter.deadline.cancel()
            if let connection = takeIdle() {
                begin(connection.slot, for: waiter.peer)
                waiter.then(.success(connection))
            } else if open < limit {
                connect(for: waiter.peer, waiter.then)
            } else {
                // Every idle connection had closed meanwhile: it waits on, at the head of the line.
                let bound = NIOLoopBound(self, eventLoop: loop)
                let id = waiter.id
                let deadline = loop.scheduleTask(in: waitTimeout) { bound.value.waitExpired(id) }
                waiters.prepend(Waiter(id: id, peer: waiter.peer, then: waiter.then, deadline: deadline))
                return
            }
        }
    }

    /// The request waiting as `id` went away: it takes no connection.
    func cancelWait(_ id: Int) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }
        waiters.remove(at: index).deadline.cancel()
        publish()
    }

    private func waitExpired(_ id: Int) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }
        let waiter = waiters.remove(at: index)
        publish()
        waiter.then(.failure(.busy))
    }

    private func connect(for peer: PeerKey, _ then: @escaping Acquired) {
        open += 1
        let slot = Slot()
        begin(slot, for: peer)
        let (tls, target, readTimeout) = (self.tls, self.target, self.readTimeout)
        let bound = NIOLoopBound(self, eventLoop: loop)
        // No socket options of its own: NIO sets TCP_NODELAY (a `.socketOption(.tcp_nodelay)` here
        // was SOL_SOCKET's option 1, SO_DEBUG, which the unit refuses: seen in `make test-system`).
        ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelInitializer { channel in
                // Guarantee 3: whatever happens to this channel from here on, its close gives the
                // slot back (a channel closed before it was active never sees channelInactive).
                channel.closeFuture.hop(to: bound.eventLoop).whenComplete { _ in bound.value.release(slot) }
                return channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if let tls {
                        try sync.addHandler(
                            try NIOSSLClientHandler(
                                context: tls,
                                serverHostname: target.hostIsAddress ? nil : target.host
                            )
                        )
                    }
                    try sync.addHTTPClientHandlers(leftOverBytesStrategy: .fireError)
                    try sync.addHandler(UpstreamConnection(pool: bound, slot: slot, readTimeout: readTimeout))
                }
            }
            .connect(host: target.host, port: target.port)
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    do {
                        then(.success(try channel.pipeline.syncOperations.handler(type: UpstreamConnection.self)))
                    } catch {
                        channel.close(promise: nil)
                        then(.failure(.connect("\(error)")))
                    }
                case .failure(let error):
                    // No channel may have been made (a name that does not resolve): give the slot
                    // back here; a channel's close future finds it released already.
                    release(slot)
                    then(.failure(.connect("\(error)")))
                }
                publish()
            }
    }

    /// Gives `slot` back, once, with its peer's share: waiters may take it.
    private func release(_ slot: Slot) {
        guard !slot.released else { return }
        slot.released = true
        end(slot)
        open -= 1
        serveWaiters()
        publish()
    }

    /// `connection` finished a whole answer (or was never used) and may serve another.
    func release(_ connection: UpstreamConnection) {
        defer { publish() }
        end(connection.slot)
        guard !isShutDown else { return connection.close() }
        idle.append(connection)
        serveWaiters()
        // Its idle timer only if no waiter took it (a timer armed and cancelled at once otherwise).
        if idle.last === connection { connection.park(idleTimeout: Self.idleTimeout) }
    }

    /// `connection` closed: it leaves the idle list (its slot comes back through its close future).
    func closed(_ connection: UpstreamConnection) {
        idle.removeAll { $0 === connection }
        publish()
    }

    func shutdown() {
        isShutDown = true
        for connection in idle { connection.close() }
        idle.removeAll()
        while let waiter = waiters.popFirst() {
            waiter.deadline.cancel()
            waiter.then(.failure(.connect("the proxy is stopping")))
        }
        publish()
    }
}

/// The pool as the proxy's exchange sees it (`UpstreamSource`).
extension UpstreamPool {
    func acquireLink(for peer: PeerKey, _ then: @escaping (Result<any UpstreamLink, UpstreamError>) -> Void) -> Int? {
        acquire(for: peer) { then($0.map { $0 }) }
    }

    func releaseLink(_ link: any UpstreamLink) {
        guard let connection = link as? UpstreamConnection else { return link.cancel() }
        release(connection)
    }
}

/// One connection to the upstream: sends a request, hands its answer to the responder part by part,
/// and returns to the pool after a whole keep-alive answer.
final class UpstreamConnection: ChannelDuplexHandler, UpstreamLink {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = HTTPClientRequestPart

    private let pool: NIOLoopBound<UpstreamPool>
    /// Its slot in the pool, and the peer whose request it serves.
    let slot: UpstreamPool.Slot
    private let readTimeout: TimeAmount
    private var context: ChannelHandlerContext?
    private var responder: (UpstreamResponder, attempt: Int)?
    /// Answer parts read but not handed on yet (the previous part's future is pending).
    private var parts = CircularBuffer<HTTPClientResponsePart>()
    private var delivering = false
    private var readHeld = false
    private var requestEnded = false
    private var keepAlive = true
    /// Inside a read burst: a connection whose answer could carry no body (to HEAD; 1xx, 204,
    /// 304) goes back to the pool at the burst's end, so that a body the upstream sent anyway is
    /// decoded first, and closes the connection, rather than reaching the next request sent on it.
    /// (Other answers end where their framing says: the connection goes back at once, and a
    /// request pipelined behind finds it.)
    private var reading = false
    private var releaseWhenReadEnds = false
    private var requestMethod = HTTPMethod.GET
    private var answerIsBodiless = false
    private var silence: Scheduled<Void>?
    private var idleClose: Scheduled<Void>?
    /// Requests served before the current one: a failure before any answer on a reused connection
    /// may be the upstream closing it as it was reused (worth one retry on a new connection).
    private(set) var servedBefore = 0

    init(pool: NIOLoopBound<UpstreamPool>, slot: UpstreamPool.Slot, readTimeout: TimeAmount) {
        self.pool = pool
        self.slot = slot
        self.readTimeout = readTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelInactive(context: ChannelHandlerContext) {
        silence?.cancel()
        idleClose?.cancel()
        self.context = nil
        pool.value.closed(self)
        fail(.closed)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(error is HTTPParserError ? .malformed("\(error)") : .closed)
        context.close(promise: nil)
    }

    // MARK: The pool's side

    /// Taken from the idle list; false when it closed meanwhile.
    func takeFromPool() -> Bool {
        idleClose?.cancel()
        guard context?.channel.isActive == true else { return false }
        reuse()
        return true
    }

    func reuse() {
        idleClose?.cancel()
        servedBefore += 1
    }

    func park(idleTimeout: TimeAmount) {
        idleClose = context?.eventLoop.scheduleTask(in: idleTimeout) { [weak self] in self?.close() }
    }

    func close() {
        context?.close(promise: nil)
    }

    // MARK: The request

    /// Sends `head` (and `body` when the body is known whole); a streamed body follows through
    /// `writeBody` and `endBody`.
    func send(_ head: HTTPRequestHead, body: ByteBuffer?, streamed: Bool, to responder: UpstreamResponder, attempt: Int)
    {
        guard let context else { return responder.upstreamFailed(.closed, attempt: attempt) }
        self.responder = (responder, attempt)
        requestMethod = head.method
        requestEnded = !streamed
        keepAlive = true
        armSilence()
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if let body, body.readableBytes > 0 { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        if !streamed {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        } else {
            context.flush()
        }
    }

    /// A part of a streamed request body; the future completes once it is written (backpressure).
    func writeBody(_ part: ByteBuffer) -> EventLoopFuture<Void> {
        guard let context else { return pool.value.loop.makeFailedFuture(UpstreamError.closed) }
        armSilence()
        return context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(part))))
    }

    func endBody() {
        requestEnded = true
        context?.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }

    /// The client went away: the answer is not wanted, and the connection cannot be reused.
    func cancel() {
        responder = nil
        close()
    }

    // MARK: The answer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        reading = true
        // Bytes no request asked for (the connection is idle, or its answer already ended): the
        // upstream and this connection disagree on where answers end, so it serves no one again.
        guard responder != nil else {
            releaseWhenReadEnds = false
            parts.removeAll()
            close()
            return
        }
        armSilence()
        parts.append(unwrapInboundIn(data))
        deliver()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        reading = false
        if let (responder, attempt) = responder { responder.upstreamReadComplete(attempt: attempt) }
        if releaseWhenReadEnds {
            releaseWhenReadEnds = false
            if context.channel.isActive { pool.value.release(self) }
        }
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        guard parts.isEmpty, !delivering else {
            readHeld = true
            return
        }
        context.read()
    }

    private func deliver() {
        while !delivering, let part = parts.popFirst() {
            guard let (responder, attempt) = responder else { return }
            switch part {
            case .head(let head):
                keepAlive = head.isKeepAlive
                answerIsBodiless = requestMethod == .HEAD || !head.status.mayHaveResponseBody
                wait(for: responder.upstreamHead(head, attempt: attempt))
            case .body(let body):
                wait(for: responder.upstreamBody(body, attempt: attempt))
            case .end:
                finish()
            }
        }
        if !delivering, parts.isEmpty, readHeld, let context {
            readHeld = false
            context.read()
        }
    }

    private func wait(for future: EventLoopFuture<Void>) {
        delivering = true
        future.hop(to: pool.value.loop).assumeIsolated().whenComplete { [weak self] _ in
            self?.delivering = false
            self?.deliver()
        }
    }

    private func finish() {
        silence?.cancel()
        guard let (responder, attempt) = responder else { return }
        self.responder = nil
        // Back to the pool first (a replay the responder starts at once can have this connection),
        // or at the end of the read burst that brought the answer's end (see `reading`).
        if keepAlive && requestEnded && parts.isEmpty {
            if reading && answerIsBodiless { releaseWhenReadEnds = true } else { pool.value.release(self) }
        } else {
            close()
        }
        responder.upstreamEnd(attempt: attempt)
    }

    private func fail(_ error: UpstreamError) {
        silence?.cancel()
        guard let (responder, attempt) = responder else { return }
        self.responder = nil
        parts.removeAll()
        responder.upstreamFailed(error, attempt: attempt)
    }

    /// Restarts the silence timer: the upstream must send something within `readTimeout`.
    private func armSilence() {
        silence?.cancel()
        silence = context?.eventLoop.scheduleTask(in: readTimeout) { [weak self] in
            self?.fail(.timeout)
            self?.close()
        }
    }
}
