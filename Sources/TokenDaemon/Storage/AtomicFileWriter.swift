import Glibc

/// Replaces a file's contents atomically, with exact permissions.
///
/// What a reader of `path` is guaranteed, at any instant, even if this process is killed mid-write:
/// - it opens either the complete old contents or the complete new contents; never a mix, never an
///   empty or truncated file (the new contents become visible only by rename(2), after fsync(2));
/// - the file it opens has `mode` exactly, whatever the umask, and the secret bytes were never in a
///   file with wider permissions (the temporary file is fchmod'ed before the first byte is written);
/// - a symlink at `path` is replaced by the file, never followed (rename(2) replaces the link itself).
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
        directoryMode: UInt32 = 0o750
    ) throws(SystemError) {
        let (directory, name) = split(path)
        // 1. The parent directory exists, created with `directoryMode` when missing.
        try ensureDirectory(directory, mode: directoryMode)

        // 2. Create a new, private temporary file; O_EXCL|O_NOFOLLOW refuse anything already there.
        let temporary = directory + "/." + name + ".tmp-" + randomSuffix()
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError("create \(temporary)", errno: errno) }
        var renamed = false
        defer {
            if !renamed { unlink(temporary) }
        }
        do {
            defer { close(fd) }
            // 3. Exact mode before any secret byte: open(2) applied the umask, fchmod(2) does not.
            guard fchmod(fd, mode_t(mode)) == 0 else { throw SystemError("fchmod \(temporary)", errno: errno) }
            // 4. Write everything, then 5. flush it to disk before it can become visible.
            try POSIX.writeAll(fd, bytes, operation: "write \(temporary)")
            guard fsync(fd) == 0 else { throw SystemError("fsync \(temporary)", errno: errno) }
        }
        // 6. Atomically replace the target (or a symlink at its place).
        guard rename(temporary, path) == 0 else { throw SystemError("rename to \(path)", errno: errno) }
        renamed = true
        // 7. Make the rename itself durable.
        try syncDirectory(directory)
    }

    /// Deletes temporary files a killed writer left beside `path`.
    public static func removeStaleTemporaryFiles(for path: String) {
        let (directory, name) = split(path)
        let prefix = "." + name + ".tmp-"
        guard let handle = opendir(directory) else { return }
        defer { closedir(handle) }
        while let entry = readdir(handle) {
            let entryName = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if entryName.hasPrefix(prefix) {
                unlinkat(dirfd(handle), entryName, 0)
            }
        }
    }

    /// Removes `path`; a missing file is not an error.
    public static func remove(_ path: String) throws(SystemError) {
        guard unlink(path) == 0 || errno == ENOENT else { throw SystemError("unlink \(path)", errno: errno) }
    }

    static func split(_ path: String) -> (directory: String, name: String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let directory = String(path[..<slash])
        return (directory.isEmpty ? "/" : directory, String(path[path.index(after: slash)...]))
    }

    static func ensureDirectory(_ directory: String, mode: UInt32) throws(SystemError) {
        var info = stat()
        if stat(directory, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFDIR else {
                throw SystemError("\(directory) is not a directory", errno: nil)
            }
            return
        }
        guard errno == ENOENT else { throw SystemError("stat \(directory)", errno: errno) }
        try ensureDirectory(split(directory).directory, mode: mode)
        guard mkdir(directory, mode_t(mode)) == 0 || errno == EEXIST else {
            throw SystemError("mkdir \(directory)", errno: errno)
        }
        // mkdir(2) applied the umask.
        guard chmod(directory, mode_t(mode)) == 0 else { throw SystemError("chmod \(directory)", errno: errno) }
    }

    private static func syncDirectory(_ directory: String) throws(SystemError) {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(directory)", errno: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw SystemError("fsync \(directory)", errno: errno) }
    }

    private static func randomSuffix() -> String {
        var generator = SystemRandomNumberGenerator()
        return String(generator.next() as UInt64, radix: 36)
    }
}
