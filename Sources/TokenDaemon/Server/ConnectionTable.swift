import NIOConcurrencyHelpers
import NIOCore

/// The socket's open connections, bounded by `capacity`.
///
/// When every slot is taken, a new connection takes the place of the one idle the longest (as nginx
/// reuses its keep-alive connections), so a client that holds connections open, or dribbles a
/// request head byte by byte, cannot lock the host's other processes out. Connections waiting in a
/// long poll, or with a proxied request in flight ("waits" below), are never taken; when all of
/// them are, the new connection is refused. One peer uid holds at most a quarter of the table in
/// waits, so a uid below its share is always admitted. A connection whose peer the allow lists
/// refuse gives way before any other.
final class ConnectionTable: Sendable {
    enum Admission: Equatable {
        case admitted
        /// Admitted in the place of a connection closed for it.
        case admittedByEvicting
        case refused
    }

    private struct Entry {
        let channel: any Channel
        /// Last request head seen (or the accept).
        var lastActive: NIODeadline
        /// In a long poll (then never evicted), counted against `waitingUID`.
        var waiting = false
        /// The peer's uid, nil when it could not be read.
        var waitingUID: UInt32?
        /// The allow lists refuse its peer: the first to give way when the table is full.
        var refused = false
    }

    private struct State {
        var capacity: Int
        var entries: [ObjectIdentifier: Entry] = [:]
        /// Most connections open at once since the table was last nearly empty.
        var peak = 0
        /// Long polls per peer uid (the key nil: peers whose uid could not be read).
        var waitsByUID: [UInt32?: Int] = [:]

        mutating func release(_ uid: UInt32?) {
            let remaining = waitsByUID[uid, default: 1] - 1
            waitsByUID[uid] = remaining > 0 ? remaining : nil
        }
    }

    /// A burst that opened at least this many connections counts as a storm (see `remove`).
    static let stormSize = 64
    /// ... and it is over once no more than this many remain.
    static let calmSize = 4

    private let state: NIOLockedValueBox<State>

    init(capacity: Int) {
        state = NIOLockedValueBox(State(capacity: capacity))
    }

    /// A reload's new limit. Connections beyond it are not closed; new ones replace them until the
    /// table is back within the limit.
    func setCapacity(_ capacity: Int) {
        state.withLockedValue { $0.capacity = capacity }
    }

    /// Admits `channel`, closing the longest-idle connections first when the table is full (more
    /// than one only after a reload lowered the limit). The search is linear, and runs only when the
    /// table is full. Channels are closed outside the lock: their close handlers call `remove`.
    func admit(_ channel: any Channel, now: NIODeadline = .now()) -> Admission {
        let (admission, evicted) = state.withLockedValue { state -> (Admission, [any Channel]) in
            var evicted: [any Channel] = []
            while state.entries.count >= state.capacity {
                // A peer the allow lists refuse gives way first: it must never hold a slot that a
                // listed peer needs. Then the longest idle.
                let candidates = state.entries.lazy.filter { !$0.value.waiting }
                guard
                    let oldest = candidates.first(where: { $0.value.refused })
                        ?? candidates.min(by: { $0.value.lastActive < $1.value.lastActive }),
                    let closed = state.entries.removeValue(forKey: oldest.key)?.channel
                else {
                    return (.refused, evicted)
                }
                evicted.append(closed)
            }
            state.entries[ObjectIdentifier(channel)] = Entry(channel: channel, lastActive: now)
            state.peak = max(state.peak, state.entries.count)
            return (evicted.isEmpty ? .admitted : .admittedByEvicting, evicted)
        }
        for channel in evicted { channel.close(promise: nil) }
        return admission
    }

    /// The allow lists refuse `channel`'s peer (as of now): it gives way first when the table is full.
    func markRefused(_ channel: any Channel) {
        state.withLockedValue { $0.entries[ObjectIdentifier(channel)]?.refused = true }
    }

    /// A request arrived on `channel`.
    func touch(_ channel: any Channel, now: NIODeadline = .now()) {
        state.withLockedValue { $0.entries[ObjectIdentifier(channel)]?.lastActive = now }
    }

    /// Most waits (long polls, proxied requests in flight) one peer uid may hold: a quarter of the
    /// table, so that one user cannot make every slot a wait, which is never evicted.
    static func waitsPerUID(capacity: Int) -> Int { max(1, capacity / 4) }

    /// `channel` starts a long poll for peer `uid`; false when that uid holds `waitsPerUID` already.
    func beginWait(_ channel: any Channel, uid: UInt32?) -> Bool {
        state.withLockedValue { state in
            let id = ObjectIdentifier(channel)
            guard let entry = state.entries[id], !entry.waiting else { return true }
            guard state.waitsByUID[uid, default: 0] < Self.waitsPerUID(capacity: state.capacity) else { return false }
            state.waitsByUID[uid, default: 0] += 1
            state.entries[id]?.waiting = true
            state.entries[id]?.waitingUID = uid
            return true
        }
    }

    /// `channel`'s long poll ended.
    func endWait(_ channel: any Channel) {
        state.withLockedValue { state in
            let id = ObjectIdentifier(channel)
            guard let entry = state.entries[id], entry.waiting else { return }
            state.entries[id]?.waiting = false
            state.release(entry.waitingUID)
        }
    }

    /// `channel` closed. Checks identity: an evicted channel's slot may already belong to another.
    /// Returns true when this close ends a storm of connections (`stormSize` open at once, now down
    /// to `calmSize`): the moment to hand the memory they used back to the system.
    @discardableResult
    func remove(_ channel: any Channel) -> Bool {
        state.withLockedValue { state in
            let id = ObjectIdentifier(channel)
            if state.entries[id]?.channel === channel, let removed = state.entries.removeValue(forKey: id),
                removed.waiting
            {
                state.release(removed.waitingUID)
            }
            guard state.entries.count <= Self.calmSize else { return false }
            defer { state.peak = state.entries.count }
            return state.peak >= Self.stormSize
        }
    }
}
