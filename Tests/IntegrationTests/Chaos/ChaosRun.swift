import Foundation
import MockFTS
import TestSupport
import Testing

/// How long the chaos scenarios run: `FTS_CHAOS=long` (what `make soak` sets) multiplies the number
/// of token lifetimes each one covers; the short mode is what CI runs on every change.
enum ChaosMode {
    static let isLong = ProcessInfo.processInfo.environment["FTS_CHAOS"] == "long"

    static func lifetimes(_ short: Int, long: Int) -> Int { isLong ? long : short }
}

/// One chaos scenario: the real daemon against the mock, a `TokenWatcher` reading its outputs from
/// the first instant, and the checks every scenario shares when it ends: the daemon still runs, no
/// reader saw a bad or expired token, and no secret reached the output.
struct ChaosRun {
    let harness: DaemonHarness
    let watcher: TokenWatcher
    let child: ChildProcess
    let ttl: TimeInterval
    let started = Date()

    /// Starts the daemon with `fault` applied to every login from the first one (nil: none) after
    /// the `queued` ones (one login each), and waits for READY=1 unless `waitUntilReady` is false.
    static func start(
        ttl: TimeInterval,
        refresh: DaemonHarness.Refresh = .chaos,
        fault: MockFault? = nil,
        queued: [MockFault] = [],
        waitUntilReady: Bool = true
    ) async throws -> ChaosRun {
        let harness = try await DaemonHarness(ttl: ttl, refresh: refresh)
        harness.mock.always(fault)
        for queuedFault in queued { harness.mock.enqueue(queuedFault) }
        let watcher = TokenWatcher(harness, interval: 0.002)
        let child = try harness.start()
        if waitUntilReady {
            #expect(await harness.waitUntilReady(timeout: 60) != nil)
        }
        return ChaosRun(harness: harness, watcher: watcher, child: child, ttl: ttl)
    }

    var mock: MockFTSServer { harness.mock }
    var logins: Int { mock.stats.loginRequests }

    /// Waits for a token the mock accepts that differs from `previous`.
    func waitForFreshToken(after previous: String? = nil, timeout: TimeInterval = 60) async -> Bool {
        await eventually(timeout: timeout) {
            guard let token = harness.token, token != previous else { return false }
            return mock.accepts(token)
        }
    }

    /// Ends the scenario: prints its line with `figures` and the watcher's, and checks what every
    /// scenario must hold besides `held`.
    func finish(_ held: Bool, _ figures: String, sourceLocation: SourceLocation = #_sourceLocation) async {
        let seen = watcher.stop()
        let alive = child.isRunning
        let all = held && alive && seen.bad == 0 && seen.expiredReads == 0
        // The daemon's own word when its loop was held up (a starved machine, a blocked write).
        let late = child.standardError.split(separator: "\n").filter { $0.contains("event=loop_late") }
            .compactMap { $0.split(separator: " ").first { $0.hasPrefix("late_ms=") }.flatMap { Int($0.dropFirst(8)) } }
        let lateness = late.isEmpty ? "" : "; loop late \(late.count)× (at most \(late.max() ?? 0) ms)"
        Scenario.report(
            all,
            figures
                + String(
                    format:
                        "; readers: %d reads, %d bad, %d expired (%.3f s), %d tokens, no token for %.1f s; daemon running: %@",
                    seen.reads,
                    seen.bad,
                    seen.expiredReads,
                    seen.expiredSeconds,
                    seen.tokens,
                    seen.absentSeconds,
                    alive ? "yes" : "no"
                )
                + lateness
        )
        #expect(held, sourceLocation: sourceLocation)
        // The daemon's own account of its end (its log holds no secret: every test checks that).
        let lastLines = child.standardError.split(separator: "\n").suffix(15).joined(separator: "\n")
        #expect(
            alive,
            "the daemon survived; exit \(child.exitStatus.map(String.init) ?? "?"), last log lines:\n\(lastLines)",
            sourceLocation: sourceLocation
        )
        #expect(seen.bad == 0, "partial or foreign reads: \(seen.examples)", sourceLocation: sourceLocation)
        #expect(
            seen.expiredReads == 0,
            "a reader held an expired token for \(seen.expiredSeconds) s",
            sourceLocation: sourceLocation
        )
        #expect(seen.reads > 0, "the watcher read the files", sourceLocation: sourceLocation)
        harness.expectNoSecretsInOutput(sourceLocation: sourceLocation)
        await harness.stop()
    }
}

extension DaemonHarness.Refresh {
    /// Refresh at half the lifetime, so that several retries fit before a short test token expires.
    static let chaos = DaemonHarness.Refresh(
        refreshAt: 0.5,
        minRemainingSeconds: 1,
        jitter: 0.05,
        backoffInitialSeconds: 0.2,
        backoffMaxSeconds: 1
    )

    /// The most login attempts the refresh policy allows in `window` seconds of failures: each wait is
    /// at least half its backoff ceiling and never under backoffInitialSeconds; while a valid token
    /// remains (`validFor` seconds) a wait may shrink to backoffInitialSeconds, so that phase is
    /// counted at that pace. One more for an attempt in flight when the window opens.
    func maximumAttempts(in window: TimeInterval, validFor: TimeInterval = 0) -> Int {
        var elapsed = 0.0
        var attempts = 1
        while true {
            let ceiling = min(backoffMaxSeconds, backoffInitialSeconds * pow(2, Double(attempts - 1)))
            elapsed += elapsed < validFor ? backoffInitialSeconds : max(backoffInitialSeconds, ceiling / 2)
            if elapsed > window { return attempts + 1 }
            attempts += 1
        }
    }
}

/// Resident memory and open descriptors of a running process, from /proc.
struct ProcessFigures {
    var rssKiB: Int
    var anonymousKiB: Int
    var fds: Int

    init?(pid: Int32) {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
            let fds = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")
        else { return nil }
        func kiB(_ field: String) -> Int? {
            status.split(separator: "\n").first { $0.hasPrefix(field + ":") }
                .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") }
        }
        guard let rss = kiB("VmRSS"), let anonymous = kiB("RssAnon") else { return nil }
        self.rssKiB = rss
        self.anonymousKiB = anonymous
        self.fds = fds.count
    }
}
