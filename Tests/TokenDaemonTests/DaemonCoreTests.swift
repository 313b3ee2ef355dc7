import Foundation
import Testing

@testable import TokenDaemon

/// The core as the daemon drives it, with a fake clock: every outcome the runner would feed back
/// (written files, a loaded configuration) is fed back here, so each test reads as a run of the daemon
/// in simulated time. Nothing here sleeps.
/// An `.answerRejection` action, comparable in one `#expect`.
struct RejectionAnswer: Equatable {
    var reportID: Int
    var outcome: DaemonCore.RejectionOutcome
    init(_ reportID: Int, _ outcome: DaemonCore.RejectionOutcome) {
        self.reportID = reportID
        self.outcome = outcome
    }
}

struct CoreDriver {
    var core: DaemonCore
    var now = Date(timeIntervalSince1970: 1_800_000_000)
    /// What the next writes report (nil: success): the first configured file fails with it.
    var writeFailure: String?
    /// What the next saves of the state file and writes of the metrics file report (nil: success).
    var stateFailure: String?
    var metricsFailure: String?
    /// What the next `.loadConfiguration` returns.
    var nextConfiguration: Result<LoadedConfiguration, ConfigurationError>?
    /// What the next `.applyConfiguration` could not apply (nil: everything).
    var applyProblem: String?
    /// What `/healthz` says: the last `.publish` or `.updateHealth`, at the instant it went out.
    var health: TokenBoard.Health?

    init(
        _ configuration: LoadedConfiguration = CoreFixtures.configuration(),
        watchdog: Duration? = nil,
        socketActivated: Bool = false
    ) {
        core = DaemonCore(
            configuration: configuration,
            watchdogInterval: watchdog,
            socketActivated: socketActivated,
            seed: 42
        )
    }

    /// Hands `event` to the core and every outcome back, as `Daemon.process` does; returns every action.
    @discardableResult
    mutating func send(_ event: DaemonCore.Event) -> [DaemonCore.Action] {
        var inputs = [event]
        var all: [DaemonCore.Action] = []
        var next = 0
        while next < inputs.count {
            let actions = core.handle(inputs[next], now: now)
            next += 1
            for action in actions {
                all.append(action)
                switch action {
                case .writeFiles(let request): inputs.append(.filesWritten(id: request.id, writeOutcome))
                case .publish(let snapshot, _), .updateHealth(let snapshot): health = snapshot.health(now: now)
                case .saveState: inputs.append(.stateSaved(failure: stateFailure))
                case .writeMetricsFile: inputs.append(.metricsFileWritten(failure: metricsFailure))
                case .loadConfiguration:
                    if let result = nextConfiguration { inputs.append(.configurationLoaded(result)) }
                case .applyConfiguration: inputs.append(.configurationApplied(problem: applyProblem))
                default: break
                }
            }
        }
        return all
    }

    /// What a write of the current configuration's files reports, as `TokenOutputs.write` would.
    var writeOutcome: TokenOutputs.WriteOutcome {
        let paths = core.configuration.configuration.outputs.files.map(\.path)
        guard let writeFailure, let first = paths.first else { return .init(written: paths) }
        return .init(written: [], failure: .init(path: first, error: writeFailure))
    }

    /// Moves the clock on by `seconds` and ticks.
    @discardableResult
    mutating func advance(_ seconds: TimeInterval) -> [DaemonCore.Action] {
        now = now.addingTimeInterval(seconds)
        return send(.tick)
    }

    /// Ticks at every wake the core asks for until `seconds` have passed; returns every action.
    mutating func run(for seconds: TimeInterval) -> [DaemonCore.Action] {
        let end = now.addingTimeInterval(seconds)
        var all: [DaemonCore.Action] = []
        while now < end {
            now = min(end, now.addingTimeInterval(max(0.001, core.nextWake(now: now).seconds)))
            all += send(.tick)
        }
        return all
    }

    /// A token of `lifetime` seconds obtained now.
    func grant(lifetime: TimeInterval = 3600, token: String = "aaa.bbb.ccc") -> TokenGrant {
        TokenGrant(
            token: token,
            expiresAt: now.addingTimeInterval(lifetime),
            obtainedAt: now,
            userId: nil,
            tenantId: nil,
            clockSkew: 0
        )
    }

    /// The generation of the login in flight.
    var loginInFlight: Int? {
        if case .loggingIn(let generation) = core.phase { return generation }
        return nil
    }

    /// Finishes the login in flight with a new token.
    @discardableResult
    mutating func loginSucceeds(lifetime: TimeInterval = 3600, token: String = "aaa.bbb.ccc") -> [DaemonCore.Action] {
        guard let generation = loginInFlight else {
            Issue.record("no login in flight")
            return []
        }
        return send(
            .loginFinished(
                generation: generation,
                .success(.init(grant: grant(lifetime: lifetime, token: token), warnings: []))
            )
        )
    }

    @discardableResult
    mutating func loginFails(_ error: LoginError) -> [DaemonCore.Action] {
        guard let generation = loginInFlight else {
            Issue.record("no login in flight")
            return []
        }
        return send(.loginFinished(generation: generation, .failure(error)))
    }
}

enum CoreFixtures {
    static let rejected = LoginError.httpStatus(401, retryAfter: nil)
    static let unavailable = LoginError.httpStatus(503, retryAfter: nil)

    static func configuration(
        baseURL: String = "https://auth.example",
        email: String = "svc@example.com",
        apiKey: String = "key-1",
        password: String = "pw-1",
        files: [String] = ["/run/fts/token"],
        headersFile: String? = nil,
        scheme: String = "Bearer",
        socket: Configuration.Socket? = nil,
        proxy: Configuration.Proxy? = nil,
        stateFile: String? = "/var/lib/fts/state.json",
        metricsFile: String? = nil,
        refresh: Configuration.Refresh = noJitter,
        timeoutSeconds: Double = 30
    ) -> LoadedConfiguration {
        let outputs = Configuration.Outputs(
            tokenFile: files.first.map { .init(path: $0, mode: 0o640) },
            jsonFile: files.dropFirst().first.map { .init(path: $0, mode: 0o640) },
            headersFile: headersFile.map { .init(file: .init(path: $0, mode: 0o640), authorizationScheme: scheme) },
            socket: socket,
            proxy: proxy
        )
        let api = Configuration.API(
            baseURL: baseURL,
            tokenPath: "/auth/token",
            email: .inline(email),
            password: .inline(password),
            apiKey: .inline(apiKey),
            timeoutSeconds: timeoutSeconds,
            caFile: nil
        )
        return LoadedConfiguration(
            configuration: Configuration(
                api: api,
                refresh: refresh,
                outputs: outputs,
                stateFile: stateFile,
                logLevel: .info,
                metricsFile: metricsFile
            ),
            secrets: LoginSecrets(email: email, password: password, apiKey: apiKey)
        )
    }

    static var noJitter: Configuration.Refresh {
        var refresh = Configuration.Refresh.defaults
        refresh.jitter = 0
        return refresh
    }

    static func socket(
        path: String = "/run/fts/tokend.sock",
        allowUIDs: [UInt32] = [],
        mode: UInt32 = 0o660,
        maxConnections: Int = 512
    ) -> Configuration.Socket {
        .init(path: path, mode: mode, allowUIDs: allowUIDs, allowGIDs: [], maxConnections: maxConnections)
    }

    static func proxy(
        allowUIDs: [UInt32] = [],
        upstream: String = "https://api.example",
        rejectedStatuses: Set<Int> = [401]
    ) -> Configuration.Proxy {
        .init(
            path: "/run/fts/api.sock",
            mode: 0o660,
            allowUIDs: allowUIDs,
            allowGIDs: [],
            listen: nil,
            upstream: upstream,
            caFile: nil,
            rejectedStatuses: rejectedStatuses,
            allowBrowsers: false,
            maxRequestBodyBytes: 1 << 20,
            connectTimeoutSeconds: 10,
            timeoutSeconds: 60,
            maxConnections: 512,
            maxUpstreamConnections: 64,
            denyPaths: ["/auth/token", "/auth/"],
            maxUpstreamConnectionsPerPeer: 48
        )
    }
}

extension [DaemonCore.Action] {
    var publications: [(DaemonCore.Snapshot, DaemonCore.ReadyNotice?)] {
        compactMap { if case .publish(let snapshot, let notice) = $0 { (snapshot, notice) } else { nil } }
    }
    var readyNotices: [DaemonCore.ReadyNotice] { publications.compactMap(\.1) }
    var logins: [Int] { compactMap { if case .startLogin(let generation, _) = $0 { generation } else { nil } } }
    var writes: [DaemonCore.WriteRequest] {
        compactMap { if case .writeFiles(let request) = $0 { request } else { nil } }
    }
    var reports: [DaemonCore.Report] { compactMap { if case .report(let report) = $0 { report } else { nil } } }
    var answers: [RejectionAnswer] {
        compactMap { if case .answerRejection(let id, let outcome) = $0 { RejectionAnswer(id, outcome) } else { nil } }
    }
}

@Suite struct DaemonCoreStartTests {
    @Test func aColdStartLogsInAtOnceAndSaysSoWithoutReady() {
        var driver = CoreDriver()
        let actions = driver.send(.start(stored: nil))
        #expect(actions.first == .removeStaleTemporaryFiles)
        #expect(actions.logins == [0])
        #expect(actions.readyNotices.isEmpty)
        let (snapshot, _) = try! #require(actions.publications.first)
        #expect(snapshot.token == nil && snapshot.nextLogin == nil)
        #expect(snapshot.statusLine(now: driver.now) == "logging in")
        #expect(actions.contains(.extendStartTimeout(seconds: 30 + 30 + 5)))
    }

    @Test func readyGoesOutOnceTheFilesHaveLandedAndNeverAgain() throws {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        let first = driver.loginSucceeds()
        let write = try #require(first.writes.first)
        #expect(write.reason == .newToken)
        // Nothing is published between the write and its outcome: the socket never runs ahead of the disk.
        let writeAt = try #require(first.firstIndex(of: .writeFiles(write)))
        let publishAt = try #require(first.firstIndex { if case .publish = $0 { true } else { false } })
        #expect(writeAt < publishAt)
        #expect(first.readyNotices == [.started])
        // The rotate actions run after the publication (their consumers may read the socket).
        let rotateAt = try #require(first.firstIndex(of: .runRotateActions(write.grant)))
        #expect(publishAt < rotateAt)
        #expect(first.contains(.saveState(write.grant)))
        // Once ready, the start job is no longer extended.
        #expect(!first[publishAt...].contains { if case .extendStartTimeout = $0 { true } else { false } })

        driver.run(for: 3600 * 0.8 + 1)
        let second = driver.loginSucceeds(token: "ddd.eee.fff")
        #expect(second.readyNotices.isEmpty)
        #expect(second.publications.count == 1)
    }

    @Test func aStoredTokenIsReusedWithoutLoginRotationOrSave() throws {
        var driver = CoreDriver()
        let stored = driver.grant(lifetime: 1800)
        let actions = driver.send(.start(stored: .success(stored)))
        #expect(actions.logins.isEmpty)
        #expect(actions.writes.map(\.reason) == [.storedToken])
        #expect(actions.readyNotices == [.started])
        #expect(!actions.contains(.saveState(stored)) && !actions.contains(.runRotateActions(stored)))
        #expect(actions.reports.first == .tokenReused(stored))
    }

    @Test func aStoredTokenWithinTheMarginIsNotReused() {
        var driver = CoreDriver()
        let stored = driver.grant(lifetime: 120)
        let actions = driver.send(.start(stored: .success(stored)))
        #expect(actions.reports.contains(.storedTokenTooOld(stored)))
        #expect(actions.logins == [0])
        #expect(DaemonCore.isReusable(stored, now: driver.now, settings: .defaults) == false)
        #expect(DaemonCore.isReusable(stored, now: driver.now.addingTimeInterval(-0.001), settings: .defaults))
    }

    @Test func anUnreadableStateFileIsReportedButAMissingOneIsNot() {
        func ignored(_ reports: [DaemonCore.Report]) -> [String] {
            reports.compactMap { if case .storedTokenIgnored(let reason) = $0 { reason } else { nil } }
        }
        var missing = CoreDriver()
        #expect(ignored(missing.send(.start(stored: .failure(.missing))).reports).isEmpty)
        var broken = CoreDriver()
        #expect(
            ignored(broken.send(.start(stored: .failure(.otherAccount))).reports) == [
                StateStore.LoadProblem.otherAccount.description
            ]
        )
    }

    @Test func withOnlyASocketReadyNeedsNoWrite() {
        var driver = CoreDriver(CoreFixtures.configuration(files: [], socket: CoreFixtures.socket()))
        driver.send(.start(stored: nil))
        let actions = driver.loginSucceeds()
        #expect(actions.writes.isEmpty)
        #expect(actions.readyNotices == [.started])
    }
}

@Suite struct DaemonCoreFailureTests {
    @Test func rejectedCredentialsBeforeAnyTokenExit78WithTheReasonInStatus() throws {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        let actions = driver.loginFails(CoreFixtures.rejected)
        #expect(actions.last == .exit(78))
        let (snapshot, notice) = try #require(actions.publications.last)
        #expect(notice == nil)
        #expect(
            snapshot.statusLine(now: driver.now).hasPrefix("login rejected: credentials or API key rejected (HTTP 401)")
        )
        #expect(driver.core.exitStatus == 78)
        // Stopped: nothing more happens.
        #expect(driver.advance(1000).isEmpty)
    }

    @Test func rejectedCredentialsAfterTheFirstTokenWaitTheLongestBackoffInstead() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds(lifetime: 600)
        driver.run(for: 480)  // the refresh at 0.8 of the lifetime
        let actions = driver.loginFails(CoreFixtures.rejected)
        #expect(!actions.contains(.exit(78)))
        #expect(
            actions.reports.contains(
                .loginFailed(CoreFixtures.rejected, attempt: 1, retryAt: driver.now.addingTimeInterval(300))
            )
        )
        // Once the token has expired a rejection still does not exit: the daemon was ready.
        let meanwhile = driver.run(for: 300)
        #expect(meanwhile.contains { if case .withdrawFiles = $0 { true } else { false } })
        #expect(meanwhile.logins.count == 1)
        #expect(!driver.loginFails(CoreFixtures.rejected).contains(.exit(78)))
    }

    @Test func aValidStoredTokenKeepsTheDaemonUpThroughARejection() {
        var driver = CoreDriver()
        driver.send(.start(stored: .success(driver.grant(lifetime: 3600))))
        driver.send(.signal(.refresh))
        #expect(!driver.loginFails(CoreFixtures.rejected).contains(.exit(78)))
    }

    @Test func aFailedWriteIsRetriedEveryFiveSecondsAndReadyWaitsForIt() throws {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.writeFailure = "disk full"
        let failed = driver.loginSucceeds()
        #expect(failed.readyNotices.isEmpty)
        #expect(failed.reports.contains(.writeFailed("disk full", first: true)))
        #expect(!failed.contains { if case .runRotateActions = $0 { true } else { false } })
        let (snapshot, _) = try #require(failed.publications.last)
        #expect(snapshot.writeError == "disk full")
        #expect(snapshot.health(now: driver.now).status == "degraded")
        #expect(driver.core.nextWake(now: driver.now) == .seconds(5))

        #expect(driver.advance(4.999).writes.isEmpty)
        let again = driver.advance(0.001)
        #expect(again.writes.map(\.reason) == [.retry])
        #expect(again.reports.contains(.writeFailed("disk full", first: false)))

        driver.writeFailure = nil
        let recovered = driver.advance(5)
        #expect(recovered.reports.contains(.writeRecovered))
        #expect(recovered.readyNotices == [.started])
        // The token whose first write failed still gets its rotate actions, once it is on disk.
        #expect(recovered.contains { if case .runRotateActions = $0 { true } else { false } })
        #expect(driver.run(for: 60).writes.isEmpty)
    }

    @Test func theTokenIsWithdrawnOneSecondBeforeItExpires() throws {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        let grant = driver.grant(lifetime: 600)
        driver.loginSucceeds(lifetime: 600)
        driver.run(for: 480)
        driver.loginFails(CoreFixtures.unavailable)
        // Keep failing; the retries stop short of withdrawal.
        var withdrawnAt: Date?
        while withdrawnAt == nil, driver.now < grant.localExpiry {
            let wake = driver.core.nextWake(now: driver.now)
            let actions = driver.advance(wake.seconds)
            if actions.contains(.withdrawFiles(grant)) {
                withdrawnAt = driver.now
                let (snapshot, _) = try #require(actions.publications.last)
                #expect(snapshot.servedToken == nil && snapshot.health(now: driver.now).status == "expired")
                #expect(snapshot.statusLine(now: driver.now).contains("token expired at"))
            }
            if driver.loginInFlight != nil { driver.loginFails(CoreFixtures.unavailable) }
        }
        #expect(withdrawnAt == grant.localExpiry.addingTimeInterval(-TokenGrant.handOutMargin))
    }

    @Test func aTokenThatExpiresWithoutAFailureIsReplacedAtOnce() {
        // The wall clock jumped an hour ahead: no login failed, the refresh was simply not yet due.
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds(lifetime: 3600)
        let actions = driver.advance(3600)
        #expect(actions.contains { if case .withdrawFiles = $0 { true } else { false } })
        #expect(actions.logins.count == 1)
    }

    @Test func backoffGrowsAndIsSeeded() {
        func delays(seed: UInt64) -> [TimeInterval] {
            var core = DaemonCore(configuration: CoreFixtures.configuration(), seed: seed)
            var now = Date(timeIntervalSince1970: 1_800_000_000)
            var delays: [TimeInterval] = []
            _ = core.handle(.start(stored: nil), now: now)
            for generation in 0..<6 {
                let actions = core.handle(
                    .loginFinished(generation: generation, .failure(CoreFixtures.unavailable)),
                    now: now
                )
                let retryAt = actions.reports.compactMap { if case .loginFailed(_, _, let at) = $0 { at } else { nil } }
                    .first!
                delays.append(retryAt.timeIntervalSince(now))
                now = retryAt
                _ = core.handle(.tick, now: now)
            }
            return delays
        }
        let first = delays(seed: 1)
        #expect(first == delays(seed: 1))
        #expect(first != delays(seed: 2))
        for (attempt, delay) in first.enumerated() {
            let ceiling = pow(2, Double(attempt))
            #expect(delay >= max(1, ceiling / 2) && delay <= ceiling)
        }
    }
}

@Suite struct DaemonCoreSignalTests {
    @Test func sigusr1WhileALoginIsInFlightStillMakesOneLogin() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let requested = driver.send(.signal(.refresh))
        #expect(requested.logins.count == 1)
        #expect(requested.reports.first == .refreshRequested)
        #expect(driver.send(.signal(.refresh)).logins.isEmpty)
        #expect(driver.advance(1).logins.isEmpty)
    }

    @Test func sigusr1PublishesTheLoginInFlightToTheSocketToo() throws {
        // Regression: SIGUSR1 and the start of a login updated STATUS but not /healthz.
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let (snapshot, _) = try #require(driver.send(.signal(.refresh)).publications.last)
        #expect(snapshot.nextLogin == nil)
        #expect(snapshot.health(now: driver.now).nextRefreshAt == nil)
    }

    @Test func sigtermCancelsTheLoginAndExitsZero() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        let actions = driver.send(.signal(.terminate(name: "TERM")))
        #expect(actions == [.cancelLogin, .report(.stopping(signal: "TERM")), .exit(0)])
        #expect(driver.core.exitStatus == 0)
    }

    @Test func theWatchdogIsPingedEveryHalfInterval() {
        var driver = CoreDriver(watchdog: .seconds(10))
        driver.send(.start(stored: .success(driver.grant())))
        #expect(driver.core.nextWake(now: driver.now) == .seconds(5))
        #expect(!driver.advance(4.999).contains(.pingWatchdog))
        #expect(driver.advance(0.001).contains(.pingWatchdog))
        let pings = driver.run(for: 60).filter { $0 == .pingWatchdog }.count
        #expect(pings == 12)
    }

    @Test func theWakeIsNeverLaterThanMaxTickNorNegative() {
        var driver = CoreDriver()
        driver.send(.start(stored: .success(driver.grant(lifetime: 86400))))
        #expect(driver.core.nextWake(now: driver.now) == .seconds(DaemonCore.maxTick))
        #expect(driver.core.nextWake(now: driver.now.addingTimeInterval(86400)) == .zero)
    }
}

@Suite struct DaemonCoreReloadTests {
    /// A driver with a token current and READY sent.
    func ready(_ configuration: LoadedConfiguration = CoreFixtures.configuration()) -> CoreDriver {
        var driver = CoreDriver(configuration)
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        return driver
    }

    @Test func aBrokenReloadBeforeTheFirstTokenSendsNoReady() throws {
        // Regression: SIGHUP with a broken config while the first login was failing sent READY=1.
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginFails(CoreFixtures.unavailable)
        driver.nextConfiguration = .failure(ConfigurationError("api", "broken"))
        let actions = driver.send(.signal(.reload))
        #expect(actions.first == .loadConfiguration(notify: false))
        #expect(actions.readyNotices.isEmpty)
        let (snapshot, _) = try #require(actions.publications.last)
        #expect(
            snapshot.statusLine(now: driver.now).contains(
                "reload failed (api: broken); running on the previous configuration"
            )
        )
        // READY still waits for the first token.
        driver.run(for: 2)
        #expect(driver.loginSucceeds().readyNotices == [.started])
    }

    @Test func aReloadOfAReadyDaemonEndsWithReadyWhateverItsOutcome() {
        var driver = ready()
        driver.nextConfiguration = .failure(ConfigurationError("api", "broken"))
        let failed = driver.send(.signal(.reload))
        #expect(failed.first == .loadConfiguration(notify: true))
        #expect(failed.readyNotices == [.reloaded])
        driver.nextConfiguration = .success(CoreFixtures.configuration())
        let fine = driver.send(.signal(.reload))
        #expect(fine.readyNotices == [.reloaded])
        #expect(
            fine.contains {
                if case .applyConfiguration(let change) = $0 { change.summary == "nothing" } else { false }
            }
        )
        // A successful reload clears the earlier failure from STATUS.
        #expect(fine.publications.last?.0.reloadProblem == nil)
    }

    @Test func anAccountChangeDropsTheAnswerInFlightAndLogsInForTheNewOne() {
        var driver = ready()
        driver.send(.signal(.refresh))
        let old = driver.loginInFlight!
        driver.nextConfiguration = .success(CoreFixtures.configuration(email: "other@example.com"))
        let actions = driver.send(.signal(.reload))
        #expect(actions.contains(.cancelLogin))
        let fresh = try! #require(actions.logins.first)
        #expect(fresh != old)
        // The old account's answer arrives after all: dropped.
        let stale = driver.send(
            .loginFinished(generation: old, .success(.init(grant: driver.grant(token: "old.acc.ount"), warnings: [])))
        )
        #expect(stale.isEmpty)
        #expect(driver.loginInFlight == fresh)
    }

    @Test func aPolicyChangeDrawsTheNextRefreshAgain() throws {
        var driver = ready()
        var refresh = CoreFixtures.noJitter
        refresh.refreshAt = 0.5
        driver.nextConfiguration = .success(CoreFixtures.configuration(refresh: refresh))
        let actions = driver.send(.signal(.reload))
        #expect(
            actions.reports.contains(
                .refreshScheduled(
                    at: driver.now.addingTimeInterval(1800),
                    expiresAt: driver.now.addingTimeInterval(3600)
                )
            )
        )
        #expect(actions.publications.last?.0.nextLogin == driver.now.addingTimeInterval(1800))
        // Without a policy change the schedule stays where it was.
        let before = driver.core.nextDeadline()
        driver.nextConfiguration = .success(CoreFixtures.configuration(refresh: refresh))
        driver.send(.signal(.reload))
        #expect(driver.core.nextDeadline() == before)
    }

    @Test func movedOutputsAreWrittenAndTheOldOnesRemoved() {
        var driver = ready(
            CoreFixtures.configuration(
                files: ["/run/fts/token", "/run/fts/token.json"],
                headersFile: "/run/fts/headers"
            )
        )
        driver.nextConfiguration = .success(CoreFixtures.configuration(files: ["/run/fts/new-token"], headersFile: nil))
        let actions = driver.send(.signal(.reload))
        #expect(actions.writes.map(\.reason) == [.reconfigured])
        #expect(actions.contains(.removeFiles(["/run/fts/token", "/run/fts/token.json", "/run/fts/headers"])))
        // Write first, then remove.
        let written = actions.firstIndex { if case .writeFiles = $0 { true } else { false } }!
        let removed = actions.firstIndex { if case .removeFiles = $0 { true } else { false } }!
        #expect(written < removed)
    }

    @Test func aNewSchemeRewritesTheHeadersFile() {
        var driver = ready(CoreFixtures.configuration(headersFile: "/run/fts/headers"))
        driver.nextConfiguration = .success(CoreFixtures.configuration(headersFile: "/run/fts/headers", scheme: ""))
        let actions = driver.send(.signal(.reload))
        #expect(actions.writes.map(\.reason) == [.reconfigured])
        #expect(!actions.contains { if case .removeFiles = $0 { true } else { false } })
    }

    @Test func aMovedStateFileIsSavedAndTheOldOneRemoved() {
        var driver = ready()
        driver.nextConfiguration = .success(CoreFixtures.configuration(stateFile: "/var/lib/fts/other.json"))
        let actions = driver.send(.signal(.reload))
        #expect(actions.contains { if case .saveState = $0 { true } else { false } })
        #expect(actions.contains(.removeFiles(["/var/lib/fts/state.json"])))
    }

    @Test func socketAccessIsAppliedLive() throws {
        var driver = ready(CoreFixtures.configuration(socket: CoreFixtures.socket(allowUIDs: [1001, 1002])))
        driver.nextConfiguration = .success(
            CoreFixtures.configuration(socket: CoreFixtures.socket(allowUIDs: [1001], mode: 0o600, maxConnections: 8))
        )
        let actions = driver.send(.signal(.reload))
        let change = try #require(
            actions.compactMap { if case .applyConfiguration(let change) = $0 { change } else { nil } }.first
        )
        #expect(change.socketAccess && change.needsRestart == nil)
        #expect(driver.core.configuration.configuration.outputs.socket?.allowUIDs == [1001])
    }

    @Test func proxyAccessAndRejectedStatusesAreAppliedLive() throws {
        var driver = ready(CoreFixtures.configuration(proxy: CoreFixtures.proxy(allowUIDs: [1001, 1002])))
        driver.nextConfiguration = .success(
            CoreFixtures.configuration(proxy: CoreFixtures.proxy(allowUIDs: [1001], rejectedStatuses: [401, 403]))
        )
        let actions = driver.send(.signal(.reload))
        let change = try #require(
            actions.compactMap { if case .applyConfiguration(let change) = $0 { change } else { nil } }.first
        )
        #expect(change.proxyAccess && change.needsRestart == nil && !change.socketAccess)
        #expect(change.summary == "proxy_access")
        #expect(driver.core.configuration.configuration.outputs.proxy?.allowUIDs == [1001])
    }

    @Test(arguments: [
        (
            CoreFixtures.proxy(upstream: "https://other.example"),
            "outputs.proxy's listeners, upstream, caFile or timeouts changed"
        ),
        (nil, "outputs.proxy (/run/fts/api.sock) was removed"),
    ])
    func aProxyGivenAnotherUpstreamOrRemovedRefusesTheReload(_ after: Configuration.Proxy?, _ reason: String) {
        let before = CoreFixtures.configuration(proxy: CoreFixtures.proxy())
        var driver = ready(before)
        driver.nextConfiguration = .success(CoreFixtures.configuration(proxy: after))
        let actions = driver.send(.signal(.reload))
        #expect(!actions.contains { if case .applyConfiguration = $0 { true } else { false } })
        #expect(actions.reports == [.reloadRefused(reason)])
        #expect(driver.core.configuration == before)
    }

    @Test func anAddedProxyRefusesTheReload() {
        var driver = ready()
        driver.nextConfiguration = .success(CoreFixtures.configuration(proxy: CoreFixtures.proxy()))
        #expect(
            driver.send(.signal(.reload)).reports == [.reloadRefused("outputs.proxy (/run/fts/api.sock) was added")]
        )
    }

    @Test func aMovedSocketRefusesTheReloadLoudly() throws {
        let before = CoreFixtures.configuration(socket: CoreFixtures.socket())
        var driver = ready(before)
        driver.nextConfiguration = .success(
            CoreFixtures.configuration(password: "new", socket: CoreFixtures.socket(path: "/run/other.sock"))
        )
        let actions = driver.send(.signal(.reload))
        #expect(!actions.contains { if case .applyConfiguration = $0 { true } else { false } })
        #expect(
            actions.reports == [
                .reloadRefused("outputs.socket.path changed from /run/fts/tokend.sock to /run/other.sock")
            ]
        )
        #expect(actions.readyNotices == [.reloaded])
        let (snapshot, _) = try #require(actions.publications.last)
        #expect(snapshot.statusLine(now: driver.now).contains("which needs a restart"))
        #expect(snapshot.health(now: driver.now).status == "degraded")
        #expect(driver.core.configuration == before)
    }

    /// The socket's new mode could not be set (its path no longer holds the daemon's socket): the
    /// reload's READY=1 already says so in STATUS and `/healthz`, nothing is published before it, and
    /// the next reload that applies clears it.
    @Test func aReloadThatCannotApplyTheSocketsModeSaysSoWithItsReady() throws {
        var driver = ready(CoreFixtures.configuration(socket: CoreFixtures.socket()))
        driver.nextConfiguration = .success(CoreFixtures.configuration(socket: CoreFixtures.socket(mode: 0o600)))
        driver.applyProblem = "the socket's mode (/run/fts/tokend.sock is no longer a socket)"
        let actions = driver.send(.signal(.reload))
        let applied = try #require(actions.firstIndex { if case .applyConfiguration = $0 { true } else { false } })
        let publications = actions.enumerated().filter { if case .publish = $0.element { true } else { false } }
        #expect(publications.count == 1, "one publication, after the outcome")
        #expect(publications.allSatisfy { $0.offset > applied })
        let (snapshot, notice) = try #require(actions.publications.last)
        #expect(notice == .reloaded)
        let expected = "reload applied, except the socket's mode (/run/fts/tokend.sock is no longer a socket)"
        #expect(snapshot.statusLine(now: driver.now).hasSuffix("; " + expected))
        #expect(driver.health?.status == "degraded")
        #expect(driver.health?.lastError == expected)
        // The new allow lists and mode are the configuration in force: what could be applied was.
        #expect(driver.core.configuration.configuration.outputs.socket?.mode == 0o600)

        driver.applyProblem = nil
        let again = driver.send(.signal(.reload))
        #expect(again.readyNotices == [.reloaded])
        #expect(again.publications.last?.0.reloadProblem == nil)
        #expect(driver.health?.status == "ok")
    }

    @Test func anApplyOutcomeWithNoReloadOutIsIgnored() {
        var driver = ready()
        #expect(driver.send(.configurationApplied(problem: "stray")).isEmpty)
        #expect(driver.health?.status == "ok")
    }

    @Test func underSocketActivationTheSocketPathIsNotTheConfigs() {
        var driver = CoreDriver(CoreFixtures.configuration(socket: CoreFixtures.socket()), socketActivated: true)
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        driver.nextConfiguration = .success(
            CoreFixtures.configuration(socket: CoreFixtures.socket(path: "/run/other.sock"))
        )
        #expect(driver.send(.signal(.reload)).reports.contains { if case .reloaded = $0 { true } else { false } })
    }

    @Test func aFixedPasswordIsTriedAtOnceAfterARejection() {
        var driver = ready()
        driver.send(.signal(.refresh))
        driver.loginFails(CoreFixtures.rejected)
        driver.nextConfiguration = .success(CoreFixtures.configuration(password: "fixed"))
        #expect(driver.send(.signal(.reload)).logins.count == 1)
    }

    @Test func theClientIsRebuiltWhenItsSettingsChange() throws {
        var driver = ready()
        driver.nextConfiguration = .success(CoreFixtures.configuration(timeoutSeconds: 10))
        let actions = driver.send(.signal(.reload))
        let change = try #require(
            actions.compactMap { if case .applyConfiguration(let change) = $0 { change } else { nil } }.first
        )
        #expect(change.client && !change.account)
        #expect(actions.logins.isEmpty)
    }
}

@Suite struct DaemonCoreRejectionTests {
    /// A report from uid 1001, with a fresh report ID.
    static func report(_ fingerprint: String, id: Int = 0) -> DaemonCore.Event {
        .tokenRejected(fingerprint: fingerprint, reporterUID: 1001, reportID: id)
    }

    @Test func aReportOfTheCurrentTokenForcesOneLoginThenTheFloorApplies() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let fingerprint = driver.grant().fingerprint
        let accepted = driver.send(Self.report(fingerprint, id: 1))
        #expect(accepted.answers == [.init(1, .accepted(startedLogin: true))])
        #expect(
            accepted.reports.contains(
                .tokenRejected(fingerprint: fingerprint, reporterUID: 1001, .accepted(startedLogin: true))
            )
        )
        #expect(accepted.logins.count == 1)
        // While that login is in flight, more reports join it: still one login.
        let joined = driver.send(Self.report(fingerprint, id: 2))
        #expect(joined.logins.isEmpty)
        #expect(joined.answers == [.init(2, .accepted(startedLogin: false))])
        driver.loginSucceeds(token: "new.tok.en")
        let newFingerprint = Fingerprint.of("new.tok.en")
        driver.advance(10)
        let limited = driver.send(Self.report(newFingerprint, id: 3))
        #expect(limited.answers == [.init(3, .rateLimited(until: driver.now.addingTimeInterval(20)))])
        #expect(limited.logins.isEmpty)
        // Once the floor has passed, the next report forces a login again.
        driver.advance(20)
        #expect(driver.send(Self.report(newFingerprint, id: 4)).logins.count == 1)
    }

    /// Attack: after the server asked for an hour's pause (429, Retry-After 3600), proxied 401s
    /// forced a login every floor. A report waits for the scheduled try, then forces one again.
    @Test func aReportWhileTheServerAskedForAPauseWaitsForTheScheduledTry() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let fingerprint = driver.grant().fingerprint
        driver.send(.signal(.refresh))
        driver.loginFails(.httpStatus(429, retryAfter: 3600))
        guard case .waiting(let retryAt) = driver.core.phase else {
            Issue.record("no login scheduled: \(driver.core.phase)")
            return
        }
        #expect(retryAt >= driver.now.addingTimeInterval(3600))
        for id in 1...5 {
            driver.advance(60)
            let limited = driver.send(Self.report(fingerprint, id: id))
            #expect(limited.answers == [.init(id, .rateLimited(until: retryAt))])
            #expect(limited.logins.isEmpty)
        }
        driver.advance(retryAt.timeIntervalSince(driver.now))
        #expect(driver.loginInFlight != nil, "the scheduled try happens")
    }

    /// Attack: with the password refused (next try in `backoffMaxSeconds`), each 401 report forced
    /// one more wrong-password login: the lock-out pattern.
    @Test func aReportAfterTheCredentialsWereRefusedForcesNoLoginUntilTheScheduledTry() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let fingerprint = driver.grant().fingerprint
        driver.send(.signal(.refresh))
        driver.loginFails(CoreFixtures.rejected)
        guard case .waiting(let retryAt) = driver.core.phase else {
            Issue.record("no login scheduled: \(driver.core.phase)")
            return
        }
        var logins = 0
        var id = 0
        while driver.now.addingTimeInterval(35) < retryAt {
            driver.advance(35)
            id += 1
            let answer = driver.send(Self.report(fingerprint, id: id))
            logins += answer.logins.count
            #expect(answer.answers == [.init(id, .rateLimited(until: retryAt))])
        }
        #expect(id > 3 && logins == 0, "\(id) reports made \(logins) logins")
    }

    /// The later of the two rules wins: a backoff shorter than the floor leaves the floor.
    @Test func aReportDuringAShortBackoffWaitsForTheLaterOfFloorAndTry() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let fingerprint = driver.grant().fingerprint
        #expect(driver.send(Self.report(fingerprint, id: 1)).logins.count == 1)
        let forcedAt = driver.now
        driver.loginFails(CoreFixtures.unavailable)
        guard case .waiting(let retryAt) = driver.core.phase else {
            Issue.record("no login scheduled: \(driver.core.phase)")
            return
        }
        let floor = forcedAt.addingTimeInterval(CoreFixtures.noJitter.minForcedRefreshSeconds)
        let limited = driver.send(Self.report(fingerprint, id: 2))
        #expect(limited.answers == [.init(2, .rateLimited(until: max(floor, retryAt)))])
    }

    @Test func theFloorIsRefreshMinForcedRefreshSeconds() {
        var refresh = CoreFixtures.noJitter
        refresh.minForcedRefreshSeconds = 120
        var driver = CoreDriver(CoreFixtures.configuration(refresh: refresh))
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        #expect(driver.send(Self.report(driver.grant().fingerprint)).logins.count == 1)
        driver.loginSucceeds(token: "new.tok.en")
        driver.advance(90)
        let limited = driver.send(Self.report(Fingerprint.of("new.tok.en"), id: 1))
        #expect(limited.answers == [.init(1, .rateLimited(until: driver.now.addingTimeInterval(30)))])
    }

    @Test func aReportOfAnOldTokenIsStaleAndTakesNothingAway() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let actions = driver.send(Self.report("00000000", id: 7))
        #expect(actions.answers == [.init(7, .stale(current: driver.grant().fingerprint))])
        #expect(actions.logins.isEmpty && !actions.contains { if case .withdrawFiles = $0 { true } else { false } })
    }

    /// The rejected token stays served until its successor is on disk: a wrong report (or a
    /// failing login after it) must not take a good token away.
    @Test func theRejectedTokenStaysUntilANewOneIsWritten() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let first = driver.grant()
        let actions = driver.send(Self.report(first.fingerprint))
        #expect(actions.logins.count == 1)
        #expect(!actions.contains { if case .withdrawFiles = $0 { true } else { false } })
        let published = actions.compactMap { if case .publish(let snapshot, _) = $0 { snapshot } else { nil } }
        #expect(!published.isEmpty && published.allSatisfy { $0.servedToken?.fingerprint == first.fingerprint })
    }

    @Test func aReportBeforeAnyTokenIsStaleWithNoCurrentToken() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        #expect(driver.send(Self.report("0badf00d", id: 5)).answers == [.init(5, .stale(current: nil))])
    }
}

/// What `/healthz` says of the outputs, the last login and the forced-refresh floor (issue 14 item 6).
@Suite struct DaemonCoreHealthTests {
    static let metrics = "/var/lib/node/fts.prom"

    func output(_ driver: CoreDriver, _ key: String) -> TokenBoard.Health.Output? {
        driver.health?.outputs?.first { $0.output == key }
    }

    @Test func everyFileTheDaemonWritesIsListedWithItsLastWrite() throws {
        var driver = CoreDriver(
            CoreFixtures.configuration(
                files: ["/run/fts/token", "/run/fts/token.json"],
                headersFile: "/run/fts/headers",
                metricsFile: Self.metrics
            )
        )
        driver.send(.start(stored: nil))
        let written = FormatTime.iso8601(driver.now)
        driver.loginSucceeds()
        let outputs = try #require(driver.health?.outputs)
        #expect(
            outputs.map(\.output) == [
                "outputs.tokenFile", "outputs.jsonFile", "outputs.headersFile", "stateFile", "metricsFile",
            ]
        )
        #expect(
            outputs.map(\.path) == [
                "/run/fts/token", "/run/fts/token.json", "/run/fts/headers", "/var/lib/fts/state.json", Self.metrics,
            ]
        )
        #expect(outputs.allSatisfy { $0.lastWriteAt == written && $0.lastError == nil })
    }

    @Test func aWriteErrorNamesItsFileAndStaysAfterTheRecovery() throws {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let firstWrite = FormatTime.iso8601(driver.now)
        driver.advance(60)
        driver.writeFailure = "rename to /run/fts/token: No space left on device"
        driver.send(.signal(.refresh))
        driver.loginSucceeds(token: "new.tok.en")
        let failedAt = FormatTime.iso8601(driver.now)
        var token = try #require(output(driver, "outputs.tokenFile"))
        #expect(token.lastWriteAt == firstWrite)
        #expect(token.lastError == .init(at: failedAt, error: "rename to /run/fts/token: No space left on device"))
        #expect(driver.health?.status == "degraded")
        // The retry lands: the write time moves on, the error stays for the operator to see.
        driver.writeFailure = nil
        driver.advance(DaemonCore.writeRetry)
        token = try #require(output(driver, "outputs.tokenFile"))
        #expect(token.lastWriteAt == FormatTime.iso8601(driver.now))
        #expect(token.lastError?.at == failedAt)
        #expect(driver.health?.status == "ok")
    }

    /// A file that keeps failing the same way is retried every 5 s: each retry is not news, so it
    /// makes no publication (no STATUS= message, no metrics file), and the error keeps the time it began.
    @Test func retriesThatFailTheSameWayKeepTheTimeTheErrorBeganAndPublishNothing() throws {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.writeFailure = "rename to /run/fts/token: No space left on device"
        driver.loginSucceeds()
        let began = FormatTime.iso8601(driver.now)
        let retry = driver.advance(DaemonCore.writeRetry)
        #expect(retry.contains { if case .writeFiles = $0 { true } else { false } })
        #expect(!retry.contains { if case .publish = $0 { true } else { false } })
        #expect(output(driver, "outputs.tokenFile")?.lastError?.at == began)
        // Another error is news.
        driver.writeFailure = "rename to /run/fts/token: Read-only file system"
        let other = driver.advance(DaemonCore.writeRetry)
        #expect(other.contains { if case .publish = $0 { true } else { false } })
        #expect(output(driver, "outputs.tokenFile")?.lastError?.at == FormatTime.iso8601(driver.now))
    }

    @Test func aStateFileThatCannotBeSavedIsShownWithoutDegradingTheToken() throws {
        var driver = CoreDriver()
        driver.stateFailure = "create /var/lib/fts/state.json.tmp: Read-only file system"
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        let state = try #require(output(driver, "stateFile"))
        #expect(state.lastWriteAt == nil)
        #expect(state.lastError?.error == "create /var/lib/fts/state.json.tmp: Read-only file system")
        #expect(driver.health?.status == "ok")
    }

    /// The metrics file is written after every publication: its record reaches `/healthz` alone,
    /// without a publication that would write it again.
    @Test func theMetricsFileRecordUpdatesHealthWithoutAnotherPublication() throws {
        var driver = CoreDriver(CoreFixtures.configuration(metricsFile: Self.metrics))
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        driver.metricsFailure = "rename to \(Self.metrics): Permission denied"
        let actions = driver.advance(10)
        #expect(actions.filter { if case .writeMetricsFile = $0 { true } else { false } }.count == 1)
        #expect(!actions.contains { if case .publish = $0 { true } else { false } })
        #expect(actions.contains { if case .updateHealth = $0 { true } else { false } })
        let metrics = try #require(output(driver, "metricsFile"))
        #expect(
            metrics.lastError
                == .init(at: FormatTime.iso8601(driver.now), error: "rename to \(Self.metrics): Permission denied")
        )
    }

    @Test func aReloadForgetsTheFilesItNoLongerConfigures() throws {
        var driver = CoreDriver(CoreFixtures.configuration(files: ["/run/fts/token", "/run/fts/token.json"]))
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        driver.nextConfiguration = .success(CoreFixtures.configuration(files: ["/run/fts/token"]))
        driver.send(.signal(.reload))
        #expect(driver.health?.outputs?.map(\.output) == ["outputs.tokenFile", "stateFile"])
        // Configured again, the file starts afresh (its old write time was another configuration's).
        driver.advance(30)
        driver.writeFailure = "disk full"
        driver.nextConfiguration = .success(
            CoreFixtures.configuration(files: ["/run/fts/token", "/run/fts/token.json"])
        )
        driver.send(.signal(.reload))
        let json = try #require(output(driver, "outputs.jsonFile"))
        #expect(json.lastWriteAt == nil)
    }

    @Test func theLastLoginShowsItsResultDurationAndToken() throws {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        let started = FormatTime.iso8601(driver.now)
        driver.now = driver.now.addingTimeInterval(0.25)
        driver.loginSucceeds()
        var login = try #require(driver.health?.lastLogin)
        #expect(login.result == "ok" && login.startedAt == started && login.durationSeconds == 0.25)
        #expect(login.tokenFingerprint == driver.grant().fingerprint && login.error == nil)
        #expect(driver.health?.tokenFingerprint == driver.grant().fingerprint)

        driver.send(.signal(.refresh))
        driver.loginFails(CoreFixtures.unavailable)
        login = try #require(driver.health?.lastLogin)
        #expect(login.result == "failed" && login.httpStatus == 503 && login.tokenFingerprint == nil)
        #expect(login.error == CoreFixtures.unavailable.description)

        driver.advance(try #require(driver.core.nextDeadline()).timeIntervalSince(driver.now))
        driver.loginFails(.httpStatus(429, retryAfter: 60))
        #expect(driver.health?.lastLogin?.result == "rate-limited")
        driver.advance(61)
        driver.loginFails(CoreFixtures.rejected)
        #expect(driver.health?.lastLogin?.result == "rejected")
    }

    @Test func theForcedRefreshFloorAndItsNextInstantAreShown() throws {
        var refresh = CoreFixtures.noJitter
        refresh.minForcedRefreshSeconds = 120
        var driver = CoreDriver(CoreFixtures.configuration(refresh: refresh))
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        #expect(driver.health?.forcedRefresh == .init(minIntervalSeconds: 120, lastAt: nil, nextAllowedAt: nil))
        driver.send(DaemonCoreRejectionTests.report(driver.grant().fingerprint))
        let forcedAt = driver.now
        driver.loginSucceeds(token: "new.tok.en")
        #expect(
            driver.health?.forcedRefresh
                == .init(
                    minIntervalSeconds: 120,
                    lastAt: FormatTime.iso8601(forcedAt),
                    nextAllowedAt: FormatTime.iso8601(forcedAt.addingTimeInterval(120))
                )
        )
    }
}
