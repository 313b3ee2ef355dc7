import Dispatch
import Synchronization

/// Sends notifications in order from a serial background queue.
///
/// sd_notify(3) blocks once the notification socket's queue is full (a service manager that is slow to
/// read it, or a test that never does); a daemon loop calling it directly would then stop handling
/// signals and ticks. Through this type the caller never waits; `flush` bounds the wait at exit, so
/// that STOPPING=1 is still delivered when it can be.
///
/// While the manager does not read, routine notifications (STATUS, WATCHDOG, EXTEND_TIMEOUT) beyond
/// `maxQueued` waiting are dropped rather than queued: each would otherwise stay in memory until it
/// is read, which a manager that never reads makes forever (found by `make bench`, whose harness did
/// not read: +0.45 KiB per login). READY, RELOADING and STOPPING are always queued.
public final class BackgroundNotifier: Sendable {
    /// Notifications that may wait for the socket at once before routine ones are dropped.
    public static let maxQueued = 16

    private let send: @Sendable ([NotifyState]) -> Void
    private let queue = DispatchQueue(label: "fts-tokend.notify")
    private let pending = DispatchGroup()
    private let queued = Mutex(0)

    public convenience init() {
        let notifier = Notifier()
        self.init(send: { notifier.notify($0) })
    }

    /// `send` delivers one notification, blocking while the manager does not read (tests).
    init(send: @escaping @Sendable ([NotifyState]) -> Void) {
        self.send = send
    }

    public func notify(_ states: NotifyState...) {
        notify(states)
    }

    public func notify(_ states: [NotifyState]) {
        let routine = states.allSatisfy(\.isRoutine)
        let admitted = queued.withLock { count -> Bool in
            guard !routine || count < Self.maxQueued else { return false }
            count += 1
            return true
        }
        guard admitted else { return }
        pending.enter()
        queue.async { [self] in
            send(states)
            queued.withLock { $0 -= 1 }
            pending.leave()
        }
    }

    /// Notifications waiting for the socket now.
    public var queuedCount: Int { queued.withLock { $0 } }

    /// Waits until every queued notification has been handed to the socket, or `timeout` passes.
    /// Returns false on timeout.
    @discardableResult
    public func flush(timeout: Duration) -> Bool {
        let nanoseconds = timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
        return pending.wait(timeout: .now() + .nanoseconds(Int(nanoseconds))) == .success
    }
}

extension NotifyState {
    /// Repeated all the time, superseded by the next one: safe to drop when the manager is not reading.
    var isRoutine: Bool {
        switch self {
        case .status, .watchdog, .extendTimeout: true
        case .ready, .reloading, .stopping: false
        }
    }
}
