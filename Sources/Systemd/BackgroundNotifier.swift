import Dispatch

/// Sends notifications in order from a serial background queue.
///
/// sd_notify(3) blocks once the notification socket's queue is full (a service manager that is slow to
/// read it, or a test that never does); a daemon loop calling it directly would then stop handling
/// signals and ticks. Through this type the caller never waits; `flush` bounds the wait at exit, so
/// that STOPPING=1 is still delivered when it can be.
public final class BackgroundNotifier: Sendable {
    private let notifier = Notifier()
    private let queue = DispatchQueue(label: "fts-tokend.notify")
    private let pending = DispatchGroup()

    public init() {}

    public func notify(_ states: NotifyState...) {
        notify(states)
    }

    public func notify(_ states: [NotifyState]) {
        pending.enter()
        queue.async { [notifier, pending] in
            notifier.notify(states)
            pending.leave()
        }
    }

    /// Waits until every queued notification has been handed to the socket, or `timeout` passes.
    /// Returns false on timeout.
    @discardableResult
    public func flush(timeout: Duration) -> Bool {
        let nanoseconds = timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
        return pending.wait(timeout: .now() + .nanoseconds(Int(nanoseconds))) == .success
    }
}
