import NIOCore
import NIOHTTP1

/// What the proxy's exchange needs of an upstream connection (`UpstreamConnection`; a fake in the
/// handler's tests).
protocol UpstreamLink: AnyObject {
    /// Requests served before the current one (a stale keep-alive connection fails on reuse).
    var servedBefore: Int { get }
    /// Sends `head` (and `body` when the body is known whole); a streamed body follows through
    /// `writeBody` and `endBody`. The answer goes to `responder`, tagged `attempt`.
    func send(_ head: HTTPRequestHead, body: ByteBuffer?, streamed: Bool, to responder: UpstreamResponder, attempt: Int)
    /// Completes once the part is written (backpressure).
    func writeBody(_ part: ByteBuffer) -> EventLoopFuture<Void>
    func endBody()
    /// The answer is not wanted: the connection closes and is not reused.
    func cancel()
}

/// Where the proxy's exchange gets its upstream connections (`UpstreamPool`; a fake in tests).
/// Existentials, not generics: a generic handler runs unspecialized behind NIO's handler
/// protocols, and looked up its type metadata at run time on every request (10 % of a proxied
/// request's instructions under callgrind, where these calls cost one witness-table call each).
protocol UpstreamSource: AnyObject {
    /// Hands `then` a connection for one request of `peer`, or why none could be had; returns the
    /// wait's id when the request waits (for `cancelWait`).
    @discardableResult
    func acquireLink(for peer: PeerKey, _ then: @escaping (Result<any UpstreamLink, UpstreamError>) -> Void) -> Int?
    func cancelWait(_ id: Int)
    /// A connection handed over after its request went away, unused.
    func releaseLink(_ link: any UpstreamLink)
}

/// The values of `X-Token-Refresh` on an answer the upstream rejected (README "Consumers"): what
/// the proxy did about the rejection.
enum TokenRefresh: String, Sendable {
    /// The report started a login (the request was replayed if it could be, else the answer says so).
    case started
    /// A newer token than the rejected one is current.
    case newerToken = "newer-token"
    /// The login schedule holds logins back: the rejection is passed on.
    case rateLimited = "rate-limited"
    /// The daemon did not take the report.
    case unavailable
    /// The replay's token was rejected too.
    case replayRejected = "replay-rejected"
}

/// One request through the proxy, from its head to the end of its answer, as a state machine that
/// performs no I/O (swift-nio's state machines, async-http-client's `HTTPRequestStateMachine`):
/// each input is a `mutating func` that returns what `ProxyHandler` is to do.
///
/// The states, in order (a replay or a stale connection's retry goes round once more):
///
///     idle ─head→ receiving ─end, or body past the replay buffer→ ready ─token→ sending
///       ↑                                                            ↑             │
///       └──────── answer ended, refused, failed, client gone ────────┴─ awaitingToken
///
/// What the rules guarantee (each has an `EmbeddedChannel` test in `ProxyHandlerTests`):
/// 1. exactly one framed request per attempt: a kept body goes with `Content-Length`, a streamed
///    one with the client's length or chunked; at most two attempts (the request and one replay),
///    plus one retry of an attempt whose reused connection failed before any answer;
/// 2. a replay only of a replayable method (`ProxyRules.rule(for:)`) whose body was kept whole,
///    after the upstream rejected the token and the daemon took the report, with a token other
///    than the rejected one;
/// 3. the client gets one answer per request, framed by `ProxyRules.AnswerFraming`, and the
///    connection closes after any answer the client cannot tell the end of, or that came before
///    the client's body ended;
/// 4. kept bodies hold their bytes of the `BodyBudget` exactly while kept; reads stop while a
///    streamed body waits for the upstream (`holdsReads`).
struct ProxyExchange {
    typealias Connection = any UpstreamLink

    /// What is fixed for the exchange when its head arrives. A class: the states carry it from one
    /// to the next, and a reference moves with one retain where the struct's eight fields took
    /// one each, on every input (callgrind). Only the machine holds it.
    final class Request {
        let head: HTTPRequestHead
        /// The client's headers as the upstream gets them, before `Host` and the credentials.
        let forwarded: HTTPHeaders
        /// The request target on the upstream (its base path, then the client's target).
        let target: String
        /// The upstream's `Host`.
        let host: String
        let maxBodyBytes: Int
        let rejectedStatuses: Set<Int>
        /// When the head arrived.
        let began: NIODeadline
        /// Body bytes received so far, kept or streamed.
        var bodyBytes = 0

        init(
            head: HTTPRequestHead,
            target: String,
            host: String,
            maxBodyBytes: Int,
            rejectedStatuses: Set<Int>,
            began: NIODeadline = .now()
        ) {
            self.head = head
            self.forwarded = ProxyRules.forwardedHeaders(head.headers)
            self.target = target
            self.host = host
            self.maxBodyBytes = maxBodyBytes
            self.rejectedStatuses = rejectedStatuses
            self.began = began
        }

        var declaresBody: Bool {
            head.headers.contains(name: "content-length") || head.headers.contains(name: "transfer-encoding")
        }
    }

    /// The request's body once the request can go out.
    enum Body {
        /// Kept whole (the request ended), for a replay: `budgeted` bytes of the `BodyBudget`.
        case kept(ByteBuffer, budgeted: Int)
        /// Outgrew the replay buffer or the budget: it streams, and is not replayed.
        case streaming(Stream)
    }

    struct Stream {
        /// Parts read before the upstream connection was there.
        var queued: [ByteBuffer] = []
        var writesInFlight = 0
        /// The client's body ended; the upstream is told once every part is written.
        var ended = false
        var endSent = false

        var isFull: Bool { writesInFlight > 0 || !queued.isEmpty }
    }

    /// Attempts made so far, carried from one attempt to the next.
    struct History {
        /// 0 before the first; 1 after the request, 2 after its replay.
        var attempts = 0
        /// An attempt was already retried on a new connection after a reused one failed.
        var retriedStale = false
    }

    /// One attempt: the request on its way with one token.
    struct Attempt {
        /// Numbers every attempt of the connection: callbacks of another one are ignored.
        let serial: Int
        let history: History
        let fingerprint: String
        let sentAt: NIODeadline
        /// The request as the upstream gets it, credentials included.
        let upstreamHead: HTTPRequestHead
        var link: Link
        var answer: Answer
    }

    enum Link {
        /// Asked the pool; `waitID` once it said the request waits.
        case acquiring(waitID: Int?)
        case connected(Connection)
    }

    enum Answer {
        /// No answer head from the upstream yet.
        case waiting
        /// The upstream rejected the token; the daemon has the report (the answer is paused).
        case reporting(HTTPResponseHead)
        /// The rejected answer is dropped; the request is replayed once it ends.
        case discarding
        /// The client has the head; body parts follow. `closes`: the connection closes after it.
        case streaming(closes: Bool)
    }

    enum State {
        case idle
        /// The head arrived; the body is read and kept, nothing sent yet.
        case receiving(Request, kept: ByteBuffer, budgeted: Int)
        /// The request can go; `attempt(with:)` sends it with the token the handler reads.
        case ready(Request, Body, History)
        case sending(Request, Attempt, Body)
        /// The rejected answer is drained: waiting for a token other than `after`.
        case awaitingToken(Request, kept: ByteBuffer, budgeted: Int, History, serial: Int, after: String)
        /// Only while an input runs, so that a kept body is not copied when it grows.
        case modifying
    }

    /// What an exchange that ended early held, for the handler to let go of.
    struct Leftovers {
        /// Its answer is not wanted: cancelled (closed, never reused).
        var connection: Connection?
        /// Withdrawn from the pool's waiters.
        var poolWait: Int?
    }

    /// How an exchange ended: the request, for the answer and the log.
    struct Ended {
        var head: HTTPRequestHead
        var began: NIODeadline
        var leftovers: Leftovers
    }

    enum Action {
        case none
        /// The client waits for `100 Continue` before sending its body.
        case sendContinue(HTTPVersion)
        /// Read a token and call `attempt(with:)`.
        case startAttempt
        /// Ask the pool for a connection; its answer goes to `connected`, `poolBusy` or `upstreamFailed`.
        case acquire(serial: Int)
        /// The pool's connection came for an attempt that is over: it goes back unused.
        case release(Connection)
        /// Send the request on `connection`, then write `parts` (each completion to `bodyWritten`),
        /// then end the body if `end`.
        case send(
            Connection,
            HTTPRequestHead,
            body: ByteBuffer?,
            streamed: Bool,
            serial: Int,
            parts: [ByteBuffer],
            end: Bool
        )
        case writeBody(Connection, ByteBuffer, serial: Int)
        case endBody(Connection)
        /// Refused by the proxy (counted and logged by reason): answer it, closing after if `close`.
        case refuse(Ended, ProxyRules.Refusal, close: Bool)
        /// Answered by the proxy for the upstream (502, 504, 503): answer it, closing after if `close`.
        case answer(
            Ended,
            HTTPResponseStatus,
            message: String,
            headers: [(String, String)],
            close: Bool
        )
        /// Close the client's connection: no answer can follow (or none is wanted).
        case close(Ended?)
    }

    /// What to do with an upstream answer's head.
    enum HeadAction {
        /// Not the current attempt.
        case ignore
        /// Write `head` to the client (`refresh`: an answer the upstream rejected, passed on).
        case forward(HTTPResponseHead, request: HTTPRequestHead, began: NIODeadline, refresh: TokenRefresh?)
        /// Dropped with the rest of the answer: the request is replayed.
        case discard
        /// Report the rejected token to the daemon; its answer goes to `reportAnswered`.
        case report(fingerprint: String)
    }

    private(set) var state: State = .idle
    private var serial = 0
    private let budget: BodyBudget

    init(budget: BodyBudget) {
        self.budget = budget
    }

    /// Whether the client is not to be read: a streamed body waits for the upstream to take what
    /// was read.
    var holdsReads: Bool {
        switch state {
        case .ready(_, .streaming(let stream), _), .sending(_, _, .streaming(let stream)): stream.isFull
        default: false
        }
    }

    /// When the current attempt was sent, if `serial` is it.
    func sentAt(_ serial: Int) -> NIODeadline? {
        guard case .sending(_, let attempt, _) = state, attempt.serial == serial else { return nil }
        return attempt.sentAt
    }

    /// Whether the client's body has all arrived (an exchange that is over has none to come).
    var requestEnded: Bool {
        switch state {
        case .receiving: false
        case .ready(_, .streaming(let stream), _), .sending(_, _, .streaming(let stream)): stream.ended
        default: true
        }
    }

    // MARK: The request

    /// A request the handler admitted (the gates before it: `ProxyRules.refusal`, the allow lists,
    /// a valid token, the peer's share).
    mutating func begin(_ request: Request) -> Action {
        guard case .idle = state else {
            // `ProxyRequestQueue` hands on one request at a time; should another come, nothing on
            // this connection can be trusted to line up: it closes (not the daemon).
            return .close(end())
        }
        state = .receiving(request, kept: ByteBuffer(), budgeted: 0)
        // The body is read before the request goes out: a client waiting for 100 Continue is told
        // to send it now (the upstream never sees Expect).
        // (An HTTP/1.0 client's expectation is ignored: RFC 9110 §10.1.1.)
        if request.head.version.major == 1, request.head.version.minor >= 1,
            request.head.headers.first(name: "expect")?.lowercased() == "100-continue"
        {
            return .sendContinue(request.head.version)
        }
        return .none
    }

    mutating func bodyPart(_ part: ByteBuffer) -> Action {
        switch state {
        case .receiving(var request, var kept, var budgeted):
            request.bodyBytes += part.readableBytes
            guard request.bodyBytes <= request.maxBodyBytes else {
                state = .receiving(request, kept: kept, budgeted: budgeted)
                return tooLarge()
            }
            // Kept whole for a replay while it fits in the replay buffer and in the proxy's budget
            // for all such bodies; otherwise it streams from here on, and is not replayed.
            state = .modifying
            let size = part.readableBytes
            if kept.readableBytes + size <= ProxyRules.replayBufferBytes, budget.take(size) {
                var part = part
                kept.writeBuffer(&part)
                budgeted += size
                state = .receiving(request, kept: kept, budgeted: budgeted)
                return .none
            }
            budget.give(budgeted)
            var stream = Stream()
            if kept.readableBytes > 0 { stream.queued.append(kept) }
            stream.queued.append(part)
            state = .ready(request, .streaming(stream), History())
            return .startAttempt
        case .ready(var request, .streaming(var stream), let history):
            request.bodyBytes += part.readableBytes
            stream.queued.append(part)
            state = .ready(request, .streaming(stream), history)
            return request.bodyBytes <= request.maxBodyBytes ? .none : tooLarge()
        case .sending(var request, let attempt, .streaming(var stream)):
            request.bodyBytes += part.readableBytes
            guard request.bodyBytes <= request.maxBodyBytes else {
                state = .sending(request, attempt, .streaming(stream))
                return tooLarge()
            }
            guard case .connected(let connection) = attempt.link else {
                stream.queued.append(part)
                state = .sending(request, attempt, .streaming(stream))
                return .none
            }
            stream.writesInFlight += 1
            state = .sending(request, attempt, .streaming(stream))
            return .writeBody(connection, part, serial: attempt.serial)
        case .idle, .ready, .sending, .awaitingToken:
            // A refused request's body (its connection closes), or parts past a body's end.
            return .none
        case .modifying:
            preconditionFailure("input during an input")
        }
    }

    /// A body past `maxRequestBodyBytes`: 413 if the client has no answer yet, otherwise the
    /// connection closes; whatever was sent upstream is abandoned.
    private mutating func tooLarge() -> Action {
        endEarly(
            ProxyRules.Refusal(
                status: .payloadTooLarge,
                reason: .tooLarge,
                message: "request body over outputs.proxy.maxRequestBodyBytes"
            )
        )
    }

    /// Ends the exchange before its answer is whole: the client gets `refusal` (and the connection
    /// closes after it) if nothing of an answer went out yet; otherwise the connection just closes.
    private mutating func endEarly(_ refusal: ProxyRules.Refusal) -> Action {
        let answerStarted = forwardsAnswerBody
        guard let ended = end() else { return .none }
        return answerStarted ? .close(ended) : .refuse(ended, refusal, close: true)
    }

    mutating func requestEnd() -> Action {
        switch state {
        case .receiving(let request, let kept, let budgeted):
            state = .ready(request, .kept(kept, budgeted: budgeted), History())
            return .startAttempt
        case .ready(let request, .streaming(var stream), let history):
            stream.ended = true
            state = .ready(request, .streaming(stream), history)
            return .none
        case .sending(let request, let attempt, .streaming(var stream)):
            stream.ended = true
            state = .sending(request, attempt, .streaming(stream))
            return endStreamIfDone()
        case .idle, .ready, .sending, .awaitingToken:
            return .none
        case .modifying:
            preconditionFailure("input during an input")
        }
    }

    /// The upstream is told the body ended once every part read is written.
    private mutating func endStreamIfDone() -> Action {
        guard case .sending(let request, let attempt, .streaming(var stream)) = state,
            case .connected(let connection) = attempt.link, stream.ended, !stream.endSent, !stream.isFull
        else { return .none }
        stream.endSent = true
        state = .sending(request, attempt, .streaming(stream))
        return .endBody(connection)
    }

    // MARK: Attempts

    /// Sends the request with `token` (the handler's current one), or refuses it when there is none.
    mutating func attempt(
        with token: TokenBoard.Entry?,
        refusalWithoutToken: @autoclosure () -> ProxyRules.Refusal
    )
        -> Action
    {
        guard case .ready(let request, let body, var history) = state else { return .none }
        guard let token else {
            let close = !requestEnded
            guard let ended = end() else { return .none }
            return .refuse(ended, refusalWithoutToken(), close: close)
        }
        var headers = request.forwarded
        headers.add(name: "Host", value: request.host)
        headers.add(name: "Authorization", value: token.authorization)
        headers.add(name: "x-api-key", value: token.apiKey)
        switch body {
        case .streaming:
            // The client's framing when it declared a length; chunked otherwise.
            if let length = request.head.headers.first(name: "content-length") {
                headers.add(name: "Content-Length", value: length)
            } else {
                headers.add(name: "Transfer-Encoding", value: "chunked")
            }
        case .kept(let kept, _):
            if request.declaresBody || kept.readableBytes > 0 {
                headers.add(name: "Content-Length", value: String(kept.readableBytes))
            }
        }
        serial += 1
        history.attempts += 1
        let attempt = Attempt(
            serial: serial,
            history: history,
            fingerprint: token.fingerprint,
            sentAt: .now(),
            upstreamHead: HTTPRequestHead(
                version: .http1_1,
                method: request.head.method,
                uri: request.target,
                headers: headers
            ),
            link: .acquiring(waitID: nil),
            answer: .waiting
        )
        state = .sending(request, attempt, body)
        return .acquire(serial: serial)
    }

    /// The pool said attempt `serial` waits for a connection, as `id`.
    mutating func waiting(_ id: Int, serial: Int) {
        guard case .sending(let request, var attempt, let body) = state, attempt.serial == serial,
            case .acquiring = attempt.link
        else { return }
        attempt.link = .acquiring(waitID: id)
        state = .sending(request, attempt, body)
    }

    mutating func connected(_ connection: Connection, serial: Int) -> Action {
        guard case .sending(let request, var attempt, var body) = state, attempt.serial == serial,
            case .acquiring = attempt.link
        else { return .release(connection) }
        attempt.link = .connected(connection)
        switch body {
        case .kept(let kept, _):
            state = .sending(request, attempt, body)
            return .send(
                connection,
                attempt.upstreamHead,
                body: kept,
                streamed: false,
                serial: serial,
                parts: [],
                end: false
            )
        case .streaming(var stream):
            let parts = stream.queued
            stream.queued = []
            stream.writesInFlight += parts.count
            let end = stream.ended && parts.isEmpty
            stream.endSent = end
            body = .streaming(stream)
            state = .sending(request, attempt, body)
            return .send(
                connection,
                attempt.upstreamHead,
                body: nil,
                streamed: true,
                serial: serial,
                parts: parts,
                end: end
            )
        }
    }

    /// A part of a streamed body was written (or failed: the connection's failure comes through
    /// `upstreamFailed`).
    mutating func bodyWritten(serial: Int, ok: Bool) -> Action {
        guard case .sending(let request, let attempt, .streaming(var stream)) = state, attempt.serial == serial else {
            return .none
        }
        stream.writesInFlight -= 1
        state = .sending(request, attempt, .streaming(stream))
        return ok ? endStreamIfDone() : .none
    }

    /// Every upstream connection stayed busy for the wait's deadline: 503 with `Retry-After`.
    mutating func poolBusy(serial: Int) -> Action {
        guard case .sending(_, let attempt, _) = state, attempt.serial == serial else { return .none }
        let close = !requestEnded
        guard let ended = end() else { return .none }
        let refusal = ProxyRules.Refusal(
            status: .serviceUnavailable,
            reason: .busy,
            message: "every upstream connection stayed busy; try again",
            headers: [("Retry-After", "1")]
        )
        return .refuse(ended, refusal, close: close)
    }

    mutating func upstreamFailed(_ error: UpstreamError, serial: Int) -> Action {
        guard case .sending(let request, var attempt, let body) = state, attempt.serial == serial else { return .none }
        let reused: Bool
        if case .connected(let connection) = attempt.link {
            reused = connection.servedBefore > 0
        } else {
            reused = false
        }
        // The connection failed: nothing of it to cancel.
        attempt.link = .acquiring(waitID: nil)
        state = .sending(request, attempt, body)
        // A kept-alive connection the upstream closed just as it was reused: once more, on a new
        // one, if nothing of the answer came and the request can be sent again.
        if case .closed = error, case .waiting = attempt.answer, reused, !attempt.history.retriedStale,
            case .kept = body, ProxyRules.rule(for: request.head.method).replayable
        {
            var history = attempt.history
            history.attempts -= 1
            history.retriedStale = true
            state = .ready(request, body, history)
            return .startAttempt
        }
        guard case .waiting = attempt.answer else {
            // Part of the answer went out: closing is the only way to say it is not whole.
            return .close(end())
        }
        guard let ended = end() else { return .none }
        let timedOut: Bool
        if case .timeout = error { timedOut = true } else { timedOut = false }
        return .answer(
            ended,
            timedOut ? .gatewayTimeout : .badGateway,
            message: timedOut ? "the upstream did not answer in time" : "the upstream cannot be reached (\(error))",
            headers: [],
            close: true
        )
    }

    // MARK: The answer

    /// The upstream's answer head for attempt `serial`. `current` reads the fingerprint of the token
    /// the daemon holds now, when a rejected status needs it.
    mutating func upstreamHead(
        _ head: HTTPResponseHead,
        serial: Int,
        current: @autoclosure () -> String?
    ) -> HeadAction {
        guard case .sending(let request, let attempt, _) = state, attempt.serial == serial,
            case .waiting = attempt.answer
        else { return .ignore }
        guard request.rejectedStatuses.contains(Int(head.status.code)) else { return forward(head, refresh: nil) }
        if attempt.history.attempts > 1 { return forward(head, refresh: .replayRejected) }
        // A new token came while the request was out: nothing to report.
        if current() != attempt.fingerprint { return replayOrForward(head, refresh: .newerToken) }
        setAnswer(.reporting(head))
        return .report(fingerprint: attempt.fingerprint)
    }

    /// The daemon's answer to the report of attempt `serial` (nil: it did not take it).
    mutating func reportAnswered(_ outcome: DaemonCore.RejectionOutcome?, serial: Int) -> HeadAction {
        guard case .sending(_, let attempt, _) = state, attempt.serial == serial,
            case .reporting(let head) = attempt.answer
        else { return .ignore }
        switch outcome {
        case .accepted?: return replayOrForward(head, refresh: .started)
        case .stale?: return replayOrForward(head, refresh: .newerToken)
        case .rateLimited?: return forward(head, refresh: .rateLimited)
        case nil: return forward(head, refresh: .unavailable)
        }
    }

    private mutating func replayOrForward(_ head: HTTPResponseHead, refresh: TokenRefresh) -> HeadAction {
        guard case .sending(let request, _, .kept) = state, ProxyRules.rule(for: request.head.method).replayable else {
            return forward(head, refresh: refresh)
        }
        setAnswer(.discarding)
        return .discard
    }

    /// The client's head for the upstream's: its fields less hop-by-hop ones, framed by the proxy
    /// (`ProxyRules.AnswerFraming`), `Connection: close` when the client cannot tell the end
    /// otherwise or did not ask to keep the connection.
    private mutating func forward(_ upstream: HTTPResponseHead, refresh: TokenRefresh?) -> HeadAction {
        guard case .sending(let request, _, _) = state else { return .ignore }
        var head = HTTPResponseHead(
            version: request.head.version,
            status: upstream.status,
            headers: ProxyRules.clientHeaders(upstream.headers)
        )
        if let refresh { head.headers.replaceOrAdd(name: ProxyRules.refreshHeader, value: refresh.rawValue) }
        let framing = ProxyRules.answerFraming(
            status: upstream.status,
            requestMethod: request.head.method,
            clientVersion: request.head.version,
            hasLength: head.headers.contains(name: "content-length")
        )
        if framing == .chunked { head.headers.add(name: "Transfer-Encoding", value: "chunked") }
        // An answer that comes before the client's body ended closes the connection after it
        // (`upstreamEnd`): the head says so.
        let closes = !request.head.isKeepAlive || framing == .untilClose || !requestEnded
        if closes {
            head.headers.replaceOrAdd(name: "Connection", value: "close")
        } else if request.head.version.minor == 0 {
            // An HTTP/1.0 client that asked to keep the connection is told it is kept.
            head.headers.replaceOrAdd(name: "Connection", value: "keep-alive")
        }
        setAnswer(.streaming(closes: closes))
        return .forward(head, request: request.head, began: request.began, refresh: refresh)
    }

    private mutating func setAnswer(_ answer: Answer) {
        guard case .sending(let request, var attempt, let body) = state else { return }
        attempt.answer = answer
        state = .sending(request, attempt, body)
    }

    /// Whether a part of attempt `serial`'s answer goes to the client (a dropped answer's does not).
    func forwardsAnswerBody(serial: Int) -> Bool {
        guard case .sending(_, let attempt, _) = state, attempt.serial == serial else { return false }
        return forwardsAnswerBody
    }

    /// The client has the head of the current attempt's answer, and its body follows.
    private var forwardsAnswerBody: Bool {
        guard case .sending(_, let attempt, _) = state, case .streaming = attempt.answer else { return false }
        return true
    }

    enum EndAction {
        case none
        /// The answer is whole: end it, then close the connection if `close`.
        case endAnswer(close: Bool)
        /// The dropped answer ended: wait for a token other than `after`, then `tokenPosted`.
        case waitForToken(after: String, serial: Int)
    }

    /// The upstream's answer for attempt `serial` ended (its connection went back to the pool).
    mutating func upstreamEnd(serial: Int) -> EndAction {
        guard case .sending(let request, let attempt, let body) = state, attempt.serial == serial else { return .none }
        switch (attempt.answer, body) {
        case (.discarding, .kept(let kept, let budgeted)):
            state = .awaitingToken(
                request,
                kept: kept,
                budgeted: budgeted,
                attempt.history,
                serial: serial,
                after: attempt.fingerprint
            )
            return .waitForToken(after: attempt.fingerprint, serial: serial)
        case (.streaming(let closes), _):
            // An answer that came before the client's body ended: what is left of the body
            // cannot be told from the next request.
            let close = closes || !requestEnded
            _ = end()
            return .endAnswer(close: close)
        default:
            return .none
        }
    }

    /// A token other than the rejected one is current: the request goes once more.
    mutating func tokenPosted(serial: Int) -> Action {
        guard case .awaitingToken(let request, let kept, let budgeted, let history, let waited, _) = state,
            waited == serial
        else { return .none }
        state = .ready(request, .kept(kept, budgeted: budgeted), history)
        return .startAttempt
    }

    /// No new token came within the wait after a rejection: 503, the connection kept.
    mutating func tokenWaitExpired(serial: Int, seconds: Int) -> Action {
        guard case .awaitingToken(_, _, _, _, let waited, _) = state, waited == serial, let ended = end() else {
            return .none
        }
        return .answer(
            ended,
            .serviceUnavailable,
            message: "the upstream rejected the token and no new one came within \(seconds) s",
            headers: [("Retry-After", "5"), (ProxyRules.refreshHeader, TokenRefresh.started.rawValue)],
            close: false
        )
    }

    // MARK: The client

    /// Nothing was read from the client for the idle timeout. Closed: a connection with no
    /// exchange, and one whose client owes the rest of a request body and sends none (the proxy is
    /// not the one holding its reads back). Not: one waiting for the upstream or the daemon.
    mutating func idle() -> Action {
        switch state {
        case .idle:
            return .close(nil)
        case .receiving, .ready, .sending:
            guard !requestEnded, !holdsReads else { return .none }
            return endEarly(
                ProxyRules.Refusal(
                    status: .requestTimeout,
                    reason: .stalled,
                    message: "the request body stopped arriving"
                )
            )
        case .awaitingToken, .modifying:
            return .none
        }
    }

    /// The client's connection closed, or is being closed: what the exchange held, to let go of.
    mutating func clientGone() -> Leftovers? {
        end()?.leftovers
    }

    /// Ends the exchange: the kept body goes back to the budget; returns what the handler lets go
    /// of, or nil when no exchange was running.
    @discardableResult
    private mutating func end() -> Ended? {
        let ended: Ended
        switch state {
        case .idle, .modifying:
            return nil
        case .receiving(let request, _, let budgeted):
            budget.give(budgeted)
            ended = Ended(head: request.head, began: request.began, leftovers: Leftovers())
        case .ready(let request, let body, _):
            if case .kept(_, let budgeted) = body { budget.give(budgeted) }
            ended = Ended(head: request.head, began: request.began, leftovers: Leftovers())
        case .sending(let request, let attempt, let body):
            if case .kept(_, let budgeted) = body { budget.give(budgeted) }
            var leftovers = Leftovers()
            switch attempt.link {
            case .acquiring(let id): leftovers.poolWait = id
            case .connected(let connection): leftovers.connection = connection
            }
            ended = Ended(head: request.head, began: request.began, leftovers: leftovers)
        case .awaitingToken(let request, _, let budgeted, _, _, _):
            budget.give(budgeted)
            ended = Ended(head: request.head, began: request.began, leftovers: Leftovers())
        }
        state = .idle
        return ended
    }
}
