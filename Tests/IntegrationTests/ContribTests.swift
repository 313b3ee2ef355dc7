import Foundation
import MockFTS
import TestSupport
import Testing

/// contrib/: the Grafana dashboard and the Prometheus rules name only series the daemon exports.
@Suite struct ContribTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// Every `fts_tokend_…` name in `text`.
    static func metricNames(in text: String) -> Set<String> {
        var names = Set<String>()
        var rest = Substring(text)
        while let start = rest.range(of: "fts_tokend_") {
            let name = rest[start.lowerBound...].prefix { $0.isLetter || $0.isNumber || $0 == "_" }
            names.insert(String(name))
            rest = rest[name.endIndex...]
        }
        return names
    }

    @Test func theDashboardAndTheAlertRulesNameOnlySeriesTheDaemonExports() async throws {
        let dashboardText = try String(
            contentsOf: Self.root.appendingPathComponent("contrib/grafana/fts-tokend.json"),
            encoding: .utf8
        )
        let dashboard = try #require(try JSONSerialization.jsonObject(with: Data(dashboardText.utf8)) as? [String: Any])
        let panels = try #require(dashboard["panels"] as? [[String: Any]])
        let exprs = panels.flatMap { ($0["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String } }
        #expect(exprs.count >= 8, "every panel has a query")
        let rules = try String(
            contentsOf: Self.root.appendingPathComponent("contrib/prometheus/fts-tokend.rules.yml"),
            encoding: .utf8
        )
        let referenced = Self.metricNames(in: exprs.joined(separator: "\n")).union(Self.metricNames(in: rules))

        // A daemon that has done everything once, so that every series exists: a rate-limited login,
        // socket requests, an evicted connection, proxied requests, a revoked token replayed.
        let harness = try await DaemonHarness(ttl: 600, socket: #""maxConnections": 2"#)
        harness.refresh.backoffInitialSeconds = 0.2
        harness.outputFiles += #", "proxy": { "path": "{folder}/run/api.sock" }"#
        try harness.writeConfig()
        harness.mock.enqueue(.status(429, retryAfter: "1"))
        try harness.start()
        #expect(await harness.waitUntilReady() != nil)
        let idle = try [UnixSocketClient(socket: harness.socketPath), UnixSocketClient(socket: harness.socketPath)]
        _ = try await Command.curl("/token", socket: harness.socketPath)
        let api = harness.folder.file("run/api.sock")
        #expect(try await Command.curl("/api/echo", socket: api).status == 200)
        _ = harness.mock.revokeAll()
        #expect(try await Command.curl("/api/echo", socket: api).status == 200)
        let metrics = try await Command.curl("/metrics", socket: harness.socketPath).body
        _ = idle
        let exported = Set(
            metrics.split(separator: "\n").filter { !$0.hasPrefix("#") }
                .map { String($0.prefix { $0 != "{" && $0 != " " }) }
        )
        let missing = referenced.subtracting(exported)
        #expect(missing.isEmpty, "named in contrib/ but not exported: \(missing.sorted())")
        #expect(referenced.count >= 12, "\(referenced.sorted())")
        await harness.stop()
    }
}
