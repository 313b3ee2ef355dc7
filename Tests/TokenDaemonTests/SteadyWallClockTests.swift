import Foundation
import Synchronization
import Testing

@testable import TokenDaemon

@Suite struct SteadyWallClockTests {
    final class Clocks: Sendable {
        let wall = Mutex(Date(timeIntervalSince1970: 1_800_000_000))
        let boot = Mutex(Duration.seconds(100))

        func advance(_ seconds: Double) {
            wall.withLock { $0 = $0.addingTimeInterval(seconds) }
            boot.withLock { $0 += .milliseconds(Int64(seconds * 1000)) }
        }
    }

    func make() -> (Clocks, SteadyWallClock) {
        let clocks = Clocks()
        return (clocks, SteadyWallClock(wall: { clocks.wall.withLock { $0 } }, boot: { clocks.boot.withLock { $0 } }))
    }

    @Test func followsTheSystemClockWhileNothingSteps() {
        let (clocks, clock) = make()
        #expect(clock.now() == Date(timeIntervalSince1970: 1_800_000_000))
        clocks.advance(10)
        #expect(clock.now() == Date(timeIntervalSince1970: 1_800_000_010))
    }

    @Test func followsAForwardStepAtOnce() {
        let (clocks, clock) = make()
        _ = clock.now()
        clocks.wall.withLock { $0 = $0.addingTimeInterval(7200) }
        #expect(clock.now() == Date(timeIntervalSince1970: 1_800_007_200))
    }

    @Test func keepsAdvancingThroughABackwardStep() {
        let (clocks, clock) = make()
        _ = clock.now()
        clocks.wall.withLock { $0 = $0.addingTimeInterval(-3600) }
        #expect(clock.now() == Date(timeIntervalSince1970: 1_800_000_000), "never backwards")
        clocks.advance(60)
        #expect(clock.now() == Date(timeIntervalSince1970: 1_800_000_060), "advances with the boot clock")
        clocks.advance(3600)
        #expect(clock.now() == Date(timeIntervalSince1970: 1_800_003_660), "ahead of the system clock by the step")
        clocks.wall.withLock { $0 = $0.addingTimeInterval(7200) }
        #expect(
            clock.now() == Date(timeIntervalSince1970: 1_800_003_660 + 3600),
            "a later forward step is followed again"
        )
    }
}
