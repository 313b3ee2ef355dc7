import Foundation

/// A child process started with posix_spawn(3) and reaped with waitpid(2) on this process's terms.
///
/// Foundation's `Process` on Linux was seen to hang here with many children at once (its monitor
/// thread blocked in wait4 on one child while another's `waitUntilExit` spun), so the tests do
/// without it.
public final class Spawned: @unchecked Sendable {
    // @unchecked: `exitStatus` is guarded by `lock`; `pid` is immutable.
    public let pid: pid_t
    private let lock = NSLock()
    private var exitStatus: Int32?

    /// Starts `executable` with `arguments` (argv[1...]) and exactly `environment`; stdout and
    /// stderr go to the given files (created or truncated), stdin is /dev/null.
    public init(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String],
        standardOutput: String,
        standardError: String
    ) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, standardOutput, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, standardError, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        // Nothing else: descriptors other tests hold open at this instant (sockets, pipes) would
        // otherwise leak into the child and skew its descriptor counts.
        Self.closeFrom(3, &actions)

        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for argument in argv { free(argument) }
            for variable in envp { free(variable) }
        }
        var child: pid_t = 0
        let result = posix_spawn(&child, executable, &actions, nil, argv, envp)
        guard result == 0 else { throw POSIXError(.init(rawValue: result) ?? .EIO) }
        pid = child
    }

    /// posix_spawn_file_actions_addclosefrom_np (glibc 2.34), which Swift's Glibc module does not
    /// declare; looked up at run time.
    private static func closeFrom(_ lowest: Int32, _ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>) {
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np")
        else { return }
        _ = unsafeBitCast(symbol, to: CloseFrom.self)(actions, lowest)
    }

    deinit {
        if isRunning {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
    }

    /// Reaps the child if it has ended; true while it runs.
    public var isRunning: Bool {
        lock.withLock {
            guard exitStatus == nil else { return false }
            var status: Int32 = 0
            guard waitpid(pid, &status, WNOHANG) == pid else { return true }
            // WIFEXITED: the low 7 bits are 0; then the status is in bits 8-15. A signal death is
            // reported as 128 + signal, like a shell does.
            exitStatus = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            return false
        }
    }

    public var status: Int32? {
        _ = isRunning
        return lock.withLock { exitStatus }
    }

    /// The exit status once the child has ended, or nil if it still runs after `timeout`.
    public func waitForExit(timeout: TimeInterval) async -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while isRunning && Date() < deadline { try? await Task.sleep(for: .milliseconds(10)) }
        return status
    }
}
