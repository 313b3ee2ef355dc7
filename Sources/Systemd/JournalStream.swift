import Glibc

/// Whether standard error is connected to journald (`JOURNAL_STREAM`, systemd.exec(5)).
public enum JournalStream {
    /// True when `JOURNAL_STREAM` names the device and inode of our stderr: then log lines may carry
    /// `<N>` priority prefixes (sd-daemon(3)) and journald takes timestamps itself.
    public static func isStandardErrorJournal(environment: [String: String]) -> Bool {
        guard let value = environment["JOURNAL_STREAM"] else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var info = stat()
        guard fstat(STDERR_FILENO, &info) == 0 else { return false }
        return UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }
}
