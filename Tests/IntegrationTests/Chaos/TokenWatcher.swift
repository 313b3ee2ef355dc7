import Foundation
import MockFTS
import TestSupport

/// A reader of the daemon's outputs, on its own thread: every `interval` it reads the token file, the
/// headers file and the JSON file and asks the mock what `whoami` would have said about each token
/// at the instant of the read.
///
/// A read is *bad* when it is not a whole token the mock issued (partial, empty, mixed or foreign),
/// and *expired* when the token was whole but past its `exp` then: what the daemon must never
/// hand out. An absent file is neither (the daemon removes the files when it has no valid token).
final class TokenWatcher: @unchecked Sendable {
    // @unchecked: the figures are guarded by `lock`; everything else is immutable.
    struct Result {
        var reads = 0
        var bad = 0
        var expiredReads = 0
        /// How long readers held an expired token: each expired read counts until the next read.
        var expiredSeconds = 0.0
        /// How long the token file was absent after the first token appeared.
        var absentSeconds = 0.0
        /// Distinct tokens seen.
        var tokens = 0
        /// What the first bad reads looked like (sizes and file names only: never the content).
        var examples: [String] = []
    }

    /// What is read each round: a name, how to fetch it (nil: absent) and how to find the token in it.
    private let sources: [(name: String, fetch: () -> Data?, extract: (Data) -> String?)]
    private let mock: MockFTSServer
    private let interval: TimeInterval
    private let lock = NSLock()
    private var running = true
    private var result = Result()
    private var seen = Set<String>()
    /// `exp` of each token seen (nil: not one of the mock's): one signature check per token.
    private var expiries: [String: Date?] = [:]
    private let done = DispatchSemaphore(value: 0)

    /// Starts watching `harness`'s three output files at once, and its socket's `/token` when
    /// `socket` is true.
    init(_ harness: DaemonHarness, interval: TimeInterval = 0.001, socket: Bool = false) {
        self.mock = harness.mock
        self.interval = interval
        func file(_ name: String) -> () -> Data? {
            let path = harness.folder.file("run/" + name)
            return { readFileWithoutThrowing(path).map { Data($0) } }
        }
        var sources: [(name: String, fetch: () -> Data?, extract: (Data) -> String?)] = [
            ("token", file("token"), { String(decoding: $0, as: UTF8.self) }),
            (
                "headers", file("headers"),
                { data in
                    let text = String(decoding: data, as: UTF8.self)
                    guard text.hasSuffix("\n"),
                        let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Authorization: ") })
                    else { return nil }
                    return line.split(separator: " ").last.map(String.init)
                }
            ),
            (
                "token.json", file("token.json"),
                { data in
                    (try? JSONSerialization.jsonObject(with: data) as? [String: Any])?["token"] as? String
                }
            ),
        ]
        if socket {
            let path = harness.socketPath
            // 503 while the daemon holds no valid token: absent, like the files.
            sources.append(
                (
                    "socket /token",
                    {
                        let answer = try? UnixSocketClient.exchange(
                            Array("GET /token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8),
                            socket: path
                        )
                        guard let answer, !answer.hasPrefix("HTTP/1.1 503") else { return nil }
                        return Data(answer.utf8)
                    },
                    { data in
                        let text = String(decoding: data, as: UTF8.self)
                        guard text.hasPrefix("HTTP/1.1 200"), let body = text.range(of: "\r\n\r\n") else { return nil }
                        return String(text[body.upperBound...])
                    }
                )
            )
        }
        self.sources = sources
        Thread { [self] in watch() }.start()
    }

    private func watch() {
        var previous: (instant: Date, expired: Bool, absent: Bool)?
        var started = false
        while lock.withLock({ running }) {
            for (index, source) in sources.enumerated() {
                let instant = Date()
                guard let data = source.fetch() else {
                    if index == 0 { record(&previous, at: instant, expired: false, absent: started) }
                    continue
                }
                let verdict: MockFTSServer.TokenVerdict =
                    source.extract(data).map { self.verdict(on: $0, at: instant) } ?? .unknown
                lock.withLock {
                    result.reads += 1
                    if verdict == .unknown {
                        result.bad += 1
                        if result.examples.count < 3 { result.examples.append("\(source.name): \(data.count) bytes") }
                    }
                    if verdict == .expired {
                        result.expiredReads += 1
                        if result.examples.count < 3 { result.examples.append("\(source.name): expired token") }
                    }
                }
                if index == 0 {
                    started = true
                    record(&previous, at: instant, expired: verdict == .expired, absent: false)
                }
            }
            Thread.sleep(forTimeInterval: interval)
        }
        done.signal()
    }

    /// Adds the time since the previous token-file read to the state that read saw.
    private func record(
        _ previous: inout (instant: Date, expired: Bool, absent: Bool)?,
        at instant: Date,
        expired: Bool,
        absent: Bool
    ) {
        if let last = previous {
            let elapsed = instant.timeIntervalSince(last.instant)
            lock.withLock {
                if last.expired { result.expiredSeconds += elapsed }
                if last.absent { result.absentSeconds += elapsed }
            }
        }
        previous = (instant, expired, absent)
    }

    private func verdict(on token: String, at instant: Date) -> MockFTSServer.TokenVerdict {
        let expiry: Date?
        if let known = lock.withLock({ expiries[token] }) {
            expiry = known
        } else {
            expiry = mock.expiry(of: token)
            lock.withLock {
                expiries[token] = expiry
                if expiry != nil { result.tokens += 1 }
            }
        }
        guard let expiry else { return .unknown }
        return expiry > instant ? .accepted : .expired
    }

    /// The figures so far, without stopping.
    var snapshot: Result { lock.withLock { result } }

    /// Stops the thread and returns the figures.
    func stop() -> Result {
        lock.withLock { running = false }
        done.wait()
        return snapshot
    }
}

/// The one line per scenario that docs/reliability.md collects: `scenario: held|FAILED (figures)`.
enum Scenario {
    static func report(_ held: Bool, _ figures: String) {
        print("scenario: \(held ? "held" : "FAILED") (\(figures))")
    }
}
