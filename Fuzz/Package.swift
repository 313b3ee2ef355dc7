// swift-tools-version:6.1
import PackageDescription

// libFuzzer targets for the two parsers that read bytes from outside: the login answer
// (`TokenResponseParser`) and the config file (`ConfigurationParser`). A package of its own so that the
// sanitizer flags and the fuzzers never touch the main package's build; see README.md and run.sh.
//
// Why the main sources come in through symlinks (Sources/TokenDaemon, Systemd, CSystemd) instead of
// `.package(path: "..")`: the main package exports only the `fts-tokend` executable, and SwiftPM lets
// another package use only library products, so `TokenDaemon` cannot be reached as a dependency. The
// symlinks compile the very same files; the package dependencies below must therefore follow the
// `TokenDaemon` and `Systemd` targets of ../Package.swift (same URLs and minimum versions).
let package = Package(
    name: "fts-tokend-fuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // Symlinks to ../Sources: the code under test, unchanged.
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        .target(name: "Systemd", dependencies: ["CSystemd"]),
        .target(
            name: "TokenDaemon",
            dependencies: [
                "Systemd",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        // The fuzzers: no main.swift, libFuzzer's main() calls LLVMFuzzerTestOneInput.
        .executableTarget(name: "fuzz-token-response", dependencies: ["TokenDaemon"]),
        .executableTarget(name: "fuzz-config", dependencies: ["TokenDaemon"]),
    ],
    swiftLanguageModes: [.v6]
)
