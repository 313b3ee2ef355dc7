import Foundation

/// Runs a helper program (curl, setpriv, openssl) to completion and captures what it printed.
public struct Command {
    public var status: Int32
    public var output: String
    public var error: String

    @discardableResult
    public static func run(
        _ executable: String,
        _ arguments: [String],
        timeout: TimeInterval = 120
    ) async throws -> Command {
        let folder = try TemporaryDirectory()
        let child = try Spawned(
            executable,
            arguments,
            environment: ["PATH": "/usr/bin:/bin"],
            standardOutput: folder.file("out"),
            standardError: folder.file("err")
        )
        guard let status = await child.waitForExit(timeout: timeout) else {
            throw POSIXError(.ETIMEDOUT)
        }
        return Command(status: status, output: folder.read("out") ?? "", error: folder.read("err") ?? "")
    }

    /// `curl --unix-socket SOCKET http://localhost/TARGET`, optionally as another user (setpriv), with
    /// `groups` as its supplementary groups.
    public static func curl(
        _ target: String,
        socket: String,
        as user: (uid: UInt32, gid: UInt32)? = nil,
        groups: [UInt32] = [],
        extra: [String] = []
    ) async throws -> (status: Int, body: String, headers: String) {
        // Headers and body both on stdout: another user may not reopen our files as /dev/stderr.
        let curlArguments =
            ["-s", "-i", "--max-time", "60", "--unix-socket", socket, "-w", "\n%{http_code}"] + extra + [
                "http://localhost" + target
            ]
        let result: Command
        if let user {
            let groupOption =
                groups.isEmpty ? "--clear-groups" : "--groups=" + groups.map(String.init).joined(separator: ",")
            result = try await run(
                "/usr/bin/setpriv",
                ["--reuid=\(user.uid)", "--regid=\(user.gid)", groupOption, "/usr/bin/curl"] + curlArguments
            )
        } else {
            result = try await run("/usr/bin/curl", curlArguments)
        }
        var lines = result.output.split(separator: "\n", omittingEmptySubsequences: false)
        let status = Int(lines.popLast() ?? "") ?? 0
        let response = lines.joined(separator: "\n")
        guard let split = response.range(of: "\r\n\r\n") else { return (status, "", response) }
        return (status, String(response[split.upperBound...]), String(response[..<split.lowerBound]))
    }
}
