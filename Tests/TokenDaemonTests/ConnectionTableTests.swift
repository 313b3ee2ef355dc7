import NIOCore
import NIOEmbedded
import Testing

@testable import TokenDaemon

/// Who gives way when a socket's connection table is full (`ConnectionTable`).
@Suite struct ConnectionTableTests {
    /// Connected (active) embedded channels: closing one shows as `isActive` false.
    static func channels(_ count: Int) -> [EmbeddedChannel] {
        (0..<count).map { _ in
            let channel = EmbeddedChannel()
            _ = channel.connect(to: try! SocketAddress(ipAddress: "127.0.0.1", port: 1))
            return channel
        }
    }

    @Test func theLongestIdleGivesWayAndWaitsNever() {
        let table = ConnectionTable(capacity: 3)
        let start = NIODeadline.now()
        let open = Self.channels(3)
        for (index, channel) in open.enumerated() {
            #expect(table.admit(channel, now: start + .seconds(Int64(index))) == .admitted)
        }
        #expect(table.beginWait(open[0], uid: 1))
        #expect(table.admit(Self.channels(1)[0], now: start + .seconds(10)) == .admittedByEvicting)
        #expect(open[0].isActive, "a wait (long poll, proxied request in flight) is never evicted")
        #expect(!open[1].isActive, "the longest idle of the others gave way")
    }

    /// A peer the allow lists refuse must never hold a slot a listed peer needs: its connection gives
    /// way first, however recently it was active.
    @Test func aRefusedPeerGivesWayBeforeAnyListedPeer() {
        let table = ConnectionTable(capacity: 3)
        let start = NIODeadline.now()
        let open = Self.channels(3)
        for (index, channel) in open.enumerated() {
            #expect(table.admit(channel, now: start + .seconds(Int64(index))) == .admitted)
        }
        table.markRefused(open[2])
        #expect(table.admit(Self.channels(1)[0], now: start + .seconds(10)) == .admittedByEvicting)
        #expect(!open[2].isActive, "the refused peer's, the newest")
        #expect(open[0].isActive && open[1].isActive)
    }

    @Test func aUidHoldsAtMostAQuarterOfTheTableInWaits() {
        let table = ConnectionTable(capacity: 8)
        let open = Self.channels(8)
        for channel in open { #expect(table.admit(channel) == .admitted) }
        #expect(table.beginWait(open[0], uid: 1000) && table.beginWait(open[1], uid: 1000))
        #expect(!table.beginWait(open[2], uid: 1000), "a quarter of 8")
        #expect(table.beginWait(open[3], uid: 1001), "another uid has its own share")
        table.endWait(open[0])
        #expect(table.beginWait(open[2], uid: 1000))
    }
}
