import Foundation
import MockFTS
import TestSupport
import Testing

/// The real binary against the mock server, observed through its files, NOTIFY_SOCKET and exit status.
@Suite struct DaemonLifecycleTests {
    @Test func readyArrivesOnlyAfterTheTokenFilesExist() async throws {
        let harness = try await DaemonHarness()
        harness.mock.enqueue(.delay(1))
        try harness.start()

        let starting = await harness.notify.waitFor(timeout: 30) { $0.contains("STATUS=logging in") }
        #expect(starting != nil)
        #expect(
            await harness.notify.waitFor(timeout: 30) { $0.hasPrefix("EXTEND_TIMEOUT_USEC=") } != nil,
            "keeps the start job alive"
        )
        let ready = await harness.waitUntilReady()
        // Checked the moment READY=1 arrived: every file is already in place.
        let token = try #require(harness.token)
        #expect(harness.folder.read("run/token.json") != nil)
        #expect(harness.folder.read("run/headers") == "x-api-key: \(harness.apiKey)\nAuthorization: Bearer \(token)\n")
        #expect(harness.mock.accepts(token))
        #expect(ready?.contains("STATUS=token valid until") == true)
        #expect(harness.folder.mode("run/token") == 0o640)
        #expect(harness.folder.mode("run/token.json") == 0o600)
        #expect(harness.folder.mode("state/state.json") == 0o600)
        #expect(harness.mock.stats.loginRequests == 1)
        #expect(harness.mock.stats.lastUserAgent?.hasPrefix("fts-tokend/") == true)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func sigtermSendsStoppingExitsZeroAndLeavesTheFiles() async throws {
        let harness = try await DaemonHarness()
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let token = harness.token
        child.signal(SIGTERM)
        #expect(await harness.notify.waitFor(timeout: 60) { $0.contains("STOPPING=1") } != nil)
        #expect(await child.waitForExit(timeout: 60) == 0)
        #expect(harness.token == token)
        #expect(harness.folder.entries("run").allSatisfy { !$0.hasPrefix(".") }, "no temporary files left")
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func aRestartWithAValidStateFileMakesNoLogin() async throws {
        let harness = try await DaemonHarness(ttl: 600)
        let first = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let token = harness.token
        first.signal(SIGTERM)
        #expect(await first.waitForExit(timeout: 60) == 0)
        // As after a reboot: /run is empty, the state file remains.
        try FileManager.default.removeItem(atPath: harness.folder.file("run"))
        harness.notify.reset()

        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        #expect(harness.token == token)
        #expect(harness.mock.stats.loginRequests == 1)
        #expect(harness.child?.standardError.contains("reusing stored token") == true)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func aConfigurationErrorExits78BeforeAnyNetwork() async throws {
        let harness = try await DaemonHarness()
        try harness.folder.write(
            "config.json",
            #"{"api":{"baseURL":"http://127.0.0.1:\#(harness.port)"},"outputs":{"tokenFile":{"path":"/tmp/x","mode":640}}}"#
        )
        let child = try harness.start()
        #expect(await child.waitForExit(timeout: 30) == 78)
        #expect(child.standardError.contains("outputs.tokenFile.mode"))
        #expect(child.standardError.contains("not the number 640"))
        #expect(harness.mock.stats.loginRequests == 0)
        await harness.stop()
    }

    @Test func rejectedCredentialsAtStartExit78AfterOneRequest() async throws {
        let harness = try await DaemonHarness()
        harness.mock.always(.status(401))
        let child = try harness.start()
        #expect(await child.waitForExit(timeout: 30) == 78)
        #expect(harness.mock.stats.loginRequests == 1)
        #expect(await harness.notify.waitFor(timeout: 60) { $0.contains("STATUS=login rejected") } != nil)
        #expect(harness.notify.received.allSatisfy { !$0.text.contains("READY=1") })
        #expect(child.standardError.contains("credentials or API key rejected (HTTP 401)"))
        #expect(harness.token == nil)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func retryAfterIsHonoured() async throws {
        let harness = try await DaemonHarness()
        harness.mock.enqueue(.status(429, retryAfter: "2"))
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let times = harness.mock.stats.loginTimes
        #expect(times.count == 2)
        // Without Retry-After the first retry would come after backoffInitialSeconds (0.2 s).
        #expect(times.count == 2 && times[1] - times[0] >= 1.95)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func anOutageIsRetriedWithBackoffAndRecovers() async throws {
        let harness = try await DaemonHarness(ttl: 120)
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)

        harness.mock.always(.status(503))
        child.signal(SIGUSR1)
        #expect(
            await harness.notify.waitFor(timeout: 30) {
                $0.contains("auth server unavailable (HTTP 503), retry in") && $0.contains("token still valid")
            } != nil
        )
        #expect(await eventually { harness.mock.stats.loginRequests >= 5 })
        #expect(harness.token == first, "the valid token stays in place during the outage")

        harness.mock.always(nil)
        #expect(await eventually { harness.token != first })
        #expect(harness.mock.accepts(try #require(harness.token)))
        #expect(
            await harness.notify.waitFor(timeout: 30) {
                $0.contains("STATUS=token valid until") && !$0.contains("READY")
            } != nil
        )
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func sighupWithABrokenConfigKeepsServingOnTheOldOne() async throws {
        let harness = try await DaemonHarness(ttl: 600)
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        harness.notify.reset()

        try harness.folder.write("config.json", "{ broken")
        child.signal(SIGHUP)
        let reloading = await harness.notify.waitFor(timeout: 30) { $0.contains("RELOADING=1") }
        #expect(reloading?.contains("MONOTONIC_USEC=") == true)
        let after = await harness.notify.waitFor(timeout: 30) { $0.contains("READY=1") }
        #expect(after?.contains("reload failed") == true)
        #expect(child.isRunning)

        // Still working on the old configuration: a requested refresh logs in and rotates the file.
        let before = harness.token
        child.signal(SIGUSR1)
        #expect(await eventually { harness.token != before && harness.token != nil })
        #expect(harness.mock.stats.tokensIssued == 2)

        // A valid config reloads cleanly.
        harness.notify.reset()
        try harness.writeConfig(logLevel: "info")
        child.signal(SIGHUP)
        let reloaded = await harness.notify.waitFor(timeout: 30) { $0.contains("READY=1") }
        #expect(reloaded?.contains("reload failed") == false)
        #expect(child.isRunning)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func oneLoopThreadAndLibdispatchStaysIdleThroughAReload() async throws {
        let harness = try await DaemonHarness(ttl: 600)
        let child = try harness.start(environment: ["WATCHDOG_USEC": "30000000"])
        #expect(await harness.waitUntilReady() != nil)
        // The main thread (waiting), the one NIO event loop (everything else), the notification thread.
        let threads = (try FileManager.default.contentsOfDirectory(atPath: "/proc/\(child.pid)/task")).compactMap {
            try? String(contentsOfFile: "/proc/\(child.pid)/task/\($0)/comm", encoding: .utf8)
        }
        #expect(threads.count == 3, "\(threads)")
        #expect(threads.filter { $0.hasPrefix("NIO-") }.count == 1, "\(threads)")
        let before = try #require(ProcessFigures(pid: child.pid))

        // A reload with new client settings replaces the auth client. Had the old one's shutdown
        // called back on DispatchQueue.global(), libdispatch's worker-pool monitor would run from
        // then on (a wake-up every second; its epoll, eventfd and timerfd stay open).
        harness.refresh.loginTimeoutSeconds += 1
        try harness.writeConfig()
        child.signal(SIGHUP)
        #expect(await eventually { harness.child?.standardError.contains("event=auth_client_closed") == true })
        // (The old client's pooled connection may have closed: fewer is fine.)
        #expect((ProcessFigures(pid: child.pid)?.fds ?? .max) <= before.fds)
        await harness.stop()
    }

    @Test func watchdogPingsAtAboutHalfTheInterval() async throws {
        let harness = try await DaemonHarness()
        try harness.start(environment: ["WATCHDOG_USEC": "2000000"])
        #expect(await harness.waitUntilReady() != nil)
        #expect(await eventually { harness.notify.received.filter { $0.text.contains("WATCHDOG=1") }.count >= 5 })
        let pings = harness.notify.received.filter { $0.text.contains("WATCHDOG=1") }.map(\.time)
        let gaps = zip(pings.dropFirst(), pings).map { $0.timeIntervalSince($1) }.sorted()
        // Every ping comes within WATCHDOG_USEC (2 s), the contract systemd enforces, and none early:
        // a busy machine can only delay a ping (the schedule itself is DaemonCoreSignalTests').
        #expect(gaps.allSatisfy { $0 < 2 }, "\(gaps)")
        #expect(gaps.allSatisfy { $0 > 0.9 }, "\(gaps)")
        await harness.stop()
    }

    @Test func anExpiredTokenIsRemovedNotServed() async throws {
        let harness = try await DaemonHarness(
            ttl: 3,
            refresh: .init(refreshAt: 0.5, minRemainingSeconds: 1, backoffInitialSeconds: 5, backoffMaxSeconds: 10)
        )
        // The first login answers, every later one fails: set before the start (set after READY, a
        // loaded machine let the 1.5 s refresh succeed first).
        harness.mock.always(.status(503))
        harness.mock.enqueue(MockFault())
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        #expect(await harness.notify.waitFor(timeout: 30) { $0.contains("token expired at") } != nil)
        #expect(harness.folder.entries("run").isEmpty, "no expired token left for readers")
        #expect(harness.child?.standardError.contains("event=token_expired") == true)
        harness.mock.always(nil)
        #expect(await eventually { harness.token.map(harness.mock.accepts) == true })
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func sigtermDuringAHangingLoginExitsAtOnce() async throws {
        // The login would hang for its whole timeout (300 s): an exit long before that did not wait
        // for it, however slow the machine.
        var refresh = DaemonHarness.Refresh()
        refresh.loginTimeoutSeconds = 300
        let harness = try await DaemonHarness(refresh: refresh)
        harness.mock.always(.hang)
        let child = try harness.start()
        #expect(await eventually { harness.mock.stats.loginRequests == 1 })
        child.signal(SIGTERM)
        #expect(await child.waitForExit(timeout: 60) == 0)
        #expect(harness.mock.stats.loginRequests == 1)
        await harness.stop()
    }

    /// With JOURNAL_STREAM naming stderr but no journald socket to send entries to (as on these test
    /// machines), each line falls back to stderr with its sd-daemon priority prefix. The structured
    /// journald path is tested in a real systemd (Tests/System).
    @Test(.enabled(if: !FileManager.default.fileExists(atPath: "/run/systemd/journal/socket")))
    func underJournaldWithoutAJournalSocketLinesFallBackToPriorityPrefixes() async throws {
        let harness = try await DaemonHarness()
        harness.mock.enqueue(.status(500))
        try harness.start(environmentForStandardError: { path in
            var info = stat()
            _ = stat(path, &info)
            return ["JOURNAL_STREAM": "\(info.st_dev):\(info.st_ino)"]
        })
        #expect(await harness.waitUntilReady() != nil)
        let lines = (harness.child?.standardError ?? "").split(separator: "\n")
        #expect(lines.contains { $0.hasPrefix("<6>login ok") })
        #expect(lines.contains { $0.hasPrefix("<3>login failed: auth server unavailable (HTTP 500)") })
        #expect(lines.allSatisfy { $0.hasPrefix("<") })
        await harness.stop()
    }

    /// sd_notify blocks once the notification socket's queue is full. A service manager that never
    /// reads must not stall the daemon's loop: it keeps rotating and stops on SIGTERM.
    @Test func aServiceManagerThatNeverReadsCannotStallTheDaemon() async throws {
        let harness = try await DaemonHarness(ttl: 600)
        let silent = harness.folder.file("silent.sock")
        // Bound, and never read.
        let fd = try UnixSocket.open(SOCK_DGRAM, .bind, path: silent)
        defer { close(fd) }
        let child = try harness.start(environment: ["NOTIFY_SOCKET": silent])
        #expect(await eventually { harness.token != nil })
        // Far more notifications than the socket queues (net.unix.max_dgram_qlen, 10 by default).
        for _ in 0..<25 {
            let before = harness.token
            child.signal(SIGUSR1)
            #expect(await eventually(timeout: 60) { harness.token != before })
        }
        child.signal(SIGTERM)
        #expect(await child.waitForExit(timeout: 60) == 0)
        await harness.stop()
    }
}
