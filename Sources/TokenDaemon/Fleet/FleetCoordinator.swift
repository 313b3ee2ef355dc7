#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The fleet's row as one member read it: the newest token any member published, opened with this
/// member's key, and the fleet-wide schedule. Durations are measured by the database's clock (as
/// `expires_at - now()`), then placed on this member's clock at the read: no two hosts' clocks are
/// ever compared (README "Fleet").
public struct FleetRecord: Sendable, Equatable {
    public enum Content: Sendable, Equatable {
        /// No member has published yet.
        case empty
        case token(TokenGrant)
        /// Sealed with a key this member does not derive (another password during a rotation, or a
        /// row edited in place): not usable here, and never served.
        case unopenable
    }

    /// Raised by one at every publication; a write names the generation it read (the fence).
    public var generation: Int64
    public var content: Content
    /// The member that published it.
    public var publishedBy: String
    /// When the fleet's last forced login was, by this member's clock; nil: never.
    public var lastForcedAt: Date?
    /// No member logs in before this instant (a member's login was answered with `Retry-After`);
    /// nil: no fleet-wide wait.
    public var noLoginBefore: Date?

    public init(
        generation: Int64,
        content: Content,
        publishedBy: String,
        lastForcedAt: Date? = nil,
        noLoginBefore: Date? = nil
    ) {
        self.generation = generation
        self.content = content
        self.publishedBy = publishedBy
        self.lastForcedAt = lastForcedAt
        self.noLoginBefore = noLoginBefore
    }

    var grant: TokenGrant? {
        if case .token(let grant) = content { return grant }
        return nil
    }
}

/// One member's side of the fleet protocol, as a pure state machine (the shape of `DaemonCore`):
/// events in, actions out. `Daemon` performs the actions: the database calls through `FleetLink`
/// (each with a deadline: a call that misses it comes back as `.unreachable`), the login through
/// the auth client; and feeds the outcomes back.
///
/// What a member gets (README "Fleet"):
/// 1. **One login per lifetime, fleet-wide.** When the core needs a token (its refresh point, or a
///    forced login), the member reads the row. A token newer than its own is adopted with no login.
///    Otherwise it takes the fleet's lock, reads again (a member may have published in between),
///    logs in, publishes naming the generation it read, and lets go of the lock.
/// 2. **Fencing.** A publication names the generation read under the lock; the database refuses it
///    when the generation moved (the lock was lost: a pause, a partition). A member never writes over
///    a newer token; its own token, if newer than the row's, is offered again through 5.
/// 3. **A busy lock is a login in flight elsewhere.** The member waits for its publication (pushed
///    to it, `.notified`) for at most `peerWait`, then reads again; it never logs in beside it, even
///    without a valid token (at most one login in flight per account among the members that reach
///    the database).
/// 4. **The database is never needed to keep serving.** Unreachable: the member keeps its valid
///    token and logs in alone only once it must (`fallbackAt`: late in the token's life, or at once
///    without a valid token), at most once per token it holds.
/// 5. **Convergence.** After a reconnect, and at every publication pushed to it, the member reads the
///    row: a newer token is handed to the core (`.adopt`); a token of its own that the row lacks and
///    that is newer (a fallback login, a lost publication) is published, so the members settle on
///    the newest token, which with a provider that keeps one token per user is the only valid one.
/// 6. **Fleet-wide floor and backoff.** A forced login is refused fleet-wide within the forced-refresh
///    floor of the fleet's last one, unless the row already holds a newer token than the rejected
///    one. A login answered with `Retry-After` holds every member until then; a rejection does not
///    (it may be this member's own wrong password: item 7 of the issue, bad members do no harm).
public struct FleetCoordinator: Sendable {
    public struct Settings: Sendable, Equatable {
        /// The core's refresh settings: the forced-refresh floor and the fallback point come from them.
        public var refresh: Configuration.Refresh
        /// How long a member waits for another member's login (the lock is busy) before it reads again:
        /// the login timeout and a margin.
        public var peerWait: TimeInterval
        /// How often an unreachable database is tried again while a token is needed.
        public var retryInterval: TimeInterval = 5
        /// How often a busy lock is tried again once the token's fallback point has passed, or
        /// with no valid token.
        public var recheckInterval: TimeInterval = 1

        public init(refresh: Configuration.Refresh, loginTimeout: TimeInterval) {
            self.refresh = refresh
            self.peerWait = loginTimeout + 5
        }

        /// When a member cut off from the database logs in alone: halfway between the token's
        /// latest refresh point (`RefreshPolicy` with no jitter) and its withdrawal. Later than
        /// every member's refresh point, so that a member that reaches the database logs in first;
        /// early enough for a login before the withdrawal (half of the refresh margin: 6 minutes
        /// of a one-hour token at the defaults).
        public func fallbackAt(_ grant: TokenGrant) -> Date {
            let latestRefresh = RefreshPolicy(refresh).refreshTime(for: grant, now: .distantPast, random: 0)
            let withdrawal = grant.localExpiry.addingTimeInterval(-TokenGrant.handOutMargin)
            return latestRefresh.addingTimeInterval(max(0, withdrawal.timeIntervalSince(latestRefresh)) / 2)
        }
    }

    /// Why the core needs a token.
    public enum Need: Sendable, Equatable {
        /// The refresh point of the token held (or no token yet).
        case refresh
        /// A consumer reported that the API rejected the token with this fingerprint.
        case forced(rejected: String)
    }

    /// Where a token a member holds came from.
    public enum Source: Sendable, Equatable {
        /// This member's login, published for the fleet.
        case login
        /// Another member's publication.
        case member(String)
        /// This member's login while the database was out of reach (not yet published).
        case fallback
    }

    public enum Event: Sendable, Equatable {
        /// The daemon started holding `held` (from the state file), or nothing.
        case start(held: TokenGrant?)
        /// The core needs a token (`.startLogin(generation:)`) while holding `held`.
        case need(Need, generation: Int, held: TokenGrant?)
        /// The core cancelled the acquisition (stopping, or the account changed).
        case cancel
        case read(Result<FleetRecord, FleetLinkError>)
        /// The outcome of `.tryLock`: true when this member now holds the fleet's lock.
        case locked(Result<Bool, FleetLinkError>)
        case loginFinished(Result<TokenResponseParser.Result, LoginError>)
        /// The outcome of `.publish`: the new generation, or nil when the fence refused it.
        case published(Result<Int64?, FleetLinkError>)
        /// A member published (NOTIFY).
        case notified
        /// The link to the database came up (first connect or a reconnect) or went down.
        case connection(up: Bool)
        case tick
    }

    public enum Action: Sendable, Equatable {
        case read
        case tryLock
        /// Log in with the auth client (`fallback`: without the lock, the database out of reach).
        case login(fallback: Bool)
        /// Publish `grant` if the row's generation is still `over` (0: no row yet); `forced`: also
        /// record the fleet's forced-login time.
        case publish(TokenGrant, over: Int64, forced: Bool)
        /// Hold every member's logins until `until` (a `Retry-After`); the lock is held.
        case holdLogins(until: Date)
        case unlock
        /// The answer to the core's acquisition `generation`.
        case answer(generation: Int, Answer)
        /// A newer token than the member's own, not asked for: pushed, or found after a reconnect.
        case adopt(TokenGrant, member: String)
        case report(Report)
    }

    /// What an acquisition led to.
    public enum Answer: Sendable, Equatable {
        /// A token: logged in (`login` or `fallback`) or another member's.
        case token(TokenGrant, warnings: [String], Source)
        /// The login failed.
        case failed(LoginError)
        /// No login now: the fleet's floor or backoff holds until `until` (the token held stays).
        case deferred(until: Date, why: String)
    }

    public enum Report: Sendable, Equatable {
        case databaseUnreachable(FleetLinkError)
        case waitingForMember(until: Date)
        case fallbackLogin
        /// The row's generation moved while this member logged in: its publication was refused.
        case fenceRefused
        case published(generation: Int64)
        case unopenableRow(generation: Int64, member: String)
    }

    /// One acquisition.
    struct Job: Sendable, Equatable {
        var generation: Int
        var need: Need
        var held: TokenGrant?
    }

    /// Publishing a token of this member's own that the row lacks (5.).
    struct Share: Sendable, Equatable {
        var grant: TokenGrant
    }

    enum State: Sendable, Equatable {
        /// Nothing in flight.
        case idle
        /// A read for convergence (5.) is in flight.
        case checking
        /// Taking the lock, then reading under it, to publish `Share`.
        case sharingLocking(Share)
        case sharingRereading(Share)
        case sharingPublishing(Share)
        /// The job's first read (1.).
        case reading(Job)
        case locking(Job)
        /// Reading again with the lock held.
        case rereading(Job)
        case loggingIn(Job, lock: Lock)
        case publishing(Job, TokenResponseParser.Result)
        /// Another member holds the lock (3.).
        case waitingForMember(Job, until: Date)
        /// The database is out of reach and a lone login is not due yet (4.).
        case waitingForDatabase(Job, until: Date)
    }

    enum Lock: Sendable, Equatable {
        /// Held; the row's generation when it was read under it.
        case held(over: Int64)
        /// No lock: a lone login with the database out of reach.
        case fallback
    }

    public private(set) var settings: Settings
    private(set) var state: State = .idle
    /// The newest token this member holds (delivered, adopted or stored).
    private(set) var newest: TokenGrant?
    /// A token of this member's own that the row does not hold yet (5.).
    private(set) var unshared: TokenGrant?
    /// A convergence read is owed (a notification or a reconnect came while busy).
    private var checkOwed = false
    /// An acquisition that came while a share was in flight: it starts when the share is over.
    private var queuedJob: Job?

    public init(settings: Settings) {
        self.settings = settings
    }

    public mutating func update(_ settings: Settings) {
        self.settings = settings
    }

    // MARK: Events

    public mutating func handle(_ event: Event, now: Date) -> [Action] {
        var actions: [Action] = []
        switch event {
        case .start(let held):
            newest = held
            actions.append(contentsOf: check())
        case .need(let need, let generation, let held):
            if let held, newest.map({ isNewer(held, than: $0) }) ?? true { newest = held }
            let job = Job(generation: generation, need: need, held: held)
            switch state {
            case .idle, .checking:
                // A convergence read in flight is answered as the job's: calls complete in order.
                state = .reading(job)
                actions.append(.read)
            default:
                // A share or a publication is in flight (the core already has the token it
                // publishes): its calls complete first, and the job starts after them.
                queuedJob = job
            }
        case .cancel:
            if holdsLock { actions.append(.unlock) }
            queuedJob = nil
            state = .idle
        case .read(let result):
            read(result, now: now, &actions)
        case .locked(let result):
            locked(result, now: now, &actions)
        case .loginFinished(let result):
            loginFinished(result, now: now, &actions)
        case .published(let result):
            published(result, now: now, &actions)
        case .notified:
            switch state {
            case .waitingForMember(let job, _):
                state = .reading(job)
                actions.append(.read)
            default:
                actions.append(contentsOf: check())
            }
        case .connection(let up):
            guard up else { break }
            switch state {
            case .waitingForDatabase(let job, _):
                state = .reading(job)
                actions.append(.read)
            default:
                actions.append(contentsOf: check())
            }
        case .tick:
            switch state {
            case .waitingForMember(let job, let until) where until <= now:
                state = .reading(job)
                actions.append(.read)
            case .waitingForDatabase(let job, let until) where until <= now:
                state = .reading(job)
                actions.append(.read)
            default:
                break
            }
        }
        return actions
    }

    /// When the next tick is due (a wait ends), if one is.
    public var nextDeadline: Date? {
        switch state {
        case .waitingForMember(_, let until), .waitingForDatabase(_, let until): until
        default: nil
        }
    }

    // MARK: Transitions

    private var holdsLock: Bool {
        switch state {
        case .sharingRereading, .sharingPublishing, .rereading, .publishing, .loggingIn(_, .held): true
        default: false
        }
    }

    /// A convergence read (5.) now if nothing is in flight, else once it is over.
    private mutating func check() -> [Action] {
        guard case .idle = state else {
            checkOwed = true
            return []
        }
        checkOwed = false
        state = .checking
        return [.read]
    }

    /// Back to idle: a queued acquisition starts, else a convergence read if one is owed.
    private mutating func finish(_ actions: inout [Action]) {
        state = .idle
        if let job = queuedJob {
            queuedJob = nil
            state = .reading(job)
            actions.append(.read)
        } else if checkOwed {
            actions += check()
        }
    }

    private mutating func read(_ result: Result<FleetRecord, FleetLinkError>, now: Date, _ actions: inout [Action]) {
        switch state {
        case .checking:
            guard case .success(let record) = result else {
                finish(&actions)
                return
            }
            converge(record, now: now, &actions)
        case .sharingRereading(let share):
            guard case .success(let record) = result else {
                finish(&actions)
                return
            }
            if let grant = record.grant, !isNewer(share.grant, than: grant) {
                // A newer token arrived meanwhile: nothing to share.
                unshared = nil
                actions.append(.unlock)
                deliverPushed(record, &actions)
                finish(&actions)
                return
            }
            state = .sharingPublishing(share)
            actions.append(.publish(share.grant, over: record.generation, forced: false))
        case .reading(let job):
            switch result {
            case .failure(let error): unreachable(job, error, lockHeld: false, now: now, &actions)
            case .success(let record):
                if answerFromRecord(job, record, lockHeld: false, now: now, &actions) { return }
                state = .locking(job)
                actions.append(.tryLock)
            }
        case .rereading(let job):
            switch result {
            case .failure(let error): unreachable(job, error, lockHeld: true, now: now, &actions)
            case .success(let record):
                if answerFromRecord(job, record, lockHeld: true, now: now, &actions) { return }
                state = .loggingIn(job, lock: .held(over: record.generation))
                actions.append(.login(fallback: false))
            }
        default:
            break
        }
    }

    /// 5.: adopt a newer token, or share this member's own.
    private mutating func converge(_ record: FleetRecord, now: Date, _ actions: inout [Action]) {
        deliverPushed(record, &actions)
        if let own = unshared {
            if let grant = record.grant, !isNewer(own, than: grant) {
                unshared = nil
            } else if !own.isValid(at: now) {
                unshared = nil
            } else {
                state = .sharingLocking(Share(grant: own))
                actions.append(.tryLock)
                return
            }
        }
        finish(&actions)
    }

    /// Hands a token the row holds to the core when it is newer than the member's.
    private mutating func deliverPushed(_ record: FleetRecord, _ actions: inout [Action]) {
        if case .unopenable = record.content {
            actions.append(.report(.unopenableRow(generation: record.generation, member: record.publishedBy)))
        }
        guard let grant = record.grant, newest.map({ isNewer(grant, than: $0) }) ?? true else { return }
        newest = grant
        actions.append(.adopt(grant, member: record.publishedBy))
    }

    /// Answers the job from what the row holds, when it can (1., 6.); true when it did.
    private mutating func answerFromRecord(
        _ job: Job,
        _ record: FleetRecord,
        lockHeld: Bool,
        now: Date,
        _ actions: inout [Action]
    ) -> Bool {
        if case .unopenable = record.content {
            actions.append(.report(.unopenableRow(generation: record.generation, member: record.publishedBy)))
        }
        // Answered by the row: the lock (if held) goes first, then the answer.
        func answer(_ answer: Answer, _ actions: inout [Action]) -> Bool {
            if lockHeld { actions.append(.unlock) }
            actions.append(.answer(generation: job.generation, answer))
            finish(&actions)
            return true
        }
        if let grant = record.grant, grant.isValid(at: now), isAnswer(grant, to: job) {
            newest = grant
            return answer(.token(grant, warnings: [], .member(record.publishedBy)), &actions)
        }
        if let until = record.noLoginBefore, until > now {
            return answer(.deferred(until: until, why: "the fleet waits for the auth server's Retry-After"), &actions)
        }
        if case .forced = job.need, let last = record.lastForcedAt {
            let until = last.addingTimeInterval(settings.refresh.minForcedRefreshSeconds)
            if until > now {
                let why = "another member forced a login within the forced-refresh floor"
                return answer(.deferred(until: until, why: why), &actions)
            }
        }
        return false
    }

    /// Whether the row's token answers the job: newer than the one held (a refresh), or another
    /// than the one rejected (a forced login).
    private func isAnswer(_ grant: TokenGrant, to job: Job) -> Bool {
        switch job.need {
        case .refresh:
            guard let held = job.held else { return true }
            return isNewer(grant, than: held)
        case .forced(let rejected):
            return grant.fingerprint != rejected && job.held.map { isNewer(grant, than: $0) } ?? true
        }
    }

    private mutating func locked(_ result: Result<Bool, FleetLinkError>, now: Date, _ actions: inout [Action]) {
        switch state {
        case .sharingLocking(let share):
            switch result {
            case .success(true):
                state = .sharingRereading(share)
                actions.append(.read)
            case .success(false), .failure:
                // Another member is publishing, or the database went away: the next check retries.
                finish(&actions)
            }
        case .locking(let job):
            switch result {
            case .success(true):
                state = .rereading(job)
                actions.append(.read)
            case .success(false):
                // Never a login beside the one in flight, even without a valid token: it brings
                // the fleet's next token. The wait ends early at its publication; past the fallback
                // point (or with no valid token) it is checked every `recheckInterval`, so that a
                // holder that died (its lock gone with its session) is replaced at once.
                var until = now.addingTimeInterval(settings.peerWait)
                let recheck = now.addingTimeInterval(settings.recheckInterval)
                if let held = job.held, held.isValid(at: now) {
                    until = min(until, max(settings.fallbackAt(held), recheck))
                } else {
                    until = recheck
                }
                state = .waitingForMember(job, until: until)
                actions.append(.report(.waitingForMember(until: until)))
            case .failure(let error):
                unreachable(job, error, lockHeld: false, now: now, &actions)
            }
        default:
            // A lock taken for a step that is over (cancelled): let go of it.
            if case .success(true) = result { actions.append(.unlock) }
        }
    }

    private mutating func loginFinished(
        _ result: Result<TokenResponseParser.Result, LoginError>,
        now: Date,
        _ actions: inout [Action]
    ) {
        guard case .loggingIn(let job, let lock) = state else { return }
        switch (result, lock) {
        case (.success(let answer), .held(let over)):
            // The core takes the token now and the fleet as soon as it is published: with a provider
            // that keeps one token per user, the old one stopped working at this login.
            newest = answer.grant
            state = .publishing(job, answer)
            var forced = false
            if case .forced = job.need { forced = true }
            actions += [
                .answer(generation: job.generation, .token(answer.grant, warnings: answer.warnings, .login)),
                .publish(answer.grant, over: over, forced: forced),
            ]
        case (.success(let answer), .fallback):
            newest = answer.grant
            unshared = answer.grant
            actions.append(
                .answer(generation: job.generation, .token(answer.grant, warnings: answer.warnings, .fallback))
            )
            finish(&actions)
        case (.failure(let error), .held):
            if case .rateLimited(let retryAfter?) = error.kind {
                actions.append(.holdLogins(until: now.addingTimeInterval(retryAfter)))
            }
            actions += [.unlock, .answer(generation: job.generation, .failed(error))]
            finish(&actions)
        case (.failure(let error), .fallback):
            actions.append(.answer(generation: job.generation, .failed(error)))
            finish(&actions)
        }
    }

    private mutating func published(_ result: Result<Int64?, FleetLinkError>, now: Date, _ actions: inout [Action]) {
        switch state {
        case .sharingPublishing:
            if case .success(let generation?) = result {
                unshared = nil
                actions.append(.report(.published(generation: generation)))
            }
            actions.append(.unlock)
            finish(&actions)
        case .publishing(_, let answer):
            switch result {
            case .success(let generation?):
                actions += [.report(.published(generation: generation)), .unlock]
            case .success(nil):
                // The lock was lost and another member published: this token is offered again by
                // the next convergence read, and wins only if it is the newer (2.).
                unshared = answer.grant
                checkOwed = true
                actions += [.report(.fenceRefused), .unlock]
            case .failure(let error):
                unshared = answer.grant
                actions.append(.report(.databaseUnreachable(error)))
            }
            finish(&actions)
        default:
            break
        }
    }

    /// 4.: the database is out of reach during `job`.
    private mutating func unreachable(
        _ job: Job,
        _ error: FleetLinkError,
        lockHeld: Bool,
        now: Date,
        _ actions: inout [Action]
    ) {
        actions.append(.report(.databaseUnreachable(error)))
        // A lock held on a connection that failed is gone with it: the link drops the connection.
        if mustLogInAlone(job, now: now) {
            fallback(job, &actions)
            return
        }
        var until = now.addingTimeInterval(settings.retryInterval)
        if let held = job.held { until = min(until, settings.fallbackAt(held)) }
        state = .waitingForDatabase(job, until: until)
    }

    private mutating func fallback(_ job: Job, _ actions: inout [Action]) {
        state = .loggingIn(job, lock: .fallback)
        actions += [.report(.fallbackLogin), .login(fallback: true)]
    }

    /// Whether a member cut off from the database must log in alone: it holds no valid token, the
    /// token was reported rejected (consumers would get 401s until the fallback point; the core's
    /// forced-refresh floor bounds these logins, and with a provider that keeps one token per user
    /// each displaces the fleet's token, README "Fleet"), or the token's fallback point has passed.
    private func mustLogInAlone(_ job: Job, now: Date) -> Bool {
        guard let held = job.held, held.isValid(at: now) else { return true }
        if case .forced = job.need { return true }
        return now >= settings.fallbackAt(held)
    }

    /// `a` is a later token than `b`: another one that expires later (by this member's clock).
    private func isNewer(_ a: TokenGrant, than b: TokenGrant) -> Bool {
        a.fingerprint != b.fingerprint && a.localExpiry > b.localExpiry
    }
}

/// Why a database call did not complete.
public enum FleetLinkError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No connection (refused, TLS, authentication), or it broke.
    case unavailable(String)
    /// The call missed its deadline; the connection was dropped.
    case timedOut(seconds: Double)
    /// The database answered with an error (SQLSTATE and its message).
    case failed(String)

    public var description: String {
        switch self {
        case .unavailable(let why): "database unreachable (\(why))"
        case .timedOut(let seconds): "no answer from the database within \(FormatTime.seconds(seconds))"
        case .failed(let why): "database error (\(why))"
        }
    }
}
