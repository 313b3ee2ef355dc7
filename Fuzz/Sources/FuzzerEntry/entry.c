// The `main` of the fuzz targets, in C because Swift cannot declare libFuzzer's driver.
//
// SwiftPM links every Swift executable on Linux with `--defsym main=<module>_main` (so that tests can
// link the executable's module), but under `-parse-as-library` no `<module>_main` is emitted and the
// link fails with "undefined symbol 'fuzz_config_main'" (swiftlang/swift-package-manager#4522).
// These definitions satisfy it and run libFuzzer exactly as its own main() would. Each name is the
// c99name of one executable target in Package.swift; a new target needs its line here.
#include "FuzzerEntry.h"

int fuzz_token_response_main(int argc, char **argv) {
    return LLVMFuzzerRunDriver(&argc, &argv, LLVMFuzzerTestOneInput);
}

int fuzz_config_main(int argc, char **argv) {
    return LLVMFuzzerRunDriver(&argc, &argv, LLVMFuzzerTestOneInput);
}
