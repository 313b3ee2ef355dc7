import Foundation
import TestSupport
import Testing

/// Hostile socket clients at scale (issue 5, list 8): a thousand connections at once, slowloris and
/// 1 MB request heads, while other processes keep asking for the token; afterwards the daemon's
/// memory and descriptors return to where they were.
@Suite struct SocketFloodTests {
    static let request = Array("GET /token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8)

    /// A client pipelines `GET /metrics` (the largest answer) and never reads: the daemon must not
    /// hold the answers (before the fix: 15 MB of requests grew it by 1.8 GiB, then the OOM killer).
    @Test func aClientThatPipelinesWithoutReadingIsCutOffAndCostsNoMemory() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let path = harness.socketPath
        for _ in 0..<200 { _ = try await UnixSocketClient.exchange(Self.request, socket: path) }
        let baseline = try #require(ProcessFigures(pid: child.pid))

        let flooder = try UnixSocketClient(socket: path)
        let requests = Array(String(repeating: "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", count: 2048).utf8)
        let (end, sent, peakDuring, served) = await onOwnThread {
            var peakKiB = baseline.rssKiB
            var served = 0
            func serveAnother() {
                if (try? UnixSocketClient.exchange(Self.request, socket: path))?.hasPrefix("HTTP/1.1 200") == true {
                    served += 1
                }
            }
            let (end, sent) = flooder.flood(requests, total: 50 << 20, stallTimeout: 10) {
                peakKiB = max(peakKiB, ProcessFigures(pid: child.pid)?.rssKiB ?? 0)
                serveAnother()  // meanwhile another process asks for the token
            }
            serveAnother()
            return (end, sent, peakKiB, served)
        }
        // However the flood ended, the daemon closes that connection (at once when it stops
        // reading with answers piling up, else at the idle timeout) and serves the others.
        let closed = end == .closedByServer ? true : await flooder.waitForClose(timeout: 60)
        let peakKiB = max(peakDuring, ProcessFigures(pid: child.pid)?.rssKiB ?? 0)
        let after =
            (try? await UnixSocketClient.exchange(Self.request, socket: path))?.hasPrefix("HTTP/1.1 200") == true
        let growthKiB = peakKiB - baseline.rssKiB
        let metrics = try await Command.curl("/metrics", socket: path).body
        let held = closed && growthKiB < 5 * 1024 && served > 0 && after && child.isRunning
        Scenario.report(
            held,
            "a client pipelined GET /metrics without reading: the daemon took \(sent / 1024) KiB of requests (\(end)), "
                + "peak RSS +\(growthKiB) KiB, connection closed: \(closed), \(served) other requests served meanwhile, "
                + "dropped as unread: \(metrics.contains(#"reason="unread""#))"
        )
        #expect(held)
        await harness.stop()
    }

    @Test func aThousandHostileConnectionsLeaveOthersServedAndNothingBehind() async throws {
        let harness = try await DaemonHarness(ttl: 600, socket: "")
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let path = harness.socketPath
        // Warm up: requests, and one storm first, so that the code these paths run is paged in and
        // the baseline is what a daemon that has seen a storm holds.
        for _ in 0..<200 { _ = try await UnixSocketClient.exchange(Self.request, socket: path) }
        let quiet = try #require(ProcessFigures(pid: child.pid)).fds
        var flood = try await Self.slowloris(600, socket: path)
        flood.removeAll()
        #expect(await eventually { (ProcessFigures(pid: child.pid)?.fds ?? .max) <= quiet })
        for _ in 0..<200 { _ = try await UnixSocketClient.exchange(Self.request, socket: path) }
        // The warm-up storm's memory goes back a second after it calmed (SocketServer): past that.
        try await Task.sleep(for: .seconds(1.5))
        let baseline = try #require(ProcessFigures(pid: child.pid))

        // 1. A thousand connections at once, each sending one byte of a head it never finishes.
        flood = try await Self.slowloris(1000, socket: path)
        let during = ProcessFigures(pid: child.pid)
        // 2. Meanwhile the host's other processes ask for the token, one at a time.
        var served = 0
        for _ in 0..<100 {
            let answer = (try? await UnixSocketClient.exchange(Self.request, socket: path)) ?? ""
            if answer.hasPrefix("HTTP/1.1 200"), let body = answer.range(of: "\r\n\r\n"),
                harness.mock.accepts(String(answer[body.upperBound...]))
            {
                served += 1
            }
        }
        // 3. Heads of 1 MB: answered 400 and closed after the first 8 KiB (the rest of the send fails).
        var oversizedRefused = 0
        let huge = Array(
            ("GET /token HTTP/1.1\r\nHost: x\r\nX-Fill: " + String(repeating: "a", count: 1 << 20) + "\r\n\r\n").utf8
        )
        for _ in 0..<10 {
            let client = try UnixSocketClient(socket: path)
            try? await client.send(huge)
            if await client.readAll(timeout: 30).hasPrefix("HTTP/1.1 400") { oversizedRefused += 1 }
        }
        flood.removeAll()
        // Let the server see the closes, then measure.
        #expect(await eventually { (ProcessFigures(pid: child.pid)?.fds ?? .max) <= baseline.fds })
        for _ in 0..<200 { _ = try await UnixSocketClient.exchange(Self.request, socket: path) }
        // The daemon hands the storm's memory back a second after it calmed down.
        _ = await eventually(timeout: 10) {
            (ProcessFigures(pid: child.pid)?.anonymousKiB ?? .max) < baseline.anonymousKiB + 256
        }
        let after = try #require(ProcessFigures(pid: child.pid))

        let growth = after.rssKiB - baseline.rssKiB
        let anonymousGrowth = after.anonymousKiB - baseline.anonymousKiB
        let held =
            served == 100 && oversizedRefused == 10 && after.fds <= baseline.fds && growth < 1024
            && anonymousGrowth < 1024 && child.isRunning
        Scenario.report(
            held,
            "1000 slowloris connections at once: \(served)/100 other clients served meanwhile, "
                + "\(oversizedRefused)/10 heads of 1 MB refused; RSS \(baseline.rssKiB) KiB before, \(during?.rssKiB ?? -1) KiB during, "
                + "\(after.rssKiB) KiB after (growth \(growth) KiB, anonymous \(anonymousGrowth) KiB); "
                + "fds \(baseline.fds) before, \(during?.fds ?? -1) during, \(after.fds) after"
        )
        #expect(served == 100)
        #expect(oversizedRefused == 10)
        #expect(after.fds <= baseline.fds)
        #expect(growth < 1024)
        #expect(anonymousGrowth < 1024)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    /// `count` connections, each sending one byte of a request head it never finishes.
    static func slowloris(_ count: Int, socket: String) async throws -> [UnixSocketClient] {
        try await onOwnThread {
            try (0..<count).map { _ in
                let client = try UnixSocketClient(socket: socket)
                try? client.send(Array("G".utf8))
                return client
            }
        }
    }
}
