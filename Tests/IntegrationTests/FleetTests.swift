import Foundation
import MockFTS
import TestSupport
import Testing
import TokenDaemon

/// Fleet mode with real parts (issue "Fleet mode"): members as separate daemons (the real binary),
/// one mock auth server for their one account, and a real PostgreSQL (`TestPostgres`). Judged from
/// the outside: logins counted at the mock, each member's token file sampled.
@Suite(.serialized, .enabled(if: TestPostgres.isInstalled, "PostgreSQL is not installed: make deps"))
struct FleetTests {
    /// 10-second tokens refreshed at half their life (5 s, jitter 0.5 s): several lifetimes in a test.
    static let ttl = 10.0
    static let refresh = DaemonHarness.Refresh(
        refreshAt: 0.5,
        minRemainingSeconds: 1,
        jitter: 0.05,
        backoffInitialSeconds: 0.2,
        backoffMaxSeconds: 1
    )

    /// `count` members of one account, each with its own folder, outputs and NOTIFY_SOCKET.
    static func members(
        _ count: Int,
        database: TestPostgres,
        ttl: TimeInterval = ttl,
        refresh: DaemonHarness.Refresh = refresh
    ) async throws -> [DaemonHarness] {
        var members: [DaemonHarness] = []
        for index in 1...count {
            let fleet = """
                "fleet": { "url": "\(database.url())", "passwordFile": "{folder}/secrets/fleet-password",
                           "caFile": "\(database.certificates.ca)", "member": "web-0\(index)" }
                """
            let member = try await DaemonHarness(
                ttl: ttl,
                refresh: refresh,
                extraConfig: fleet,
                sharingMockOf: members.first
            )
            try member.folder.write("secrets/fleet-password", database.password + "\n")
            members.append(member)
        }
        return members
    }

    /// Each member's token file, sampled every 50 ms for `seconds`: how long each new token took to
    /// reach every member, and whether any member ever had no valid token.
    struct Samples {
        var tokens: [String] = []
        /// For each token after the first: seconds from its first sighting to its last member.
        var spreads: [TimeInterval] = []
        var samples = 0
        var empty = 0
    }

    /// How often each member logged the fleet's events so far (for a failure's message).
    static func events(_ members: [DaemonHarness]) -> [String] {
        members.map { member in
            let log = member.child?.standardError ?? ""
            return ["login_ok", "fleet_adopted", "fleet_fallback_login", "fleet_unreachable", "fleet_waiting"]
                .map { "\($0)=\(log.components(separatedBy: "event=" + $0).count - 1)" }.joined(separator: " ")
        }
    }

    /// How many times the member has connected to the database.
    static func connections(_ member: DaemonHarness) -> Int {
        (member.child?.standardError ?? "").components(separatedBy: "event=fleet_connected").count - 1
    }

    static func sample(_ members: [DaemonHarness], for seconds: TimeInterval) async -> Samples {
        var result = Samples()
        var firstSeen: [String: Date] = [:]
        var everywhere: Set<String> = []
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            let now = Date()
            let held = members.map(\.token)
            result.samples += 1
            result.empty += held.filter { $0 == nil }.count
            for token in held.compactMap({ $0 }) where firstSeen[token] == nil {
                firstSeen[token] = now
                result.tokens.append(token)
            }
            if let token = held.first ?? nil, held.allSatisfy({ $0 == token }), !everywhere.contains(token) {
                everywhere.insert(token)
                if let seen = firstSeen[token], result.tokens.first != token {
                    result.spreads.append(now.timeIntervalSince(seen))
                }
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return result
    }

    @Test func threeMembersMakeOneLoginPerRefreshAndHoldOneToken() async throws {
        let database = try await TestPostgres()
        let members = try await Self.members(3, database: database)
        let mock = members[0].mock
        for member in members { try member.start() }
        for member in members { #expect(await member.waitUntilReady() != nil) }
        // Three members started at once: one logged in, the others took its token.
        #expect(await eventually { Set(members.map(\.token)).count == 1 })
        #expect(mock.stats.loginRequests == 1, "\(Self.events(members))")
        // Fleet mode adds no thread and keeps libdispatch idle: the main thread, the one event loop,
        // the notification thread (the key's thread ended with the derivation).
        for member in members {
            let pid = try #require(member.child?.pid)
            func threads() -> [String] {
                ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []).compactMap {
                    try? String(contentsOfFile: "/proc/\(pid)/task/\($0)/comm", encoding: .utf8)
                }
            }
            #expect(await eventually { threads().count == 3 }, "\(threads())")
        }

        let before = mock.stats.loginRequests
        let duration = 4 * Self.ttl
        let seen = await Self.sample(members, for: duration)
        let logins = mock.stats.loginRequests - before
        // Alone, a member logs in once per refresh period, at least every (refreshAt − jitter) × ttl:
        // at most this many in the run. Three alone would make three times as many.
        let lone = Int((duration / ((Self.refresh.refreshAt - Self.refresh.jitter) * Self.ttl)).rounded(.up)) + 1
        let slowest = seen.spreads.max() ?? 0
        let held = logins >= 1 && Double(logins) <= 1.2 * Double(lone) && seen.empty == 0 && slowest < 2
        Scenario.report(
            held,
            String(
                format: "3 members, %.0f s of %.0f-s tokens: %d logins (a lone member: up to %d), %d tokens, "
                    + "every new token on every member within %.2f s, %d of %d samples without a token",
                duration,
                Self.ttl,
                logins,
                lone,
                seen.tokens.count,
                slowest,
                seen.empty,
                seen.samples * members.count
            )
        )
        #expect(held)
        for member in members {
            member.expectNoSecretsInOutput()
            #expect(!(member.child?.allOutput.contains(database.password) ?? true), "the database's password leaked")
            await member.stop()
        }
        await mock.stop()
    }

    /// Samples each member's token every 50 ms for `seconds`: the share of samples whose token the
    /// mock's API accepts now.
    static func acceptedShare(_ members: [DaemonHarness], for seconds: TimeInterval) async -> (Double, Int) {
        let mock = members[0].mock
        var (accepted, samples) = (0, 0)
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            for member in members {
                samples += 1
                if let token = member.token, mock.accepts(token) { accepted += 1 }
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return (Double(accepted) / Double(max(samples, 1)), samples)
    }

    @Test func withAProviderThatKeepsOneTokenPerUserEveryMembersTokenStaysAccepted() async throws {
        // 20-s tokens refreshed at 16 s: each rotation revokes the token every member holds, until
        // the new one reaches them; what counts is that time against the refresh period.
        var refresh = Self.refresh
        refresh.refreshAt = 0.8
        let (ttl, duration) = (20.0, 50.0)
        // Three daemons of one account without fleet mode: each login revokes the others' tokens.
        var lone: [DaemonHarness] = []
        for _ in 0..<3 {
            lone.append(try await DaemonHarness(ttl: ttl, refresh: refresh, sharingMockOf: lone.first))
        }
        lone[0].mock.update { $0.oneTokenPerUser = true }
        for member in lone { try member.start() }
        for member in lone { #expect(await member.waitUntilReady() != nil) }
        let (loneShare, _) = await Self.acceptedShare(lone, for: 20)
        for member in lone { await member.stop() }
        await lone[0].mock.stop()

        let database = try await TestPostgres()
        let members = try await Self.members(3, database: database, ttl: ttl, refresh: refresh)
        let mock = members[0].mock
        mock.update { $0.oneTokenPerUser = true }
        for member in members { try member.start() }
        for member in members { #expect(await member.waitUntilReady() != nil) }
        #expect(await eventually { Set(members.map(\.token)).count == 1 })
        let (share, samples) = await Self.acceptedShare(members, for: duration)
        let held = share >= 0.99
        Scenario.report(
            held,
            String(
                format: "a provider that keeps one token per user, 3 members, %.0f s of %.0f-s tokens: %.1f %% of "
                    + "%d samples hold a token the API accepts (without fleet mode: %.1f %%)",
                duration,
                ttl,
                share * 100,
                samples,
                loneShare * 100
            )
        )
        #expect(held)
        for member in members { await member.stop() }
        await mock.stop()
    }

    @Test func theMemberLoggingInKilledMidLoginCostsOneMoreLoginAndNoOtherMemberGoesWithout() async throws {
        let database = try await TestPostgres()
        // 30-s tokens refreshed at 15 s: a member waiting for another's login falls back at 22 s,
        // and a 4-s login then lands well before the withdrawal at 29 s.
        var refresh = Self.refresh
        refresh.jitter = 0
        let members = try await Self.members(3, database: database, ttl: 30, refresh: refresh)
        let mock = members[0].mock
        for member in members { try member.start() }
        for member in members { #expect(await member.waitUntilReady() != nil) }
        #expect(await eventually { Set(members.map(\.token)).count == 1 })
        let first = try #require(members[0].token)

        // The next login takes 4 s; the member making it is killed in the middle of it.
        mock.always(.delay(4))
        // The member logging in for the fleet says so (every member's core starts a "login" at
        // its refresh point; only the lock's holder goes to the auth server).
        func loginsStarted(_ member: DaemonHarness) -> Int {
            (member.child?.standardError ?? "").components(separatedBy: "event=fleet_login").count - 1
        }
        let started = members.map(loginsStarted)
        #expect(await eventually(timeout: 60) { members.indices.contains { loginsStarted(members[$0]) > started[$0] } })
        let victim = try #require(members.indices.first { loginsStarted(members[$0]) > started[$0] })
        let loginsBefore = mock.stats.loginRequests
        members[victim].child?.signal(SIGKILL)
        let survivors = members.indices.filter { $0 != victim }.map { members[$0] }
        let seen = await Self.sample(survivors, for: 20)
        let tokens = Set(survivors.map(\.token))
        let replaced = tokens.count == 1 && tokens.first != first && tokens.first != nil
        let logins = mock.stats.loginRequests - loginsBefore
        let held = seen.empty == 0 && replaced && logins <= 2
        Scenario.report(
            held,
            String(
                format: "the member logging in killed mid-login (4-s logins, 30-s tokens): %d more login(s) at the "
                    + "mock after the kill, %d of %d samples of the other members without a token, one new token "
                    + "on both: %@",
                logins,
                seen.empty,
                seen.samples * survivors.count,
                replaced ? "yes" : "no"
            )
        )
        #expect(held)
        mock.always(nil)
        for member in members { await member.stop() }
        await mock.stop()
    }

    @Test func aMemberWithAWrongPasswordNeitherOpensNorReplacesTheFleetsTokenAndStopsWith78() async throws {
        let database = try await TestPostgres()
        // 10-minute tokens: no rotation of the good members' during the test.
        let members = try await Self.members(3, database: database, ttl: 600)
        let mock = members[0].mock
        // The third member's password is wrong: its key is another, and the auth server refuses it.
        try members[2].folder.write("secrets/password", "wrong-password\n")
        for member in members.prefix(2) { try member.start() }
        for member in members.prefix(2) { #expect(await member.waitUntilReady() != nil) }
        let shared = try #require(members[0].token)
        let rowBefore = try await database.psql(
            "SELECT generation, published_by FROM fts_tokend_fleet",
            database: "fts_tokend"
        )
        let loginsBefore = mock.stats.loginRequests

        let bad = try members[2].start()
        let status = await bad.waitForExit(timeout: 60)
        let rowAfter = try await database.psql(
            "SELECT generation, published_by FROM fts_tokend_fleet",
            database: "fts_tokend"
        )
        let badLogins = mock.stats.loginRequests - loginsBefore
        let unopenable = bad.standardError.contains("event=fleet_unopenable")
        let held = status == 78 && badLogins == 1 && rowAfter == rowBefore && unopenable
        Scenario.report(
            held,
            "a member with a wrong password: exit \(status.map(String.init) ?? "none"), \(badLogins) login(s), "
                + "the row unchanged: \(rowAfter == rowBefore), the fleet's token unopened: \(unopenable)"
        )
        #expect(held)
        // The others still share the token they had.
        #expect(members[0].token == shared && members[1].token == shared)
        for member in members { await member.stop() }
        await mock.stop()
    }

    @Test func aDatabaseCrashCostsAtMostOneLoginPerMemberPerLifetimeAndTheFleetConverges() async throws {
        let database = try await TestPostgres()
        let members = try await Self.members(3, database: database)
        let mock = members[0].mock
        for member in members { try member.start() }
        for member in members {
            let ready = await member.waitUntilReady() != nil
            #expect(ready, "not ready; its log ends: \((member.child?.standardError ?? "").suffix(20000).prefix(6000))")
        }
        #expect(await eventually { Set(members.map(\.token)).count == 1 })

        try await database.kill()
        let before = mock.stats.loginRequests
        let outage = 3 * Self.ttl
        let during = await Self.sample(members, for: outage)
        let outageLogins = mock.stats.loginRequests - before
        // Each member keeps its token and logs in alone once per token, late in its life: halfway
        // between its refresh point (5 s) and its withdrawal (9 s), so every 7 s. Alone, each
        // would log in every 4.5 to 5 s.
        let fallbackEvery = 7.0
        let bound = members.count * (Int((outage / fallbackEvery).rounded(.up)) + 1)

        let connections = members.map(Self.connections)
        try await database.start()
        let back = Date()
        // Every member back on the database (each reconnects within 10 s), on one token.
        let converged = await eventually(timeout: 60) {
            members.indices.allSatisfy { Self.connections(members[$0]) > connections[$0] }
                && Set(members.map(\.token)).count == 1
        }
        let convergedAfter = Date().timeIntervalSince(back)
        let afterwards = await Self.sample(members, for: 3 * Self.ttl)
        let held =
            during.empty == 0 && outageLogins <= bound && converged && afterwards.empty == 0
            && afterwards.spreads.allSatisfy { $0 < 2 }
        Scenario.report(
            held,
            String(
                format: "database killed for %.0f s under 3 members: %d logins (bound %d), %d of %d samples "
                    + "without a token; back: one token on every member %.2f s later, then new tokens everywhere "
                    + "within %.2f s",
                outage,
                outageLogins,
                bound,
                during.empty,
                during.samples * members.count,
                convergedAfter,
                afterwards.spreads.max() ?? 0
            )
        )
        #expect(held)
        for member in members { await member.stop() }
        await mock.stop()
    }
}
