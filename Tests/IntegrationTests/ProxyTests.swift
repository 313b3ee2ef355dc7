import Crypto
import Foundation
import MockFTS
import TestSupport
import Testing

/// The API proxy (`outputs.proxy`) of the real daemon against the mock's API (`/api/echo`,
/// `/api/stream`, server-side revocation), through curl on its Unix socket or TCP listener.
@Suite struct ProxyTests {
    /// A harness whose config has `outputs.proxy` with `settings` (JSON members) on `run/api.sock`.
    static func harness(ttl: TimeInterval = 600, _ settings: String = "") async throws -> DaemonHarness {
        let harness = try await DaemonHarness(ttl: ttl, socket: "")
        harness.outputFiles +=
            #", "proxy": { "path": "{folder}/run/api.sock""# + (settings.isEmpty ? "" : ", " + settings) + " }"
        try harness.writeConfig()
        return harness
    }

    static func apiSocket(_ harness: DaemonHarness) -> String { harness.folder.file("run/api.sock") }

    static func echo(_ body: String) -> MockFTSServer.Echo? {
        try? JSONDecoder().decode(MockFTSServer.Echo.self, from: Data(body.utf8))
    }

    static func header(_ name: String, in headers: String) -> String? {
        headers.split(separator: "\r\n").first { $0.lowercased().hasPrefix(name.lowercased() + ":") }
            .map { String($0.dropFirst(name.count + 1)).trimmingCharacters(in: .whitespaces) }
    }

    @Test func aRequestGoesUpstreamWithTheDaemonsCredentialsInPlaceOfTheClients() async throws {
        let harness = try await Self.harness()
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let answer = try await Command.curl(
            "/api/echo?x=1",
            socket: Self.apiSocket(harness),
            extra: [
                "-H", "Authorization: Bearer stolen-or-stale", "-H", "x-api-key: not-the-key",
                "-H", "Connection: keep-alive, X-Hop", "-H", "X-Hop: connection-only", "-H", "Keep-Alive: timeout=5",
                "-H", "Proxy-Authorization: Basic eA==", "-H", "X-End-To-End: kept",
            ]
        )
        #expect(answer.status == 200)
        let echo = try #require(Self.echo(answer.body), "\(answer.body)")
        #expect(echo.keyValid && echo.tokenValid, "the daemon's key and token went upstream")
        #expect(echo.path == "/api/echo" && echo.query == "x=1")
        #expect(echo.headers["x-end-to-end"] == "kept")
        for dropped in ["x-hop", "keep-alive", "proxy-authorization", "connection"] {
            #expect(echo.headers[dropped] == nil, "\(dropped) is hop-by-hop")
        }
        #expect(echo.headers["via"] == "1.1 fts-tokend")
        #expect(echo.headers["host"] == "127.0.0.1:\(harness.port)", "Host is the upstream's")
        #expect(Self.header("Via", in: answer.headers) == "1.1 fts-tokend")
        #expect(harness.mock.stats.loginRequests == 1)
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    /// The proxy's debug line per request follows the `logLevel` of a reload, as the daemon's own do.
    @Test func aReloadedLogLevelReachesTheProxysRequestLines() async throws {
        let harness = try await Self.harness()
        try harness.writeConfig(logLevel: "info")
        let daemon = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        #expect(try await Command.curl("/api/echo", socket: Self.apiSocket(harness)).status == 200)
        #expect(!daemon.standardError.contains("event=proxy_request"))
        try harness.writeConfig(logLevel: "debug")
        harness.notify.reset()
        daemon.signal(SIGHUP)
        #expect(await harness.waitUntilReady(timeout: 60) != nil)
        #expect(try await Command.curl("/api/echo", socket: Self.apiSocket(harness)).status == 200)
        #expect(daemon.standardError.contains("event=proxy_request method=GET ms="), "\(daemon.standardError)")
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func withNoValidTokenTheProxyAnswers503AndNeverCallsTheUpstream() async throws {
        let harness = try await Self.harness()
        harness.mock.always(.status(503))
        try harness.start()
        #expect(await eventually(timeout: 60) { FileManager.default.fileExists(atPath: Self.apiSocket(harness)) })
        let answer = try await Command.curl("/api/echo", socket: Self.apiSocket(harness))
        #expect(answer.status == 503)
        #expect(Self.header("Retry-After", in: answer.headers).flatMap { Int($0) } ?? 0 >= 1)
        let stats = harness.mock.stats
        #expect(stats.apiAccepted + stats.apiRejected == 0, "the upstream saw nothing")
        await harness.stop()
    }

    @Test func aTokenRevokedServerSideIsReplacedAndTheRequestReplayedOnce() async throws {
        let harness = try await Self.harness()
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        #expect(harness.mock.revokeAll() >= 1)
        let answer = try await Command.curl("/api/echo", socket: Self.apiSocket(harness))
        #expect(answer.status == 200, "replayed with the next token: \(answer.body)")
        #expect(Self.echo(answer.body)?.tokenValid == true)
        #expect(harness.mock.stats.loginRequests == 2, "one forced login")
        #expect(harness.mock.stats.apiRejected == 1 && harness.mock.stats.apiAccepted == 1)
        #expect(await eventually(timeout: 60) { harness.token != first })
        let metrics = try await Command.curl("/metrics", socket: harness.socketPath).body
        #expect(metrics.contains(#"fts_tokend_proxy_rejections_total{result="replayed"} 1"#))
        #expect(metrics.contains(#"fts_tokend_forced_refresh_total{outcome="accepted"} 1"#))
        #expect(
            await eventually(timeout: 60) {
                harness.child?.standardError.contains("event=token_rejected") == true
            }
        )
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func aRejectedPostIsNotReplayedButSaysARefreshStarted() async throws {
        let harness = try await Self.harness()
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let first = try #require(harness.token)
        _ = harness.mock.revokeAll()
        let answer = try await Command.curl(
            "/api/echo",
            socket: Self.apiSocket(harness),
            extra: ["-X", "POST", "--data-binary", "order=1"]
        )
        #expect(answer.status == 401, "a POST is not sent twice")
        #expect(Self.header("X-Token-Refresh", in: answer.headers) == "started")
        #expect(harness.mock.stats.apiRejected == 1 && harness.mock.stats.apiAccepted == 0)
        #expect(
            await eventually(timeout: 60) { harness.token != first && harness.token.map(harness.mock.accepts) == true }
        )
        let again = try await Command.curl(
            "/api/echo",
            socket: Self.apiSocket(harness),
            extra: ["-X", "POST", "--data-binary", "order=1"]
        )
        #expect(again.status == 200)
        #expect(harness.mock.stats.loginRequests == 2)
        await harness.stop()
    }

    @Test func largeBodiesStreamBothWaysByteForByte() async throws {
        let harness = try await Self.harness()
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        // Up: 5 MB, past the replay buffer, so it streams.
        var upload = [UInt8](repeating: 0, count: 5 << 20)
        for index in upload.indices { upload[index] = UInt8(truncatingIfNeeded: index &* 7 &+ index >> 9) }
        let file = try harness.folder.write("upload.bin", "")
        try Data(upload).write(to: URL(fileURLWithPath: file))
        let up = try await Command.curl(
            "/api/echo",
            socket: Self.apiSocket(harness),
            extra: ["-X", "POST", "--data-binary", "@" + file, "-H", "Content-Type: application/octet-stream"]
        )
        #expect(up.status == 200)
        // curl sent `Expect: 100-continue` for a body this large: the proxy's 100 Continue comes first.
        #expect(up.headers.hasPrefix("HTTP/1.1 100 Continue"))
        let final = up.body.range(of: "\r\n\r\n").map { String(up.body[$0.upperBound...]) } ?? up.body
        let echo = try #require(Self.echo(final), "\(up.body)")
        #expect(echo.bodyLength == upload.count)
        #expect(echo.bodySHA256 == SHA256.hash(data: upload).map { String(format: "%02x", $0) }.joined())
        // Down: 20 MB, checked byte for byte.
        let downloaded = harness.folder.file("download.bin")
        let down = try await Command.run(
            "/usr/bin/curl",
            [
                "-s", "--max-time", "60", "--unix-socket", Self.apiSocket(harness), "-o", downloaded, "-w",
                "%{http_code}",
                "http://localhost/api/stream?bytes=\(20 << 20)",
            ]
        )
        #expect(down.output == "200")
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: downloaded)))
        #expect(bytes.count == 20 << 20)
        #expect(MockFTSServer.isStream(bytes))
        await harness.stop()
    }

    @Test func aBodyOverTheLimitIsRefusedWith413() async throws {
        let harness = try await Self.harness(#""maxRequestBodyBytes": 1000"#)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let declared = try await Command.curl(
            "/api/echo",
            socket: Self.apiSocket(harness),
            extra: ["-X", "POST", "--data-binary", String(repeating: "a", count: 2000)]
        )
        #expect(declared.status == 413)
        let chunked = try await Command.curl(
            "/api/echo",
            socket: Self.apiSocket(harness),
            extra: [
                "-X", "POST", "-H", "Transfer-Encoding: chunked", "--data-binary", String(repeating: "a", count: 2000),
            ]
        )
        #expect(chunked.status == 413)
        #expect(harness.mock.stats.apiAccepted == 0)
        await harness.stop()
    }

    @Test func anUnreachableUpstreamIs502() async throws {
        let harness = try await Self.harness(#""upstream": "http://127.0.0.1:9", "connectTimeoutSeconds": 2"#)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let answer = try await Command.curl("/api/echo", socket: Self.apiSocket(harness))
        #expect(answer.status == 502, "\(answer.body)")
        #expect(
            await eventually(timeout: 60) {
                harness.child?.standardError.contains("event=proxy_upstream_failed") == true
            }
        )
        await harness.stop()
    }

    /// The upstream closes a kept-alive connection just as the proxy reuses it (its idle timeout ran
    /// out between two requests): a GET is sent once more, on a new connection, and the client never
    /// knows; a POST, which the upstream may have acted on, is not sent twice and gets 502.
    @Test func aConnectionTheUpstreamClosedAsItWasReusedIsRetriedOnceForAGetOnly() async throws {
        let harness = try await Self.harness()
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let socket = Self.apiSocket(harness)
        #expect(try await Command.curl("/api/echo", socket: socket).status == 200)
        let connectionsBefore = harness.mock.stats.connectionsAccepted

        harness.mock.dropReusedConnections(1)
        let retried = try await Command.curl("/api/echo?n=2", socket: socket)
        #expect(retried.status == 200, "\(retried.body)")
        #expect(Self.echo(retried.body)?.query == "n=2")
        #expect(harness.mock.stats.reusedConnectionsDropped == 1, "the GET went out on the kept-alive connection")
        #expect(harness.mock.stats.connectionsAccepted == connectionsBefore + 1, "and again on one new connection")
        #expect(harness.mock.stats.apiAccepted == 2)
        #expect(harness.child?.standardError.contains("event=proxy_upstream_failed") == false)

        harness.mock.dropReusedConnections(1)
        let post = try await Command.curl(
            "/api/echo",
            socket: socket,
            extra: ["-X", "POST", "--data-binary", "order=1"]
        )
        #expect(post.status == 502, "a POST is not sent twice: \(post.body)")
        #expect(harness.mock.stats.reusedConnectionsDropped == 2)
        #expect(harness.mock.stats.apiAccepted == 2)
        #expect(
            await eventually(timeout: 60) {
                harness.child?.standardError.contains("event=proxy_upstream_failed") == true
            }
        )
        #expect(try await Command.curl("/api/echo", socket: socket).status == 200, "the proxy goes on serving")
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func theTCPListenerRefusesForeignHostsAndWebPages() async throws {
        let port = try Self.freePort()
        let harness = try await Self.harness(#""listen": "127.0.0.1:\#(port)""#)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        func get(_ headers: [String]) async throws -> (status: Int, body: String, headers: String) {
            let result = try await Command.run(
                "/usr/bin/curl",
                ["-s", "-i", "--max-time", "60", "-w", "\n%{http_code}"] + headers.flatMap { ["-H", $0] } + [
                    "http://127.0.0.1:\(port)/api/echo"
                ]
            )
            var lines = result.output.split(separator: "\n", omittingEmptySubsequences: false)
            let status = Int(lines.popLast() ?? "") ?? 0
            return (status, lines.joined(separator: "\n"), "")
        }
        #expect(try await get([]).status == 200)
        #expect(try await get(["Host: localhost:\(port)"]).status == 200)
        // DNS rebinding: a page whose name now resolves to 127.0.0.1.
        #expect(try await get(["Host: evil.example:\(port)"]).status == 421)
        // A page in a local browser.
        #expect(try await get(["Origin: https://evil.example"]).status == 403)
        #expect(try await get(["Sec-Fetch-Site: cross-site"]).status == 403)
        #expect(harness.mock.stats.apiAccepted == 2)
        await harness.stop()
    }

    @Test func peersOutsideTheProxysAllowListsGet403() async throws {
        let harness = try await Self.harness(#""allowUIDs": [0]"#)
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        // Let uid/gid 65534 reach the socket file, so that only the peer check can refuse it.
        chmod(harness.folder.path, 0o711)
        chown(harness.folder.file("run"), 0, 65534)
        chown(Self.apiSocket(harness), 0, 65534)
        let outsider = try await Command.curl("/api/echo", socket: Self.apiSocket(harness), as: (65534, 65534))
        #expect(outsider.status == 403)
        let root = try await Command.curl("/api/echo", socket: Self.apiSocket(harness))
        #expect(root.status == 200)
        #expect(harness.mock.stats.apiAccepted == 1)
        #expect(
            await eventually(timeout: 60) {
                harness.child?.standardError.contains("event=peer_refused gid=65534 listener=proxy method=GET pid=")
                    == true
            }
        )
        await harness.stop()
    }

    /// A loopback port nothing listens on now (bound, read, closed).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard bound else { throw POSIXError(.EADDRINUSE) }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

/// The proxy under many clients, revocations in a row, and clients that stop reading.
@Suite struct ProxyLoadTests {
    /// `body`'s result, and how far above its level before `body` the resident memory of process
    /// `pid` rose meanwhile (KiB; sampled every 20 ms).
    static func rssGrowth<T>(
        of pid: Int32,
        during body: () async throws -> T
    ) async throws -> (T, Int) {
        let before = try #require(ProcessFigures(pid: pid)).rssKiB
        let sampler = Task {
            var peak = before
            while !Task.isCancelled {
                peak = max(peak, ProcessFigures(pid: pid)?.rssKiB ?? 0)
                try? await Task.sleep(for: .milliseconds(20))
            }
            return peak
        }
        let result = try await body()
        sampler.cancel()
        return (result, await sampler.value - before)
    }

    @Test func aHundredConcurrentRequestsThatSeeTheRevocationCauseOneLogin() async throws {
        let harness = try await ProxyTests.harness()
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        _ = harness.mock.revokeAll()
        let answers = try await UnixSocketClient.concurrentRequests(
            "GET /api/echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            count: 100,
            socket: ProxyTests.apiSocket(harness)
        )
        #expect(answers.filter { $0.status == 200 }.count == 100, "\(Set(answers.map(\.status)))")
        #expect(answers.allSatisfy { ProxyTests.echo($0.body)?.tokenValid == true })
        #expect(harness.mock.stats.loginRequests == 2, "one forced login for all of them")
        harness.expectNoSecretsInOutput()
        await harness.stop()
    }

    @Test func aSecondRevocationWithinTheFloorGetsNoSecondLogin() async throws {
        let harness = try await ProxyTests.harness()
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        _ = harness.mock.revokeAll()
        #expect(try await Command.curl("/api/echo", socket: ProxyTests.apiSocket(harness)).status == 200)
        _ = harness.mock.revokeAll()
        let second = try await Command.curl("/api/echo", socket: ProxyTests.apiSocket(harness))
        #expect(second.status == 401, "within refresh.minForcedRefreshSeconds (30 s): the rejection goes back")
        #expect(ProxyTests.header("X-Token-Refresh", in: second.headers) == "rate-limited")
        #expect(harness.mock.stats.loginRequests == 2)
        await harness.stop()
    }

    @Test func aClientThatStopsReadingAStreamedAnswerCostsTheDaemonNoMemory() async throws {
        let harness = try await ProxyTests.harness()
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        // Warm up the pool and the allocator with one whole answer.
        _ = try await Command.curl(
            "/api/stream?bytes=\(1 << 20)",
            socket: ProxyTests.apiSocket(harness),
            extra: ["-o", "/dev/null"]
        )
        let stalled = try UnixSocketClient(socket: ProxyTests.apiSocket(harness))
        // Whatever the kernel buffers hold, the daemon holds no more than a part or two: sampled for
        // 3 s (each sample is a moment the daemon could have been filling up).
        let (_, growth) = try await Self.rssGrowth(of: child.pid) {
            try await stalled.send(Array("GET /api/stream?bytes=\(1 << 30) HTTP/1.1\r\nHost: localhost\r\n\r\n".utf8))
            try await Task.sleep(for: .seconds(3))
        }
        #expect(growth < 4096, "RSS grew \(growth) KiB while a client read nothing of a 1 GiB answer")
        // Others are served meanwhile.
        #expect(try await Command.curl("/api/echo", socket: ProxyTests.apiSocket(harness)).status == 200)
        Scenario.report(growth < 4096, "a client stops reading a 1 GiB answer through the proxy: RSS +\(growth) KiB")
        _ = stalled
        await harness.stop()
    }

    @Test func aHundredMegabyteAnswerStreamsThroughWithoutGrowth() async throws {
        let harness = try await ProxyTests.harness()
        let child = try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        _ = try await Command.curl(
            "/api/stream?bytes=\(1 << 20)",
            socket: ProxyTests.apiSocket(harness),
            extra: ["-o", "/dev/null"]
        )
        let (download, growth) = try await Self.rssGrowth(of: child.pid) {
            try await Command.run(
                "/usr/bin/curl",
                [
                    "-s", "--max-time", "120", "--unix-socket", ProxyTests.apiSocket(harness), "-o", "/dev/null",
                    "-w", "%{http_code} %{size_download}", "http://localhost/api/stream?bytes=\(100_000_000)",
                ]
            )
        }
        #expect(download.output == "200 100000000")
        #expect(growth < 4096, "RSS grew \(growth) KiB while 100 MB passed")
        Scenario.report(growth < 4096, "100 MB answer through the proxy: RSS +\(growth) KiB (peak during the transfer)")
        await harness.stop()
    }
}
