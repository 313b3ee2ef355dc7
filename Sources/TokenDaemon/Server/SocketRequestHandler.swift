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

/// Serves one connection: answers each request from the `TokenBoard`, in order. Errors stay on
/// this connection.
///
/// Below it in the pipeline only NIO's request decoder runs; answers are written as bytes
/// (`HTTPResponseBytes`): a token from the board's pre-encoded response, in one write. Answers go
/// out in request order: a request pipelined behind a long poll waits for it (up to
/// `maxQueued`, then the connection is closed).
///
/// A client that sends requests without reading the answers cannot make the daemon hold them:
/// 1. while the channel is not writable (more than the high watermark, 64 KiB, waits for the
///    kernel), no more is read from the connection, as NIO's pipelining handler does;
/// 2. requests already read and decoded still get answers; once more than `maxUnwritable` of them
///    were written while the channel was not writable, the connection is closed and its answers
///    dropped. A connection thus holds at most the watermark plus that many answers.
final class SocketRequestHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Longest long poll a client may ask for.
    static let maxWait: TimeInterval = 300
    /// Request-target length accepted (the headers are bounded by the decoder's limits).
    static let maxTargetLength = 2048
    /// Requests a client may pipeline behind a long poll.
    static let maxQueued = 8
    /// Answers written while the channel could take no more before the connection is closed.
    static let maxUnwritable = 16
    /// Body of a rejected-token report accepted (a fingerprint, optionally with a newline).
    static let maxReportBody = 256

    /// One request as read: its head, and the body of a report (other bodies are not kept).
    struct Request {
        var head: HTTPRequestHead
        var body = ByteBuffer()
        var bodyTooLarge = false
    }

    /// What a request waits for before the connection answers anything else.
    private enum Pending {
        /// A long poll: its board waiter and timeout.
        case longPoll(id: Int, timeout: Scheduled<Void>)
        /// A rejected-token report waiting for the daemon's answer.
        case report(RejectionReport)
    }

    private let board: TokenBoard
    /// Its connections, and who may read the token (`access`: read on every request, so that a
    /// reload's allow lists apply at once).
    private let listener: Listener
    private var connections: ConnectionTable { listener.connections }
    private var access: SocketAccess { listener.access }
    private let metrics: DaemonMetrics
    private let logger: Logger
    private let clock: @Sendable () -> Date

    private var peer: PeerCredentials?
    private var request: Request?
    private var pending: Pending?
    /// Requests that arrived while a long poll or report was pending, answered after it.
    private var queued: [Request] = []
    /// A read was asked for while the channel was not writable; it is passed on once it is.
    private var readHeld = false
    /// Answers written since the channel stopped being writable.
    private var writtenUnwritable = 0

    init(
        board: TokenBoard,
        listener: Listener,
        metrics: DaemonMetrics,
        logger: Logger,
        clock: @escaping @Sendable () -> Date
    ) {
        self.board = board
        self.listener = listener
        self.metrics = metrics
        self.logger = logger
        self.clock = clock
    }

    func channelActive(context: ChannelHandlerContext) {
        listener.identify(context.channel, unixSocket: true) { self.peer = $0 }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        cancelPending(context: context)
        context.fireChannelInactive()
    }

    // MARK: Backpressure (see the type's comment)

    func read(context: ChannelHandlerContext) {
        guard context.channel.isWritable else {
            readHeld = true
            return
        }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            writtenUnwritable = 0
            if readHeld {
                readHeld = false
                context.read()
            }
        }
        context.fireChannelWritabilityChanged()
    }

    /// Every answer goes out here. `thenClose`: the connection closes once it is written.
    private func send(_ answer: ByteBuffer, context: ChannelHandlerContext, thenClose: Bool = false) {
        if !context.channel.isWritable {
            writtenUnwritable += 1
            guard writtenUnwritable <= Self.maxUnwritable else {
                metrics.socketConnectionDropped("unread")
                context.close(promise: nil)
                return
            }
        }
        guard thenClose else {
            context.writeAndFlush(wrapOutboundOut(answer), promise: nil)
            return
        }
        context.writeAndFlush(wrapOutboundOut(answer)).whenComplete { [channel = context.channel] _ in
            channel.close(promise: nil)
        }
    }

    /// A malformed or oversized request (the decoder's error): answered 400 and closed, as nothing
    /// after it on this connection can be trusted to line up.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard context.channel.isActive else { return }
        metrics.socketRequest(path: "other", status: 400)
        let answer = HTTPResponseBytes.encode(
            .badRequest,
            contentType: "application/json",
            body: ByteBuffer(string: #"{"error":"malformed request"}"# + "\n"),
            keepAlive: false
        )
        send(answer, context: context, thenClose: true)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Idle connections are closed; a long poll is not idle.
        if event is IdleStateHandler.IdleStateEvent, pending == nil {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            request = Request(head: head)
            connections.touch(context.channel)
        case .body(var part):
            // Only a report's body is read; it is small, and a larger one is refused, not kept.
            guard request?.head.uri.hasPrefix(SocketRoute.tokenInvalidate.path) == true else { return }
            if (request?.body.readableBytes ?? 0) + part.readableBytes > Self.maxReportBody {
                request?.bodyTooLarge = true
            } else {
                request?.body.writeBuffer(&part)
            }
        case .end:
            guard let request else { return }
            self.request = nil
            guard pending == nil else {
                queued.append(request)
                if queued.count > Self.maxQueued { context.close(promise: nil) }
                return
            }
            route(request, context: context)
        }
    }

    private func route(_ request: Request, context: ChannelHandlerContext) {
        let head = request.head
        // The common case first, without splitting the target: a plain GET of a token resource.
        if head.method == .GET, let resource = TokenBoard.Resource(path: head.uri), isAllowed() {
            return serveToken(head, resource: resource, now: clock(), context: context)
        }
        let (path, query) = Self.split(head.uri)
        guard head.uri.utf8.count <= Self.maxTargetLength else {
            return respond(
                .uriTooLong,
                path: "other",
                json: #"{"error":"request target too long"}"#,
                head: head,
                context: context
            )
        }
        if path == SocketRoute.tokenInvalidate.path {
            return reportRejected(request, query: query, context: context)
        }
        guard head.method == .GET || head.method == .HEAD else {
            return respond(
                .methodNotAllowed,
                path: path,
                json: #"{"error":"only GET"}"#,
                head: head,
                context: context,
                extra: [("Allow", "GET, HEAD")]
            )
        }
        guard isAllowed() else { return refuse(head, path: path, context: context) }
        let now = clock()
        if let resource = TokenBoard.Resource(path: path) {
            if let wait = query["wait"].flatMap(Double.init), wait > 0, resource != .headers || access.servesHeaders {
                return longPoll(
                    head,
                    resource: resource,
                    wait: min(wait, Self.maxWait),
                    after: query["after"],
                    context: context
                )
            }
            return serveToken(head, resource: resource, now: now, context: context)
        }
        switch SocketRoute(rawValue: path) {
        case .healthz:
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            let body = (try? encoder.encode(board.health)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
            respond(
                board.validEntry(at: now) != nil ? .ok : .serviceUnavailable,
                path: path,
                json: body,
                head: head,
                context: context
            )
        case .metrics:
            respond(
                .ok,
                path: path,
                body: ByteBuffer(bytes: metrics.render(now: now)),
                contentType: "text/plain; version=0.0.4; charset=utf-8",
                head: head,
                context: context
            )
        default:
            respond(.notFound, path: "other", json: SocketRoute.notFoundBody, head: head, context: context)
        }
    }

    private func serveToken(
        _ head: HTTPRequestHead,
        resource: TokenBoard.Resource,
        now: Date,
        context: ChannelHandlerContext
    ) {
        guard resource != .headers || access.servesHeaders else {
            return respond(
                .notFound,
                path: resource.path,
                json:
                    #"{"error":"/headers is not served: it carries the API key; configure outputs.headersFile or outputs.socket.serveHeaders"}"#,
                head: head,
                context: context
            )
        }
        guard let entry = board.validEntry(at: now) else {
            return respond(
                .serviceUnavailable,
                path: resource.path,
                json: #"{"error":"no valid token","status":"\#(board.health.status)"}"#,
                head: head,
                context: context,
                extra: [("Retry-After", String(board.retryAfter(at: now)))]
            )
        }
        if head.method == .GET, head.version == .http1_1, head.isKeepAlive {
            metrics.socketRequest(path: resource.path, status: 200)
            send(entry.keepAliveResponse(resource), context: context)
            return
        }
        respond(
            .ok,
            path: resource.path,
            body: entry.body(resource),
            contentType: resource.contentType,
            head: head,
            context: context,
            extra: [("X-Token-Fingerprint", entry.fingerprint)]
        )
    }

    private func longPoll(
        _ head: HTTPRequestHead,
        resource: TokenBoard.Resource,
        wait: TimeInterval,
        after: String?,
        context: ChannelHandlerContext
    ) {
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        let answer: @Sendable () -> Void = {
            loop.execute {
                let (handler, context) = bound.value
                guard case .longPoll = handler.pending else { return }
                handler.cancelPending(context: context)
                handler.serveToken(head, resource: resource, now: handler.clock(), context: context)
                handler.answerQueued(context: context)
            }
        }
        guard connections.beginWait(context.channel, uid: peer?.uid) else {
            return respond(
                .tooManyRequests,
                path: resource.path,
                json: #"{"error":"too many long polls by this user"}"#,
                head: head,
                context: context,
                extra: [("Retry-After", "5")]
            )
        }
        guard let id = board.wait(after: after, now: clock(), wake: answer) else {
            connections.endWait(context.channel)
            return serveToken(head, resource: resource, now: clock(), context: context)
        }
        let timeout = loop.scheduleTask(in: .milliseconds(Int64(wait * 1000))) { answer() }
        pending = .longPoll(id: id, timeout: timeout)
        logger.debug("long poll", metadata: ["event": "long_poll", "uid": "\(peer.map { "\($0.uid)" } ?? "?")"])
    }

    /// Answers what was pipelined behind a long poll or a report, until another one is pending.
    private func answerQueued(context: ChannelHandlerContext) {
        while pending == nil, context.channel.isActive, !queued.isEmpty {
            route(queued.removeFirst(), context: context)
        }
    }

    private func cancelPending(context: ChannelHandlerContext) {
        guard let pending else { return }
        self.pending = nil
        switch pending {
        case .longPoll(let id, let timeout):
            timeout.cancel()
            board.cancelWait(id)
            connections.endWait(context.channel)
        case .report(let report):
            report.cancel()
        }
    }

    /// 403 for a peer the allow lists do not name; logged once per uid per minute.
    private func refuse(_ head: HTTPRequestHead, path: String, context: ChannelHandlerContext) {
        listener.logRefusal("socket peer refused", event: "peer_refused", peer: peer, logger: logger)
        respond(
            .forbidden,
            path: path,
            json: #"{"error":"this user may not read the token"}"#,
            head: head,
            context: context
        )
    }

    // MARK: Rejected-token reports (README "Socket API")

    /// `POST /token/invalidate`: the API rejected the token with this fingerprint. The daemon's
    /// core decides (`DaemonCore.tokenRejected`); the answer is 202 (a login is under way: long-poll
    /// `/token?after=FP`), 409 (not the current token: read again) or 429 (a login was forced too
    /// recently). Same allow lists as reading the token.
    private func reportRejected(_ request: Request, query: [String: String], context: ChannelHandlerContext) {
        let head = request.head
        let path = SocketRoute.tokenInvalidate.path
        guard head.method == .POST else {
            return respond(
                .methodNotAllowed,
                path: path,
                json: #"{"error":"only POST"}"#,
                head: head,
                context: context,
                extra: [("Allow", "POST")]
            )
        }
        guard isAllowed() else { return refuse(head, path: path, context: context) }
        guard !request.bodyTooLarge else {
            return respond(
                .payloadTooLarge,
                path: path,
                json: #"{"error":"a report's body is the fingerprint only"}"#,
                head: head,
                context: context
            )
        }
        let named =
            head.headers.first(name: "X-Token-Fingerprint") ?? query["fingerprint"]
            ?? String(buffer: request.body)
        guard let fingerprint = Fingerprint.parse(named) else {
            return respond(
                .badRequest,
                path: path,
                json:
                    #"{"error":"name the rejected token by its fingerprint (8 hex characters, as in X-Token-Fingerprint): header X-Token-Fingerprint, ?fingerprint= or the body"}"#,
                head: head,
                context: context
            )
        }
        let sent = RejectionReport.send(
            to: board,
            fingerprint: fingerprint,
            reporterUID: peer?.uid,
            on: context.eventLoop
        ) { outcome in
            self.pending = nil
            self.answerReport(outcome, fingerprint: fingerprint, head: head, context: context)
            self.answerQueued(context: context)
        }
        guard let sent else { return answerReport(nil, fingerprint: fingerprint, head: head, context: context) }
        pending = .report(sent)
    }

    /// `outcome` nil: the daemon did not answer (not running yet, or stopping).
    private func answerReport(
        _ outcome: DaemonCore.RejectionOutcome?,
        fingerprint: String,
        head: HTTPRequestHead,
        context: ChannelHandlerContext
    ) {
        let path = SocketRoute.tokenInvalidate.path
        switch outcome {
        case .accepted?:
            respond(
                .accepted,
                path: path,
                json:
                    #"{"status":"accepted","rejected":"\#(fingerprint)","next":"\#(SocketRoute.token.path)?wait=30&after=\#(fingerprint)"}"#,
                head: head,
                context: context
            )
        case .stale(let current)?:
            respond(
                .conflict,
                path: path,
                json: #"{"error":"not the current token","current":\#(current.map { "\"\($0)\"" } ?? "null")}"#,
                head: head,
                context: context,
                extra: current.map { [("X-Token-Fingerprint", $0)] } ?? []
            )
        case .rateLimited(let until)?:
            let seconds = max(1, Int(until.timeIntervalSince(clock()).rounded(.up)))
            respond(
                .tooManyRequests,
                path: path,
                json: #"{"error":"a login was forced too recently","retryAfter":\#(seconds)}"#,
                head: head,
                context: context,
                extra: [("Retry-After", String(seconds))]
            )
        case nil:
            respond(
                .serviceUnavailable,
                path: path,
                json: #"{"error":"the daemon is not taking reports now"}"#,
                head: head,
                context: context,
                extra: [("Retry-After", "1")]
            )
        }
    }

    private func isAllowed() -> Bool {
        access.allows(peer)
    }

    private func respond(
        _ status: HTTPResponseStatus,
        path: String,
        json: String,
        head: HTTPRequestHead,
        context: ChannelHandlerContext,
        extra: [(String, String)] = []
    ) {
        respond(
            status,
            path: path,
            body: ByteBuffer(string: json + "\n"),
            contentType: "application/json",
            head: head,
            context: context,
            extra: extra
        )
    }

    private func respond(
        _ status: HTTPResponseStatus,
        path: String,
        body: ByteBuffer,
        contentType: String,
        head: HTTPRequestHead,
        context: ChannelHandlerContext,
        extra: [(String, String)] = []
    ) {
        let keepAlive = head.isKeepAlive && status != .uriTooLong
        var extra = extra
        // An HTTP/1.0 client keeps the connection only when told so.
        if keepAlive && head.version.major == 1 && head.version.minor == 0 {
            extra.append(("Connection", "keep-alive"))
        }
        metrics.socketRequest(path: path, status: Int(status.code))
        let answer = HTTPResponseBytes.encode(
            status,
            contentType: contentType,
            body: body,
            headers: extra,
            keepAlive: keepAlive,
            includeBody: head.method != .HEAD
        )
        send(answer, context: context, thenClose: !keepAlive)
    }

    static func split(_ uri: String) -> (path: String, query: [String: String]) {
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        var query: [String: String] = [:]
        if parts.count == 2 {
            for pair in parts[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                query[String(kv[0])] = kv.count == 2 ? String(kv[1]) : ""
            }
        }
        return (String(parts[0]), query)
    }
}
