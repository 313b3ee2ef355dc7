import CSwiftExecutorHook
import NIOCore
import NIOPosix

/// Makes NIO's event loop the executor of every Swift task not bound to an actor.
///
/// What `NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()`
/// does, except that NIO finds the runtime's hook with dlsym, which cannot see it in a binary linked
/// with `--static-swift-stdlib` (the release build): there it silently changes nothing. Same
/// contract: call it once, first thing in `main`, before any task exists.
enum EventLoopExecutor {
    static func install() {
        fts_set_enqueue_global_hook(hookAddress())
    }
}

/// The runtime's hook type: a thin Swift function taking the job and the default enqueue.
private typealias EnqueueGlobalHook = @convention(thin) (UnownedJob, @convention(thin) (UnownedJob) -> Void) -> Void

/// The process's one loop (`NIOSingletons.groupLoopCountSuggestion` is 1).
private let loop = MultiThreadedEventLoopGroup.singleton.next()

private func hookAddress() -> UnsafeRawPointer {
    let hook: EnqueueGlobalHook = { job, _ in loop.enqueue(ExecutorJob(job)) }
    // A thin function value is its entry point's address.
    return unsafeBitCast(hook, to: UnsafeRawPointer.self)
}
