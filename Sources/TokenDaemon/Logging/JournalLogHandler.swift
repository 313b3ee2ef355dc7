import Logging
import Systemd

/// swift-log backend writing structured entries to journald when the daemon runs under systemd.
///
/// Besides MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and CODE_FILE/LINE/FUNC, every metadata key becomes
/// an upper-case field with the `FTS_` prefix (`event` → `FTS_EVENT`, `token_fp` → `FTS_TOKEN_FP`),
/// so `journalctl -u fts-tokend FTS_EVENT=login_failed` finds every failure. MESSAGE keeps the same
/// human `key=value` text as the stderr lines. If journald refuses an entry, the line goes to stderr.
public struct JournalLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    private let identifier: String
    private var fallback = LineLogHandler(journalPrefixes: true)

    public init(identifier: String) {
        self.identifier = identifier
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { _, new in new }
        var fields: [(name: String, value: String)] = [
            ("MESSAGE", LineLogHandler.text(event.message, merged)),
            ("PRIORITY", String(LineLogHandler.syslogPriority(event.level))),
            ("SYSLOG_IDENTIFIER", identifier),
            ("CODE_FILE", event.file),
            ("CODE_LINE", String(event.line)),
            ("CODE_FUNC", event.function),
        ]
        for (key, value) in merged {
            fields.append((Self.fieldName(key), "\(value)"))
        }
        if !Journal.send(fields) {
            var fallback = self.fallback
            fallback.logLevel = logLevel
            fallback.log(
                event: LogEvent(
                    level: event.level,
                    message: event.message,
                    metadata: merged,
                    source: event.source,
                    file: event.file,
                    function: event.function,
                    line: event.line
                )
            )
        }
    }

    /// `next_refresh_at` → `FTS_NEXT_REFRESH_AT`; anything but letters and digits becomes `_`.
    static func fieldName(_ key: String) -> String {
        "FTS_" + String(key.uppercased().map { $0.isASCII && ($0.isLetter || $0.isNumber) ? $0 : "_" })
    }
}
