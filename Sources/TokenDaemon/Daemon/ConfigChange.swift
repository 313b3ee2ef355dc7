/// What a reload changes: computed from the configuration in force and the one just loaded, so that
/// each kind of change has one rule (README "Signals", reload).
///
/// Everything applies live except the socket's path and the API proxy's listeners and upstream: a
/// listening socket cannot move without dropping every connection, so a changed, added or removed
/// `outputs.socket.path`, or an `outputs.proxy` added, removed or given other listeners, upstream,
/// `caFile` or timeouts, refuses the whole reload ("needs a restart"), and the daemon keeps running
/// on the previous configuration.
/// A socket passed by systemd (socket activation) is the socket unit's: its path and mode in the
/// config are not used, so their changes need no restart.
public struct ConfigChange: Sendable, Equatable {
    /// Base URL, email or API key: the token held belongs to another account; log in now.
    public var account = false
    /// Only the password: a login whose credentials were rejected is worth trying again at once.
    public var password = false
    /// Token path, timeout or trust roots (`caFile` is read again on every reload, so a renewed
    /// bundle at the same path counts): the auth client is rebuilt.
    public var client = false
    /// `refresh.*`: the next refresh is drawn again under the new policy.
    public var policy = false
    /// Output files added, moved or given another mode, or a new `authorizationScheme`: the
    /// current token is written to them.
    public var files = false
    /// Files the daemon wrote that the new configuration names no more (outputs, the state file,
    /// the metrics file): removed, since they hold the token and the headers file the API key.
    public var unconfiguredFiles: [String] = []
    /// The state file moved (or is new): the current token is saved there.
    public var stateFile = false
    /// The socket's mode, allow lists, connection limit or whether it serves `/headers`: applied to
    /// the listening socket.
    public var socketAccess = false
    /// The API proxy's mode, allow lists, connection limit, body limit, `rejectedStatuses` or
    /// `allowBrowsers`: applied from the next request on.
    public var proxyAccess = false
    /// Why the reload cannot be applied without a restart; nil when it can.
    public var needsRestart: String?
    /// `onRotate`, `metricsFile`, `logLevel`: read where they are used.
    public var other = false

    public init(from old: LoadedConfiguration, to new: LoadedConfiguration, socketActivated: Bool) {
        let (was, now) = (old.configuration, new.configuration)
        account = old.identity != new.identity || old.secrets.apiKey != new.secrets.apiKey
        password = old.secrets.password != new.secrets.password
        client =
            was.api.tokenURL != now.api.tokenURL || was.api.timeoutSeconds != now.api.timeoutSeconds
            || was.api.caFile != now.api.caFile || now.api.caFile != nil
        policy = was.refresh != now.refresh
        files =
            was.outputs.files != now.outputs.files
            || was.outputs.headersFile?.authorizationScheme != now.outputs.headersFile?.authorizationScheme
        stateFile = now.stateFile != nil && was.stateFile != now.stateFile

        let kept = Set(now.outputs.files.map(\.path) + [now.stateFile, now.metricsFile].compactMap { $0 })
        let written = was.outputs.files.map(\.path) + [was.stateFile, was.metricsFile].compactMap { $0 }
        unconfiguredFiles = written.filter { !kept.contains($0) }

        switch (was.outputs.socket, now.outputs.socket) {
        case (nil, nil):
            break
        case (let before?, let after?):
            if !socketActivated, before.path != after.path {
                needsRestart = "outputs.socket.path changed from \(before.path) to \(after.path)"
            }
            socketAccess =
                before.allowUIDs != after.allowUIDs || before.allowGIDs != after.allowGIDs
                || before.maxConnections != after.maxConnections || (!socketActivated && before.mode != after.mode)
        case (nil, let after?):
            if socketActivated {
                socketAccess = true
            } else {
                needsRestart = "outputs.socket (\(after.path)) was added"
            }
        case (let before?, nil):
            if socketActivated {
                socketAccess = true
            } else {
                needsRestart = "outputs.socket (\(before.path)) was removed"
            }
        }
        if was.outputs.servesHeaders != now.outputs.servesHeaders { socketAccess = true }

        switch (was.outputs.proxy, now.outputs.proxy) {
        case (nil, nil):
            break
        case (let before?, let after?):
            // Listeners and the upstream connection pool are made at start; the rest is read per request.
            var restarted = before
            (restarted.mode, restarted.allowUIDs, restarted.allowGIDs) = (after.mode, after.allowUIDs, after.allowGIDs)
            (restarted.maxConnections, restarted.maxRequestBodyBytes) = (
                after.maxConnections, after.maxRequestBodyBytes
            )
            (restarted.rejectedStatuses, restarted.allowBrowsers) = (after.rejectedStatuses, after.allowBrowsers)
            (restarted.denyPaths, restarted.idleTimeoutSeconds) = (after.denyPaths, after.idleTimeoutSeconds)
            if restarted != after {
                needsRestart = needsRestart ?? "outputs.proxy's listeners, upstream, caFile or timeouts changed"
            }
            proxyAccess = before != after
        case (nil, let after?):
            needsRestart = needsRestart ?? "outputs.proxy (\(after.path)) was added"
        case (let before?, nil):
            needsRestart = needsRestart ?? "outputs.proxy (\(before.path)) was removed"
        }
        // The link and the fleet's key are made at start: the key derives from the account's secrets.
        if was.fleet != now.fleet || old.fleetPassword != new.fleetPassword {
            needsRestart = needsRestart ?? "fleet settings changed"
        } else if now.fleet != nil, account || password {
            needsRestart =
                needsRestart ?? "the account's secrets changed in fleet mode (the fleet's key derives from them)"
        }
        other = was.onRotate != now.onRotate || was.metricsFile != now.metricsFile || was.logLevel != now.logLevel
    }

    /// What changed, for the reload's log line (`changed=account,files`); "nothing" when nothing did.
    public var summary: String {
        let names = [
            (account, "account"), (password && !account, "password"), (client, "client"), (policy, "refresh"),
            (files, "files"), (!unconfiguredFiles.isEmpty, "removed_files"), (stateFile, "state_file"),
            (socketAccess, "socket_access"), (proxyAccess, "proxy_access"), (other, "other"),
        ]
        let changed = names.filter(\.0).map(\.1)
        return changed.isEmpty ? "nothing" : changed.joined(separator: ",")
    }
}
