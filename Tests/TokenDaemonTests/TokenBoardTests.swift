import CLinux
import Foundation
import NIOCore
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

    @Test func peerGroupsAreReadFromTheZeroPaddedBuffer() {
        // The kernel writes the groups sorted ascending and leaves the rest of the buffer zero.
        #expect(PeerCredentials.groups(from: [998, 1001, 0, 0]) == [998, 1001])
        #expect(PeerCredentials.groups(from: [0, 27, 998, 0]) == [0, 27, 998])
        // Zeros alone: "no groups" and "group 0 only" look the same; read as none (fails closed).
        #expect(PeerCredentials.groups(from: [0, 0, 0]) == [])
        #expect(MemoryLayout<clinux_peer_groups>.size == 256 * 4)
    }

    @Test func aSupplementaryGroupOnTheAllowListAdmitsThePeer() {
        var outputs = Configuration.Outputs()
        outputs.socket = .init(path: "/run/s.sock", mode: 0o660, allowUIDs: [1001], allowGIDs: [998], maxConnections: 8)
        let access = SocketAccess(outputs)
        #expect(access.allows(PeerCredentials(pid: 1, uid: 1001, gid: 1001)))
        #expect(access.allows(PeerCredentials(pid: 1, uid: 1002, gid: 998)))
        #expect(access.allows(PeerCredentials(pid: 1, uid: 1002, gid: 1002, groups: [27, 998])))
        #expect(!access.allows(PeerCredentials(pid: 1, uid: 1002, gid: 1002, groups: [27])))
        #expect(!access.allows(PeerCredentials(pid: 1, uid: 1002, gid: 1002, groups: nil)))
        #expect(!access.allows(nil))
    }

    @Test func aRefusedPeerIsLoggedOncePerMinute() {
        let access = SocketAccess(Configuration.Outputs())
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
        #expect(access.shouldLogRefusal(of: 1002, now: start))
        #expect(!access.shouldLogRefusal(of: 1002, now: start + .seconds(59)))
        #expect(access.shouldLogRefusal(of: 1003, now: start + .seconds(59)))
        #expect(access.shouldLogRefusal(of: 1002, now: start + .seconds(60)))
    }

    @Test func peerCredentialsMirrorGlibcUcred() {
        // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
        #expect(MemoryLayout<RawPeerCredentials>.size == 12)
        #expect(MemoryLayout<RawPeerCredentials>.offset(of: \.uid) == 4)
        #expect(MemoryLayout<RawPeerCredentials>.offset(of: \.gid) == 8)
    }
}
