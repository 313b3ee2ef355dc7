import NIOConcurrencyHelpers
import NIOPosix

/// Sends notifications in order from a thread of its own.
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
///
/// The thread is a one-thread NIOThreadPool rather than a DispatchQueue: the daemon keeps
/// libdispatch idle (README "Threads and idle cost").
public final class BackgroundNotifier: Sendable {
    /// Notifications that may wait for the socket at once before routine ones are dropped.
    public static let maxQueued = 16

    private let send: @Sendable ([NotifyState]) -> Void
    /// One thread: notifications leave in the order they were given.
    private let thread = NIOThreadPool(numberOfThreads: 1)
    /// Notifications handed to `thread` and not sent yet.
    private let queued = NIOLockedValueBox(0)

    public convenience init() {
        let notifier = Notifier()
        self.init(send: { notifier.notify($0) })
    }

    /// `send` delivers one notification, blocking while the manager does not read (tests).
    init(send: @escaping @Sendable ([NotifyState]) -> Void) {
        self.send = send
        thread.start()
    }

    deinit {
        thread.shutdownGracefully { _ in }
    }

    public func notify(_ states: NotifyState...) {
        notify(states)
    }

    public func notify(_ states: [NotifyState]) {
        let routine = states.allSatisfy(\.isRoutine)
        let admitted = queued.withLockedValue { count -> Bool in
            guard !routine || count < Self.maxQueued else { return false }
            count += 1
            return true
        }
        guard admitted else { return }
        // Captures no `self`: a notifier dropped with notifications queued still sends them.
        thread.submit { [send, queued] _ in
            send(states)
            queued.withLockedValue { $0 -= 1 }
        }
    }

    /// Notifications waiting for the socket now.
    public var queuedCount: Int { queued.withLockedValue { $0 } }

    /// Waits until every queued notification has been handed to the socket, or `timeout` passes.
    /// Returns false on timeout.
    @discardableResult
    public func flush(timeout: Duration) -> Bool {
        // The thread takes work in order: once this marker runs, everything queued before it is sent.
        let reached = ConditionLock(value: false)
        thread.submit { _ in
            reached.lock()
            reached.unlock(withValue: true)
        }
        let seconds = Double(timeout.components.seconds) + Double(timeout.components.attoseconds) / 1e18
        guard reached.lock(whenValue: true, timeoutSeconds: seconds) else { return false }
        reached.unlock()
        return true
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
