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
/// answer streams back. `HTTPServerPipelineHandler` below hands it one request at a time.
///
/// What a client gets:
/// 1. a request refused before anything is sent (`ProxyRules.refusal`, the allow lists, no valid
///    token: 503 with `Retry-After`) is answered by the proxy, and the upstream never sees it;
/// 2. a body up to `ProxyRules.replayBufferBytes` is read whole before the request goes out (so it
///    can be replayed); a larger one streams, and the client is read no faster than the upstream
///    takes it;
/// 3. the answer streams back, read from the upstream no faster than the client takes it;
/// 4. an answer whose status is in `rejectedStatuses`, for a request sent with the current token,
///    is reported to the daemon (as `POST /token/invalidate` would). When the request is
///    replayable (idempotent method, body kept whole) its answer is dropped and the request sent
///    once more with the next token; otherwise the answer goes back with `X-Token-Refresh`
///    saying what happened (`started`, `newer-token`, `rate-limited`, `unavailable`,
///    `replay-rejected`);
/// 5. an upstream that cannot be reached or does not answer in time: 502 or 504 if nothing was
///    sent back yet, otherwise the connection is closed (a truncated answer must not look whole).
final class ProxyHandler: ChannelDuplexHandler, UpstreamResponder {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let shared: ProxyShared
    private let listener: ProxyRules.Listener
    private let loop: any EventLoop
    private var context: ChannelHandlerContext?
    private var peer: PeerCredentials?
    private var exchange: Exchange?
    /// Numbers each upstream attempt, so that callbacks of an abandoned one are ignored.
    private var attemptSerial = 0
    /// A read was asked for while the request body waited for the upstream; passed on later.
    private var readHeld = false
    /// Completed when the client's channel takes more again (the upstream waits for it).
    private var writable: EventLoopPromise<Void>?
    /// Closes the connection if the client takes nothing more of its answer meanwhile.
    private var unreadTimeout: Scheduled<Void>?
    /// Everything NIO held for the client when `unreadTimeout` was armed has reached the kernel.
    private var unreadMarkerDrained = false

    /// One request, from its head to the end of its answer.
    private struct Exchange {
        let head: HTTPRequestHead
        /// The client's headers as the upstream gets them, before the credentials are added.
        let headers: HTTPHeaders
        /// The request target on the upstream (its base path, then the client's target).
        let target: String
        let settings: ProxyShared.Live
        /// The body while it fits in the replay buffer.
        var body = ByteBuffer()
        var bodyBytes = 0
        var requestEnded = false
        /// Set once the body outgrew the replay buffer: it streams, and cannot be replayed.
        var stream: BodyStream?
        /// Attempts sent (at most two: the request and its replay).
        var attempts = 0
        var attempt = 0
        var token: TokenBoard.Entry?
        /// The upstream connection of the current attempt.
        var connection: UpstreamConnection?
        /// The pool's id of this attempt's wait for a connection, withdrawn if the exchange ends.
        var poolWait: Int?
        /// The answer's head said `Connection: close` (see `ProxyRules.AnswerFraming`).
        var closesAfterAnswer = false
        /// Bytes of `body` taken from the proxy's `BodyBudget`.
        var budgeted = 0
        /// A failure on a reused connection before any answer was retried once on a new one.
        var retriedStale = false
        var sentAt = NIODeadline.now()
        /// When the request's head arrived.
        let began = NIODeadline.now()
        var answer: Answer = .waiting
        /// A wait for the daemon (its answer to the report, or a new token), to cancel on close.
        var waiting: Waiting?

        var isReplayable: Bool { ProxyRules.rule(for: head.method).replayable && stream == nil }
        var hasBody: Bool {
            bodyBytes > 0 || head.headers.contains(name: "content-length")
                || head.headers.contains(name: "transfer-encoding")
        }
    }

    private enum Answer {
        /// No answer head from the upstream yet.
        case waiting
        /// The client has the head; body parts follow.
        case streaming
        /// The upstream rejected the token: its answer is dropped, and the request replayed.
        case discarding
    }

    private enum Waiting {
        case report(RejectionReport)
        case token(id: Int, timeout: Scheduled<Void>)
    }

    /// A request body on its way upstream once it outgrew the replay buffer.
    private final class BodyStream {
        var connection: UpstreamConnection?
        /// Parts read before the upstream connection was there.
        var queued: [ByteBuffer] = []
        var writesInFlight = 0
        /// The client's body ended; the upstream is told once every part is written.
        var ended = false
        var endSent = false

        /// Whether the client should not be read: the upstream has not taken what was read.
        var isFull: Bool { writesInFlight > 0 || !queued.isEmpty }
    }

    init(shared: ProxyShared, listener: ProxyRules.Listener, loop: any EventLoop) {
        self.shared = shared
        self.listener = listener
        self.loop = loop
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        let channel = context.channel
        if listener == .unixSocket {
            PeerCredentials.read(channel) { peer in
                self.peer = peer
                if !self.shared.access.allows(peer) { self.shared.connections.markRefused(channel) }
            }
        } else if !shared.access.allows(nil) {
            shared.connections.markRefused(channel)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        unreadTimeout?.cancel()
        abandon()
        writable?.fail(ChannelError.ioOnClosedChannel)
        writable = nil
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is IdleStateHandler.IdleStateEvent else { return context.fireUserInboundEventTriggered(event) }
        // Nothing read for the idle timeout. Closed: a connection with no exchange, and one whose
        // client owes the rest of a request body and sends none (the proxy is not the one holding
        // its reads back). Not: one waiting for the upstream or the daemon.
        guard let current = exchange else { return context.close(promise: nil) }
        if !current.requestEnded, !readHeld {
            shared.metrics.proxyConnectionClosed("stalled_body")
            if current.answer == .waiting {
                refuse(
                    current.head,
                    ProxyRules.Refusal(
                        status: .requestTimeout,
                        reason: .stalled,
                        message: "the request body stopped arriving"
                    ),
                    close: true
                )
            } else {
                abandon()
                context.close(promise: nil)
            }
        }
    }

    func read(context: ChannelHandlerContext) {
        if exchange?.stream?.isFull == true {
            readHeld = true
            return
        }
        context.read()
    }

    private func resumeReading() {
        guard readHeld, let context else { return }
        readHeld = false
        context.read()
    }

    // MARK: The request

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            begin(head, context: context)
        case .body(let part):
            receiveBody(part, context: context)
        case .end:
            guard exchange != nil, exchange?.requestEnded == false else { return }
            exchange?.requestEnded = true
            if let stream = exchange?.stream {
                stream.ended = true
                finishStreamIfDone(stream)
            } else {
                send()
            }
        }
    }

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
        // The body is read before the request goes out: a client waiting for 100 Continue is told
        // to send it now (the upstream never sees Expect).
        if head.headers.first(name: "expect")?.lowercased() == "100-continue" {
            context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))))
                .whenFailure { _ in }
        }
        exchange = Exchange(
            head: head,
            headers: ProxyRules.forwardedHeaders(head.headers),
            target: target,
            settings: settings
        )
    }

    private func receiveBody(_ part: ByteBuffer, context: ChannelHandlerContext) {
        // Read field by field: a copy of the exchange would share its body's storage, and the
        // append below would then copy the whole body for every part.
        guard exchange?.requestEnded == false, let limit = exchange?.settings.maxRequestBodyBytes else { return }
        exchange?.bodyBytes += part.readableBytes
        guard let bodyBytes = exchange?.bodyBytes, bodyBytes <= limit else {
            guard let current = exchange else { return }
            // Whatever was sent upstream is abandoned; the client gets 413 if it has no answer yet.
            let head = current.head
            let answered = current.answer != .waiting
            abandon()
            if answered {
                context.close(promise: nil)
            } else {
                let refusal = ProxyRules.Refusal(
                    status: .payloadTooLarge,
                    reason: .tooLarge,
                    message: "request body over outputs.proxy.maxRequestBodyBytes"
                )
                refuse(head, refusal, close: true)
            }
            return
        }
        if let stream = exchange?.stream {
            forward(part, on: stream)
            return
        }
        // Kept whole for a replay while it fits in the replay buffer and in the proxy's budget for
        // all such bodies (`BodyBudget`); otherwise it streams from here on, and is not replayed.
        let size = part.readableBytes
        let fits = (exchange?.body.readableBytes ?? 0) + size <= ProxyRules.replayBufferBytes
        if fits, shared.bodies.value.take(size) {
            var part = part
            exchange?.budgeted += size
            exchange?.body.writeBuffer(&part)
            return
        }
        let stream = BodyStream()
        if let body = exchange?.body, body.readableBytes > 0 { stream.queued.append(body) }
        stream.queued.append(part)
        releaseBody()
        exchange?.stream = stream
        send()
    }

    /// The exchange's kept body is no longer held (it streams, or the exchange ended): its bytes
    /// go back to the budget.
    private func releaseBody() {
        guard let budgeted = exchange?.budgeted, budgeted > 0 else { return }
        shared.bodies.value.give(budgeted)
        exchange?.budgeted = 0
        exchange?.body = ByteBuffer()
    }

    private func forward(_ part: ByteBuffer, on stream: BodyStream) {
        guard let connection = stream.connection else {
            stream.queued.append(part)
            return
        }
        stream.writesInFlight += 1
        connection.writeBody(part).assumeIsolated().whenComplete { [weak self] result in
            stream.writesInFlight -= 1
            // A failed write means the connection failed: its responder hears of it.
            guard case .success = result else { return }
            self?.finishStreamIfDone(stream)
            if !stream.isFull { self?.resumeReading() }
        }
    }

    /// The upstream connection took the request head: the body read so far goes out.
    private func attach(_ connection: UpstreamConnection, to stream: BodyStream) {
        stream.connection = connection
        let queued = stream.queued
        stream.queued = []
        for part in queued { forward(part, on: stream) }
        finishStreamIfDone(stream)
        if !stream.isFull { resumeReading() }
    }

    private func finishStreamIfDone(_ stream: BodyStream) {
        guard stream.ended, !stream.endSent, let connection = stream.connection, !stream.isFull else { return }
        stream.endSent = true
        connection.endBody()
    }

    // MARK: Upstream attempts

    /// Sends the request upstream with the current token (a replay with the next one).
    private func send() {
        guard var current = exchange else { return }
        guard let entry = shared.board.validEntry(at: shared.clock()) else {
            return refuse(current.head, noTokenRefusal(), close: !current.requestEnded)
        }
        attemptSerial += 1
        let attempt = attemptSerial
        current.attempts += 1
        current.attempt = attempt
        current.token = entry
        current.answer = .waiting
        current.sentAt = .now()
        var headers = current.headers
        headers.add(name: "Host", value: shared.target.hostHeader)
        headers.add(name: "Authorization", value: entry.authorization)
        headers.add(name: "x-api-key", value: entry.apiKey)
        let stream = current.stream
        if stream != nil {
            // The client's framing when it declared a length; chunked otherwise.
            if let length = current.head.headers.first(name: "content-length") {
                headers.add(name: "Content-Length", value: length)
            } else {
                headers.add(name: "Transfer-Encoding", value: "chunked")
            }
        } else if current.hasBody {
            headers.add(name: "Content-Length", value: String(current.body.readableBytes))
        }
        let head = HTTPRequestHead(
            version: .http1_1,
            method: current.head.method,
            uri: current.target,
            headers: headers
        )
        let body = stream == nil ? current.body : nil
        exchange = current
        let pool = shared.pool.value
        let waiting = pool.acquire(for: PeerKey(uid: peer?.uid)) { [weak self] result in
            guard let self, self.current(attempt) != nil else {
                // The exchange ended while the connection was made: the pool gets it back unused.
                if case .success(let connection) = result { pool.release(connection) }
                return
            }
            self.exchange?.poolWait = nil
            switch result {
            case .success(let connection):
                self.exchange?.connection = connection
                connection.send(head, body: body, streamed: stream != nil, to: self, attempt: attempt)
                if let stream { self.attach(connection, to: stream) }
            case .failure(.busy):
                self.shared.logUpstreamFailure("\(current.head.method) request found no free upstream connection")
                self.refuse(
                    current.head,
                    ProxyRules.Refusal(
                        status: .serviceUnavailable,
                        reason: .busy,
                        message: "every upstream connection stayed busy; try again",
                        headers: [("Retry-After", "1")]
                    ),
                    close: !(self.exchange?.requestEnded ?? false)
                )
            case .failure(let error):
                self.upstreamFailed(error, attempt: attempt)
            }
        }
        if let waiting, self.current(attempt) != nil { exchange?.poolWait = waiting }
    }

    /// Callbacks of attempt `attempt`, or nil when it is not the current one.
    private func current(_ attempt: Int) -> Exchange? {
        guard let exchange, exchange.attempt == attempt else { return nil }
        return exchange
    }

    func upstreamHead(_ head: HTTPResponseHead, attempt: Int) -> EventLoopFuture<Void> {
        guard let context, let current = current(attempt) else { return succeeded() }
        shared.metrics.proxyUpstreamHead(.nanoseconds((NIODeadline.now() - current.sentAt).nanoseconds))
        if current.settings.rejectedStatuses.contains(Int(head.status.code)) {
            return rejected(head, context: context)
        }
        return forwardHead(head, refresh: nil, context: context)
    }

    private func forwardHead(
        _ upstream: HTTPResponseHead,
        refresh: String?,
        context: ChannelHandlerContext
    ) -> EventLoopFuture<Void> {
        guard let current = exchange else { return succeeded() }
        var head = HTTPResponseHead(
            version: current.head.version,
            status: upstream.status,
            headers: ProxyRules.clientHeaders(upstream.headers)
        )
        if let refresh { head.headers.replaceOrAdd(name: ProxyRules.refreshHeader, value: refresh) }
        let framing = ProxyRules.answerFraming(
            status: upstream.status,
            requestMethod: current.head.method,
            clientVersion: current.head.version,
            hasLength: head.headers.contains(name: "content-length")
        )
        if framing == .chunked { head.headers.add(name: "Transfer-Encoding", value: "chunked") }
        let closes = !current.head.isKeepAlive || framing == .untilClose
        if closes {
            head.headers.replaceOrAdd(name: "Connection", value: "close")
        } else if current.head.version.minor == 0 {
            // An HTTP/1.0 client that asked to keep the connection is told it is kept.
            head.headers.replaceOrAdd(name: "Connection", value: "keep-alive")
        }
        exchange?.closesAfterAnswer = closes
        exchange?.answer = .streaming
        answered(current.head, status: upstream.status, byUpstream: true, began: current.began)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        return untilWritable(context)
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
        let timeout = exchange?.settings.idleTimeout ?? shared.settings.idleTimeout
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
            self.abandon()
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

    func upstreamReadComplete(attempt: Int) {
        guard current(attempt) != nil else { return }
        context?.flush()
    }

    func upstreamBody(_ part: ByteBuffer, attempt: Int) -> EventLoopFuture<Void> {
        guard let context, let current = current(attempt), current.answer == .streaming else { return succeeded() }
        context.write(wrapOutboundOut(.body(.byteBuffer(part))), promise: nil)
        return untilWritable(context)
    }

    func upstreamEnd(attempt: Int) {
        guard let context, let current = current(attempt) else { return }
        switch current.answer {
        case .discarding:
            replay()
        case .streaming:
            let close = current.closesAfterAnswer || !current.requestEnded
            endExchange()
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                if close { context.close(promise: nil) }
            }
            resumeReading()
        case .waiting:
            break
        }
    }

    func upstreamFailed(_ error: UpstreamError, attempt: Int) {
        guard let context, let current = current(attempt) else { return }
        exchange?.connection = nil
        // A kept-alive connection the upstream closed just as it was reused: once more, on a new one,
        // if nothing of the answer came and the request can be sent again.
        if case .closed = error, current.answer == .waiting, !current.retriedStale, current.isReplayable,
            (current.connection?.servedBefore ?? 0) > 0
        {
            exchange?.retriedStale = true
            exchange?.attempts -= 1
            return send()
        }
        shared.logUpstreamFailure("\(current.head.method) request failed: \(error)")
        guard current.answer == .waiting else {
            // Part of the answer went out: closing is the only way to say it is not whole.
            endExchange()
            context.close(promise: nil)
            return
        }
        let timedOut: Bool
        if case .timeout = error { timedOut = true } else { timedOut = false }
        answerLocally(
            current.head,
            timedOut ? .gatewayTimeout : .badGateway,
            timedOut ? "the upstream did not answer in time" : "the upstream cannot be reached (\(error))",
            close: true
        )
    }

    // MARK: Rejected tokens

    /// The upstream rejected the token the request carried: report it, then replay or forward.
    private func rejected(_ head: HTTPResponseHead, context: ChannelHandlerContext) -> EventLoopFuture<Void> {
        guard let current = exchange, let used = current.token else { return succeeded() }
        guard current.attempts == 1 else {
            shared.metrics.proxyRejection(replayed: false)
            return forwardHead(head, refresh: "replay-rejected", context: context)
        }
        let now = shared.clock()
        if shared.board.validEntry(at: now)?.fingerprint != used.fingerprint {
            // A new token came while the request was out: nothing to report.
            return decide(head, replayable: current.isReplayable, refresh: "newer-token", context: context)
        }
        let promise = context.eventLoop.makePromise(of: Void.self)
        let attempt = current.attempt
        let sent = RejectionReport.send(
            to: shared.board,
            fingerprint: used.fingerprint,
            reporterUID: peer?.uid,
            on: context.eventLoop
        ) { outcome in
            guard let context = self.context, self.current(attempt) != nil, case .report? = self.exchange?.waiting
            else { return }
            self.exchange?.waiting = nil
            let replayable = self.exchange?.isReplayable ?? false
            let decided: EventLoopFuture<Void>
            switch outcome {
            case .accepted?:
                decided = self.decide(head, replayable: replayable, refresh: "started", context: context)
            case .stale?:
                decided = self.decide(head, replayable: replayable, refresh: "newer-token", context: context)
            case .rateLimited?:
                self.shared.metrics.proxyRejection(replayed: false)
                decided = self.forwardHead(head, refresh: "rate-limited", context: context)
            case nil:
                self.shared.metrics.proxyRejection(replayed: false)
                decided = self.forwardHead(head, refresh: "unavailable", context: context)
            }
            decided.cascade(to: promise)
        }
        guard let sent else {
            shared.metrics.proxyRejection(replayed: false)
            return forwardHead(head, refresh: "unavailable", context: context)
        }
        exchange?.waiting = .report(sent)
        return promise.futureResult
    }

    /// Replays a replayable request (dropping the rejected answer), or forwards the rejection.
    private func decide(
        _ head: HTTPResponseHead,
        replayable: Bool,
        refresh: String,
        context: ChannelHandlerContext
    ) -> EventLoopFuture<Void> {
        guard replayable else {
            shared.metrics.proxyRejection(replayed: false)
            return forwardHead(head, refresh: refresh, context: context)
        }
        exchange?.answer = .discarding
        return succeeded()
    }

    /// The rejected answer is drained: waits for a token other than the rejected one, then sends
    /// the request again.
    private func replay() {
        guard let current = exchange, let used = current.token, let context else { return }
        let loop = context.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        let attempt = current.attempt
        let wake: @Sendable () -> Void = {
            loop.execute {
                let handler = bound.value
                guard handler.current(attempt) != nil, case .token(_, let timeout)? = handler.exchange?.waiting else {
                    return
                }
                timeout.cancel()
                handler.exchange?.waiting = nil
                handler.shared.metrics.proxyRejection(replayed: true)
                handler.send()
            }
        }
        guard let id = shared.board.wait(after: used.fingerprint, now: shared.clock(), wake: wake) else {
            shared.metrics.proxyRejection(replayed: true)
            return send()
        }
        let seconds = current.settings.tokenWaitSeconds
        let timeout = loop.scheduleTask(in: .milliseconds(Int64(seconds * 1000))) {
            let handler = bound.value
            guard let current = handler.current(attempt), case .token(let id, _)? = current.waiting else { return }
            handler.shared.board.cancelWait(id)
            handler.exchange?.waiting = nil
            handler.shared.metrics.proxyRejection(replayed: false)
            handler.answerLocally(
                current.head,
                .serviceUnavailable,
                "the upstream rejected the token and no new one came within \(Int(seconds)) s",
                close: false,
                extra: [("Retry-After", "5"), (ProxyRules.refreshHeader, "started")]
            )
        }
        exchange?.waiting = .token(id: id, timeout: timeout)
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
    private func refuse(_ head: HTTPRequestHead, _ refusal: ProxyRules.Refusal, close: Bool) {
        shared.metrics.proxyRefusal(refusal.reason.rawValue)
        if shared.access.shouldLogRefusal(of: peer?.uid) {
            shared.logger.warning(
                "API proxy refused a request: \(refusal.message)",
                metadata: [
                    // A peer the allow lists refuse is logged as on the token socket.
                    "event": "\(refusal.reason == .peer ? "peer_refused" : "proxy_refused")", "listener": "proxy",
                    "reason": "\(refusal.reason.rawValue)", "status": "\(refusal.status.code)",
                    "method": "\(head.method.rawValue)", "via": "\(listener == .unixSocket ? "unix" : "tcp")",
                    "uid": "\(peer.map { "\($0.uid)" } ?? "?")", "pid": "\(peer.map { "\($0.pid)" } ?? "?")",
                ]
            )
        }
        answerLocally(head, refusal.status, refusal.message, close: close, extra: refusal.headers)
    }

    /// Answers `head` without the upstream, ending the exchange. `close`: the connection closes
    /// after it (the request's body may be unread, so nothing after it can be trusted to line up).
    private func answerLocally(
        _ head: HTTPRequestHead,
        _ status: HTTPResponseStatus,
        _ message: String,
        close: Bool,
        extra: [(String, String)] = []
    ) {
        guard let context else { return }
        let began = exchange?.began ?? .now()
        abandon()
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
        resumeReading()
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
    /// against its peer's share).
    private func endExchange() {
        releaseBody()
        exchange = nil
        if let channel = context?.channel { shared.connections.endWait(channel) }
    }

    /// Ends the current exchange without answering: the upstream request is cancelled, waits for
    /// the daemon are withdrawn, a streaming body fails.
    private func abandon() {
        guard let current = exchange else { return }
        endExchange()
        current.connection?.cancel()
        if let id = current.poolWait { shared.pool.value.cancelWait(id) }
        switch current.waiting {
        case .report(let report)?:
            report.cancel()
        case .token(let id, let timeout)?:
            timeout.cancel()
            shared.board.cancelWait(id)
        case nil:
            break
        }
    }

    private func succeeded() -> EventLoopFuture<Void> {
        loop.makeSucceededVoidFuture()
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
