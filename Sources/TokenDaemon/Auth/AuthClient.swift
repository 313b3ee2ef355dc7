import AsyncHTTPClient
import Dispatch
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Logs in to the FTS auth API: one `POST {baseURL}{tokenPath}` per call, no retries (retrying is the
/// refresh policy's job), redirects never followed (they would carry the password elsewhere).
public final class AuthClient: Sendable {
    /// Bodies above this are refused without being read further.
    public static let bodyLimit = 64 * 1024

    private let http: HTTPClient
    private let url: String
    private let timeout: TimeAmount
    private let userAgent: String
    private let parser = TokenResponseParser()

    /// Creates the client; call `shutdown()` before dropping it.
    public init(api: Configuration.API, version: String) {
        let tls = Self.tlsConfiguration(caFile: api.caFile)
        let timeout = TimeAmount.milliseconds(Int64(api.timeoutSeconds * 1000))
        var configuration = HTTPClient.Configuration(
            tlsConfiguration: tls,
            redirectConfiguration: .disallow,
            // AsyncHTTPClient retries refused connections until the connect timeout, then reports the
            // last connection error; a connect timeout shorter than the total lets that error surface.
            timeout: .init(connect: min(.nanoseconds(timeout.nanoseconds / 2), .seconds(10)), read: timeout),
            decompression: .disabled
        )
        // One login every few minutes: keeping connections open would only hold sockets.
        configuration.connectionPool.idleTimeout = .seconds(1)
        self.http = HTTPClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton, configuration: configuration)
        self.url = api.tokenURL
        self.timeout = timeout
        self.userAgent = "fts-tokend/\(version)"
    }

    /// TLS for every connection that carries the account's secrets (logins, the API proxy): the
    /// system's trust roots plus `caFile`, nothing older than TLS 1.2 (NIOSSL allows 1.0).
    static func tlsConfiguration(caFile: String?) -> TLSConfiguration {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        if let caFile {
            tls.additionalTrustRoots = [.file(caFile)]
        }
        return tls
    }

    public func shutdown() async {
        // Called back on a serial queue: async-http-client's own `shutdown()` calls back on
        // DispatchQueue.global(), which would start libdispatch's monitored worker pool at every
        // reload (README "Threads and idle cost"); serial queues run on unmonitored threads.
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            http.shutdown(queue: Self.shutdownQueue) { _ in done.resume() }
        }
    }

    private static let shutdownQueue = DispatchQueue(label: "fts-tokend.http-shutdown")

    /// Logs in once. `now` reads the local clock when the request goes out and when the answer arrives.
    public func login(
        _ secrets: LoginSecrets,
        now: @Sendable () -> Date
    ) async throws(LoginError) -> TokenResponseParser.Result {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "Accept", value: "application/json")
        request.headers.add(name: "User-Agent", value: userAgent)
        request.headers.add(name: "x-api-key", value: secrets.apiKey)
        let body: [UInt8]
        do {
            body = Array(try JSONEncoder().encode(["email": secrets.email, "password": secrets.password]))
        } catch {
            throw LoginError.transport("cannot encode the request")
        }
        request.body = .bytes(ByteBuffer(bytes: body))

        let answer: Answer
        let prepared = request
        let sent = now()
        do {
            answer = try await withOverallTimeout { try await self.send(prepared) }
        } catch let error as LoginError {
            throw error
        } catch {
            throw Self.classify(error, timeoutSeconds: Double(timeout.nanoseconds) / 1e9)
        }
        let arrived = now()
        guard (200...299).contains(answer.status) else {
            throw LoginError.httpStatus(
                answer.status,
                retryAfter: answer.retryAfter.flatMap { RetryAfter.seconds(from: $0, now: arrived) }
            )
        }
        return try parser.parse(
            body: answer.body,
            contentType: answer.contentType,
            serverDate: answer.date,
            sentAt: sent,
            now: arrived
        )
    }

    private struct Answer: Sendable {
        var status: Int
        var body: [UInt8]
        var contentType: String?
        var date: String?
        var retryAfter: String?
    }

    private func send(_ request: HTTPClientRequest) async throws -> Answer {
        let response = try await http.execute(request, timeout: timeout)
        let status = Int(response.status.code)
        var body: [UInt8] = []
        if (200...299).contains(status) {
            do {
                body = Array(buffer: try await response.body.collect(upTo: Self.bodyLimit))
            } catch is NIOTooManyBytesError {
                throw LoginError.bodyTooLarge(limit: Self.bodyLimit)
            }
        }
        // An error body is never read, never logged: it may echo what we sent.
        return Answer(
            status: status,
            body: body,
            contentType: response.headers.first(name: "Content-Type"),
            date: response.headers.first(name: "Date"),
            retryAfter: response.headers.first(name: "Retry-After")
        )
    }

    /// AsyncHTTPClient's deadline ends at the response head; this bounds the body too, so a server that
    /// trickles its answer cannot hold a login open. The timer is a NIO scheduled task, cancelled when
    /// the login ends: a sleeping Swift task would stay scheduled (and allocated) until its deadline
    /// even when cancelled, which piled up under many logins (bench: +1 MB after 1,000 rotations).
    private func withOverallTimeout(_ operation: @escaping @Sendable () async throws -> Answer) async throws -> Answer {
        let seconds = Double(timeout.nanoseconds) / 1e9
        let login = Task { try await operation() }
        let timedOut = NIOLockedValueBox(false)
        let timer = http.eventLoopGroup.next().scheduleTask(in: timeout) {
            timedOut.withLockedValue { $0 = true }
            login.cancel()
        }
        defer { timer.cancel() }
        do {
            return try await withTaskCancellationHandler {
                try await login.value
            } onCancel: {
                login.cancel()
            }
        } catch {
            // Cancelled by the timer, whatever error the cancelled request surfaced as.
            if timedOut.withLockedValue({ $0 }) { throw LoginError.timedOut(seconds: seconds) }
            throw error
        }
    }

    static func classify(_ error: any Error, timeoutSeconds: Double) -> LoginError {
        if let error = error as? HTTPClientError {
            switch error {
            case .deadlineExceeded, .readTimeout, .connectTimeout, .writeTimeout:
                return .timedOut(seconds: timeoutSeconds)
            case .remoteConnectionClosed:
                return .transport("connection closed by the server")
            default:
                return .transport(String(describing: error).prefix(120).description)
            }
        }
        if error is CancellationError { return .transport("cancelled") }
        if let error = error as? IOError { return .transport(error.description.prefix(120).description) }
        if let error = error as? NIOConnectionError {
            return .transport("cannot connect to \(error.host):\(error.port)")
        }
        return .transport(String(describing: error).prefix(120).description)
    }
}
