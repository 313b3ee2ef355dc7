import TokenDaemon

/// libFuzzer target for `ConfigurationParser.parse`, the pure half of config loading (no file IO, no
/// secrets read): the whole input is the config file's bytes.
///
/// A config is written by an operator, not an attacker, but a crash here would be a daemon that dies
/// without saying which key is wrong, and an accepted bad value (a world-writable token file) a quiet
/// security hole, so both are checked.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    do throws(ConfigurationError) {
        check(try ConfigurationParser().parse(bytes))
    } catch {
        // This is the line the daemon prints before exiting 78.
        _ = error.description
    }
    return 0
}

/// The promises README's "Configuration" section makes about an accepted config, checked so the fuzzer
/// finds wrong acceptances as well as crashes (a failed precondition is a crash to libFuzzer).
private func check(_ configuration: Configuration) {
    let outputs = configuration.outputs
    precondition(!outputs.files.isEmpty || outputs.socket != nil, "no output")
    for file in outputs.files {
        checkPath(file.path)
        precondition(file.mode & 0o002 == 0 && file.mode & 0o400 != 0 && file.mode <= 0o777, "output file mode")
    }
    if let socket = outputs.socket {
        checkPath(socket.path)
        precondition(socket.path.utf8.count <= 107 && socket.mode & 0o002 == 0, "socket path or mode")
        precondition((1...65_536).contains(socket.maxConnections), "maxConnections")
    }
    let api = configuration.api
    precondition(api.timeoutSeconds > 0 && api.timeoutSeconds <= 300, "api.timeoutSeconds")
    precondition(api.tokenPath.hasPrefix("/"), "api.tokenPath")
    let base = api.baseURL.lowercased()
    precondition(base.hasPrefix("https://") || base.hasPrefix("http://"), "api.baseURL scheme")
    let refresh = configuration.refresh
    precondition(refresh.refreshAt > 0 && refresh.refreshAt < 1, "refresh.refreshAt")
    precondition(refresh.jitter >= 0 && refresh.jitter < refresh.refreshAt, "refresh.jitter")
    precondition(
        refresh.minRemainingSeconds >= 0 && refresh.minRemainingSeconds.isFinite,
        "refresh.minRemainingSeconds"
    )
    precondition(refresh.backoffInitialSeconds >= 0.1, "refresh.backoffInitialSeconds")
    precondition(
        refresh.backoffMaxSeconds >= refresh.backoffInitialSeconds && refresh.backoffMaxSeconds <= 86_400,
        "refresh.backoffMaxSeconds"
    )
    [configuration.stateFile, configuration.metricsFile, api.caFile].compactMap { $0 }.forEach(checkPath)
    for action in configuration.onRotate {
        switch action {
        case .exec(let argv, let timeout):
            precondition(!argv.isEmpty && timeout > 0 && timeout <= 3600, "onRotate exec")
            checkPath(argv[0])
        case .signal(_, _, let pidFile):
            checkPath(pidFile)
        }
    }
}

/// Every path the daemon writes or runs must be absolute with no `..` step and no NUL.
private func checkPath(_ path: String) {
    precondition(path.hasPrefix("/") && !path.split(separator: "/").contains("..") && !path.contains("\0"), "path")
}
