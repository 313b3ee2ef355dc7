import Foundation
import Testing

@testable import TokenDaemon

/// The fleet protocol of one member, transition by transition (`FleetCoordinator`'s numbered
/// guarantees), with an injected clock.
@Suite struct FleetCoordinatorTests {
    typealias Coordinator = FleetCoordinator
    let start = Date(timeIntervalSince1970: 2_000_000_000)

    /// A one-hour token obtained `age` seconds before `start`.
    func grant(_ name: String, age: TimeInterval = 0, lifetime: TimeInterval = 3600) -> TokenGrant {
        TokenGrant(
            token: "\(name).payload.signature",
            expiresAt: start.addingTimeInterval(lifetime - age),
            obtainedAt: start.addingTimeInterval(-age),
            userId: nil,
            tenantId: nil,
            clockSkew: 0
        )
    }

    func coordinator(holding held: TokenGrant? = nil) -> Coordinator {
        var coordinator = Coordinator(
            settings: .init(refresh: Configuration.Refresh.defaults, loginTimeout: 30)
        )
        _ = coordinator.handle(.start(held: held), now: start)
        _ = coordinator.handle(.read(.failure(.unavailable("not yet"))), now: start)
        return coordinator
    }

    func row(_ generation: Int64, _ grant: TokenGrant?, by member: String = "web-02") -> FleetRecord {
        FleetRecord(generation: generation, content: grant.map { .token($0) } ?? .empty, publishedBy: member)
    }

    /// A member holding `held` whose acquisition found the row at generation 4 holding the same
    /// token, took the lock, read again and is now logging in.
    func loggingIn(
        holding held: TokenGrant,
        need: Coordinator.Need = .refresh,
        generation: Int = 1
    ) -> Coordinator {
        var member = coordinator(holding: held)
        _ = member.handle(.need(need, generation: generation, held: held), now: start)
        _ = member.handle(.read(.success(row(4, held))), now: start)
        _ = member.handle(.locked(.success(true)), now: start)
        _ = member.handle(.read(.success(row(4, held))), now: start)
        return member
    }

    func login(_ grant: TokenGrant) -> Result<TokenResponseParser.Result, LoginError> {
        .success(.init(grant: grant, warnings: []))
    }

    // MARK: 1. One login per lifetime

    @Test func aNewerTokenInTheRowIsAdoptedWithNoLogin() {
        let held = grant("old", age: 2900)
        var member = coordinator(holding: held)
        let now = start
        #expect(member.handle(.need(.refresh, generation: 1, held: held), now: now) == [.read])
        let newer = grant("new", age: 10)
        #expect(
            member.handle(.read(.success(row(4, newer))), now: now) == [
                .answer(generation: 1, .token(newer, warnings: [], .member("web-02")))
            ]
        )
        #expect(member.state == .idle)
    }

    @Test func theSameTokenInTheRowTakesTheLockReadsAgainLogsInPublishesAndLetsGo() {
        let held = grant("old", age: 2900)
        var member = coordinator(holding: held)
        #expect(member.handle(.need(.refresh, generation: 1, held: held), now: start) == [.read])
        #expect(member.handle(.read(.success(row(4, held))), now: start) == [.tryLock])
        #expect(member.handle(.locked(.success(true)), now: start) == [.read])
        #expect(member.handle(.read(.success(row(4, held))), now: start) == [.login(fallback: false)])
        let fresh = grant("fresh")
        // The core takes it at once; the fleet as soon as it is published.
        #expect(
            member.handle(.loginFinished(login(fresh)), now: start) == [
                .answer(generation: 1, .token(fresh, warnings: [], .login)), .publish(fresh, over: 4, forced: false),
            ]
        )
        #expect(member.handle(.published(.success(5)), now: start) == [.report(.published(generation: 5)), .unlock])
        #expect(member.state == .idle)
    }

    @Test func theFirstMemberOfAFleetPublishesOverGenerationZero() {
        var member = coordinator()
        #expect(member.handle(.need(.refresh, generation: 0, held: nil), now: start) == [.read])
        #expect(member.handle(.read(.success(row(0, nil))), now: start) == [.tryLock])
        #expect(member.handle(.locked(.success(true)), now: start) == [.read])
        #expect(member.handle(.read(.success(row(0, nil))), now: start) == [.login(fallback: false)])
        let fresh = grant("fresh")
        #expect(
            member.handle(.loginFinished(login(fresh)), now: start) == [
                .answer(generation: 0, .token(fresh, warnings: [], .login)), .publish(fresh, over: 0, forced: false),
            ]
        )
    }

    @Test func aTokenPublishedBetweenTheReadAndTheLockIsAdoptedAndTheLockLetGo() {
        let held = grant("old", age: 2900)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        _ = member.handle(.read(.success(row(4, held))), now: start)
        _ = member.handle(.locked(.success(true)), now: start)
        let newer = grant("new", age: 1)
        #expect(
            member.handle(.read(.success(row(5, newer))), now: start) == [
                .unlock, .answer(generation: 1, .token(newer, warnings: [], .member("web-02"))),
            ]
        )
    }

    @Test func aFailedLoginLetsGoOfTheLockAndIsTheCoresToRetry() {
        let held = grant("old", age: 2900)
        var member = loggingIn(holding: held)
        let error = LoginError.httpStatus(502, retryAfter: nil)
        #expect(
            member.handle(.loginFinished(.failure(error)), now: start) == [
                .unlock, .answer(generation: 1, .failed(error)),
            ]
        )
    }

    // MARK: 2. Fencing

    @Test func aPublicationTheFenceRefusesIsOfferedAgainOnlyIfItIsTheNewer() {
        let held = grant("old", age: 2900)
        var member = loggingIn(holding: held)
        let mine = grant("mine")
        _ = member.handle(.loginFinished(login(mine)), now: start)
        // Paused past its lock: another member published generation 5 meanwhile.
        #expect(member.handle(.published(.success(nil)), now: start) == [.report(.fenceRefused), .unlock, .read])
        // Theirs is older than mine (they logged in first): mine is offered under the lock.
        let theirs = grant("theirs", age: 5)
        #expect(member.handle(.read(.success(row(5, theirs))), now: start) == [.tryLock])
        #expect(member.handle(.locked(.success(true)), now: start) == [.read])
        #expect(member.handle(.read(.success(row(5, theirs))), now: start) == [.publish(mine, over: 5, forced: false)])
        #expect(member.handle(.published(.success(6)), now: start) == [.report(.published(generation: 6)), .unlock])
        #expect(member.unshared == nil)
    }

    @Test func aPausedMembersOlderTokenNeverReplacesANewerOne() {
        let held = grant("old", age: 2900)
        var member = loggingIn(holding: held)
        let mine = grant("mine", age: 60)
        _ = member.handle(.loginFinished(login(mine)), now: start)
        _ = member.handle(.published(.success(nil)), now: start)
        // The row's token is newer than mine: it is adopted, mine is dropped, nothing is published.
        let newer = grant("newer", age: 1)
        #expect(member.handle(.read(.success(row(5, newer))), now: start) == [.adopt(newer, member: "web-02")])
        #expect(member.unshared == nil)
        #expect(member.state == .idle)
    }

    // MARK: 3. A busy lock

    @Test func aBusyLockWaitsForTheOtherMembersPublication() {
        let held = grant("old", age: 2900)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        _ = member.handle(.read(.success(row(4, held))), now: start)
        let until = start.addingTimeInterval(35)
        #expect(member.handle(.locked(.success(false)), now: start) == [.report(.waitingForMember(until: until))])
        #expect(member.nextDeadline == until)
        #expect(member.handle(.tick, now: start.addingTimeInterval(1)) == [])
        #expect(member.handle(.notified, now: start.addingTimeInterval(2)) == [.read])
        let newer = grant("new")
        #expect(
            member.handle(.read(.success(row(5, newer))), now: start.addingTimeInterval(2)) == [
                .answer(generation: 1, .token(newer, warnings: [], .member("web-02")))
            ]
        )
    }

    @Test func aBusyLockWhoseHolderNeverPublishesIsTriedAgainAfterTheWait() {
        let held = grant("old", age: 2900)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        _ = member.handle(.read(.success(row(4, held))), now: start)
        _ = member.handle(.locked(.success(false)), now: start)
        #expect(member.handle(.tick, now: start.addingTimeInterval(35)) == [.read])
        #expect(member.handle(.read(.success(row(4, held))), now: start.addingTimeInterval(35)) == [.tryLock])
    }

    @Test func aBusyLockIsWaitedForEvenPastTheFallbackPointOrWithNoToken() {
        // 3,300 s into a one-hour token: past the fallback point (3,240 s). The database is
        // reachable and another member is logging in: its token is the one to wait for.
        let held = grant("old", age: 3300)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        _ = member.handle(.read(.success(row(4, held))), now: start)
        // It checks every second (a holder that died let go of the lock with its session).
        let recheck = start.addingTimeInterval(1)
        #expect(member.handle(.locked(.success(false)), now: start) == [.report(.waitingForMember(until: recheck))])
        #expect(member.handle(.tick, now: recheck) == [.read])
        #expect(member.handle(.read(.success(row(4, held))), now: recheck) == [.tryLock])
        #expect(member.handle(.locked(.success(true)), now: recheck) == [.read])
        // A member starting with no token, the others starting with it, waits too.
        var newcomer = coordinator()
        _ = newcomer.handle(.need(.refresh, generation: 0, held: nil), now: start)
        _ = newcomer.handle(.read(.success(row(0, nil))), now: start)
        #expect(newcomer.handle(.locked(.success(false)), now: start) == [.report(.waitingForMember(until: recheck))])
    }

    // MARK: 4. The database out of reach

    @Test func anUnreachableDatabaseKeepsTheTokenUntilTheFallbackPointThenOneLoneLogin() {
        let held = grant("old", age: 2880)
        var member = coordinator(holding: held)
        let fallbackAt = member.settings.fallbackAt(held)
        // Halfway between the refresh point (now) and the withdrawal (719 s on).
        #expect(fallbackAt == start.addingTimeInterval(359.5))
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        let down = FleetLinkError.timedOut(seconds: 5)
        #expect(member.handle(.read(.failure(down)), now: start) == [.report(.databaseUnreachable(down))])
        #expect(member.nextDeadline == start.addingTimeInterval(5))
        // Tried again every 5 s; never a login before the fallback point.
        var now = start
        var logins = 0
        while now < fallbackAt {
            now = member.nextDeadline ?? now.addingTimeInterval(1)
            for action in member.handle(.tick, now: now) {
                if case .login = action { logins += 1 }
                if action == .read {
                    for next in member.handle(.read(.failure(down)), now: now) {
                        if case .login = next { logins += 1 }
                    }
                }
            }
            if logins > 0 { break }
        }
        #expect(logins == 1)
        #expect(now == fallbackAt)
        let lone = grant("lone", age: -(now.timeIntervalSince(start)))
        #expect(
            member.handle(.loginFinished(login(lone)), now: now) == [
                .answer(generation: 1, .token(lone, warnings: [], .fallback))
            ]
        )
        #expect(member.unshared == lone)
        // 5. The database is back: the row holds the token this member had; its own is newer and
        // is published under the lock.
        #expect(member.handle(.connection(up: true), now: now) == [.read])
        #expect(member.handle(.read(.success(row(4, held))), now: now) == [.tryLock])
        #expect(member.handle(.locked(.success(true)), now: now) == [.read])
        #expect(member.handle(.read(.success(row(4, held))), now: now) == [.publish(lone, over: 4, forced: false)])
    }

    @Test func noTokenAndNoDatabaseLogsInAtOnce() {
        var member = coordinator()
        _ = member.handle(.need(.refresh, generation: 0, held: nil), now: start)
        let down = FleetLinkError.unavailable("connection refused")
        #expect(
            member.handle(.read(.failure(down)), now: start) == [
                .report(.databaseUnreachable(down)), .report(.fallbackLogin), .login(fallback: true),
            ]
        )
    }

    @Test func aReportedTokenWithTheDatabaseOutOfReachLogsInAlone() {
        let held = grant("old", age: 60)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.forced(rejected: held.fingerprint), generation: 2, held: held), now: start)
        let down = FleetLinkError.unavailable("connection refused")
        #expect(
            member.handle(.read(.failure(down)), now: start) == [
                .report(.databaseUnreachable(down)), .report(.fallbackLogin), .login(fallback: true),
            ]
        )
    }

    @Test func aReconnectWhileWaitingForTheDatabaseReadsAtOnce() {
        let held = grant("old", age: 2880)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        _ = member.handle(.read(.failure(.timedOut(seconds: 5))), now: start)
        #expect(member.handle(.connection(up: true), now: start.addingTimeInterval(1)) == [.read])
    }

    @Test func theLockLostWithTheConnectionMidLoginStillDeliversTheToken() {
        let held = grant("old", age: 2900)
        var member = loggingIn(holding: held)
        let mine = grant("mine")
        _ = member.handle(.loginFinished(login(mine)), now: start)
        let down = FleetLinkError.unavailable("server closed the connection")
        #expect(member.handle(.published(.failure(down)), now: start) == [.report(.databaseUnreachable(down))])
        #expect(member.unshared == mine)
    }

    // MARK: 5. Pushed publications

    @Test func aPushedNewerTokenIsAdoptedAndAnOlderOrTheSameIsNot() {
        let held = grant("old", age: 100)
        var member = coordinator(holding: held)
        #expect(member.handle(.notified, now: start) == [.read])
        #expect(member.handle(.read(.success(row(4, held))), now: start) == [])
        #expect(member.handle(.notified, now: start) == [.read])
        let older = grant("older", age: 200)
        #expect(member.handle(.read(.success(row(3, older))), now: start) == [])
        #expect(member.handle(.notified, now: start) == [.read])
        let newer = grant("newer", age: 1)
        #expect(member.handle(.read(.success(row(5, newer))), now: start) == [.adopt(newer, member: "web-02")])
    }

    @Test func aNotificationDuringAnAcquisitionIsReadOnceItIsOver() {
        let held = grant("old", age: 2900)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        #expect(member.handle(.notified, now: start) == [])
        let newer = grant("new")
        #expect(
            member.handle(.read(.success(row(5, newer))), now: start) == [
                .answer(generation: 1, .token(newer, warnings: [], .member("web-02"))), .read,
            ]
        )
    }

    @Test func aRowSealedWithAnotherKeyIsReportedAndNeverAdopted() {
        let held = grant("old", age: 2900)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        let foreign = FleetRecord(generation: 9, content: .unopenable, publishedBy: "web-07")
        #expect(
            member.handle(.read(.success(foreign)), now: start) == [
                .report(.unopenableRow(generation: 9, member: "web-07")), .tryLock,
            ]
        )
    }

    // MARK: 6. Fleet-wide floor and backoff

    @Test func aForcedLoginWithinTheFleetsFloorIsDeferred() {
        let held = grant("old", age: 60)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.forced(rejected: held.fingerprint), generation: 2, held: held), now: start)
        var record = row(4, held)
        record.lastForcedAt = start.addingTimeInterval(-10)
        #expect(
            member.handle(.read(.success(record)), now: start) == [
                .answer(
                    generation: 2,
                    .deferred(
                        until: start.addingTimeInterval(20),
                        why: "another member forced a login within the forced-refresh floor"
                    )
                )
            ]
        )
    }

    @Test func aForcedLoginAfterAnotherMemberReplacedTheRejectedTokenAdoptsItsToken() {
        let held = grant("old", age: 60)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.forced(rejected: held.fingerprint), generation: 2, held: held), now: start)
        let replacement = grant("replacement", age: 5)
        var record = row(5, replacement)
        record.lastForcedAt = start.addingTimeInterval(-5)
        #expect(
            member.handle(.read(.success(record)), now: start) == [
                .answer(generation: 2, .token(replacement, warnings: [], .member("web-02")))
            ]
        )
    }

    @Test func aForcedLoginPublishesItsTime() {
        let held = grant("old", age: 60)
        var member = loggingIn(holding: held, need: .forced(rejected: held.fingerprint), generation: 2)
        let fresh = grant("fresh")
        #expect(
            member.handle(.loginFinished(login(fresh)), now: start) == [
                .answer(generation: 2, .token(fresh, warnings: [], .login)), .publish(fresh, over: 4, forced: true),
            ]
        )
    }

    @Test func aRetryAfterHoldsEveryMembersLogins() {
        let held = grant("old", age: 2900)
        var member = loggingIn(holding: held)
        let limited = LoginError.httpStatus(429, retryAfter: 600)
        #expect(
            member.handle(.loginFinished(.failure(limited)), now: start) == [
                .holdLogins(until: start.addingTimeInterval(600)), .unlock, .answer(generation: 1, .failed(limited)),
            ]
        )
        // Another member at its refresh point waits too, with no login.
        var other = coordinator(holding: held)
        _ = other.handle(.need(.refresh, generation: 7, held: held), now: start.addingTimeInterval(30))
        var record = row(4, held)
        record.noLoginBefore = start.addingTimeInterval(600)
        #expect(
            other.handle(.read(.success(record)), now: start.addingTimeInterval(30)) == [
                .answer(
                    generation: 7,
                    .deferred(
                        until: start.addingTimeInterval(600),
                        why: "the fleet waits for the auth server's Retry-After"
                    )
                )
            ]
        )
    }

    @Test func aRejectedLoginDoesNotHoldTheFleet() {
        let held = grant("old", age: 2900)
        var member = loggingIn(holding: held)
        let rejected = LoginError.httpStatus(401, retryAfter: nil)
        #expect(
            member.handle(.loginFinished(.failure(rejected)), now: start) == [
                .unlock, .answer(generation: 1, .failed(rejected)),
            ]
        )
    }

    @Test func aNeedWhileAPublicationIsInFlightStartsOnceItIsOver() {
        let held = grant("old", age: 2900)
        var member = loggingIn(holding: held)
        let fresh = grant("fresh")
        _ = member.handle(.loginFinished(login(fresh)), now: start)
        // The core, holding the new token, is told it was rejected before the publication is back.
        #expect(
            member.handle(.need(.forced(rejected: fresh.fingerprint), generation: 2, held: fresh), now: start) == []
        )
        #expect(
            member.handle(.published(.success(5)), now: start) == [.report(.published(generation: 5)), .unlock, .read]
        )
        #expect(member.state == .reading(.init(generation: 2, need: .forced(rejected: fresh.fingerprint), held: fresh)))
    }

    // MARK: Cancellation

    @Test func aCancelledAcquisitionLetsGoOfItsLockEvenOneGrantedLate() {
        let held = grant("old", age: 2900)
        var member = coordinator(holding: held)
        _ = member.handle(.need(.refresh, generation: 1, held: held), now: start)
        _ = member.handle(.read(.success(row(4, held))), now: start)
        _ = member.handle(.locked(.success(true)), now: start)
        #expect(member.handle(.cancel, now: start) == [.unlock])
        // Cancelled while the lock was being taken: granted after the cancel, let go at once.
        _ = member.handle(.need(.refresh, generation: 2, held: held), now: start)
        _ = member.handle(.read(.success(row(4, held))), now: start)
        #expect(member.handle(.cancel, now: start) == [])
        #expect(member.handle(.locked(.success(true)), now: start) == [.unlock])
    }
}

/// The core's side of fleet mode: another member's token as an answer or pushed, and a deferral.
@Suite struct DaemonCoreFleetTests {
    /// A driver whose first token came from its own login, now at its refresh point with a login
    /// (a fleet acquisition) in flight.
    func atRefresh() -> (CoreDriver, generation: Int) {
        var driver = CoreDriver(CoreFixtures.configuration(stateFile: "/var/lib/fts/state.json"))
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        driver.advance(3000)
        return (driver, driver.loginInFlight ?? -1)
    }

    @Test func anotherMembersTokenAnswersTheLoginAndIsWrittenSavedAndRotated() {
        var (driver, generation) = atRefresh()
        #expect(generation >= 0)
        let theirs = driver.grant(token: "their.token.sig")
        let actions = driver.send(.fleetToken(generation: generation, theirs, member: "web-02"))
        #expect(actions.contains(.report(.fleetTokenAdopted(theirs, member: "web-02", pushed: false))))
        #expect(actions.contains { if case .writeFiles(let request) = $0 { request.grant == theirs } else { false } })
        #expect(actions.contains(.saveState(theirs)))
        #expect(actions.contains(.runRotateActions(theirs)))
        #expect(driver.core.holding.grant == theirs && driver.loginInFlight == nil)
        // An answer to another acquisition is dropped.
        #expect(
            driver.send(.fleetToken(generation: generation, driver.grant(token: "late.token.sig"), member: "x")) == []
        )
    }

    @Test func aPushedTokenIsTakenBetweenLoginsOnlyWhenNewer() {
        var driver = CoreDriver()
        driver.send(.start(stored: nil))
        driver.loginSucceeds()
        driver.advance(60)
        let held = driver.core.holding.grant
        // Older (it expires first): ignored.
        let older = TokenGrant(
            token: "older.token.sig",
            expiresAt: driver.now.addingTimeInterval(100),
            obtainedAt: driver.now,
            userId: nil,
            tenantId: nil,
            clockSkew: 0
        )
        #expect(driver.send(.fleetToken(generation: nil, older, member: "web-02")) == [])
        #expect(driver.core.holding.grant == held)
        // Newer: taken, with no login.
        let newer = driver.grant(token: "newer.token.sig")
        let actions = driver.send(.fleetToken(generation: nil, newer, member: "web-02"))
        #expect(actions.contains(.report(.fleetTokenAdopted(newer, member: "web-02", pushed: true))))
        #expect(actions.logins.isEmpty)
        #expect(driver.core.holding.grant == newer)
    }

    @Test func aPushedTokenDuringALoginIsLeftToTheFleetsAnswer() {
        var (driver, _) = atRefresh()
        let held = driver.core.holding.grant
        #expect(driver.send(.fleetToken(generation: nil, driver.grant(token: "pushed.token.sig"), member: "w")) == [])
        #expect(driver.core.holding.grant == held)
    }

    @Test func aDeferralWaitsUntilItsInstantWithNoLogin() {
        var (driver, generation) = atRefresh()
        let until = driver.now.addingTimeInterval(20)
        let actions = driver.send(.fleetDeferred(generation: generation, until: until, why: "floor"))
        #expect(actions.contains(.report(.fleetDeferred(until: until, why: "floor"))))
        #expect(driver.loginInFlight == nil)
        #expect(driver.advance(19).logins.isEmpty)
        #expect(driver.advance(1).logins.count == 1)
    }
}
