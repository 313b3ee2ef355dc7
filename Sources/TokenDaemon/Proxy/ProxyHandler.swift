import CLinux
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Serves one proxy connection: each request goes upstream with the daemon's credentials, its
/// answer streams back. `ProxyRequestQueue` before it hands it one request at a time.
///
/// The rules live in `ProxyExchange`, a state machine that performs no I/O; this handler feeds it
/// the connection's events and performs what it returns. What a client gets:
/// 1. a request refused before anything is sent (`ProxyRules.refusal`, the allow lists, no valid
///    token: 503 with `Retry-After`, the peer's share of in-flight requests) is answered by the
///    proxy, and the upstream never sees it;
/// 2. a body up to `ProxyRules.replayBufferBytes` is read whole before the request goes out (so it
///    can be replayed); a larger one streams, and the client is read no faster than the upstream
///    takes it;
/// 3. the answer streams back, read from the upstream no faster than the client takes it;
/// 4. an answer whose status is in `rejectedStatuses`, for a request sent with the current token,
///    is reported to the daemon (as `POST /token/invalidate` would). When the request is
///    replayable (idempotent method, body kept whole) its answer is dropped and the request sent
///    once more with the next token; otherwise the answer goes back with `X-Token-Refresh`
///    saying what happened (`TokenRefresh`);
/// 5. an upstream that cannot be reached or does not answer in time: 502 or 504 if nothing was
///    sent back yet, otherwise the connection is closed (a truncated answer must not look whole).
final class ProxyHandler: ChannelDuplexHandler, UpstreamResponder {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart
    typealias Exchange = ProxyExchange

    private let shared: ProxyShared
    private let listener: ProxyRules.Listener
    private let upstream: any UpstreamSource
    private let loop: any EventLoop
    private var context: ChannelHandlerContext?
    private var peer: PeerCredentials?
    private var exchange: Exchange
    /// A read was asked for while the machine held reads; passed on once it no longer does.
    private var readHeld = false
    /// Completed when the client's channel takes more again (the upstream waits for it).
    private var writable: EventLoopPromise<Void>?
    /// Closes the connection if the client takes nothing more of its answer meanwhile.
    private var unreadTimeout: Scheduled<Void>?
    /// Everything NIO held for the client when `unreadTimeout` was armed has reached the kernel.
    private var unreadMarkerDrained = false
    /// The exchange's waits for the daemon (its answer to a report, or a new token): I/O handles
    /// the machine's state says are pending, let go of when the exchange ends.
    private var report: (RejectionReport, decided: EventLoopPromise<Void>)?
    private var tokenWait: (id: Int, timeout: Scheduled<Void>)?

    init(shared: ProxyShared, listener: ProxyRules.Listener, upstream: any UpstreamSource, loop: any EventLoop) {
        self.shared = shared
        self.listener = listener
        self.upstream = upstream
        self.loop = loop
        self.exchange = Exchange(budget: shared.bodies.value)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        shared.listener.identify(context.channel, unixSocket: listener == .unixSocket) { self.peer = $0 }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        unreadTimeout?.cancel()
        if let leftovers = exchange.clientGone() { exchangeEnded(leftovers) }
        writable?.fail(ChannelError.ioOnClosedChannel)
        writable = nil
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is IdleStateHandler.IdleStateEvent else { return context.fireUserInboundEventTriggered(event) }
        let action = exchange.idle()
        switch action {
        case .refuse, .close(.some): shared.metrics.proxyConnectionClosed("stalled_body")
        default: break
        }
        perform(action)
    }

    func read(context: ChannelHandlerContext) {
        if exchange.holdsReads {
            readHeld = true
            return
        }
        context.read()
    }

    private func resumeReadingIfAllowed() {
        guard readHeld, !exchange.holdsReads, let context else { return }
        readHeld = false
        context.read()
    }

    // MARK: The request

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): begin(head, context: context)
        case .body(let part): perform(exchange.bodyPart(part))
        case .end: perform(exchange.requestEnd())
        }
    }

    /// The gates before an exchange: the allow lists, the request rules, a valid token, the peer's
    /// share of in-flight requests. A request that passes them starts the exchange.
    private func begin(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let settings = shared.settings
        shared.connections.touch(context.channel)
        guard shared.access.allows(peer) else {
            // A TCP peer has no identity to check: with allow lists set, TCP serves no one (README).
            let message =
                listener == .unixSocket
                ? "this user may not use the API proxy"
                : "outputs.proxy.allowUIDs/allowGIDs are set: the TCP listener serves no one"
            return refuse(head, ProxyRules.Refusal(status: .forbidden, reason: .peer, message: message), close: true)
        }
        let target = shared.target.basePath + head.uri
        if let refusal = ProxyRules.refusal(head, upstreamTarget: target, policy: settings.policy(listener)) {
            return refuse(head, refusal, close: true)
        }
        guard shared.board.validEntry(at: shared.clock()) != nil else {
            return refuse(head, noTokenRefusal(), close: true)
        }
        // In flight from here on: never evicted for a new connection, and counted against the
        // peer's share of the connection table (a quarter), so one user cannot hold every slot.
        guard shared.connections.beginWait(context.channel, uid: peer?.uid) else {
            let refusal = ProxyRules.Refusal(
                status: .serviceUnavailable,
                reason: .busy,
                message: "this user has as many requests in flight as it may; try again",
                headers: [("Retry-After", "1")]
            )
            return refuse(head, refusal, close: true)
        }
        let request = Exchange.Request(
            head: head,
            target: target,
            host: shared.target.hostHeader,
            maxBodyBytes: settings.maxRequestBodyBytes,
            rejectedStatuses: settings.rejectedStatuses
        )
        perform(exchange.begin(request))
    }

    /// Performs what the machine decided.
    private func perform(_ action: Exchange.Action) {
        defer { resumeReadingIfAllowed() }
        guard let context else { return }
        switch action {
        case .none:
            break
        case .sendContinue(let version):
            context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: .continue))))
                .whenFailure { _ in }
        case .startAttempt:
            let board = shared.board
            let now = shared.clock()
            perform(exchange.attempt(with: board.validEntry(at: now), refusalWithoutToken: noTokenRefusal()))
        case .acquire(let serial):
            acquire(serial)
        case .release(let connection):
            upstream.releaseLink(connection)
        case .send(let connection, let head, let body, let streamed, let serial, let parts, let end):
            connection.send(head, body: body, streamed: streamed, to: self, attempt: serial)
            for part in parts { write(part, on: connection, serial: serial) }
            if end { connection.endBody() }
        case .writeBody(let connection, let part, let serial):
            write(part, on: connection, serial: serial)
        case .endBody(let connection):
            connection.endBody()
        case .refuse(let ended, let refusal, let close):
            exchangeEnded(ended.leftovers)
            refuse(ended.head, refusal, close: close, began: ended.began)
        case .answer(let ended, let status, let message, let headers, let close):
            exchangeEnded(ended.leftovers)
            answerLocally(ended.head, status, message, close: close, extra: headers, began: ended.began)
        case .close(let ended):
            if let ended { exchangeEnded(ended.leftovers) }
            context.close(promise: nil)
        }
    }

    private func write(_ part: ByteBuffer, on connection: any UpstreamLink, serial: Int) {
        connection.writeBody(part).assumeIsolated().whenComplete { [weak self] result in
            guard let self else { return }
            let ok: Bool
            if case .success = result { ok = true } else { ok = false }
            self.perform(self.exchange.bodyWritten(serial: serial, ok: ok))
        }
    }

    // MARK: Upstream attempts

    private func acquire(_ serial: Int) {
        let upstream = self.upstream
        let wait = upstream.acquireLink(for: PeerKey(uid: peer?.uid)) { [weak self] result in
            guard let self else {
                // The connection closed while the upstream connection was made: it goes back unused.
                if case .success(let connection) = result { upstream.releaseLink(connection) }
                return
            }
            switch result {
            case .success(let connection):
                self.perform(self.exchange.connected(connection, serial: serial))
            case .failure(.busy):
                let action = self.exchange.poolBusy(serial: serial)
                if let ended = action.ended {
                    self.shared.logUpstreamFailure("\(ended.head.method) request found no free upstream connection")
                }
                self.perform(action)
            case .failure(let error):
                self.upstreamFailed(error, attempt: serial)
            }
        }
        if let wait { exchange.waiting(wait, serial: serial) }
    }

    func upstreamHead(_ head: HTTPResponseHead, attempt serial: Int) -> EventLoopFuture<Void> {
        if let sentAt = exchange.sentAt(serial) {
            shared.metrics.proxyUpstreamHead(.nanoseconds((NIODeadline.now() - sentAt).nanoseconds))
        }
        // The board is read only for a rejected status (a lock and the clock, per answer otherwise).
        let board = shared.board
        let clock = shared.clock
        let action = exchange.upstreamHead(head, serial: serial, current: board.validEntry(at: clock())?.fingerprint)
        return perform(action, serial: serial)
    }

    /// Performs what the machine decided about an answer's head; the future completes when the
    /// upstream may be read on (the client took the head, or the daemon answered the report).
    private func perform(_ action: Exchange.HeadAction, serial: Int) -> EventLoopFuture<Void> {
        guard let context else { return succeeded() }
        switch action {
        case .ignore, .discard:
            return succeeded()
        case .forward(let head, let request, let began, let refresh):
            if refresh != nil { shared.metrics.proxyRejection(replayed: false) }
            answered(request, status: head.status, byUpstream: true, began: began)
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            return untilWritable(context)
        case .report(let fingerprint):
            let sent = RejectionReport.send(
                to: shared.board,
                fingerprint: fingerprint,
                reporterUID: peer?.uid,
                on: context.eventLoop
            ) { [weak self] outcome in
                guard let self, let (_, decided) = self.report else { return }
                self.report = nil
                self.perform(self.exchange.reportAnswered(outcome, serial: serial), serial: serial).cascade(to: decided)
            }
            guard let sent else { return perform(exchange.reportAnswered(nil, serial: serial), serial: serial) }
            let decided = loop.makePromise(of: Void.self)
            report = (sent, decided)
            return decided.futureResult
        }
    }

    func upstreamReadComplete(attempt serial: Int) {
        guard exchange.sentAt(serial) != nil else { return }
        context?.flush()
    }

    func upstreamBody(_ part: ByteBuffer, attempt serial: Int) -> EventLoopFuture<Void> {
        guard let context, exchange.forwardsAnswerBody(serial: serial) else { return succeeded() }
        context.write(wrapOutboundOut(.body(.byteBuffer(part))), promise: nil)
        return untilWritable(context)
    }

    func upstreamEnd(attempt serial: Int) {
        guard let context else { return }
        switch exchange.upstreamEnd(serial: serial) {
        case .none:
            break
        case .endAnswer(let close):
            exchangeEnded(nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                if close { context.close(promise: nil) }
            }
            resumeReadingIfAllowed()
        case .waitForToken(let after, let serial):
            waitForToken(after: after, serial: serial)
        }
    }

    func upstreamFailed(_ error: UpstreamError, attempt serial: Int) {
        let action = exchange.upstreamFailed(error, serial: serial)
        if let ended = action.ended { shared.logUpstreamFailure("\(ended.head.method) request failed: \(error)") }
        perform(action)
    }

    // MARK: Rejected tokens

    /// The rejected answer is drained: waits for a token other than the rejected one, then the
    /// machine sends the request again.
    private func waitForToken(after fingerprint: String, serial: Int) {
        let bound = NIOLoopBound(self, eventLoop: loop)
        let loop = self.loop
        let wake: @Sendable () -> Void = {
            loop.execute {
                let handler = bound.value
                guard let (_, timeout) = handler.tokenWait else { return }
                timeout.cancel()
                handler.tokenWait = nil
                handler.replay(serial: serial)
            }
        }
        guard let id = shared.board.wait(after: fingerprint, now: shared.clock(), wake: wake) else {
            return replay(serial: serial)
        }
        let seconds = shared.settings.tokenWaitSeconds
        let timeout = loop.scheduleTask(in: .milliseconds(Int64(seconds * 1000))) {
            let handler = bound.value
            guard let (id, _) = handler.tokenWait else { return }
            handler.shared.board.cancelWait(id)
            handler.tokenWait = nil
            let action = handler.exchange.tokenWaitExpired(serial: serial, seconds: Int(seconds))
            if action.ended != nil { handler.shared.metrics.proxyRejection(replayed: false) }
            handler.perform(action)
        }
        tokenWait = (id, timeout)
    }

    private func replay(serial: Int) {
        let action = exchange.tokenPosted(serial: serial)
        if case .startAttempt = action { shared.metrics.proxyRejection(replayed: true) }
        perform(action)
    }

    // MARK: Answers the proxy gives itself

    private func noTokenRefusal() -> ProxyRules.Refusal {
        ProxyRules.Refusal(
            status: .serviceUnavailable,
            reason: .noToken,
            message: "no valid token: the daemon is logging in",
            headers: [("Retry-After", String(shared.board.retryAfter(at: shared.clock())))]
        )
    }

    /// Answers a request the proxy refuses: counted by reason, logged at most once a minute per
    /// peer (a client that repeats it must not fill the journal).
    private func refuse(
        _ head: HTTPRequestHead,
        _ refusal: ProxyRules.Refusal,
        close: Bool,
        began: NIODeadline = .now()
    ) {
        shared.metrics.proxyRefusal(refusal.reason.rawValue)
        shared.listener.logRefusal(
            "API proxy refused a request: \(refusal.message)",
            // A peer the allow lists refuse is logged as on the token socket.
            event: refusal.reason == .peer ? "peer_refused" : "proxy_refused",
            peer: peer,
            logger: shared.logger,
            metadata: [
                "reason": "\(refusal.reason.rawValue)", "status": "\(refusal.status.code)",
                "method": "\(head.method.rawValue)", "via": "\(listener == .unixSocket ? "unix" : "tcp")",
            ]
        )
        answerLocally(head, refusal.status, refusal.message, close: close, extra: refusal.headers, began: began)
    }

    /// Answers `head` without the upstream (its exchange, if any, has ended). `close`: the
    /// connection closes after it (the request's body may be unread, so nothing after it can be
    /// trusted to line up).
    private func answerLocally(
        _ head: HTTPRequestHead,
        _ status: HTTPResponseStatus,
        _ message: String,
        close: Bool,
        extra: [(String, String)] = [],
        began: NIODeadline
    ) {
        guard let context else { return }
        answered(head, status: status, byUpstream: false, began: began)
        let close = close || !head.isKeepAlive
        var body = ByteBuffer(bytes: (try? JSONEncoder().encode(["error": message])) ?? Data())
        body.writeString("\n")
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Via", value: ProxyRules.via)
        for (name, value) in extra { headers.add(name: name, value: value) }
        if close {
            headers.add(name: "Connection", value: "close")
        } else if head.version.minor == 0 {
            headers.add(name: "Connection", value: "keep-alive")
        }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))))
            .whenFailure { _ in }
        if head.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(body)))).whenFailure { _ in }
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            if close { context.close(promise: nil) }
        }
    }

    /// Written parts go out at the next flush (the upstream's read burst ends, or the answer does):
    /// a small answer leaves in one write. The upstream is read on at once while the client's
    /// channel takes more, and only once it drained otherwise (backpressure).
    /// A client that takes none of its answer for `idleTimeoutSeconds` is idle too: its
    /// connection closes, and the upstream connection it held goes back (64 never-read answers
    /// held every upstream connection for good).
    private func untilWritable(_ context: ChannelHandlerContext) -> EventLoopFuture<Void> {
        guard !context.channel.isWritable else { return succeeded() }
        context.flush()
        // The flush may have drained it (and told so already).
        guard !context.channel.isWritable else { return succeeded() }
        if let writable { return writable.futureResult }
        let promise = loop.makePromise(of: Void.self)
        writable = promise
        armUnreadTimeout(context, since: ClientProgress(context.channel))
        return promise.futureResult
    }

    /// Closes the connection unless the client took some of its answer within the idle timeout.
    /// Progress is measured, not inferred from writability: a Unix socket turns writable only once
    /// its peer has read all but a quarter of its buffer, so a slow but steady reader can stay
    /// unwritable for longer than the timeout.
    /// Two signs of progress:
    /// 1. NIO and the kernel together hold less for the client than when the timer was armed;
    /// 2. an empty write queued behind everything NIO holds completed: NIO got it all into the
    ///    kernel, which was full when the timer was armed, so the client read at least that much.
    /// A client that read less than NIO held (at most about 128 KiB) in the whole idle timeout, and
    /// whose kernel queue was refilled to its level, counts as stalled.
    private func armUnreadTimeout(_ context: ChannelHandlerContext, since before: ClientProgress) {
        let channel = context.channel
        let marker = loop.makePromise(of: Void.self)
        unreadMarkerDrained = false
        marker.futureResult.assumeIsolated().whenSuccess { [weak self] in self?.unreadMarkerDrained = true }
        context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(ByteBuffer()))), promise: marker)
        let timeout = shared.settings.idleTimeout
        unreadTimeout = loop.scheduleTask(in: timeout) { [weak self] in
            guard let self, self.writable != nil, let context = self.context else { return }
            let now = ClientProgress(channel)
            if self.unreadMarkerDrained || now.isAhead(of: before) {
                return self.armUnreadTimeout(context, since: now)
            }
            self.shared.metrics.proxyConnectionClosed("unread_answer")
            // The figures the rule judged, for an operator who wonders why (no header, no body).
            self.shared.logger.debug(
                "API proxy closed a client that took none of its answer",
                metadata: [
                    "event": "proxy_unread_closed", "nio_before": "\(before.buffered.map { "\($0)" } ?? "?")",
                    "nio_now": "\(now.buffered.map { "\($0)" } ?? "?")",
                    "kernel_before": "\(before.unread.map { "\($0)" } ?? "?")",
                    "kernel_now": "\(now.unread.map { "\($0)" } ?? "?")",
                ]
            )
            if let leftovers = self.exchange.clientGone() { self.exchangeEnded(leftovers) }
            channel.close(promise: nil)
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, let writable {
            self.writable = nil
            unreadTimeout?.cancel()
            unreadTimeout = nil
            writable.succeed()
        }
        context.fireChannelWritabilityChanged()
    }

    /// Counts an answer, and logs it at debug level: method, path without the query (which may
    /// carry the consumer's data), status, time since the request's head; never a header value.
    private func answered(_ head: HTTPRequestHead, status: HTTPResponseStatus, byUpstream: Bool, began: NIODeadline) {
        shared.metrics.proxyRequest(method: head.method.rawValue, status: Int(status.code), byUpstream: byUpstream)
        let logger = shared.logger
        guard logger.logLevel <= .debug else { return }
        let path = (head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "").prefix(
            256
        )
        logger.debug(
            "proxied",
            metadata: [
                "event": "proxy_request", "method": "\(head.method.rawValue)", "path": "\(path)",
                "status": "\(status.code)", "source": "\(byUpstream ? "upstream" : "proxy")",
                "ms": "\((NIODeadline.now() - began).nanoseconds / 1_000_000)",
            ]
        )
    }

    /// The exchange is over: the connection is idle again (it may be evicted, and no longer counts
    /// against its peer's share); what it held is let go of (`leftovers`: an exchange that ended
    /// early), and its waits for the daemon are withdrawn.
    private func exchangeEnded(_ leftovers: Exchange.Leftovers?) {
        leftovers?.connection?.cancel()
        if let id = leftovers?.poolWait { upstream.cancelWait(id) }
        if let (report, decided) = report {
            self.report = nil
            report.cancel()
            // The upstream connection waits on it; it is cancelled, or its answer was decided.
            decided.succeed()
        }
        if let (id, timeout) = tokenWait {
            tokenWait = nil
            timeout.cancel()
            shared.board.cancelWait(id)
        }
        if let channel = context?.channel { shared.connections.endWait(channel) }
    }

    private func succeeded() -> EventLoopFuture<Void> {
        loop.makeSucceededVoidFuture()
    }
}

extension ProxyExchange.Action {
    /// The exchange this action ends early, if it does.
    var ended: ProxyExchange.Ended? {
        switch self {
        case .refuse(let ended, _, _), .answer(let ended, _, _, _, _): ended
        case .close(let ended): ended
        default: nil
        }
    }
}

/// How much of its answer a client has yet to take: what NIO holds for it
/// (`bufferedWritableBytes`), and what the kernel holds that the client has not read
/// (`SO_MEMINFO`); nil where either cannot be read. While the client cannot take more the proxy
/// writes nothing, so their sum falls by what the client read, less what NIO moved into the kernel
/// meanwhile (see `armUnreadTimeout` for the other sign).
struct ClientProgress {
    var buffered: Int?
    var unread: UInt32?

    init(_ channel: any Channel) {
        buffered = try? channel.syncOptions?.getOption(.bufferedWritableBytes)
        unread = nil
        guard let provider = channel as? any SocketOptionProvider else { return }
        let info: EventLoopFuture<clinux_meminfo> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET),
            name: SocketOptionName(clinux_SO_MEMINFO)
        )
        // Read on the channel's loop, where the option is read at once and the callback runs
        // before this returns (as `PeerCredentials.read` relies on).
        var unread: UInt32?
        info.assumeIsolated().whenSuccess { meminfo in
            unread = withUnsafeBytes(of: meminfo.values) {
                $0.load(fromByteOffset: Int(clinux_SK_MEMINFO_WMEM_ALLOC) * 4, as: UInt32.self)
            }
        }
        self.unread = unread
    }

    var pending: Int { (buffered ?? 0) + Int(unread ?? 0) }

    func isAhead(of before: ClientProgress) -> Bool { pending < before.pending }
}
