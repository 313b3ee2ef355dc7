import Glibc

/// Replaces a file's contents atomically, with exact permissions, in a folder that is checked at
/// every write.
///
/// What a reader of `path` is guaranteed, at any instant, even if this process is killed mid-write:
/// - it opens either the complete old contents or the complete new contents; never a mix, never an
///   empty or truncated file (the new contents become visible only by rename(2), after fsync(2));
/// - the file it opens has `mode` exactly, whatever the umask, and the secret bytes were never in a
///   file with wider permissions (the temporary file is fchmod'ed before the first byte is written);
/// - a symlink at `path` is replaced by the file, never followed (rename(2) replaces the link itself);
/// - with the `.secret` rule, the file is in the folder `OpenedFolder` checked (no symlink on the
///   way, owned by root or this user, writable by no one else): every step is relative to that
///   folder's descriptor, so a folder swapped after start gets nothing, and the old token stays.
///
/// Not guaranteed: that the rename survives a power loss before the directory fsync returns (then the
/// old contents remain); that readers holding the old file open see the new contents.
///
/// Temporary files are named `.<name>.tmp-<random>` in the target's directory (rename(2) cannot cross
/// file systems); a crash can leave one behind, which `removeStaleTemporaryFiles(for:)` deletes.
public enum AtomicFileWriter {
    public static func write(
        _ bytes: [UInt8],
        to path: String,
        mode: UInt32,
        directoryMode: UInt32 = 0o750,
        rule: OpenedFolder.Rule = .secret
    ) throws(SystemError) {
        let (directory, name) = split(path)
        // 1. Open the folder (created with `directoryMode` when missing) and check it.
        let folder = try OpenedFolder(directory, rule: rule, createMode: directoryMode)

        // 2. Create a new, private temporary file in it; O_EXCL|O_NOFOLLOW refuse anything already there.
        let temporaryName = "." + name + ".tmp-" + randomSuffix()
        let temporary = directory + "/" + temporaryName
        let fd = openat(folder.descriptor, temporaryName, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError("create \(temporary)", errno: errno) }
        var renamed = false
        defer {
            if !renamed { unlinkat(folder.descriptor, temporaryName, 0) }
        }
        do {
            defer { close(fd) }
            // 3. Exact mode before any secret byte: open(2) applied the umask, fchmod(2) does not.
            guard fchmod(fd, mode_t(mode)) == 0 else { throw SystemError("fchmod \(temporary)", errno: errno) }
            // 4. Write everything, then 5. flush it to disk before it can become visible.
            try POSIX.writeAll(fd, bytes, operation: "write \(temporary)")
            guard fsync(fd) == 0 else { throw SystemError("fsync \(temporary)", errno: errno) }
        }
        // 6. Atomically replace the target (or a symlink at its place), within the checked folder.
        guard renameat(folder.descriptor, temporaryName, folder.descriptor, name) == 0 else {
            throw SystemError("rename to \(path)", errno: errno)
        }
        renamed = true
        // 7. Make the rename itself durable.
        guard fsync(folder.descriptor) == 0 else { throw SystemError("fsync \(directory)", errno: errno) }
    }

    /// Deletes temporary files a killed writer left beside `path`.
    public static func removeStaleTemporaryFiles(for path: String, rule: OpenedFolder.Rule = .secret) {
        let (directory, name) = split(path)
        let prefix = "." + name + ".tmp-"
        guard let folder = try? OpenedFolder(directory, rule: rule) else { return }
        // fdopendir takes over the descriptor it is given: hand it a duplicate.
        let listing = dup(folder.descriptor)
        guard listing >= 0, let handle = fdopendir(listing) else {
            if listing >= 0 { close(listing) }
            return
        }
        defer { closedir(handle) }
        while let entry = readdir(handle) {
            let entryName = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if entryName.hasPrefix(prefix) {
                unlinkat(folder.descriptor, entryName, 0)
            }
        }
    }

    /// Removes `path` from its checked folder; a missing file or folder is not an error. A folder
    /// that fails the check is left alone (what is there is not the daemon's).
    public static func remove(_ path: String, rule: OpenedFolder.Rule = .secret) throws(SystemError) {
        let (directory, name) = split(path)
        let folder: OpenedFolder
        do {
            folder = try OpenedFolder(directory, rule: rule)
        } catch {
            if error.errno == ENOENT { return }
            throw error
        }
        guard unlinkat(folder.descriptor, name, 0) == 0 || errno == ENOENT else {
            throw SystemError("unlink \(path)", errno: errno)
        }
    }

    static func split(_ path: String) -> (directory: String, name: String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let directory = String(path[..<slash])
        return (directory.isEmpty ? "/" : directory, String(path[path.index(after: slash)...]))
    }

    private static func randomSuffix() -> String {
        var generator = SystemRandomNumberGenerator()
        return String(generator.next() as UInt64, radix: 36)
    }
}
