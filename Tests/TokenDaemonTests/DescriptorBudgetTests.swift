import Testing

@testable import TokenDaemon

/// One descriptor budget for the token socket, the proxy's clients and its upstream connections
/// (`DescriptorBudget`), from an injected limit.
@Suite struct DescriptorBudgetTests {
    static func outputs(socket: Int? = 512, proxy: Int? = 512, upstream: Int = 64) -> Configuration.Outputs {
        var outputs = Configuration.Outputs()
        outputs.socket = socket.map {
            Configuration.Socket(
                path: "/run/x/tokend.sock",
                mode: 0o660,
                allowUIDs: [],
                allowGIDs: [],
                maxConnections: $0
            )
        }
        if let proxy {
            var settings = CoreFixtures.proxy()
            settings.maxConnections = proxy
            settings.maxUpstreamConnections = upstream
            outputs.proxy = settings
        }
        return outputs
    }

    @Test func whatFitsIsServedAsConfiguredWithoutAWarning() {
        let budget = DescriptorBudget(outputs: Self.outputs(), socketActivated: false, descriptorLimit: 65_536)
        #expect(budget.socketConnections == 512 && budget.proxyConnections == 512 && budget.upstreamConnections == 64)
        #expect(budget.warning == nil)
        let unlimited = DescriptorBudget(outputs: Self.outputs(), socketActivated: false, descriptorLimit: nil)
        #expect(unlimited.socketConnections == 512 && unlimited.warning == nil)
    }

    /// Attack (the review's): under `LimitNOFILE=1024`, 512 proxy and 512 socket connections left
    /// nothing for a login (EMFILE) and new socket clients unanswered. Together they now stay
    /// within the limit less the reserve, in proportion, and the warning says so.
    @Test func bothSocketsAndTheUpstreamShareOneLimitLessTheReserve() {
        let budget = DescriptorBudget(outputs: Self.outputs(), socketActivated: false, descriptorLimit: 1024)
        let total = (budget.socketConnections ?? 0) + (budget.proxyConnections ?? 0) + (budget.upstreamConnections ?? 0)
        #expect(total <= 1024 - DescriptorBudget.reserved, "\(budget)")
        #expect(budget.socketConnections == 451 && budget.proxyConnections == 451 && budget.upstreamConnections == 56)
        let warning = budget.warning ?? ""
        #expect(warning.contains("the descriptor limit (1024) leaves 960 for connections, fewer than the 1088"))
        #expect(warning.contains("451 on the token socket (outputs.socket.maxConnections 512)"))
        #expect(warning.contains("56 to the upstream (outputs.proxy.maxUpstreamConnections 64)"))
    }

    @Test func eachPartKeepsOneAtLeastUnderATinyLimit() {
        let budget = DescriptorBudget(outputs: Self.outputs(), socketActivated: false, descriptorLimit: 10)
        #expect(budget.socketConnections == 1 && budget.proxyConnections == 1 && budget.upstreamConnections == 1)
    }

    @Test func aSocketPassedBySystemdCountsWithTheDefaultLimit() {
        let outputs = Self.outputs(socket: nil, proxy: nil)
        let budget = DescriptorBudget(outputs: outputs, socketActivated: true, descriptorLimit: 100)
        #expect(budget.socketConnections == 36 && budget.proxyConnections == nil)
        #expect(budget.warning?.contains("36 on the token socket (outputs.socket.maxConnections 512)") == true)
    }
}
