import Foundation
import MockFTS
import TestSupport
import Testing

/// Outputs on a full tmpfs and on a read-only mount: the old token stays whole, the failure shows in
/// STATUS and the log, and the new token lands once the disk is usable again. Needs root (mount).
@Suite(.enabled(if: getuid() == 0)) struct DiskFaultTests {
    enum Fault: String, CaseIterable {
        case full = "full tmpfs (ENOSPC)"
        case readOnly = "read-only mount"
    }

    @Test(arguments: Fault.allCases)
    func theOldTokenStaysWholeAndTheNewOneLandsOnRecovery(_ fault: Fault) async throws {
        let harness = try await DaemonHarness(ttl: 600)
        let run = harness.folder.file("run")
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        #expect(
            try await Command.run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", run]).status
                == 0
        )
        defer { _ = umount2(run, Int32(MNT_DETACH)) }

        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let old = try #require(harness.token)

        switch fault {
        case .full:
            // Fill every byte, so that not even the temporary file can be written.
            let filler = FileHandle(forWritingAtPath: try harness.folder.write("run/filler", ""))
            while (try? filler?.write(contentsOf: Data(count: 4096))) != nil {}
            try? filler?.close()
        case .readOnly:
            #expect(try await Command.run("/usr/bin/mount", ["-o", "remount,ro", run]).status == 0)
        }
        harness.notify.reset()
        child.signal(SIGUSR1)
        let status = await harness.notify.waitFor(timeout: 30) { $0.contains("writing outputs failed") }
        #expect(status != nil)
        let oldIntact = harness.token == old && harness.mock.accepts(old)
        #expect(oldIntact, "the old token file is whole and valid")
        #expect(harness.folder.entries("run").allSatisfy { !$0.hasPrefix(".") }, "no temporary file left")
        // The log is read from the child's pipe: on a loaded machine it may arrive after STATUS.
        #expect(await eventually(timeout: 60) { child.standardError.contains("event=write_failed") })

        switch fault {
        case .full: try FileManager.default.removeItem(atPath: harness.folder.file("run/filler"))
        case .readOnly: #expect(try await Command.run("/usr/bin/mount", ["-o", "remount,rw", run]).status == 0)
        }
        let recovered = await eventually(timeout: 30) {
            harness.token != old && harness.token.map(harness.mock.accepts) == true
        }
        #expect(recovered)
        #expect(await eventually(timeout: 60) { child.standardError.contains("event=write_recovered") })
        Scenario.report(
            status != nil && oldIntact && recovered,
            "outputs on a \(fault.rawValue): "
                + "old token intact \(oldIntact), failure in STATUS \(status != nil), new token written after recovery \(recovered)"
        )
        await harness.stop()
    }
}
