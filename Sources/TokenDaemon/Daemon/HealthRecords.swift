#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What each file the daemon writes last did: its last successful write and its last error, kept
/// after a later success so that an operator sees a fault that came and went (README "Health").
public struct OutputRecords: Sendable, Equatable {
    /// One file as `/healthz` shows it.
    public struct Output: Sendable, Equatable {
        /// The configuration key that names the file: `outputs.tokenFile`, `metricsFile`, …
        public var key: String
        public var path: String
        public var lastWrite: Date?
        /// The last error; its time is when it began (repeats of it keep that time).
        public var lastError: Problem?

        var health: TokenBoard.Health.Output {
            TokenBoard.Health.Output(
                output: key,
                path: path,
                lastWriteAt: lastWrite.map(FormatTime.iso8601),
                lastError: lastError.map { .init(at: FormatTime.iso8601($0.at), error: $0.error) }
            )
        }
    }

    public struct Problem: Sendable, Equatable {
        public var at: Date
        public var error: String
    }

    private struct Record: Sendable, Equatable {
        var lastWrite: Date?
        var lastError: Problem?
    }

    private var records: [String: Record] = [:]

    public init() {}

    /// Every file `configuration` has the daemon write, with its key, in the order written.
    public static func files(of configuration: Configuration) -> [(key: String, path: String)] {
        let outputs = configuration.outputs
        let named: [(String, String?)] = [
            ("outputs.tokenFile", outputs.tokenFile?.path),
            ("outputs.jsonFile", outputs.jsonFile?.path),
            ("outputs.headersFile", outputs.headersFile?.file.path),
            ("stateFile", configuration.stateFile),
            ("metricsFile", configuration.metricsFile),
        ]
        return named.compactMap { key, path in path.map { (key, $0) } }
    }

    public func outputs(of configuration: Configuration) -> [Output] {
        Self.files(of: configuration).map { key, path in
            Output(key: key, path: path, lastWrite: records[path]?.lastWrite, lastError: records[path]?.lastError)
        }
    }

    mutating func record(_ outcome: TokenOutputs.WriteOutcome, at now: Date) {
        for path in outcome.written { records[path, default: Record()].lastWrite = now }
        if let failure = outcome.failure { record(failure.path, failure.error, at: now) }
    }

    /// One file's write: `failure` nil when it was written. The same error again, with no success
    /// in between, keeps the time it began: `/healthz` says since when a file fails, and a retry
    /// every 5 s does not make a new publication (and a STATUS= message) each time.
    mutating func record(_ path: String, _ failure: String?, at now: Date) {
        var record = records[path, default: Record()]
        if let failure {
            let ongoing = record.lastError.map { $0.error == failure && (record.lastWrite ?? .distantPast) < $0.at }
            if ongoing != true { record.lastError = Problem(at: now, error: failure) }
        } else {
            record.lastWrite = now
        }
        records[path] = record
    }

    /// Forgets the files a reload no longer configures (a file configured again starts afresh).
    mutating func keepOnly(_ configuration: Configuration) {
        let paths = Set(Self.files(of: configuration).map(\.path))
        records = records.filter { paths.contains($0.key) }
    }
}

/// The last login that finished: when, how long, and its token or its error.
public struct LoginRecord: Sendable, Equatable {
    public var startedAt: Date
    public var finishedAt: Date
    /// The new token's fingerprint, or why there is none.
    public var result: Result<String, LoginError>

    var health: TokenBoard.Health.Login {
        var login = TokenBoard.Health.Login(
            result: "ok",
            startedAt: FormatTime.iso8601(startedAt),
            finishedAt: FormatTime.iso8601(finishedAt),
            durationSeconds: (finishedAt.timeIntervalSince(startedAt) * 1000).rounded() / 1000
        )
        switch result {
        case .success(let fingerprint):
            login.tokenFingerprint = fingerprint
        case .failure(let error):
            switch error.kind {
            case .transient: login.result = "failed"
            case .rateLimited: login.result = "rate-limited"
            case .rejected: login.result = "rejected"
            }
            login.error = error.description
            login.httpStatus = error.httpStatus
        }
        return login
    }
}
