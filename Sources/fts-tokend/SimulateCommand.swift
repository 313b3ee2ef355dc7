import ArgumentParser
import TokenDaemon

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct SimulateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate",
        abstract:
            "Simulate a fleet running the real refresh policy: login peaks with and without jitter, and a mass restart.",
        discussion: "Simulated time, no network. Prints one line per scenario; --markdown prints a table."
    )

    @Option(help: "Hosts in the fleet.")
    var hosts = 10_000

    @Option(help: "Simulated hours.")
    var hours: Double = 24

    @Option(help: "Token lifetime the auth server grants, in seconds.")
    var ttl: Double = 3600

    @Option(help: "Hosts boot within this many seconds of each other (0: all at once).")
    var bootSpread: Double = 0

    @Option(help: "Seconds per counting bucket for the peak.")
    var bucket: Double = 60

    @Option(help: "Random seed (the same seed gives the same figures).")
    var seed: UInt64 = 1

    @Flag(help: "Print a Markdown table.")
    var markdown = false

    func validate() throws {
        guard hosts > 0, hours > 1, ttl > 0, bucket > 0, bootSpread >= 0 else {
            throw ValidationError("hosts, ttl and bucket must be positive, hours more than 1, boot-spread 0 or more")
        }
    }

    func run() throws {
        var base = FleetSimulation.Options()
        base.hosts = hosts
        base.durationSeconds = hours * 3600
        base.tokenLifetimeSeconds = ttl
        base.bootSpreadSeconds = bootSpread
        base.bucketSeconds = bucket
        base.warmUpSeconds = min(3600, base.durationSeconds / 4)
        base.seed = seed
        var noJitter = base
        noJitter.refresh.jitter = 0
        var restart = base
        restart.restartAtSeconds = base.durationSeconds / 2

        let scenarios = [
            ("default jitter (\(base.refresh.jitter))", base), ("no jitter", noJitter),
            ("default jitter, all hosts restart at half time", restart),
        ]
        if markdown {
            Console.out(
                "| scenario | logins | mean/s | peak/s (\(Int(bucket)) s buckets) | peak ÷ mean | logins per host per hour | logins caused by the restart |"
            )
            Console.out("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        }
        let outage = Self.outageAttempts(seed: seed)
        defer {
            Console.out(
                markdown
                    ? "\nLogin attempts in one hour of full outage without a valid token (default backoff): \(outage)"
                    : "outage: attempts-per-hour=\(outage)"
            )
        }
        for (name, options) in scenarios {
            let result = FleetSimulation(options).run()
            let figures = [
                String(result.logins), format(result.meanPerSecond), format(result.peakPerSecond),
                format(result.peakToMean),
                format(result.loginsPerHostPerHour),
                options.restartAtSeconds == nil ? "-" : String(result.loginsCausedByRestart),
            ]
            if markdown {
                Console.out("| \(name) | " + figures.joined(separator: " | ") + " |")
            } else {
                Console.out(
                    "\(name): logins=\(figures[0]) mean/s=\(figures[1]) peak/s=\(figures[2]) peak/mean=\(figures[3]) per-host-per-hour=\(figures[4]) restart-logins=\(figures[5])"
                )
            }
        }
    }

    /// Login attempts in one hour of full outage with no valid token, with the default backoff: one
    /// host's core against a server that fails every login.
    static func outageAttempts(seed: UInt64) -> Int {
        var options = FleetSimulation.Options()
        options.hosts = 1
        options.durationSeconds = 3600
        options.loginFailureRate = 1
        options.warmUpSeconds = 0
        options.seed = seed
        return FleetSimulation(options).run().logins
    }

    private func format(_ value: Double) -> String {
        String((value * 100).rounded() / 100)
    }
}
