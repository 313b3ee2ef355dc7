/// A configuration problem: which key, and what is wrong with it. The daemon exits 78 (EX_CONFIG) on
/// any of these, before touching the network.
public struct ConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Dotted key path (`api.timeoutSeconds`), or the file itself when the problem is not one key.
    public var keyPath: String
    public var problem: String

    public init(_ keyPath: String, _ problem: String) {
        self.keyPath = keyPath
        self.problem = problem
    }

    public var description: String { "\(keyPath): \(problem)" }
}
