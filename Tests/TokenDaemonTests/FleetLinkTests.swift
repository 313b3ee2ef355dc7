import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TestSupport
import Testing

@testable import TokenDaemon

/// `FleetLink` against a real PostgreSQL (`TestPostgres`): the table, the lock, the fenced
/// publication, the notification, the seal as the database holds it, and the deadlines when the
/// database dies.
@Suite(.serialized, .enabled(if: TestPostgres.isInstalled, "PostgreSQL is not installed: make deps"))
struct FleetLinkTests {
    static let secrets = LoginSecrets(email: "svc@example.com", password: "pw-fleet-link", apiKey: "key-fleet-link")
    static let seal = try! FleetSeal(secrets: secrets, baseURL: "https://auth.example", cost: FleetSealTests.cheap)

    /// One member's link and the events it delivered.
    final class Member: Sendable {
        let link: FleetLink
        private let events = NIOLockedValueBox<[FleetCoordinator.Event]>([])

        /// `trusting`: the CA file (default: the test server's CA).
        init(
            _ database: TestPostgres,
            name: String,
            seal: FleetSeal = FleetLinkTests.seal,
            trusting caFile: String?? = .none
        ) throws {
            let url = try DatabaseURL(database.url(), at: "fleet.url")
            let box = events
            link = try FleetLink(
                settings: .init(
                    url: url,
                    password: database.password,
                    caFile: caFile ?? database.certificates.ca,
                    member: name
                ),
                seal: seal,
                loop: MultiThreadedEventLoopGroup.singleton.next(),
                logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }),
                clock: { Date() },
                deliver: { event in box.withLockedValue { $0.append(event) } }
            )
            link.start()
        }

        deinit { _ = link.stop() }

        /// Waits for the first event not yet taken that `matches`, and takes every event up to it.
        func next(
            timeout: TimeInterval = 30,
            _ matches: (FleetCoordinator.Event) -> Bool
        ) async -> FleetCoordinator.Event? {
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                let found = events.withLockedValue { events -> FleetCoordinator.Event? in
                    guard let index = events.firstIndex(where: matches) else { return nil }
                    defer { events.removeFirst(index + 1) }
                    return events[index]
                }
                if let found { return found }
                try? await Task.sleep(for: .milliseconds(10))
            }
            return nil
        }

        func up() async -> Bool { await next { $0 == .connection(up: true) } != nil }

        func readResult() async -> Result<FleetRecord, FleetLinkError>? {
            link.perform(.read)
            guard case .read(let result)? = await next({ if case .read = $0 { true } else { false } }) else {
                return nil
            }
            return result
        }

        func read() async -> FleetRecord? {
            guard case .success(let record)? = await readResult() else { return nil }
            return record
        }

        func tryLock() async -> Result<Bool, FleetLinkError>? {
            link.perform(.tryLock)
            guard case .locked(let result)? = await next({ if case .locked = $0 { true } else { false } }) else {
                return nil
            }
            return result
        }

        /// Tries the lock until it is taken (another member may still be letting go of it).
        func takeLock(timeout: TimeInterval = 30) async -> Bool {
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                if await tryLock() == .success(true) { return true }
                try? await Task.sleep(for: .milliseconds(20))
            }
            return false
        }

        func publish(_ grant: TokenGrant, over: Int64, forced: Bool = false) async -> Result<Int64?, FleetLinkError>? {
            link.perform(.publish(grant, over: over, forced: forced))
            guard case .published(let result)? = await next({ if case .published = $0 { true } else { false } }) else {
                return nil
            }
            return result
        }
    }

    func grant(_ token: String, lifetime: TimeInterval = 3600) -> TokenGrant {
        let now = Date()
        return TokenGrant(
            token: token,
            expiresAt: now.addingTimeInterval(lifetime),
            obtainedAt: now,
            userId: "u-1",
            tenantId: nil,
            clockSkew: 0
        )
    }

    @Test func membersShareOneTokenThroughTheLockTheFenceAndANotification() async throws {
        let database = try await TestPostgres()
        let first = try Member(database, name: "web-01")
        let second = try Member(database, name: "web-02")
        #expect(await first.up())
        #expect(await second.up())
        // The first connect created the table; nothing is published yet.
        #expect(await first.read() == FleetRecord(generation: 0, content: .empty, publishedBy: ""))

        #expect(await first.tryLock() == .success(true))
        #expect(await second.tryLock() == .success(false))
        let token = grant("eyJ.fleet-shared.sig")
        #expect(await first.publish(token, over: 0) == .success(1))
        #expect(await second.next { $0 == .notified } != nil)
        let seen = try #require(await second.read())
        #expect(seen.generation == 1 && seen.publishedBy == "web-01")
        let adopted = try #require(seen.grant)
        #expect(adopted.fingerprint == token.fingerprint)
        // The expiry travelled through the database's clock: within a second of the publisher's.
        #expect(abs(adopted.localExpiry.timeIntervalSince(token.localExpiry)) < 1)

        // The fence: a publication over a generation that moved is refused and changes nothing.
        #expect(await second.publish(grant("eyJ.stale.sig"), over: 0) == .success(nil))
        #expect(await first.read()?.grant?.fingerprint == token.fingerprint)
        // Let go (a call on the first member's connection; nothing to wait for): the second
        // member's next tries take it.
        first.link.perform(.unlock)
        #expect(await second.takeLock())
    }

    @Test func theDatabaseHoldsNoTokenNoFingerprintNoPassword() async throws {
        let database = try await TestPostgres()
        let member = try Member(database, name: "web-01")
        #expect(await member.up())
        let token = grant("eyJ.secret-in-the-fleet.sig")
        #expect(await member.publish(token, over: 0) == .success(1))
        let dump = try await database.psql(
            "SELECT row_to_json(f)::text FROM fts_tokend_fleet f",
            database: "fts_tokend"
        )
        #expect(dump.contains("web-01"), "the row is there")
        for secret in [
            token.token, "secret-in-the-fleet", token.fingerprint, Self.secrets.password, Self.secrets.apiKey,
        ] {
            #expect(!dump.contains(secret), "the row holds a secret or its fingerprint")
        }
    }

    @Test func aRowSealedWithAnotherPasswordDoesNotOpen() async throws {
        let database = try await TestPostgres()
        var other = Self.secrets
        other.password = "another-password"
        let foreignSeal = try FleetSeal(secrets: other, baseURL: "https://auth.example", cost: FleetSealTests.cheap)
        let foreign = try Member(database, name: "web-07", seal: foreignSeal)
        let member = try Member(database, name: "web-01")
        #expect(await foreign.up())
        #expect(await member.up())
        #expect(await foreign.publish(grant("eyJ.foreign.sig"), over: 0) == .success(1))
        #expect(await member.read() == FleetRecord(generation: 1, content: .unopenable, publishedBy: "web-07"))
    }

    @Test func aKilledDatabaseFailsCallsAtOnceAndTheLinkComesBackWhenItDoes() async throws {
        let database = try await TestPostgres()
        let member = try Member(database, name: "web-01")
        #expect(await member.up())
        #expect(await member.tryLock() == .success(true))
        try await database.kill()
        #expect(await member.next { $0 == .connection(up: false) } != nil)
        // Disconnected: a call fails at once rather than waiting.
        #expect(await member.readResult() == .failure(.unavailable("not connected")))
        try await database.start()
        #expect(await member.up())
        // The lock died with the session (killed, so the session is gone): another member takes it.
        let other = try Member(database, name: "web-02")
        #expect(await other.up())
        #expect(await other.tryLock() == .success(true))
    }

    @Test func aServerCertificateNoTrustedCASignedIsRefused() async throws {
        let database = try await TestPostgres()
        // verify-full without the test CA: the system's roots do not know it, so no connection.
        let member = try Member(database, name: "web-01", trusting: .some(nil))
        #expect(await member.next(timeout: 3) { $0 == .connection(up: true) } == nil)
        let read = await member.readResult()
        #expect(read == .failure(.unavailable("not connected")))
    }
}
