import ArgumentParser
import Glibc
import MockFTS
import TokenDaemon

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct MockServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mock-server",
        abstract: "Run the mock FTS auth server on loopback (for tests and trials, never production).",
        discussion: """
            Serves POST /auth/token and /auth/login, GET /api/whoami, and for scripted faults \
            POST /_mock/faults and GET /_mock/stats. Without credential options it accepts the demo \
            account (see README).
            """
    )

    @Option(help: "Loopback address and port to listen on.")
    var listen = "127.0.0.1:8080"

    @Option(help: "Lifetime of issued tokens, in seconds.")
    var ttl: Double = 20

    @Flag(help: "Send expires in milliseconds, like later FTS deployments.")
    var expiresMs = false

    @Flag(help: "Keep one token per user, as some providers do: each login revokes the tokens issued before it.")
    var oneTokenPerUser = false

    @Option(help: "Accepted email.")
    var email = DemoAccount.email

    @Option(help: "File holding the accepted password.")
    var passwordFile: String?

    @Option(help: "File holding the accepted API key.")
    var apiKeyFile: String?

    @Option(help: "Serve HTTPS with this PEM certificate chain (needs --tls-key).")
    var tlsCertificate: String?

    @Option(help: "PEM private key for --tls-certificate.")
    var tlsKey: String?

    func validate() throws {
        guard let (host, _) = Self.split(listen) else {
            throw ValidationError("--listen must be HOST:PORT, such as 127.0.0.1:8080")
        }
        guard Loopback.isLoopback(host: host) else {
            throw ValidationError("--listen must be a loopback address: the mock accepts a test password")
        }
        guard ttl > 0 else { throw ValidationError("--ttl must be more than 0 seconds") }
        guard (tlsCertificate == nil) == (tlsKey == nil) else {
            throw ValidationError("--tls-certificate and --tls-key go together")
        }
    }

    func run() async throws {
        guard let (host, port) = Self.split(listen) else { throw ExitCode.validationFailure }
        var configuration = MockFTSServer.Configuration(
            apiKey: try Self.secret(apiKeyFile) ?? DemoAccount.apiKey,
            email: email,
            password: try Self.secret(passwordFile) ?? DemoAccount.password,
            tokenTTL: ttl,
            expiresInMilliseconds: expiresMs
        )
        configuration.oneTokenPerUser = oneTokenPerUser
        let server = MockFTSServer(configuration)
        let tls = tlsCertificate.flatMap { chain in
            tlsKey.map { MockFTSServer.TLSFiles(certificateChain: chain, privateKey: $0) }
        }
        let bound = try await server.start(host: host, port: port, tls: tls)
        Console.out(
            "mock FTS auth server on \(tls == nil ? "http" : "https")://\(host):\(bound) (token TTL \(FormatTime.seconds(ttl)))"
        )
        // Runs until killed; SIGTERM's default action ends the process.
        while true { try await Task.sleep(for: .seconds(3600)) }
    }

    static func split(_ address: String) -> (String, Int)? {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]),
            (0...65535).contains(port)
        else { return nil }
        var host = String(address[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }

    static func secret(_ path: String?) throws -> String? {
        guard let path else { return nil }
        do {
            var text = String(decoding: try SmallFile.read(path, limit: 64 * 1024).bytes, as: UTF8.self)
            while text.last?.isNewline == true { text.removeLast() }
            return text
        } catch {
            throw ValidationError("cannot read \(path): \(error)")
        }
    }
}

/// The fake account the demo and a bare `mock-server` use. Not a secret: it opens nothing real.
enum DemoAccount {
    static let email = "demo@example.com"
    static let password = "demo-password-not-secret"
    static let apiKey = "00000000-0000-4000-8000-000000000000"
}
