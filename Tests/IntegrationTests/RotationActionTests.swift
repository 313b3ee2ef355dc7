import Foundation
import MockFTS
import TestSupport
import Testing

@Suite struct RotationActionTests {
    @Test func execAndSignalActionsRunAfterEveryNewTokenAndAHangingOneIsKilled() async throws {
        let folder = try TemporaryDirectory()
        // A process that counts SIGHUPs: the signal action's target.
        let script = try folder.write(
            "target.sh",
            "#!/bin/sh\ntrap 'echo hup >> \(folder.file("hups"))' HUP\necho $$ > \(folder.file("target.pid"))\nwhile :; do sleep 0.05; done\n",
            mode: 0o755
        )
        let target = try Spawned(
            "/bin/sh",
            [script],
            environment: ["PATH": "/usr/bin:/bin"],
            standardOutput: "/dev/null",
            standardError: "/dev/null"
        )
        #expect(await eventually { folder.read("target.pid") != nil })

        let record = "env > \(folder.file("env-"))$FTS_TOKEN_FP"
        let harness = try await DaemonHarness(
            ttl: 600,
            extraConfig: """
                "onRotate": [
                  { "exec": ["/bin/sleep", "60"], "timeoutSeconds": 1 },
                  { "exec": ["/bin/sh", "-c", "\(record)"] },
                  { "exec": ["/bin/sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status > \(folder.file("signals"))"] },
                  { "signal": "HUP", "pidFile": "\(folder.file("target.pid"))" },
                  { "exec": ["/nonexistent/program"] }
                ]
                """
        )
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        let fingerprint = try #require(
            harness.child?.standardError.split(separator: "\n").first { $0.contains("event=login_ok") }?
                .split(separator: " ").first { $0.hasPrefix("token_fp=") }?.dropFirst("token_fp=".count)
        )

        // The recording action ran at once although the first action hangs.
        // Waits for the whole file: the shell creates it before `env` has written it.
        #expect(await eventually(timeout: 60) { folder.read("env-\(fingerprint)")?.contains("FTS_TOKEN_FP=") == true })
        let environment = try #require(folder.read("env-\(fingerprint)"))
        #expect(environment.contains("FTS_TOKEN_FP=\(fingerprint)"))
        #expect(environment.contains("FTS_EXPIRES_AT="))
        #expect(environment.contains("FTS_TOKEN_FILE=\(harness.folder.file("run/token"))"))
        #expect(!environment.contains(first), "the token never goes into the environment")
        #expect(!environment.contains(harness.password) && !environment.contains(harness.apiKey))
        #expect(await eventually { folder.read("hups")?.split(separator: "\n").count == 1 })
        #expect(await eventually { harness.child?.standardError.contains("/bin/sleep killed after 1s") == true })
        #expect(harness.child?.standardError.contains("cannot start /nonexistent/program") == true)
        // The daemon blocks its signals (they are read from a signalfd): its children must not.
        #expect(await eventually { folder.read("signals")?.split(separator: "\n").count == 2 })
        let masks = Dictionary(
            uniqueKeysWithValues: (folder.read("signals") ?? "").split(separator: "\n").map { line in
                let fields = line.split(separator: "\t")
                return (String(fields[0]), UInt64(fields.last ?? "", radix: 16) ?? .max)
            }
        )
        #expect(masks["SigBlk:"] == 0, "no signal blocked")
        let daemonSignals = [SIGHUP, SIGINT, SIGUSR1, SIGPIPE, SIGTERM].reduce(UInt64(0)) { $0 | 1 << UInt64($1 - 1) }
        #expect(masks["SigIgn:"].map { $0 & daemonSignals } == 0, "none of the daemon's signals ignored")

        // Every rotation runs them again; the daemon kept working through the failures.
        child.signal(SIGUSR1)
        #expect(await eventually { folder.read("hups")?.split(separator: "\n").count == 2 })
        #expect(child.isRunning)
        withExtendedLifetime(target) {}
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    /// Whoever can write or replace a signal action's pidFile chooses what the daemon signals, and a
    /// FIFO there froze the event loop in open(2) (socket and watchdog silent). Each hostile pidFile
    /// is refused with its reason; nothing is signalled; the daemon keeps answering.
    @Test func hostilePidFilesAreRefusedAndNothingIsSignalled() async throws {
        let folder = try TemporaryDirectory()
        let sibling = try await DaemonHarness(ttl: 600)
        let siblingChild = try sibling.start()
        #expect(await sibling.waitUntilReady() != nil)
        // A bystander that must not receive the TERM: its pid behind a symlink and in files others may write.
        let bystander = try Spawned(
            "/bin/sleep",
            ["600"],
            environment: [:],
            standardOutput: "/dev/null",
            standardError: "/dev/null"
        )
        try folder.write("bystander.pid", "\(bystander.pid)\n", mode: 0o644)
        symlink(folder.file("bystander.pid"), folder.file("link.pid"))
        try folder.write("writable.pid", "\(bystander.pid)\n", mode: 0o666)
        try folder.write("grouped.pid", "\(bystander.pid)\n", mode: 0o664)
        try folder.write("foreign.pid", "\(bystander.pid)\n", mode: 0o644)
        chown(folder.file("foreign.pid"), 65534, 65534)
        try folder.write("sibling.pid", "\(siblingChild.pid)\n", mode: 0o644)
        mkfifo(folder.file("fifo.pid"), 0o600)
        let cases = ["fifo", "link", "writable", "grouped", "foreign", "sibling", "self"]
        let actions = cases.map { name in "{ \"signal\": \"TERM\", \"pidFile\": \"\(folder.file(name + ".pid"))\" }" }
        let harness = try await DaemonHarness(
            ttl: 600,
            socket: "",
            extraConfig: #""onRotate": [\#(actions.joined(separator: ", "))]"#
        )
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        try folder.write("self.pid", "\(child.pid)\n", mode: 0o644)
        child.signal(SIGUSR1)  // a second rotation, now that self.pid names the daemon
        #expect(
            await eventually {
                child.standardError.components(separatedBy: "event=rotate_action_failed").count > 2 * cases.count
            }
        )
        let log = child.standardError
        for reason in [
            "fifo.pid is not a regular file", "link.pid: Too many levels of symbolic links",
            "writable.pid is writable by group or others", "grouped.pid is writable by group or others",
            "foreign.pid belongs to uid 65534", "another fts-tokend", "self.pid names the daemon itself",
        ] {
            #expect(log.contains(reason), "\(reason)")
        }
        #expect(!log.contains("event=rotate_action_ok"))
        #expect(try await Command.curl("/healthz", socket: harness.socketPath).status == 200, "the loop still answers")
        #expect(child.isRunning && siblingChild.isRunning)
        #expect(kill(bystander.pid, 0) == 0, "the bystander got no signal")
        await harness.stop()
        await sibling.stop()
    }

    @Test func aTokenReusedAtStartRunsNoActions() async throws {
        let folder = try TemporaryDirectory()
        let harness = try await DaemonHarness(
            ttl: 600,
            extraConfig: #""onRotate": [{ "exec": ["/bin/sh", "-c", "echo ran >> \#(folder.file("runs"))"] }]"#
        )
        let first = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        #expect(await eventually { folder.read("runs") == "ran\n" })
        first.signal(SIGTERM)
        _ = await first.waitForExit()
        harness.notify.reset()
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        try await Task.sleep(for: .milliseconds(500))
        #expect(folder.read("runs") == "ran\n")
        await harness.stop()
    }
}

@Suite struct MetricsTests {
    @Test func metricsOnTheSocketAndInTheTextfile() async throws {
        let harness = try await DaemonHarness(
            ttl: 600,
            socket: "",
            extraConfig: #""metricsFile": "{folder}/metrics/fts-tokend.prom""#
        )
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        _ = try await Command.curl("/token", socket: harness.socketPath)
        let answer = try await Command.curl("/metrics", socket: harness.socketPath)
        #expect(answer.status == 200)
        #expect(answer.headers.contains("Content-Type: text/plain; version=0.0.4"))
        let text = answer.body
        #expect(text.contains(#"fts_tokend_logins_total{result="ok",status_class="2xx"} 1"#))
        #expect(text.contains(#"fts_tokend_socket_requests_total{path="/token",code="200"} 1"#))
        #expect(text.contains(#"fts_tokend_build_info{version="0."#))
        #expect(text.contains("fts_tokend_login_duration_seconds_count 1"))
        #expect(text.contains("fts_tokend_token_expiry_timestamp_seconds "))
        #expect(text.contains("fts_tokend_last_success_timestamp_seconds "))
        // The harness's refresh.minRemainingSeconds, for the alert rules (contrib/prometheus).
        #expect(text.contains("fts_tokend_refresh_min_remaining_seconds 1.0\n"), "\(text)")
        let validity = text.split(separator: "\n").first { $0.hasPrefix("fts_tokend_token_validity_seconds ") }
            .flatMap { Double($0.split(separator: " ").last ?? "") }
        #expect(validity.map { $0 > 500 && $0 <= 600 } == true)
        #expect(!text.contains(harness.token ?? "no token"))

        #expect(
            await eventually {
                harness.folder.read("metrics/fts-tokend.prom")?.contains("fts_tokend_logins_total") == true
            }
        )
        #expect(harness.folder.mode("metrics/fts-tokend.prom") == 0o644)
        await harness.stop()
    }
}
