private import CSystemd
import Glibc

/// Structured entries to journald (sd_journal_sendv(3)).
public enum Journal {
    /// Whether journald's native socket exists. sd_journal_sendv reports success when it does not
    /// (it drops entries silently), so callers check this once before choosing the journal.
    public static var isAvailable: Bool {
        var info = stat()
        return stat("/run/systemd/journal/socket", &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK
    }

    /// Sends one entry made of `fields` (`("MESSAGE", "…")`, `("PRIORITY", "6")`, …). Field names must
    /// be upper-case letters, digits and underscores, not starting with an underscore; values may hold
    /// any bytes, newlines included. Returns false when journald did not take the entry (no journal
    /// socket, say): the caller should fall back to stderr.
    public static func send(_ fields: [(name: String, value: String)]) -> Bool {
        // One buffer for all "NAME=value" strings, and an iovec for each pointing into it.
        var bytes: [UInt8] = []
        var ranges: [Range<Int>] = []
        for field in fields {
            let start = bytes.count
            bytes.append(contentsOf: field.name.utf8)
            bytes.append(UInt8(ascii: "="))
            bytes.append(contentsOf: field.value.utf8)
            ranges.append(start..<bytes.count)
        }
        return bytes.withUnsafeMutableBytes { buffer -> Bool in
            let vectors = ranges.map { range in
                iovec(iov_base: buffer.baseAddress! + range.lowerBound, iov_len: range.count)
            }
            return vectors.withUnsafeBufferPointer { sd_journal_sendv($0.baseAddress, Int32($0.count)) == 0 }
        }
    }
}
