#!/usr/bin/env bash
# make test-examples: runs every example (examples/*/) against the mock server and a real daemon,
# each of its four steps: files, longpoll (the runner rotates the token with SIGUSR1), rejected (the
# runner revokes every token server-side first) and proxy. One line per step ("ok - …" or
# "FAILED - …"). Usage: examples/run-tests.sh [BINARY]. Secrets are generated here, never printed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-$here/../.build/debug/fts-tokend}")
work=$(mktemp -d /dev/shm/fts-tokend-examples-XXXXXX 2>/dev/null || mktemp -d)
chmod 0700 "$work"
passed=0
failed=0
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$work/password"
cat /proc/sys/kernel/random/uuid > "$work/api-key"
chmod 0600 "$work/password" "$work/api-key"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" mock-server --listen "127.0.0.1:$port" --ttl 600 --email svc@example.com \
    --password-file "$work/password" --api-key-file "$work/api-key" >"$work/mock.log" 2>&1 &
pids+=($!)
mock="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$mock/_mock/stats" >/dev/null && break; sleep 0.1; done

cat > "$work/config.json" <<JSON
{
  "api": { "baseURL": "$mock", "email": "svc@example.com",
           "passwordFile": "$work/password", "apiKeyFile": "$work/api-key" },
  "refresh": { "minForcedRefreshSeconds": 1 },
  "outputs": { "tokenFile":   { "path": "$work/run/token" },
               "headersFile": { "path": "$work/run/headers" },
               "socket":      { "path": "$work/run/tokend.sock" },
               "proxy":       { "path": "$work/run/api.sock" } }
}
JSON
chmod 0600 "$work/config.json"
"$bin" run --config "$work/config.json" >"$work/daemon.log" 2>&1 &
daemon=$!
pids+=($daemon)
for _ in $(seq 300); do [ -s "$work/run/headers" ] && [ -S "$work/run/api.sock" ] && break; sleep 0.1; done

export FTS_API=$mock FTS_HEADERS_FILE=$work/run/headers FTS_SOCKET=$work/run/tokend.sock \
    FTS_PROXY_SOCKET=$work/run/api.sock FTS_PATH=/api/whoami

# step NAME STEP COMMAND...: runs COMMAND STEP, reports each line it prints.
step() {
    local name=$1 which=$2; shift 2
    local out=$work/out.$name.$which
    if timeout 120 "$@" "$which" >"$out" 2>&1; then
        while IFS= read -r line; do echo "ok - $name $line"; done <"$out"
        passed=$((passed + 1))
    else
        while IFS= read -r line; do echo "FAILED - $name $line"; done <"$out"
        [ -s "$out" ] || echo "FAILED - $name $which (no output)"
        failed=$((failed + 1))
    fi
}

command -v node >/dev/null || echo "node is not installed: the Node.js example cannot run" >&2
for example in "python:python3 $here/python/fts_client.py" "node:node $here/node/fts-client.js" "shell:sh $here/shell/fts-client.sh"; do
    name=${example%%:*}
    read -r -a command <<<"${example#*:}"
    step "$name" files "${command[@]}"
    # The long poll: rotate once the example is waiting.
    out=$work/out.$name.longpoll
    ( timeout 120 "${command[@]}" longpoll >"$out" 2>&1; echo $? >"$out.status" ) &
    for _ in $(seq 300); do grep -q waiting "$out" 2>/dev/null && break; sleep 0.1; done
    kill -USR1 "$daemon"
    for _ in $(seq 1200); do [ -s "$out.status" ] && break; sleep 0.1; done
    if [ "$(cat "$out.status" 2>/dev/null)" = 0 ]; then
        while IFS= read -r line; do echo "ok - $name $line"; done <"$out"
        passed=$((passed + 1))
    else
        while IFS= read -r line; do echo "FAILED - $name $line"; done <"$out"
        failed=$((failed + 1))
    fi
    # A server-side revocation: the example meets a 401 and must recover (the floor is 1 s here).
    sleep 1.2
    curl -sf -X POST "$mock/_mock/revoke" >/dev/null
    before=$(curl -sf "$mock/_mock/stats")
    step "$name" rejected "${command[@]}"
    after=$(curl -sf "$mock/_mock/stats")
    # It met the 401 (once), and its report made exactly one login.
    if [ "$(jq -n --argjson a "$before" --argjson b "$after" '($b.whoamiRejected - $a.whoamiRejected) == 1 and ($b.loginRequests - $a.loginRequests) == 1')" = true ]; then
        echo "ok - $name rejected: one 401 seen, one forced login"; passed=$((passed + 1))
    else
        echo "FAILED - $name rejected: expected one 401 and one forced login"; failed=$((failed + 1))
    fi
    step "$name" proxy "${command[@]}"
done

# Nothing secret reached what the examples printed.
if grep -qF -e "$(cat "$work/password")" -e "$(cat "$work/api-key")" -e "eyJ" "$work"/out.* 2>/dev/null; then
    echo "FAILED - a secret appeared in an example's output"; failed=$((failed + 1))
else
    echo "ok - no secret in any example's output"; passed=$((passed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
