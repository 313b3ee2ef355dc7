import Foundation

/// A real PostgreSQL server of its own for a test (Debian's `postgresql`): `initdb` as the
/// `postgres` user into a temporary folder, SCRAM-SHA-256 for every connection, TCP on a free port
/// of 127.0.0.1 with TLS (a throw-away CA, `certificates.ca`), and a Unix socket in its folder. A
/// role and a database named `fts_tokend` with a random password. Stopped (`-m immediate`) and its
/// folder removed when released, whatever the test threw.
///
/// Faults: `kill()` is a crash (SIGKILL to the postmaster), `start()` brings it back on the same
/// port and data; `stop()` shuts it down.
public final class TestPostgres: Sendable {
    public let folder: TemporaryDirectory
    public let port: Int
    public let user = "fts_tokend"
    public let database = "fts_tokend"
    public let password = "pg-" + UUID().uuidString
    public let certificates: TestCertificates
    private let superuserPassword = UUID().uuidString

    /// The server's binaries (the newest installed major version).
    static let bin: String? = {
        let root = "/usr/lib/postgresql"
        let versions = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return versions.compactMap(Int.init).max().map { "\(root)/\($0)/bin" }
    }()

    /// Whether PostgreSQL is installed (`make deps` installs it).
    public static var isInstalled: Bool { bin != nil }

    public var dataFolder: String { folder.file("data") }
    public var socketFolder: String { folder.file("socket") }

    /// `postgresql://fts_tokend@127.0.0.1:PORT/fts_tokend?sslmode=…`
    public func url(sslmode: String = "verify-full", host: String = "127.0.0.1") -> String {
        "postgresql://\(user)@\(host):\(port)/\(database)?sslmode=\(sslmode)"
    }

    public init() async throws {
        guard let bin = Self.bin else { throw POSIXError(.ENOENT) }
        folder = try TemporaryDirectory()
        // The server runs as `postgres`: it must reach its folder, and own its data folder.
        chmod(folder.path, 0o755)
        port = try Self.freePort()
        certificates = try await TestCertificates.make(in: folder)
        try folder.write("superuser-password", superuserPassword + "\n", mode: 0o644)
        for name in ["data", "socket", "log"] {
            try FileManager.default.createDirectory(atPath: folder.file(name), withIntermediateDirectories: true)
        }
        // The server reads its key as `postgres`, and refuses one others may read.
        try FileManager.default.copyItem(atPath: certificates.key, toPath: folder.file("tls.key"))
        try FileManager.default.copyItem(atPath: certificates.certificate, toPath: folder.file("tls.pem"))
        let postgres = try Self.postgresIDs()
        for name in ["data", "socket", "log", "tls.key", "tls.pem"] {
            chown(folder.file(name), postgres.uid, postgres.gid)
        }
        chmod(folder.file("tls.key"), 0o600)
        try await Self.run(
            "\(bin)/initdb",
            [
                "-D", dataFolder, "-A", "scram-sha-256", "-U", "postgres",
                "--pwfile=\(folder.file("superuser-password"))",
            ]
        )
        try await start()
        try await psql(
            "CREATE ROLE \(user) LOGIN PASSWORD '\(password)'",
            "CREATE DATABASE \(database) OWNER \(user)"
        )
    }

    deinit {
        // Synchronous on purpose: the folder is removed right after, with the server's files in it.
        if let bin = Self.bin {
            let stop = Process()
            stop.executableURL = URL(fileURLWithPath: "/usr/sbin/runuser")
            stop.arguments = [
                "-u", "postgres", "--", "\(bin)/pg_ctl", "-D", dataFolder, "-m", "immediate", "-w", "stop",
            ]
            stop.standardOutput = FileHandle.nullDevice
            stop.standardError = FileHandle.nullDevice
            try? stop.run()
            stop.waitUntilExit()
        }
    }

    /// Starts the server (again), on the same port and data; waits until it accepts connections.
    public func start() async throws {
        guard let bin = Self.bin else { throw POSIXError(.ENOENT) }
        let options = [
            "-p \(port)", "-k \(socketFolder)", "-c listen_addresses=127.0.0.1", "-c ssl=on",
            "-c ssl_cert_file=\(folder.file("tls.pem"))", "-c ssl_key_file=\(folder.file("tls.key"))",
            "-c fsync=off", "-c max_connections=50",
            // A partitioned client's session (and its locks) goes in seconds, not hours.
            "-c tcp_keepalives_idle=4", "-c tcp_keepalives_interval=2", "-c tcp_keepalives_count=2",
        ].joined(separator: " ")
        do {
            try await Self.run(
                "\(bin)/pg_ctl",
                ["-D", dataFolder, "-l", folder.file("log/server.log"), "-w", "-t", "60", "-o", options, "start"]
            )
        } catch var failure as Failure {
            failure.output += "\nserver.log:\n" + (folder.read("log/server.log") ?? "")
            throw failure
        }
    }

    /// A clean shutdown that does not wait for clients (`-m immediate`).
    public func stop() async throws {
        guard let bin = Self.bin else { throw POSIXError(.ENOENT) }
        try await Self.run("\(bin)/pg_ctl", ["-D", dataFolder, "-m", "immediate", "-w", "stop"])
    }

    /// A crash: SIGKILL to the postmaster; its backends end when they notice.
    public func kill() async throws {
        guard let text = folder.read("data/postmaster.pid"), let pid = Int32(text.split(separator: "\n").first ?? "")
        else { throw POSIXError(.ESRCH) }
        Glibc.kill(pid, SIGKILL)
        // Gone once the pid no longer answers signal 0; the backends follow within moments.
        for _ in 0..<500 where Glibc.kill(pid, 0) == 0 { try await Task.sleep(for: .milliseconds(10)) }
        try? FileManager.default.removeItem(atPath: folder.file("data/postmaster.pid"))
    }

    /// Runs statements as the superuser over the Unix socket; returns psql's output (unaligned,
    /// tuples only).
    @discardableResult
    public func psql(_ statements: String..., database: String = "postgres") async throws -> String {
        guard let bin = Self.bin else { throw POSIXError(.ENOENT) }
        var arguments = [
            "PGPASSWORD=\(superuserPassword)", "\(bin)/psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", socketFolder, "-p", "\(port)", "-U", "postgres", "-d", database,
        ]
        for statement in statements { arguments += ["-c", statement] }
        let result = try await Command.run("/usr/sbin/runuser", ["-u", "postgres", "--", "/usr/bin/env"] + arguments)
        guard result.status == 0 else { throw Failure(command: "psql", output: result.error) }
        return result.output
    }

    public struct Failure: Error, CustomStringConvertible {
        public var command: String
        public var output: String
        public var description: String { "\(command) failed: \(output)" }
    }

    private static func run(_ executable: String, _ arguments: [String]) async throws {
        let result = try await Command.run("/usr/sbin/runuser", ["-u", "postgres", "--", executable] + arguments)
        guard result.status == 0 else {
            throw Failure(command: (executable as NSString).lastPathComponent, output: result.output + result.error)
        }
    }

    private static func postgresIDs() throws -> (uid: uid_t, gid: gid_t) {
        guard let entry = getpwnam("postgres") else { throw POSIXError(.ENOENT) }
        return (entry.pointee.pw_uid, entry.pointee.pw_gid)
    }

    /// A port nothing listens on now (the kernel's choice for a socket bound to port 0).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(fd, pointer, length) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard bound else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
