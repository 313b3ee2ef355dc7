import Logging
import NIOCore
import NIOPosix
import NIOSSL
import PostgresNIO

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A member's one connection to the fleet's database: performs `FleetCoordinator`'s database
/// actions and hands their outcomes, the notifications and the connection's ups and downs back as
/// coordinator events (README "Fleet"; `../shared/postgres-notes.md` has the measured pitfalls).
///
/// What the coordinator can rely on:
/// 1. **One connection**, made on the daemon's loop over a channel of our own with TCP keepalives
///    (idle 5 s, 2 probes 2 s apart, `TCP_USER_TIMEOUT` 9 s): a silent partition is noticed in
///    about 9 s, where a plain connection hangs. No pool: a member makes a handful of calls per token
///    lifetime, and postgres-nio's pool waits for a connection instead of failing while the database
///    is down.
/// 2. **Every call has a deadline** (`callTimeout`). A call that misses it fails as `.timedOut` and
///    the connection is closed: postgres-nio never completes a call on a dead connection, and a
///    lock the member held on it is released by the server with the session. No call is sent on a
///    closed connection; a call made while disconnected fails at once as `.unavailable`. A
///    connection attempt as a whole (TCP, TLS, authentication, the table, LISTEN) has a deadline
///    of twice `connectTimeout`.
/// 3. **Calls complete in the order they were made** (one connection, and PostgreSQL answers in
///    order); the coordinator depends on it.
/// 4. **After every connect**, the table exists (created when absent and the role may: README
///    "Fleet" gives the SQL for DBAs who create it themselves), LISTEN is on, and only then
///    `.connection(up: true)` goes out, on which the coordinator reads the row: notifications sent
///    while the connection was down are lost.
/// 5. **Reconnects** after a failure or a close, 1, 2, 4, 8 then every 10 s (each drawn from half
///    to all of that), on the loop's timer (no Swift task sleeps: README "Threads and idle cost").
/// 6. **The database never holds a usable token**: rows are sealed and opened with `FleetSeal`; a
///    row that does not open is `.unopenable`, never served.
///
/// Every stored property is used on `loop` only (each entry point hops there): the class is
/// `@unchecked Sendable` for that reason alone.
final class FleetLink: @unchecked Sendable {
    struct Settings: Sendable {
        var url: DatabaseURL
        var password: String?
        var caFile: String?
        var member: String
        var callTimeout: TimeAmount = .seconds(5)
        var connectTimeout: TimeAmount = .seconds(5)
    }

    /// The table and the NOTIFY channel: one of each per database, shared by every account.
    static let table = "fts_tokend_fleet"
    static let channel = "fts_tokend_fleet"
    /// The advisory lock's first key, `fts ` in ASCII: advisory keys share one namespace per database
    /// with every other application; the second key is drawn from the account.
    static let lockClass: Int32 = 0x6674_7320

    /// The SQL that creates the table (README "Fleet" shows it to DBAs).
    static let createTable = """
        CREATE TABLE IF NOT EXISTS \(table) (
            account          text PRIMARY KEY,
            generation       bigint NOT NULL,
            sealed           bytea,
            server_expires   bigint,
            expires_at       timestamptz,
            obtained_at      timestamptz,
            published_by     text NOT NULL,
            published_at     timestamptz NOT NULL DEFAULT now(),
            forced_at        timestamptz,
            no_login_before  timestamptz
        )
        """

    private let loop: any EventLoop
    private let settings: Settings
    private let seal: FleetSeal
    private var logger: Logger
    private let postgresLogger: Logger
    private let clock: @Sendable () -> Date
    private let deliver: @Sendable (FleetCoordinator.Event) -> Void
    private let tls: NIOSSLContext?

    private var connection: PostgresConnection?
    private var connecting = false
    private var stopped = false
    private var reconnectDelay = FleetLink.firstReconnectDelay
    private var reconnect: Scheduled<Void>?
    private var connectionID = 0
    /// The last failure to connect was logged (one line per outage, not per attempt).
    private var outageLogged = false
    private var firstAttempt: EventLoopPromise<Void>?

    static let firstReconnectDelay: TimeAmount = .seconds(1)
    /// A database back after an outage is found within this (and the members converge on one
    /// token then); each attempt is one TCP connect.
    static let maxReconnectDelay: TimeAmount = .seconds(10)

    init(
        settings: Settings,
        seal: FleetSeal,
        loop: any EventLoop,
        logger: Logger,
        clock: @escaping @Sendable () -> Date,
        deliver: @escaping @Sendable (FleetCoordinator.Event) -> Void
    ) throws {
        self.settings = settings
        self.seal = seal
        self.loop = loop
        // postgres-nio's own lines stay out of the journal: at debug they may show a query's binds.
        self.logger = logger
        self.postgresLogger = Logger(label: "fts-tokend.postgres", factory: { _ in SwiftLogNoOpLogHandler() })
        self.clock = clock
        self.deliver = deliver
        switch settings.url.tls {
        case .disable:
            tls = nil
        case .require:
            // libpq's `require`: encrypted, the certificate not checked.
            var configuration = AuthClient.tlsConfiguration(caFile: settings.caFile)
            configuration.certificateVerification = .none
            tls = try NIOSSLContext(configuration: configuration)
        case .verifyFull:
            tls = try NIOSSLContext(configuration: AuthClient.tlsConfiguration(caFile: settings.caFile))
        }
    }

    /// The lock's second key: the account identity's first four bytes.
    private var lockKey: Int32 {
        Int32(bitPattern: UInt32(seal.account.prefix(8), radix: 16) ?? 0)
    }

    // MARK: Connection

    /// Connects; the future completes once the first attempt is over, connected or not (the daemon
    /// waits for it at start, so that its first need of a token finds the database if it is there).
    @discardableResult
    func start() -> EventLoopFuture<Void> {
        loop.flatSubmit {
            let promise = self.loop.makePromise(of: Void.self)
            self.firstAttempt = promise
            self.connect()
            return promise.futureResult
        }
    }

    /// Closes the connection and makes no other; the server lets go of a lock held on it.
    func stop() -> EventLoopFuture<Void> {
        loop.flatSubmit {
            self.stopped = true
            self.reconnect?.cancel()
            guard let connection = self.connection else { return self.loop.makeSucceededVoidFuture() }
            self.connection = nil
            return Self.close(connection)
        }
    }

    private func connect() {
        guard !stopped, connection == nil, !connecting else {
            firstAttempt?.succeed()
            firstAttempt = nil
            return
        }
        connecting = true
        connectionID += 1
        let id = connectionID
        // The whole attempt (TCP, TLS, authentication, the table, LISTEN) has a deadline too: a
        // server that stops answering mid-handshake would otherwise hold it, and the start, for good.
        let attempt = NIOLoopBoundBox<(any Channel)?>(nil, eventLoop: loop)
        let deadline = loop.scheduleTask(in: settings.connectTimeout * 2) {
            attempt.value?.close(promise: nil)
        }
        makeChannel()
            .flatMap { channel in
                attempt.value = channel
                return PostgresConnection.connect(
                    on: self.loop,
                    configuration: self.configuration(channel),
                    id: id,
                    logger: self.postgresLogger
                )
            }
            .flatMap { connection in
                self.prepare(connection).map { connection }.flatMapError { error in
                    Self.close(connection).flatMapThrowing { throw error }
                }
            }
            .whenComplete { result in
                self.connecting = false
                deadline.cancel()
                defer {
                    self.firstAttempt?.succeed()
                    self.firstAttempt = nil
                }
                switch result {
                case .success(let connection):
                    guard !self.stopped else {
                        _ = Self.close(connection)
                        return
                    }
                    self.connected(connection)
                case .failure(let error):
                    if !self.outageLogged {
                        self.outageLogged = true
                        self.logger.warning(
                            "cannot reach the fleet's database; serving the token held and retrying",
                            metadata: ["event": "fleet_unreachable", "reason": "\(Self.describe(error))"]
                        )
                    }
                    self.scheduleReconnect()
                }
            }
    }

    private func connected(_ connection: PostgresConnection) {
        self.connection = connection
        reconnectDelay = Self.firstReconnectDelay
        outageLogged = false
        logger.info(
            "connected to the fleet's database",
            metadata: ["event": "fleet_connected", "database": "\(settings.url)", "member": "\(settings.member)"]
        )
        connection.closeFuture.whenComplete { _ in
            guard self.connection === connection else { return }
            self.connection = nil
            self.logger.warning("lost the fleet's database", metadata: ["event": "fleet_disconnected"])
            self.deliver(.connection(up: false))
            self.scheduleReconnect()
        }
        deliver(.connection(up: true))
    }

    private func scheduleReconnect() {
        guard !stopped else { return }
        reconnect?.cancel()
        // Drawn from [d/2, d]: the members of a fleet do not all come back in the same instant.
        let delay = TimeAmount.nanoseconds(Int64(Double(reconnectDelay.nanoseconds) * Double.random(in: 0.5...1)))
        reconnectDelay = min(reconnectDelay * 2, Self.maxReconnectDelay)
        reconnect = loop.scheduleTask(in: delay) { self.connect() }
    }

    /// Closes `connection` (a call missed its deadline, or failed at the connection's level).
    private func drop(_ connection: PostgresConnection, because reason: String) {
        guard self.connection === connection else { return }
        logger.warning(
            "closing the fleet's database connection: \(reason)",
            metadata: ["event": "fleet_disconnected", "reason": "\(reason)"]
        )
        _ = Self.close(connection)
    }

    /// Closes `connection`; the future succeeds either way. (The future-returning `close()`; the
    /// async one would need a task.)
    private static func close(_ connection: PostgresConnection) -> EventLoopFuture<Void> {
        let closing: EventLoopFuture<Void> = connection.close()
        return closing.recover { _ in }
    }

    /// A TCP (or Unix) channel of our own, so that the keepalives notice a partition (1.).
    private func makeChannel() -> EventLoopFuture<any Channel> {
        var bootstrap = ClientBootstrap(group: loop).connectTimeout(settings.connectTimeout)
        switch settings.url.host {
        case .unixSocket(let folder):
            return bootstrap.connect(unixDomainSocketPath: "\(folder)/.s.PGSQL.\(settings.url.port)")
        case .tcp(let host):
            bootstrap =
                bootstrap
                .channelOption(.socketOption(.so_keepalive), value: 1)
                .channelOption(Self.tcpOption(TCP_KEEPIDLE), value: 5)
                .channelOption(Self.tcpOption(TCP_KEEPINTVL), value: 2)
                .channelOption(Self.tcpOption(TCP_KEEPCNT), value: 2)
                .channelOption(Self.tcpOption(Self.tcpUserTimeout), value: 9000)
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            return bootstrap.connect(host: host, port: settings.url.port)
        }
    }

    /// TCP_USER_TIMEOUT (linux/tcp.h), which Swift's Glibc module does not export.
    private static let tcpUserTimeout: Int32 = 18

    private static func tcpOption(_ name: Int32) -> ChannelOptions.Types.SocketOption {
        .init(level: .tcp, name: .init(rawValue: name))
    }

    private func configuration(_ channel: any Channel) -> PostgresConnection.Configuration {
        var configuration = PostgresConnection.Configuration(
            establishedChannel: channel,
            tls: tls.map { .require($0) } ?? .disable,
            username: settings.url.user,
            password: settings.password,
            database: settings.url.database
        )
        // The name checked against the certificate (and sent as SNI). An address is not a name:
        // NIOSSL then checks the certificate against the address connected to.
        if case .tcp(let host) = settings.url.host, settings.url.tls == .verifyFull, !Self.isAddress(host) {
            configuration.options.tlsServerName = host
        }
        // Server-side bounds as well (2.): no statement, lock wait or open transaction outlives a
        // call's deadline by much, even if this member vanished mid-call.
        configuration.options.additionalStartupParameters = [
            ("application_name", "fts-tokend \(settings.member)"),
            ("statement_timeout", "10s"),
            ("lock_timeout", "5s"),
            ("idle_in_transaction_session_timeout", "15s"),
        ]
        return configuration
    }

    private static func isAddress(_ host: String) -> Bool {
        var buffer = [UInt8](repeating: 0, count: 16)
        return inet_pton(AF_INET, host, &buffer) == 1 || inet_pton(AF_INET6, host, &buffer) == 1
    }

    /// 4.: the table, then LISTEN.
    private func prepare(_ connection: PostgresConnection) -> EventLoopFuture<Void> {
        let exists: PostgresQuery = "SELECT to_regclass(\(Self.table)) IS NOT NULL"
        return connection.query(exists, logger: postgresLogger)
            .flatMap { result -> EventLoopFuture<Void> in
                let present = (try? result.rows.first?.decode(Bool.self)) ?? false
                guard !present else { return self.loop.makeSucceededVoidFuture() }
                self.logger.info(
                    "creating the fleet's table \(Self.table)",
                    metadata: ["event": "fleet_table_created"]
                )
                return connection.query(PostgresQuery(unsafeSQL: Self.createTable), logger: self.postgresLogger).map {
                    _ in
                }
            }
            .flatMap { _ in
                connection.addListener(channel: Self.channel) { _, notification in
                    guard notification.payload == self.notificationPayload else { return }
                    self.deliver(.notified)
                }
                return connection.query(PostgresQuery(unsafeSQL: "LISTEN \(Self.channel)"), logger: self.postgresLogger)
                    .map { _ in }
            }
    }

    /// What a publication of this account sends: the account identity's first 16 characters (a
    /// member ignores the other accounts' publications).
    private var notificationPayload: String { String(seal.account.prefix(16)) }

    // MARK: Calls

    /// Performs one of the coordinator's database actions; its outcome comes back through `deliver`.
    func perform(_ action: FleetCoordinator.Action) {
        loop.execute {
            switch action {
            case .read: self.read()
            case .tryLock: self.tryLock()
            case .unlock: self.unlock()
            case .publish(let grant, let over, let forced): self.publish(grant, over: over, forced: forced)
            case .holdLogins(let until): self.holdLogins(until: until)
            case .login, .answer, .adopt, .report: break
            }
        }
    }

    private func read() {
        let query: PostgresQuery = """
            SELECT generation, sealed, server_expires,
                   extract(epoch FROM expires_at - now())::float8,
                   extract(epoch FROM now() - obtained_at)::float8,
                   published_by,
                   extract(epoch FROM now() - forced_at)::float8,
                   extract(epoch FROM no_login_before - now())::float8
            FROM \(unescaped: Self.table) WHERE account = \(seal.account)
            """
        call(query) { result in
            guard let row = result.rows.first else {
                return FleetRecord(generation: 0, content: .empty, publishedBy: "")
            }
            let (generation, sealed, serverExpires, remaining, age, member, sinceForced, untilAllowed) =
                try row.decode((Int64, ByteBuffer?, Int64?, Double?, Double?, String, Double?, Double?).self)
            let now = self.clock()
            var record = FleetRecord(generation: generation, content: .empty, publishedBy: member)
            record.lastForcedAt = sinceForced.map { now.addingTimeInterval(-$0) }
            record.noLoginBefore = untilAllowed.flatMap { $0 > 0 ? now.addingTimeInterval($0) : nil }
            if let sealed, let serverExpires, let remaining, let age {
                record.content = self.open(
                    Array(buffer: sealed),
                    generation: generation,
                    serverExpires: serverExpires,
                    remaining: remaining,
                    age: age,
                    now: now
                )
            }
            return record
        } done: {
            self.deliver(.read($0))
        }
    }

    /// The row's token on this member's clock: it expires `remaining` seconds from now by the
    /// database's clock (the auth server's own expiry, `serverExpires`, is kept for the skew).
    private func open(
        _ sealed: [UInt8],
        generation: Int64,
        serverExpires: Int64,
        remaining: Double,
        age: Double,
        now: Date
    ) -> FleetRecord.Content {
        guard let contents = try? seal.open(sealed, generation: generation, expiresAt: serverExpires) else {
            return .unopenable
        }
        let serverExpiry = Date(timeIntervalSince1970: TimeInterval(serverExpires))
        let localExpiry = now.addingTimeInterval(remaining)
        return .token(
            TokenGrant(
                token: contents.token,
                expiresAt: serverExpiry,
                obtainedAt: now.addingTimeInterval(-age),
                userId: contents.userId,
                tenantId: contents.tenantId,
                clockSkew: serverExpiry.timeIntervalSince(localExpiry)
            )
        )
    }

    private func tryLock() {
        let query: PostgresQuery = "SELECT pg_try_advisory_lock(\(Self.lockClass), \(lockKey))"
        call(query) {
            try $0.rows.first?.decode(Bool.self) ?? false
        } done: {
            self.deliver(.locked($0))
        }
    }

    private func unlock() {
        let query: PostgresQuery = "SELECT pg_advisory_unlock(\(Self.lockClass), \(lockKey))"
        call(query) { _ in
            ()
        } done: { _ in
        }
    }

    /// Publishes `grant` as generation `over + 1` if the row is still at `over` (the fence), and
    /// notifies the account's members in the same statement.
    private func publish(_ grant: TokenGrant, over: Int64, forced: Bool) {
        let generation = over + 1
        let serverExpires = Int64(grant.expiresAt.timeIntervalSince1970.rounded(.down))
        let sealed: [UInt8]
        do {
            sealed = try seal.seal(
                .init(token: grant.token, userId: grant.userId, tenantId: grant.tenantId),
                generation: generation,
                expiresAt: serverExpires
            )
        } catch {
            deliver(.published(.failure(.failed("cannot seal the token: \(error)"))))
            return
        }
        let now = clock()
        let remaining = grant.remaining(at: now)
        let age = max(0, now.timeIntervalSince(grant.obtainedAt))
        let query: PostgresQuery = """
            WITH published AS (
                INSERT INTO \(unescaped: Self.table) AS f
                    (account, generation, sealed, server_expires, expires_at, obtained_at, published_by, published_at,
                     forced_at)
                VALUES (\(seal.account), \(generation), \(ByteBuffer(bytes: sealed)), \(serverExpires),
                        now() + make_interval(secs => \(remaining)), now() - make_interval(secs => \(age)),
                        \(settings.member), now(), CASE WHEN \(forced) THEN now() END)
                ON CONFLICT (account) DO UPDATE SET
                    generation = EXCLUDED.generation, sealed = EXCLUDED.sealed,
                    server_expires = EXCLUDED.server_expires, expires_at = EXCLUDED.expires_at,
                    obtained_at = EXCLUDED.obtained_at, published_by = EXCLUDED.published_by,
                    published_at = now(), forced_at = COALESCE(EXCLUDED.forced_at, f.forced_at),
                    no_login_before = NULL
                WHERE f.generation = \(over)
                RETURNING generation
            )
            SELECT generation, pg_notify(\(Self.channel), \(notificationPayload)) FROM published
            """
        call(query) { result -> Int64? in
            try result.rows.first.map { try $0.decode((Int64, String).self).0 }
        } done: {
            self.deliver(.published($0))
        }
    }

    /// Holds every member's logins until `until` (a `Retry-After`), by the database's clock.
    private func holdLogins(until: Date) {
        let seconds = max(0, until.timeIntervalSince(clock()))
        let query: PostgresQuery = """
            INSERT INTO \(unescaped: Self.table) AS f (account, generation, published_by, no_login_before)
            VALUES (\(seal.account), 0, \(settings.member), now() + make_interval(secs => \(seconds)))
            ON CONFLICT (account) DO UPDATE SET no_login_before = EXCLUDED.no_login_before
            """
        call(query) { _ in
            ()
        } done: { _ in
        }
    }

    /// Runs `query` with a deadline (2.), decodes its rows on the loop, and calls `done` once.
    private func call<T>(
        _ query: PostgresQuery,
        decode: @escaping @Sendable (PostgresQueryResult) throws -> T,
        done: @escaping @Sendable (Result<T, FleetLinkError>) -> Void
    ) {
        guard let connection, !connection.isClosed else {
            done(.failure(.unavailable("not connected")))
            return
        }
        let settled = Settled()
        let seconds = Double(settings.callTimeout.nanoseconds) / 1e9
        let deadline = loop.scheduleTask(in: settings.callTimeout) {
            guard settled.settle() else { return }
            self.drop(connection, because: "a call took longer than \(FormatTime.seconds(seconds))")
            done(.failure(.timedOut(seconds: seconds)))
        }
        connection.query(query, logger: postgresLogger).whenComplete { result in
            guard settled.settle() else { return }
            deadline.cancel()
            switch result {
            case .success(let rows):
                do {
                    done(.success(try decode(rows)))
                } catch {
                    done(.failure(.failed("unexpected answer: \(String(describing: type(of: error)))")))
                }
            case .failure(let error):
                let failure = Self.classify(error)
                if case .unavailable(let why) = failure { self.drop(connection, because: why) }
                done(.failure(failure))
            }
        }
    }

    /// A server's error (a SQLSTATE) is `.failed`, except a read-only server after a failover
    /// (25006), which needs another connection; anything else is the connection's: `.unavailable`.
    static func classify(_ error: any Error) -> FleetLinkError {
        guard let error = error as? PSQLError else { return .unavailable(describe(error)) }
        guard let info = error.serverInfo else { return .unavailable(describe(error)) }
        let state = info[.sqlState] ?? "?"
        let message = LoginError.serverText(info[.message] ?? "")
        if state == "25006" { return .unavailable("the server is read-only (SQLSTATE 25006): \(message)") }
        return .failed("SQLSTATE \(state): \(message)")
    }

    /// An error in words fit for a log line: a server's SQLSTATE and message, else the error's code
    /// (PSQLError's own description is a placeholder, so that a query's binds never reach a log).
    static func describe(_ error: any Error) -> String {
        guard let error = error as? PSQLError else { return LoginError.serverText("\(error)") }
        if let info = error.serverInfo {
            return "SQLSTATE \(info[.sqlState] ?? "?"): \(LoginError.serverText(info[.message] ?? ""))"
        }
        if let underlying = error.underlying {
            return "\(error.code): \(LoginError.serverText(String(describing: underlying)))"
        }
        return "\(error.code)"
    }
}

/// Whether a call has been settled: by its answer or by its deadline, whichever came first.
/// `@unchecked Sendable`: used on the link's loop only, where both of them run.
private final class Settled: @unchecked Sendable {
    private var done = false
    /// True the first time.
    func settle() -> Bool {
        defer { done = true }
        return !done
    }
}
