private import CSystemd

/// Sockets passed by the service manager (`LISTEN_FDS`, sd_listen_fds(3)).
public enum SocketActivation {
    /// The passed file descriptors (starting at 3), or an empty list when none were passed. The
    /// `LISTEN_*` variables are removed from the environment so that children do not inherit them.
    public static func listenFDs() -> [Int32] {
        let count = sd_listen_fds(1)
        guard count > 0 else { return [] }
        return (0..<count).map { SD_LISTEN_FDS_START + $0 }
    }
}
