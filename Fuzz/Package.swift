// swift-tools-version:6.1
import PackageDescription

// libFuzzer targets for the two parsers that read bytes from outside: the login answer
// (`TokenResponseParser`) and the config file (`ConfigurationParser`). A package of its own so that the
// sanitizer flags and the fuzzers never touch the main package's build; see README.md and run.sh.

// A local package's identity is the name of its folder, which depends on where the repository was
// cloned: read it from this manifest's location rather than assume it.
let mainPackage = String(Context.packageDirectory.split(separator: "/").dropLast().last ?? "main")

let package = Package(
    name: "fts-tokend-fuzz",
    dependencies: [
        .package(path: "..")
    ],
    targets: [
        // The fuzzers: no main.swift, only LLVMFuzzerTestOneInput; FuzzerEntry supplies the main() that
        // runs libFuzzer under the name SwiftPM links (see entry.c).
        .target(name: "FuzzerEntry"),
        .executableTarget(
            name: "fuzz-token-response",
            dependencies: [
                .product(name: "TokenDaemon", package: mainPackage), "FuzzerEntry",
            ]
        ),
        .executableTarget(
            name: "fuzz-config",
            dependencies: [
                .product(name: "TokenDaemon", package: mainPackage), "FuzzerEntry",
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
