import Glibc
import Logging

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// swift-log backend writing one line per event to standard error.
///
/// Under journald (stderr is the journal stream) each line starts with the sd-daemon(3) priority
/// prefix (`<6>`) and carries no timestamp, since journald adds its own. Elsewhere it starts with an
/// ISO 8601 time and the level. Metadata follows as `key=value`. Each line is one write(2), so lines
/// from several threads never interleave and nothing is lost to buffering if the process is killed.
public struct LineLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    private let journalPrefixes: Bool
    private let sink: @Sendable (String) -> Void

    public init(journalPrefixes: Bool, sink: @escaping @Sendable (String) -> Void = LineLogHandler.standardError) {
        self.journalPrefixes = journalPrefixes
        self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var line =
            journalPrefixes
            ? "<\(Self.syslogPriority(event.level))>"
            : FormatTime.iso8601(Date()) + " " + event.level.rawValue + " "
        line += Self.text(event.message, metadata.merging(event.metadata ?? [:]) { _, new in new })
        sink(line + "\n")
    }

    /// The message on one line, then the metadata as sorted `key=value` pairs (quoted when needed).
    static func text(_ message: Logger.Message, _ metadata: Logger.Metadata) -> String {
        var line = String(message.description.map { $0.isNewline ? " " : $0 })
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) {
            let text = "\(value)"
            let needsQuotes = text.isEmpty || text.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" })
            line += " \(key)=" + (needsQuotes ? "\"" + text.replacing("\"", with: "'") + "\"" : text)
        }
        return line
    }

    /// Maps swift-log levels onto syslog priorities (sd-daemon(3), syslog(3)).
    static func syslogPriority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    @Sendable public static func standardError(_ line: String) {
        writeAll(line, to: STDERR_FILENO)
    }

    /// Writes `text` to `fd` unbuffered, retrying short writes; gives up silently on a closed stream.
    public static func writeAll(_ text: String, to fd: Int32) {
        try? POSIX.writeAll(fd, Array(text.utf8), operation: "write")
    }
}
