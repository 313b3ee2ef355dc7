import TokenDaemon

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// libFuzzer target for `TokenResponseParser.parse`: the login answer is the one input a remote server
/// (or whatever sits between us and it) fully controls.
///
/// Input layout, so that one byte string also drives the `Date` header:
/// - byte 0, the flags (absent in the empty input):
///   - bit 0: pass a `Date` header;
///   - bits 1–6: its length in bytes, taken from the bytes after the flags (an IMF-fixdate is 29);
///   - bit 7: the request went out 3 s before the answer came (`sentAt`), else `sentAt` is nil.
/// - the rest: the response body.
///
/// So `" {...}"` (a space first) is a bare body and `";Sun, 06 Nov 1994 08:49:37 GMT{...}"` a body
/// with a 29-byte `Date` header (`;` is 0x3B: bit 0 set, 29 in bits 1–6).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeBufferPointer(start: data, count: size)
    let flags = input.first ?? 0
    var rest = input.dropFirst()
    var serverDate: String?
    if flags & 1 != 0 {
        let length = Int(flags >> 1) & 0x3F
        // Header bytes need not be UTF-8: decoding repairs them, as a header reader would have to.
        serverDate = String(decoding: rest.prefix(length), as: UTF8.self)
        rest = rest.dropFirst(length)
    }
    let sentAt = flags & 0x80 != 0 ? now.addingTimeInterval(-3) : nil

    do throws(LoginError) {
        let result = try TokenResponseParser().parse(
            body: Array(rest),
            contentType: "application/json",
            serverDate: serverDate,
            sentAt: sentAt,
            now: now
        )
        check(result.grant)
        _ = result.warnings.joined()
    } catch {
        // The description is what reaches the log: render it to run FormatTime on odd dates too.
        _ = error.description
    }
    return 0
}

/// A fixed "now" keeps every run reproducible: 2026-01-01T00:00:00Z.
private let now = Date(timeIntervalSince1970: 1_767_225_600)

/// What the rest of the daemon relies on from a grant, checked so the fuzzer finds wrong acceptances
/// as well as crashes (a failed precondition is a crash to libFuzzer).
private func check(_ grant: TokenGrant) {
    // The token goes verbatim into a headers file: a space, control byte or newline would let the
    // server inject a header line.
    precondition(!grant.token.isEmpty && grant.token.utf8.count <= 16 * 1024, "token length")
    precondition(grant.token.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F }, "token with a byte a header cannot carry")
    // An expired token must be refused, not handed out (judged in server time, as the parser does).
    precondition(grant.isValid(at: now), "token already expired at receipt")
    precondition(grant.expiresAt.timeIntervalSince1970 <= 253_402_300_799, "expiry after the year 9999")
    precondition(grant.obtainedAt == now, "obtainedAt is not the receipt time")
    precondition(grant.clockSkew.isFinite, "clock skew not finite")
    _ = grant.fingerprint
}
