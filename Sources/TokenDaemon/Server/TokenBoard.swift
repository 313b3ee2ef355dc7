import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What the socket serves: the daemon's loop posts every change here, connections read it.
///
/// Response bodies are encoded once per token, when it is posted, so that serving `GET /token` is a
/// lock, a copy-on-write buffer reference and a write: no per-request JSON or string formatting.
/// Long polls register a waiter that is woken when a token with another fingerprint is posted.
public final class TokenBoard: Sendable {
    /// The daemon's view, as `/healthz` reports it (README "Health"). Times are ISO 8601 UTC.
    public struct Health: Sendable, Equatable, Codable {
        public init(
            status: String,
            expiresAt: String? = nil,
            nextRefreshAt: String? = nil,
            lastError: String? = nil,
            lastSuccessAt: String? = nil,
            tokenFingerprint: String? = nil,
            lastLogin: Login? = nil,
            forcedRefresh: ForcedRefresh? = nil,
            outputs: [Output]? = nil
        ) {
            self.status = status
            self.expiresAt = expiresAt
            self.nextRefreshAt = nextRefreshAt
            self.lastError = lastError
            self.lastSuccessAt = lastSuccessAt
            self.tokenFingerprint = tokenFingerprint
            self.lastLogin = lastLogin
            self.forcedRefresh = forcedRefresh
            self.outputs = outputs
        }

        /// `ok`, `degraded` (valid token, but the last login or write failed), `expired`, `starting`.
        public var status: String
        public var expiresAt: String?
        public var nextRefreshAt: String?
        public var lastError: String?
        /// When the token held was obtained.
        public var lastSuccessAt: String?
        public var tokenFingerprint: String?
        /// The last login that finished, whatever its result. (The fields below are optional in
        /// the document's type only so that `status` can read a daemon older than them.)
        public var lastLogin: Login?
        public var forcedRefresh: ForcedRefresh?
        /// Every file the daemon writes, in the order it writes them.
        public var outputs: [Output]?

        public struct Login: Sendable, Equatable, Codable {
            /// `ok`, `failed` (retried with backoff), `rate-limited` or `rejected` (credentials, key or URL).
            public var result: String
            public var startedAt: String
            public var finishedAt: String
            public var durationSeconds: Double
            public var tokenFingerprint: String?
            public var error: String?
            public var httpStatus: Int?
        }

        /// The floor under logins forced by rejected-token reports (`refresh.minForcedRefreshSeconds`).
        public struct ForcedRefresh: Sendable, Equatable, Codable {
            public var minIntervalSeconds: Double
            /// The last forced login, if any.
            public var lastAt: String?
            /// Reports before this instant are answered `rate-limited` (nil: none was ever forced).
            public var nextAllowedAt: String?
        }

        public struct Output: Sendable, Equatable, Codable {
            /// The configuration key: `outputs.tokenFile`, `outputs.jsonFile`, `outputs.headersFile`,
            /// `stateFile`, `metricsFile`.
            public var output: String
            public var path: String
            /// The last successful write by this process; nil if none yet.
            public var lastWriteAt: String?
            /// The last failed write, kept after a later success (compare the times). `at` is when
            /// that error began: the same error again, with no success between, keeps it.
            public var lastError: Problem?
        }

        public struct Problem: Sendable, Equatable, Codable {
            public var at: String
            public var error: String
        }
    }

    /// The three ways the socket serves the token.
    enum Resource: CaseIterable, Sendable {
        case token, json, headers

        init?(path: String) {
            switch SocketRoute(rawValue: path) {
            case .token: self = .token
            case .tokenJSON: self = .json
            case .headers: self = .headers
            case .healthz, .metrics, .tokenInvalidate, nil: return nil
            }
        }

        var route: SocketRoute {
            switch self {
            case .token: .token
            case .json: .tokenJSON
            case .headers: .headers
            }
        }

        var path: String { route.path }

        var contentType: String { self == .json ? "application/json" : "text/plain; charset=utf-8" }

        /// Position in `Entry`'s arrays (the order of `allCases`).
        var index: Int {
            switch self {
            case .token: 0
            case .json: 1
            case .headers: 2
            }
        }
    }

    /// One token with its bodies and its most common responses encoded once.
    public struct Entry: Sendable {
        public var grant: TokenGrant
        public var fingerprint: String
        /// What the API proxy sends: the `Authorization` value and the API key.
        var authorization: String
        var apiKey: String
        private var bodies: [ByteBuffer]
        /// The whole `200` answer to a keep-alive GET of each resource: serving one is a single
        /// write of this shared (copy-on-write) buffer.
        private var keepAliveResponses: [ByteBuffer]

        init(
            grant: TokenGrant,
            fingerprint: String,
            authorization: String,
            apiKey: String,
            token: ByteBuffer,
            json: ByteBuffer,
            headers: ByteBuffer
        ) {
            self.grant = grant
            self.fingerprint = fingerprint
            self.authorization = authorization
            self.apiKey = apiKey
            let bodies = [token, json, headers]
            self.bodies = bodies
            keepAliveResponses = Resource.allCases.map { resource in
                HTTPResponseBytes.encode(
                    .ok,
                    contentType: resource.contentType,
                    body: bodies[resource.index],
                    headers: [("X-Token-Fingerprint", fingerprint)],
                    keepAlive: true
                )
            }
        }

        func body(_ resource: Resource) -> ByteBuffer { bodies[resource.index] }
        func keepAliveResponse(_ resource: Resource) -> ByteBuffer { keepAliveResponses[resource.index] }
    }

    private struct State {
        var entry: Entry?
        var health = Health(status: "starting")
        /// Seconds until the next login attempt, for `Retry-After` while no token is valid.
        var nextLogin: Date?
        var waiters: [Int: Waiter] = [:]
        var nextWaiterID = 0
        /// Where rejected-token reports go (the daemon's loop); nil until the daemon runs.
        var rejectionSink: (@Sendable (_ fingerprint: String, _ reporterUID: UInt32?, _ reportID: Int) -> Void)?
        /// Reports sent to the daemon and not answered yet, by report ID.
        var rejectionReplies: [Int: @Sendable (DaemonCore.RejectionOutcome) -> Void] = [:]
        var nextReportID = 0
    }

    struct Waiter {
        var after: String?
        var wake: @Sendable () -> Void
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    /// Posts the current token; wakes long polls waiting for a change. Posting the token already
    /// current re-encodes it only when its headers changed (a reload's new scheme or key).
    public func post(_ grant: TokenGrant, apiKey: String, authorizationScheme: String) {
        let fingerprint = grant.fingerprint
        let headers = ByteBuffer(bytes: TokenOutputs.headersText(grant, apiKey: apiKey, scheme: authorizationScheme))
        let woken = state.withLockedValue { state -> [Waiter] in
            let previous = state.entry
            guard previous?.fingerprint != fingerprint || previous?.body(.headers) != headers else { return [] }
            state.entry = Entry(
                grant: grant,
                fingerprint: fingerprint,
                authorization: TokenOutputs.authorization(grant, scheme: authorizationScheme),
                apiKey: apiKey,
                token: ByteBuffer(string: grant.token),
                json: ByteBuffer(bytes: TokenOutputs.jsonDocument(grant)),
                headers: headers
            )
            guard previous?.fingerprint != fingerprint else { return [] }
            let woken = state.waiters.values.filter { $0.after != fingerprint }
            state.waiters = state.waiters.filter { $0.value.after == fingerprint }
            return Array(woken)
        }
        for waiter in woken { waiter.wake() }
    }

    /// Updates what `/healthz` says and when the next login is due.
    public func update(health: Health, nextLogin: Date?) {
        state.withLockedValue {
            $0.health = health
            $0.nextLogin = nextLogin
        }
    }

    /// The current token if it is valid at `now`; an expired one is never returned.
    public func validEntry(at now: Date) -> Entry? {
        state.withLockedValue { $0.entry }.flatMap { $0.grant.isValid(at: now) ? $0 : nil }
    }

    public var health: Health { state.withLockedValue { $0.health } }

    /// Seconds a client should wait before asking again while no token is valid (at least 1).
    public func retryAfter(at now: Date) -> Int {
        let next = state.withLockedValue { $0.nextLogin }
        return max(1, Int((next?.timeIntervalSince(now) ?? 1).rounded(.up)))
    }

    /// Registers `wake` to run once a token whose fingerprint is not `after` is posted. Returns an ID
    /// for `cancelWait`, or nil when such a token is already current (the caller answers at once).
    func wait(after: String?, now: Date, wake: @escaping @Sendable () -> Void) -> Int? {
        state.withLockedValue { state in
            if let entry = state.entry, entry.grant.isValid(at: now), entry.fingerprint != after { return nil }
            let id = state.nextWaiterID
            state.nextWaiterID += 1
            state.waiters[id] = Waiter(after: after, wake: wake)
            return id
        }
    }

    func cancelWait(_ id: Int) {
        _ = state.withLockedValue { $0.waiters.removeValue(forKey: id) }
    }

    // MARK: Rejected-token reports (README "Socket API")

    /// Where the daemon takes reports: `sink` hands one to its core as `.tokenRejected`.
    func receiveRejections(_ sink: @escaping @Sendable (String, UInt32?, Int) -> Void) {
        state.withLockedValue { $0.rejectionSink = sink }
    }

    /// Sends a report to the daemon; `reply` runs once with its answer (on the daemon's loop).
    /// Returns an ID for `cancelRejection`, or nil when no daemon takes reports.
    func reportRejection(
        fingerprint: String,
        reporterUID: UInt32?,
        reply: @escaping @Sendable (DaemonCore.RejectionOutcome) -> Void
    ) -> Int? {
        let sent = state.withLockedValue { state -> (Int, @Sendable (String, UInt32?, Int) -> Void)? in
            guard let sink = state.rejectionSink else { return nil }
            let id = state.nextReportID
            state.nextReportID += 1
            state.rejectionReplies[id] = reply
            return (id, sink)
        }
        guard let (id, sink) = sent else { return nil }
        sink(fingerprint, reporterUID, id)
        return id
    }

    /// The daemon's answer to report `reportID` (from `.answerRejection`).
    func answerRejection(_ reportID: Int, _ outcome: DaemonCore.RejectionOutcome) {
        state.withLockedValue { $0.rejectionReplies.removeValue(forKey: reportID) }?(outcome)
    }

    /// The reporter went away (its connection closed) before the answer.
    func cancelRejection(_ reportID: Int) {
        _ = state.withLockedValue { $0.rejectionReplies.removeValue(forKey: reportID) }
    }

    var waiterCount: Int { state.withLockedValue { $0.waiters.count } }
    /// Reports sent and neither answered nor cancelled.
    var unansweredReportCount: Int { state.withLockedValue { $0.rejectionReplies.count } }
}
