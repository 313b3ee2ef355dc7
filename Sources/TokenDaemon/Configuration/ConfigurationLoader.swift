import Glibc
import NIOSSL

/// A configuration with its secrets resolved: everything a login needs.
public struct LoadedConfiguration: Sendable, Equatable {
    public var configuration: Configuration
    public var secrets: LoginSecrets

    /// Settings that work but that an operator should hear about: logged at start and at every
    /// reload, printed by `check`.
    public var warnings: [String] {
        let outputs = configuration.outputs
        let files = [
            ("tokenFile", outputs.tokenFile), ("jsonFile", outputs.jsonFile),
            ("headersFile", outputs.headersFile?.file),
        ]
        return files.compactMap { key, file in
            guard let file, file.mode & 0o004 != 0 else { return nil }
            return "outputs.\(key).mode \(FileMode.format(file.mode)) lets every local user read the token"
                + (key == "headersFile" ? " and the API key" : "")
                + "; \"0640\" and the reader group keep it to consumers"
        }
    }

    /// The account this configuration logs in as (see `StateStore.identity`).
    public var identity: String {
        StateStore.identity(baseURL: configuration.api.baseURL, email: secrets.email, apiKey: secrets.apiKey)
    }
}

/// Reads, validates and resolves a config file. Used at start and on every reload.
public struct ConfigurationLoader: Sendable {
    public var environment: [String: String]

    public init(environment: [String: String]) {
        self.environment = environment
    }

    public func load(path: String) throws(ConfigurationError) -> LoadedConfiguration {
        try Self.checkTrusted(path, key: "(file)")
        let contents: SmallFile.Contents
        do {
            contents = try SmallFile.read(path, limit: 1024 * 1024)
        } catch {
            throw ConfigurationError("(file)", "cannot read \(path): \(error)")
        }
        let configuration = try ConfigurationParser().parse(contents.bytes)
        try Self.checkTrustedInputs(configuration)
        let secrets = try SecretResolver(environment: environment).resolve(
            configuration.api,
            configFileMode: contents.mode
        )
        // Both end up in header lines: a newline would inject a header.
        guard secrets.apiKey.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw ConfigurationError("api.apiKey", "contains whitespace, control or non-ASCII characters")
        }
        guard !secrets.email.contains(where: { $0.isNewline }) else {
            throw ConfigurationError("api.email", "contains a line break")
        }
        if let caFile = configuration.api.caFile {
            // Checked now so that a wrong path is a configuration error, not a failed login per retry.
            do {
                guard !(try NIOSSLCertificate.fromPEMFile(caFile)).isEmpty else {
                    throw ConfigurationError("api.caFile", "\(caFile) holds no certificate")
                }
            } catch let error as ConfigurationError {
                throw error
            } catch {
                throw ConfigurationError("api.caFile", "cannot read \(caFile) as PEM certificates: \(error)")
            }
        }
        let outputs = configuration.outputs
        let secretBearing: [(key: String, path: String?)] = [
            ("outputs.tokenFile.path", outputs.tokenFile?.path), ("outputs.jsonFile.path", outputs.jsonFile?.path),
            ("outputs.headersFile.path", outputs.headersFile?.file.path), ("outputs.socket.path", outputs.socket?.path),
            ("stateFile", configuration.stateFile),
        ]
        for case let (key, path?) in secretBearing {
            try Self.checkFolder(of: path, key: key)
        }
        if let socket = outputs.socket {
            try Self.checkVisible(socket.allowUIDs, key: "outputs.socket.allowUIDs", map: "/proc/self/uid_map")
            try Self.checkVisible(socket.allowGIDs, key: "outputs.socket.allowGIDs", map: "/proc/self/gid_map")
        }
        return LoadedConfiguration(configuration: configuration, secrets: secrets)
    }

    /// The files whose content decides what the daemon trusts or runs: the `…File` secrets, the
    /// CA bundle, each `onRotate` program and its `#!` interpreter (the config file itself is
    /// checked before it is read).
    static func checkTrustedInputs(_ configuration: Configuration) throws(ConfigurationError) {
        let api = configuration.api
        for (key, source) in [
            ("api.emailFile", api.email), ("api.passwordFile", api.password), ("api.apiKeyFile", api.apiKey),
        ] {
            if case .file(let path) = source { try checkTrusted(path, key: key) }
        }
        if let caFile = api.caFile { try checkTrusted(caFile, key: "api.caFile") }
        for (index, action) in configuration.onRotate.enumerated() {
            guard case .exec(let argv, _) = action, let program = argv.first else { continue }
            let key = "onRotate[\(index)].exec[0]"
            try checkTrusted(program, key: key)
            if let interpreter = interpreter(of: program) {
                try checkTrusted(interpreter, key: key + " (its #! interpreter)")
            }
        }
    }

    /// The interpreter a `#!` script names, if `program` is one.
    static func interpreter(of program: String) -> String? {
        let fd = open(program, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 256)
        guard let count = try? POSIX.read(fd, into: &buffer, operation: "read"),
            buffer[..<count].starts(with: Array("#!".utf8))
        else { return nil }
        let head = buffer[..<count]
        let line = String(decoding: head.dropFirst(2).prefix { $0 != 0x0A }, as: UTF8.self)
        return line.split(whereSeparator: { $0 == " " || $0 == "\t" }).first.map(String.init)
    }

    /// A file whose content the daemon trusts must be changeable only by root or the daemon's own
    /// user: the file and every folder above it (symlinks resolved) must belong to one of them and
    /// be writable by no one else. A root-owned sticky folder (`/tmp`) passes: others cannot replace
    /// what they do not own there. A file that does not exist is left to its reader's error.
    static func checkTrusted(_ path: String, key: String) throws(ConfigurationError) {
        guard let resolvedPointer = realpath(path, nil) else {
            if errno == ENOENT { return }
            throw ConfigurationError(key, "cannot resolve \(path): \(String(cString: strerror(errno)))")
        }
        let resolved = String(cString: resolvedPointer)
        free(resolvedPointer)
        var current = resolved
        while true {
            var info = stat()
            guard lstat(current, &info) == 0 else {
                throw ConfigurationError(key, "cannot inspect \(current): \(String(cString: strerror(errno)))")
            }
            let what = current == resolved ? "\(path)" : "the folder \(current) above \(path)"
            guard info.st_uid == 0 || info.st_uid == geteuid() else {
                throw ConfigurationError(
                    key,
                    "\(what) belongs to uid \(info.st_uid), who could change what the daemon trusts or runs; "
                        + "chown it to root or this user (uid \(geteuid()))"
                )
            }
            let sticky = info.st_mode & S_IFMT == S_IFDIR && info.st_mode & S_ISVTX != 0 && info.st_uid == 0
            guard info.st_mode & 0o022 == 0 || sticky else {
                throw ConfigurationError(
                    key,
                    "\(what) (mode \(FileMode.format(UInt32(info.st_mode & 0o7777)))) is writable by group or others, who "
                        + "could change what the daemon trusts or runs; run `chmod go-w \(current)`"
                )
            }
            guard current != "/" else { return }
            current = AtomicFileWriter.split(current).directory
        }
    }

    /// An allowed id the daemon cannot see (outside its user namespace's map, as under
    /// `PrivateUsers=`) could never match a peer: the kernel reports such a peer as 65534.
    static func checkVisible(_ ids: [UInt32], key: String, map path: String) throws(ConfigurationError) {
        guard !ids.isEmpty, let contents = try? SmallFile.read(path, limit: 64 * 1024) else { return }
        let ranges: [(first: UInt64, count: UInt64)] = String(decoding: contents.bytes, as: UTF8.self)
            .split(separator: "\n").compactMap { line in
                let fields = line.split(separator: " ", omittingEmptySubsequences: true)
                guard fields.count == 3, let first = UInt64(fields[0]), let count = UInt64(fields[2]) else {
                    return nil
                }
                return (first, count)
            }
        for id in ids where !ranges.contains(where: { UInt64(id) >= $0.first && UInt64(id) < $0.first + $0.count }) {
            throw ConfigurationError(
                key,
                "\(id) is not visible in the daemon's user namespace (\(path)): such a peer always appears as 65534; "
                    + "run the daemon without PrivateUsers= to use allow lists"
            )
        }
    }

    /// The folders that hold the token must be the daemon's own: another user who can write there
    /// could replace what readers trust (a forged token, a header line of their own). As sshd's
    /// StrictModes: an existing folder must belong to this user or root and be writable by no one
    /// else. A folder that does not exist yet is created by the daemon, mode 0750. (`metricsFile` is
    /// exempt: it holds no secret, and node_exporter's textfile folder is often group-writable.)
    static func checkFolder(of path: String, key: String) throws(ConfigurationError) {
        let folder = AtomicFileWriter.split(path).directory
        var info = stat()
        guard stat(folder, &info) == 0 else {
            if errno == ENOENT { return }
            throw ConfigurationError(key, "cannot inspect the folder \(folder): \(String(cString: strerror(errno)))")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw ConfigurationError(key, "\(folder) is not a folder")
        }
        guard info.st_uid == geteuid() || info.st_uid == 0 else {
            throw ConfigurationError(
                key,
                "the folder \(folder) belongs to uid \(info.st_uid), another user, who could replace the token "
                    + "files; use a folder of this user (uid \(geteuid())) or root"
            )
        }
        guard info.st_mode & 0o022 == 0 else {
            throw ConfigurationError(
                key,
                "the folder \(folder) (mode \(FileMode.format(UInt32(info.st_mode & 0o7777)))) is writable by "
                    + "other users, who could replace the token files; remove group and other write permission"
            )
        }
    }
}
