/// A JSON object of the config being read, with the key path that leads to it.
///
/// It records every key the parser asks for, and `refuseUnknownKeys()` refuses any other: the keys a
/// section accepts are exactly those its parsing code reads, written down once (a typo such as
/// `refreshAT` silently ignored would run the daemon on defaults).
final class ConfigurationObject {
    private let members: [String: JSONValue]
    private let prefix: String
    private var known: Set<String> = []

    init(_ value: JSONValue, path: String) throws(ConfigurationError) {
        guard case .object(let members) = value else {
            throw ConfigurationError(path.isEmpty ? "(file)" : path, "must be a JSON object, not \(value.typeName)")
        }
        self.members = members
        self.prefix = path
    }

    /// The dotted key path of `key` here (of the object itself when nil).
    func path(_ key: String?) -> String {
        guard let key else { return prefix.isEmpty ? "(file)" : prefix }
        return prefix.isEmpty ? key : prefix + "." + key
    }

    /// Throws for the first key (in sorted order) that parsing never asked for.
    func refuseUnknownKeys() throws(ConfigurationError) {
        if let unknown = members.keys.sorted().first(where: { !known.contains($0) }) {
            throw ConfigurationError(
                path(unknown),
                "unknown key (known here: \(known.sorted().joined(separator: ", ")))"
            )
        }
    }

    /// The member, treating JSON null as absent; `key` is known from now on.
    func value(_ key: String) -> JSONValue? {
        known.insert(key)
        guard let value = members[key], value != .null else { return nil }
        return value
    }

    /// The object at `key`, read by `body`, whose unknown keys are then refused.
    func object<T>(
        _ key: String,
        _ body: (ConfigurationObject) throws(ConfigurationError) -> T
    ) throws(ConfigurationError) -> T {
        guard let value = try optionalObject(key, body) else { throw ConfigurationError(path(key), "is required") }
        return value
    }

    func optionalObject<T>(
        _ key: String,
        _ body: (ConfigurationObject) throws(ConfigurationError) -> T
    ) throws(ConfigurationError) -> T? {
        guard let value = value(key) else { return nil }
        return try ConfigurationObject.read(value, path: path(key), body)
    }

    /// `value` read as an object by `body`, whose unknown keys are then refused.
    static func read<T>(
        _ value: JSONValue,
        path: String,
        _ body: (ConfigurationObject) throws(ConfigurationError) -> T
    ) throws(ConfigurationError) -> T {
        let object = try ConfigurationObject(value, path: path)
        let result = try body(object)
        try object.refuseUnknownKeys()
        return result
    }

    func string(_ key: String) throws(ConfigurationError) -> String {
        guard let string = try optionalString(key) else { throw ConfigurationError(path(key), "is required") }
        return string
    }

    func optionalString(_ key: String) throws(ConfigurationError) -> String? {
        switch value(key) {
        case nil: return nil
        case .string(let text): return text
        case .some(let other): throw ConfigurationError(path(key), "must be a string, not \(other.typeName)")
        }
    }

    /// An absolute path (see `ConfigurationValues.absolutePath`), if given.
    func optionalPath(_ key: String) throws(ConfigurationError) -> String? {
        guard let text = try optionalString(key) else { return nil }
        return try ConfigurationValues.absolutePath(text, at: path(key))
    }

    func optionalBool(_ key: String) throws(ConfigurationError) -> Bool? {
        switch value(key) {
        case nil: return nil
        case .bool(let flag): return flag
        case .some(let other): throw ConfigurationError(path(key), "must be true or false, not \(other.typeName)")
        }
    }

    func optionalNumber(_ key: String) throws(ConfigurationError) -> Double? {
        switch value(key) {
        case nil: return nil
        case .number(let number) where number.isFinite: return number
        case .some(let other): throw ConfigurationError(path(key), "must be a number, not \(other.typeName)")
        }
    }

    /// The number at `key` (`defaultValue` when absent), which must satisfy `isValid`; otherwise
    /// the error says `problem`.
    func number(
        _ key: String,
        default defaultValue: Double,
        _ problem: @autoclosure () -> String,
        valid isValid: (Double) -> Bool
    ) throws(ConfigurationError) -> Double {
        let number = try optionalNumber(key) ?? defaultValue
        guard isValid(number) else { throw ConfigurationError(path(key), problem()) }
        return number
    }

    /// A list of numbers, if given.
    func optionalNumbers(_ key: String) throws(ConfigurationError) -> [Double]? {
        try optionalList(key, of: "numbers") { item in
            if case .number(let number) = item, number.isFinite { number } else { nil }
        }
    }

    /// A list of strings, if given.
    func optionalStrings(_ key: String) throws(ConfigurationError) -> [String]? {
        try optionalList(key, of: "strings") { item in
            if case .string(let text) = item { text } else { nil }
        }
    }

    /// A list whose every item `element` reads (nil: not one of `kind`), if given.
    private func optionalList<Element>(
        _ key: String,
        of kind: String,
        _ element: (JSONValue) -> Element?
    ) throws(ConfigurationError) -> [Element]? {
        switch value(key) {
        case nil:
            return nil
        case .array(let items):
            var list: [Element] = []
            for item in items {
                guard let read = element(item) else { throw ConfigurationError(path(key), "must list \(kind) only") }
                list.append(read)
            }
            return list
        case .some(let other):
            throw ConfigurationError(path(key), "must be an array of \(kind), not \(other.typeName)")
        }
    }

    /// A list of numeric user or group IDs.
    func optionalIDs(_ key: String) throws(ConfigurationError) -> [UInt32] {
        switch value(key) {
        case nil:
            return []
        case .array(let items):
            var ids: [UInt32] = []
            for item in items {
                guard case .number(let number) = item, number >= 0, number < 4_294_967_295, number.rounded() == number
                else {
                    throw ConfigurationError(
                        path(key),
                        "must list numeric IDs (whole numbers, 0 or more) such as [0, 1001]"
                    )
                }
                ids.append(UInt32(number))
            }
            return ids
        case .some(let other):
            throw ConfigurationError(path(key), "must be an array of numeric IDs, not \(other.typeName)")
        }
    }
}
