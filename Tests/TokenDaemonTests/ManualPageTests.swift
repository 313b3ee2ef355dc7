import Foundation
import Testing

@testable import TokenDaemon

/// docs/man/fts-tokend.json.5 is written by hand: it must name every key the parser accepts, and no
/// other.
@Suite struct ManualPageTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// The keys the page documents: the term of each `.TP` entry, split at its `\fR, \fB` joins.
    static func documentedKeys() throws -> Set<String> {
        let page = try String(contentsOf: root.appendingPathComponent("docs/man/fts-tokend.json.5"), encoding: .utf8)
        let lines = page.split(separator: "\n", omittingEmptySubsequences: false)
        var keys = Set<String>()
        for (index, line) in lines.enumerated() where line == ".TP" && index + 1 < lines.count {
            let term = lines[index + 1]
            guard term.hasPrefix(".B ") else { continue }
            for part in term.dropFirst(3).components(separatedBy: "\\fR, \\fB") {
                keys.insert(part.replacingOccurrences(of: "\\fB", with: "").replacingOccurrences(of: "\\fR", with: ""))
            }
        }
        return keys
    }

    /// The keys the parser reads at `path` (nil: the top level), from its own refusal of an unknown
    /// key there: "unknown key (known here: a, b)".
    static func acceptedKeys(at path: String?, in base: @escaping (inout [String: Any]) -> Void) -> [String] {
        let bytes = config { object in
            base(&object)
            if let path { set(&object, path + ".zzUnknown", 1) } else { object["zzUnknown"] = 1 }
        }
        guard let error = parseError(bytes), let range = error.problem.range(of: "known here: ") else {
            Issue.record("no unknown-key error at \(path ?? "(file)"): \(String(describing: parseError(bytes)))")
            return []
        }
        return error.problem[range.upperBound...].dropLast().components(separatedBy: ", ")
    }

    /// A config with every section present.
    static func everything(_ object: inout [String: Any]) {
        set(&object, "outputs.socket", ["path": "/run/fts-tokend/tokend.sock"])
        set(&object, "outputs.proxy", [String: Any]())
        object["metricsFile"] = "/var/lib/node_exporter/fts-tokend.prom"
        set(&object, "fleet", ["url": "postgresql://fts_tokend@db.internal/fts_tokend"])
    }

    /// Every key the parser accepts, as dotted paths (`onRotate[].exec`), from its own refusals.
    static func allAcceptedKeys() -> Set<String> {
        var accepted = Set(Self.acceptedKeys(at: nil, in: Self.everything))
        for section in [
            "api", "refresh", "outputs", "outputs.tokenFile", "outputs.jsonFile", "outputs.headersFile",
            "outputs.socket",
            "outputs.proxy", "fleet",
        ] {
            accepted.formUnion(Self.acceptedKeys(at: section, in: Self.everything).map { section + "." + $0 })
        }
        for action in [
            ["exec": ["/usr/bin/true"], "zzUnknown": 1] as [String: Any],
            ["signal": "HUP", "pidFile": "/run/app.pid", "zzUnknown": 1],
        ] {
            let error = parseError(
                config {
                    Self.everything(&$0)
                    $0["onRotate"] = [action]
                }
            )
            let known = error?.problem.components(separatedBy: "known here: ").last?.dropLast() ?? ""
            accepted.formUnion(known.components(separatedBy: ", ").map { "onRotate[]." + $0 })
        }
        return accepted
    }

    @Test func theConfigurationPageListsExactlyTheKeysTheParserAccepts() throws {
        let accepted = Self.allAcceptedKeys()
        let documented = try Self.documentedKeys()
        #expect(accepted.count > 50, "\(accepted.sorted())")
        #expect(
            accepted.subtracting(documented).isEmpty,
            "accepted but not in the page: \(accepted.subtracting(documented).sorted())"
        )
        #expect(
            documented.subtracting(accepted).isEmpty,
            "in the page but not accepted: \(documented.subtracting(accepted).sorted())"
        )
    }
}
