private import CSystemd
import Glibc

/// One assignment in an sd_notify(3) message.
public enum NotifyState: Sendable, Equatable {
    /// Start-up (or a reload) is finished: `READY=1`.
    case ready
    /// A reload begins: `RELOADING=1` plus `MONOTONIC_USEC`, as systemd 253+ expects for `Type=notify-reload`
    /// and as older versions accept.
    case reloading(monotonicMicroseconds: UInt64)
    /// Shutdown begins: `STOPPING=1`.
    case stopping
    /// A one-line human status shown by `systemctl status`: `STATUS=…`. Newlines are replaced by spaces,
    /// because the protocol is line based.
    case status(String)
    /// Keep-alive ping for `WatchdogSec=`: `WATCHDOG=1`.
    case watchdog
    /// Ask for more time for the current start, reload or stop job: `EXTEND_TIMEOUT_USEC=…`.
    case extendTimeout(microseconds: UInt64)

    var assignment: String {
        switch self {
        case .ready: return "READY=1"
        case .reloading(let usec): return "RELOADING=1\nMONOTONIC_USEC=\(usec)"
        case .stopping: return "STOPPING=1"
        case .status(let text):
            return "STATUS=" + String(text.map { $0.isNewline ? " " : $0 })
        case .watchdog: return "WATCHDOG=1"
        case .extendTimeout(let usec): return "EXTEND_TIMEOUT_USEC=\(usec)"
        }
    }
}

/// What happened to a notification.
public enum NotifyOutcome: Sendable, Equatable {
    /// The service manager received it.
    case sent
    /// `NOTIFY_SOCKET` is not set: the process is not supervised, nothing was sent. Not an error.
    case notSupervised
    /// Sending failed; the value is the errno.
    case failed(errno: Int32)
}

/// Sends readiness and status to the service manager (sd_notify(3)).
///
/// `sd_notify` reads `NOTIFY_SOCKET` on every call; the environment is left as it is so that a reload
/// can still notify (children we start get a cleaned environment of their own).
public struct Notifier: Sendable {
    public init() {}

    /// Sends all `states` in one datagram.
    @discardableResult
    public func notify(_ states: NotifyState...) -> NotifyOutcome {
        notify(states)
    }

    @discardableResult
    public func notify(_ states: [NotifyState]) -> NotifyOutcome {
        let message = states.map(\.assignment).joined(separator: "\n")
        let result = sd_notify(0, message)
        if result > 0 { return .sent }
        if result == 0 { return .notSupervised }
        return .failed(errno: -result)
    }

    /// CLOCK_MONOTONIC in microseconds, the clock `MONOTONIC_USEC` is read against.
    public static func monotonicMicroseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1_000
    }
}
