import Foundation
import Testing

@testable import TokenDaemon

/// The series the alert rules and the dashboard rely on (contrib/prometheus, contrib/grafana).
@Suite struct DaemonMetricsTests {
    static func render(_ metrics: DaemonMetrics) -> String {
        String(decoding: metrics.render(now: Date()), as: UTF8.self)
    }

    @Test func aRateLimitedLoginIsCountedOnItsOwn() {
        let metrics = DaemonMetrics(version: "1")
        metrics.loginFinished(ok: false, status: 503, duration: .milliseconds(5))
        #expect(!Self.render(metrics).contains("fts_tokend_login_rate_limited_total"))
        metrics.loginFinished(ok: false, status: 429, duration: .milliseconds(5))
        metrics.loginFinished(ok: false, status: 429, duration: .milliseconds(5))
        let text = Self.render(metrics)
        #expect(text.contains("fts_tokend_login_rate_limited_total 2\n"), "\(text)")
        #expect(text.contains(#"fts_tokend_logins_total{result="failed",status_class="4xx"} 2"#))
    }

    @Test func theRefreshMarginFollowsThePolicy() {
        let metrics = DaemonMetrics(version: "1")
        metrics.policy(minRemainingSeconds: 120)
        #expect(Self.render(metrics).contains("fts_tokend_refresh_min_remaining_seconds 120.0\n"))
        metrics.policy(minRemainingSeconds: 30)
        #expect(Self.render(metrics).contains("fts_tokend_refresh_min_remaining_seconds 30.0\n"))
    }

    @Test func proxyAnswersAreCountedByMethodClassAndSourceWithBoundedLabels() {
        let metrics = DaemonMetrics(version: "1")
        metrics.proxyRequest(method: "GET", status: 200, byUpstream: true)
        metrics.proxyRequest(method: "GET", status: 204, byUpstream: true)
        metrics.proxyRequest(method: "BREW", status: 999, byUpstream: false)
        let text = Self.render(metrics)
        #expect(
            text.contains(#"fts_tokend_proxy_requests_total{method="GET",code="2xx",source="upstream"} 2"#),
            "\(text)"
        )
        #expect(
            text.contains(#"fts_tokend_proxy_requests_total{method="other",code="5xx",source="proxy"} 1"#),
            "\(text)"
        )
    }
}
