/// One scripted misbehaviour of the mock's login endpoint. Fields combine: `delaySeconds` then
/// `status`, say. JSON-codable so tests in other processes can script a running mock
/// (`POST /_mock/faults`).
public struct MockFault: Sendable, Codable, Equatable {
    /// Answer with this HTTP status and no token.
    public var status: Int?
    /// `Retry-After` value to send with `status`, verbatim ("5" or an HTTP date).
    public var retryAfter: String?
    /// Wait this long before answering.
    public var delaySeconds: Double?
    /// Answer 200 with this body instead of a token (malformed answers).
    public var body: String?
    /// `Content-Type` to send with `body`.
    public var contentType: String?
    /// Never answer; the connection stays open until the client gives up.
    public var hang: Bool?
    /// Issue a token that expired a minute ago.
    public var expired: Bool?
    /// Issue a token whose `expires` field is this many seconds later than its JWT `exp`.
    public var expiresSkewSeconds: Double?
    /// Apply this fault to a login with this probability only (0...1); the other logins succeed.
    /// A flapping server is `MockFault(status: 503, chance: 0.5)`.
    public var chance: Double?

    public init(
        status: Int? = nil,
        retryAfter: String? = nil,
        delaySeconds: Double? = nil,
        body: String? = nil,
        contentType: String? = nil,
        hang: Bool? = nil,
        expired: Bool? = nil,
        expiresSkewSeconds: Double? = nil,
        chance: Double? = nil
    ) {
        self.status = status
        self.retryAfter = retryAfter
        self.delaySeconds = delaySeconds
        self.body = body
        self.contentType = contentType
        self.hang = hang
        self.expired = expired
        self.expiresSkewSeconds = expiresSkewSeconds
        self.chance = chance
    }

    public static func status(_ code: Int, retryAfter: String? = nil) -> MockFault {
        MockFault(status: code, retryAfter: retryAfter)
    }

    public static func delay(_ seconds: Double) -> MockFault { MockFault(delaySeconds: seconds) }

    public static func body(_ text: String, contentType: String = "application/json") -> MockFault {
        MockFault(body: text, contentType: contentType)
    }

    public static let hang = MockFault(hang: true)
    public static let expiredToken = MockFault(expired: true)
}

/// The faults to apply: `next` to the coming logins one each, then `always` to every login after.
public struct MockFaultScript: Sendable, Codable, Equatable {
    public var next: [MockFault]
    public var always: MockFault?

    public init(next: [MockFault] = [], always: MockFault? = nil) {
        self.next = next
        self.always = always
    }

    /// Both keys are optional in JSON: `{}` clears every fault.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        next = try container.decodeIfPresent([MockFault].self, forKey: .next) ?? []
        always = try container.decodeIfPresent(MockFault.self, forKey: .always)
    }
}
