import Foundation
import TestSupport
import Testing

@testable import Systemd

/// Serialized: these tests set process-wide environment variables that libsystemd reads.
@Suite(.serialized) struct SystemdTests {
    @Test func notifySendsAllStatesInOneDatagram() async throws {
        let folder = try TemporaryDirectory()
        let listener = try NotifyListener(in: folder)
        defer { listener.stop() }
        setenv("NOTIFY_SOCKET", listener.path, 1)
        defer { unsetenv("NOTIFY_SOCKET") }

        #expect(Notifier().notify(.ready, .status("token valid\nuntil noon")) == .sent)
        #expect(await listener.waitFor(timeout: 30) { _ in true } == "READY=1\nSTATUS=token valid until noon")

        #expect(Notifier().notify(.reloading(monotonicMicroseconds: 42)) == .sent)
        #expect(await listener.waitFor(timeout: 30) { $0.hasPrefix("RELOADING") } == "RELOADING=1\nMONOTONIC_USEC=42")

        #expect(Notifier().notify(.watchdog, .extendTimeout(microseconds: 5_000_000), .stopping) == .sent)
        #expect(
            await listener.waitFor(timeout: 30) { $0.hasPrefix("WATCHDOG") }
                == "WATCHDOG=1\nEXTEND_TIMEOUT_USEC=5000000\nSTOPPING=1"
        )
    }

    @Test func notifyWithoutASupervisorIsNotAnError() {
        unsetenv("NOTIFY_SOCKET")
        #expect(Notifier().notify(.ready) == .notSupervised)
    }

    @Test func notifyToAMissingSocketReportsTheErrno() throws {
        let folder = try TemporaryDirectory()
        setenv("NOTIFY_SOCKET", folder.file("nobody-listens"), 1)
        defer { unsetenv("NOTIFY_SOCKET") }
        #expect(Notifier().notify(.ready) == .failed(errno: ENOENT))
    }

    @Test func monotonicClockAdvances() {
        let first = Notifier.monotonicMicroseconds()
        usleep(2000)
        #expect(Notifier.monotonicMicroseconds() > first)
    }

    @Test func watchdogIntervalComesFromWatchdogUsec() {
        unsetenv("WATCHDOG_PID")
        setenv("WATCHDOG_USEC", "2000000", 1)
        #expect(Watchdog.interval() == .seconds(2))
        setenv("WATCHDOG_PID", "1", 1)
        #expect(Watchdog.interval() == nil, "WATCHDOG_PID names another process")
        unsetenv("WATCHDOG_PID")
        unsetenv("WATCHDOG_USEC")
        #expect(Watchdog.interval() == nil)
    }

    @Test func noSocketsWithoutListenFDs() {
        unsetenv("LISTEN_FDS")
        #expect(SocketActivation.listenFDs().isEmpty)
    }

    @Test func credentialsDirectory() {
        #expect(Credentials.directory(environment: [:]) == nil)
        #expect(Credentials.directory(environment: ["CREDENTIALS_DIRECTORY": ""]) == nil)
        #expect(
            Credentials.directory(environment: ["CREDENTIALS_DIRECTORY": "/run/credentials/x.service"])
                == "/run/credentials/x.service"
        )
    }

    @Test func journalStreamMustMatchStandardError() {
        #expect(!JournalStream.isStandardErrorJournal(environment: [:]))
        #expect(!JournalStream.isStandardErrorJournal(environment: ["JOURNAL_STREAM": "1:2"]))
        var info = stat()
        fstat(STDERR_FILENO, &info)
        #expect(JournalStream.isStandardErrorJournal(environment: ["JOURNAL_STREAM": "\(info.st_dev):\(info.st_ino)"]))
    }
}

@Suite struct BackgroundNotifierTests {
    /// A service manager that does not read: sends block until `release`.
    final class StuckManager: Sendable {
        let gate = DispatchSemaphore(value: 0)
        func release(_ count: Int) { for _ in 0..<count { gate.signal() } }
    }

    @Test func routineNotificationsAreDroppedWhileTheManagerDoesNotReadOthersNever() {
        let manager = StuckManager()
        let notifier = BackgroundNotifier(send: { _ in manager.gate.wait() })
        for _ in 0..<100 { notifier.notify(.status("token valid")) }
        notifier.notify(.watchdog)
        // Bounded: a manager that never reads cannot make the daemon hold every STATUS forever.
        #expect(notifier.queuedCount == BackgroundNotifier.maxQueued)
        notifier.notify(.ready)
        notifier.notify(.stopping)
        #expect(notifier.queuedCount == BackgroundNotifier.maxQueued + 2, "READY and STOPPING are always queued")
        manager.release(BackgroundNotifier.maxQueued + 2)
        #expect(notifier.flush(timeout: .seconds(10)))
        #expect(notifier.queuedCount == 0)
    }
}
