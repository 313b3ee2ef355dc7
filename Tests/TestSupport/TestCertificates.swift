import Foundation

/// A throw-away CA and a server certificate for 127.0.0.1 and localhost, made with openssl(1), for
/// the HTTPS and PostgreSQL TLS tests.
public struct TestCertificates: Sendable {
    /// The CA's certificate (PEM): what a client trusts.
    public var ca: String
    /// The server's certificate and key (PEM).
    public var certificate: String
    public var key: String

    public static func make(in folder: TemporaryDirectory) async throws -> TestCertificates {
        try folder.write(
            "san.ext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
            mode: 0o644
        )
        let (caKey, ca, key, request, certificate) = (
            folder.file("ca.key"), folder.file("ca.pem"), folder.file("server.key"),
            folder.file("server.csr"), folder.file("server.pem")
        )
        let steps = [
            [
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", caKey,
                "-out", ca, "-days", "2", "-subj", "/CN=fts-tokend test CA",
            ],
            [
                "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out",
                request, "-subj", "/CN=127.0.0.1",
            ],
            [
                "x509", "-req", "-in", request, "-CA", ca, "-CAkey", caKey, "-CAcreateserial", "-out", certificate,
                "-days", "2", "-extfile", folder.file("san.ext"),
            ],
        ]
        for arguments in steps {
            let result = try await Command.run("/usr/bin/openssl", arguments)
            guard result.status == 0 else { throw POSIXError(.EIO) }
        }
        return TestCertificates(ca: ca, certificate: certificate, key: key)
    }
}
