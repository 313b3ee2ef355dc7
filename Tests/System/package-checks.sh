#!/usr/bin/env bash
# Checks of the .deb itself, on the host (the lab's image has no man or groff): the man pages
# render and say what they must, the completions are where each shell looks.
# Usage: Tests/System/package-checks.sh dist/fts-tokend_VERSION_amd64.deb
set -uo pipefail
deb=$1
passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { echo "FAILED - $1"; failed=$((failed + 1)); }
check() { local name=$1; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else bad "$name"; fi; }
command -v man >/dev/null && command -v groff >/dev/null || \
    DEBIAN_FRONTEND=noninteractive $( [ "$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq man-db groff >/dev/null
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
render() { MANWIDTH=100 man -l "$1" 2>"$root/warnings"; }
check "fts-tokend(8) renders, with every command" sh -c "$(declare -f render); root=$root; render $root/usr/share/man/man8/fts-tokend.8.gz | grep -q 'FTS-TOKEND(8)' && for c in run check token status simulate demo mock-server; do render $root/usr/share/man/man8/fts-tokend.8.gz | grep -qw \$c || exit 1; done"
check "fts-tokend.json(5) renders, with the proxy's keys" sh -c "$(declare -f render); root=$root; render $root/usr/share/man/man5/fts-tokend.json.5.gz | grep -q 'outputs.proxy.rejectedStatuses'"
check "the man pages render without warnings" sh -c "MANWIDTH=100 man --warnings -l $root/usr/share/man/man5/fts-tokend.json.5.gz 2>&1 >/dev/null | grep -q . && exit 1 || exit 0"
check "bash, zsh and fish completions where each shell looks" test -s "$root/usr/share/bash-completion/completions/fts-tokend" -a -s "$root/usr/share/zsh/vendor-completions/_fts-tokend" -a -s "$root/usr/share/fish/vendor_completions.d/fts-tokend.fish"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
