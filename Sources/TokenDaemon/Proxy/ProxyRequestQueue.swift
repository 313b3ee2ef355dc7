import NIOCore
import NIOHTTP1

/// Hands `ProxyHandler` one request at a time, answers in order, and bounds what a client that
/// pipelines can make the proxy hold (in the place of NIO's `HTTPServerPipelineHandler`, which
/// keeps every decoded request: 400 connections each with 214 KiB of small requests behind one
/// slow GET took the daemon from 25 to 575 MB).
///
/// What a client gets:
/// 1. the parts of the request being answered go to the handler as they come;
/// 2. requests behind it wait, up to `maxQueuedRequests` requests and `maxQueuedBodyBytes` of their
///    bodies, and nothing more is read from the connection while any wait;
/// 3. past either bound (one read decodes many small requests at once), the rest is dropped: the
///    requests queued before it are answered, then the connection closes. A client that counts its
///    answers sends the unanswered requests again on a new connection, as after any server close;
/// 4. bytes that do not decode behind requests read whole (or any after `Connection: close`) are
///    treated alike: what was read whole is answered, then the connection closes, with no 400 in
///    front of an answer to a request the upstream has.
///
/// The rules live in `ProxyRequestQueue.Machine` (no I/O); the handler performs its actions.
final class ProxyRequestQueue: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// Requests a client may pipeline behind the one being answered (the token socket's rule).
    static let maxQueuedRequests = SocketRequestHandler.maxQueued
    /// Body bytes of those requests held at once.
    static let maxQueuedBodyBytes = 64 * 1024

    struct Machine {
        /// The request being answered: its parts pass straight through.
        private(set) var requestOpen = false
        /// Its answer has begun and not ended yet.
        private(set) var answering = false
        private(set) var queue = CircularBuffer<HTTPServerRequestPart>()
        private var queuedRequests = 0
        private var queuedBytes = 0
        /// A bound was passed: everything read from now on is dropped, and the connection closes
        /// once the queue is answered.
        private(set) var overflowed = false
        /// The answer being written says `Connection: close`: nothing more is handed on.
        private(set) var closing = false

        enum ReadAction: Equatable {
            case deliver
            case queued
            case dropped
        }

        /// A part decoded from the connection.
        mutating func received(_ part: HTTPServerRequestPart) -> ReadAction {
            if overflowed || closing { return .dropped }
            if requestOpen || (!answering && queue.isEmpty) {
                if case .head = part {
                    requestOpen = true
                    answering = true
                }
                if case .end = part { requestOpen = false }
                return .deliver
            }
            switch part {
            case .head: queuedRequests += 1
            case .body(let bytes): queuedBytes += bytes.readableBytes
            case .end: break
            }
            guard queuedRequests <= ProxyRequestQueue.maxQueuedRequests,
                queuedBytes <= ProxyRequestQueue.maxQueuedBodyBytes
            else {
                overflowed = true
                // A body part or end belongs to the last request queued, which is incomplete now:
                // none of it goes to the handler. (A head was not queued yet.)
                if case .head = part { return .dropped }
                while let last = queue.popLast() {
                    if case .head = last { break }
                }
                return .dropped
            }
            queue.append(part)
            return .queued
        }

        enum AnswerAction: Equatable {
            /// Hand these parts to the handler: the next request (as much of it as was read).
            case deliver([HTTPServerRequestPart])
            /// Nothing waits: read on.
            case resumeReading
            /// The queue is answered after an overflow.
            case close
        }

        /// The body part just queued did not fit in the proxy's `BodyBudget`: as past a bound.
        mutating func overflow() {
            overflowed = true
            while let last = queue.popLast() {
                if case .head = last { break }
            }
        }

        /// The decoder could not read what followed the requests read so far (malformed bytes, or
        /// any after a request that said `Connection: close`). With a request whose parts all
        /// arrived still being answered, that answer goes out, the requests queued whole before the
        /// bad bytes are answered, and the connection closes: true. Otherwise (nothing to answer, or
        /// the bad bytes are inside the request being read) false: the error handler answers 400
        /// and the connection closes.
        mutating func malformed() -> Bool {
            if overflowed || closing { return true }
            guard answering, !requestOpen else { return false }
            overflow()
            return true
        }

        /// The answer being written closes the connection (`Connection: close`): no request queued
        /// behind it may reach the handler, which would send it upstream although the client is
        /// told the connection ends here, and may send it again.
        mutating func answerCloses() {
            closing = true
            queue.removeAll()
        }

        /// The answer to the request being answered was written whole.
        mutating func answerEnded() -> AnswerAction {
            answering = false
            if closing { return .close }
            guard !requestOpen else { return .resumeReading }
            guard let head = queue.popFirst() else { return overflowed ? .close : .resumeReading }
            var parts = [head]
            queuedRequests -= 1
            requestOpen = true
            answering = true
            while let next = queue.first {
                if case .head = next { break }
                queue.removeFirst()
                parts.append(next)
                switch next {
                case .body(let bytes): queuedBytes -= bytes.readableBytes
                case .end: requestOpen = false
                case .head: break
                }
            }
            return .deliver(parts)
        }

        /// Whether the connection may be read: not while a request waits, nor after an overflow.
        var mayRead: Bool { queue.isEmpty && !overflowed && !closing }
    }

    private var machine = Machine()
    private var readHeld = false
    /// The proxy's budget for held bodies (nil: unbounded, in tests), and what the queue took of it.
    private let bodies: NIOLoopBound<BodyBudget>?
    private var budgeted = 0

    init(bodies: NIOLoopBound<BodyBudget>? = nil) {
        self.bodies = bodies
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch machine.received(part) {
        case .deliver:
            context.fireChannelRead(data)
        case .queued:
            guard case .body(let bytes) = part, let bodies else { return }
            if bodies.value.take(bytes.readableBytes) {
                budgeted += bytes.readableBytes
            } else {
                machine.overflow()
                releaseBudget()
            }
        case .dropped:
            break
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard error is HTTPParserError || error is ByteToMessageDecoderError, machine.malformed() else {
            return context.fireErrorCaught(error)
        }
        // Answered first, then closed (`Machine.malformed`): a 400 now would answer a request
        // the upstream has, and may have run.
        releaseBudget()
    }

    func channelInactive(context: ChannelHandlerContext) {
        releaseBudget()
        context.fireChannelInactive()
    }

    /// Queued bodies are handed on or dropped: their bytes go back (once the queue is empty, all).
    private func releaseBudget() {
        guard budgeted > 0, machine.queue.isEmpty || machine.overflowed else { return }
        bodies?.value.give(budgeted)
        budgeted = 0
    }

    func read(context: ChannelHandlerContext) {
        guard machine.mayRead else {
            readHeld = true
            return
        }
        context.read()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let part = unwrapOutboundIn(data)
        if case .head(let head) = part, !head.isKeepAlive, head.status.code >= 200 { machine.answerCloses() }
        guard case .end = part else { return context.write(data, promise: promise) }
        switch machine.answerEnded() {
        case .deliver(let parts):
            releaseBudget()
            context.write(data, promise: promise)
            // As NIO's pipelining handler does: the next request at once, in order.
            for part in parts { context.fireChannelRead(wrapInboundOut(part)) }
            context.fireChannelReadComplete()
            resumeIfAllowed(context)
        case .resumeReading:
            context.write(data, promise: promise)
            resumeIfAllowed(context)
        case .close:
            let written = context.eventLoop.makePromise(of: Void.self)
            written.futureResult.cascade(to: promise)
            context.writeAndFlush(data, promise: written)
            let channel = context.channel
            written.futureResult.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    private func resumeIfAllowed(_ context: ChannelHandlerContext) {
        guard readHeld, machine.mayRead else { return }
        readHeld = false
        context.read()
    }
}

/// The request bodies the proxy keeps whole for a replay, all connections together, bounded: a
/// body that does not fit streams instead (and is not replayed), read no faster than the upstream
/// takes it. Without it 512 connections could each hold a 64 KiB replay buffer, and uploads waiting
/// for an upstream connection cost about 250 KiB each. Used on the proxy's one loop only.
final class BodyBudget {
    /// 8 MiB: 128 replay buffers at once, far more than the pool has connections to send them on.
    static let defaultLimit = 8 << 20

    let limit: Int
    private(set) var used = 0

    init(limit: Int) { self.limit = limit }

    /// Takes `bytes` if they fit.
    func take(_ bytes: Int) -> Bool {
        guard used + bytes <= limit else { return false }
        used += bytes
        return true
    }

    func give(_ bytes: Int) { used = max(0, used - bytes) }
}
