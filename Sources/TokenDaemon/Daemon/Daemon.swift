#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Glibc
import Logging
import NIOCore
import NIOPosix
import Systemd

/// The long-running daemon: keeps a valid token in the output files and tells systemd how it is doing.
///
/// Everything that changes state happens in `run()`, one event at a time: timer ticks, signals and
/// finished logins all arrive through one `AsyncStream`. Logins run in their own task, so the loop
/// keeps ticking (and pinging the watchdog) while one is in flight; at most one is in flight.
///
/// Timing (README "Refresh timing"): one monotonic event-loop timer, re-armed after every event,
/// fires at the next refresh, the next watchdog ping, expiry, or at most every `maxTick`. Each tick
/// compares the schedule with the wall clock, so a clock step or a suspend delays a refresh by at most
/// one `maxTick`.
public final class Daemon {
    /// Longest sleep between two checks of the wall clock.
    static let maxTick: TimeInterval = 30
    /// How often to retry writing the outputs after a write failed.
    static let writeRetry: TimeInterval = 5

    public struct Dependencies: Sendable {
        public var loader: ConfigurationLoader
        public var notifier: BackgroundNotifier
        public var clock: @Sendable () -> Date
        public var random: @Sendable () -> Double
        public var watchdogInterval: Duration?
        /// A listening socket passed by systemd (socket activation), served instead of binding one.
        public var activatedSocket: Int32?
        public var version: String

        /// The default clock never runs backwards (see `SteadyWallClock`).
        public init(loader: ConfigurationLoader, notifier: BackgroundNotifier = BackgroundNotifier(),
                    clock: @escaping @Sendable () -> Date = SteadyWallClock().now,
                    random: @escaping @Sendable () -> Double = { Double.random(in: 0..<1) },
                    watchdogInterval: Duration?, activatedSocket: Int32? = nil, version: String) {
            self.loader = loader
            self.notifier = notifier
            self.clock = clock
            self.random = random
            self.watchdogInterval = watchdogInterval
            self.activatedSocket = activatedSocket
            self.version = version
        }
    }

    enum Event: Sendable {
        case tick
        case signal(Int32)
        case loginFinished(generation: Int, Result<TokenResponseParser.Result, LoginError>, duration: Duration)
    }

    private let configPath: String
    private let deps: Dependencies
    private var logger: Logger

    private var loaded: LoadedConfiguration
    private var policy: RefreshPolicy
    private var outputs: TokenOutputs
    private var client: AuthClient
    /// What the socket serves; updated after every event.
    private let board = TokenBoard()
    private let metrics: DaemonMetrics
    private var metricsFileFailing = false

    /// The last token obtained; it may have expired (then its files were removed).
    private var token: TokenGrant?
    private var expiredFilesRemoved = false
    private var nextLogin: Date?
    private var login: Task<Void, Never>?
    /// Bumped when the account changes, so that an answer for the old account is dropped.
    private var generation = 0
    private var failures = 0
    private var lastError: LoginError?
    private var writeError: String?
    private var ready = false
    private var nextWatchdog: ContinuousClock.Instant?
    private var exitStatus: Int32?

    /// Takes a configuration already loaded by the caller (who reports its errors with exit 78).
    public init(configPath: String, loaded: LoadedConfiguration, dependencies: Dependencies, logger: Logger) throws {
        self.configPath = configPath
        self.deps = dependencies
        self.logger = logger
        self.logger.logLevel = loaded.configuration.logLevel
        self.loaded = loaded
        self.policy = RefreshPolicy(loaded.configuration.refresh)
        self.outputs = TokenOutputs(loaded.configuration.outputs)
        self.client = try AuthClient(api: loaded.configuration.api, version: dependencies.version)
        self.metrics = DaemonMetrics(version: dependencies.version)
    }

    /// Runs until SIGTERM or SIGINT (exit 0), until the credentials are rejected before any token
    /// was obtained (exit 78), or until the calling task is cancelled (exit 0; how a test that runs
    /// the daemon in its own process stops it). The signals are read only where the caller has
    /// blocked them (`DaemonSignals.blockInEveryThread`).
    public func run() async -> Int32 {
        let (events, sink) = AsyncStream<Event>.makeStream()
        // Timer and signals live on NIO's event loop, as the socket and the logins do (README
        // "Threads and idle cost").
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let signals: any Channel
        do {
            signals = try await DaemonSignals.open(on: loop) { sink.yield(.signal($0)) }
        } catch {
            return await failToStart("cannot read signals: \(error)", event: "signals_failed")
        }

        if let interval = deps.watchdogInterval {
            nextWatchdog = .now + interval / 2
            logger.info("watchdog enabled", metadata: ["interval": "\(interval)"])
        }
        // The socket listens before READY=1 can go out.
        var server: SocketServer?
        if loaded.configuration.outputs.socket != nil || deps.activatedSocket != nil {
            do {
                server = try await SocketServer.start(
                    socket: loaded.configuration.outputs.socket, activatedFD: deps.activatedSocket,
                    board: board, metrics: metrics, logger: logger, clock: deps.clock)
            } catch {
                try? await signals.close()
                return await failToStart("cannot listen on the socket: \(error)", event: "socket_failed")
            }
        }
        start()
        sink.yield(.tick)
        // One pending wake-up at a time: each event re-arms it.
        var wake: Scheduled<Void>?
        for await event in events {
            handle(event, sink: sink)
            if exitStatus != nil { break }
            afterEvent(sink: sink)
            wake?.cancel()
            wake = loop.scheduleTask(in: Self.timerDelay(nextWakeDelay())) { sink.yield(.tick) }
        }
        wake?.cancel()
        try? await signals.close()
        login?.cancel()
        await server?.stop()
        await client.shutdown()
        deps.notifier.flush(timeout: .seconds(1))
        return exitStatus ?? ExitStatus.success
    }

    private func failToStart(_ reason: String, event: String) async -> Int32 {
        logger.critical("\(reason)", metadata: ["event": "\(event)"])
        deps.notifier.notify(.status(reason))
        await client.shutdown()
        deps.notifier.flush(timeout: .seconds(1))
        return ExitStatus.failure
    }

    // MARK: Start

    private func start() {
        outputs.removeStaleTemporaryFiles()
        let now = deps.clock()
        if let stored = loadStoredToken(now: now) {
            logger.info("reusing stored token", metadata: [
                "event": "token_reused", "token_fp": "\(stored.fingerprint)",
                "expires_at": "\(FormatTime.iso8601(stored.localExpiry))",
            ])
            adopt(stored, now: now, persist: false)
        } else {
            nextLogin = now
            deps.notifier.notify(.status("logging in to \(loaded.configuration.api.baseURL)"))
        }
    }

    private func loadStoredToken(now: Date) -> TokenGrant? {
        guard let path = loaded.configuration.stateFile else { return nil }
        let grant: TokenGrant
        do {
            grant = try StateStore(path: path).load(identity: loaded.identity)
        } catch {
            if error != .missing { logger.warning("ignoring stored token", metadata: ["reason": "\(error)"]) }
            return nil
        }
        guard grant.remaining(at: now) > policy.settings.minRemainingSeconds else {
            logger.info("stored token too close to expiry, logging in", metadata: ["token_fp": "\(grant.fingerprint)"])
            return nil
        }
        return grant
    }

    // MARK: Events

    private func handle(_ event: Event, sink: AsyncStream<Event>.Continuation) {
        switch event {
        case .tick:
            break
        case .signal(let number):
            handleSignal(number)
        case .loginFinished(let generation, let result, let duration):
            // An answer for an account replaced by a reload is dropped; that login was cancelled and
            // another may be in flight already.
            guard generation == self.generation else { return }
            login = nil
            switch result {
            case .success(let answer):
                metrics.loginFinished(ok: true, status: 200, duration: duration)
                loginSucceeded(answer)
            case .failure(let error):
                metrics.loginFinished(ok: false, status: error.httpStatus, duration: duration)
                loginFailed(error)
            }
        }
    }

    private func handleSignal(_ number: Int32) {
        switch number {
        case SIGTERM, SIGINT:
            deps.notifier.notify(.stopping)
            logger.info("stopping", metadata: ["event": "stopping", "signal": "\(number == SIGTERM ? "TERM" : "INT")"])
            exitStatus = ExitStatus.success
        case SIGHUP:
            reload()
        case SIGUSR1:
            logger.info("refresh requested (SIGUSR1)", metadata: ["event": "refresh_requested"])
            if login == nil { nextLogin = deps.clock() }
        default:
            break
        }
    }

    private func loginSucceeded(_ answer: TokenResponseParser.Result) {
        for warning in answer.warnings {
            logger.warning("\(warning)", metadata: ["event": "login_warning"])
        }
        failures = 0
        lastError = nil
        let grant = answer.grant
        if policy.isShorterThanMargin(grant) {
            logger.warning("token lifetime \(FormatTime.duration(grant.lifetime)) is shorter than twice refresh.minRemainingSeconds; refreshing at half its lifetime", metadata: ["event": "login_warning"])
        }
        logger.info("login ok", metadata: [
            "event": "login_ok", "token_fp": "\(grant.fingerprint)",
            "expires_at": "\(FormatTime.iso8601(grant.expiresAt))",
            "lifetime": "\(FormatTime.duration(grant.lifetime))",
        ])
        adopt(grant, now: deps.clock(), persist: true)
    }

    private func loginFailed(_ error: LoginError) {
        let now = deps.clock()
        failures += 1
        lastError = error
        let valid = token.map { $0.isValid(at: now) } ?? false
        var metadata: Logger.Metadata = ["event": "login_failed", "attempt": "\(failures)"]
        if let status = error.httpStatus { metadata["http_status"] = "\(status)" }
        if error.kind == .rejected && !valid && !ready {
            logger.critical("login rejected at start, giving up: \(error)", metadata: metadata)
            deps.notifier.notify(.status("login rejected: \(error); fix the credentials and start again"))
            exitStatus = ExitStatus.configuration
            return
        }
        let delay = policy.retryDelay(after: error.kind, attempt: failures, current: token, now: now, random: deps.random())
        nextLogin = now.addingTimeInterval(delay)
        metadata["next_refresh_at"] = "\(FormatTime.iso8601(now.addingTimeInterval(delay)))"
        logger.error("login failed: \(error)", metadata: metadata)
        reportStatus(now: now)
    }

    /// Makes `grant` the current token: files first, then state, then the schedule and READY=1.
    private func adopt(_ grant: TokenGrant, now: Date, persist: Bool) {
        // The first token of a process that found none stored (see RefreshPolicy.refreshTime).
        let coldStart = token == nil && persist
        token = grant
        expiredFilesRemoved = false
        writeOutputs(grant, answeredAt: persist ? grant.obtainedAt : nil)
        board.post(grant, apiKey: loaded.secrets.apiKey, authorizationScheme: loaded.configuration.outputs.headersFile?.authorizationScheme ?? "Bearer")
        metrics.tokenAdopted(grant)
        if persist, writeError == nil {
            RotateActionRunner(logger: logger).run(loaded.configuration.onRotate, for: grant, tokenFile: loaded.configuration.outputs.tokenFile?.path)
        }
        if persist, let path = loaded.configuration.stateFile {
            do {
                try StateStore(path: path).save(grant, identity: loaded.identity)
            } catch {
                logger.warning("cannot save state, a restart will log in again", metadata: ["event": "state_write_failed", "reason": "\(error)"])
            }
        }
        nextLogin = policy.refreshTime(for: grant, now: now, random: deps.random(), coldStart: coldStart)
        logger.info("refresh scheduled", metadata: [
            "event": "refresh_scheduled", "next_refresh_at": "\(FormatTime.iso8601(nextLogin ?? now))",
            "expires_at": "\(FormatTime.iso8601(grant.localExpiry))",
        ])
        reportStatus(now: now)
    }

    /// - Parameter answeredAt: when the login answer arrived, for a new token.
    private func writeOutputs(_ grant: TokenGrant, answeredAt: Date? = nil) {
        guard !outputs.outputs.files.isEmpty else { return }
        do {
            try outputs.write(grant, apiKey: loaded.secrets.apiKey)
            if writeError != nil { logger.info("outputs written again", metadata: ["event": "write_recovered"]) }
            writeError = nil
            var metadata: Logger.Metadata = ["event": "token_written", "token_fp": "\(grant.fingerprint)"]
            if let answeredAt {
                // From the login answer's arrival to every file renamed and fsynced.
                metadata["write_ms"] = "\((deps.clock().timeIntervalSince(answeredAt) * 100_000).rounded() / 100)"
            }
            logger.info("token written", metadata: metadata)
        } catch {
            if writeError == nil {
                logger.error("cannot write outputs: \(error)", metadata: ["event": "write_failed"])
            }
            writeError = error.description
        }
    }

    /// READY=1 goes out once, when a valid token is first on disk; STATUS= and the socket's health
    /// after every event.
    private func reportStatus(now: Date) {
        let upcoming = login == nil ? nextLogin : nil
        board.update(health: health(now: now, nextLogin: upcoming), nextLogin: upcoming)
        var states: [NotifyState] = [.status(StatusLine.describe(token: token, nextLogin: upcoming,
                                                                lastError: lastError, writeError: writeError, now: now))]
        if !ready, writeError == nil, let token, token.isValid(at: now) {
            ready = true
            states.insert(.ready, at: 0)
            logger.info("ready", metadata: ["event": "ready"])
        }
        deps.notifier.notify(states)
    }

    private func health(now: Date, nextLogin: Date?) -> TokenBoard.Health {
        let status: String
        switch token {
        case nil: status = "starting"
        case let token? where !token.isValid(at: now): status = "expired"
        default: status = lastError == nil && writeError == nil ? "ok" : "degraded"
        }
        return TokenBoard.Health(
            status: status, expiresAt: token.map { FormatTime.iso8601($0.expiresAt) },
            nextRefreshAt: nextLogin.map(FormatTime.iso8601),
            lastError: lastError?.description ?? writeError.map { "writing outputs failed: \($0)" },
            lastSuccessAt: token.map { FormatTime.iso8601($0.obtainedAt) })
    }

    // MARK: After every event

    private func afterEvent(sink: AsyncStream<Event>.Continuation) {
        let now = deps.clock()
        if let interval = deps.watchdogInterval, let due = nextWatchdog, ContinuousClock.now >= due {
            deps.notifier.notify(.watchdog)
            nextWatchdog = ContinuousClock.now + interval / 2
        }
        if let current = token, !current.isValid(at: now) {
            if !expiredFilesRemoved { expire(current, now: now) }
        } else if writeError != nil, let current = token {
            writeOutputs(current)
            if writeError == nil { reportStatus(now: now) }
        }
        if login == nil, let due = nextLogin, due <= now {
            startLogin(sink: sink)
        }
        writeMetricsFile(now: now)
        if !ready {
            // Keep the start job alive until the first token is on disk: ticks come at least every
            // maxTick, and each extension outlasts the next tick plus a whole login.
            let seconds = Self.maxTick + loaded.configuration.api.timeoutSeconds + 5
            deps.notifier.notify(.extendTimeout(microseconds: UInt64(seconds * 1_000_000)))
        }
    }

    /// The node_exporter textfile, refreshed after every event (at least every maxTick).
    private func writeMetricsFile(now: Date) {
        guard let path = loaded.configuration.metricsFile else { return }
        do {
            try AtomicFileWriter.write(metrics.render(now: now), to: path, mode: 0o644, directoryMode: 0o755)
            metricsFileFailing = false
        } catch {
            if !metricsFileFailing { logger.warning("cannot write the metrics file: \(error)", metadata: ["event": "metrics_write_failed"]) }
            metricsFileFailing = true
        }
    }

    private func expire(_ expired: TokenGrant, now: Date) {
        expiredFilesRemoved = true
        writeError = nil
        do {
            try outputs.remove()
        } catch {
            logger.error("cannot remove expired token files: \(error)", metadata: ["event": "remove_failed"])
        }
        logger.error("token expired, files removed", metadata: ["event": "token_expired", "token_fp": "\(expired.fingerprint)"])
        if nextLogin.map({ $0 > now }) ?? false, lastError == nil { nextLogin = now }
        reportStatus(now: now)
    }

    private func startLogin(sink: AsyncStream<Event>.Continuation) {
        nextLogin = nil
        let client = self.client
        let secrets = loaded.secrets
        let generation = self.generation
        let clock = deps.clock
        logger.debug("login started", metadata: ["event": "login_started", "attempt": "\(failures + 1)"])
        login = Task {
            let started = ContinuousClock.now
            let result: Result<TokenResponseParser.Result, LoginError>
            do throws(LoginError) {
                result = .success(try await client.login(secrets, now: clock))
            } catch {
                result = .failure(error)
            }
            sink.yield(.loginFinished(generation: generation, result, duration: started.duration(to: .now)))
        }
    }

    /// `seconds` in whole milliseconds, rounded up. A wake even a fraction of a millisecond early
    /// finds nothing due and comes straight back: truncating made every deadline a spin of up to
    /// 1 ms (measured: 1 ms of CPU per wake, three quarters of the idle cost).
    static func timerDelay(_ seconds: TimeInterval) -> TimeAmount {
        .milliseconds(Int64((max(0, seconds) * 1000).rounded(.up)))
    }

    private func nextWakeDelay() -> TimeInterval {
        let now = deps.clock()
        var delay = Self.maxTick
        if login == nil, let due = nextLogin { delay = min(delay, due.timeIntervalSince(now)) }
        if let token, token.isValid(at: now) { delay = min(delay, token.usable(at: now)) }
        if writeError != nil { delay = min(delay, Self.writeRetry) }
        if let due = nextWatchdog {
            let untilPing = ContinuousClock.now.duration(to: due)
            delay = min(delay, Double(untilPing.components.seconds) + Double(untilPing.components.attoseconds) / 1e18)
        }
        return max(0, delay)
    }

    // MARK: Reload

    private func reload() {
        deps.notifier.notify(.reloading(monotonicMicroseconds: Notifier.monotonicMicroseconds()))
        let now = deps.clock()
        let fresh: LoadedConfiguration
        do {
            fresh = try deps.loader.load(path: configPath)
        } catch {
            logger.error("reload failed, keeping the previous configuration: \(error)", metadata: ["event": "reload_failed"])
            deps.notifier.notify(.ready, .status("reload failed (\(error)); running on the previous configuration"))
            return
        }
        let newClient: AuthClient
        do {
            newClient = try AuthClient(api: fresh.configuration.api, version: deps.version)
        } catch {
            logger.error("reload failed, keeping the previous configuration: \(error)", metadata: ["event": "reload_failed"])
            deps.notifier.notify(.ready, .status("reload failed (\(error)); running on the previous configuration"))
            return
        }
        let accountChanged = fresh.identity != loaded.identity || fresh.secrets.apiKey != loaded.secrets.apiKey
        let oldClient = client
        let inFlight = login
        let previousLogger = logger
        Task {
            _ = await inFlight?.value
            await oldClient.shutdown()
            previousLogger.debug("previous auth client closed", metadata: ["event": "auth_client_closed"])
        }

        loaded = fresh
        client = newClient
        logger.logLevel = fresh.configuration.logLevel
        policy = RefreshPolicy(fresh.configuration.refresh)
        let outputsChanged = outputs != TokenOutputs(fresh.configuration.outputs)
        outputs = TokenOutputs(fresh.configuration.outputs)
        logger.info("configuration reloaded", metadata: ["event": "reload", "account_changed": "\(accountChanged)"])

        if accountChanged {
            // The token held belongs to the old account: get one for the new account now.
            generation += 1
            login?.cancel()
            login = nil
            failures = 0
            nextLogin = now
        } else if let current = token, current.isValid(at: now) {
            if outputsChanged { writeOutputs(current) }
            if lastError?.kind == .rejected {
                nextLogin = now
            } else if lastError == nil {
                nextLogin = policy.refreshTime(for: current, now: now, random: deps.random())
            }
        } else if lastError?.kind == .rejected {
            nextLogin = now
        }
        var states: [NotifyState] = [.status(StatusLine.describe(token: token, nextLogin: nextLogin, lastError: lastError, writeError: writeError, now: now))]
        if ready { states.insert(.ready, at: 0) }
        deps.notifier.notify(states)
    }
}
