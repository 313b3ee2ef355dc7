import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@testable import TokenDaemon

/// The proxy's pipelining rules (`ProxyRequestQueue`): one request at a time, answers in order, a
/// bounded queue, and no reading while anything waits.
@Suite struct ProxyRequestQueueTests {
    static func head(_ uri: String) -> HTTPServerRequestPart {
        .head(HTTPRequestHead(version: .http1_1, method: .GET, uri: uri))
    }

    /// The URIs of the heads among `parts`.
    static func uris(_ parts: [HTTPServerRequestPart]) -> [String] {
        parts.compactMap { if case .head(let head) = $0 { head.uri } else { nil } }
    }

    @Test func theRequestBeingAnsweredPassesAndTheNextWaitsForItsAnswer() {
        var machine = ProxyRequestQueue.Machine()
        #expect(machine.received(Self.head("/1")) == .deliver)
        #expect(machine.received(.body(ByteBuffer(string: "abc"))) == .deliver)
        #expect(machine.received(.end(nil)) == .deliver)
        #expect(machine.mayRead, "nothing waits yet")
        #expect(machine.received(Self.head("/2")) == .queued)
        #expect(machine.received(.end(nil)) == .queued)
        #expect(!machine.mayRead, "a request waits: the connection is not read")
        guard case .deliver(let parts) = machine.answerEnded() else {
            Issue.record("the next request was not handed on")
            return
        }
        #expect(Self.uris(parts) == ["/2"] && parts.count == 2)
        #expect(machine.mayRead)
        #expect(machine.answerEnded() == .resumeReading)
    }

    /// An answer that ends before its request did (a refusal of a body still on its way): the rest
    /// of that request still goes to the handler, which drops it, and the next is not delivered early.
    @Test func anAnswerThatEndsBeforeItsRequestKeepsTheRequestsPartsInPlace() {
        var machine = ProxyRequestQueue.Machine()
        #expect(machine.received(Self.head("/1")) == .deliver)
        #expect(machine.answerEnded() == .resumeReading)
        #expect(machine.received(.body(ByteBuffer(string: "late"))) == .deliver)
        #expect(machine.received(.end(nil)) == .deliver)
        #expect(machine.received(Self.head("/2")) == .deliver, "nothing is being answered: it goes at once")
    }

    /// Attack: one read decodes thousands of pipelined requests. Past `maxQueuedRequests` the rest
    /// is dropped; the queued ones are answered, then the connection closes.
    @Test func pastTheBoundTheRestIsDroppedAndTheConnectionClosesOnceTheQueueIsAnswered() {
        var machine = ProxyRequestQueue.Machine()
        #expect(machine.received(Self.head("/0")) == .deliver)
        #expect(machine.received(.end(nil)) == .deliver)
        var queued: [String] = []
        for index in 1...5000 {
            let head = machine.received(Self.head("/\(index)"))
            let end = machine.received(.end(nil))
            if head == .queued && end == .queued { queued.append("/\(index)") }
        }
        #expect(queued.count == ProxyRequestQueue.maxQueuedRequests)
        #expect(machine.queue.count == 2 * ProxyRequestQueue.maxQueuedRequests, "heads and ends, nothing more")
        #expect(machine.overflowed && !machine.mayRead)
        var answered: [String] = []
        while case .deliver(let parts) = machine.answerEnded() { answered += Self.uris(parts) }
        #expect(answered == queued)
        #expect(machine.answerEnded() == .close)
    }

    /// Queued bodies are bounded by bytes too; the request that passes the bound is dropped whole.
    @Test func queuedBodiesAreBoundedAndAPartialRequestIsNeverHandedOn() {
        var machine = ProxyRequestQueue.Machine()
        #expect(machine.received(Self.head("/0")) == .deliver)
        #expect(machine.received(.end(nil)) == .deliver)
        #expect(machine.received(Self.head("/1")) == .queued)
        #expect(machine.received(.body(ByteBuffer(repeating: 1, count: 1000))) == .queued)
        #expect(machine.received(.end(nil)) == .queued)
        #expect(machine.received(Self.head("/2")) == .queued)
        let big = ByteBuffer(repeating: 2, count: ProxyRequestQueue.maxQueuedBodyBytes)
        #expect(machine.received(.body(big)) == .dropped)
        #expect(machine.received(.end(nil)) == .dropped)
        guard case .deliver(let parts) = machine.answerEnded() else {
            Issue.record("the whole request /1 was not handed on")
            return
        }
        #expect(Self.uris(parts) == ["/1"] && parts.count == 3)
        #expect(machine.answerEnded() == .close, "/2 was never whole: it is not handed on")
    }

    // MARK: The handler on an embedded channel

    /// Records what reaches the next handler, and lets the test answer.
    final class Recorder: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        var parts: [HTTPServerRequestPart] = []

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            parts.append(unwrapInboundIn(data))
        }
    }

    /// Counts the reads that reach the channel (how backpressure shows on an embedded channel).
    final class ReadCounter: ChannelOutboundHandler {
        typealias OutboundIn = Any
        var reads = 0
        func read(context: ChannelHandlerContext) {
            reads += 1
            context.read()
        }
    }

    @Test func onAChannelTheNextRequestArrivesOnlyAfterTheAnswerAndReadsPauseMeanwhile() throws {
        let channel = EmbeddedChannel()
        let reads = ReadCounter()
        let recorder = Recorder()
        try channel.pipeline.syncOperations.addHandler(reads)
        try channel.pipeline.syncOperations.addHandler(ProxyRequestQueue())
        try channel.pipeline.syncOperations.addHandler(recorder)
        for part in [Self.head("/1"), .end(nil), Self.head("/2"), .end(nil)] {
            try channel.writeInbound(part)
        }
        #expect(Self.uris(recorder.parts) == ["/1"])
        let before = reads.reads
        channel.read()
        #expect(reads.reads == before, "a request waits: no read")
        let answer = HTTPResponseHead(version: .http1_1, status: .ok)
        try channel.writeOutbound(HTTPServerResponsePart.head(answer))
        #expect(Self.uris(recorder.parts) == ["/1"], "not before the answer's end")
        try channel.writeOutbound(HTTPServerResponsePart.end(nil))
        #expect(Self.uris(recorder.parts) == ["/1", "/2"])
        #expect(reads.reads == before + 1, "the held read goes out once nothing waits")
        _ = try channel.finish()
    }

    @Test func onAChannelAnOverflowClosesAfterTheQueuedAnswers() throws {
        let channel = EmbeddedChannel()
        let recorder = Recorder()
        try channel.pipeline.syncOperations.addHandler(ProxyRequestQueue())
        try channel.pipeline.syncOperations.addHandler(recorder)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        for index in 0...(ProxyRequestQueue.maxQueuedRequests + 5) {
            try channel.writeInbound(Self.head("/\(index)"))
            try channel.writeInbound(HTTPServerRequestPart.end(nil))
        }
        var answers = 0
        while channel.isActive {
            try channel.writeOutbound(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .ok)))
            try channel.writeOutbound(HTTPServerResponsePart.end(nil))
            answers += 1
            channel.embeddedEventLoop.run()
            if answers > 100 { break }
        }
        #expect(answers == ProxyRequestQueue.maxQueuedRequests + 1, "the one being answered and the queue")
        #expect(Self.uris(recorder.parts).count == answers)
        #expect(!channel.isActive, "closed once they are answered")
    }
}
