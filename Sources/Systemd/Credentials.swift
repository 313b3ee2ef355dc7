import Glibc

/// systemd service credentials (`LoadCredential=`, `SetCredential=`; systemd.exec(5)).
public enum Credentials {
    /// `$CREDENTIALS_DIRECTORY`, or nil when the service manager passed no credentials.
    public static func directory(environment: [String: String]) -> String? {
        guard let path = environment["CREDENTIALS_DIRECTORY"], !path.isEmpty else { return nil }
        return path
    }

    /// The path of credential `name` when it exists in the credentials directory.
    public static func path(of name: String, environment: [String: String]) -> String? {
        guard let directory = directory(environment: environment) else { return nil }
        let path = directory + "/" + name
        return access(path, F_OK) == 0 ? path : nil
    }
}
