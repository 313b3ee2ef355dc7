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

    @Test func withoutJitterASynchronisedFleetStaysSynchronised() {
        let result = FleetSimulation(options(jitter: 0)).run()
        // Every host refreshes at the same instant: one bucket holds every login of a cycle.
        #expect(result.peakPerSecond * 60 == 200)
    }

    @Test func jitterSpreadsASynchronisedFleet() {
        let synchronised = FleetSimulation(options(jitter: 0)).run()
        let jittered = FleetSimulation(options()).run()
        #expect(jittered.peakPerSecond < synchronised.peakPerSecond / 2)
    }

    @Test func aFleetBootingAtOnceIsSpreadWithinALifetimeByItsFirstRefresh() {
        // 2,000 hosts boot in the same second; after the first hour the busiest minute is within
        // twice the mean (before cold starts drew their first refresh from a whole period: 13×).
        let result = FleetSimulation(options(hosts: 2000)).run()
        #expect(result.peakToMean <= 2, "peak ÷ mean \(result.peakToMean)")
        // The price: one early login per cold start, a few percent over six hours.
        #expect(result.loginsPerHostPerHour < 1.4)
    }

    @Test func aMassRestartWithStoredTokensCausesNoLogin() {
        let result = FleetSimulation(options(bootSpread: 3600, restartAt: 3 * 3600)).run()
        #expect(result.loginsCausedByRestart == 0)
        let baseline = FleetSimulation(options(bootSpread: 3600)).run()
        #expect(abs(result.logins - baseline.logins) < baseline.logins / 50)
    }

    @Test func aRestartWithTokensNearExpiryLogsThoseHostsIn() {
        var tight = options(bootSpread: 3600, restartAt: 3 * 3600)
        // Every stored token is "too close to expiry" when the margin is most of the lifetime.
        tight.refresh.minRemainingSeconds = 3000
        tight.refresh.refreshAt = 0.95
        #expect(FleetSimulation(tight).run().loginsCausedByRestart > 0)
    }

    @Test func eachHostLogsInAboutOncePerRefreshPeriod() {
        let result = FleetSimulation(options(bootSpread: 3600)).run()
        // Refresh at 0.75–0.8 of a one-hour lifetime: 1.25–1.33 logins per host per hour.
        #expect(result.loginsPerHostPerHour > 1.2 && result.loginsPerHostPerHour < 1.4)
    }

    @Test func theSameSeedGivesTheSameFigures() {
        #expect(FleetSimulation(options()).run() == FleetSimulation(options()).run())
    }
}
