#!/usr/bin/env bash
# Builds the libFuzzer targets with AddressSanitizer and runs each for a fixed budget:
#   Fuzz/run.sh [SECONDS]        (default 60 per target)
# Prints one `scenario: held (...)` or `scenario: FAILED (...)` line per target and exits non-zero when
# any target failed (both always run). Everything a run makes (corpus copies, crash files, logs) goes
# to a temp dir, never into the repo; the dir is removed when both targets held, kept otherwise.
set -uo pipefail

budget=${1:-60}
[[ $budget =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS]" >&2; exit 64; }
here=$(cd "$(dirname "$0")" && pwd)
targets=(fuzz-token-response fuzz-config)
work=$(mktemp -d "${TMPDIR:-/tmp}/fts-tokend-fuzz.XXXXXX")

# Same pins as the main package (Package.resolved is gitignored, so a fresh clone has none here).
[[ -f $here/Package.resolved ]] || cp "$here/../Package.resolved" "$here/Package.resolved" 2>/dev/null

# -sanitize=fuzzer links libFuzzer's main() and instruments every Swift module for coverage;
# -parse-as-library because the targets have no top-level code, only LLVMFuzzerTestOneInput.
# A scratch path of its own keeps these instrumented objects away from the main build.
build=(swift build -c debug --package-path "$here" --scratch-path "$here/.build"
       -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library)
echo "building: ${build[*]} (log: $work/build.log)"
started=$(date +%s)
if ! nice -n 10 "${build[@]}" > "$work/build.log" 2>&1 < /dev/null; then
    grep -E 'error:' "$work/build.log" | head -20
    for target in "${targets[@]}"; do
        echo "scenario: FAILED (fuzz $target: build failed, see $work/build.log)"
    done
    exit 1
fi
echo "built in $(( $(date +%s) - started )) s"
bin=$("${build[@]}" --show-bin-path)

# Swift's own crash backtracer would run before libFuzzer's handler and trips ASan while reading the
# stack ("stack-buffer-underflow ... memserver_read"); without it, a failed precondition reaches
# libFuzzer as a deadly signal and the sanitizer prints the real stack.
export SWIFT_BACKTRACE=enable=no

failed=0
for target in "${targets[@]}"; do
    name=${target#fuzz-}
    corpus=$work/$name-corpus artifacts=$work/$name-artifacts/ log=$work/$name.log
    mkdir -p "$artifacts"
    cp -R "$here/corpus/$name" "$corpus"
    # Run from the temp dir too, so that nothing libFuzzer drops by default lands in the repo.
    began=$(date +%s)
    ( cd "$work" && exec "$bin/$target" -max_total_time="$budget" -timeout=5 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts" -print_final_stats=1 "$corpus" ) > "$log" 2>&1 < /dev/null
    status=$?
    elapsed=$(( $(date +%s) - began ))

    crashes=$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'oom-*' \) | wc -l)
    timeouts=$(find "$artifacts" -type f -name 'timeout-*' | wc -l)
    # A clean finish prints "Done N runs in S second(s)"; a crash stops early with only the final
    # stats (-print_final_stats), so the run count comes from those and the time from our clock.
    done_line=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1)
    if [[ -n $done_line ]]; then
        read -r _ runs _ _ seconds _ <<< "$done_line"
    else
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        runs=${runs:-?} seconds=$elapsed
    fi
    stats="fuzz $target: $runs runs in $seconds s, $crashes crashes, $timeouts timeouts"

    if (( status == 0 && crashes == 0 && timeouts == 0 )) && [[ -n $done_line ]]; then
        echo "scenario: held ($stats)"
    else
        failed=1
        written=$(sed -n 's/.*Test unit written to //p' "$log" | paste -sd ' ')
        echo "scenario: FAILED ($stats; exit $status; input ${written:-none written}; log $log)"
        # Where it died: the Swift or sanitizer message and the first frames outside libFuzzer and libc.
        grep -E '(Fatal error|Precondition failed|Assertion failed|ERROR: |SUMMARY: )' "$log" | head -5 | sed 's/^/    /'
        grep -E '^ *#[0-9]+ 0x' "$log" | grep -vE 'compiler-rt/|libc\.so|__libc_start|in _start' | head -12 \
            | swift demangle --simplified | sed 's/^/    /'
    fi
done

if (( failed )); then
    echo "kept $work (crash inputs, logs); reproduce: SWIFT_BACKTRACE=enable=no $bin/<target> <crash file>"
    exit 1
fi
rm -rf "$work"
