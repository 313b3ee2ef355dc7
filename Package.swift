// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "fts-tokend",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "fts-tokend", targets: ["fts-tokend"]),
        // The daemon's core, for the libFuzzer targets in Fuzz/ (a package of their own).
        .library(name: "TokenDaemon", targets: ["TokenDaemon"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        // NIOSSL: the private CA (`caFile`) and the mock's HTTPS; async-http-client builds it anyway.
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        // Prometheus exposition for /metrics and metricsFile.
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        // Fleet mode's coordination through PostgreSQL (README "Fleet"): one connection per member,
        // through its EventLoopFuture interface on the daemon's loop (no pool, no Swift tasks).
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
    ],
    targets: [
        // libsystemd, seen only by the Systemd module.
        .systemLibrary(
            name: "CSystemd",
            pkgConfig: "libsystemd",
            providers: [.apt(["libsystemd-dev"])]
        ),
        // NIO for BackgroundNotifier's thread (NIOThreadPool, ConditionLock).
        .target(
            name: "Systemd",
            dependencies: [
                "CSystemd",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // glibc headers the Glibc module does not export (malloc.h, sys/signalfd.h).
        .systemLibrary(name: "CLinux"),
        .target(
            name: "TokenDaemon",
            dependencies: [
                "Systemd",
                "CLinux",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                // scrypt for the fleet's seal (FleetSeal): built from the BoringSSL Crypto builds anyway.
                .product(name: "CryptoExtras", package: "swift-crypto"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ]
        ),
        .target(
            name: "MockFTS",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // The Swift runtime's global-executor hook, set by fts-tokend's EventLoopExecutor.
        .systemLibrary(name: "CSwiftExecutorHook"),
        .executableTarget(
            name: "fts-tokend",
            dependencies: [
                "TokenDaemon", "MockFTS", "Systemd", "CSwiftExecutorHook",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
            ]
        ),
        // Helpers shared by the test targets: temporary folders, a NOTIFY_SOCKET listener, child processes.
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "SystemdTests", dependencies: ["Systemd", "TestSupport"]),
        .testTarget(
            name: "TokenDaemonTests",
            dependencies: [
                "TokenDaemon", "MockFTS", "TestSupport",
                .product(name: "Logging", package: "swift-log"), .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "MockFTSTests",
            dependencies: [
                "MockFTS", "TestSupport",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "MockFTS", "TestSupport", "TokenDaemon",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
