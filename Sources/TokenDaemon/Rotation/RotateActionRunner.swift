import Glibc
import Logging
import NIOCore
import NIOPosix

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Runs the `onRotate` actions after a new token is on disk. Each runs in its own task: a slow or
/// failing action delays neither the others nor the daemon, and its failure is only logged.
public struct RotateActionRunner: Sendable {
    public var logger: Logger

    public init(logger: Logger) {
        self.logger = logger
    }

    /// Starts every action for `grant`; returns at once.
    public func run(_ actions: [RotateAction], for grant: TokenGrant, tokenFile: String?) {
        guard !actions.isEmpty else { return }
        // The environment names the token, never carries it.
        var environment = [
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "FTS_TOKEN_FP": grant.fingerprint,
            "FTS_EXPIRES": String(Int64(grant.expiresAt.timeIntervalSince1970.rounded(.down))),
            "FTS_EXPIRES_AT": FormatTime.iso8601(grant.expiresAt),
        ]
        if let tokenFile { environment["FTS_TOKEN_FILE"] = tokenFile }
        for action in actions {
            let logger = self.logger
            let environment = environment
            Task.detached {
                switch action {
                case .exec(let argv, let timeout):
                    await Self.execute(argv, timeout: timeout, environment: environment, logger: logger)
                case .signal(let number, let name, let pidFile):
                    Self.signal(number, name: name, pidFile: pidFile, logger: logger)
                }
            }
        }
    }

    static func execute(_ argv: [String], timeout: Double, environment: [String: String], logger: Logger) async {
        let started = ContinuousClock.now
        let pid: pid_t
        do {
            pid = try spawn(argv, environment: environment)
        } catch {
            logger.error("onRotate: cannot start \(argv[0]): \(error)", metadata: ["event": "rotate_action_failed"])
            return
        }
        let deadline = started + .milliseconds(Int64(timeout * 1000))
        var status: Int32 = 0
        while waitpid(pid, &status, WNOHANG) == 0 {
            if ContinuousClock.now >= deadline {
                // The child leads its own process group: take everything it started with it.
                kill(-pid, SIGKILL)
                waitpid(pid, &status, 0)
                logger.error(
                    "onRotate: \(argv[0]) killed after \(FormatTime.seconds(timeout))",
                    metadata: ["event": "rotate_action_failed"]
                )
                return
            }
            // An event-loop timer, not Task.sleep (README "Threads and idle cost").
            try? await MultiThreadedEventLoopGroup.singleton.any().scheduleTask(in: .milliseconds(20)) {}.futureResult
                .get()
        }
        let elapsed = started.duration(to: .now)
        if status & 0x7f == 0, (status >> 8) & 0xff == 0 {
            logger.info("onRotate: \(argv[0]) done", metadata: ["event": "rotate_action_ok", "duration": "\(elapsed)"])
        } else {
            let outcome = status & 0x7f == 0 ? "exited \((status >> 8) & 0xff)" : "killed by signal \(status & 0x7f)"
            logger.error("onRotate: \(argv[0]) \(outcome)", metadata: ["event": "rotate_action_failed"])
        }
    }

    /// posix_spawn(3) with stdin from /dev/null, stdout and stderr shared with the daemon (so they reach
    /// the journal), in a new process group.
    static func spawn(_ argv: [String], environment: [String: String]) throws(SystemError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setpgroup(&attributes, 0)
        // The child would inherit the signals the daemon blocks (DaemonSignals) and those ignored
        // (SIGPIPE): unblock all, reset those to their default actions.
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for number in [SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGPIPE] { sigaddset(&defaults, number) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var unblocked = sigset_t()
        sigemptyset(&unblocked)
        posix_spawnattr_setsigmask(&attributes, &unblocked)
        posix_spawnattr_setflags(
            &attributes,
            Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK)
        )

        let arguments = argv.map { strdup($0) } + [nil]
        let variables = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for argument in arguments { free(argument) }
            for variable in variables { free(variable) }
        }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, argv[0], &actions, &attributes, arguments, variables)
        guard result == 0 else { throw SystemError("posix_spawn", errno: result) }
        return pid
    }

    static func signal(_ number: Int32, name: String, pidFile: String, logger: Logger) {
        let pid: Int32
        do {
            let text = String(decoding: try SmallFile.read(pidFile, limit: 64).bytes, as: UTF8.self)
            guard let parsed = Int32(text.filter { !$0.isWhitespace }), parsed > 1 else {
                throw SystemError("\(pidFile) does not hold a process ID", errno: nil)
            }
            pid = parsed
        } catch {
            logger.error("onRotate: cannot send SIG\(name): \(error)", metadata: ["event": "rotate_action_failed"])
            return
        }
        guard kill(pid, number) == 0 else {
            logger.error(
                "onRotate: SIG\(name) to \(pid) failed: \(SystemError("kill", errno: errno))",
                metadata: ["event": "rotate_action_failed"]
            )
            return
        }
        logger.info("onRotate: sent SIG\(name) to \(pid)", metadata: ["event": "rotate_action_ok"])
    }
}
