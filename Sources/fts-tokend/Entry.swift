import ArgumentParser
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TokenDaemon

/// The process entry point, synchronous on purpose.
///
/// An `async` main hands the main thread to libdispatch (`dispatch_main`), and Swift concurrency's
/// default executor on Linux is libdispatch's worker pool: either starts that pool, whose monitor
/// then wakes the process every second for as long as it lives (most of an idle daemon's cost,
/// docs/benchmarks.md, section 3). Here the main thread parses the command line; an async command
/// runs as a task on NIO's event loop, installed as Swift concurrency's global executor, while the
/// main thread waits. One loop: the daemon's load needs no more, and each loop is a thread.
@main
enum Entry {
    static func main() {
        launch()
    }

    /// Not main-actor isolated (as `main` is): the parsed command can be handed to the task.
    private nonisolated static func launch() -> Never {
        let command: any ParsableCommand
        do {
            command = try FTSTokend.parseAsRoot()
        } catch {
            FTSTokend.exit(withError: error)
        }
        guard let asyncCommand = command as? any AsyncParsableCommand else {
            // Synchronous commands run here, on the main thread, as ArgumentParser would run them.
            do {
                var command = command
                try command.run()
            } catch {
                FTSTokend.exit(withError: error)
            }
            FTSTokend.exit()
        }
        if command is any DaemonCommand {
            // Before any thread exists (see DaemonSignals).
            DaemonSignals.blockInEveryThread()
        }
        NIOSingletons.groupLoopCountSuggestion = 1
        EventLoopExecutor.install()

        let finished = ConditionLock(value: false)
        let failure = NIOLockedValueBox<(any Error)?>(nil)
        // Detached: the task must not inherit the main thread's isolation, which it blocks below.
        Task.detached { [asyncCommand] in
            do {
                var command = asyncCommand
                try await command.run()
            } catch {
                failure.withLockedValue { $0 = error }
            }
            finished.lock()
            finished.unlock(withValue: true)
        }
        finished.lock(whenValue: true)
        finished.unlock()
        if let error = failure.withLockedValue({ $0 }) { FTSTokend.exit(withError: error) }
        FTSTokend.exit()
    }
}

/// A command that runs the daemon in this process: its signals are blocked before any thread starts.
protocol DaemonCommand {}

extension Run: DaemonCommand {}
extension Demo: DaemonCommand {}
