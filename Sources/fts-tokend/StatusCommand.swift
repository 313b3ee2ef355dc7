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
            "Shows the token's validity (by fingerprint), the next refresh, the last login's result, the forced-refresh floor and each file's last write and last error. Exit 0 while the daemon holds a valid token, 1 otherwise (also when no daemon answers): usable from monitoring."
    )

    @Option(help: "The daemon's socket.")
    var socket: String = SocketClient.defaultPath

    @Flag(help: "Print the daemon's /healthz document (JSON) as it sent it, for scripts.")
    var json = false

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
        Console.out(json ? answer.body.trimmingSuffix("\n") : Self.describe(health, now: Date()))
        if answer.status != 200 { throw ExitCode.failure }
    }

    /// The text form: one fact per line, times with how long ago or ahead they are.
    static func describe(_ health: TokenBoard.Health, now: Date) -> String {
        func when(_ text: String?) -> String? {
            guard let text, let date = try? Date(text, strategy: .iso8601) else { return text }
            let delta = date.timeIntervalSince(now)
            return delta >= 0
                ? "\(text) (in \(FormatTime.duration(delta)))" : "\(text) (\(FormatTime.duration(-delta)) ago)"
        }
        var lines = [
            "status:         \(health.status)",
            "token:          \(health.tokenFingerprint ?? "none")",
            "valid until:    \(when(health.expiresAt) ?? "no token")",
            "next refresh:   \(when(health.nextRefreshAt) ?? "in progress")",
            "last success:   \(when(health.lastSuccessAt) ?? "never")",
            "last error:     \(health.lastError ?? "none")",
        ]
        if let login = health.lastLogin {
            var line =
                "last login:     \(login.result), \(when(login.finishedAt) ?? login.finishedAt), took "
                + "\(Int((login.durationSeconds * 1000).rounded())) ms"
            if let fingerprint = login.tokenFingerprint { line += ", token \(fingerprint)" }
            if let error = login.error { line += ": \(error)" }
            lines.append(line)
        } else {
            lines.append("last login:     none yet")
        }
        if let forced = health.forcedRefresh {
            var line = "forced refresh: at most one per \(FormatTime.seconds(forced.minIntervalSeconds))"
            if let last = forced.lastAt {
                line += "; last \(when(last) ?? last)"
                if let next = forced.nextAllowedAt, let date = try? Date(next, strategy: .iso8601), date > now {
                    line += "; reports answered rate-limited until \(when(next) ?? next)"
                }
            } else {
                line += "; none forced yet"
            }
            lines.append(line)
        }
        if let outputs = health.outputs, !outputs.isEmpty {
            lines.append("outputs:")
            let keyWidth = outputs.map(\.output.count).max() ?? 0
            let pathWidth = outputs.map(\.path.count).max() ?? 0
            for output in outputs {
                var line =
                    "  " + output.output.padded(to: keyWidth) + "  "
                    + output.path.padded(to: pathWidth) + "  "
                line += output.lastWriteAt.map { "written \(when($0) ?? $0)" } ?? "not written yet"
                if let problem = output.lastError {
                    line += "; last error \(when(problem.at) ?? problem.at): \(problem.error)"
                }
                lines.append(line)
            }
        }
        return lines.joined(separator: "\n")
    }
}

extension String {
    fileprivate func padded(to width: Int) -> String {
        self + String(repeating: " ", count: max(0, width - count))
    }

    fileprivate func trimmingSuffix(_ suffix: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) : self
    }
}
