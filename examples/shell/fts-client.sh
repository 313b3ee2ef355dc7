#!/bin/sh
# Calling the FTS API with fts-tokend from a shell script: curl only.
#
# Four ways, each a function to copy:
#   call_with_files      curl -H @headers: the key and the token, read for every request
#   wait_for_next        the socket's long poll: blocks until the daemon holds a newer token
#   call_api             on a 401, report the token as rejected and retry once with the next one
#   call_through_proxy   the daemon's proxy: no secret in this script at all
#
# Run as a script it does each once and prints one line per step (`make test-examples` runs it
# against the mock server and a real daemon). Environment as examples/python/fts_client.py.
set -eu
API=${FTS_API:-https://global-api.fintechstudios.com}
HEADERS_FILE=${FTS_HEADERS_FILE:-/run/fts-tokend/headers}
SOCKET=${FTS_SOCKET:-/run/fts-tokend/tokend.sock}
PROXY_SOCKET=${FTS_PROXY_SOCKET:-/run/fts-tokend/api.sock}
API_PATH=${FTS_PATH:-/api/whoami}

# 1. Files: the headers file holds both header lines; curl reads it at every call.
call_with_files() {  # prints the HTTP status; the body goes to $1 (default: nowhere)
    curl -s -o "${1:-/dev/null}" -w '%{http_code}' --max-time 60 -H @"$HEADERS_FILE" "$API$API_PATH"
}

# The fingerprint the daemon uses for a token: the first 8 hex characters of its SHA-256.
fingerprint() { printf %s "$1" | sha256sum | cut -c1-8; }

# 2. The long poll: answers as soon as a token other than $1 (a fingerprint) is current.
wait_for_next() {
    curl -sf --max-time 320 --unix-socket "$SOCKET" "http://localhost/token?wait=300&after=$1"
}

# 3. On a 401: report the token (the daemon logs in once for every reporter, at most once per
#    refresh.minForcedRefreshSeconds), wait for the next one, retry once.
call_api() {
    status=$(call_with_files)
    [ "$status" = 401 ] || { echo "$status"; return; }
    token=$(sed -n 's/^Authorization: \(Bearer \)\{0,1\}//p' "$HEADERS_FILE")
    fp=$(fingerprint "$token")
    while :; do
        report=$(curl -s -o /dev/null -D - -w '%{http_code}' --max-time 60 --unix-socket "$SOCKET" \
            -X POST -H "X-Token-Fingerprint: $fp" http://localhost/token/invalidate)
        case $(printf %s "$report" | tail -c 3) in
            202) wait_for_next "$fp" >/dev/null; break ;;   # a login is under way
            409) break ;;                                   # already replaced
            429) sleep "$(printf %s "$report" | sed -n 's/^Retry-After: \([0-9]*\).*/\1/p')" ;;
            *) echo "report refused" >&2; return 1 ;;
        esac
    done
    call_with_files
}

# 4. The proxy: the request goes to api.sock as if it were the API; the daemon adds both headers.
call_through_proxy() {
    curl -s -o "${1:-/dev/null}" -w '%{http_code}' --max-time 60 --unix-socket "$PROXY_SOCKET" "http://localhost$API_PATH"
}

main() {
    [ $# -gt 0 ] || set -- files longpoll rejected proxy
    for step in "$@"; do
        case $step in
            files)
                status=$(call_with_files)
                echo "files: GET $API_PATH with the headers file -> $status"
                [ "$status" = 200 ] ;;
            longpoll)
                token=$(curl -sf --max-time 60 --unix-socket "$SOCKET" http://localhost/token)
                fp=$(fingerprint "$token")
                echo "longpoll: token $fp; waiting for the next rotation"
                next=$(wait_for_next "$fp")
                echo "longpoll: next token $(fingerprint "$next")"
                [ "$(fingerprint "$next")" != "$fp" ] ;;
            rejected)
                status=$(call_api)
                echo "rejected: GET $API_PATH, reported on 401 and retried -> $status"
                [ "$status" = 200 ] ;;
            proxy)
                status=$(call_through_proxy)
                echo "proxy: GET $API_PATH through api.sock with no credentials -> $status"
                [ "$status" = 200 ] ;;
            *) echo "unknown step $step (files, longpoll, rejected, proxy)" >&2; return 64 ;;
        esac
    done
}

main "$@"
