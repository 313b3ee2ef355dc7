import NIOCore
import Testing

@testable import TokenDaemon

@Suite struct DaemonTimerTests {
    /// The loop's timer never fires before the deadline it was computed for: an early wake finds
    /// nothing due and re-arms for the remainder, a spin when the remainder rounds down to 0.
    @Test(
        arguments: [
            (0.0, 0), (0.000_000_1, 1), (0.000_9, 1), (0.001, 1), (0.009_97, 10), (15.0, 15_000),
            (14.999_000_1, 15_000),
        ] as [(Double, Int64)]
    )
    func delaysRoundUpToWholeMilliseconds(seconds: Double, milliseconds: Int64) {
        #expect(Daemon.timerDelay(.seconds(seconds)) == .milliseconds(milliseconds))
    }

    @Test func aDeadlineAlreadyPassedFiresAtOnce() {
        #expect(Daemon.timerDelay(.seconds(-3)) == .milliseconds(0))
    }
}
