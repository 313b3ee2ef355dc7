import Foundation
import Testing

@testable import TokenDaemon

/// An unsigned JWT-shaped token with the given `exp` (the daemon does not check signatures).
func jwt(exp: Double?) -> String {
    func encode(_ text: String) -> String {
        Data(text.utf8).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(
            of: "/",
            with: "_"
        ).replacingOccurrences(of: "=", with: "")
    }
    let payload = exp.map { #"{"sub":"u","exp":\#(Int($0))}"# } ?? #"{"sub":"u"}"#
    return encode(#"{"alg":"HS256"}"#) + "." + encode(payload) + ".c2lnbmF0dXJl"
}

let now = Date(timeIntervalSince1970: 1_800_000_000)

func parse(_ body: String, date: String? = nil) throws(LoginError) -> TokenResponseParser.Result {
    try TokenResponseParser().parse(body: Array(body.utf8), contentType: "application/json", serverDate: date, now: now)
}

func parseFailure(_ body: String, date: String? = nil) -> LoginError? {
    do {
        _ = try parse(body, date: date)
        return nil
    } catch {
        return error
    }
}

@Suite struct TokenResponseParserTests {
    let expires = 1_800_003_600

    @Test func acceptsExpiresInSeconds() throws {
        let result = try parse(#"{"token":"abc.def.ghi","expires":\#(expires),"userId":"u-1"}"#)
        #expect(result.grant.token == "abc.def.ghi")
        #expect(result.grant.expiresAt == Date(timeIntervalSince1970: 1_800_003_600))
        #expect(result.grant.obtainedAt == now)
        #expect(result.grant.userId == "u-1")
        #expect(result.grant.tenantId == nil)
        #expect(result.grant.lifetime == 3600)
        #expect(result.warnings.isEmpty)
    }

    @Test func acceptsMillisecondsStringsTenantAndUnknownFields() throws {
        let result = try parse(
            #"{"token":"t","expires":"\#(expires)000","userId":42,"tenantId":"acme","extra":{"a":[1]}}"#
        )
        #expect(result.grant.expiresAt == Date(timeIntervalSince1970: 1_800_003_600))
        #expect(result.grant.userId == "42")
        #expect(result.grant.tenantId == "acme")
    }

    @Test func usesTheEarlierOfJWTExpAndExpiresAndWarnsWhenTheyDisagree() throws {
        let earlier = try parse(#"{"token":"\#(jwt(exp: 1_800_001_800))","expires":\#(expires)}"#)
        #expect(earlier.grant.expiresAt == Date(timeIntervalSince1970: 1_800_001_800))
        #expect(earlier.warnings.count == 1)
        #expect(earlier.warnings[0].contains("differ by more than a minute"))

        let later = try parse(#"{"token":"\#(jwt(exp: 1_800_007_200))","expires":\#(expires)}"#)
        #expect(later.grant.expiresAt == Date(timeIntervalSince1970: 1_800_003_600))

        let close = try parse(#"{"token":"\#(jwt(exp: 1_800_003_630))","expires":\#(expires)}"#)
        #expect(close.warnings.isEmpty)
        #expect(close.grant.expiresAt == Date(timeIntervalSince1970: 1_800_003_600))
    }

    @Test func aTokenThatIsNotAJWTUsesExpires() throws {
        let result = try parse(#"{"token":"opaque-token","expires":\#(expires)}"#)
        #expect(result.grant.expiresAt == Date(timeIntervalSince1970: 1_800_003_600))
    }

    @Test func serverClockAheadMovesExpiryEarlierAndWarnsAbove30Seconds() throws {
        // Server says it is 45 s later than our clock.
        let result = try parse(#"{"token":"t","expires":\#(expires)}"#, date: "Fri, 15 Jan 2027 08:00:45 GMT")
        #expect(result.grant.clockSkew == 45)
        #expect(result.grant.localExpiry == Date(timeIntervalSince1970: 1_800_003_600 - 45))
        #expect(result.warnings.contains { $0.contains("check NTP") })
    }

    @Test func serverClockBehindIsFollowedSoAFastLocalClockStillAcceptsTokens() throws {
        // Our clock is two hours fast: by it, a one-hour token "expired" an hour ago.
        // The server (at 06:00) grants until 07:00, which our clock (at 08:00) has passed.
        let result = try parse(#"{"token":"t","expires":1799996400}"#, date: "Fri, 15 Jan 2027 06:00:00 GMT")
        // The Date header is truncated to the second: the server may be 7199 s behind, and the
        // earlier expiry is the one kept.
        #expect(result.grant.clockSkew == -7199)
        #expect(result.grant.localExpiry == Date(timeIntervalSince1970: 1_800_003_599))
        #expect(result.grant.lifetime == 3599)
        #expect(result.warnings.count == 1)
        let small = try parse(#"{"token":"t","expires":\#(expires)}"#, date: "Fri, 15 Jan 2027 08:00:10 GMT")
        #expect(small.grant.clockSkew == 10)
        #expect(small.warnings.isEmpty)
        let withinResolution = try parse(#"{"token":"t","expires":\#(expires)}"#, date: "Fri, 15 Jan 2027 07:59:59 GMT")
        #expect(withinResolution.grant.clockSkew == 0)
        let unparsable = try parse(#"{"token":"t","expires":\#(expires)}"#, date: "yesterday")
        #expect(unparsable.grant.clockSkew == 0)
    }

    @Test func aSlowAnswerStampedWhenTheRequestArrivedDoesNotStretchTheToken() throws {
        // Regression (chaos suite, 10 s answers): the server stamped Date when the request arrived,
        // 10 s before the answer reached us. That is no evidence of a slow server clock; reading it
        // as one kept a token 10 s past its expiry.
        let sent = now.addingTimeInterval(-10)
        let result = try TokenResponseParser().parse(
            body: Array(#"{"token":"t","expires":\#(expires)}"#.utf8),
            contentType: nil,
            serverDate: "Fri, 15 Jan 2027 07:59:50 GMT",
            sentAt: sent,
            now: now
        )
        #expect(result.grant.clockSkew == 0)
        #expect(result.grant.localExpiry == Date(timeIntervalSince1970: 1_800_003_600))
    }

    @Test func skewIsTheValueClosestToZeroThatOneExchangeAllows() {
        let sent = Date(timeIntervalSince1970: 1000)
        let received = sent.addingTimeInterval(10)
        // Stamped anywhere within the exchange: the clocks may agree.
        for stamp in [999.5, 1000, 1005, 1010] {
            #expect(
                TokenResponseParser.clockSkew(
                    serverDate: Date(timeIntervalSince1970: stamp),
                    sentAt: sent,
                    receivedAt: received
                ) == 0
            )
        }
        // Server ahead: at least by how far its date is past our receipt.
        #expect(
            TokenResponseParser.clockSkew(
                serverDate: Date(timeIntervalSince1970: 1100),
                sentAt: sent,
                receivedAt: received
            ) == 90
        )
        // Server behind: by at most what the truncated date allows, so expiry comes early, not late.
        #expect(
            TokenResponseParser.clockSkew(
                serverDate: Date(timeIntervalSince1970: 900),
                sentAt: sent,
                receivedAt: received
            ) == -99
        )
    }

    struct Bad: Sendable, CustomTestStringConvertible {
        var name: String
        var body: String
        var error: LoginError
        var testDescription: String { name }
    }

    static let badBodies: [Bad] = [
        Bad(
            name: "HTML proxy page",
            body: "<html><body>502 Bad Gateway</body></html>",
            error: .notJSON(contentType: "application/json")
        ),
        Bad(name: "truncated JSON", body: #"{"token":"abc","expi"#, error: .notJSON(contentType: "application/json")),
        Bad(name: "JSON array", body: "[1,2]", error: .notJSON(contentType: "application/json")),
        Bad(name: "empty body", body: "", error: .notJSON(contentType: "application/json")),
        Bad(name: "no token", body: #"{"expires":1800003600}"#, error: .missingToken),
        Bad(name: "token a number", body: #"{"token":12,"expires":1800003600}"#, error: .missingToken),
        Bad(name: "empty token", body: #"{"token":"","expires":1800003600}"#, error: .invalidToken("empty")),
        Bad(
            name: "token with newline",
            body: #"{"token":"abc\nX-Evil: 1","expires":1800003600}"#,
            error: .invalidToken("contains whitespace, control or non-ASCII characters")
        ),
        Bad(
            name: "token with a space",
            body: #"{"token":"abc def","expires":1800003600}"#,
            error: .invalidToken("contains whitespace, control or non-ASCII characters")
        ),
        Bad(
            name: "token with non-ASCII",
            body: #"{"token":"abcé","expires":1800003600}"#,
            error: .invalidToken("contains whitespace, control or non-ASCII characters")
        ),
        Bad(name: "no expires", body: #"{"token":"t"}"#, error: .invalidExpires("missing")),
        Bad(
            name: "expires not numeric",
            body: #"{"token":"t","expires":"soon"}"#,
            error: .invalidExpires("\"soon\" is not a number")
        ),
        Bad(
            name: "expires a boolean",
            body: #"{"token":"t","expires":true}"#,
            error: .invalidExpires("a boolean, not a number")
        ),
        Bad(
            name: "negative expires",
            body: #"{"token":"t","expires":-5}"#,
            error: .invalidExpires("-5.0 is not a positive time")
        ),
        Bad(
            name: "huge expires",
            body: #"{"token":"t","expires":1e300}"#,
            error: .invalidExpires("1e+300 is after the year 9999")
        ),
        Bad(
            name: "already expired",
            body: #"{"token":"t","expires":1799999999}"#,
            error: .alreadyExpired(expiresAt: Date(timeIntervalSince1970: 1_799_999_999))
        ),
        Bad(
            name: "expired by JWT exp",
            body: #"{"token":"\#(jwt(exp: 1_799_990_000))","expires":1800003600}"#,
            error: .alreadyExpired(expiresAt: Date(timeIntervalSince1970: 1_799_990_000))
        ),
    ]

    @Test(arguments: badBodies)
    func refusesUnusableAnswers(_ bad: Bad) {
        #expect(parseFailure(bad.body) == bad.error)
        #expect(bad.error.kind == .transient)
    }

    @Test func deeplyNestedJSONIsRefusedWithoutCrashing() {
        let nested = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        #expect(parseFailure(#"{"token":"t","expires":1800003600,"x":\#(nested)}"#) != nil)
    }

    @Test func errorDescriptionsNeverContainTheBody() {
        let error = parseFailure(#"{"token":"secret token","expires":1800003600}"#)
        #expect(error?.description.contains("secret") == false)
    }

    /// A hostile server's text reaches logs, STATUS= and /healthz only as printable ASCII of at most
    /// 64 characters: no forged log field or line, no broken JSON document.
    @Test func serverTextIsPrintableAndShortWhereverItIsShown() throws {
        let hostile = "text/html\nevent=login_ok token_fp=deadbeef\u{1b}[2J\"}" + String(repeating: "x", count: 500)
        do {
            _ = try TokenResponseParser().parse(
                body: Array("<html>".utf8),
                contentType: hostile,
                serverDate: nil,
                now: Date()
            )
            Issue.record("an HTML body was accepted")
        } catch {
            let shown = error.description
            #expect(!shown.contains("\n") && !shown.contains("\u{1b}"))
            #expect(shown.contains("text/html?event=login_ok"))
            #expect(shown.count < 140, "\(shown.count) characters")
        }
        #expect(LoginError.serverText("säy\tno") == "s?y?no")
        #expect(LoginError.serverText(String(repeating: "a", count: 64)) == String(repeating: "a", count: 64))
        #expect(LoginError.serverText(String(repeating: "a", count: 65)) == String(repeating: "a", count: 64) + "…")
    }
}

@Suite struct HTTPDateTests {
    @Test func parsesIMFFixdate() {
        #expect(HTTPDate.parse("Sun, 06 Nov 1994 08:49:37 GMT") == Date(timeIntervalSince1970: 784_111_777))
        #expect(HTTPDate.parse("  Sun, 06 Nov 1994 08:49:37 GMT ") == Date(timeIntervalSince1970: 784_111_777))
    }

    @Test(arguments: [
        "", "Sun, 06 Nov 1994 08:49:37", "Sun, 06 Foo 1994 08:49:37 GMT", "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 25:49:37 GMT", "1994-11-06T08:49:37Z",
    ])
    func refusesOtherForms(_ text: String) {
        #expect(HTTPDate.parse(text) == nil)
    }

    @Test func retryAfterInBothForms() {
        let base = Date(timeIntervalSince1970: 784_111_777)
        #expect(RetryAfter.seconds(from: "120", now: base) == 120)
        #expect(RetryAfter.seconds(from: " 7 ", now: base) == 7)
        #expect(RetryAfter.seconds(from: "Sun, 06 Nov 1994 08:50:37 GMT", now: base) == 60)
        #expect(RetryAfter.seconds(from: "Sun, 06 Nov 1994 08:40:00 GMT", now: base) == 0)
        #expect(RetryAfter.seconds(from: "99999999999999999999", now: base) == 86_400)
        #expect(RetryAfter.seconds(from: "-5", now: base) == nil)
        #expect(RetryAfter.seconds(from: "soon", now: base) == nil)
    }
}
