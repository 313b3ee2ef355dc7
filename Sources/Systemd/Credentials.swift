/// systemd service credentials (`LoadCredential=`, `SetCredential=`; systemd.exec(5)).
public enum Credentials {
    /// `$CREDENTIALS_DIRECTORY`, or nil when the service manager passed no credentials.
    public static func directory(environment: [String: String]) -> String? {
        guard let path = environment["CREDENTIALS_DIRECTORY"], !path.isEmpty else { return nil }
        return path
    }
}
