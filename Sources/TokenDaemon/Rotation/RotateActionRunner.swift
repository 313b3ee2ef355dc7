import CLinux
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
        do {
            let pid = try signalTarget(pidFile: pidFile)
            // 4. The process is pinned by a descriptor before it is checked: if it ends and its
            // pid is taken by another, the signal fails instead of reaching that one.
            let pidfd = clinux_pidfd_open(pid)
            guard pidfd >= 0 else { throw SystemError("process \(pid) from \(pidFile)", errno: errno) }
            defer { close(pidfd) }
            try checkIsNotADaemon(pid, pidFile: pidFile)
            guard clinux_pidfd_send_signal(pidfd, number) == 0 else {
                throw SystemError("SIG\(name) to \(pid)", errno: errno)
            }
            logger.info("onRotate: sent SIG\(name) to \(pid)", metadata: ["event": "rotate_action_ok"])
        } catch {
            logger.error("onRotate: cannot send SIG\(name): \(error)", metadata: ["event": "rotate_action_failed"])
        }
    }

    /// The process ID in a `pidFile`, read as nobody else can have arranged it:
    /// 1. opened with O_NOFOLLOW (a symlink is refused) and O_NONBLOCK (a FIFO cannot hold the
    ///    event loop in open(2)), then fstat'ed: it must be a regular file;
    /// 2. owned by root or the daemon's user and writable by neither group nor others: whoever can
    ///    write it chooses which process the daemon signals;
    /// 3. a whole number above 1, and not the daemon's own pid.
    static func signalTarget(pidFile: String) throws(SystemError) -> pid_t {
        let fd = open(pidFile, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(pidFile)", errno: errno) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw SystemError("fstat \(pidFile)", errno: errno) }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw SystemError("\(pidFile) is not a regular file", errno: nil)
        }
        switch Ownership.problem(info) {
        case nil:
            break
        case .otherOwner(let uid):
            throw SystemError(
                "\(pidFile) belongs to uid \(uid): only root or this user (uid \(geteuid())) may name the process to signal",
                errno: nil
            )
        case .writableByOthers(let mode):
            throw SystemError(
                "\(pidFile) is writable by group or others (mode \(FileMode.format(mode))), "
                    + "who could name any process: remove their write permission",
                errno: nil
            )
        }
        var bytes = [UInt8](repeating: 0, count: 64)
        let count = try POSIX.read(fd, into: &bytes, operation: "read \(pidFile)")
        let text = String(decoding: bytes[0..<count], as: UTF8.self).filter { !$0.isWhitespace }
        guard let pid = Int32(text), pid > 1 else {
            throw SystemError("\(pidFile) does not hold a process ID", errno: nil)
        }
        guard pid != getpid() else { throw SystemError("\(pidFile) names the daemon itself", errno: nil) }
        return pid
    }

    /// Refuses another fts-tokend (a sibling instance): the same executable as this process.
    static func checkIsNotADaemon(_ pid: pid_t, pidFile: String) throws(SystemError) {
        func executable(_ process: String) -> String? {
            var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
            let count = readlink("/proc/\(process)/exe", &buffer, buffer.count - 1)
            return count > 0 ? String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : nil
        }
        if let own = executable("self"), executable(String(pid)) == own {
            throw SystemError("\(pidFile) names \(pid), another fts-tokend", errno: nil)
        }
    }
}
