import Foundation
import MockFTS
import TestSupport
import Testing

/// kill -9 at random instants while tokens rotate, with a reader polling the files every millisecond.
/// Prints `scenario: held|FAILED (figures)`, the line docs/reliability.md collects.
@Suite struct CrashSafetyTests {
    static let kills = Int(ProcessInfo.processInfo.environment["FTS_CRASH_KILLS"] ?? "") ?? 40

    @Test func killNineDuringRotationsLosesNothing() async throws {
        let harness = try await DaemonHarness(ttl: 600, refresh: .init(refreshAt: 0.8, minRemainingSeconds: 60))
        let reader = FileReader(token: harness.folder.file("run/token"), json: harness.folder.file("run/token.json"), mock: harness.mock)
        reader.start()

        var loginsCausedByRestarts = 0
        var random = SystemRandomNumberGenerator()
        for round in 0..<Self.kills {
            harness.notify.reset()
            let before = harness.mock.stats.loginRequests
            let child = try harness.start()
            #expect(await harness.waitUntilReady() != nil)
            // From the second start on the state file holds a valid token: starting must not log in.
            if round > 0 { loginsCausedByRestarts += harness.mock.stats.loginRequests - before }
            // One rotation, killed at a random instant: often while the files are being written.
            child.signal(SIGUSR1)
            try await Task.sleep(for: .microseconds(Int.random(in: 0...8000, using: &random)))
            child.signal(SIGKILL)
            _ = await child.waitForExit(timeout: 10)
        }
        // One clean start afterwards: it removes what the killed writers left behind.
        let last = try harness.start()
        #expect(await eventually { harness.folder.entries("run").allSatisfy { !$0.hasPrefix(".") } })
        let leftovers = harness.folder.entries("run").filter { $0.hasPrefix(".") }.count
        last.signal(SIGTERM)
        _ = await last.waitForExit(timeout: 10)
        let result = reader.stop()

        let held = result.bad == 0 && leftovers == 0 && loginsCausedByRestarts == 0 && result.reads > 1000
        print("scenario: \(held ? "held" : "FAILED") (kill -9 ×\(Self.kills) during rotations: \(result.reads) reads, "
              + "\(result.bad) partial/empty/mixed/invalid, \(leftovers) temporary files after the next start, "
              + "\(loginsCausedByRestarts) logins caused by restarts with a valid state file)")
        #expect(result.bad == 0, "\(result.examples)")
        #expect(leftovers == 0)
        #expect(loginsCausedByRestarts == 0)
        #expect(result.reads > 1000)
        await harness.stop()
    }
}

/// Reads the token and JSON files every millisecond on its own thread and checks each read: a whole
/// token the mock accepts, and a JSON document whose token is one too.
final class FileReader: @unchecked Sendable {
    // @unchecked: the counters are guarded by `lock`; the paths and the mock are immutable.
    private let token: String
    private let json: String
    private let mock: MockFTSServer
    private let lock = NSLock()
    private var running = true
    private var reads = 0
    private var bad = 0
    private var examples: [String] = []
    private let done = DispatchSemaphore(value: 0)

    init(token: String, json: String, mock: MockFTSServer) {
        self.token = token
        self.json = json
        self.mock = mock
    }

    func start() {
        Thread { [self] in
            while lock.withLock({ running }) {
                check(token) { String(decoding: $0, as: UTF8.self) }
                check(json) { data in
                    (try? JSONSerialization.jsonObject(with: data) as? [String: Any])?["token"] as? String
                }
                usleep(1000)
            }
            done.signal()
        }.start()
    }

    private func check(_ path: String, _ extract: (Data) -> String?) {
        // Absent until the first token exists: that is not a bad read.
        guard let data = FileManager.default.contents(atPath: path) else { return }
        let ok = extract(data).map { mock.accepts($0) } ?? false
        lock.withLock {
            reads += 1
            if !ok {
                bad += 1
                if examples.count < 3 { examples.append("\((path as NSString).lastPathComponent): \(data.count) bytes") }
            }
        }
    }

    func stop() -> (reads: Int, bad: Int, examples: [String]) {
        lock.withLock { running = false }
        done.wait()
        return lock.withLock { (reads, bad, examples) }
    }
}
