/// `fleet.url`: where the fleet's members meet (README "Fleet").
///
/// `postgresql://USER@HOST[:PORT]/DATABASE[?sslmode=verify-full|require|disable]`, where HOST is a
/// name, an IPv4 address, an IPv6 address in brackets, or a percent-encoded folder of a Unix socket
/// (`%2Frun%2Fpostgresql`). The rules, each an error the operator sees at load (exit 78):
/// 1. no password in the URL, ever: the URL is shown in status, logs and `check --show` (the error
///    names the key, never the URL's text);
/// 2. `sslmode` is `verify-full` unless given; `disable` only to a loopback host (127.0.0.0/8,
///    ::1, localhost), where nothing on the wire can read the traffic; a Unix socket carries no
///    TLS, so it takes no `sslmode` but `disable`;
/// 3. nothing else in the query, no fragment, a user and a database always.
public struct DatabaseURL: Sendable, Equatable, CustomStringConvertible {
    public enum Host: Sendable, Equatable {
        /// A name or an address, connected over TCP.
        case tcp(String)
        /// The folder of the server's Unix socket (`.s.PGSQL.PORT` in it).
        case unixSocket(folder: String)
    }

    public enum TLS: String, Sendable, Equatable {
        /// TLS, the server's certificate checked against the trust roots and its name.
        case verifyFull = "verify-full"
        /// TLS, the certificate not checked (protects from a reader of the wire, not from a
        /// server in the middle).
        case require
        /// No TLS: loopback and Unix sockets only.
        case disable
    }

    public var user: String
    public var host: Host
    public var port: Int
    public var database: String
    public var tls: TLS

    public static let defaultPort = 5432

    /// The URL as given, less nothing (it holds no secret: rule 1).
    public let text: String
    public var description: String { text }

    /// Parses `text`; `keyPath` names the key in errors.
    init(_ text: String, at keyPath: String) throws(ConfigurationError) {
        let example = "postgresql://USER@HOST[:PORT]/DATABASE[?sslmode=verify-full|require|disable]"
        self.text = text
        var rest = Substring(text)
        guard let scheme = ["postgresql://", "postgres://"].first(where: { rest.hasPrefix($0) }) else {
            throw ConfigurationError(keyPath, "must be a URL such as \(example)")
        }
        rest = rest.dropFirst(scheme.count)
        guard !rest.contains("#") else { throw ConfigurationError(keyPath, "must not carry a fragment") }
        // The query, then the path (the database), then the authority.
        var query: Substring?
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        guard let slash = rest.firstIndex(of: "/") else {
            throw ConfigurationError(keyPath, "names no database: \(example)")
        }
        let authority = rest[..<slash]
        let database = try Self.decode(rest[rest.index(after: slash)...], at: keyPath, what: "database")
        guard !database.isEmpty, !database.contains("/") else {
            throw ConfigurationError(keyPath, "names no database: \(example)")
        }
        guard let at = authority.lastIndex(of: "@") else {
            throw ConfigurationError(keyPath, "names no user: \(example)")
        }
        let userInfo = authority[..<at]
        // 1. Checked before anything else is read of the user part: the error must not echo it.
        guard !userInfo.contains(":") else {
            throw ConfigurationError(
                keyPath,
                "must not carry a password (it is shown in status and logs): give fleet.passwordFile or the credential fleet-password"
            )
        }
        user = try Self.decode(userInfo, at: keyPath, what: "user")
        guard !user.isEmpty else { throw ConfigurationError(keyPath, "names no user: \(example)") }
        (host, port) = try Self.hostAndPort(authority[authority.index(after: at)...], at: keyPath)
        self.database = database
        // 2., 3.
        var sslmode: TLS?
        for pair in (query ?? "").split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0] == "sslmode", sslmode == nil else {
                throw ConfigurationError(keyPath, "takes no query parameter but one sslmode, got \"\(parts[0])\"")
            }
            guard let mode = TLS(rawValue: String(parts[1])) else {
                throw ConfigurationError(keyPath, "sslmode must be verify-full, require or disable")
            }
            sslmode = mode
        }
        switch host {
        case .unixSocket:
            guard sslmode == nil || sslmode == .disable else {
                throw ConfigurationError(keyPath, "a Unix socket carries no TLS: leave sslmode out (or disable)")
            }
            tls = .disable
        case .tcp(let name):
            tls = sslmode ?? .verifyFull
            if tls == .disable, !Loopback.isLoopback(host: name) {
                throw ConfigurationError(
                    keyPath,
                    "sslmode=disable is allowed only to loopback (127.0.0.0/8, ::1, localhost) or a Unix socket"
                )
            }
        }
    }

    private static func hostAndPort(
        _ text: Substring,
        at keyPath: String
    ) throws(ConfigurationError) -> (Host, Int) {
        var hostText = text
        var portText: Substring?
        if hostText.hasPrefix("[") {
            // [IPv6]:PORT
            guard let close = hostText.firstIndex(of: "]") else {
                throw ConfigurationError(keyPath, "has an IPv6 address without its closing \"]\"")
            }
            let after = hostText[hostText.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw ConfigurationError(keyPath, "has text after its host") }
                portText = after.dropFirst()
            }
            hostText = hostText[hostText.index(after: hostText.startIndex)..<close]
        } else if let colon = hostText.lastIndex(of: ":") {
            portText = hostText[hostText.index(after: colon)...]
            hostText = hostText[..<colon]
        }
        var port = defaultPort
        if let portText {
            guard let number = Int(portText), (1...65_535).contains(number) else {
                throw ConfigurationError(keyPath, "has a port that is not a number from 1 to 65535")
            }
            port = number
        }
        let decoded = try decode(hostText, at: keyPath, what: "host")
        guard !decoded.isEmpty else { throw ConfigurationError(keyPath, "names no host") }
        if decoded.hasPrefix("/") {
            return (.unixSocket(folder: try ConfigurationValues.absolutePath(decoded, at: keyPath)), port)
        }
        guard decoded.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "/") }) else {
            throw ConfigurationError(keyPath, "has a host that is neither a name, an address nor a socket folder")
        }
        return (.tcp(decoded), port)
    }

    /// Percent-decoding of one part of the URL.
    private static func decode(_ text: Substring, at keyPath: String, what: String) throws(ConfigurationError) -> String
    {
        var bytes: [UInt8] = []
        var iterator = text.utf8.makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else {
                bytes.append(byte)
                continue
            }
            guard let high = iterator.next().flatMap(Self.hexValue), let low = iterator.next().flatMap(Self.hexValue)
            else { throw ConfigurationError(keyPath, "has a malformed percent-escape in its \(what)") }
            bytes.append(high << 4 | low)
        }
        guard !bytes.contains(0), let decoded = String(validating: bytes, as: UTF8.self) else {
            throw ConfigurationError(keyPath, "has a \(what) that is not text")
        }
        return decoded
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
