#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Every decision the daemon makes, as a pure state machine: events in, actions out.
///
/// `Daemon` owns the loop, the timer, the socket, the auth client and the notifier; it feeds each
/// event to `handle(_:now:)`, performs the actions in order, and feeds their outcomes back as events
/// (a written file, a finished login, a loaded configuration). Nothing in here performs I/O, reads a
/// clock or draws a random number from the system: the time comes with each event and randomness
/// from a seeded generator, so every transition is tested in microseconds (`DaemonCoreTests`) and the
/// fleet simulation runs this very code.
///
/// The guarantees (README "Running under systemd", "Refresh timing"):
/// - At most one login is in flight (`Phase.loggingIn`); an answer to any other login is dropped.
/// - `.publish` is the only source of `STATUS=`, `READY=1`, the socket's health and the token gauges.
///   It goes out after every event that changes what it shows, never while files are being written.
///   It carries `READY=1` once when a valid token is first on disk, and once after each reload of a
///   daemon that was ready (the sd_notify reload protocol); never before the first token.
/// - A token is withdrawn `TokenGrant.handOutMargin` before it expires, on the first event after that.
/// - Exit 78 only for rejected credentials before the daemon ever held a valid token.
/// - `now` never runs backwards (the daemon's clock is a `SteadyWallClock`).
public struct DaemonCore: Sendable {
    /// Longest time between two events: each tick compares the schedule with the wall clock.
    public static let maxTick: TimeInterval = 30
    /// How often writing the outputs is tried again after it failed.
    public static let writeRetry: TimeInterval = 5

    // MARK: Inputs and outputs

    /// The signals the daemon acts on, by meaning (`DaemonSignals` maps the numbers).
    public enum Signal: Sendable, Equatable {
        /// SIGTERM or SIGINT: stop, exit 0.
        case terminate(name: String)
        /// SIGHUP: read the configuration and secrets again.
        case reload
        /// SIGUSR1: refresh now.
        case refresh
    }

    public enum Event: Sendable {
        /// The process started. `stored`: what the state file held (nil when none is configured).
        case start(stored: Result<TokenGrant, StateStore.LoadProblem>?)
        /// A timer fired: nothing happened but time passed.
        case tick
        case signal(Signal)
        /// The login started by `.startLogin(generation:)` ended.
        case loginFinished(generation: Int, Result<TokenResponseParser.Result, LoginError>)
        /// The outcome of `.writeFiles` with this `id`.
        case filesWritten(id: Int, TokenOutputs.WriteOutcome)
        /// The outcome of `.loadConfiguration`.
        case configurationLoaded(Result<LoadedConfiguration, ConfigurationError>)
        /// The outcome of `.applyConfiguration`: what could not be applied (the new mode of the
        /// socket or the proxy's socket), or nil when everything was.
        case configurationApplied(problem: String?)
        /// The outcome of `.writeMetricsFile`.
        case metricsFileWritten(failure: String?)
        /// The outcome of `.saveState`.
        case stateSaved(failure: String?)
        /// A consumer (`reporterUID`: its uid, when known) reports that the API rejected the token
        /// with this fingerprint. The answer goes out as `.answerRejection(reportID:)`.
        case tokenRejected(fingerprint: String, reporterUID: UInt32?, reportID: Int)
        /// Fleet mode: another member's token, the answer to `.startLogin(generation:)`, or, with
        /// no generation, pushed while no login was in flight (taken when newer than the one held).
        case fleetToken(generation: Int?, TokenGrant, member: String)
        /// Fleet mode: no login for `.startLogin(generation:)` before `until` (the fleet's
        /// forced-refresh floor or an auth server's `Retry-After` that holds every member).
        case fleetDeferred(generation: Int, until: Date, why: String)
    }

    /// Why files are written.
    public enum WriteReason: Sendable, Equatable {
        /// A login just returned this token (write time is measured from its arrival).
        case newToken
        /// The token came from the state file at start.
        case storedToken
        /// An earlier write of this token failed.
        case retry
        /// A reload changed which files there are or how they look.
        case reconfigured
        /// Another member of the fleet published it (README "Fleet").
        case fleetToken

        /// The token is new to this daemon: its rotate actions run and it is saved.
        var isNew: Bool { self == .newToken || self == .fleetToken }
    }

    /// Why a publication carries `READY=1`.
    public enum ReadyNotice: Sendable, Equatable {
        /// The first valid token is on disk: start-up is over.
        case started
        /// A reload of a ready daemon is over (`RELOADING=1` went out when it began).
        case reloaded
    }

    /// What a rejected-token report led to.
    public enum RejectionOutcome: Sendable, Equatable {
        /// A login starts now (`startedLogin`), or one already in flight will bring the next token.
        case accepted(startedLogin: Bool)
        /// The token reported is not the current one: the consumer should read again.
        case stale(current: String?)
        /// A forced login happened too recently; the next may be forced at this instant.
        case rateLimited(until: Date)
    }

    /// Things worth a log line; the runner words them.
    public enum Report: Sendable, Equatable {
        case tokenReused(TokenGrant)
        /// The state file could not be used (not merely absent).
        case storedTokenIgnored(String)
        case storedTokenTooOld(TokenGrant)
        case loginStarted(attempt: Int)
        case loginSucceeded(TokenGrant, warnings: [String], shorterThanMargin: Bool)
        case loginFailed(LoginError, attempt: Int, retryAt: Date)
        case loginRejectedAtStart(LoginError)
        case fleetTokenAdopted(TokenGrant, member: String, pushed: Bool)
        case fleetDeferred(until: Date, why: String)
        case refreshScheduled(at: Date, expiresAt: Date)
        case refreshRequested
        case tokenExpired(TokenGrant)
        /// `first`: the earlier write of this token did not fail.
        case writeFailed(String, first: Bool)
        case writeRecovered
        case metricsFileFailed(String)
        case reloaded(ConfigChange)
        case reloadFailed(String)
        case reloadRefused(String)
        case stopping(signal: String)
        case tokenRejected(fingerprint: String, reporterUID: UInt32?, RejectionOutcome)
    }

    /// One write of the outputs; its outcome comes back as `.filesWritten(id:_:)`.
    public struct WriteRequest: Sendable, Equatable {
        public var id: Int
        public var grant: TokenGrant
        public var reason: WriteReason
    }

    public enum Action: Sendable, Equatable {
        /// Before anything is written: remove temporary files a killed writer left.
        case removeStaleTemporaryFiles
        /// Get a token: log in, or in fleet mode ask the fleet. `forced`: the fingerprint of the
        /// token a consumer reported rejected, when that is why.
        case startLogin(generation: Int, forced: String?)
        case cancelLogin
        /// Write every configured output file (the current configuration's) with this token.
        case writeFiles(WriteRequest)
        /// Remove the output files: the token is about to expire.
        case withdrawFiles(TokenGrant)
        /// Remove files that a reload no longer configures.
        case removeFiles([String])
        case saveState(TokenGrant)
        case runRotateActions(TokenGrant)
        /// Read the configuration and secrets again; `RELOADING=1` first when `notify`.
        case loadConfiguration(notify: Bool)
        /// The core now runs on a new configuration: rebuild what `change` says. Nothing is published
        /// until its outcome (`.configurationApplied`), so that the reload's READY=1 and STATUS say
        /// whether all of it applied.
        case applyConfiguration(ConfigChange)
        case publish(Snapshot, ReadyNotice?)
        /// Only what `/healthz` shows of the outputs changed (the metrics file was written): the socket
        /// takes it; systemd and the metrics file hear nothing (writing it again would loop).
        case updateHealth(Snapshot)
        case pingWatchdog
        /// `EXTEND_TIMEOUT_USEC`: keeps systemd's start job alive until the first token.
        case extendStartTimeout(seconds: Double)
        case writeMetricsFile(String)
        /// Tell the consumer who sent rejected-token report `reportID` what it led to.
        case answerRejection(reportID: Int, RejectionOutcome)
        case report(Report)
        /// `STOPPING=1`, shut down, exit with this status.
        case exit(Int32)
    }

    /// What the daemon shows the world: systemd's STATUS, `/healthz`, the socket's token, the gauges.
    public struct Snapshot: Sendable, Equatable {
        /// The token held (valid or not); nil before the first.
        public var token: TokenGrant?
        /// The token was withdrawn (files removed, not served): it is about to expire, or has.
        public var withdrawn: Bool
        /// When the next login starts; nil while one is in flight.
        public var nextLogin: Date?
        public var lastError: LoginError?
        public var writeError: String?
        /// The last reload failed or was refused: why.
        public var reloadProblem: String?
        /// The daemon is stopping with this status.
        public var exitStatus: Int32?
        /// Every file the daemon writes, in the order of `OutputRecords.outputs(of:)`.
        public var outputs: [OutputRecords.Output] = []
        public var lastLogin: LoginRecord?
        /// `refresh.minForcedRefreshSeconds`.
        public var forcedRefreshFloor: TimeInterval = Configuration.Refresh.defaults.minForcedRefreshSeconds
        /// The last login forced by a rejected-token report.
        public var lastForcedLogin: Date?

        /// The token the socket serves: nil once withdrawn.
        public var servedToken: TokenGrant? { withdrawn ? nil : token }

        /// The `/healthz` document.
        public func health(now: Date) -> TokenBoard.Health {
            let status: String
            switch token {
            case nil: status = "starting"
            case let token? where withdrawn || !token.isValid(at: now): status = "expired"
            default: status = lastError == nil && writeError == nil && reloadProblem == nil ? "ok" : "degraded"
            }
            return TokenBoard.Health(
                status: status,
                expiresAt: token.map { FormatTime.iso8601($0.expiresAt) },
                nextRefreshAt: nextLogin.map(FormatTime.iso8601),
                lastError: lastError?.description ?? writeError.map { "writing outputs failed: \($0)" }
                    ?? reloadProblem,
                lastSuccessAt: token.map { FormatTime.iso8601($0.obtainedAt) },
                tokenFingerprint: token?.fingerprint,
                lastLogin: lastLogin.map(\.health),
                forcedRefresh: .init(
                    minIntervalSeconds: forcedRefreshFloor,
                    lastAt: lastForcedLogin.map(FormatTime.iso8601),
                    nextAllowedAt: lastForcedLogin.map { FormatTime.iso8601($0.addingTimeInterval(forcedRefreshFloor)) }
                ),
                outputs: outputs.map(\.health)
            )
        }

        /// The `STATUS=` line.
        public func statusLine(now: Date) -> String {
            if exitStatus == ExitStatus.configuration, let lastError {
                return "login rejected: \(lastError); fix the credentials and start again"
            }
            var line = StatusLine.describe(
                token: token,
                nextLogin: nextLogin,
                lastError: lastError,
                writeError: writeError,
                now: now
            )
            if let reloadProblem { line += "; " + reloadProblem }
            return line
        }
    }

    // MARK: State

    /// What the loop is doing. A login in flight and a login scheduled cannot both be written down.
    enum Phase: Sendable, Equatable {
        /// Before `.start`.
        case initial
        /// No login in flight; the next starts at this instant.
        case waiting(until: Date)
        /// The login with this generation is in flight.
        case loggingIn(generation: Int)
        case stopped(exitStatus: Int32)
    }

    /// Where the current token's files stand.
    enum Files: Sendable, Equatable {
        /// The write with this id is being performed. `rotate`: run the rotate actions once it lands.
        case writing(id: Int, rotate: Bool, failedBefore: Bool)
        case written
        case failed(String, retryAt: Date, rotate: Bool)
    }

    /// The token held.
    enum Holding: Sendable, Equatable {
        case none
        /// Handed out (files, socket) until `handOutMargin` before its expiry.
        case current(TokenGrant, Files)
        /// Taken back at expiry; kept for the status and the backoff's view of it.
        case withdrawn(TokenGrant)

        var grant: TokenGrant? {
            switch self {
            case .none: nil
            case .current(let grant, _), .withdrawn(let grant): grant
            }
        }
    }

    public private(set) var configuration: LoadedConfiguration
    private var policy: RefreshPolicy
    private let socketActivated: Bool
    private let watchdogInterval: TimeInterval?
    private var random: SplitMix64

    private(set) var phase: Phase = .initial
    private(set) var holding: Holding = .none
    private var failures = 0
    private var lastError: LoginError?
    private var nextGeneration = 0
    private var nextWriteID = 0
    private var nextWatchdog: Date?
    /// READY=1 has gone out.
    private(set) var announced = false
    /// A reload of a ready daemon is over; READY=1 goes with the next publication.
    private var reloadNotice = false
    /// `.applyConfiguration` is out and its outcome not in: nothing is published meanwhile.
    private var applyingConfiguration = false
    private var reloadProblem: String?
    private var lastPublished: Snapshot?
    private var metricsFileFailing = false
    private var lastForcedLogin: Date?
    private var outputRecords = OutputRecords()
    private var lastLogin: LoginRecord?
    /// When the login in flight started.
    private var loginStartedAt: Date?
    /// A token whose files just landed: its rotate actions run once it is published.
    private var pendingRotation: TokenGrant?
    /// The token whose rejection forces the next login; cleared when it starts.
    private var forcedBy: String?

    /// - Parameters:
    ///   - watchdogInterval: systemd's `WatchdogSec`, if enabled; pinged every half of it.
    ///   - socketActivated: the socket was passed by systemd (its path is not the config's).
    ///   - seed: for the refresh jitter and the backoff draws.
    public init(
        configuration: LoadedConfiguration,
        watchdogInterval: Duration? = nil,
        socketActivated: Bool = false,
        seed: UInt64
    ) {
        self.configuration = configuration
        self.policy = RefreshPolicy(configuration.configuration.refresh)
        self.socketActivated = socketActivated
        self.watchdogInterval = watchdogInterval?.seconds
        self.random = SplitMix64(seed: seed)
    }

    /// Whether a stored token is worth reusing at start rather than logging in: it must outlast the
    /// refresh margin. (The fleet simulation's restarts follow this through the core.)
    public static func isReusable(_ stored: TokenGrant, now: Date, settings: Configuration.Refresh) -> Bool {
        stored.remaining(at: now) > settings.minRemainingSeconds
    }

    /// The exit status once stopped.
    public var exitStatus: Int32? {
        if case .stopped(let status) = phase { return status }
        return nil
    }

    // MARK: Events

    public mutating func handle(_ event: Event, now: Date) -> [Action] {
        if case .stopped = phase { return [] }
        var actions: [Action] = []
        switch event {
        case .start(let stored):
            guard case .initial = phase else { return [] }
            start(stored: stored, now: now, &actions)
        case .tick:
            break
        case .signal(let signal):
            guard self.signal(signal, now: now, &actions) else { return actions }
        case .loginFinished(let generation, let result):
            guard case .loggingIn(generation) = phase else { return [] }
            guard loginFinished(result, now: now, &actions) else { return actions }
        case .filesWritten(let id, let outcome):
            guard case .current(let grant, .writing(id, let rotate, let failedBefore)) = holding else { return [] }
            outputRecords.record(outcome, at: now)
            filesWritten(
                grant,
                rotate: rotate,
                failedBefore: failedBefore,
                failure: outcome.failure?.error,
                now: now,
                &actions
            )
        case .configurationLoaded(let result):
            configurationLoaded(result, now: now, &actions)
        case .configurationApplied(let problem):
            guard applyingConfiguration else { return [] }
            applyingConfiguration = false
            if let problem { reloadProblem = "reload applied, except \(problem)" }
        case .metricsFileWritten(let failure):
            if let failure, !metricsFileFailing { actions.append(.report(.metricsFileFailed(failure))) }
            metricsFileFailing = failure != nil
            recordOnly(configuration.configuration.metricsFile, failure, now: now, &actions)
            return actions
        case .stateSaved(let failure):
            recordOnly(configuration.configuration.stateFile, failure, now: now, &actions)
            return actions
        case .tokenRejected(let fingerprint, let reporterUID, let reportID):
            let outcome = tokenRejected(fingerprint, now: now)
            actions += [
                .report(.tokenRejected(fingerprint: fingerprint, reporterUID: reporterUID, outcome)),
                .answerRejection(reportID: reportID, outcome),
            ]
        case .fleetToken(let generation?, let grant, let member):
            guard case .loggingIn(generation) = phase else { return [] }
            failures = 0
            lastError = nil
            actions.append(.report(.fleetTokenAdopted(grant, member: member, pushed: false)))
            adopt(grant, reason: .fleetToken, now: now, &actions)
        case .fleetToken(nil, let grant, let member):
            // Pushed: taken only between logins, and only when newer (a login in flight is answered
            // by the fleet itself).
            guard case .waiting = phase, grant.isValid(at: now) else { return [] }
            if let held = holding.grant, held.fingerprint == grant.fingerprint || held.localExpiry >= grant.localExpiry
            {
                return []
            }
            failures = 0
            lastError = nil
            actions.append(.report(.fleetTokenAdopted(grant, member: member, pushed: true)))
            adopt(grant, reason: .fleetToken, now: now, &actions)
        case .fleetDeferred(let generation, let until, let why):
            guard case .loggingIn(generation) = phase else { return [] }
            phase = .waiting(until: until)
            actions.append(.report(.fleetDeferred(until: until, why: why)))
        }
        var isTick = false
        if case .tick = event { isTick = true }
        afterEvent(now: now, isTick: isTick, &actions)
        return actions
    }

    /// Time until the next event is due: a login, a withdrawal, a write retry, a watchdog ping, or
    /// `maxTick`, whichever comes first.
    public func nextWake(now: Date) -> Duration {
        let due = nextDeadline().map { min($0.timeIntervalSince(now), Self.maxTick) } ?? Self.maxTick
        return .seconds(max(0, due))
    }

    /// The earliest instant at which something is due, if anything is (the simulation wakes there).
    public func nextDeadline() -> Date? {
        var deadlines: [Date] = []
        if case .waiting(let until) = phase { deadlines.append(until) }
        if case .current(let grant, let files) = holding {
            deadlines.append(grant.localExpiry.addingTimeInterval(-TokenGrant.handOutMargin))
            if case .failed(_, let retryAt, _) = files { deadlines.append(retryAt) }
        }
        if let nextWatchdog { deadlines.append(nextWatchdog) }
        return deadlines.min()
    }

    // MARK: Transitions

    private mutating func start(
        stored: Result<TokenGrant, StateStore.LoadProblem>?,
        now: Date,
        _ actions: inout [Action]
    ) {
        actions.append(.removeStaleTemporaryFiles)
        if let watchdogInterval { nextWatchdog = now.addingTimeInterval(watchdogInterval / 2) }
        phase = .waiting(until: now)
        switch stored {
        case nil, .failure(.missing)?:
            break
        case .failure(let problem)?:
            actions.append(.report(.storedTokenIgnored(problem.description)))
        case .success(let grant)?:
            if Self.isReusable(grant, now: now, settings: policy.settings) {
                actions.append(.report(.tokenReused(grant)))
                adopt(grant, reason: .storedToken, now: now, &actions)
            } else {
                actions.append(.report(.storedTokenTooOld(grant)))
            }
        }
    }

    /// Returns false when the daemon stops (nothing more happens).
    private mutating func signal(_ signal: Signal, now: Date, _ actions: inout [Action]) -> Bool {
        switch signal {
        case .terminate(let name):
            if case .loggingIn = phase { actions.append(.cancelLogin) }
            phase = .stopped(exitStatus: ExitStatus.success)
            actions += [.report(.stopping(signal: name)), .exit(ExitStatus.success)]
            return false
        case .reload:
            actions.append(.loadConfiguration(notify: announced))
        case .refresh:
            actions.append(.report(.refreshRequested))
            // While a login is in flight, it brings the next token: still one login.
            if case .waiting = phase { phase = .waiting(until: now) }
        }
        return true
    }

    /// Returns false when the daemon stops.
    private mutating func loginFinished(
        _ result: Result<TokenResponseParser.Result, LoginError>,
        now: Date,
        _ actions: inout [Action]
    ) -> Bool {
        lastLogin = LoginRecord(
            startedAt: loginStartedAt ?? now,
            finishedAt: now,
            result: result.map(\.grant.fingerprint)
        )
        switch result {
        case .success(let answer):
            failures = 0
            lastError = nil
            actions.append(
                .report(
                    .loginSucceeded(
                        answer.grant,
                        warnings: answer.warnings,
                        shorterThanMargin: policy.isShorterThanMargin(answer.grant)
                    )
                )
            )
            adopt(answer.grant, reason: .newToken, now: now, &actions)
        case .failure(let error):
            failures += 1
            lastError = error
            let valid = holding.grant?.isValid(at: now) ?? false
            if error.kind == .rejected, !valid, !announced {
                // Retrying would only risk an account lock-out: systemd does not restart on 78.
                phase = .stopped(exitStatus: ExitStatus.configuration)
                actions += [
                    .report(.loginRejectedAtStart(error)), .publish(snapshot, nil), .exit(ExitStatus.configuration),
                ]
                return false
            }
            let delay = policy.retryDelay(
                after: error.kind,
                attempt: failures,
                current: holding.grant,
                now: now,
                random: random.unit()
            )
            let retryAt = now.addingTimeInterval(delay)
            phase = .waiting(until: retryAt)
            actions.append(.report(.loginFailed(error, attempt: failures, retryAt: retryAt)))
        }
        return true
    }

    /// Makes `grant` the current token: its files are written, then (`filesWritten`) it is published.
    private mutating func adopt(_ grant: TokenGrant, reason: WriteReason, now: Date, _ actions: inout [Action]) {
        // The first token of a process that found none stored (see RefreshPolicy.refreshTime).
        let coldStart = reason == .newToken && holding == .none
        holding = .current(grant, .written)
        write(grant, reason: reason, rotate: reason.isNew, &actions)
        if reason.isNew, configuration.configuration.stateFile != nil { actions.append(.saveState(grant)) }
        let refreshAt = policy.refreshTime(for: grant, now: now, random: random.unit(), coldStart: coldStart)
        phase = .waiting(until: refreshAt)
        actions.append(.report(.refreshScheduled(at: refreshAt, expiresAt: grant.localExpiry)))
    }

    /// Starts a write of the current token's files, or (with no files configured) lands it at once.
    private mutating func write(
        _ grant: TokenGrant,
        reason: WriteReason,
        rotate: Bool,
        failedBefore: Bool = false,
        _ actions: inout [Action]
    ) {
        guard !configuration.configuration.outputs.files.isEmpty else {
            holding = .current(grant, .written)
            if rotate { pendingRotation = grant }
            return
        }
        let id = nextWriteID
        nextWriteID += 1
        holding = .current(grant, .writing(id: id, rotate: rotate, failedBefore: failedBefore))
        actions.append(.writeFiles(WriteRequest(id: id, grant: grant, reason: reason)))
    }

    private mutating func filesWritten(
        _ grant: TokenGrant,
        rotate: Bool,
        failedBefore: Bool,
        failure: String?,
        now: Date,
        _ actions: inout [Action]
    ) {
        if let failure {
            holding = .current(
                grant,
                .failed(failure, retryAt: now.addingTimeInterval(Self.writeRetry), rotate: rotate)
            )
            actions.append(.report(.writeFailed(failure, first: !failedBefore)))
            return
        }
        holding = .current(grant, .written)
        if failedBefore { actions.append(.report(.writeRecovered)) }
        // Consumers that the actions reload may read the socket: afterEvent publishes first.
        if rotate { pendingRotation = grant }
    }

    private mutating func configurationLoaded(
        _ result: Result<LoadedConfiguration, ConfigurationError>,
        now: Date,
        _ actions: inout [Action]
    ) {
        if announced { reloadNotice = true }
        let fresh: LoadedConfiguration
        switch result {
        case .failure(let error):
            reloadProblem = "reload failed (\(error)); running on the previous configuration"
            actions.append(.report(.reloadFailed(error.description)))
            return
        case .success(let loaded):
            fresh = loaded
        }
        let change = ConfigChange(from: configuration, to: fresh, socketActivated: socketActivated)
        if let why = change.needsRestart {
            reloadProblem = "reload refused: \(why), which needs a restart; running on the previous configuration"
            actions.append(.report(.reloadRefused(why)))
            return
        }
        reloadProblem = nil
        configuration = fresh
        outputRecords.keepOnly(fresh.configuration)
        policy = RefreshPolicy(fresh.configuration.refresh)
        actions += [.applyConfiguration(change), .report(.reloaded(change))]
        applyingConfiguration = true

        if case .current(let grant, let files) = holding, grant.isValid(at: now) {
            if change.files {
                switch files {
                case .writing(_, let rotate, let failedBefore):
                    write(grant, reason: .reconfigured, rotate: rotate, failedBefore: failedBefore, &actions)
                case .failed(_, _, let rotate):
                    write(grant, reason: .reconfigured, rotate: rotate, failedBefore: true, &actions)
                case .written:
                    write(grant, reason: .reconfigured, rotate: false, &actions)
                }
            }
            if change.stateFile { actions.append(.saveState(grant)) }
        }
        if !change.unconfiguredFiles.isEmpty { actions.append(.removeFiles(change.unconfiguredFiles)) }

        if change.account {
            // The token held belongs to the old account: get one for the new account now. An answer
            // for the old account, if a login is in flight, is dropped (its generation is stale).
            if case .loggingIn = phase { actions.append(.cancelLogin) }
            failures = 0
            phase = .waiting(until: now)
        } else if case .waiting = phase {
            if lastError?.kind == .rejected {
                phase = .waiting(until: now)
            } else if lastError == nil, change.policy, case .current(let grant, _) = holding, grant.isValid(at: now) {
                let refreshAt = policy.refreshTime(for: grant, now: now, random: random.unit())
                phase = .waiting(until: refreshAt)
                actions.append(.report(.refreshScheduled(at: refreshAt, expiresAt: grant.localExpiry)))
            }
        }
    }

    private mutating func tokenRejected(_ fingerprint: String, now: Date) -> RejectionOutcome {
        guard case .current(let grant, _) = holding, grant.fingerprint == fingerprint else {
            return .stale(current: holding.grant.flatMap { $0.isValid(at: now) ? $0.fingerprint : nil })
        }
        if case .loggingIn = phase { return .accepted(startedLogin: false) }
        if let until = reportsRefusedUntil(now: now) { return .rateLimited(until: until) }
        // The rejected token stays current until a new one is on disk: a wrong report must not
        // take a good token away.
        lastForcedLogin = now
        forcedBy = fingerprint
        phase = .waiting(until: now)
        return .accepted(startedLogin: true)
    }

    /// Until when a rejected-token report may not force a login, or nil when it may now. Two rules,
    /// the later wins:
    /// 1. the forced-refresh floor: at most one forced login per `minForcedRefreshSeconds`;
    /// 2. the login schedule: after a failed login (the server's `Retry-After`, a 5xx backoff,
    ///    credentials refused) the next try is the one scheduled. A report must not turn a
    ///    backed-off login into one every floor: against refused credentials that is the lock-out
    ///    pattern exit 78 exists to prevent.
    private func reportsRefusedUntil(now: Date) -> Date? {
        var until: Date?
        if let last = lastForcedLogin { until = last.addingTimeInterval(policy.settings.minForcedRefreshSeconds) }
        if lastError != nil, case .waiting(let retryAt) = phase { until = max(until ?? retryAt, retryAt) }
        guard let until, now < until else { return nil }
        return until
    }

    /// Records a write of the metrics or state file. Not through afterEvent: a publication writes
    /// the metrics file, whose outcome comes here; and only `/healthz` shows these records.
    private mutating func recordOnly(_ path: String?, _ failure: String?, now: Date, _ actions: inout [Action]) {
        guard let path else { return }
        outputRecords.record(path, failure, at: now)
        if let current = publishableSnapshot, current != lastPublished {
            lastPublished = current
            actions.append(.updateHealth(current))
        }
    }

    /// After every event: the watchdog, expiry, write retries, a due login, then the publication.
    private mutating func afterEvent(now: Date, isTick: Bool, _ actions: inout [Action]) {
        if let due = nextWatchdog, due <= now, let watchdogInterval {
            actions.append(.pingWatchdog)
            nextWatchdog = now.addingTimeInterval(watchdogInterval / 2)
        }
        switch holding {
        case .current(let grant, _) where !grant.isValid(at: now):
            holding = .withdrawn(grant)
            pendingRotation = nil
            actions += [.withdrawFiles(grant), .report(.tokenExpired(grant))]
            // Expired without a failed login (the clock jumped, or a refresh was late): log in now.
            if case .waiting(let until) = phase, until > now, lastError == nil { phase = .waiting(until: now) }
        case .current(let grant, .failed(_, let retryAt, let rotate)) where retryAt <= now:
            write(grant, reason: .retry, rotate: rotate, failedBefore: true, &actions)
        default:
            break
        }
        if case .waiting(let until) = phase, until <= now {
            let generation = nextGeneration
            nextGeneration += 1
            phase = .loggingIn(generation: generation)
            loginStartedAt = now
            let forced = forcedBy
            forcedBy = nil
            actions += [
                .startLogin(generation: generation, forced: forced), .report(.loginStarted(attempt: failures + 1)),
            ]
        }

        var published = false
        if let current = publishableSnapshot {
            var notice: ReadyNotice?
            if !announced, case .current(let grant, .written) = holding, grant.isValid(at: now) {
                announced = true
                reloadNotice = false
                notice = .started
            } else if reloadNotice {
                reloadNotice = false
                notice = .reloaded
            }
            if current != lastPublished || notice != nil {
                lastPublished = current
                actions.append(.publish(current, notice))
                published = true
            }
            if let grant = pendingRotation {
                pendingRotation = nil
                actions.append(.runRotateActions(grant))
            }
        }
        if let path = configuration.configuration.metricsFile, isTick || published {
            actions.append(.writeMetricsFile(path))
        }
        if !announced {
            // Keep the start job alive until the first token is on disk: ticks come at least every
            // maxTick, and each extension outlasts the next tick plus a whole login.
            actions.append(
                .extendStartTimeout(seconds: Self.maxTick + configuration.configuration.api.timeoutSeconds + 5)
            )
        }
    }

    /// What to publish; nil while files are being written (published once they have landed or
    /// failed, never ahead of the disk) and while a reload is being applied.
    private var publishableSnapshot: Snapshot? {
        if case .current(_, .writing) = holding { return nil }
        if applyingConfiguration { return nil }
        return snapshot
    }

    private var snapshot: Snapshot {
        var nextLogin: Date?
        if case .waiting(let until) = phase { nextLogin = until }
        var writeError: String?
        if case .current(_, .failed(let reason, _, _)) = holding { writeError = reason }
        var withdrawn = false
        if case .withdrawn = holding { withdrawn = true }
        return Snapshot(
            token: holding.grant,
            withdrawn: withdrawn,
            nextLogin: nextLogin,
            lastError: lastError,
            writeError: writeError,
            reloadProblem: reloadProblem,
            exitStatus: exitStatus,
            outputs: outputRecords.outputs(of: configuration.configuration),
            lastLogin: lastLogin,
            forcedRefreshFloor: policy.settings.minForcedRefreshSeconds,
            lastForcedLogin: lastForcedLogin
        )
    }
}
