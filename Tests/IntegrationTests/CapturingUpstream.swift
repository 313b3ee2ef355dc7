import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// An upstream for the proxy's tests on loopback: it keeps every byte each connection sent, parses
/// them as a real HTTP/1.1 server would (NIO's decoder, strict), and answers each request it parsed
/// `200` with `request N` (N counted over all connections), or holds the answers until `release`.
///
/// What the proxy's boundary tests assert on: the exact bytes the upstream received, and how many
/// requests it parsed out of them (a smuggled request is one more than the client sent).
final class CapturingUpstream: Sendable {
    struct Request: Sendable {
        var connection: Int
        var method: String
        var uri: String
        var headers: [(String, String)]
        var body: [UInt8]
    }

    private struct State {
        var raw: [Int: [UInt8]] = [:]
        var requests: [Request] = []
        var connections = 0
        /// Answers to requests whose target starts with this wait for `release`.
        var holding: String?
        /// Answers held: each a promise that writes it.
        var held: [EventLoopPromise<Void>] = []
    }

    private let state = NIOLockedValueBox(State())
    private let channel = NIOLockedValueBox<(any Channel)?>(nil)

    /// The length of the answer to `GET /big`.
    static let bigAnswerBytes = 8 << 20

    /// Starts listening on 127.0.0.1; returns the port.
    func start() async throws -> Int {
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                let id = self.state.withLockedValue { state in
                    state.connections += 1
                    return state.connections
                }
                return channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(RawRecorder(upstream: self, connection: id))
                    try sync.addHandler(HTTPResponseEncoder())
                    try sync.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .fireError)))
                    try sync.addHandler(Answerer(upstream: self, connection: id))
                }
            }
        let bound = try await bootstrap.bind(host: "127.0.0.1", port: 0).get()
        channel.withLockedValue { $0 = bound }
        return bound.localAddress?.port ?? 0
    }

    func stop() async {
        let bound = channel.withLockedValue { $0 }
        try? await bound?.close()
        release()
    }

    /// Every request parsed, in arrival order.
    var requests: [Request] { state.withLockedValue { $0.requests } }
    var connections: Int { state.withLockedValue { $0.connections } }
    /// Everything every connection sent, connection after connection.
    var rawBytes: [UInt8] {
        state.withLockedValue { state in state.raw.keys.sorted().flatMap { state.raw[$0] ?? [] } }
    }
    var rawText: String { String(decoding: rawBytes, as: UTF8.self) }
    /// Answers held now.
    var heldCount: Int { state.withLockedValue { $0.held.count } }

    /// From now on answers to targets starting with `prefix` wait for `release` (requests are
    /// still counted as they arrive).
    func hold(_ prefix: String = "/") { state.withLockedValue { $0.holding = prefix } }

    /// Writes every held answer, and answers at once from now on.
    func release() {
        let held = state.withLockedValue { state in
            state.holding = nil
            defer { state.held = [] }
            return state.held
        }
        for promise in held { promise.succeed() }
    }

    fileprivate func record(_ bytes: ByteBuffer, connection: Int) {
        state.withLockedValue { $0.raw[connection, default: []] += Array(bytes.readableBytesView) }
    }

    /// Records `request`; returns its number and, when answers are held, the promise to wait for.
    fileprivate func received(_ request: Request, on loop: any EventLoop) -> (Int, EventLoopFuture<Void>?) {
        state.withLockedValue { state in
            state.requests.append(request)
            guard let prefix = state.holding, request.uri.hasPrefix(prefix) else { return (state.requests.count, nil) }
            let promise = loop.makePromise(of: Void.self)
            state.held.append(promise)
            return (state.requests.count, promise.futureResult)
        }
    }

    private final class RawRecorder: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        typealias InboundOut = ByteBuffer
        let upstream: CapturingUpstream
        let connection: Int

        init(upstream: CapturingUpstream, connection: Int) {
            self.upstream = upstream
            self.connection = connection
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            upstream.record(unwrapInboundIn(data), connection: connection)
            context.fireChannelRead(data)
        }
    }

    private final class Answerer: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let upstream: CapturingUpstream
        let connection: Int
        private var head: HTTPRequestHead?
        private var body: [UInt8] = []

        init(upstream: CapturingUpstream, connection: Int) {
            self.upstream = upstream
            self.connection = connection
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                self.head = head
                body = []
            case .body(let part):
                body += Array(part.readableBytesView)
            case .end:
                guard let head else { return }
                let request = Request(
                    connection: connection,
                    method: head.method.rawValue,
                    uri: head.uri,
                    headers: head.headers.map { ($0.name, $0.value) },
                    body: body
                )
                let (number, wait) = upstream.received(request, on: context.eventLoop)
                let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                let answer = { [self] in
                    let context = bound.value
                    if head.uri == "/nolength" {
                        // An answer with no length: HTTP/1.0 style, the body runs to the close.
                        let head = HTTPResponseHead(version: .http1_0, status: .ok, headers: ["Connection": "close"])
                        context.write(self.wrapOutboundOut(.head(head)), promise: nil)
                        if request.method != "HEAD" {
                            let text = ByteBuffer(string: "until the close\n")
                            context.write(self.wrapOutboundOut(.body(.byteBuffer(text))), promise: nil)
                        }
                        context.writeAndFlush(self.wrapOutboundOut(.end(nil))).whenComplete { _ in
                            bound.value.close(promise: nil)
                        }
                        return
                    }
                    // `/big`: an answer larger than any socket buffer, for clients that leave mid-answer.
                    let text =
                        head.uri == "/big"
                        ? ByteBuffer(repeating: UInt8(ascii: "b"), count: CapturingUpstream.bigAnswerBytes)
                        : ByteBuffer(string: "request \(number)\n")
                    var headers = HTTPHeaders()
                    headers.add(name: "Content-Length", value: String(text.readableBytes))
                    context.write(
                        self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))),
                        promise: nil
                    )
                    // `/headbody`: a broken upstream that sends a body after the head of an answer to
                    // HEAD, in the same write.
                    if head.method != .HEAD || head.uri.hasSuffix("/headbody") {
                        context.write(self.wrapOutboundOut(.body(.byteBuffer(text))), promise: nil)
                    }
                    context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)
                }
                if let wait {
                    wait.hop(to: context.eventLoop).assumeIsolated().whenSuccess { answer() }
                } else {
                    answer()
                }
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }
}
