#!/usr/bin/env python3
"""Instructions the daemon executes per proxied request, counted by valgrind's callgrind: a figure
that repeats on a shared, noisy machine where requests per second do not (docs/benchmarks.md).

Usage: bench/proxy-instructions.py --binary A [--binary B ...] --load dist/uds-load [--requests-seconds 4]

For each binary: an nginx upstream serves the 1 KB JSON of section 7 over loopback HTTP; the
daemon runs under callgrind with collection off through start-up and a warm-up, then on for a
fixed-time load of 1 and of 8 keep-alive clients (uds-load); the counted instructions (Ir) are
divided by the requests uds-load completed. Prints one line per binary and client count.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the lab, nginx and the load of section 7)


def callgrind_total(path):
    """The Ir total of a callgrind dump."""
    with open(path) as handle:
        for line in handle:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    raise ValueError(f"no totals in {path}")


def measure(binary, load, seconds):
    lab = bench.Lab(binary, ttl=3600)
    processes = []
    rows = []
    try:
        port = bench.free_port()
        processes.append(bench.start_upstream(lab, port))
        lab.configure()
        config = json.load(open(lab.path("config.json")))
        config["outputs"]["proxy"] = {"path": lab.path("run/api.sock"), "upstream": f"http://127.0.0.1:{port}"}
        lab.write("config.json", json.dumps(config))
        # The daemon under callgrind, instrumented only while told to (start-up at near full speed).
        out = lab.path("callgrind.out")
        # valgrind gives up on the Swift toolchain's debug info ("possibly corrupted debuginfo"):
        # a copy without it, symbols kept (the counts do not need lines).
        stripped = lab.path("fts-tokend-stripped")
        subprocess.run(["strip", "-g", "-o", stripped, binary], check=True)
        wrapper = lab.path("under-callgrind.sh")
        with open(wrapper, "w") as handle:
            handle.write(f"#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={out}.%p {stripped} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        lab.binary = wrapper
        lab.start()
        pid = lab.daemon.pid
        socket_path = lab.path("run/api.sock")
        bench.run_load(load, socket_path, 8, 2, "/data.json")  # warm: pool connections made, caches filled
        for clients in (1, 8):
            for stale in glob.glob(out + ".*"):
                os.unlink(stale)
            subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True)
            subprocess.run(["callgrind_control", "-i", "on", str(pid)], capture_output=True, check=True)
            result = bench.run_load(load, socket_path, clients, seconds, "/data.json")
            # Dumped while still instrumented (switching it off first left a dump of zeros).
            subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
            subprocess.run(["callgrind_control", "-i", "off", str(pid)], capture_output=True, check=True)
            # The dump of `-d` (`.1`, `.2`, …), not the file callgrind writes at exit.
            dumps = [path for path in glob.glob(out + ".*.*")]
            totals = [callgrind_total(path) for path in dumps]
            keep = os.environ.get("KEEP_DUMPS")  # a folder: the dumps kept, for callgrind_annotate
            if keep:
                for path in dumps:
                    shutil.copy(path, os.path.join(keep, f"{os.path.basename(binary)}-{clients}.callgrind"))
            total = max(totals)
            requests = int(result.get("requests", 0))
            rows.append((clients, requests, total))
        return rows
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        lab.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", action="append", required=True)
    parser.add_argument("--load", required=True)
    parser.add_argument("--requests-seconds", type=float, default=4)
    args = parser.parse_args()
    for binary in args.binary:
        for clients, requests, total in measure(binary, args.load, args.requests_seconds):
            per = total / requests if requests else float("nan")
            print(f"{binary}: {clients} client(s): {requests} requests, {total:,} instructions, {per:,.0f} per request")


if __name__ == "__main__":
    sys.exit(main())
