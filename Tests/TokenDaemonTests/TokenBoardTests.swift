import Foundation
import Synchronization
import Testing

@testable import TokenDaemon

@Suite struct TokenBoardTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    func grant(_ token: String, lifetime: TimeInterval = 3600) -> TokenGrant {
        TokenGrant(
            token: token,
            expiresAt: now.addingTimeInterval(lifetime),
            obtainedAt: now,
            userId: "u",
            tenantId: nil,
            clockSkew: 0
        )
    }

    @Test func servesPreEncodedBodiesOfAValidTokenOnly() {
        let board = TokenBoard()
        #expect(board.validEntry(at: now) == nil)
        board.post(grant("a.b.c", lifetime: 60), apiKey: "k", authorizationScheme: "Bearer")
        let entry = board.validEntry(at: now)
        #expect(entry.map { String(buffer: $0.body(.token)) } == "a.b.c")
        #expect(entry.map { String(buffer: $0.body(.headers)) } == "x-api-key: k\nAuthorization: Bearer a.b.c\n")
        #expect(
            entry.map { Array($0.body(.json).readableBytesView) }
                == TokenOutputs.jsonDocument(grant("a.b.c", lifetime: 60))
        )
        // The keep-alive answer is encoded once, whole: status line, headers, body.
        let answer = entry.map { String(buffer: $0.keepAliveResponse(.token)) }
        #expect(
            answer
                == "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\nCache-Control: no-store\r\n"
                + "X-Token-Fingerprint: \(Fingerprint.of("a.b.c"))\r\n\r\na.b.c"
        )
        #expect(board.validEntry(at: now.addingTimeInterval(60)) == nil, "an expired token is never served")
    }

    @Test func waitersWakeOnlyForAnotherToken() {
        let board = TokenBoard()
        board.post(grant("one"), apiKey: "k", authorizationScheme: "Bearer")
        let fingerprint = Fingerprint.of("one")
        #expect(board.wait(after: "stale", now: now) {} == nil, "a different token is current: answer at once")
        let woken = Mutex(0)
        let id = board.wait(after: fingerprint, now: now) { woken.withLock { $0 += 1 } }
        #expect(id != nil)
        board.post(grant("one"), apiKey: "k", authorizationScheme: "Bearer")
        #expect(woken.withLock { $0 } == 0, "the same token again wakes no one")
        board.post(grant("two"), apiKey: "k", authorizationScheme: "Bearer")
        #expect(woken.withLock { $0 } == 1)
        #expect(board.waiterCount == 0)
    }

    @Test func cancelledWaitersAreForgotten() {
        let board = TokenBoard()
        let id = board.wait(after: nil, now: now) {}
        #expect(board.waiterCount == 1)
        board.cancelWait(try! #require(id))
        #expect(board.waiterCount == 0)
    }

    @Test func retryAfterFollowsTheNextLogin() {
        let board = TokenBoard()
        #expect(board.retryAfter(at: now) == 1)
        board.update(health: .init(status: "starting"), nextLogin: now.addingTimeInterval(12.2))
        #expect(board.retryAfter(at: now) == 13)
        #expect(board.health.status == "starting")
    }

    @Test func peerCredentialsMirrorGlibcUcred() {
        // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
        #expect(MemoryLayout<RawPeerCredentials>.size == 12)
        #expect(MemoryLayout<RawPeerCredentials>.offset(of: \.uid) == 4)
        #expect(MemoryLayout<RawPeerCredentials>.offset(of: \.gid) == 8)
    }
}
