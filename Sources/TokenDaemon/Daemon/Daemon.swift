import CLinux
import Glibc
import Logging
import NIOCore
import NIOPosix
import Systemd

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The long-running daemon: performs what `DaemonCore` decides.
///
/// It owns what has effects: the event loop's timer, the signalfd, the socket, the auth client, the
/// notifier, the files. Every input (timer ticks, signals, finished logins) arrives through one
/// `AsyncStream` and goes to the core one at a time; the actions that come back are performed in
/// order, and the outcome of each that has one (a write, a reload, the metrics file) goes straight
/// back to the core before the next input. Logins run in their own task, so the loop keeps ticking
/// (and pinging the watchdog) while one is in flight.
///
/// Timing (README "Refresh timing"): one monotonic event-loop timer, re-armed after every input for
/// `core.nextWake`: the next refresh, watchdog ping, withdrawal, write retry, or at most
/// `DaemonCore.maxTick`. The core compares the schedule with the wall clock on every event, so a
/// clock step or a suspend delays a refresh by at most one `maxTick`.
public final class Daemon {
    public struct Dependencies: Sendable {
        public var loader: ConfigurationLoader
        public var notifier: BackgroundNotifier
        public var clock: @Sendable () -> Date
        /// Seeds the core's refresh jitter and backoff draws.
        public var seed: UInt64
        public var watchdogInterval: Duration?
        /// A listening socket passed by systemd (socket activation), served instead of binding one.
        public var activatedSocket: Int32?
        public var version: String

        /// The default clock never runs backwards (see `SteadyWallClock`).
        public init(
            loader: ConfigurationLoader,
            notifier: BackgroundNotifier = BackgroundNotifier(),
            clock: @escaping @Sendable () -> Date = SteadyWallClock().now,
            seed: UInt64 = UInt64.random(in: 0...UInt64.max),
            watchdogInterval: Duration?,
            activatedSocket: Int32? = nil,
            version: String
        ) {
            self.loader = loader
            self.notifier = notifier
            self.clock = clock
            self.seed = seed
            self.watchdogInterval = watchdogInterval
            self.activatedSocket = activatedSocket
            self.version = version
        }
    }

    private let configPath: String
    private let deps: Dependencies
    private var logger: Logger
    private var core: DaemonCore
    private var client: AuthClient
    /// What the socket serves; updated by every publication.
    private let board = TokenBoard()
    private let metrics: DaemonMetrics
    private var server: SocketServer?
    private var proxy: ProxyServer?
    private var login: Task<Void, Never>?
    /// Fleet mode (README "Fleet"): the member's decisions, and the link that makes its database calls.
    private var coordinator: FleetCoordinator?
    private var link: FleetLink?

    /// What the loop takes in: the core's events and, in fleet mode, the coordinator's.
    enum Input: Sendable {
        case core(DaemonCore.Event)
        case fleet(FleetCoordinator.Event)
    }
    typealias Sink = AsyncStream<Input>.Continuation

    /// Takes a configuration already loaded by the caller (who reports its errors with exit 78).
    public init(configPath: String, loaded: LoadedConfiguration, dependencies: Dependencies, logger: Logger) {
        self.configPath = configPath
        self.deps = dependencies
        self.logger = logger
        self.logger.logLevel = loaded.configuration.logLevel
        self.core = DaemonCore(
            configuration: loaded,
            watchdogInterval: dependencies.watchdogInterval,
            socketActivated: dependencies.activatedSocket != nil,
            seed: dependencies.seed
        )
        self.client = AuthClient(api: loaded.configuration.api, version: dependencies.version)
        self.metrics = DaemonMetrics(version: dependencies.version)
    }

    private var configuration: Configuration { core.configuration.configuration }

    /// Runs until SIGTERM or SIGINT (exit 0), until the credentials are rejected before any token
    /// was obtained (exit 78), or until the calling task is cancelled (exit 0; how a test that runs
    /// the daemon in its own process stops it). The signals are read only where the caller has
    /// blocked them (`DaemonSignals.blockInEveryThread`).
    public func run() async -> Int32 {
        // The password and the API key are in this process's memory: no core file, and /proc's
        // views of it (mem, environ) stay root's (README "Hardening").
        _ = clinux_set_undumpable()
        let (events, sink) = AsyncStream<Input>.makeStream()
        board.receiveRejections { fingerprint, reporterUID, reportID in
            sink.yield(.core(.tokenRejected(fingerprint: fingerprint, reporterUID: reporterUID, reportID: reportID)))
        }
        // Timer and signals live on NIO's event loop, as the socket and the logins do (README
        // "Threads and idle cost").
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let signals: any Channel
        do {
            signals = try await DaemonSignals.open(on: loop) { number in
                if let signal = DaemonSignals.meaning(of: number) { sink.yield(.core(.signal(signal))) }
            }
        } catch {
            return await failToStart("cannot read signals: \(error)", event: "signals_failed")
        }
        if let interval = deps.watchdogInterval {
            logger.info("watchdog enabled", metadata: ["event": "watchdog_enabled", "interval": "\(interval)"])
        }
        let budget = logWarnings()
        // The socket listens before READY=1 can go out.
        if configuration.outputs.socket != nil || deps.activatedSocket != nil {
            do {
                server = try await SocketServer.start(
                    outputs: configuration.outputs,
                    capacity: budget.socketConnections ?? Configuration.Socket.defaultMaxConnections,
                    activatedFD: deps.activatedSocket,
                    board: board,
                    metrics: metrics,
                    logger: logger,
                    clock: deps.clock
                )
            } catch {
                try? await signals.close()
                return await failToStart("cannot listen on the socket: \(error)", event: "socket_failed")
            }
        }
        if let settings = configuration.outputs.proxy {
            do {
                proxy = try await ProxyServer.start(
                    settings,
                    capacity: budget.proxyConnections ?? settings.maxConnections,
                    upstreamCapacity: budget.upstreamConnections ?? settings.maxUpstreamConnections,
                    board: board,
                    metrics: metrics,
                    logger: logger,
                    clock: deps.clock
                )
            } catch {
                await server?.stop()
                try? await signals.close()
                return await failToStart("cannot listen for the API proxy: \(error)", event: "proxy_failed")
            }
        }
        if let fleet = configuration.fleet {
            do {
                try await startFleet(fleet, on: loop, sink: sink)
            } catch {
                await server?.stop()
                await proxy?.stop()
                try? await signals.close()
                return await failToStart("cannot start fleet mode: \(error)", event: "fleet_failed")
            }
            process(.fleet(.start(held: nil)), sink: sink)
        }
        process(.core(.start(stored: loadStoredToken())), sink: sink)
        // One pending wake-up at a time: each input re-arms it.
        var wake: Scheduled<Void>?
        var due = NIODeadline.now()
        func arm() {
            wake?.cancel()
            let now = deps.clock()
            var next = core.nextWake(now: now)
            if let deadline = coordinator?.nextDeadline {
                next = min(next, .seconds(max(0, deadline.timeIntervalSince(now))))
            }
            due = .now() + Self.timerDelay(next)
            wake = loop.scheduleTask(deadline: due) { sink.yield(.core(.tick)) }
        }
        if core.exitStatus == nil {
            arm()
            for await event in events {
                if case .core(.tick) = event {
                    reportLateness(since: due)
                    if coordinator != nil { process(.fleet(.tick), sink: sink) }
                }
                process(event, sink: sink)
                if core.exitStatus != nil { break }
                arm()
            }
        }
        wake?.cancel()
        try? await signals.close()
        login?.cancel()
        try? await link?.stop().get()
        await server?.stop()
        await proxy?.stop()
        await client.shutdown()
        deps.notifier.flush(timeout: .seconds(1))
        return core.exitStatus ?? ExitStatus.success
    }

    /// A timer that fires a second or more late means the loop was held up (a blocked write, a
    /// starved or suspended process): worth a line, as withdrawals and pings were late too.
    private func reportLateness(since due: NIODeadline) {
        let late = NIODeadline.now() - due
        guard late >= .seconds(1) else { return }
        logger.warning(
            "the event loop woke \(late.nanoseconds / 1_000_000) ms late",
            metadata: ["event": "loop_late", "late_ms": "\(late.nanoseconds / 1_000_000)"]
        )
    }

    private func failToStart(_ reason: String, event: String) async -> Int32 {
        logger.critical("\(reason)", metadata: ["event": "\(event)"])
        deps.notifier.notify(.status(reason))
        await client.shutdown()
        deps.notifier.flush(timeout: .seconds(1))
        return ExitStatus.failure
    }

    private func loadStoredToken() -> Result<TokenGrant, StateStore.LoadProblem>? {
        guard let path = configuration.stateFile else { return nil }
        do throws(StateStore.LoadProblem) {
            return .success(try StateStore(path: path).load(identity: core.configuration.identity, now: deps.clock()))
        } catch {
            return .failure(error)
        }
    }

    /// `delay` to the nearest nanosecond, then in whole milliseconds rounded up. A wake even a
    /// fraction of a millisecond early finds nothing due and comes straight back: truncating made
    /// every deadline a spin of up to 1 ms (measured: 1 ms of CPU per wake, three quarters of the
    /// idle cost). The nanosecond step keeps a Double's last bits from adding a millisecond.
    static func timerDelay(_ delay: Duration) -> TimeAmount {
        guard delay > .zero else { return .milliseconds(0) }
        let (seconds, attoseconds) = delay.components
        let nanoseconds = seconds * 1_000_000_000 + (attoseconds + 500_000_000) / 1_000_000_000
        return .milliseconds((nanoseconds + 999_999) / 1_000_000)
    }

    // MARK: Performing actions

    /// Hands `input` to the core or the coordinator, performs the actions, and hands their outcomes
    /// back until none is left.
    private func process(_ input: Input, sink: Sink) {
        var inputs = [input]
        var next = 0
        while next < inputs.count {
            let now = deps.clock()
            switch inputs[next] {
            case .core(let event):
                for action in core.handle(event, now: now) {
                    if let outcome = perform(action, sink: sink) { inputs.append(outcome) }
                }
            case .fleet(let event):
                guard var coordinator else { break }
                let actions = coordinator.handle(event, now: now)
                self.coordinator = coordinator
                for action in actions {
                    if let outcome = perform(action, sink: sink) { inputs.append(outcome) }
                }
            }
            next += 1
        }
    }

    /// Performs one action; returns its outcome, when it has one.
    private func perform(_ action: DaemonCore.Action, sink: Sink) -> Input? {
        switch action {
        case .removeStaleTemporaryFiles:
            TokenOutputs(configuration.outputs).removeStaleTemporaryFiles()
        case .startLogin(let generation, let forced):
            // In fleet mode the fleet answers: another member's token, or this member's login.
            if coordinator != nil {
                let need: FleetCoordinator.Need = forced.map { .forced(rejected: $0) } ?? .refresh
                return .fleet(.need(need, generation: generation, held: core.holding.grant))
            }
            startLogin { sink.yield(.core(.loginFinished(generation: generation, $0))) }
        case .cancelLogin:
            login?.cancel()
            login = nil
            if coordinator != nil { return .fleet(.cancel) }
        case .writeFiles(let request):
            return .core(.filesWritten(id: request.id, writeFiles(request)))
        case .withdrawFiles:
            do {
                try TokenOutputs(configuration.outputs).remove()
            } catch {
                logger.error("cannot remove expired token files: \(error)", metadata: ["event": "remove_failed"])
            }
        case .removeFiles(let paths):
            for path in paths {
                do {
                    try AtomicFileWriter.remove(path)
                    logger.info(
                        "removed \(path), which the configuration no longer names",
                        metadata: ["event": "file_removed"]
                    )
                } catch {
                    logger.error("cannot remove \(path): \(error)", metadata: ["event": "remove_failed"])
                }
            }
        case .saveState(let grant):
            guard let path = configuration.stateFile else { break }
            do {
                try StateStore(path: path).save(grant, identity: core.configuration.identity)
                return .core(.stateSaved(failure: nil))
            } catch {
                logger.warning(
                    "cannot save state, a restart will log in again",
                    metadata: ["event": "state_write_failed", "reason": "\(error)"]
                )
                return .core(.stateSaved(failure: "\(error)"))
            }
        case .runRotateActions(let grant):
            RotateActionRunner(logger: logger).run(
                configuration.onRotate,
                for: grant,
                tokenFile: configuration.outputs.tokenFile?.path
            )
        case .loadConfiguration(let notify):
            if notify { deps.notifier.notify(.reloading(monotonicMicroseconds: Notifier.monotonicMicroseconds())) }
            do throws(ConfigurationError) {
                return .core(.configurationLoaded(.success(try deps.loader.load(path: configPath))))
            } catch {
                return .core(.configurationLoaded(.failure(error)))
            }
        case .applyConfiguration(let change):
            return .core(.configurationApplied(problem: apply(change)))
        case .publish(let snapshot, let notice):
            publish(snapshot, notice: notice)
        case .updateHealth(let snapshot):
            board.update(health: snapshot.health(now: deps.clock()), nextLogin: snapshot.nextLogin)
        case .pingWatchdog:
            deps.notifier.notify(.watchdog)
        case .extendStartTimeout(let seconds):
            deps.notifier.notify(.extendTimeout(microseconds: UInt64(seconds * 1_000_000)))
        case .writeMetricsFile(let path):
            do {
                try AtomicFileWriter.write(
                    metrics.render(now: deps.clock()),
                    to: path,
                    mode: 0o644,
                    directoryMode: 0o755,
                    rule: .shared
                )
                return .core(.metricsFileWritten(failure: nil))
            } catch {
                return .core(.metricsFileWritten(failure: error.description))
            }
        case .answerRejection(let reportID, let outcome):
            metrics.forcedRefresh(outcome)
            board.answerRejection(reportID, outcome)
        case .report(let report):
            log(report)
        case .exit:
            deps.notifier.notify(.stopping)
        }
        return nil
    }

    /// Performs one of the fleet coordinator's actions; returns its outcome, when it has one.
    private func perform(_ action: FleetCoordinator.Action, sink: Sink) -> Input? {
        switch action {
        case .read, .tryLock, .publish, .holdLogins, .unlock:
            link?.perform(action)
        case .login(let fallback):
            if !fallback {
                logger.info("logging in for the fleet (holding its lock)", metadata: ["event": "fleet_login"])
            }
            startLogin { sink.yield(.fleet(.loginFinished($0))) }
        case .answer(let generation, .token(let grant, _, .member(let member))):
            return .core(.fleetToken(generation: generation, grant, member: member))
        case .answer(let generation, .token(let grant, let warnings, _)):
            return .core(.loginFinished(generation: generation, .success(.init(grant: grant, warnings: warnings))))
        case .answer(let generation, .failed(let error)):
            return .core(.loginFinished(generation: generation, .failure(error)))
        case .answer(let generation, .deferred(let until, let why)):
            return .core(.fleetDeferred(generation: generation, until: until, why: why))
        case .adopt(let grant, let member):
            return .core(.fleetToken(generation: nil, grant, member: member))
        case .report(let report):
            log(report)
        }
        return nil
    }

    /// Fleet mode's start: the member's key (slow on purpose, on a thread of its own), the link,
    /// and its first connection attempt, so that the first need of a token finds the database if it
    /// is there.
    private func startFleet(_ fleet: Configuration.Fleet, on loop: any EventLoop, sink: Sink) async throws {
        let loaded = core.configuration
        let seal = try await OneShotThread.run {
            try FleetSeal(secrets: loaded.secrets, baseURL: loaded.configuration.api.baseURL)
        }
        let member = fleet.member ?? Self.defaultMemberName(environment: deps.loader.environment)
        let link = try FleetLink(
            settings: .init(url: fleet.url, password: loaded.fleetPassword, caFile: fleet.caFile, member: member),
            seal: seal,
            loop: loop,
            logger: logger,
            clock: deps.clock,
            deliver: { sink.yield(.fleet($0)) }
        )
        self.link = link
        coordinator = FleetCoordinator(
            settings: .init(refresh: configuration.refresh, loginTimeout: configuration.api.timeoutSeconds)
        )
        logger.info(
            "fleet mode",
            metadata: ["event": "fleet_member", "member": "\(member)", "database": "\(fleet.url)"]
        )
        try await link.start().get()
    }

    /// The host name, with the instance's name for `fts-tokend@NAME` (the unit sets
    /// `FTS_TOKEND_INSTANCE`), kept to the characters and length a member name allows.
    static func defaultMemberName(environment: [String: String]) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        gethostname(&buffer, buffer.count - 1)
        var name = String(cString: buffer)
        if let instance = environment["FTS_TOKEND_INSTANCE"], !instance.isEmpty { name += "@" + instance }
        let allowed = name.unicodeScalars.filter {
            $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || "._@-".unicodeScalars.contains($0))
        }
        let kept = String(String.UnicodeScalarView(allowed).prefix(Configuration.Fleet.maxMemberLength))
        return kept.isEmpty ? "member" : kept
    }

    private func startLogin(
        deliver: @escaping @Sendable (Result<TokenResponseParser.Result, LoginError>) -> Void
    ) {
        let (client, secrets, clock, metrics) = (self.client, core.configuration.secrets, deps.clock, self.metrics)
        login = Task {
            let started = ContinuousClock.now
            let result: Result<TokenResponseParser.Result, LoginError>
            do throws(LoginError) {
                result = .success(try await client.login(secrets, now: clock))
            } catch {
                result = .failure(error)
            }
            if case .failure(let error) = result {
                metrics.loginFinished(ok: false, status: error.httpStatus, duration: started.duration(to: .now))
            } else {
                metrics.loginFinished(ok: true, status: 200, duration: started.duration(to: .now))
            }
            deliver(result)
        }
    }

    /// Writes the outputs; logs the write when every file landed.
    private func writeFiles(_ request: DaemonCore.WriteRequest) -> TokenOutputs.WriteOutcome {
        let outcome = TokenOutputs(configuration.outputs).write(
            request.grant,
            apiKey: core.configuration.secrets.apiKey
        )
        guard outcome.failure == nil else { return outcome }
        var metadata: Logger.Metadata = ["event": "token_written", "token_fp": "\(request.grant.fingerprint)"]
        if request.reason == .newToken {
            // From the login answer's arrival to every file renamed and fsynced.
            metadata["write_ms"] =
                "\((deps.clock().timeIntervalSince(request.grant.obtainedAt) * 100_000).rounded() / 100)"
        }
        logger.info("token written", metadata: metadata)
        return outcome
    }

    /// Logs what an operator should hear about the configuration in force; returns its descriptor
    /// budget (the connection limits the sockets apply).
    @discardableResult
    private func logWarnings() -> DescriptorBudget {
        let budget = descriptorBudget
        for warning in core.configuration.warnings + [budget.warning].compactMap({ $0 }) {
            logger.warning("\(warning)", metadata: ["event": "config_warning"])
        }
        return budget
    }

    /// The connection limits of the configuration in force within `RLIMIT_NOFILE`.
    private var descriptorBudget: DescriptorBudget {
        DescriptorBudget(
            outputs: configuration.outputs,
            socketActivated: deps.activatedSocket != nil,
            descriptorLimit: DescriptorBudget.currentLimit
        )
    }

    /// Rebuilds what `change` says; returns what could not be applied, for STATUS and `/healthz`.
    private func apply(_ change: ConfigChange) -> String? {
        var problems: [String] = []
        let levelChanged = logger.logLevel != configuration.logLevel
        logger.logLevel = configuration.logLevel
        let budget = logWarnings()
        if change.client {
            // The login in flight, if any, finishes on the old client, which closes after it.
            let (previous, inFlight, logger) = (client, login, logger)
            client = AuthClient(api: configuration.api, version: deps.version)
            Task {
                _ = await inFlight?.value
                await previous.shutdown()
                logger.debug("previous auth client closed", metadata: ["event": "auth_client_closed"])
            }
        }
        if change.socketAccess {
            do {
                try server?.apply(
                    configuration.outputs,
                    capacity: budget.socketConnections ?? Configuration.Socket.defaultMaxConnections
                )
            } catch {
                logger.error("cannot apply the socket's new mode: \(error)", metadata: ["event": "reload_failed"])
                problems.append("the socket's mode (\(error))")
            }
        }
        if change.proxyAccess || levelChanged, let settings = configuration.outputs.proxy {
            do {
                try proxy?.apply(
                    settings,
                    capacity: budget.proxyConnections ?? settings.maxConnections,
                    logLevel: configuration.logLevel
                )
            } catch {
                logger.error("cannot apply the API proxy's new mode: \(error)", metadata: ["event": "reload_failed"])
                problems.append("the API proxy's mode (\(error))")
            }
        }
        return problems.isEmpty ? nil : problems.joined(separator: " and ")
    }

    /// STATUS=, READY=1, the socket's token and health, the token gauges: all from one snapshot.
    private func publish(_ snapshot: DaemonCore.Snapshot, notice: DaemonCore.ReadyNotice?) {
        let now = deps.clock()
        if let token = snapshot.servedToken {
            board.post(
                token,
                apiKey: core.configuration.secrets.apiKey,
                authorizationScheme: configuration.outputs.authorizationScheme
            )
            metrics.tokenAdopted(token)
        }
        metrics.policy(minRemainingSeconds: configuration.refresh.minRemainingSeconds)
        board.update(health: snapshot.health(now: now), nextLogin: snapshot.nextLogin)
        var states: [NotifyState] = [.status(snapshot.statusLine(now: now))]
        if notice != nil { states.insert(.ready, at: 0) }
        if notice == .started { logger.info("ready", metadata: ["event": "ready"]) }
        deps.notifier.notify(states)
    }

    // MARK: Logs

    private func log(_ report: FleetCoordinator.Report) {
        switch report {
        case .databaseUnreachable(let error):
            logger.warning(
                "fleet database call failed; keeping the token held: \(error)",
                metadata: ["event": "fleet_unreachable", "reason": "\(error)"]
            )
        case .waitingForMember(let until):
            logger.info(
                "another member is logging in; waiting for its token",
                metadata: ["event": "fleet_waiting", "until": "\(FormatTime.iso8601(until))"]
            )
        case .fallbackLogin:
            logger.warning(
                "logging in without the fleet: its database is out of reach and the token held is near its end",
                metadata: ["event": "fleet_fallback_login"]
            )
        case .fenceRefused:
            logger.warning(
                "another member published while this one logged in (its lock was lost): not overwriting",
                metadata: ["event": "fleet_fence_refused"]
            )
        case .published(let generation):
            logger.info(
                "published the token for the fleet",
                metadata: ["event": "fleet_published", "generation": "\(generation)"]
            )
        case .unopenableRow(let generation, let member):
            logger.warning(
                "the fleet's token does not open with this member's key (another password or API key?)",
                metadata: ["event": "fleet_unopenable", "generation": "\(generation)", "from": "\(member)"]
            )
        }
    }

    private func log(_ report: DaemonCore.Report) {
        switch report {
        case .tokenReused(let grant):
            logger.info(
                "reusing stored token",
                metadata: [
                    "event": "token_reused", "token_fp": "\(grant.fingerprint)",
                    "expires_at": "\(FormatTime.iso8601(grant.localExpiry))",
                ]
            )
        case .storedTokenIgnored(let reason):
            logger.warning("ignoring stored token", metadata: ["event": "state_ignored", "reason": "\(reason)"])
        case .storedTokenTooOld(let grant):
            logger.info(
                "stored token too close to expiry, logging in",
                metadata: ["event": "state_ignored", "token_fp": "\(grant.fingerprint)"]
            )
        case .loginStarted(let attempt):
            logger.debug("login started", metadata: ["event": "login_started", "attempt": "\(attempt)"])
        case .loginSucceeded(let grant, let warnings, let shorterThanMargin):
            for warning in warnings {
                logger.warning("\(warning)", metadata: ["event": "login_warning"])
            }
            if shorterThanMargin {
                logger.warning(
                    "token lifetime \(FormatTime.duration(grant.lifetime)) is shorter than twice refresh.minRemainingSeconds; refreshing at half its lifetime",
                    metadata: ["event": "login_warning"]
                )
            }
            logger.info(
                "login ok",
                metadata: [
                    "event": "login_ok", "token_fp": "\(grant.fingerprint)",
                    "expires_at": "\(FormatTime.iso8601(grant.expiresAt))",
                    "lifetime": "\(FormatTime.duration(grant.lifetime))",
                ]
            )
        case .loginFailed(let error, let attempt, let retryAt):
            var metadata: Logger.Metadata = [
                "event": "login_failed", "attempt": "\(attempt)", "next_refresh_at": "\(FormatTime.iso8601(retryAt))",
            ]
            if let status = error.httpStatus { metadata["http_status"] = "\(status)" }
            logger.error("login failed: \(error)", metadata: metadata)
        case .loginRejectedAtStart(let error):
            var metadata: Logger.Metadata = ["event": "login_failed", "attempt": "1"]
            if let status = error.httpStatus { metadata["http_status"] = "\(status)" }
            logger.critical("login rejected at start, giving up: \(error)", metadata: metadata)
        case .refreshScheduled(let at, let expiresAt):
            logger.info(
                "refresh scheduled",
                metadata: [
                    "event": "refresh_scheduled", "next_refresh_at": "\(FormatTime.iso8601(at))",
                    "expires_at": "\(FormatTime.iso8601(expiresAt))",
                ]
            )
        case .refreshRequested:
            logger.info("refresh requested (SIGUSR1)", metadata: ["event": "refresh_requested"])
        case .tokenExpired(let grant):
            logger.error(
                "token expired, files removed",
                metadata: ["event": "token_expired", "token_fp": "\(grant.fingerprint)"]
            )
        case .writeFailed(let reason, let first):
            if first {
                logger.error("cannot write outputs: \(reason)", metadata: ["event": "write_failed"])
            } else {
                logger.debug("cannot write outputs yet: \(reason)", metadata: ["event": "write_failed"])
            }
        case .writeRecovered:
            logger.info("outputs written again", metadata: ["event": "write_recovered"])
        case .metricsFileFailed(let reason):
            logger.warning("cannot write the metrics file: \(reason)", metadata: ["event": "metrics_write_failed"])
        case .reloaded(let change):
            logger.info(
                "configuration reloaded",
                metadata: [
                    "event": "reload", "changed": "\(change.summary)", "account_changed": "\(change.account)",
                ]
            )
        case .reloadFailed(let reason):
            logger.error(
                "reload failed, keeping the previous configuration: \(reason)",
                metadata: ["event": "reload_failed"]
            )
        case .reloadRefused(let reason):
            logger.error(
                "reload refused: \(reason), which needs a restart; keeping the previous configuration",
                metadata: ["event": "reload_failed", "needs_restart": "true"]
            )
        case .stopping(let signal):
            logger.info("stopping", metadata: ["event": "stopping", "signal": "\(signal)"])
        case .fleetTokenAdopted(let grant, let member, let pushed):
            logger.info(
                pushed ? "adopted the token another member published" : "the fleet had a newer token: no login",
                metadata: [
                    "event": "fleet_adopted", "token_fp": "\(grant.fingerprint)", "from": "\(member)",
                    "pushed": "\(pushed)", "expires_at": "\(FormatTime.iso8601(grant.localExpiry))",
                ]
            )
        case .fleetDeferred(let until, let why):
            logger.notice(
                "no login before \(FormatTime.iso8601(until)): \(why)",
                metadata: ["event": "fleet_deferred", "retry_at": "\(FormatTime.iso8601(until))"]
            )
        case .tokenRejected(let fingerprint, let reporterUID, let outcome):
            // Only the report that forces a login is worth a line at the default level: a consumer
            // that repeats itself is counted in the metrics, not allowed to fill the journal.
            var metadata: Logger.Metadata = [
                "event": "token_rejected", "token_fp": "\(fingerprint)",
                "uid": "\(reporterUID.map(String.init) ?? "?")", "outcome": "\(DaemonMetrics.label(outcome))",
            ]
            switch outcome {
            case .accepted(startedLogin: true):
                logger.notice("token reported rejected by the API, logging in now", metadata: metadata)
            case .accepted(startedLogin: false):
                logger.debug("token reported rejected, a login is already under way", metadata: metadata)
            case .stale(let current):
                metadata["current_fp"] = "\(current ?? "none")"
                logger.debug("a rejected-token report named a token that is not current", metadata: metadata)
            case .rateLimited(let until):
                metadata["retry_at"] = "\(FormatTime.iso8601(until))"
                logger.debug("token reported rejected, but a login was forced too recently", metadata: metadata)
            }
        }
    }
}
