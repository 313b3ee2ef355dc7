import TestSupport
import Testing

@testable import TokenDaemon

@Suite struct FleetSimulationTests {
    func options(
        hosts: Int = 200,
        jitter: Double = 0.05,
        bootSpread: Double = 0,
        restartAt: Double? = nil
    ) -> FleetSimulation.Options {
        var options = FleetSimulation.Options()
        options.hosts = hosts
        options.durationSeconds = 6 * 3600
        options.tokenLifetimeSeconds = 3600
        options.refresh.jitter = jitter
        options.bootSpreadSeconds = bootSpread
        options.restartAtSeconds = restartAt
        return options
    }

    /// Runs the simulation on a thread of its own: seconds of computing in a debug build, which on
    /// the concurrency pool would stall other tests (`onOwnThread`).
    func simulate(_ options: FleetSimulation.Options) async -> FleetSimulation.Result {
        await onOwnThread { FleetSimulation(options).run() }
    }

    @Test func withoutJitterASynchronisedFleetStaysSynchronised() async {
        let result = await simulate(options(jitter: 0))
        // Every host refreshes at the same instant: one bucket holds every login of a cycle.
        #expect(result.peakPerSecond * 60 == 200)
    }

    @Test func jitterSpreadsASynchronisedFleet() async {
        let synchronised = await simulate(options(jitter: 0))
        let jittered = await simulate(options())
        #expect(jittered.peakPerSecond < synchronised.peakPerSecond / 2)
    }

    @Test func aFleetBootingAtOnceIsSpreadWithinALifetimeByItsFirstRefresh() async {
        // 2,000 hosts boot in the same second; after the first hour the busiest minute is within
        // twice the mean (before cold starts drew their first refresh from a whole period: 13×).
        let result = await simulate(options(hosts: 2000))
        #expect(result.peakToMean <= 2, "peak ÷ mean \(result.peakToMean)")
        // The price: one early login per cold start, a few percent over six hours.
        #expect(result.loginsPerHostPerHour < 1.4)
    }

    @Test func aMassRestartWithStoredTokensCausesNoLogin() async {
        let result = await simulate(options(bootSpread: 3600, restartAt: 3 * 3600))
        #expect(result.loginsCausedByRestart == 0)
        let baseline = await simulate(options(bootSpread: 3600))
        #expect(abs(result.logins - baseline.logins) < baseline.logins / 50)
    }

    @Test func aRestartWithTokensNearExpiryLogsThoseHostsIn() async {
        var tight = options(bootSpread: 3600, restartAt: 3 * 3600)
        // Every stored token is "too close to expiry" when the margin is most of the lifetime.
        tight.refresh.minRemainingSeconds = 3000
        tight.refresh.refreshAt = 0.95
        #expect(await simulate(tight).loginsCausedByRestart > 0)
    }

    @Test func eachHostLogsInAboutOncePerRefreshPeriod() async {
        let result = await simulate(options(bootSpread: 3600))
        // Refresh at 0.75–0.8 of a one-hour lifetime: 1.25–1.33 logins per host per hour.
        #expect(result.loginsPerHostPerHour > 1.2 && result.loginsPerHostPerHour < 1.4)
    }

    @Test func theSameSeedGivesTheSameFigures() async {
        let first = await simulate(options())
        #expect(await simulate(options()) == first)
    }
}
