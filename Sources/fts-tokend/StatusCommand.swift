import ArgumentParser
import NIOCore
import TokenDaemon

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Summarise the daemon's health from its socket.",
        discussion:
            "Exit 0 while the daemon holds a valid token, 1 otherwise (also when no daemon answers): usable from monitoring."
    )

    @Option(help: "The daemon's socket.")
    var socket: String = SocketClient.defaultPath

    func run() async throws {
        let answer: SocketClient.Answer
        do {
            answer = try await SocketClient.get(SocketRoute.healthz.path, socket: socket, timeout: .seconds(10))
        } catch {
            Console.error(error.description)
            throw ExitCode.failure
        }
        guard let health = try? JSONDecoder().decode(TokenBoard.Health.self, from: Data(answer.body.utf8)) else {
            Console.error("unexpected answer from \(socket) (HTTP \(answer.status))")
            throw ExitCode.failure
        }
        Console.out(Self.describe(health, now: Date()))
        if answer.status != 200 { throw ExitCode.failure }
    }

    static func describe(_ health: TokenBoard.Health, now: Date) -> String {
        func when(_ text: String?) -> String? {
            guard let text, let date = try? Date(text, strategy: .iso8601) else { return text }
            let delta = date.timeIntervalSince(now)
            return delta >= 0
                ? "\(text) (in \(FormatTime.duration(delta)))" : "\(text) (\(FormatTime.duration(-delta)) ago)"
        }
        return [
            "status:       \(health.status)",
            "valid until:  \(when(health.expiresAt) ?? "no token")",
            "next refresh: \(when(health.nextRefreshAt) ?? "in progress")",
            "last success: \(when(health.lastSuccessAt) ?? "never")",
            "last error:   \(health.lastError ?? "none")",
        ].joined(separator: "\n")
    }
}
