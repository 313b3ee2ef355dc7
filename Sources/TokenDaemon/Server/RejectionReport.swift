import NIOCore

/// A rejected-token report on its way from a channel to the daemon's core: the one path that both
/// the socket's `POST /token/invalidate` and the proxy's upstream 401 take.
///
/// What the reporter gets:
/// 1. `answer` runs at most once, on the reporter's event loop: with the core's outcome, or with nil
///    if the core has not answered within `timeout` (it answers in microseconds; nil means it is
///    stopping).
/// 2. After `cancel()` (the reporter's connection went away), `answer` never runs, and the board
///    keeps nothing of the report.
/// 3. `send` returns nil, and `answer` never runs, when no daemon takes reports yet: the reporter
///    answers "unavailable" itself.
struct RejectionReport {
    /// Longest wait for the core's answer.
    static let timeout: TimeAmount = .seconds(10)

    private let id: Int
    private let board: TokenBoard
    private let state: NIOLoopBoundBox<State>

    private struct State {
        var answered = false
        var timeout: Scheduled<Void>?
    }

    /// Must be called on `loop`.
    static func send(
        to board: TokenBoard,
        fingerprint: String,
        reporterUID: UInt32?,
        on loop: any EventLoop,
        timeout: TimeAmount = Self.timeout,
        answer: @escaping (DaemonCore.RejectionOutcome?) -> Void
    ) -> RejectionReport? {
        let state = NIOLoopBoundBox(State(), eventLoop: loop)
        let answer = NIOLoopBound(answer, eventLoop: loop)
        // 1. Whichever comes first, the core's outcome or the timeout, answers; the other finds
        //    `answered` set. Both run on the loop, so no lock is needed.
        let finish: @Sendable (DaemonCore.RejectionOutcome?) -> Void = { outcome in
            loop.execute {
                guard !state.value.answered else { return }
                state.value.answered = true
                state.value.timeout?.cancel()
                answer.value(outcome)
            }
        }
        guard let id = board.reportRejection(fingerprint: fingerprint, reporterUID: reporterUID, reply: finish) else {
            return nil
        }
        // 2. Set before `finish` can run: `finish` hops to this loop, which is busy here.
        state.value.timeout = loop.scheduleTask(in: timeout) {
            board.cancelRejection(id)
            finish(nil)
        }
        return RejectionReport(id: id, board: board, state: state)
    }

    /// The reporter went away: no answer will run. Call on the reporter's loop.
    func cancel() {
        state.value.answered = true
        state.value.timeout?.cancel()
        board.cancelRejection(id)
    }
}
