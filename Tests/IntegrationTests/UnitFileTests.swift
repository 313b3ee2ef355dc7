import Foundation
import TestSupport
import Testing

/// The shipped unit files pass `systemd-analyze verify` with nothing on stderr (it exits 0 even on
/// unknown keys, so any output counts as a failure).
@Suite struct UnitFileTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze")))
    func unitsVerifyClean() async throws {
        let folder = try TemporaryDirectory()
        let names = try FileManager.default.contentsOfDirectory(
            atPath: Self.root.appendingPathComponent("systemd").path
        )
        .filter { $0.hasSuffix(".service") || $0.hasSuffix(".socket") }.sorted()
        #expect(names.contains("fts-tokend.service") && names.contains("fts-tokend.socket"))
        var units: [String] = []
        for name in names {
            // verify checks that ExecStart= exists: point it at the binary under test.
            let text = try String(contentsOf: Self.root.appendingPathComponent("systemd/" + name), encoding: .utf8)
                .replacingOccurrences(of: "/usr/bin/fts-tokend", with: ChildProcess.binary)
            units.append(try folder.write(name, text, mode: 0o644))
        }
        let result = try await Command.run("/usr/bin/systemd-analyze", ["verify"] + units)
        #expect(result.status == 0)
        #expect(
            result.output.isEmpty && result.error.isEmpty,
            "systemd-analyze verify said: \(result.output)\(result.error)"
        )
    }

    /// The template is the plain unit with per-instance paths and identity: the two must not drift apart.
    @Test func theTemplateIsThePlainServicePerInstance() throws {
        func serviceSection(_ name: String) throws -> [String] {
            let text = try String(contentsOf: Self.root.appendingPathComponent("systemd/" + name), encoding: .utf8)
            let lines = text.split(separator: "\n").map(String.init).filter { !$0.hasPrefix("#") }
            guard let start = lines.firstIndex(of: "[Service]"), let end = lines.firstIndex(of: "[Install]") else {
                return []
            }
            return Array(lines[start..<end])
        }
        let perInstance = try serviceSection("fts-tokend.service").map { line in
            line.replacingOccurrences(of: "/etc/fts-tokend/config.json", with: "/etc/fts-tokend/%i.json")
                .replacingOccurrences(of: "/etc/fts-tokend/credentials/", with: "/etc/fts-tokend/credentials/%i/")
                .replacingOccurrences(of: "RuntimeDirectory=fts-tokend", with: "RuntimeDirectory=fts-tokend-%i")
                .replacingOccurrences(of: "StateDirectory=fts-tokend", with: "StateDirectory=fts-tokend-%i")
                .replacingOccurrences(of: "User=fts-tokend", with: "User=fts-tokend-%i")
                .replacingOccurrences(of: "Group=fts-token", with: "Group=fts-token-%i")
        }
        // The one line only an instance has: its name, for fleet mode's default member name.
        let template = try serviceSection("fts-tokend@.service")
        #expect(template.contains("Environment=FTS_TOKEND_INSTANCE=%i"))
        #expect(perInstance == template.filter { $0 != "Environment=FTS_TOKEND_INSTANCE=%i" })
    }
}
