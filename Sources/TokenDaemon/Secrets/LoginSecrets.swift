/// The three values a login needs. Its descriptions are redacted so that a stray interpolation into a
/// log line cannot leak them.
public struct LoginSecrets: Sendable, Equatable, CustomStringConvertible, CustomDebugStringConvertible {
    public var email: String
    public var password: String
    public var apiKey: String

    public init(email: String, password: String, apiKey: String) {
        self.email = email
        self.password = password
        self.apiKey = apiKey
    }

    public var description: String { "LoginSecrets(redacted)" }
    public var debugDescription: String { description }
}
