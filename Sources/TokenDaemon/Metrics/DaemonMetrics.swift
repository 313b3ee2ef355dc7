import NIOConcurrencyHelpers
import Prometheus

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The daemon's Prometheus metrics, served on `/metrics` and written to `metricsFile`.
public final class DaemonMetrics: Sendable {
    /// Socket paths get their own label value; anything else is "other", so a scanner cannot grow the
    /// number of series.
    static let knownPaths = Set(SocketRoute.allCases.map(\.path))

    private let registry = PrometheusCollectorRegistry()
    private let expiry: Gauge
    private let validity: Gauge
    private let lastSuccess: Gauge
    private let minRemaining: Gauge
    private let loginDuration: DurationHistogram
    private let proxyUpstreamDuration: DurationHistogram
    /// Per-label counters, looked up once and kept (the registry would look them up on every call).
    private let counters = NIOLockedValueBox<[String: Counter]>([:])
    /// The socket's counters, keyed without building any string: this runs on every request.
    private let requestCounters = NIOLockedValueBox<[RequestKey: Counter]>([:])

    private struct RequestKey: Hashable {
        var path: String
        var status: Int
    }
    private let currentExpiry = NIOLockedValueBox<Date?>(nil)

    public init(version: String) {
        expiry = registry.makeGauge(
            descriptor: Self.name(
                "token_expiry_timestamp",
                "seconds",
                "Expiry of the current token, Unix seconds (server clock)."
            )
        )
        validity = registry.makeGauge(
            descriptor: Self.name(
                "token_validity",
                "seconds",
                "Seconds of validity the current token has left; 0 without a valid token."
            )
        )
        lastSuccess = registry.makeGauge(
            descriptor: Self.name(
                "last_success_timestamp",
                "seconds",
                "When the current token was obtained, Unix seconds."
            )
        )
        minRemaining = registry.makeGauge(
            descriptor: Self.name(
                "refresh_min_remaining",
                "seconds",
                "refresh.minRemainingSeconds: a refresh is never scheduled later than this before expiry."
            )
        )
        loginDuration = registry.makeDurationHistogram(
            descriptor: Self.name("login_duration", "seconds", "Time from sending a login to its outcome."),
            buckets: [
                .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
                .seconds(1), .seconds(2.5), .seconds(5), .seconds(10), .seconds(30),
            ]
        )
        proxyUpstreamDuration = registry.makeDurationHistogram(
            descriptor: Self.name(
                "proxy_upstream_duration",
                "seconds",
                "API proxy: time from sending a request upstream to the head of its answer."
            ),
            buckets: [
                .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
                .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10),
            ]
        )
        registry.makeGauge(
            descriptor: Self.name("build", "info", "Build information; always 1."),
            labels: [("version", version)]
        ).set(Double(1))
    }

    /// `fts_tokend_<metric>_<unit>`.
    static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "fts_tokend", metricName: metric, unitName: unit, helpText: help)
    }

    /// A login ended: `status` is the HTTP status when the server answered.
    public func loginFinished(ok: Bool, status: Int?, duration: Duration) {
        let statusClass = status.map { "\($0 / 100)xx" } ?? "none"
        counter(
            Self.name("logins", "total", "Logins by outcome and HTTP status class."),
            [("result", ok ? "ok" : "failed"), ("status_class", ok ? "2xx" : statusClass)]
        ).increment()
        loginDuration.record(duration)
        if status == 429 {
            counter(
                Self.name(
                    "login_rate_limited",
                    "total",
                    "Logins the server refused with 429 (FTS throttles accounts that log in too often)."
                ),
                []
            ).increment()
        }
    }

    /// The refresh settings alerts compare with (contrib/prometheus): set at every publication,
    /// so a reload's new values show at once.
    public func policy(minRemainingSeconds: Double) {
        minRemaining.set(minRemainingSeconds)
    }

    /// A token became current.
    public func tokenAdopted(_ grant: TokenGrant) {
        expiry.set(grant.expiresAt.timeIntervalSince1970)
        lastSuccess.set(grant.obtainedAt.timeIntervalSince1970)
        currentExpiry.withLockedValue { $0 = grant.localExpiry }
    }

    public func socketRequest(path: String, status: Int) {
        let key = RequestKey(path: Self.knownPaths.contains(path) ? path : "other", status: status)
        requestCounters.withLockedValue { cache in
            if let counter = cache[key] { return counter }
            let counter = registry.makeCounter(
                descriptor: Self.name("socket_requests", "total", "Socket requests by path and HTTP status."),
                labels: [("path", key.path), ("code", String(key.status))]
            )
            cache[key] = counter
            return counter
        }.increment()
    }

    /// A socket connection was closed on accept (`refused`: every slot in a long poll) or to make
    /// room for a new one (`evicted`).
    public func socketConnectionDropped(_ reason: String) {
        counter(
            Self.name(
                "socket_connections_dropped",
                "total",
                "Socket connections closed at the connection limit, by reason."
            ),
            [("reason", reason)]
        ).increment()
    }

    /// A request through the API proxy was answered: by the upstream (`byUpstream`) or by the proxy
    /// itself (refused, no token, upstream unreachable). Status classes only: the upstream chooses
    /// the codes, and must not choose how many series there are.
    public func proxyRequest(method: String, status: Int, byUpstream: Bool) {
        let key = ProxyKey(
            method: Self.knownMethods.contains(method) ? method : "other",
            statusClass: min(max(status / 100, 1), 5),
            byUpstream: byUpstream
        )
        proxyCounters.withLockedValue { cache in
            if let counter = cache[key] { return counter }
            let counter = registry.makeCounter(
                descriptor: Self.name(
                    "proxy_requests",
                    "total",
                    "API proxy answers by method, status class and source (upstream, proxy)."
                ),
                labels: [
                    ("method", key.method), ("code", "\(key.statusClass)xx"),
                    ("source", byUpstream ? "upstream" : "proxy"),
                ]
            )
            cache[key] = counter
            return counter
        }.increment()
    }

    /// The proxy's counters, keyed without building any string (this runs on every request).
    private struct ProxyKey: Hashable {
        var method: String
        var statusClass: Int
        var byUpstream: Bool
    }
    private let proxyCounters = NIOLockedValueBox<[ProxyKey: Counter]>([:])

    /// Methods with their own label value; a client's invented ones count as "other".
    static let knownMethods: Set<String> = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    /// The upstream rejected the proxy's token: the request was `replayed` with the next one, or the
    /// rejection `forwarded` to the client (not replayable, no new token, rate limited).
    public func proxyRejection(replayed: Bool) {
        counter(
            Self.name("proxy_rejections", "total", "Upstream rejections of the proxy's token, by what followed."),
            [("result", replayed ? "replayed" : "forwarded")]
        ).increment()
    }

    /// The proxy answered a request itself instead of forwarding it (`ProxyRules.Refusal.Reason`).
    public func proxyRefusal(_ reason: String) {
        counter(
            Self.name(
                "proxy_refusals",
                "total",
                "Requests the API proxy answered itself (405, 403, 413, 421, 501, 503), by reason."
            ),
            [("reason", reason)]
        ).increment()
    }

    /// The proxy closed a client connection that stalled: a request body that stopped arriving
    /// (`stalled_body`), an answer the client stopped reading (`unread_answer`).
    public func proxyConnectionClosed(_ reason: String) {
        counter(
            Self.name(
                "proxy_connections_closed",
                "total",
                "API proxy client connections closed by the proxy, by reason."
            ),
            [("reason", reason)]
        ).increment()
    }

    /// Sets the proxy's upstream connection gauges (`busy`: serving a request or being made;
    /// `idle`: kept alive for the next) and the requests waiting for one. The gauges are looked up
    /// once, here; the setter is called as the pool changes.
    public func proxyUpstreamPoolGauges() -> @Sendable (_ busy: Int, _ idle: Int, _ waiting: Int) -> Void {
        let connections = Self.name(
            "proxy_upstream_connections",
            "",
            "API proxy: connections to the upstream by state (busy, idle)."
        )
        let busy = gauge(connections, [("state", "busy")])
        let idle = gauge(connections, [("state", "idle")])
        let waiting = gauge(
            Self.name("proxy_upstream_waiting", "", "API proxy: requests waiting for an upstream connection."),
            []
        )
        return { busyCount, idleCount, waitingCount in
            busy.set(Double(busyCount))
            idle.set(Double(idleCount))
            waiting.set(Double(waitingCount))
        }
    }

    /// Time from sending a request upstream to its answer's head.
    public func proxyUpstreamHead(_ duration: Duration) {
        proxyUpstreamDuration.record(duration)
    }

    /// A rejected-token report was answered.
    public func forcedRefresh(_ outcome: DaemonCore.RejectionOutcome) {
        counter(
            Self.name("forced_refresh", "total", "Rejected-token reports by outcome (accepted, stale, rate_limited)."),
            [("outcome", Self.label(outcome))]
        ).increment()
    }

    /// The `outcome` label of a rejected-token report (also its log field).
    static func label(_ outcome: DaemonCore.RejectionOutcome) -> String {
        switch outcome {
        case .accepted: "accepted"
        case .stale: "stale"
        case .rateLimited: "rate_limited"
        }
    }

    /// The Prometheus text exposition as of `now`.
    public func render(now: Date) -> [UInt8] {
        let remaining = currentExpiry.withLockedValue { $0 }.map { max(0, $0.timeIntervalSince(now)) } ?? 0
        validity.set(remaining)
        return registry.emitToBuffer()
    }

    private func gauge(_ descriptor: MetricNameDescriptor, _ labels: [(String, String)]) -> Gauge {
        Self.cached(in: gauges, descriptor, labels) { registry.makeGauge(descriptor: $0, labels: $1) }
    }
    private let gauges = NIOLockedValueBox<[String: Gauge]>([:])

    private func counter(_ descriptor: MetricNameDescriptor, _ labels: [(String, String)]) -> Counter {
        Self.cached(in: counters, descriptor, labels) { registry.makeCounter(descriptor: $0, labels: $1) }
    }

    /// The metric of `descriptor` with `labels`, made once and then looked up by name and labels.
    private static func cached<Metric>(
        in cache: NIOLockedValueBox<[String: Metric]>,
        _ descriptor: MetricNameDescriptor,
        _ labels: [(String, String)],
        make: (MetricNameDescriptor, [(String, String)]) -> Metric
    ) -> Metric {
        let key = descriptor.name + labels.map { "|\($0.0)=\($0.1)" }.joined()
        return cache.withLockedValue { cache in
            if let metric = cache[key] { return metric }
            let metric = make(descriptor, labels)
            cache[key] = metric
            return metric
        }
    }
}
