import NIOConcurrencyHelpers

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Wall-clock time that never runs backwards: it follows the system clock forward (a step ahead,
/// or a resume from suspend, is seen at once) but, when the system clock steps back, keeps
/// advancing with the boot-time clock instead, staying ahead of the system clock by the step.
///
/// The schedule is kept in wall-clock time, so a backward step would otherwise delay every refresh
/// and expiry by the size of the step, and the daemon would hand out a token the server already
/// considers expired. Running ahead is safe: the next login measures the offset against the
/// server's `Date` header and converts expiry with it, and until then refreshes only come early.
public final class SteadyWallClock: Sendable {
    private let wall: @Sendable () -> Date
    private let boot: @Sendable () -> Duration
    private let last = NIOLockedValueBox<(wall: Date, boot: Duration)?>(nil)

    /// - Parameters:
    ///   - wall: the system clock.
    ///   - boot: time since an arbitrary fixed point that is not affected by clock steps and keeps
    ///     counting through suspend (ContinuousClock, CLOCK_BOOTTIME).
    public init(wall: @escaping @Sendable () -> Date = { Date() }, boot: (@Sendable () -> Duration)? = nil) {
        self.wall = wall
        let origin = ContinuousClock.now
        self.boot = boot ?? { ContinuousClock.now - origin }
    }

    public func now() -> Date {
        let (wallNow, bootNow) = (wall(), boot())
        return last.withLockedValue { last in
            var steady = wallNow
            if let previous = last {
                let elapsed = bootNow - previous.boot
                let floor = previous.wall.addingTimeInterval(elapsed.seconds)
                steady = max(wallNow, floor)
            }
            last = (steady, bootNow)
            return steady
        }
    }
}
