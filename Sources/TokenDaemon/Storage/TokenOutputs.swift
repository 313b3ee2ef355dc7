#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Renders a token into the configured output files and writes them (README "Output files").
public struct TokenOutputs: Sendable, Equatable {
    public var outputs: Configuration.Outputs

    public init(_ outputs: Configuration.Outputs) {
        self.outputs = outputs
    }

    /// What one `write` did.
    public struct WriteOutcome: Sendable, Equatable {
        /// The files written, in order.
        public var written: [String]
        /// The file that could not be written; the files after it were not tried.
        public var failure: Failure?

        public struct Failure: Sendable, Equatable {
            public var path: String
            public var error: String

            public init(path: String, error: String) {
                self.path = path
                self.error = error
            }
        }

        public init(written: [String], failure: Failure? = nil) {
            self.written = written
            self.failure = failure
        }
    }

    /// Writes every configured file atomically, in order. Stops at the first failure, which names the
    /// file; files written before it hold the new token, the others still the old one.
    public func write(_ grant: TokenGrant, apiKey: String) -> WriteOutcome {
        var outcome = WriteOutcome(written: [])
        for (file, bytes) in render(grant, apiKey: apiKey) {
            do {
                try AtomicFileWriter.write(bytes, to: file.path, mode: file.mode)
            } catch {
                outcome.failure = WriteOutcome.Failure(path: file.path, error: error.description)
                break
            }
            outcome.written.append(file.path)
        }
        return outcome
    }

    /// Removes every configured file, so that no one reads an expired token.
    public func remove() throws(SystemError) {
        for file in outputs.files {
            try AtomicFileWriter.remove(file.path)
        }
    }

    /// Deletes temporary files left beside the outputs by a writer that was killed.
    public func removeStaleTemporaryFiles() {
        for file in outputs.files {
            AtomicFileWriter.removeStaleTemporaryFiles(for: file.path)
        }
    }

    func render(_ grant: TokenGrant, apiKey: String) -> [(Configuration.OutputFile, [UInt8])] {
        var files: [(Configuration.OutputFile, [UInt8])] = []
        if let file = outputs.tokenFile {
            files.append((file, Array(grant.token.utf8)))
        }
        if let file = outputs.jsonFile {
            files.append((file, Self.jsonDocument(grant)))
        }
        if let headers = outputs.headersFile {
            files.append((headers.file, Self.headersText(grant, apiKey: apiKey, scheme: headers.authorizationScheme)))
        }
        return files
    }

    /// The `jsonFile` document (also served on the socket as `/token.json`).
    public static func jsonDocument(_ grant: TokenGrant) -> [UInt8] {
        struct Document: Encodable {
            var token: String
            var expires: Int64
            var expiresAt: String
            var userId: String?
            var tenantId: String?
            var obtainedAt: String
        }
        let document = Document(
            token: grant.token,
            expires: Int64(grant.expiresAt.timeIntervalSince1970.rounded(.down)),
            expiresAt: FormatTime.iso8601(grant.expiresAt),
            userId: grant.userId,
            tenantId: grant.tenantId,
            obtainedAt: FormatTime.iso8601(grant.obtainedAt)
        )
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding plain strings and integers cannot fail.
        return Array((try? encoder.encode(document)) ?? Data()) + [0x0A]
    }

    /// The `Authorization` scheme when `outputs.headersFile.authorizationScheme` is not given (and
    /// of the socket's `/headers` without a headers file).
    public static let defaultScheme = "Bearer"

    /// The `headersFile` text, for `curl -H @file`. Token and key were checked to be header-safe.
    public static func headersText(_ grant: TokenGrant, apiKey: String, scheme: String) -> [UInt8] {
        Array("x-api-key: \(apiKey)\nAuthorization: \(authorization(grant, scheme: scheme))\n".utf8)
    }

    /// The `Authorization` header's value: `scheme` and the token, or the bare token.
    public static func authorization(_ grant: TokenGrant, scheme: String) -> String {
        scheme.isEmpty ? grant.token : scheme + " " + grant.token
    }
}
