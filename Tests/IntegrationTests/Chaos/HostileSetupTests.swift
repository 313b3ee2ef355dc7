import Foundation
import MockFTS
import TestSupport
import Testing

/// Hostile or careless setups against the real binary (issue 5, list 7): each refused at start with
/// exit 78 and a message naming the key, or, for a symlink planted at an output path, written around
/// without touching its target. The malformed-config cases one key at a time are in
/// `ConfigurationParserTests` (about 60) and `SecretResolverTests`.
@Suite struct HostileSetupTests {
    enum Setup: String, CaseIterable, CustomTestStringConvertible {
        case tokenFolderOthersCanWrite = "token folder writable by others"
        case tokenFolderOfAnotherUser = "token folder owned by another user"
        case worldReadablePasswordFile = "world-readable password file"
        case malformedConfig = "config that is not JSON"
        case configOthersCanWrite = "config file writable by others"
        case secretFolderOthersCanWrite = "password file in a folder others can write"
        case rotateProgramOfAnotherUser = "onRotate program owned by another user"
        case rotateInterpreterOthersCanWrite = "onRotate script whose #! interpreter others can write"
        case caFileGroupCanWrite = "CA bundle writable by the group"
        var testDescription: String { rawValue }
    }

    /// Handing a folder to another user takes root.
    static let setups = Setup.allCases.filter {
        ($0 != .tokenFolderOfAnotherUser && $0 != .rotateProgramOfAnotherUser) || geteuid() == 0
    }

    @Test(arguments: setups)
    func aHostileSetupIsRefusedAtStartAndNothingIsWritten(_ setup: Setup) async throws {
        let harness = try await DaemonHarness()
        // A token from before, in the folder the daemon would write: it must stay as it is.
        let previous = try harness.folder.write("run/token", "previous-token", mode: 0o640)
        let expected: String
        switch setup {
        case .tokenFolderOthersCanWrite:
            chmod(harness.folder.file("run"), 0o777)
            expected =
                "outputs.tokenFile.path: the folder \(harness.folder.file("run")) (mode 0777) is writable by other users"
        case .tokenFolderOfAnotherUser:
            chown(harness.folder.file("run"), 65534, 65534)
            expected =
                "outputs.tokenFile.path: the folder \(harness.folder.file("run")) belongs to uid 65534, another user"
        case .worldReadablePasswordFile:
            chmod(harness.folder.file("secrets/password"), 0o644)
            expected = "api.passwordFile: "
        case .malformedConfig:
            try harness.folder.write("config.json", #"{"api": {"baseURL": "http://127.0.0.1:1", "#)
            expected = "(file): "
        case .configOthersCanWrite:
            chmod(harness.configPath, 0o646)
            expected = "(file): \(harness.configPath) (mode 0646) is writable by group or others"
        case .secretFolderOthersCanWrite:
            chmod(harness.folder.file("secrets"), 0o777)
            expected = "api.passwordFile: the folder \(harness.folder.file("secrets")) above"
        case .rotateProgramOfAnotherUser:
            let program = try harness.folder.write("hooks/reload.sh", "#!/bin/sh\nexit 0\n", mode: 0o755)
            chown(program, 65534, 65534)
            harness.extraConfig = #""onRotate": [{ "exec": ["\#(program)"] }]"#
            try harness.writeConfig()
            expected = "onRotate[0].exec[0]: \(program) belongs to uid 65534"
        case .rotateInterpreterOthersCanWrite:
            let interpreter = try harness.folder.write("hooks/interp", "#!/bin/sh\nexit 0\n", mode: 0o757)
            let program = try harness.folder.write("hooks/reload", "#!\(interpreter) -e\n", mode: 0o755)
            harness.extraConfig = #""onRotate": [{ "exec": ["\#(program)"] }]"#
            try harness.writeConfig()
            expected =
                "onRotate[0].exec[0] (its #! interpreter): \(interpreter) (mode 0757) is writable by group or others"
        case .caFileGroupCanWrite:
            let bundle = try harness.folder.write("ca.pem", "not yet a certificate\n", mode: 0o664)
            try harness.writeConfig()
            let config = try #require(harness.folder.read("config.json"))
            try harness.folder.write(
                "config.json",
                config.replacingOccurrences(
                    of: #""timeoutSeconds""#,
                    with: #""caFile": "\#(bundle)", "timeoutSeconds""#
                )
            )
            expected = "api.caFile: \(bundle) (mode 0664) is writable by group or others"
        }
        let child = try harness.start()
        let status = await child.waitForExit(timeout: 30)
        let said = child.standardError.contains(expected)
        let untouched =
            harness.folder.read("run/token") == "previous-token" && harness.folder.entries("run") == ["token"]
        let logins = harness.mock.stats.loginRequests
        let held = status == 78 && said && untouched && logins == 0
        Scenario.report(
            held,
            "\(setup.rawValue): exit \(status.map(String.init) ?? "none"), message names the problem \(said), "
                + "existing token file untouched \(untouched), logins \(logins)"
        )
        #expect(status == 78)
        #expect(said, "stderr: \(child.standardError.suffix(400)); previous at \(previous)")
        #expect(untouched)
        #expect(logins == 0)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func aSymlinkPlantedAtAnOutputPathIsReplacedAndItsTargetUntouched() async throws {
        let harness = try await DaemonHarness()
        // Stands for /etc/passwd: a file the daemon's user may write, that a symlink points at.
        let victim = try harness.folder.write("victim/passwd", "root:x:0:0:root:/root:/bin/bash\n", mode: 0o644)
        try FileManager.default.createDirectory(atPath: harness.folder.file("run"), withIntermediateDirectories: true)
        chmod(harness.folder.file("run"), 0o750)
        for name in ["token", "token.json", "headers"] {
            #expect(symlink(victim, harness.folder.file("run/" + name)) == 0)
        }
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let untouched =
            harness.folder.read("victim/passwd") == "root:x:0:0:root:/root:/bin/bash\n"
            && harness.folder.mode("victim/passwd") == 0o644
        let replaced = ["token", "token.json", "headers"].allSatisfy { name in
            var info = stat()
            return lstat(harness.folder.file("run/" + name), &info) == 0 && info.st_mode & S_IFMT == S_IFREG
        }
        let valid = harness.token.map(harness.mock.accepts) == true
        Scenario.report(
            untouched && replaced && valid,
            "symlinks to a passwd file planted at the three output paths: target untouched \(untouched), "
                + "symlinks replaced by regular files \(replaced), token valid \(valid)"
        )
        #expect(untouched)
        #expect(replaced)
        #expect(valid)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    /// The attack on a running daemon: whoever can rename the token folder swaps it for a symlink
    /// after start, to make the next rotation write the token (and the API key) where they read.
    /// Nothing reaches the link's target, the old files stay where they were, the log names the
    /// link, and the daemon writes again once the folder is back.
    @Test func aTokenFolderSwappedForASymlinkAfterStartGetsNothing() async throws {
        let harness = try await DaemonHarness(ttl: 120)
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        let run = harness.folder.file("run")
        #expect(rename(run, harness.folder.file("run-moved")) == 0)
        try FileManager.default.createDirectory(
            atPath: harness.folder.file("elsewhere"),
            withIntermediateDirectories: false
        )
        #expect(symlink(harness.folder.file("elsewhere"), run) == 0)

        child.signal(SIGUSR1)
        let reported = await eventually {
            child.standardError.contains("cannot write outputs: \(run) is a symbolic link")
        }
        let nothingThere = harness.folder.entries("elsewhere").isEmpty
        let oldKept = harness.folder.read("run-moved/token") == first
        #expect(reported, "stderr: \(child.standardError.suffix(600))")
        #expect(nothingThere)
        #expect(oldKept)

        // The folder back in place: the next retry (every 5 s) writes the new token there.
        #expect(unlink(run) == 0)
        #expect(rename(harness.folder.file("run-moved"), run) == 0)
        let rewritten = await eventually { harness.token.map { $0 != first && harness.mock.accepts($0) } == true }
        #expect(rewritten)
        #expect(harness.folder.entries("elsewhere").isEmpty)
        Scenario.report(
            reported && nothingThere && oldKept && rewritten,
            "token folder swapped for a symlink after start: error logged \(reported), nothing behind the link "
                + "\(nothingThere), old token kept \(oldKept), written again once restored \(rewritten)"
        )
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    /// The attack on the state file: whoever can edit it pushes the stored expiry a day out, so that
    /// a restarted daemon would keep handing out (and never refresh) a token the server considers
    /// expired. The restarted daemon does not believe it, says why, and logs in.
    @Test func aStateFileEditedToPushTheExpiryOutIsNotBelieved() async throws {
        let harness = try await DaemonHarness(ttl: 600)
        let first = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let token = try #require(harness.token)
        first.signal(SIGTERM)
        #expect(await first.waitForExit(timeout: 60) == 0)
        let statePath = harness.folder.file("state/state.json")
        var document = try #require(
            try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: statePath))) as? [String: Any]
        )
        var grant = try #require(document["grant"] as? [String: Any])
        grant["expiresAt"] = try #require(grant["expiresAt"] as? Double) + 86_400
        document["grant"] = grant
        document["longestLifetimeSeconds"] = 200_000.0
        try JSONSerialization.data(withJSONObject: document).write(to: URL(fileURLWithPath: statePath))
        harness.notify.reset()

        let second = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let said = second.standardError.contains("stored token is implausible (its expiry")
        let loggedIn = harness.mock.stats.loginRequests == 2 && harness.token != token
        #expect(said, "stderr: \(second.standardError.suffix(600))")
        #expect(loggedIn, "logins \(harness.mock.stats.loginRequests); stderr: \(second.standardError.suffix(1200))")
        Scenario.report(
            said && loggedIn,
            "state file edited to push the expiry a day out: refused with its reason \(said), logged in instead \(loggedIn)"
        )
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }
}
