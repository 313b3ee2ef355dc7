import Foundation
import Logging
import Synchronization
import Testing

@testable import TokenDaemon

final class CapturedLines: Sendable {
    let lines = Mutex<[String]>([])
    var all: [String] { lines.withLock { $0 } }
}

@Suite struct LineLogHandlerTests {
    func logger(journal: Bool, into capture: CapturedLines) -> Logger {
        Logger(label: "test") { _ in
            LineLogHandler(journalPrefixes: journal) { line in capture.lines.withLock { $0.append(line) } }
        }
    }

    @Test func journalLinesCarryThePriorityPrefixAndMetadata() {
        let capture = CapturedLines()
        let log = logger(journal: true, into: capture)
        log.error("login failed", metadata: ["event": "login_failed", "http_status": "503"])
        log.info("two\nlines")
        log.debug("hidden at info")
        #expect(capture.all == ["<3>login failed event=login_failed http_status=503\n", "<6>two lines\n"])
    }

    @Test func terminalLinesCarryTimeAndLevel() {
        let capture = CapturedLines()
        logger(journal: false, into: capture).warning("clock skew", metadata: ["reason": "a b"])
        let line = capture.all.first ?? ""
        #expect(line.hasSuffix(" warning clock skew reason=\"a b\"\n"))
        #expect(line.hasPrefix("20"))
    }

    @Test func journalFieldNamesAreUpperCaseWithThePrefix() {
        #expect(JournalLogHandler.fieldName("event") == "FTS_EVENT")
        #expect(JournalLogHandler.fieldName("next_refresh_at") == "FTS_NEXT_REFRESH_AT")
        #expect(JournalLogHandler.fieldName("token-fp.x") == "FTS_TOKEN_FP_X")
    }

    @Test func fingerprintIsEightHexCharactersOfSHA256() {
        // SHA-256("abc") = ba7816bf…
        #expect(Fingerprint.of("abc") == "ba7816bf")
    }
}
