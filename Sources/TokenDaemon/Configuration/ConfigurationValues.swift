import Glibc

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Checks of single configuration values that do not depend on where in the document they are:
/// paths, the login URL, loopback hosts.
enum ConfigurationValues {
    static func absolutePath(_ path: String, at keyPath: String) throws(ConfigurationError) -> String {
        guard path.hasPrefix("/") else {
            throw ConfigurationError(keyPath, "must be an absolute path, got \"\(path)\"")
        }
        guard !path.split(separator: "/").contains(".."), !path.contains("\0") else {
            throw ConfigurationError(keyPath, "must not contain \"..\" or NUL")
        }
        return path
    }

    /// HTTPS always; plain HTTP only to this host, where nothing on the wire can read the password.
    static func validateBaseURL(_ text: String, at keyPath: String) throws(ConfigurationError) {
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), let host = url.host, !host.isEmpty
        else {
            throw ConfigurationError(
                keyPath,
                "\"\(text)\" is not a URL such as \"https://global-api.fintechstudios.com\""
            )
        }
        guard url.query == nil, url.fragment == nil, url.user == nil, url.password == nil else {
            throw ConfigurationError(keyPath, "must not carry a query, fragment or user info")
        }
        switch scheme {
        case "https":
            return
        case "http":
            guard Loopback.isLoopback(host: host) else {
                throw ConfigurationError(
                    keyPath,
                    "plain http:// is allowed only to loopback (127.0.0.0/8, ::1, localhost); use https://"
                )
            }
        default:
            throw ConfigurationError(keyPath, "scheme \"\(scheme)\" is not supported; use https://")
        }
    }
}

extension ConfigurationValues {
    /// `HOST:PORT` where HOST is a loopback literal (`127.0.0.1`, `[::1]`) or `localhost` (bound as
    /// 127.0.0.1: a name is not resolved, so nothing else can answer for it).
    static func listenAddress(
        _ text: String,
        at keyPath: String
    ) throws(ConfigurationError) -> Configuration.ListenAddress {
        let problem = "must be a loopback address and port such as \"127.0.0.1:8089\" or \"[::1]:8089\""
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (1...65_535).contains(port)
        else { throw ConfigurationError(keyPath, problem) }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") {
            host = String(host.dropFirst().dropLast())
            var ipv6 = in6_addr()
            guard inet_pton(AF_INET6, host, &ipv6) == 1 else { throw ConfigurationError(keyPath, problem) }
        } else if host.lowercased() == "localhost" {
            host = "127.0.0.1"
        } else {
            var ipv4 = in_addr()
            guard inet_pton(AF_INET, host, &ipv4) == 1 else { throw ConfigurationError(keyPath, problem) }
        }
        guard Loopback.isLoopback(host: host) else {
            throw ConfigurationError(
                keyPath,
                "\(text) is not loopback: the proxy spends the account's token for whoever reaches it, so it listens on "
                    + "this machine only (127.0.0.0/8, ::1)"
            )
        }
        return Configuration.ListenAddress(host: host, port: port)
    }
}

/// Which hosts are this machine's loopback: what may see a password in clear.
public enum Loopback {
    /// An IPv4 literal in 127.0.0.0/8, the IPv6 literal ::1 (bracketed or not), or exactly
    /// `localhost`. A name that merely starts like one (`127.evil.example`, `127.0.0.1.nip.io`) is
    /// resolved by DNS, which can answer anything: it is not loopback.
    public static func isLoopback(host: String) -> Bool {
        if host.lowercased() == "localhost" { return true }
        var ipv4 = in_addr()
        if inet_pton(AF_INET, host, &ipv4) == 1 {
            return UInt32(bigEndian: ipv4.s_addr) >> 24 == 127
        }
        let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        var ipv6 = in6_addr()
        guard inet_pton(AF_INET6, bare, &ipv6) == 1 else { return false }
        return withUnsafeBytes(of: &ipv6) { bytes in bytes.dropLast().allSatisfy { $0 == 0 } && bytes.last == 1 }
    }
}

/// Octal permission strings ("0640").
public enum FileMode {
    public static func parse(_ text: String) -> UInt32? {
        guard (3...4).contains(text.count), text.allSatisfy({ ("0"..."7").contains($0) }),
            let value = UInt32(text, radix: 8), value <= 0o777
        else { return nil }
        return value
    }

    public static func format(_ mode: UInt32) -> String {
        let digits = String(mode, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    static func formatNumber(_ number: Double) -> String {
        number.rounded() == number && abs(number) < 1e15 ? String(Int64(number)) : String(number)
    }
}
