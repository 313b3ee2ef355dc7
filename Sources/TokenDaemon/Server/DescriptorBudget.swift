import Glibc

/// One budget of file descriptors for everything the daemon holds open at once, derived from
/// `RLIMIT_NOFILE` (the unit's `LimitNOFILE=`).
///
/// Guarantees:
/// 1. `reserved` descriptors never go to connections: the listeners, the signalfd, NIO's epoll,
///    eventfd and timers, a login (and the one after it), the files being written and `onRotate`
///    programs. However many clients are connected, a login and a file write can open what they need.
/// 2. The token socket's clients, the API proxy's clients and the proxy's upstream connections
///    together get at most the rest, so accept(2) never fails with EMFILE (which leaves every new
///    client unanswered); past its share a socket evicts its longest-idle connection instead.
/// 3. When the configured limits do not fit, each is scaled down in proportion (one at least), and
///    `warning` says what is served and why.
struct DescriptorBudget: Sendable, Equatable {
    static let reserved = 64

    /// Connections the token socket serves at once (nil: no socket).
    var socketConnections: Int?
    /// Client connections of the API proxy (nil: no proxy).
    var proxyConnections: Int?
    /// Connections the proxy keeps to its upstream (nil: no proxy).
    var upstreamConnections: Int?
    /// Set when the limits had to be lowered.
    var warning: String?

    /// - Parameters:
    ///   - socketActivated: systemd passed the token socket (served with the default limit when the
    ///     config has no `outputs.socket`).
    ///   - descriptorLimit: the soft `RLIMIT_NOFILE`; nil when unlimited.
    init(outputs: Configuration.Outputs, socketActivated: Bool, descriptorLimit: Int?) {
        let socket =
            outputs.socket?.maxConnections ?? (socketActivated ? Configuration.Socket.defaultMaxConnections : nil)
        let proxy = outputs.proxy?.maxConnections
        let upstream = outputs.proxy?.maxUpstreamConnections
        (socketConnections, proxyConnections, upstreamConnections) = (socket, proxy, upstream)
        let demands = [socket, proxy, upstream].compactMap { $0 }
        let wanted = demands.reduce(0, +)
        guard let descriptorLimit, !demands.isEmpty else { return }
        let available = max(demands.count, descriptorLimit - Self.reserved)
        guard wanted > available else { return }
        func share(_ configured: Int?) -> Int? { configured.map { max(1, $0 * available / wanted) } }
        (socketConnections, proxyConnections, upstreamConnections) = (share(socket), share(proxy), share(upstream))
        var served: [String] = []
        if let socketConnections, let socket {
            served.append("\(socketConnections) on the token socket (outputs.socket.maxConnections \(socket))")
        }
        if let proxyConnections, let proxy {
            served.append("\(proxyConnections) on the API proxy (outputs.proxy.maxConnections \(proxy))")
        }
        if let upstreamConnections, let upstream {
            served.append(
                "\(upstreamConnections) to the upstream (outputs.proxy.maxUpstreamConnections \(upstream))"
            )
        }
        warning =
            "the descriptor limit (\(descriptorLimit)) leaves \(available) for connections, fewer than the \(wanted) "
            + "configured: serving at most " + served.joined(separator: ", ")
    }

    /// The soft `RLIMIT_NOFILE` of this process; nil when unlimited or unreadable.
    static var currentLimit: Int? {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur != rlim_t.max else {
            return nil
        }
        return Int(clamping: limit.rlim_cur)
    }
}
