#!/usr/bin/env bash
# Installs the .deb into a freshly booted systemd 252 (../shared/systemd-lab) and runs scenario.sh
# there. Needs root. Usage: Tests/System/run.sh dist/fts-tokend_VERSION_amd64.deb
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
deb=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
lab=${SYSTEMD_LAB:-$root/../shared/systemd-lab/systemd-lab}
[ -x "$lab" ] || { echo "systemd-lab not found at $lab (set SYSTEMD_LAB)" >&2; exit 2; }
started=$(date +%s)
status=0
"$lab" --copy "$deb:/root/fts-tokend.deb" --copy "$here/scenario.sh:/root/scenario.sh" -- bash /root/scenario.sh || status=$?
echo "system tests took $(( $(date +%s) - started )) s"
exit $status
