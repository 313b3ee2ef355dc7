import NIOCore
import NIOEmbedded
import Testing

@testable import TokenDaemon

/// The guarantees `RejectionReport` gives the socket and the proxy, on an embedded loop whose time
/// the test moves.
@Suite struct RejectionReportTests {
    /// A board whose "daemon" records the reports it is sent.
    final class Fixture {
        let loop = EmbeddedEventLoop()
        let board = TokenBoard()
        var received: [(fingerprint: String, uid: UInt32?, id: Int)] = []
        var answers: [DaemonCore.RejectionOutcome?] = []
        private let sink: NIOLoopBoundBox<[(String, UInt32?, Int)]>

        init(daemon: Bool = true) {
            let sink = NIOLoopBoundBox([(String, UInt32?, Int)](), eventLoop: loop)
            if daemon {
                // The sink runs on the reporter's thread here: the embedded loop is this thread.
                board.receiveRejections { fingerprint, uid, id in sink.value.append((fingerprint, uid, id)) }
            }
            self.sink = sink
        }

        func send(timeout: TimeAmount = .seconds(10)) -> RejectionReport? {
            let report = RejectionReport.send(
                to: board,
                fingerprint: "0123abcd",
                reporterUID: 1000,
                on: loop,
                timeout: timeout
            ) { self.answers.append($0) }
            received = sink.value.map { (fingerprint: $0.0, uid: $0.1, id: $0.2) }
            return report
        }
    }

    @Test func theCoresOutcomeIsAnsweredOnceAndTheTimeoutIsCancelled() throws {
        let fixture = Fixture()
        _ = try #require(fixture.send())
        let sent = try #require(fixture.received.first)
        #expect(sent.fingerprint == "0123abcd")
        #expect(sent.uid == 1000)
        #expect(fixture.answers.isEmpty, "nothing is answered before the core answers")

        fixture.board.answerRejection(sent.id, .accepted(startedLogin: true))
        fixture.loop.run()
        #expect(fixture.answers == [.accepted(startedLogin: true)])
        #expect(fixture.board.unansweredReportCount == 0)
        // A second answer for the same report, and the timeout's moment, change nothing.
        fixture.board.answerRejection(sent.id, .stale(current: nil))
        fixture.loop.advanceTime(by: .seconds(60))
        #expect(fixture.answers == [.accepted(startedLogin: true)])
    }

    @Test func aCoreThatNeverAnswersGetsNilAtTheTimeoutAndALateAnswerIsDropped() throws {
        let fixture = Fixture()
        _ = try #require(fixture.send(timeout: .seconds(10)))
        let sent = try #require(fixture.received.first)
        fixture.loop.advanceTime(by: .milliseconds(9_999))
        #expect(fixture.answers.isEmpty)
        fixture.loop.advanceTime(by: .milliseconds(1))
        #expect(fixture.answers == [nil])
        #expect(fixture.board.unansweredReportCount == 0, "the board forgets the report at the timeout")

        fixture.board.answerRejection(sent.id, .accepted(startedLogin: true))
        fixture.loop.run()
        #expect(fixture.answers == [nil])
    }

    @Test func aReporterThatWentAwayIsNeverAnswered() throws {
        let fixture = Fixture()
        let report = try #require(fixture.send())
        let sent = try #require(fixture.received.first)
        report.cancel()
        #expect(fixture.board.unansweredReportCount == 0)
        fixture.board.answerRejection(sent.id, .accepted(startedLogin: true))
        fixture.loop.run()
        fixture.loop.advanceTime(by: .seconds(60))
        #expect(fixture.answers.isEmpty)
    }

    @Test func anAnswerAlreadyQueuedWhenTheReporterGoesAwayIsNotRun() throws {
        let fixture = Fixture()
        let report = try #require(fixture.send())
        let sent = try #require(fixture.received.first)
        // The core's answer is on its way to the loop (queued, not run) when the connection closes.
        fixture.board.answerRejection(sent.id, .accepted(startedLogin: false))
        report.cancel()
        fixture.loop.run()
        #expect(fixture.answers.isEmpty)
    }

    @Test func withNoDaemonTakingReportsNothingIsSentOrAnswered() {
        let fixture = Fixture(daemon: false)
        #expect(fixture.send() == nil)
        fixture.loop.advanceTime(by: .seconds(60))
        #expect(fixture.answers.isEmpty)
    }
}
