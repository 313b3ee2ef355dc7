import AsyncHTTPClient
import NIOCore
import NIOHTTP1

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Requests over the daemon's Unix socket, for the `token` and `status` commands.
enum SocketClient {
    struct Answer {
        var status: Int
        var body: String
        var retryAfter: String?
        /// `X-Token-Fingerprint`: the token an answer carries or names.
        var fingerprint: String?
    }

    static let defaultPath = "/run/fts-tokend/tokend.sock"

    /// - Throws: `CleanExit`-worthy messages as `SocketClientError` when nothing answers.
    static func get(_ target: String, socket: String, timeout: TimeAmount) async throws(SocketClientError) -> Answer {
        try await send(.GET, target, socket: socket, timeout: timeout)
    }

    /// One request with `headers` (and no body).
    static func send(
        _ method: HTTPMethod,
        _ target: String,
        headers: [(String, String)] = [],
        socket: String,
        timeout: TimeAmount
    ) async throws(SocketClientError) -> Answer {
        // async-http-client's http+unix scheme takes the socket path percent-encoded as the host.
        let host = socket.utf8.map { byte -> String in
            let c = Character(Unicode.Scalar(byte))
            return c.isLetter || c.isNumber || c == "-" || c == "." || c == "_"
                ? String(c) : "%" + String(byte, radix: 16, uppercase: true)
        }.joined()
        var request = HTTPClientRequest(url: "http+unix://\(host)\(target)")
        request.method = method
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        do {
            let response = try await HTTPClient.shared.execute(request, timeout: timeout)
            let body = try await response.body.collect(upTo: 1 << 20)
            return Answer(
                status: Int(response.status.code),
                body: String(buffer: body),
                retryAfter: response.headers.first(name: "Retry-After"),
                fingerprint: response.headers.first(name: "X-Token-Fingerprint")
            )
        } catch {
            throw SocketClientError(message: "no fts-tokend answering on \(socket) (\(error))")
        }
    }
}

struct SocketClientError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}
