#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOConcurrencyHelpers
import Prometheus

/// The daemon's Prometheus metrics, served on `/metrics` and written to `metricsFile`.
public final class DaemonMetrics: Sendable {
    /// Socket paths get their own label value; anything else is "other", so a scanner cannot grow the
    /// number of series.
    static let knownPaths: Set<String> = ["/token", "/token.json", "/headers", "/healthz", "/metrics"]

    private let registry = PrometheusCollectorRegistry()
    private let expiry: Gauge
    private let validity: Gauge
    private let lastSuccess: Gauge
    private let loginDuration: DurationHistogram
    /// Per-label counters, looked up once and kept (the registry would look them up on every call).
    private let counters = NIOLockedValueBox<[String: Counter]>([:])
    private let currentExpiry = NIOLockedValueBox<Date?>(nil)

    public init(version: String) {
        expiry = registry.makeGauge(name: "fts_tokend_token_expiry_timestamp_seconds", help: "Expiry of the current token, Unix seconds (server clock).")
        validity = registry.makeGauge(name: "fts_tokend_token_validity_seconds", help: "Seconds of validity the current token has left; 0 without a valid token.")
        lastSuccess = registry.makeGauge(name: "fts_tokend_last_success_timestamp_seconds", help: "When the current token was obtained, Unix seconds.")
        loginDuration = registry.makeDurationHistogram(
            name: "fts_tokend_login_duration_seconds",
            buckets: [.milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
                      .seconds(1), .seconds(2.5), .seconds(5), .seconds(10), .seconds(30)],
            help: "Time from sending a login to its outcome.")
        registry.makeGauge(name: "fts_tokend_build_info", labels: [("version", version)], help: "Build information; always 1.").set(Double(1))
    }

    /// A login ended: `status` is the HTTP status when the server answered.
    public func loginFinished(ok: Bool, status: Int?, duration: Duration) {
        let statusClass = status.map { "\($0 / 100)xx" } ?? "none"
        counter("fts_tokend_logins_total", [("result", ok ? "ok" : "failed"), ("status_class", ok ? "2xx" : statusClass)],
                help: "Logins by outcome and HTTP status class.").increment()
        loginDuration.record(duration)
    }

    /// A token became current.
    public func tokenAdopted(_ grant: TokenGrant) {
        expiry.set(grant.expiresAt.timeIntervalSince1970)
        lastSuccess.set(grant.obtainedAt.timeIntervalSince1970)
        currentExpiry.withLockedValue { $0 = grant.localExpiry }
    }

    public func socketRequest(path: String, status: Int) {
        let label = Self.knownPaths.contains(path) ? path : "other"
        counter("fts_tokend_socket_requests_total", [("path", label), ("code", String(status))],
                help: "Socket requests by path and HTTP status.").increment()
    }

    /// The Prometheus text exposition as of `now`.
    public func render(now: Date) -> [UInt8] {
        let remaining = currentExpiry.withLockedValue { $0 }.map { max(0, $0.timeIntervalSince(now)) } ?? 0
        validity.set(remaining)
        return registry.emitToBuffer()
    }

    private func counter(_ name: String, _ labels: [(String, String)], help: String) -> Counter {
        let key = name + labels.map { "|\($0.0)=\($0.1)" }.joined()
        return counters.withLockedValue { cache in
            if let counter = cache[key] { return counter }
            let counter = registry.makeCounter(name: name, labels: labels, help: help)
            cache[key] = counter
            return counter
        }
    }
}
