/// The socket's routes (README "Socket API"): the one list the board, the request handler, the
/// metrics' path label and the command-line clients use.
public enum SocketRoute: String, CaseIterable, Sendable {
    /// The bare JWT.
    case token = "/token"
    /// The `jsonFile` document.
    case tokenJSON = "/token.json"
    /// The `headersFile` text.
    case headers = "/headers"
    /// `POST`: the API rejected the token with this fingerprint (rejected-token report).
    case tokenInvalidate = "/token/invalidate"
    case healthz = "/healthz"
    case metrics = "/metrics"

    public var path: String { rawValue }

    /// The answer to a path not listed here.
    static let notFoundBody =
        #"{"error":"not found","paths":["# + allCases.map { "\"\($0.path)\"" }.joined(separator: ",") + "]}"
}
