import Glibc

/// Runs one piece of blocking or long work on a thread of its own, which ends with it.
///
/// Not a thread pool: NIO's `NIOThreadPool` joins its threads through libdispatch when shut down,
/// which starts libdispatch's worker pool and its once-a-second monitor for the rest of the
/// process (README "Threads and idle cost"); a pool kept open would be a thread for good.
enum OneShotThread {
    static func run<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            let job = Job { continuation.resume(with: Result { try work() }) }
            let context = Unmanaged.passRetained(job).toOpaque()
            var thread = pthread_t()
            let started = pthread_create(
                &thread,
                nil,
                { context in
                    let job = Unmanaged<Job>.fromOpaque(context!).takeRetainedValue()
                    job.body()
                    return nil
                },
                context
            )
            if started == 0 {
                pthread_detach(thread)
            } else {
                Unmanaged<Job>.fromOpaque(context).release()
                continuation.resume(
                    throwing: POSIXErrorCode(rawValue: started).map(ThreadError.init) ?? ThreadError(.EAGAIN)
                )
            }
        }
    }

    private final class Job: Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    struct ThreadError: Error, CustomStringConvertible {
        var code: POSIXErrorCode
        init(_ code: POSIXErrorCode) { self.code = code }
        var description: String { "cannot start a thread (\(code))" }
    }
}
