import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@testable import TokenDaemon

/// The proxy's connection handlers (`ProxyServer.addHandlers`: the request queue, the handler and
/// its `ProxyExchange`) on an `EmbeddedChannel`, with a fake upstream: every framing, ordering and
/// replay rule, asserted on the request each upstream attempt gets and on the exact bytes the
/// client gets.
@Suite struct ProxyHandlerTests {
    @Test func aKeptBodyGoesUpstreamWholeWithItsLengthAndOnlyTheDaemonsCredentials() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client(
            "POST /v1/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer stolen\r\nX_Api_Key: stolen\r\n"
                + "x-api-key: stolen\r\nContent-Length: 5\r\n\r\nhello"
        )
        let sent = try #require(proxy.upstream.links.first?.sent.first)
        #expect(sent.head.method == .POST)
        #expect(sent.head.uri == "/base/v1/items")
        #expect(sent.head.headers["authorization"] == ["Bearer token-one"])
        #expect(sent.head.headers["x-api-key"] == ["key-one"])
        #expect(sent.head.headers["x_api_key"].isEmpty)
        #expect(sent.head.headers["content-length"] == ["5"])
        #expect(sent.head.headers["transfer-encoding"].isEmpty)
        #expect(sent.head.headers["host"] == ["upstream.test:8080"])
        #expect(sent.body.map { String(buffer: $0) } == "hello")
        #expect(!sent.streamed)
        #expect(proxy.budgetUsed == 5)
        try proxy.upstream.links[0].answer(.ok, headers: [("Content-Length", "2")], body: "ok")
        #expect(try proxy.output() == "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 fts-tokend\r\n\r\nok")
        #expect(proxy.budgetUsed == 0)
    }

    @Test func aRequestWithoutBodyCarriesNoFraming() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        let sent = try #require(proxy.upstream.links.first?.sent.first)
        #expect(sent.head.headers["content-length"].isEmpty)
        #expect(sent.head.headers["transfer-encoding"].isEmpty)
    }

    @Test func aBodyPastTheReplayBufferStreamsWithTheClientsLength() throws {
        let proxy = try EmbeddedProxy()
        let size = ProxyRules.replayBufferBytes + 1000
        try proxy.client("PUT /v1/blob HTTP/1.1\r\nHost: x\r\nContent-Length: \(size)\r\n\r\n")
        try proxy.client(String(repeating: "a", count: size))
        let link = try #require(proxy.upstream.links.first)
        let sent = try #require(link.sent.first)
        #expect(sent.streamed)
        #expect(sent.body == nil)
        #expect(sent.head.headers["content-length"] == ["\(size)"])
        #expect(sent.head.headers["transfer-encoding"].isEmpty)
        #expect(link.parts.reduce(0) { $0 + $1.readableBytes } == size)
        #expect(link.bodyEnded)
        // A streamed body holds none of the budget.
        #expect(proxy.budgetUsed == 0)
    }

    @Test func aChunkedBodyPastTheReplayBufferStreamsChunked() throws {
        let proxy = try EmbeddedProxy()
        let chunk = String(repeating: "b", count: 40_000)
        let chunked = (0..<3).map { _ in String(chunk.utf8.count, radix: 16) + "\r\n" + chunk + "\r\n" }.joined()
        try proxy.client(
            "POST /v1/blob HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + "0\r\n\r\n"
        )
        let link = try #require(proxy.upstream.links.first)
        #expect(link.sent.first?.head.headers["transfer-encoding"] == ["chunked"])
        #expect(link.sent.first?.head.headers["content-length"].isEmpty == true)
        #expect(link.parts.reduce(0) { $0 + $1.readableBytes } == 120_000)
        #expect(link.bodyEnded)
    }

    @Test func aStreamedBodyIsNotReadFasterThanTheUpstreamTakesIt() throws {
        let proxy = try EmbeddedProxy()
        proxy.upstream.writesComplete = false
        let size = ProxyRules.replayBufferBytes + 1000
        try proxy.client("PUT /v1/blob HTTP/1.1\r\nHost: x\r\nContent-Length: \(size)\r\n\r\n")
        try proxy.client(String(repeating: "a", count: size - 10))
        let link = try #require(proxy.upstream.links.first)
        #expect(!proxy.passesReads)
        #expect(!link.bodyEnded)
        try proxy.client(String(repeating: "a", count: 10))
        link.completeWrites()
        #expect(proxy.passesReads)
        #expect(link.bodyEnded)
    }

    @Test func anAnswerToHeadHasNoBodyAndNoChunkTerminator() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("HEAD /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        try proxy.upstream.links[0].answer(.ok, headers: [("Content-Length", "10")], body: nil)
        #expect(try proxy.output() == "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nVia: 1.1 fts-tokend\r\n\r\n")
    }

    @Test func anAnswerWithoutLengthIsChunkedForHTTP11() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        try proxy.upstream.links[0].answer(.ok, headers: [], body: "abc")
        #expect(
            try proxy.output()
                == "HTTP/1.1 200 OK\r\nVia: 1.1 fts-tokend\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        #expect(proxy.channel.isActive)
    }

    @Test func anHTTP10ClientWithoutLengthGetsTheBodyUntilClose() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        try proxy.upstream.links[0].answer(.ok, headers: [], body: "abc")
        #expect(try proxy.output() == "HTTP/1.0 200 OK\r\nVia: 1.1 fts-tokend\r\nConnection: close\r\n\r\nabc")
        #expect(!proxy.channel.isActive)
    }

    @Test func anHTTP10ClientThatKeepsTheConnectionIsToldSo() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        try proxy.upstream.links[0].answer(.ok, headers: [("Content-Length", "3")], body: "abc")
        #expect(
            try proxy.output()
                == "HTTP/1.0 200 OK\r\nContent-Length: 3\r\nVia: 1.1 fts-tokend\r\nConnection: keep-alive\r\n\r\nabc"
        )
        #expect(proxy.channel.isActive)
    }

    @Test func pipelinedRequestsGoUpstreamOneAtATimeAndAreAnsweredInOrder() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client(
            "GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        #expect(proxy.upstream.links.count == 1)
        try proxy.upstream.links[0].answer(.ok, headers: [("Content-Length", "3")], body: "one")
        #expect(proxy.upstream.links.count == 2)
        #expect(proxy.upstream.links[1].sent.first?.head.uri == "/base/two")
        try proxy.upstream.links[1].answer(.ok, headers: [("Content-Length", "3")], body: "two")
        let output = try proxy.output()
        let one = try #require(output.range(of: "\r\n\r\none"))
        let two = try #require(output.range(of: "\r\n\r\ntwo"))
        #expect(one.upperBound < two.lowerBound)
    }

    /// A client must not send more after `Connection: close` (RFC 9112 §9.6): NIO's decoder reads
    /// the bytes as an error. The request in flight is answered, then the connection closes;
    /// nothing behind it reaches the upstream.
    @Test func nothingPipelinedBehindARequestThatClosesReachesTheUpstream() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client(
            "GET /one HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        #expect(proxy.upstream.links.count == 1)
        #expect(!proxy.upstream.links[0].cancelled)
        try proxy.upstream.links[0].answer(.ok, headers: [("Content-Length", "3")], body: "one")
        #expect(
            try proxy.output()
                == "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nVia: 1.1 fts-tokend\r\nConnection: close\r\n\r\none"
        )
        #expect(proxy.upstream.links.map { $0.sent.map(\.head.uri) } == [["/base/one"]])
        #expect(!proxy.channel.isActive)
    }

    /// Attack (the second review): bytes that do not decode, pipelined behind a request the
    /// upstream has, got a 400 at once (NIO's protocol error handler), though the upstream ran the
    /// request. The request is answered, then the connection closes.
    @Test func garbageBehindARequestInFlightLetsItsAnswerThroughThenCloses() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}\u{01}\u{02} NOT HTTP\r\n\r\n")
        #expect(proxy.upstream.links.count == 1)
        #expect(try proxy.output().isEmpty)
        try proxy.upstream.links[0].answer(.created, headers: [("Content-Length", "2")], body: "ok")
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 201 Created\r\n"), "\(output)")
        #expect(!output.contains("400"))
        #expect(!proxy.channel.isActive)
    }

    /// With nothing in flight, bytes that do not decode get 400 and the connection closes.
    @Test func garbageWithNothingInFlightGets400() throws {
        let proxy = try EmbeddedProxy()
        #expect(throws: HTTPParserError.self) { try proxy.client("\u{01}\u{02} NOT HTTP\r\n\r\n") }
        #expect(try proxy.output().hasPrefix("HTTP/1.1 400 Bad Request\r\n"))
        #expect(proxy.upstream.links.isEmpty)
    }

    @Test func aRequestThatClosesGetsItsAnswerThenTheConnectionCloses() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /one HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try proxy.upstream.links[0].answer(.ok, headers: [("Content-Length", "3")], body: "one")
        #expect(
            try proxy.output()
                == "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nVia: 1.1 fts-tokend\r\nConnection: close\r\n\r\none"
        )
        #expect(!proxy.channel.isActive)
    }

    @Test func anAnswerBeforeTheStreamedBodyEndedClosesTheConnection() throws {
        let proxy = try EmbeddedProxy()
        let size = ProxyRules.replayBufferBytes * 2
        try proxy.client("PUT /v1/blob HTTP/1.1\r\nHost: x\r\nContent-Length: \(size)\r\n\r\n")
        try proxy.client(String(repeating: "a", count: ProxyRules.replayBufferBytes + 1))
        try proxy.upstream.links[0].answer(.forbidden, headers: [("Content-Length", "0")], body: nil)
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 403 Forbidden\r\n"))
        #expect(output.contains("\r\nConnection: close\r\n"), "the head says it")
        // The rest of the body cannot be told from a next request: the connection closes.
        #expect(!proxy.channel.isActive)
    }

    @Test func nothingPipelinedBehindARefusedRequestReachesTheUpstream() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("TRACE / HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 405 Method Not Allowed\r\n"))
        #expect(output.contains("Connection: close\r\n"))
        #expect(output.components(separatedBy: "HTTP/1.1 ").count == 2)
        #expect(proxy.upstream.links.isEmpty)
        #expect(!proxy.channel.isActive)
    }

    @Test func aRejectedGetIsReplayedOnceWithTheNextTokenAndTheRejectionIsDropped() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        try proxy.upstream.links[0].answer(.unauthorized, headers: [("Content-Length", "6")], body: "denied")
        let report = try #require(proxy.reports.first)
        #expect(report.fingerprint == Fingerprint.of("token-one"))
        proxy.board.answerRejection(report.id, .accepted(startedLogin: true))
        proxy.run()
        // No token yet: the request waits for one.
        #expect(proxy.upstream.links.count == 1)
        proxy.post("token-two")
        proxy.run()
        let replay = try #require(proxy.upstream.links.last?.sent.first)
        #expect(proxy.upstream.links.count == 2)
        #expect(replay.head.headers["authorization"] == ["Bearer token-two"])
        try proxy.upstream.links[1].answer(.ok, headers: [("Content-Length", "2")], body: "ok")
        #expect(try proxy.output() == "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 fts-tokend\r\n\r\nok")
    }

    @Test func noNewTokenWithinTheWaitAfterARejectionGets503AndTheConnectionIsKept() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        try proxy.upstream.links[0].answer(.unauthorized, headers: [("Content-Length", "0")], body: nil)
        proxy.board.answerRejection(try #require(proxy.reports.first).id, .accepted(startedLogin: true))
        proxy.run()
        #expect(try proxy.output().isEmpty)
        // `tokenWaitSeconds`: the proxy's timeout, at most 30 s.
        proxy.channel.embeddedEventLoop.advanceTime(by: .seconds(30))
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 503 Service Unavailable\r\n"))
        #expect(output.contains("Retry-After: 5\r\n"))
        #expect(output.contains("X-Token-Refresh: started\r\n"))
        #expect(proxy.channel.isActive)
        #expect(proxy.board.waiterCount == 0)
        #expect(proxy.budgetUsed == 0)
    }

    @Test func aClientWaitingFor100ContinueIsToldToSendItsBodyAndTheUpstreamNeverSeesExpect() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("PUT /v1/items/1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        #expect(try proxy.output() == "HTTP/1.1 100 Continue\r\n\r\n")
        #expect(proxy.upstream.links.isEmpty)
        try proxy.client("{}")
        let sent = try #require(proxy.upstream.links.first?.sent.first)
        #expect(sent.head.headers["expect"].isEmpty)
        #expect(sent.body.map { String(buffer: $0) } == "{}")
    }

    @Test func anHTTP10ClientsExpectationIsIgnored() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("PUT /v1/items/1 HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        #expect(try proxy.output().isEmpty)
        try proxy.client("{}")
        #expect(proxy.upstream.links.first?.sent.first?.body.map { String(buffer: $0) } == "{}")
    }

    @Test func bodiesPastTheProxysBudgetStreamInsteadOfBeingKept() throws {
        let proxy = try EmbeddedProxy()
        #expect(proxy.shared.bodies.value.take(BodyBudget.defaultLimit - 10))
        try proxy.client(
            "PUT /v1/items/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + String(repeating: "c", count: 20)
        )
        let sent = try #require(proxy.upstream.links.first?.sent.first)
        #expect(sent.streamed)
        #expect(proxy.budgetUsed == BodyBudget.defaultLimit - 10)
    }

    @Test func aReplayThatIsRejectedToo_IsPassedOnAsReplayRejected() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("DELETE /v1/items/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        try proxy.upstream.links[0].answer(.unauthorized, headers: [("Content-Length", "0")], body: nil)
        proxy.board.answerRejection(try #require(proxy.reports.first).id, .accepted(startedLogin: true))
        proxy.post("token-two")
        proxy.run()
        try proxy.upstream.links[1].answer(.unauthorized, headers: [("Content-Length", "0")], body: nil)
        #expect(proxy.reports.count == 1)
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 401 Unauthorized\r\n"))
        #expect(output.contains("X-Token-Refresh: replay-rejected\r\n"))
        #expect(proxy.upstream.links.count == 2)
    }

    @Test func aRejectedPostIsNotReplayedButPassedOnSayingALoginStarted() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("POST /v1/items HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        try proxy.upstream.links[0].answer(.unauthorized, headers: [("Content-Length", "6")], body: "denied")
        proxy.board.answerRejection(try #require(proxy.reports.first).id, .accepted(startedLogin: true))
        proxy.run()
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 401 Unauthorized\r\n"))
        #expect(output.contains("X-Token-Refresh: started\r\n"))
        #expect(output.hasSuffix("\r\n\r\ndenied"))
        #expect(proxy.upstream.links.count == 1)
    }

    @Test func aStreamedPutIsNotReplayed() throws {
        let proxy = try EmbeddedProxy()
        let size = ProxyRules.replayBufferBytes + 1
        try proxy.client("PUT /v1/blob HTTP/1.1\r\nHost: x\r\nContent-Length: \(size)\r\n\r\n")
        try proxy.client(String(repeating: "a", count: size))
        try proxy.upstream.links[0].answer(.unauthorized, headers: [("Content-Length", "0")], body: nil)
        proxy.board.answerRejection(try #require(proxy.reports.first).id, .accepted(startedLogin: true))
        proxy.run()
        #expect(try proxy.output().contains("X-Token-Refresh: started\r\n"))
        #expect(proxy.upstream.links.count == 1)
    }

    @Test(arguments: [
        (DaemonCore.RejectionOutcome.rateLimited(until: EmbeddedProxy.now + 60), "rate-limited"),
        (.stale(current: nil), "newer-token"),
    ])
    func aRejectionTheDaemonDoesNotActOnIsPassedOnOrReplayed(
        _ outcome: DaemonCore.RejectionOutcome,
        _ said: String
    )
        throws
    {
        let proxy = try EmbeddedProxy()
        try proxy.client("POST /v1/items HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        try proxy.upstream.links[0].answer(.unauthorized, headers: [("Content-Length", "0")], body: nil)
        proxy.board.answerRejection(try #require(proxy.reports.first).id, outcome)
        proxy.run()
        #expect(try proxy.output().contains("X-Token-Refresh: \(said)\r\n"))
    }

    @Test func aRejectionOfAnOlderTokenIsNotReportedAndTheRequestGoesAgain() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.post("token-two")
        try proxy.upstream.links[0].answer(.unauthorized, headers: [("Content-Length", "0")], body: nil)
        proxy.run()
        #expect(proxy.reports.isEmpty)
        #expect(proxy.upstream.links.count == 2)
        #expect(proxy.upstream.links[1].sent.first?.head.headers["authorization"] == ["Bearer token-two"])
    }

    @Test func aReusedConnectionThatFailsBeforeAnyAnswerIsRetriedOnceOnANewOne() throws {
        let proxy = try EmbeddedProxy()
        proxy.upstream.servedBefore = 1
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.upstream.links[0].fail(.closed)
        #expect(proxy.upstream.links.count == 2)
        proxy.upstream.links[1].fail(.closed)
        #expect(proxy.upstream.links.count == 2)
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 502 Bad Gateway\r\n"))
        #expect(output.contains("Connection: close\r\n"))
    }

    @Test func aPostIsNotRetriedOnANewConnection() throws {
        let proxy = try EmbeddedProxy()
        proxy.upstream.servedBefore = 1
        try proxy.client("POST /v1/items HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        proxy.upstream.links[0].fail(.closed)
        #expect(proxy.upstream.links.count == 1)
        #expect(try proxy.output().hasPrefix("HTTP/1.1 502 Bad Gateway\r\n"))
    }

    @Test func anUpstreamThatDoesNotAnswerInTimeGets504() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        proxy.upstream.links[0].fail(.timeout)
        #expect(try proxy.output().hasPrefix("HTTP/1.1 504 Gateway Timeout\r\n"))
    }

    @Test func anAnswerCutShortClosesTheClientsConnection() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        let link = proxy.upstream.links[0]
        _ = link.responder?.upstreamHead(
            HTTPResponseHead(version: .http1_1, status: .ok, headers: ["Content-Length": "10"]),
            attempt: link.attempt
        )
        _ = link.responder?.upstreamBody(ByteBuffer(string: "12345"), attempt: link.attempt)
        link.responder?.upstreamReadComplete(attempt: link.attempt)
        link.fail(.closed)
        #expect(!proxy.channel.isActive)
        #expect(try proxy.output().hasSuffix("\r\n\r\n12345"))
    }

    @Test func aBusyPoolGets503WithRetryAfter() throws {
        let proxy = try EmbeddedProxy()
        proxy.upstream.busy = true
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 503 Service Unavailable\r\n"))
        #expect(output.contains("Retry-After: 1\r\n"))
        // The request had ended: the connection is kept.
        #expect(proxy.channel.isActive)
    }

    @Test func aClientThatLeavesCancelsItsUpstreamRequestAndItsWaits() throws {
        let proxy = try EmbeddedProxy()
        try proxy.client("GET /v1/items HTTP/1.1\r\nHost: x\r\n\r\n")
        try proxy.upstream.links[0].answer(.unauthorized, headers: [("Content-Length", "0")], body: nil)
        #expect(proxy.board.unansweredReportCount == 1)
        _ = try? proxy.channel.finish()
        #expect(proxy.upstream.links[0].cancelled)
        #expect(proxy.board.unansweredReportCount == 0)
        #expect(proxy.budgetUsed == 0)
    }

    @Test func aClientThatLeavesWhileWaitingForAConnectionIsWithdrawn() throws {
        let proxy = try EmbeddedProxy()
        proxy.upstream.holdAcquires = true
        try proxy.client("POST /v1/items HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        #expect(proxy.budgetUsed == 3)
        _ = try? proxy.channel.finish()
        #expect(proxy.upstream.cancelledWaits == [0])
        #expect(proxy.budgetUsed == 0)
        // The connection the pool makes later goes back unused.
        proxy.upstream.grantHeld()
        #expect(proxy.upstream.released.count == 1)
    }

    @Test func aBodyOverTheLimitGets413AndNothingIsSent() throws {
        let proxy = try EmbeddedProxy(maxRequestBodyBytes: 10)
        try proxy.client("POST /v1/items HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
        try proxy.client("8\r\n12345678\r\n0\r\n\r\n")
        let output = try proxy.output()
        #expect(output.hasPrefix("HTTP/1.1 413 Payload Too Large\r\n"))
        #expect(proxy.upstream.links.isEmpty)
        #expect(proxy.budgetUsed == 0)
        #expect(!proxy.channel.isActive)
    }
}

// MARK: The harness

/// The proxy's handlers on an `EmbeddedChannel`, a fake upstream, a board with a token, and the
/// rejected-token reports the board received.
private final class EmbeddedProxy {
    let channel = EmbeddedChannel()
    let upstream: FakeUpstream
    let board = TokenBoard()
    let shared: ProxyShared
    private let reads = ReadCounter()
    private let received = NIOLockedValueBox<[(fingerprint: String, id: Int)]>([])
    static let now = Date(timeIntervalSince1970: 2_000_000_000)

    init(maxRequestBodyBytes: Int = Configuration.Proxy.defaultMaxRequestBodyBytes) throws {
        let loop = channel.embeddedEventLoop
        upstream = FakeUpstream(loop: loop)
        let proxy = Configuration.Proxy(
            path: "/unused/api.sock",
            mode: 0o600,
            allowUIDs: [],
            allowGIDs: [],
            listen: nil,
            upstream: "http://upstream.test:8080/base",
            caFile: nil,
            rejectedStatuses: [401],
            allowBrowsers: false,
            maxRequestBodyBytes: maxRequestBodyBytes,
            connectTimeoutSeconds: 5,
            timeoutSeconds: 30,
            maxConnections: 16,
            maxUpstreamConnections: 4,
            denyPaths: ["/auth/"],
            maxUpstreamConnectionsPerPeer: 3
        )
        var logger = Logger(label: "proxy-handler-tests")
        logger.logLevel = .critical
        shared = try ProxyShared(
            proxy,
            capacity: 16,
            upstreamCapacity: 4,
            board: board,
            metrics: DaemonMetrics(version: "test"),
            logger: logger,
            clock: { EmbeddedProxy.now },
            loop: loop
        )
        post("token-one")
        let received = self.received
        board.receiveRejections { fingerprint, _, id in received.withLockedValue { $0.append((fingerprint, id)) } }
        try channel.pipeline.syncOperations.addHandler(reads)
        try ProxyServer.addHandlers(to: channel, shared: shared, listener: .unixSocket, upstream: upstream)
        try channel.connect(to: SocketAddress(unixDomainSocketPath: "/unused/api.sock")).wait()
    }

    deinit {
        _ = try? channel.finish()
    }

    var reports: [(fingerprint: String, id: Int)] { received.withLockedValue { $0 } }
    var budgetUsed: Int { shared.bodies.value.used }

    /// Whether a read asked for now reaches the channel (the handler holds it while the upstream
    /// has not taken the body read so far).
    var passesReads: Bool {
        let before = reads.count
        channel.read()
        return reads.count > before
    }

    func post(_ token: String) {
        let grant = TokenGrant(
            token: token,
            expiresAt: Self.now + 3600,
            obtainedAt: Self.now,
            userId: nil,
            tenantId: nil,
            clockSkew: 0
        )
        board.post(grant, apiKey: "key-one", authorizationScheme: "Bearer")
    }

    func client(_ text: String) throws {
        try channel.writeInbound(ByteBuffer(string: text))
        run()
    }

    func run() {
        channel.embeddedEventLoop.run()
    }

    /// Every byte written to the client so far.
    func output() throws -> String {
        run()
        var text = ""
        while let data = try channel.readOutbound(as: IOData.self) {
            if case .byteBuffer(let buffer) = data { text += String(buffer: buffer) }
        }
        return text
    }
}

/// Counts the reads that reach the channel.
private final class ReadCounter: ChannelOutboundHandler {
    typealias OutboundIn = Any
    var count = 0

    func read(context: ChannelHandlerContext) {
        count += 1
        context.read()
    }
}

/// A pool that hands out `FakeLink`s at once (or holds the requests, or says busy).
private final class FakeUpstream: UpstreamSource {
    let loop: EmbeddedEventLoop
    var links: [FakeLink] = []
    var released: [FakeLink] = []
    var cancelledWaits: [Int] = []
    /// Requests served before, for the links made from now on.
    var servedBefore = 0
    var holdAcquires = false
    var busy = false
    /// Whether body writes complete at once.
    var writesComplete = true
    private var held: [(Int, (Result<any UpstreamLink, UpstreamError>) -> Void)] = []
    private var nextWait = 0

    init(loop: EmbeddedEventLoop) { self.loop = loop }

    func acquireLink(for peer: PeerKey, _ then: @escaping (Result<any UpstreamLink, UpstreamError>) -> Void) -> Int? {
        if busy {
            then(.failure(.busy))
            return nil
        }
        if holdAcquires {
            let id = nextWait
            nextWait += 1
            held.append((id, then))
            return id
        }
        then(.success(makeLink()))
        return nil
    }

    func grantHeld() {
        let waiting = held
        held = []
        for (_, then) in waiting { then(.success(makeLink())) }
    }

    private func makeLink() -> FakeLink {
        let link = FakeLink(loop: loop, servedBefore: servedBefore, writesComplete: writesComplete)
        links.append(link)
        return link
    }

    func cancelWait(_ id: Int) { cancelledWaits.append(id) }

    func releaseLink(_ link: any UpstreamLink) { released.append(link as! FakeLink) }
}

private final class FakeLink: UpstreamLink {
    let loop: EmbeddedEventLoop
    let servedBefore: Int
    let writesComplete: Bool
    var sent: [(head: HTTPRequestHead, body: ByteBuffer?, streamed: Bool)] = []
    var parts: [ByteBuffer] = []
    var bodyEnded = false
    var cancelled = false
    private(set) var responder: UpstreamResponder?
    private(set) var attempt = 0
    private var pendingWrites: [EventLoopPromise<Void>] = []
    var unfinishedWrites: Int { pendingWrites.count }

    init(loop: EmbeddedEventLoop, servedBefore: Int, writesComplete: Bool) {
        self.loop = loop
        self.servedBefore = servedBefore
        self.writesComplete = writesComplete
    }

    func send(_ head: HTTPRequestHead, body: ByteBuffer?, streamed: Bool, to responder: UpstreamResponder, attempt: Int)
    {
        sent.append((head, body, streamed))
        self.responder = responder
        self.attempt = attempt
    }

    func writeBody(_ part: ByteBuffer) -> EventLoopFuture<Void> {
        parts.append(part)
        if writesComplete { return loop.makeSucceededVoidFuture() }
        let promise = loop.makePromise(of: Void.self)
        pendingWrites.append(promise)
        return promise.futureResult
    }

    func completeWrites() {
        while !pendingWrites.isEmpty { pendingWrites.removeFirst().succeed() }
        loop.run()
    }

    func endBody() { bodyEnded = true }

    func cancel() { cancelled = true }

    /// The upstream's whole answer, handed on as `UpstreamConnection` does: each part once the
    /// future of the one before completed (the handler holds the rest while it reports a rejected
    /// token, or while the client takes nothing).
    func answer(_ status: HTTPResponseStatus, headers: [(String, String)], body: String?) throws {
        #expect(responder != nil)
        var parts: [HTTPClientResponsePart] = [
            .head(HTTPResponseHead(version: .http1_1, status: status, headers: HTTPHeaders(headers)))
        ]
        if let body { parts.append(.body(ByteBuffer(string: body))) }
        parts.append(.end(nil))
        deliver(parts[...])
        loop.run()
    }

    private func deliver(_ parts: ArraySlice<HTTPClientResponsePart>) {
        guard let responder, let part = parts.first else { return }
        let rest = parts.dropFirst()
        let next: EventLoopFuture<Void>
        switch part {
        case .head(let head): next = responder.upstreamHead(head, attempt: attempt)
        case .body(let body): next = responder.upstreamBody(body, attempt: attempt)
        case .end:
            responder.upstreamReadComplete(attempt: attempt)
            self.responder = nil
            return responder.upstreamEnd(attempt: attempt)
        }
        next.assumeIsolated().whenComplete { _ in self.deliver(rest) }
    }

    func fail(_ error: UpstreamError) {
        responder?.upstreamFailed(error, attempt: attempt)
        loop.run()
    }
}
