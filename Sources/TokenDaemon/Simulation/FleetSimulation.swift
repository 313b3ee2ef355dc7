#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Many hosts running the real `RefreshPolicy` against an auth server that always answers, in
/// simulated time: how logins spread over a fleet, and what a simultaneous restart of every host costs.
///
/// Each host logs in when it boots (within `bootSpreadSeconds` of the start), then whenever its policy
/// says; a login yields a token of `tokenLifetimeSeconds`. At `restartAtSeconds` every host restarts
/// at once and, like the daemon, reuses its stored token when more than `minRemainingSeconds` of it
/// remain, logging in only otherwise.
public struct FleetSimulation: Sendable {
    public struct Options: Sendable {
        public var hosts = 10_000
        public var durationSeconds: Double = 24 * 3600
        public var tokenLifetimeSeconds: Double = 3600
        public var refresh = Configuration.Refresh.defaults
        /// Hosts boot at uniformly random instants within this window (0: all at once).
        public var bootSpreadSeconds: Double = 0
        public var restartAtSeconds: Double?
        /// Logins are counted per bucket; peak and mean are per second within a bucket.
        public var bucketSeconds: Double = 60
        /// Logins in the first `warmUpSeconds` (the boot wave) are left out of the peak and mean.
        public var warmUpSeconds: Double = 3600
        public var seed: UInt64 = 1

        public init() {}
    }

    public struct Result: Sendable, Equatable {
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

    public func run() -> Result {
        let policy = RefreshPolicy(options.refresh)
        var random = SplitMix64(seed: options.seed)
        let epoch = Date(timeIntervalSince1970: 1_800_000_000)
        var grants = [TokenGrant?](repeating: nil, count: options.hosts)
        // Next login of each host, in seconds since the start; a min-heap orders them.
        var queue = MinHeap()
        for host in 0..<options.hosts {
            queue.push(random.unit() * options.bootSpreadSeconds, host)
        }
        let bucketCount = Int((options.durationSeconds / options.bucketSeconds).rounded(.up))
        var buckets = [Int](repeating: 0, count: bucketCount)
        var restartPending = options.restartAtSeconds != nil
        var restartLogins = 0
        /// Hosts whose process restarted and has not logged in since.
        var restarted = Set<Int>()

        /// `coldStart`: the host's process holds no token yet (it booted, or restarted without a
        /// usable stored one), as the daemon tells the policy.
        func login(_ host: Int, at time: Double) {
            let coldStart = grants[host] == nil || restarted.contains(host)
            restarted.remove(host)
            let now = epoch.addingTimeInterval(time)
            let grant = TokenGrant(token: "t", expiresAt: now.addingTimeInterval(options.tokenLifetimeSeconds), obtainedAt: now,
                                   userId: nil, tenantId: nil, clockSkew: 0)
            grants[host] = grant
            let bucket = Int(time / options.bucketSeconds)
            if bucket < bucketCount { buckets[bucket] += 1 }
            queue.push(policy.refreshTime(for: grant, now: now, random: random.unit(), coldStart: coldStart).timeIntervalSince(epoch), host)
        }

        while let (time, host) = queue.pop(), time < options.durationSeconds {
            if restartPending, let restart = options.restartAtSeconds, time >= restart {
                restartPending = false
                queue.push(time, host)
                restartAll(at: restart)
                continue
            }
            login(host, at: time)
        }

        func restartAll(at time: Double) {
            // Every host's process starts over: the schedule in memory is lost, the state file stays.
            queue = MinHeap()
            let now = epoch.addingTimeInterval(time)
            for host in 0..<options.hosts {
                if let stored = grants[host], stored.remaining(at: now) > options.refresh.minRemainingSeconds {
                    queue.push(policy.refreshTime(for: stored, now: now, random: random.unit()).timeIntervalSince(epoch), host)
                } else {
                    restartLogins += 1
                    restarted.insert(host)
                    login(host, at: time)
                }
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
            loginsPerHostPerHour: measuredSeconds > 0 ? Double(total) / Double(options.hosts) / (measuredSeconds / 3600) : 0)
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

/// A binary min-heap of (time, host).
struct MinHeap {
    private var items: [(Double, Int)] = []

    mutating func push(_ time: Double, _ host: Int) {
        items.append((time, host))
        var child = items.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child].0 < items[parent].0 else { break }
            items.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> (Double, Int)? {
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
