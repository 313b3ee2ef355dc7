import Glibc

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Human and machine forms of times for logs, STATUS= and output files. All UTC.
public enum FormatTime {
    /// `2026-11-29T12:00:00Z`
    public static func iso8601(_ date: Date) -> String {
        let f = fields(date)
        return "\(pad(f.tm_year + 1900, 4))-\(pad(f.tm_mon + 1))-\(pad(f.tm_mday))T\(clock(f))Z"
    }

    /// `12:00:00Z`, for STATUS= lines read by people.
    public static func timeOfDay(_ date: Date) -> String {
        clock(fields(date)) + "Z"
    }

    /// `47m`, `1h05m`, `12s`, `2d03h`: coarse on purpose.
    public static func duration(_ interval: TimeInterval) -> String {
        let total = Int(max(0, interval).rounded(.up))
        switch total {
        case ..<60: return "\(total)s"
        case ..<3600: return "\(total / 60)m"
        case ..<86_400: return "\(total / 3600)h\(pad(Int32(total % 3600 / 60)))m"
        default: return "\(total / 86_400)d\(pad(Int32(total % 86_400 / 3600)))h"
        }
    }

    /// `1.5s`, `30s`: seconds as configured.
    public static func seconds(_ value: Double) -> String {
        value.rounded() == value && abs(value) < 1e9 ? "\(Int(value))s" : "\((value * 10).rounded() / 10)s"
    }

    private static func fields(_ date: Date) -> tm {
        var seconds = time_t(date.timeIntervalSince1970.rounded(.down))
        var result = tm()
        gmtime_r(&seconds, &result)
        return result
    }

    private static func clock(_ f: tm) -> String {
        "\(pad(f.tm_hour)):\(pad(f.tm_min)):\(pad(f.tm_sec))"
    }

    private static func pad(_ value: Int32, _ width: Int = 2) -> String {
        let digits = String(value)
        return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }
}
