/// A request path in the one spelling that the proxy's path rules judge, so that no other spelling
/// of a denied path reaches the upstream. Servers differ in how they map a target to a route; the
/// canonical form undoes every mapping one of them might make, so that it errs on the side of a
/// match:
/// 1. the path alone: up to the first `?` or `#`;
/// 2. percent-decoded until nothing changes (a double-encoded `%252F` too, four rounds at most),
///    and `\` read as `/` (servers on Windows do);
/// 3. split at `/`; in each segment the parameters after `;` are dropped (servlet containers route
///    `/auth;x=1/token` as `/auth/token`), then trailing dots and spaces (Windows does), a segment
///    of dots and spaces alone being read as `.` or `..`;
/// 4. empty and `.` segments dropped, `..` takes the segment before it away (never above the root);
/// 5. ASCII letters lowercased (case-insensitive routers).
struct CanonicalPath: Sendable, Equatable, CustomStringConvertible {
    let segments: [[UInt8]]

    init(_ target: String) {
        var bytes = Array(target.utf8.prefix { $0 != UInt8(ascii: "?") && $0 != UInt8(ascii: "#") })
        for _ in 0..<4 where bytes.contains(UInt8(ascii: "%")) {
            let decoded = Self.percentDecoded(bytes)
            if decoded == bytes { break }
            bytes = decoded
        }
        var segments: [[UInt8]] = []
        for raw in bytes.split(omittingEmptySubsequences: false, whereSeparator: { $0 == 0x2F || $0 == 0x5C }) {
            var segment = Array(raw.prefix { $0 != UInt8(ascii: ";") })
            if segment.allSatisfy({ $0 == 0x2E || $0 == 0x20 }) {
                // Dots and spaces only (`.. `, `...`): a server that strips the trailing ones reads
                // a dot segment, `..` when two dots or more are left.
                let dots = segment.filter { $0 == 0x2E }.count
                segment = dots >= 2 ? [0x2E, 0x2E] : (dots == 1 ? [0x2E] : [])
            } else {
                while let last = segment.last, last == 0x2E || last == 0x20 { segment.removeLast() }
            }
            switch segment {
            case [], [0x2E]: continue
            case [0x2E, 0x2E]: _ = segments.popLast()
            default: segments.append(segment.map { $0 >= 0x41 && $0 <= 0x5A ? $0 + 0x20 : $0 })
            }
        }
        self.segments = segments
    }

    var description: String { "/" + segments.map { String(decoding: $0, as: UTF8.self) }.joined(separator: "/") }

    private static func percentDecoded(_ bytes: [UInt8]) -> [UInt8] {
        func hex(_ byte: UInt8) -> UInt8? {
            switch byte {
            case 0x30...0x39: byte - 0x30
            case 0x41...0x46: byte - 0x41 + 10
            case 0x61...0x66: byte - 0x61 + 10
            default: nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var index = 0
        while index < bytes.count {
            if bytes[index] == UInt8(ascii: "%"), index + 2 < bytes.count,
                let high = hex(bytes[index + 1]), let low = hex(bytes[index + 2])
            {
                out.append(high << 4 | low)
                index += 3
            } else {
                out.append(bytes[index])
                index += 1
            }
        }
        return out
    }
}

/// A path the proxy never forwards (`outputs.proxy.denyPaths`), compared on canonical forms:
/// - ending in `/` (`/auth/`): the folder itself and everything under it (`/auth`, `/auth/x`);
/// - otherwise a prefix (`/auth/token`): the path, anything under it, and any path whose last
///   segment only starts with it (`/auth/token.json`, `/auth/tokens`), since a router may take
///   a suffix for a format.
struct DeniedPath: Sendable, Equatable {
    /// As configured, for messages.
    let configured: String
    private let path: CanonicalPath
    private let isFolder: Bool

    init(_ configured: String) {
        self.configured = configured
        path = CanonicalPath(configured)
        isFolder = configured.hasSuffix("/")
    }

    func covers(_ candidate: CanonicalPath) -> Bool {
        let own = path.segments
        guard candidate.segments.count >= own.count else { return false }
        guard let last = own.last else { return true }
        let head = own.count - 1
        for index in 0..<head where candidate.segments[index] != own[index] { return false }
        let segment = candidate.segments[head]
        return isFolder ? segment == last : segment.starts(with: last)
    }
}
