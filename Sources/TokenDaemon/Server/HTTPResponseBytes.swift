import NIOCore
import NIOHTTP1

/// HTTP/1.1 responses as bytes, for the socket server.
///
/// Requests are parsed by NIO's decoder (llhttp); responses are encoded here instead of by NIO's
/// response encoder, because the socket only ever sends a few small responses whose header names
/// and values are all its own (fixed strings, numbers, hex fingerprints): nothing to validate or
/// escape. That is what lets a token response be encoded once per token and served as one write
/// of a shared buffer (`TokenBoard.Entry`): the profile of `GET /token` showed NIO's response
/// pipeline (encoder, header validation, pipelining handler) as the largest part of its user time.
enum HTTPResponseBytes {
    /// A whole response. `body` is left out (its length kept) for HEAD.
    static func encode(
        _ status: HTTPResponseStatus,
        contentType: String,
        body: ByteBuffer,
        headers extra: [(String, String)] = [],
        keepAlive: Bool,
        includeBody: Bool = true
    ) -> ByteBuffer {
        var head = "HTTP/1.1 \(status.code) \(status.reasonPhrase)\r\n"
        head += "Content-Type: \(contentType)\r\nContent-Length: \(body.readableBytes)\r\nCache-Control: no-store\r\n"
        for (name, value) in extra { head += "\(name): \(value)\r\n" }
        head += keepAlive ? "" : "Connection: close\r\n"
        head += "\r\n"
        var buffer = ByteBuffer(string: head)
        if includeBody {
            var body = body
            buffer.writeBuffer(&body)
        }
        return buffer
    }
}
