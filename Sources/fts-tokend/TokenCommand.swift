import ArgumentParser
import Glibc
import NIOCore
import TokenDaemon

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct TokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token",
        abstract: "Print the current token for scripts: curl -H \"Authorization: Bearer $(fts-tokend token)\" …",
        discussion: """
            Exits 1 with a message on stderr when no valid token is available (or, with --wait, none came in time).

            --rejected FP: the API rejected the token with fingerprint FP (the X-Token-Fingerprint the socket \
            sent with it, or the first 8 hex characters of its SHA-256). Reports it to the daemon, which logs in \
            now unless a login was forced less than refresh.minForcedRefreshSeconds ago, then waits (up to \
            --timeout) for a token other than FP and prints it.
            """
    )

    enum Format: String, ExpressibleByArgument, CaseIterable {
        case raw, json, headers

        var route: SocketRoute {
            switch self {
            case .raw: .token
            case .json: .tokenJSON
            case .headers: .headers
            }
        }
    }

    @Option(help: "The daemon's socket.")
    var socket: String?

    @Option(help: "Read this token file instead of asking the socket (tokenFile, jsonFile or headersFile).")
    var file: String?

    @Option(help: "raw (the bare token), json (the jsonFile document) or headers (the headersFile text). Socket only.")
    var format: Format = .raw

    @Flag(help: "Wait until a valid token is available (up to --timeout seconds).")
    var wait = false

    @Option(help: "Seconds to wait with --wait or --rejected.")
    var timeout: Double = 300

    @Option(
        name: .customLong("rejected"),
        help: ArgumentHelp(
            "Report that the API rejected the token with this fingerprint; print the next.",
            valueName: "FP"
        )
    )
    var rejectedFingerprint: String?

    func validate() throws {
        if let rejectedFingerprint {
            guard Fingerprint.parse(rejectedFingerprint) != nil else {
                throw ValidationError("--rejected takes a token's fingerprint: 8 hex characters")
            }
            if file != nil { throw ValidationError("--rejected reports to the socket, not --file") }
        }
        if socket != nil && file != nil { throw ValidationError("give --socket or --file, not both") }
        if file != nil && format != .raw {
            throw ValidationError("--format applies to the socket; a file is printed as it is")
        }
        guard timeout > 0 else { throw ValidationError("--timeout must be more than 0") }
    }

    func run() async throws {
        let deadline = Date().addingTimeInterval(wait || rejectedFingerprint != nil ? timeout : 0)
        if let rejected = rejectedFingerprint.flatMap(Fingerprint.parse) {
            try await report(rejected, socket: socket ?? SocketClient.defaultPath, until: deadline)
        } else if let file {
            try await printFile(file, until: deadline)
        } else {
            try await printFromSocket(socket ?? SocketClient.defaultPath, until: deadline)
        }
    }

    /// `--rejected`: the report, then a long poll for any token but `fingerprint`.
    private func report(_ fingerprint: String, socket: String, until deadline: Date) async throws {
        let answer: SocketClient.Answer
        do {
            answer = try await SocketClient.send(
                .POST,
                SocketRoute.tokenInvalidate.path,
                headers: [("X-Token-Fingerprint", fingerprint)],
                socket: socket,
                timeout: .seconds(15)
            )
        } catch {
            throw fail(error.description)
        }
        switch answer.status {
        case 202, 409:
            break  // a login is under way, or the current token is already another
        case 429:
            Console.error(
                "a login was forced less than refresh.minForcedRefreshSeconds ago; waiting for the next token "
                    + "(retry the report after \(answer.retryAfter ?? "?") s)"
            )
        default:
            throw fail("the daemon refused the report (HTTP \(answer.status)): \(answer.body)")
        }
        try await printFromSocket(socket, until: deadline, after: fingerprint)
    }

    private func printFromSocket(_ socket: String, until deadline: Date, after: String? = nil) async throws {
        let path = format.route.path
        while true {
            let remaining = deadline.timeIntervalSinceNow
            var target = remaining > 0 ? path + "?wait=\(Int(remaining.rounded(.up)))" : path
            if let after { target += (remaining > 0 ? "&" : "?") + "after=" + after }
            let answer: SocketClient.Answer
            do {
                answer = try await SocketClient.get(
                    target,
                    socket: socket,
                    timeout: .seconds(Int64(max(remaining, 0)) + 10)
                )
            } catch {
                guard deadline.timeIntervalSinceNow > 0 else { throw fail(error.description) }
                try await Task.sleep(for: .milliseconds(500))
                continue
            }
            if answer.status == 200, after == nil || answer.fingerprint != after {
                Console.out(
                    format == .raw ? answer.body : String(answer.body.dropLast(answer.body.hasSuffix("\n") ? 1 : 0))
                )
                return
            }
            guard deadline.timeIntervalSinceNow > 0 else {
                if answer.status == 200 {
                    throw fail(
                        "no token other than \(after ?? "?") came within --timeout; `fts-tokend status` tells why"
                    )
                }
                throw fail("no valid token (HTTP \(answer.status)); `fts-tokend status` tells why")
            }
            try await Task.sleep(for: .milliseconds(500))
        }
    }

    private func printFile(_ path: String, until deadline: Date) async throws {
        while true {
            if let contents = try? SmallFile.read(path, limit: 1 << 20).bytes, let text = Self.validText(contents) {
                Console.out(text.hasSuffix("\n") ? String(text.dropLast()) : text)
                return
            }
            guard deadline.timeIntervalSinceNow > 0 else {
                throw fail("no valid token in \(path) (missing, empty or expired); `fts-tokend status` tells why")
            }
            try await Task.sleep(for: .milliseconds(500))
        }
    }

    /// The file's text when it holds a token that has not expired (judged by the JWT's `exp` or the
    /// JSON document's `expires`, whichever the file has).
    static func validText(_ bytes: [UInt8]) -> String? {
        let text = String(decoding: bytes, as: UTF8.self)
        guard !text.isEmpty else { return nil }
        return TokenFileInspector.expiry(of: text).map { $0 > Date() ? text : nil } ?? text
    }

    private func fail(_ message: String) -> ExitCode {
        Console.error(message)
        return ExitCode.failure
    }
}
