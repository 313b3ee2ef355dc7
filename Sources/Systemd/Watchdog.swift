private import CSystemd

/// The service manager's watchdog (`WatchdogSec=`), read once at start.
public enum Watchdog {
    /// The interval systemd expects `WATCHDOG=1` within, or nil when no watchdog is configured for this
    /// process (`WATCHDOG_USEC` unset, or `WATCHDOG_PID` names another process). Ping at half of it.
    public static func interval() -> Duration? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return .microseconds(Int64(clamping: usec))
    }
}
