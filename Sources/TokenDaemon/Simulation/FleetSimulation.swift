#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Many hosts, each running the daemon's own `DaemonCore`, against a fake auth server, in simulated
/// time: how logins spread over a fleet, and what a simultaneous restart of every host costs.
///
/// Each host boots within `bootSpreadSeconds` of the start (no stored token), and its core decides
/// everything from then on: when to log in, how long to back off, whether a stored token is reused.
/// A login answers after `loginDelaySeconds` with a token of `tokenLifetimeSeconds`, or fails (HTTP
/// 503) with `loginFailureRate`; file writes always succeed. At `restartAtSeconds` every host's
/// process starts over with what its state file holds.
public struct FleetSimulation: Sendable {
    public struct Options: Sendable {
        public var hosts = 10_000
        public var durationSeconds: Double = 24 * 3600
        public var tokenLifetimeSeconds: Double = 3600
        public var refresh = Configuration.Refresh.defaults
        /// Hosts boot at uniformly random instants within this window (0: all at once).
        public var bootSpreadSeconds: Double = 0
        public var restartAtSeconds: Double?
        /// How long the fake server takes to answer a login.
        public var loginDelaySeconds: Double = 0
        /// Share of logins that fail (HTTP 503), drawn per login.
        public var loginFailureRate: Double = 0
        /// Logins are counted per bucket; peak and mean are per second within a bucket.
        public var bucketSeconds: Double = 60
        /// Logins in the first `warmUpSeconds` (the boot wave) are left out of the peak and mean.
        public var warmUpSeconds: Double = 3600
        public var seed: UInt64 = 1

        public init() {}
    }

    public struct Result: Sendable, Equatable {
        /// Login requests the server received.
        public var logins: Int
        /// Logins per second, averaged over the measured period.
        public var meanPerSecond: Double
        /// The busiest bucket's logins per second.
        public var peakPerSecond: Double
        public var peakToMean: Double { meanPerSecond > 0 ? peakPerSecond / meanPerSecond : 0 }
        /// Logins at the restart instant: hosts whose stored token was too close to expiry.
        public var loginsCausedByRestart: Int
        /// Logins per host per hour over the measured period (about 1 / (refreshAt × lifetime in hours)).
        public var loginsPerHostPerHour: Double
    }

    public var options: Options

    public init(_ options: Options) {
        self.options = options
    }

    /// What happens next to a host: its core's next deadline, or a login's answer.
    private enum Due {
        case wake
        case answer(generation: Int)
    }

    public func run() -> Result {
        var random = SplitMix64(seed: options.seed)
        let epoch = Date(timeIntervalSince1970: 1_800_000_000)
        let configuration = LoadedConfiguration(
            configuration: Configuration(
                api: .init(
                    baseURL: "https://auth.example",
                    tokenPath: "/auth/token",
                    email: .inline("svc@example.com"),
                    password: .inline("-"),
                    apiKey: .inline("-"),
                    timeoutSeconds: 30,
                    caFile: nil
                ),
                refresh: options.refresh,
                outputs: .init(tokenFile: .init(path: "/run/fts-tokend/token", mode: 0o640)),
                stateFile: "/var/lib/fts-tokend/state.json",
                logLevel: .info
            ),
            secrets: LoginSecrets(email: "svc@example.com", password: "-", apiKey: "-")
        )

        var cores: [DaemonCore?] = Array(repeating: nil, count: options.hosts)
        var stored = [TokenGrant?](repeating: nil, count: options.hosts)
        /// Each host's process: bumped at a restart, so that the old process's answers are dropped.
        var process = [Int](repeating: 0, count: options.hosts)
        /// The wake each host asked for last; an older one popped from the queue is stale.
        var wakeAt = [Double?](repeating: nil, count: options.hosts)
        var queue = MinHeap<(host: Int, process: Int, due: Due)>()

        let bucketCount = Int((options.durationSeconds / options.bucketSeconds).rounded(.up))
        var buckets = [Int](repeating: 0, count: bucketCount)
        var restartLogins = 0
        var restarting = false

        /// Hands `event` to the host's core at `time` and performs its actions as the daemon would.
        func deliver(_ event: DaemonCore.Event, to host: Int, at time: Double) {
            var inputs = [event]
            var next = 0
            while next < inputs.count, var core = cores[host] {
                let actions = core.handle(inputs[next], now: epoch.addingTimeInterval(time))
                cores[host] = core
                next += 1
                for action in actions {
                    switch action {
                    case .startLogin(let generation, _):
                        let bucket = Int(time / options.bucketSeconds)
                        if bucket < bucketCount { buckets[bucket] += 1 }
                        if restarting { restartLogins += 1 }
                        queue.push(
                            time + options.loginDelaySeconds,
                            (host, process[host], .answer(generation: generation))
                        )
                    case .writeFiles(let request):
                        inputs.append(.filesWritten(id: request.id, .init(written: [])))
                    case .saveState(let grant):
                        stored[host] = grant
                    default:
                        break
                    }
                }
            }
            if let deadline = cores[host]?.nextDeadline()?.timeIntervalSince(epoch) {
                let at = max(deadline, time)
                if wakeAt[host] != at {
                    wakeAt[host] = at
                    queue.push(at, (host, process[host], .wake))
                }
            }
        }

        /// A host's process starts: a new core with what the state file holds.
        func boot(_ host: Int, at time: Double) {
            process[host] += 1
            wakeAt[host] = nil
            cores[host] = DaemonCore(configuration: configuration, seed: random.next())
            deliver(.start(stored: stored[host].map { .success($0) } ?? .failure(.missing)), to: host, at: time)
        }

        for host in 0..<options.hosts {
            queue.push(random.unit() * options.bootSpreadSeconds, (host, process[host], .wake))
        }
        var restartPending = options.restartAtSeconds != nil
        while let (time, item) = queue.pop(), time < options.durationSeconds {
            if restartPending, let restart = options.restartAtSeconds, time >= restart {
                // Every host's process starts over: the schedule in memory is lost, the state file stays.
                restartPending = false
                queue.push(time, item)
                restarting = true
                for host in 0..<options.hosts { boot(host, at: restart) }
                restarting = false
                continue
            }
            let host = item.host
            guard item.process == process[host] else { continue }
            guard cores[host] != nil else {
                boot(host, at: time)
                continue
            }
            switch item.due {
            case .wake:
                guard wakeAt[host] == time else { continue }
                wakeAt[host] = nil
                deliver(.tick, to: host, at: time)
            case .answer(let generation):
                let now = epoch.addingTimeInterval(time)
                let result: Swift.Result<TokenResponseParser.Result, LoginError>
                if options.loginFailureRate > 0, random.unit() < options.loginFailureRate {
                    result = .failure(.httpStatus(503, retryAfter: nil))
                } else {
                    let grant = TokenGrant(
                        token: "t",
                        expiresAt: now.addingTimeInterval(options.tokenLifetimeSeconds),
                        obtainedAt: now,
                        userId: nil,
                        tenantId: nil,
                        clockSkew: 0
                    )
                    result = .success(.init(grant: grant, warnings: []))
                }
                deliver(.loginFinished(generation: generation, result), to: host, at: time)
            }
        }

        let firstMeasured = min(Int(options.warmUpSeconds / options.bucketSeconds), bucketCount)
        let measured = buckets[firstMeasured...]
        let measuredSeconds = Double(measured.count) * options.bucketSeconds
        let total = measured.reduce(0, +)
        return Result(
            logins: buckets.reduce(0, +),
            meanPerSecond: measuredSeconds > 0 ? Double(total) / measuredSeconds : 0,
            peakPerSecond: Double(measured.max() ?? 0) / options.bucketSeconds,
            loginsCausedByRestart: restartLogins,
            loginsPerHostPerHour: measuredSeconds > 0
                ? Double(total) / Double(options.hosts) / (measuredSeconds / 3600) : 0
        )
    }
}

/// A small, seedable generator (SplitMix64) so that simulations repeat exactly.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) {
        state = seed
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    mutating func unit() -> Double {
        Double(next() >> 11) / Double(1 << 53)
    }
}

/// A binary min-heap of (time, item), earliest first.
struct MinHeap<Item> {
    private var items: [(Double, Item)] = []

    mutating func push(_ time: Double, _ item: Item) {
        items.append((time, item))
        var child = items.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child].0 < items[parent].0 else { break }
            items.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> (Double, Item)? {
        guard !items.isEmpty else { return nil }
        items.swapAt(0, items.count - 1)
        let top = items.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var smallest = parent
            if left < items.count, items[left].0 < items[smallest].0 { smallest = left }
            if right < items.count, items[right].0 < items[smallest].0 { smallest = right }
            guard smallest != parent else { return top }
            items.swapAt(parent, smallest)
            parent = smallest
        }
    }
}
