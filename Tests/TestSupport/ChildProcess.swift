import Foundation

/// The real `fts-tokend` binary run as a child process, its stdout and stderr kept in files.
public final class ChildProcess: Sendable {
    private let spawned: Spawned
    private let outputPath: String
    /// Where the child's stderr goes (a regular file).
    public let errorPath: String

    /// The binary under test: `$FTS_TOKEND_BINARY`, else the one built beside the test bundle.
    public static var binary: String {
        if let path = ProcessInfo.processInfo.environment["FTS_TOKEND_BINARY"] { return path }
        let beside = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(
            "fts-tokend"
        ).path
        if FileManager.default.isExecutableFile(atPath: beside) { return beside }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/fts-tokend").path
    }

    /// Starts `fts-tokend arguments…` (or `executable arguments[1...]`) with exactly `environment`
    /// (plus PATH). `environmentForStandardError` may add variables that depend on the path that will
    /// receive the child's stderr.
    public init(
        _ arguments: [String],
        environment: [String: String] = [:],
        in directory: TemporaryDirectory,
        name: String = "child",
        executable: String? = nil,
        environmentForStandardError: (String) -> [String: String] = { _ in [:] }
    ) throws {
        outputPath = directory.file("\(name).stdout")
        errorPath = directory.file("\(name).stderr")
        // Created first so that environmentForStandardError can stat it; the spawn truncates it.
        _ = FileManager.default.createFile(atPath: errorPath, contents: nil)
        let fullEnvironment =
            environment
            .merging(environmentForStandardError(errorPath)) { mine, _ in mine }
            .merging(["PATH": "/usr/bin:/bin"]) { mine, _ in mine }
        spawned = try Spawned(
            executable ?? Self.binary,
            executable == nil ? arguments : Array(arguments.dropFirst()),
            environment: fullEnvironment,
            standardOutput: outputPath,
            standardError: errorPath
        )
    }

    public var pid: Int32 { spawned.pid }
    public var isRunning: Bool { spawned.isRunning }
    /// The exit status once ended (128 + signal for a signal), nil while running.
    public var exitStatus: Int32? { spawned.status }

    public func signal(_ number: Int32) {
        kill(spawned.pid, number)
    }

    /// The exit status once the process has ended, or nil if it is still running after `timeout`.
    public func waitForExit(timeout: TimeInterval = 30) async -> Int32? {
        await spawned.waitForExit(timeout: timeout)
    }

    public var standardOutput: String {
        readFileWithoutThrowing(outputPath).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }
    public var standardError: String {
        readFileWithoutThrowing(errorPath).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }
    public var allOutput: String { standardOutput + standardError }
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes: waiting on an event that has no
/// notification (a file appearing) without guessing how long it takes. Sleeps without blocking a
/// thread: the tests share a small cooperative pool with the in-process mock's clients.
public func eventually(timeout: TimeInterval = 30, _ condition: () -> Bool) async -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}
