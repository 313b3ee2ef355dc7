#!/usr/bin/env bash
# Checks of the .deb itself, on the host (the lab's image has no man or groff): the man pages
# render and say what they must, the completions are where each shell looks, lintian finds no
# error or warning, the copyright file is machine-readable and names every pinned dependency, the
# changelog parses.
# Usage: Tests/System/package-checks.sh dist/fts-tokend_VERSION_amd64.deb
set -uo pipefail
deb=$1
passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { echo "FAILED - $1"; failed=$((failed + 1)); }
check() { local name=$1; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else bad "$name"; fi; }
sudo=$( [ "$(id -u)" = 0 ] || echo sudo )
command -v man >/dev/null && command -v groff >/dev/null || \
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq man-db groff >/dev/null
command -v lintian >/dev/null && command -v dpkg-parsechangelog >/dev/null || \
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq lintian dpkg-dev >/dev/null
/usr/bin/python3 -c 'import debian.copyright' 2>/dev/null || \
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-debian >/dev/null
resolved=$(cd "$(dirname "$0")/../.." && pwd)/Package.resolved
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
render() { MANWIDTH=100 man -l "$1" 2>"$root/warnings"; }
check "fts-tokend(8) renders, with every command" sh -c "$(declare -f render); root=$root; render $root/usr/share/man/man8/fts-tokend.8.gz | grep -q 'FTS-TOKEND(8)' && for c in run check token status simulate demo mock-server; do render $root/usr/share/man/man8/fts-tokend.8.gz | grep -qw \$c || exit 1; done"
check "fts-tokend.json(5) renders, with the proxy's keys" sh -c "$(declare -f render); root=$root; render $root/usr/share/man/man5/fts-tokend.json.5.gz | grep -q 'outputs.proxy.rejectedStatuses'"
check "the man pages render without warnings" sh -c "MANWIDTH=100 man --warnings -l $root/usr/share/man/man5/fts-tokend.json.5.gz 2>&1 >/dev/null | grep -q . && exit 1 || exit 0"
check "bash, zsh and fish completions where each shell looks" test -s "$root/usr/share/bash-completion/completions/fts-tokend" -a -s "$root/usr/share/zsh/vendor-completions/_fts-tokend" -a -s "$root/usr/share/fish/vendor_completions.d/fts-tokend.fish"
# lintian: no error and no warning. What cannot be fixed is overridden, each with its reason, in
# the package's /usr/share/lintian/overrides/fts-tokend (systemd/debian/lintian-overrides).
if lintian --fail-on error,warning "$deb" >"$root/lintian" 2>&1; then
    ok "lintian: no error or warning"
else
    bad "lintian: no error or warning"
    grep -v '^running with root privileges' "$root/lintian" | sed 's/^/    /'
fi
copyright=$root/usr/share/doc/fts-tokend/copyright
# Debian's python3 (python3-debian is installed for it), not whichever python3 comes first in PATH.
cat > "$root/copyright-check.py" <<'PY'
"""copyright-check.py COPYRIGHT [Package.resolved]: the DEP-5 file parses strictly and each licence
a Files paragraph names has its text; with Package.resolved, every pin is named as "NAME VERSION"."""
import json, re, sys
import debian.copyright as dc
text = open(sys.argv[1], encoding="utf-8").read()
c = dc.Copyright(text.splitlines(True), strict=True)
defined = {p.license.synopsis for p in c.all_license_paragraphs()}
defined |= {p.license.synopsis for p in c.all_files_paragraphs() if p.license.text.strip()}
for p in c.all_files_paragraphs():
    for name in re.split(r" and | or ", p.license.synopsis):
        if name not in defined:
            sys.exit(f"no licence text for {name!r}")
if len(sys.argv) > 2:
    words = " ".join(text.split())
    pins = [f"{p['identity']} {p['state']['version']}" for p in json.load(open(sys.argv[2]))["pins"]]
    missing = [pin for pin in pins if pin not in words]
    if missing:
        sys.exit("not in the copyright file: " + ", ".join(missing))
PY
check "copyright is machine-readable (DEP-5), every licence named has its text" /usr/bin/python3 "$root/copyright-check.py" "$copyright"
# Package.resolved is not committed, so a build may resolve newer versions than the copyright names.
check "copyright names every pinned SwiftPM package at its resolved version" /usr/bin/python3 "$root/copyright-check.py" "$copyright" "$resolved"
check "changelog.gz parses and its latest entry is the package's version" sh -c "zcat $root/usr/share/doc/fts-tokend/changelog.gz > $root/changelog && [ \"\$(dpkg-parsechangelog -l $root/changelog -S Version)\" = \"\$(dpkg-deb -f $deb Version)\" ]"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
