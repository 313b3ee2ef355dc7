import Glibc

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// HTTP dates (RFC 9110 §5.6.7, IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`) for the `Date` and
/// `Retry-After` headers. The obsolete RFC 850 and asctime forms are not accepted: a sender must
/// generate IMF-fixdate, and an unparsable date only means we ignore that header.
enum HTTPDate {
    private static let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

    static func parse(_ text: String) -> Date? {
        // "Sun," "06" "Nov" "1994" "08:49:37" "GMT"
        let words = text.trimmedSpaces.split(separator: " ")
        guard words.count == 6, words[0].count == 4, words[0].hasSuffix(","), words[5] == "GMT",
            let day = Int32(words[1]), words[1].count == 2, (1...31).contains(day),
            let month = months.firstIndex(of: String(words[2])),
            let year = Int32(words[3]), words[3].count == 4
        else { return nil }
        let clock = words[4].split(separator: ":")
        guard clock.count == 3, clock.allSatisfy({ $0.count == 2 }),
            let hour = Int32(clock[0]), let minute = Int32(clock[1]), let second = Int32(clock[2]),
            hour < 24, minute < 60, second < 61
        else { return nil }
        var fields = tm()
        fields.tm_year = year - 1900
        fields.tm_mon = Int32(month)
        fields.tm_mday = day
        fields.tm_hour = hour
        fields.tm_min = minute
        fields.tm_sec = second
        let seconds = timegm(&fields)
        guard seconds != -1 else { return nil }
        return Date(timeIntervalSince1970: TimeInterval(seconds))
    }
}

/// How long a `Retry-After` header asks us to wait: delay-seconds or an HTTP date.
public enum RetryAfter {
    /// Seconds to wait from `now`, or nil when the value is neither form. Capped at one day so that a
    /// broken header cannot park the daemon for a year.
    public static func seconds(from value: String, now: Date) -> TimeInterval? {
        let trimmed = value.trimmedSpaces
        if !trimmed.isEmpty, trimmed.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
            return min(Double(trimmed) ?? 86_400, 86_400)
        }
        guard let date = HTTPDate.parse(trimmed) else { return nil }
        return min(max(0, date.timeIntervalSince(now)), 86_400)
    }
}

extension String {
    /// The string without leading and trailing spaces and tabs (header values allow both).
    var trimmedSpaces: String {
        var view = Substring(self)
        while let first = view.first, first == " " || first == "\t" { view.removeFirst() }
        while let last = view.last, last == " " || last == "\t" { view.removeLast() }
        return String(view)
    }
}
