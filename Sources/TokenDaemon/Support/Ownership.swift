import Glibc

/// The daemon's one rule for what it trusts (README "Hardening"): a file or folder that decides what
/// it trusts, runs, signals or writes the token into must belong to root or the daemon's own user
/// and be writable by no one else. Each caller words the problem for what the path is.
enum Ownership {
    enum Problem: Equatable {
        /// Owned by this uid, another user.
        case otherOwner(UInt32)
        /// Writable by group or others; the permission bits.
        case writableByOthers(mode: UInt32)
    }

    /// What breaks the rule in `info`, or nil. `stickyRootFolders`: a root-owned sticky folder
    /// (`/tmp`) passes, as others cannot replace there what they do not own.
    static func problem(_ info: stat, stickyRootFolders: Bool = false) -> Problem? {
        guard info.st_uid == 0 || info.st_uid == geteuid() else { return .otherOwner(info.st_uid) }
        let sticky = info.st_mode & S_IFMT == S_IFDIR && info.st_mode & S_ISVTX != 0 && info.st_uid == 0
        guard info.st_mode & 0o022 == 0 || (stickyRootFolders && sticky) else {
            return .writableByOthers(mode: UInt32(info.st_mode & 0o7777))
        }
        return nil
    }
}
