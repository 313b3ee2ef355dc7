import CLinux
import Glibc

/// A folder opened by walking its path one component at a time, so that what is then done relative
/// to its descriptor (`openat`, `renameat`, `unlinkat`, `fsync`) happens in the folder that was
/// checked, whatever is renamed or swapped in the path afterwards.
///
/// What the holder of a `.secret` folder is guaranteed:
/// - no component of the path was a symbolic link when it was opened (each one is opened
///   O_NOFOLLOW), so a folder or a parent swapped for a symlink after start is refused, not followed;
/// - the folder belongs to root or this user and is writable by no one else, checked with fstat(2)
///   on the open descriptor, not on the name (the rule of README "Hardening", as sshd's StrictModes);
/// - a folder it had to create was made by mkdirat(2), opened O_NOFOLLOW, checked to be this user's
///   and fchmod'ed to the mode asked for (mkdir applies the umask); never chmod'ed by name.
///
/// Symlinks that the operator configured (`/var/run` → `/run`) are resolved once, when the
/// configuration is loaded (`ConfigurationLoader`); what is walked here is the resolved path.
/// A `.shared` folder (the metrics file's, often node_exporter's group-writable textfile folder)
/// follows symlinks and is not checked: it holds no secret.
public struct OpenedFolder: ~Copyable {
    public enum Rule: Sendable { case secret, shared }

    /// Open O_RDONLY|O_DIRECTORY: usable as the `dirfd` of the *at calls, by fsync and fdopendir.
    let descriptor: Int32
    let path: String

    /// Opens `path`; with `createMode`, creates what is missing of it. Without, a missing folder
    /// throws a `SystemError` whose errno is ENOENT.
    init(_ path: String, rule: Rule, createMode: UInt32? = nil) throws(SystemError) {
        let components = path.split(separator: "/").map(String.init)
        var walked = path.hasPrefix("/") ? "" : "."
        var current = open(path.hasPrefix("/") ? "/" : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard current >= 0 else { throw SystemError("open \(path.hasPrefix("/") ? "/" : ".")", errno: errno) }
        let follow = rule == .shared ? 0 : O_NOFOLLOW
        for (index, component) in components.enumerated() {
            walked += "/" + component
            // Parents need only search permission (O_PATH); the folder itself is opened for reading.
            let access = index == components.count - 1 ? O_RDONLY : clinux_O_PATH
            var next = openat(current, component, access | O_DIRECTORY | O_CLOEXEC | follow)
            if next < 0, errno == ENOENT, let createMode {
                next = Self.create(component, in: current, mode: createMode, walked: walked, follow: follow)
            }
            guard next >= 0 else {
                let failure = Self.describe(errno: errno, component: component, in: current, walked: walked)
                close(current)
                throw failure
            }
            close(current)
            current = next
        }
        if rule == .secret {
            do throws(SystemError) {
                try Self.checkOwnership(current, path: path)
            } catch {
                close(current)
                throw error
            }
        }
        descriptor = current
        self.path = path
    }

    deinit { close(descriptor) }

    /// Creates `component` in `parent` and opens it; -1 with errno set on failure. A name that
    /// someone else created between mkdirat and openat is refused unless it is this user's.
    private static func create(
        _ component: String,
        in parent: Int32,
        mode: UInt32,
        walked: String,
        follow: Int32
    )
        -> Int32
    {
        let created = mkdirat(parent, component, mode_t(mode)) == 0
        guard created || errno == EEXIST else { return -1 }
        let fd = openat(parent, component, O_RDONLY | O_DIRECTORY | O_CLOEXEC | follow)
        guard fd >= 0, created else { return fd }
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_uid == geteuid(), fchmod(fd, mode_t(mode)) == 0 else {
            let saved = info.st_uid == geteuid() ? errno : EPERM
            close(fd)
            errno = saved
            return -1
        }
        return fd
    }

    private static func describe(
        errno code: Int32,
        component: String,
        in parent: Int32,
        walked: String
    )
        -> SystemError
    {
        var info = stat()
        if code == ELOOP || code == ENOTDIR, fstatat(parent, component, &info, AT_SYMLINK_NOFOLLOW) == 0 {
            if info.st_mode & S_IFMT == S_IFLNK {
                return SystemError(
                    "\(walked) is a symbolic link, and the daemon follows none on the way to a secret file "
                        + "(a link made after start could send the token elsewhere): nothing was written there",
                    errno: nil
                )
            }
            return SystemError("\(walked) is not a folder", errno: nil)
        }
        return SystemError("open folder \(walked)", errno: code)
    }

    private static func checkOwnership(_ fd: Int32, path: String) throws(SystemError) {
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw SystemError("fstat \(path)", errno: errno) }
        switch Ownership.problem(info) {
        case nil:
            return
        case .otherOwner(let uid):
            throw SystemError(
                "the folder \(path) belongs to uid \(uid), another user, who could replace the token "
                    + "files; use a folder of this user (uid \(geteuid())) or root",
                errno: nil
            )
        case .writableByOthers(let mode):
            throw SystemError(
                "the folder \(path) (mode \(FileMode.format(mode))) is writable by "
                    + "other users, who could replace the token files; remove group and other write permission",
                errno: nil
            )
        }
    }
}
