#include <stddef.h>
#include <stdint.h>

/// Defined by each fuzz target in Swift (`@_cdecl("LLVMFuzzerTestOneInput")`).
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/// libFuzzer's driver (compiler-rt's libclang_rt.fuzzer, linked by `-sanitize=fuzzer`).
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
