import Glibc
import NIOSSL

/// A configuration with its secrets resolved: everything a login needs.
public struct LoadedConfiguration: Sendable, Equatable {
    public var configuration: Configuration
    public var secrets: LoginSecrets
    /// Fleet mode's database password, when there is one (`SecretResolver.fleetPassword`).
    public var fleetPassword: String?

    /// Settings that work but that an operator should hear about: logged at start and at every
    /// reload, printed by `check`.
    public var warnings: [String] {
        let outputs = configuration.outputs
        let files = [
            ("tokenFile", outputs.tokenFile), ("jsonFile", outputs.jsonFile),
            ("headersFile", outputs.headersFile?.file),
        ]
        var warnings = files.compactMap { key, file -> String? in
            guard let file, file.mode & 0o004 != 0 else { return nil }
            return "outputs.\(key).mode \(FileMode.format(file.mode)) lets every local user read the token"
                + (key == "headersFile" ? " and the API key" : "")
                + "; \"0640\" and the reader group keep it to consumers"
        }
        if let proxy = outputs.proxy, let listen = proxy.listen, proxy.restrictsPeers {
            // A TCP peer has no uid or gid to check: the proxy fails closed there.
            warnings.append(
                "outputs.proxy.allowUIDs/allowGIDs cannot apply to the TCP listener \(listen): it refuses every "
                    + "request (403); remove listen, or the allow lists, to say which is meant"
            )
        }
        return warnings
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
        var configuration = try ConfigurationParser().parse(contents.bytes)
        try Self.checkTrustedInputs(configuration)
        let resolver = SecretResolver(environment: environment)
        let secrets = try resolver.resolve(configuration.api, configFileMode: contents.mode)
        let fleetPassword = try configuration.fleet.flatMap { fleet throws(ConfigurationError) in
            try resolver.fleetPassword(fleet)
        }
        // Both end up in header lines: a newline would inject a header.
        guard secrets.apiKey.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw ConfigurationError("api.apiKey", "contains whitespace, control or non-ASCII characters")
        }
        guard !secrets.email.contains(where: { $0.isNewline }) else {
            throw ConfigurationError("api.email", "contains a line break")
        }
        // Checked now so that a wrong path is a configuration error, not a failure per retry.
        for (key, caFile) in [("api.caFile", configuration.api.caFile), ("fleet.caFile", configuration.fleet?.caFile)] {
            guard let caFile else { continue }
            do {
                guard !(try NIOSSLCertificate.fromPEMFile(caFile)).isEmpty else {
                    throw ConfigurationError(key, "\(caFile) holds no certificate")
                }
            } catch let error as ConfigurationError {
                throw error
            } catch {
                throw ConfigurationError(key, "cannot read \(caFile) as PEM certificates: \(error)")
            }
        }
        // Symlinks the operator put in a written file's path are resolved now, once: every write
        // then walks the resolved path and follows none (`OpenedFolder`).
        let written: [(key: String, path: WritableKeyPath<Configuration, String>)] =
            [
                configuration.outputs.tokenFile.map { _ in ("outputs.tokenFile.path", \.outputs.tokenFile!.path) },
                configuration.outputs.jsonFile.map { _ in ("outputs.jsonFile.path", \.outputs.jsonFile!.path) },
                configuration.outputs.headersFile.map { _ in
                    ("outputs.headersFile.path", \.outputs.headersFile!.file.path)
                },
                configuration.stateFile.map { _ in ("stateFile", \.stateFile!) },
            ].compactMap { $0 }
        for (key, path) in written {
            configuration[keyPath: path] = try Self.resolveFolder(of: configuration[keyPath: path], key: key)
            try Self.checkFolder(of: configuration[keyPath: path], key: key)
        }
        if let socket = configuration.outputs.socket {
            try Self.checkFolder(of: socket.path, key: "outputs.socket.path")
            try Self.checkVisible(socket.allowUIDs, key: "outputs.socket.allowUIDs", map: "/proc/self/uid_map")
            try Self.checkVisible(socket.allowGIDs, key: "outputs.socket.allowGIDs", map: "/proc/self/gid_map")
        }
        if let proxy = configuration.outputs.proxy {
            try Self.checkFolder(of: proxy.path, key: "outputs.proxy.path")
            try Self.checkVisible(proxy.allowUIDs, key: "outputs.proxy.allowUIDs", map: "/proc/self/uid_map")
            try Self.checkVisible(proxy.allowGIDs, key: "outputs.proxy.allowGIDs", map: "/proc/self/gid_map")
        }
        return LoadedConfiguration(configuration: configuration, secrets: secrets, fleetPassword: fleetPassword)
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
        if let path = configuration.fleet?.passwordFile { try checkTrusted(path, key: "fleet.passwordFile") }
        if let caFile = configuration.fleet?.caFile { try checkTrusted(caFile, key: "fleet.caFile") }
        if let caFile = configuration.outputs.proxy?.caFile, caFile != api.caFile {
            try checkTrusted(caFile, key: "outputs.proxy.caFile")
        }
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
            switch Ownership.problem(info, stickyRootFolders: true) {
            case nil:
                break
            case .otherOwner(let uid):
                throw ConfigurationError(
                    key,
                    "\(what) belongs to uid \(uid), who could change what the daemon trusts or runs; "
                        + "chown it to root or this user (uid \(geteuid()))"
                )
            case .writableByOthers(let mode):
                throw ConfigurationError(
                    key,
                    "\(what) (mode \(FileMode.format(mode))) is writable by group or others, who "
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

    /// `path` with its folder's symlinks resolved: realpath(3) of the deepest folder that exists,
    /// with the part still to be created appended.
    static func resolveFolder(of path: String, key: String) throws(ConfigurationError) -> String {
        var (existing, name) = AtomicFileWriter.split(path)
        var missing: [String] = [name]
        while true {
            if let resolved = realpath(existing, nil) {
                defer { free(resolved) }
                let base = String(cString: resolved)
                return (base == "/" ? "" : base) + "/" + missing.reversed().joined(separator: "/")
            }
            guard errno == ENOENT, existing != "/" else {
                throw ConfigurationError(key, "cannot resolve \(existing): \(String(cString: strerror(errno)))")
            }
            let (parent, component) = AtomicFileWriter.split(existing)
            missing.append(component)
            existing = parent
        }
    }

    /// The folders that hold the token must be the daemon's own: another user who can write there
    /// could replace what readers trust (a forged token, a header line of their own). The rule is
    /// `OpenedFolder`'s, the one every write applies again; a folder that does not exist yet is
    /// created by the daemon, mode 0750. (`metricsFile` is exempt: it holds no secret, and
    /// node_exporter's textfile folder is often group-writable.)
    static func checkFolder(of path: String, key: String) throws(ConfigurationError) {
        do {
            _ = try OpenedFolder(AtomicFileWriter.split(path).directory, rule: .secret)
        } catch {
            if error.errno == ENOENT { return }
            throw ConfigurationError(key, error.description)
        }
    }
}
