/// Process exit statuses (README "Exit codes"), from sysexits(3) where one fits.
public enum ExitStatus {
    public static let success: Int32 = 0
    /// A login or the daemon failed in a way a restart may fix.
    public static let failure: Int32 = 1
    /// EX_CONFIG: the configuration is invalid, or the auth server rejected the credentials at start.
    /// The unit's `RestartPreventExitStatus=78` stops systemd from retrying into an account lock-out.
    public static let configuration: Int32 = 78
}
