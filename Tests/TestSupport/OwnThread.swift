import Foundation

// Work that blocks or computes for long runs on a thread of its own, never on one of the concurrency
// pool's. That pool has one thread per core, two on a two-core machine, and every test's tasks share
// it: the tests' waits (`eventually`), the harnesses' clients, and the daemons and mock servers some
// tests run in this process. In a loaded full run, two tests holding its two threads (a blocking
// read, a fleet simulation, a byte-by-byte check of 20 MB in a debug build) stalled every other test
// for half a minute, and their waits ran out (seen in stack dumps of the pool's threads).

/// Runs `work` on a thread of its own and waits for it without holding a thread of the pool.
public func onOwnThread<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try work() }) }.start()
    }
}

/// Runs `work`, which cannot fail, on a thread of its own.
public func onOwnThread<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        Thread { continuation.resume(returning: work()) }.start()
    }
}
