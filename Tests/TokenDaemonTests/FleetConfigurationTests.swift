import TestSupport
import Testing

@testable import TokenDaemon

/// `fleet` in the configuration (README "Fleet"): the database URL's rules and the member's name.
@Suite struct FleetConfigurationTests {
    private func parse(_ fleet: [String: Any]) throws -> Configuration.Fleet? {
        try ConfigurationParser().parse(config { set(&$0, "fleet", fleet) }).fleet
    }

    private func url(_ text: String) throws -> DatabaseURL {
        try DatabaseURL(text, at: "fleet.url")
    }

    @Test func withoutFleetTheHostIsAlone() throws {
        #expect(try ConfigurationParser().parse(config { _ in }).fleet == nil)
    }

    @Test func aFullFleetBlockIsRead() throws {
        let fleet = try #require(
            try parse([
                "url": "postgresql://fts_tokend@db.internal:5433/fts_tokend?sslmode=verify-full",
                "passwordFile": "/etc/fts-tokend/fleet-password", "caFile": "/etc/fts-tokend/db-ca.pem",
                "member": "web-01",
            ])
        )
        #expect(fleet.url.user == "fts_tokend")
        #expect(fleet.url.host == .tcp("db.internal"))
        #expect(fleet.url.port == 5433)
        #expect(fleet.url.database == "fts_tokend")
        #expect(fleet.url.tls == .verifyFull)
        #expect(fleet.passwordFile == "/etc/fts-tokend/fleet-password")
        #expect(fleet.caFile == "/etc/fts-tokend/db-ca.pem")
        #expect(fleet.member == "web-01")
    }

    @Test func tlsIsVerifiedUnlessSaidOtherwiseAndThePortDefaults() throws {
        let parsed = try url("postgres://member@db.internal/tokens")
        #expect(parsed.tls == .verifyFull)
        #expect(parsed.port == 5432)
        #expect(try url("postgresql://m@db.internal/t?sslmode=require").tls == .require)
    }

    @Test(arguments: [
        "postgresql://m@127.0.0.1/t?sslmode=disable", "postgresql://m@127.9.9.9:6000/t?sslmode=disable",
        "postgresql://m@[::1]:5432/t?sslmode=disable", "postgresql://m@localhost/t?sslmode=disable",
    ])
    func noTLSIsAllowedToLoopback(_ text: String) throws {
        #expect(try url(text).tls == .disable)
    }

    @Test func aUnixSocketFolderCarriesNoTLS() throws {
        let parsed = try url("postgresql://fts_tokend@%2Frun%2Fpostgresql/fts_tokend")
        #expect(parsed.host == .unixSocket(folder: "/run/postgresql"))
        #expect(parsed.tls == .disable)
        #expect(throws: ConfigurationError.self) { try url("postgresql://m@%2Frun%2Fpostgresql/t?sslmode=require") }
    }

    @Test func anIPv6AddressWithItsPort() throws {
        let parsed = try url("postgresql://m@[fd00::5]:6432/t")
        #expect(parsed.host == .tcp("fd00::5"))
        #expect(parsed.port == 6432)
    }

    /// The URL is shown in status, logs and `check --show`: a password in it is refused, and the
    /// error never repeats it.
    @Test(arguments: [
        "postgresql://fts:hunter2-secret@db.internal/t", "postgresql://fts:hunter2-secret@%2Frun%2Fpg/t",
        "postgresql://fts:@db.internal/t",
    ])
    func aPasswordInTheURLIsRefusedWithoutBeingRepeated(_ text: String) throws {
        let error = try #require(throws: ConfigurationError.self) { try parse(["url": text]) }
        #expect("\(error)".contains("must not carry a password"))
        #expect(!"\(error)".contains("hunter2"))
        #expect(!"\(error)".contains(text))
    }

    @Test(arguments: [
        // No TLS over a network.
        "postgresql://m@db.internal/t?sslmode=disable", "postgresql://m@10.0.0.5/t?sslmode=disable",
        // libpq's other modes would not check the server.
        "postgresql://m@db.internal/t?sslmode=prefer", "postgresql://m@db.internal/t?sslmode=allow",
        // Anything else in the query, twice sslmode, a fragment.
        "postgresql://m@db.internal/t?password=x", "postgresql://m@db.internal/t?sslmode=require&sslmode=disable",
        "postgresql://m@db.internal/t#x",
        // No user, no database, no host, a bad port, another scheme.
        "postgresql://db.internal/t", "postgresql://m@db.internal", "postgresql://m@db.internal/",
        "postgresql://m@/t", "postgresql://m@db.internal:0/t", "postgresql://m@db.internal:99999/t",
        "postgresql://m@db.internal:x/t", "mysql://m@db.internal/t", "https://m@db.internal/t",
        // Broken escapes, a relative socket folder, NUL.
        "postgresql://m@%2/t", "postgresql://m@%2Frun%2F..%2Fx/t", "postgresql://m@db/t%00",
        "postgresql://m@[::1/t",
    ])
    func aURLThatCouldMislead(_ text: String) {
        #expect(throws: ConfigurationError.self) { try parse(["url": text]) }
    }

    @Test(arguments: ["web 01", "", "web/01", "web;drop", String(repeating: "a", count: 65), "wéb"])
    func aMemberNameThatWouldNotReadTheSameEverywhere(_ name: String) {
        #expect(throws: ConfigurationError.self) {
            try parse(["url": "postgresql://m@db.internal/t", "member": name])
        }
    }

    /// A configuration with `fleet` in `folder`; `fleet` is the block's members as JSON.
    func writeConfig(_ folder: TemporaryDirectory, fleet: String) throws -> String {
        try folder.write(
            "config.json",
            #"{"api":{"baseURL":"https://x.example","email":"e@x","password":"pw","apiKey":"k-1"},"#
                + #""outputs":{"tokenFile":{"path":"/run/t"}},"fleet":{"url":"postgresql://m@db.internal/t""#
                + fleet + "}}",
            mode: 0o600
        )
    }

    @Test func theFleetPasswordComesFromItsFileThenTheCredentialElseThereIsNone() throws {
        let folder = try TemporaryDirectory()
        let file = try folder.write("fleet-password-file", "from-file\n", mode: 0o600)
        try folder.write("credentials/fleet-password", "from-credential\n", mode: 0o600)
        let credentials = ["CREDENTIALS_DIRECTORY": folder.file("credentials")]
        let withFile = try writeConfig(folder, fleet: #","passwordFile":""# + file + #"""#)
        #expect(try ConfigurationLoader(environment: credentials).load(path: withFile).fleetPassword == "from-file")
        let withoutFile = try writeConfig(folder, fleet: "")
        #expect(
            try ConfigurationLoader(environment: credentials).load(path: withoutFile).fleetPassword == "from-credential"
        )
        #expect(try ConfigurationLoader(environment: [:]).load(path: withoutFile).fleetPassword == nil)
    }

    @Test func aFleetPasswordFileEveryoneMayReadIsRefused() throws {
        let folder = try TemporaryDirectory()
        let file = try folder.write("fleet-password-file", "readable\n", mode: 0o644)
        let path = try writeConfig(folder, fleet: #","passwordFile":""# + file + #"""#)
        let error = try #require(throws: ConfigurationError.self) {
            try ConfigurationLoader(environment: [:]).load(path: path)
        }
        #expect("\(error)".contains("fleet.passwordFile"))
    }

    @Test func unknownKeysAreErrors() {
        #expect(throws: ConfigurationError.self) {
            try parse(["url": "postgresql://m@db.internal/t", "password": "x"])
        }
    }
}

/// What a reload may change in fleet mode (README "Signals"): the link and the key are made at start.
@Suite struct FleetReloadTests {
    func fleetConfiguration() throws -> LoadedConfiguration {
        var loaded = CoreFixtures.configuration()
        loaded.configuration.fleet = Configuration.Fleet(
            url: try DatabaseURL("postgresql://m@db.internal/t", at: "fleet.url"),
            passwordFile: nil,
            caFile: nil,
            member: "web-01"
        )
        return loaded
    }

    @Test func aReloadOfTheFleetSettingsOrTheAccountsSecretsNeedsARestart() throws {
        let running = try fleetConfiguration()
        var renamed = running
        renamed.configuration.fleet?.member = "web-02"
        #expect(
            ConfigChange(from: running, to: renamed, socketActivated: false).needsRestart == "fleet settings changed"
        )
        var newPassword = running
        newPassword.secrets.password = "another-password"
        #expect(
            ConfigChange(from: running, to: newPassword, socketActivated: false).needsRestart
                == "the account's secrets changed in fleet mode (the fleet's key derives from them)"
        )
        var newDatabasePassword = running
        newDatabasePassword.fleetPassword = "another-database-password"
        #expect(ConfigChange(from: running, to: newDatabasePassword, socketActivated: false).needsRestart != nil)
        // Without fleet mode a new password applies at the next login.
        let plain = CoreFixtures.configuration()
        var plainNewPassword = plain
        plainNewPassword.secrets.password = "another-password"
        #expect(ConfigChange(from: plain, to: plainNewPassword, socketActivated: false).needsRestart == nil)
    }
}
