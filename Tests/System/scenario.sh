#!/usr/bin/env bash
# Runs inside a real systemd (systemd-lab): installs the .deb, starts the mock FTS server as a
# transient unit, and checks what README "Install on a host" promises. One line per check
# ("ok - …" or "FAILED - …"), then "N passed, N failed". Secrets are generated here and never printed.
set -u
passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { echo "FAILED - $1"; failed=$((failed + 1)); }
# check NAME COMMAND...: passes when COMMAND succeeds.
check() { local name=$1; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else bad "$name"; fi; }
# eventually SECONDS COMMAND...: retries COMMAND every 0.2 s until it succeeds or SECONDS pass.
eventually() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}
prop() { systemctl show -p "$2" --value "$1"; }
logins() { curl -sf http://127.0.0.1:8080/_mock/stats | jq .loginRequests; }
fault() { curl -sf -X POST --data "$1" http://127.0.0.1:8080/_mock/faults >/dev/null; }

export DEBIAN_FRONTEND=noninteractive
dpkg -i /root/fts-tokend.deb >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; bad "dpkg -i"; }
check "package created user fts-tokend and group fts-token" sh -c 'id fts-tokend && getent group fts-token'
check "units ship disabled" sh -c '[ "$(systemctl is-enabled fts-tokend.service)" = disabled ]'
check "man pages installed" test -s /usr/share/man/man8/fts-tokend.8.gz -a -s /usr/share/man/man5/fts-tokend.json.5.gz
check "bash completion: fts-tokend t completes to token" bash -c 'source /usr/share/bash-completion/completions/fts-tokend && COMP_WORDS=(fts-tokend t) COMP_CWORD=1 COMP_LINE="fts-tokend t" COMP_POINT=12 && _fts-tokend fts-tokend t fts-tokend && [ "${COMPREPLY[*]}" = token ]'
useradd -m -G fts-token reader
useradd -m stranger

# --- the mock auth server, with this run's secrets
password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
apikey=$(cat /proc/sys/kernel/random/uuid)
install -d -m 0700 /etc/mock
printf '%s' "$password" > /etc/mock/password
printf '%s' "$apikey" > /etc/mock/api-key
chmod 0600 /etc/mock/*
systemd-run --quiet --unit=mock-fts /usr/bin/fts-tokend mock-server --listen 127.0.0.1:8080 --ttl 600 \
    --email svc@example.com --password-file /etc/mock/password --api-key-file /etc/mock/api-key
eventually 20 curl -sf http://127.0.0.1:8080/_mock/stats || bad "mock server started"

# --- credentials and config, as README "Install on a host" says
install -d -m 0700 /etc/fts-tokend/credentials
printf 'svc@example.com\n' > /etc/fts-tokend/credentials/email
printf '%s\n' "$password" > /etc/fts-tokend/credentials/password
printf '%s\n' "$apikey" > /etc/fts-tokend/credentials/api-key
chmod 0600 /etc/fts-tokend/credentials/*
jq '.api.baseURL = "http://127.0.0.1:8080"' /etc/fts-tokend/config.json > /tmp/config.json
install -m 0644 /tmp/config.json /etc/fts-tokend/config.json

# --- 1. start returns only once the token is on disk
if systemctl start fts-tokend; then ok "systemctl start fts-tokend"; else bad "systemctl start fts-tokend"; fi
check "token files exist when start returns" test -s /run/fts-tokend/token -a -s /run/fts-tokend/token.json -a -s /run/fts-tokend/headers
check "STATUS= line in systemctl status" sh -c 'systemctl status fts-tokend | grep -q "Status: \"token valid until"'
check "token file fts-tokend:fts-token 0640" sh -c '[ "$(stat -c "%U:%G %a" /run/fts-tokend/token)" = "fts-tokend:fts-token 640" ]'
check "socket fts-tokend:fts-token 0660" sh -c '[ "$(stat -c "%U:%G %a %F" /run/fts-tokend/tokend.sock)" = "fts-tokend:fts-token 660 socket" ]'
check "state file private" sh -c '[ "$(stat -c "%U %a" /var/lib/fts-tokend/state.json)" = "fts-tokend 600" ]'
check "a member of fts-token reads the token" runuser -u reader -- test -s /run/fts-tokend/token
# What an operator sees, under the unit (issue 14 item 6): each file's last write and the last login.
check "status --json as a reader: every file written, the last login ok, the forced-refresh floor" sh -c 'runuser -u reader -- fts-tokend status --json | jq -e "([.outputs[].output] == [\"outputs.tokenFile\", \"outputs.jsonFile\", \"outputs.headersFile\", \"stateFile\"]) and all(.outputs[]; .lastWriteAt != null and .lastError == null) and .lastLogin.result == \"ok\" and .forcedRefresh.minIntervalSeconds == 30"'
check "status as a reader names each file" sh -c 'runuser -u reader -- fts-tokend status | grep -q "^  outputs.headersFile  /run/fts-tokend/headers  *written "'
# As README "Install on a host" says: as the unit's user with its credentials (root would be refused:
# the daemon's folders belong to fts-tokend).
systemd-run --quiet --pipe --wait --collect -p User=fts-tokend -p Group=fts-token \
    -p LoadCredential=email:/etc/fts-tokend/credentials/email -p LoadCredential=password:/etc/fts-tokend/credentials/password \
    -p LoadCredential=api-key:/etc/fts-tokend/credentials/api-key /usr/bin/fts-tokend check --show > /tmp/check-show.txt 2>&1 < /dev/null
# What it printed, but for the document (fingerprints only: safe to show), in case the check fails.
awk '/^\{/ { document = 1 } !document { print "  check --show: " $0 } /^\}/ { document = 0 }' /tmp/check-show.txt
check "check --show: the configuration in force, each secret by fingerprint only" sh -c "grep -q '\"minForcedRefreshSeconds\" : 30' /tmp/check-show.txt && grep -q \"api.password  sha256:\$(printf %s '$password' | sha256sum | cut -c1-8)  from systemd credential password\" /tmp/check-show.txt && ! grep -qF '$password' /tmp/check-show.txt && ! grep -qF '$apikey' /tmp/check-show.txt"
check "a member of fts-token reads it on the socket" sh -c 'runuser -u reader -- curl -sf --unix-socket /run/fts-tokend/tokend.sock http://localhost/token | grep -q "^ey"'
check "another user cannot read the token" sh -c '! runuser -u stranger -- cat /run/fts-tokend/token'
check "another user cannot use the socket" sh -c '! runuser -u stranger -- curl -sf --unix-socket /run/fts-tokend/tokend.sock http://localhost/token'
check "fts-tokend status reports ok" sh -c 'runuser -u reader -- fts-tokend status | grep -q "^status: *ok$"'
tokens=$(cat /run/fts-tokend/token)
# A rejected-token report by a reader, under the unit: one login, the next token printed.
fp=$(sha256sum < /run/fts-tokend/token | cut -c1-8)
logins_before=$(logins)
next=$(runuser -u reader -- fts-tokend token --rejected "$fp" --timeout 30)
check "a reader's rejected-token report brings the next token with one login" sh -c "[ -n '$next' ] && [ \"\$(printf %s '$next' | sha256sum | cut -c1-8)\" != $fp ] && [ \"\$(cat /run/fts-tokend/token)\" = '$next' ] && [ \"\$(curl -sf http://127.0.0.1:8080/_mock/stats | jq .loginRequests)\" = $((logins_before + 1)) ]"
check "a rejected-token report is logged with the reader's uid" sh -c "journalctl -u fts-tokend -o cat FTS_EVENT=token_rejected | grep -q 'logging in now' && journalctl -u fts-tokend -o verbose FTS_EVENT=token_rejected | grep -q \"FTS_UID=\$(id -u reader)\""
check "another user cannot report a token" sh -c '! runuser -u stranger -- curl -sf -X POST -H "X-Token-Fingerprint: 00000000" --unix-socket /run/fts-tokend/tokend.sock http://localhost/token/invalidate'
tokens="$tokens $next"

# --- 2. credentials come from LoadCredential only
pid=$(prop fts-tokend MainPID)
check "config file holds no secret" sh -c "! grep -qF '$password' /etc/fts-tokend/config.json && ! grep -qF '$apikey' /etc/fts-tokend/config.json"
check "environment holds no secret, only CREDENTIALS_DIRECTORY" sh -c "tr '\0' '\n' < /proc/$pid/environ | grep -q ^CREDENTIALS_DIRECTORY= && ! tr '\0' '\n' < /proc/$pid/environ | grep -qF '$password'"
check "unit properties hold no secret" sh -c "! systemctl show fts-tokend | grep -qF '$password'"

check "not dumpable: the daemon's /proc files are root's, not its user's" sh -c "[ \"\$(stat -c %U /proc/$pid/environ)\" = root ]"
check "no core file, bounded memory, tasks and descriptors" sh -c '[ "$(systemctl show -p LimitCORE --value fts-tokend)" = 0 ] && [ "$(systemctl show -p MemoryMax --value fts-tokend)" = 201326592 ] && [ "$(systemctl show -p MemorySwapMax --value fts-tokend)" = 0 ] && [ "$(systemctl show -p TasksMax --value fts-tokend)" = 64 ] && [ "$(systemctl show -p LimitNOFILE --value fts-tokend)" = 1024 ]'

# --- 3. reload: reloading → active; a broken config keeps the old one
systemctl reload fts-tokend
check "reload returns to active" sh -c '[ "$(systemctl is-active fts-tokend)" = active ]'
check "reload logged as FTS_EVENT=reload" eventually 10 sh -c 'journalctl -u fts-tokend FTS_EVENT=reload -o cat | grep -q .'
cp /etc/fts-tokend/config.json /tmp/config.good
echo '{ broken' > /etc/fts-tokend/config.json
systemctl reload fts-tokend
check "broken config on reload: still active" sh -c '[ "$(systemctl is-active fts-tokend)" = active ]'
check "broken config on reload: STATUS says so" sh -c 'systemctl show -p StatusText --value fts-tokend | grep -q "reload failed"'
check "broken config on reload: same process" sh -c "[ \"\$(systemctl show -p MainPID --value fts-tokend)\" = $pid ]"
install -m 0644 /tmp/config.good /etc/fts-tokend/config.json
systemctl reload fts-tokend

# --- 9. allow lists under the unit: peers are seen by their real ids (no PrivateUsers=)
groupadd fts-allowed
useradd -m -G fts-token listed
useradd -m -G fts-token unlisted
useradd -m -G fts-token,fts-allowed supplementary
allowed_gid=$(getent group fts-allowed | cut -d: -f3)
jq --argjson u "$(id -u listed)" --argjson g "$allowed_gid" '.outputs.socket.allowUIDs = [$u] | .outputs.socket.allowGIDs = [$g]' \
    /tmp/config.good > /tmp/config.allow
install -m 0644 /tmp/config.allow /etc/fts-tokend/config.json
systemctl reload fts-tokend
code() { runuser -u "$1" -- curl -s -o /dev/null -w '%{http_code}' --unix-socket /run/fts-tokend/tokend.sock http://localhost/token; }
[ "$(code listed)" = 200 ] && ok "allow list: a listed uid gets the token" || bad "allow list: a listed uid gets the token"
[ "$(code unlisted)" = 403 ] && ok "allow list: an unlisted member of the socket's group gets 403" || bad "allow list: an unlisted member of the socket's group gets 403"
[ "$(code supplementary)" = 200 ] && ok "allow list: a supplementary member of a listed group gets the token" || bad "allow list: a supplementary member of a listed group gets the token"
for _ in 1 2 3 4 5; do code unlisted >/dev/null; done
check "allow list: the log shows the refused peer's real uid" eventually 10 sh -c "journalctl -u fts-tokend FTS_EVENT=peer_refused -o json | jq -r .FTS_UID | grep -qx $(id -u unlisted)"
check "allow list: a refused peer is logged once a minute, not per request" sh -c "[ \"\$(journalctl -u fts-tokend FTS_EVENT=peer_refused -o json | jq -r .FTS_UID | grep -cx $(id -u unlisted))\" = 1 ]"
jq '.outputs.socket.allowUIDs = [] ' /tmp/config.allow > /tmp/config.allow2
install -m 0644 /tmp/config.allow2 /etc/fts-tokend/config.json
systemctl reload fts-tokend
[ "$(code listed)" = 403 ] && ok "reload: a uid removed from allowUIDs is refused on its next request" || bad "reload: a uid removed from allowUIDs is refused on its next request"
[ "$(code supplementary)" = 200 ] && ok "reload: the group that stays listed still gets the token" || bad "reload: the group that stays listed still gets the token"
jq '.outputs.socket.allowUIDs = [65534]' /tmp/config.good > /tmp/config.nobody
install -m 0644 /tmp/config.nobody /etc/fts-tokend/config.json
systemctl reload fts-tokend
check "reload: an allow list naming 65534 is refused, loudly" sh -c 'systemctl show -p StatusText --value fts-tokend | grep -q "reload failed (outputs.socket.allowUIDs: 65534 is the overflow id"'
install -m 0644 /tmp/config.good /etc/fts-tokend/config.json
systemctl reload fts-tokend

# --- 10. the API proxy under the unit: consumers call the API with no credentials
echo_as() { runuser -u "$1" -- curl -s --max-time 60 --unix-socket /run/fts-tokend/api.sock http://localhost/api/echo; }
pcode() { runuser -u "$1" -- curl -s -o /dev/null -w '%{http_code}' --max-time 60 --unix-socket /run/fts-tokend/api.sock http://localhost/api/echo; }
check "proxy socket fts-tokend:fts-token 0660" sh -c '[ "$(stat -c "%U:%G %a %F" /run/fts-tokend/api.sock)" = "fts-tokend:fts-token 660 socket" ]'
check "proxy: a member of fts-token calls the API with no credentials of its own" sh -c "$(declare -f echo_as); echo_as reader | jq -e '.keyValid and .tokenValid and .headers.via == \"1.1 fts-tokend\"'"
check "proxy: another user cannot connect" sh -c "[ \"\$(runuser -u stranger -- curl -s -o /dev/null -w '%{http_code}' --unix-socket /run/fts-tokend/api.sock http://localhost/api/echo)\" = 000 ]"
# The reader's report above forced a login moments ago: a 1 s floor lets this one force another.
jq '.refresh.minForcedRefreshSeconds = 1' /tmp/config.good > /tmp/config.floor
install -m 0644 /tmp/config.floor /etc/fts-tokend/config.json
systemctl reload fts-tokend
sleep 1.5
logins_before=$(logins)
curl -sf -X POST http://127.0.0.1:8080/_mock/revoke >/dev/null
check "proxy: after a server-side revocation the request is replayed with one forced login" sh -c "$(declare -f echo_as); echo_as reader | jq -e .tokenValid && [ \"\$(curl -sf http://127.0.0.1:8080/_mock/stats | jq .loginRequests)\" = $((logins_before + 1)) ]"
jq --argjson u "$(id -u listed)" --argjson g "$allowed_gid" '.outputs.proxy.allowUIDs = [$u] | .outputs.proxy.allowGIDs = [$g]' \
    /tmp/config.good > /tmp/config.proxy-allow
install -m 0644 /tmp/config.proxy-allow /etc/fts-tokend/config.json
systemctl reload fts-tokend
check "proxy allow list: applied by a reload, no restart" sh -c "[ \"\$(systemctl show -p MainPID --value fts-tokend)\" = $pid ] && journalctl -u fts-tokend FTS_EVENT=reload -o json | jq -r .FTS_CHANGED | grep -q proxy_access"
[ "$(pcode listed)" = 200 ] && ok "proxy allow list: a listed uid is served" || bad "proxy allow list: a listed uid is served"
[ "$(pcode unlisted)" = 403 ] && ok "proxy allow list: an unlisted member of the socket's group gets 403" || bad "proxy allow list: an unlisted member of the socket's group gets 403"
[ "$(pcode supplementary)" = 200 ] && ok "proxy allow list: a supplementary member of a listed group is served" || bad "proxy allow list: a supplementary member of a listed group is served"
check "proxy allow list: the log shows the refused peer's real uid" eventually 10 sh -c "journalctl -u fts-tokend FTS_EVENT=peer_refused FTS_LISTENER=proxy -o json | jq -r .FTS_UID | grep -qx $(id -u unlisted)"
install -m 0644 /tmp/config.good /etc/fts-tokend/config.json
systemctl reload fts-tokend

# --- 10b. the proxy's TCP listener binds at every restart with a consumer connected (SO_REUSEADDR):
# without it the closed side of the consumer's connection held the port and StartLimitBurst ran out.
mkdir -p /run/systemd/system/fts-tokend.service.d
printf '[Service]\nSocketBindAllow=tcp:8089\n' > /run/systemd/system/fts-tokend.service.d/proxy-tcp.conf
systemctl daemon-reload
jq '.outputs.proxy.listen = "127.0.0.1:8089"' /tmp/config.good > /tmp/config.tcp
install -m 0644 /tmp/config.tcp /etc/fts-tokend/config.json
systemctl restart fts-tokend
tcp_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 60 http://127.0.0.1:8089/api/echo; }
check "proxy TCP listener serves" eventually 30 sh -c "[ \"\$($(declare -f tcp_code); tcp_code)\" = 200 ]"
restarts_bound=0
for round in 1 2 3; do
    exec 7<>/dev/tcp/127.0.0.1/8089 || true
    printf 'GET /api/echo HTTP/1.1\r\nHost: 127.0.0.1:8089\r\n\r\n' >&7 2>/dev/null || true
    before_pid=$(prop fts-tokend MainPID)
    systemctl restart fts-tokend
    if eventually 30 sh -c "[ \"\$($(declare -f tcp_code); tcp_code)\" = 200 ]" \
        && [ "$(prop fts-tokend MainPID)" != "$before_pid" ]; then restarts_bound=$((restarts_bound + 1)); fi
    exec 7>&-
done
check "proxy TCP listener: three restarts with a consumer connected all bind" [ "$restarts_bound" = 3 ]
check "proxy TCP listener: no bind failure logged" sh -c '! journalctl -u fts-tokend FTS_EVENT=proxy_failed -o cat | grep -q "Address already in use"'
rm -f /run/systemd/system/fts-tokend.service.d/proxy-tcp.conf
systemctl daemon-reload
install -m 0644 /tmp/config.good /etc/fts-tokend/config.json
systemctl restart fts-tokend

# --- 10c. the descriptor budget under LimitNOFILE=1024 (README "outputs.socket.maxConnections"):
# a reader holds 600 idle connections on each socket, more than the limit allows together; the
# daemon evicts the longest idle, never runs out of descriptors, and a login is always possible.
# conns.py, as a member of fts-token: `hold` opens COUNT connections to each socket and, while
# STOP does not exist (at most SECONDS), reopens those the daemon closes (at most 100 a second),
# so the tables stay full; `flood` opens COUNT connections, each sending OPENING then CHUNK again
# and again up to TOTAL bytes without reading (until the proxy stops reading), and holds them.
# Either writes a JSON line of what it saw to STATUS when ready ("ready": true) and at the end.
cat > /tmp/conns.py <<'EOF'
import json, os, resource, select, socket, sys, time
mode, status, stop, seconds, count = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
end = time.monotonic() + seconds
def report(**fields):
    with open(status + ".new", "w") as f: json.dump(fields, f)
    os.rename(status + ".new", status)
def connect(path):
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
            return s
        except (BlockingIOError, InterruptedError):
            s.close()
            time.sleep(0.01)  # the backlog is full: the daemon accepts soon
    return None
def closedByPeer(s):
    try:
        return s.recv(65536, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
poller = select.poll()
owner = {}  # fd -> (socket, path)
# hold reads (and drops) what the daemon sends; flood reads nothing and sees only the hang-up.
def add(path):
    s = connect(path)
    if s is None: return None
    owner[s.fileno()] = (s, path)
    poller.register(s, select.POLLIN if mode == "hold" else select.POLLRDHUP)
    return s
if mode == "hold":
    paths = sys.argv[6:]
    closed = {p: 0 for p in paths}
    for _ in range(count):
        for p in paths: add(p)
    report(ready=True, opened=len(owner))
    pending, nextBatch = [], 0
    while time.monotonic() < end and not os.path.exists(stop):
        for fd, _ in poller.poll(100):
            s, p = owner[fd]
            if closedByPeer(s):
                poller.unregister(fd); del owner[fd]; s.close()
                closed[p] += 1
                pending.append(p)
        if pending and time.monotonic() >= nextBatch:
            for p in pending[:10]: add(p)
            del pending[:10]
            nextBatch = time.monotonic() + 0.1
    report(ready=True, opened=len(owner), closed=[closed[p] for p in paths])
else:
    path, opening, chunk, total = sys.argv[6], sys.argv[7].encode(), sys.argv[8].encode() * 64, int(sys.argv[9])
    sent = {}
    for _ in range(count):
        s = add(path)
        if s is None: break
        s.send(opening)
        sent[s.fileno()] = 0
    # Round robin until each sent TOTAL or took nothing for a second (the proxy stopped reading).
    lastProgress = {fd: time.monotonic() for fd in sent}
    active = set(sent)
    while active and time.monotonic() < end:
        for fd in list(active):
            s = owner[fd][0]
            try:
                n = s.send(chunk[: total - sent[fd]])
                sent[fd] += n
                lastProgress[fd] = time.monotonic()
            except BlockingIOError:
                pass
            except OSError:
                active.discard(fd); continue
            if sent[fd] >= total or time.monotonic() - lastProgress[fd] > 1: active.discard(fd)
        time.sleep(0.005)
    report(ready=True, opened=len(owner), sentKiB=sum(sent.values()) // 1024, full=sum(1 for v in sent.values() if v >= total))
    closed = 0
    while time.monotonic() < end and not os.path.exists(stop):
        for fd, events in poller.poll(100):
            if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                poller.unregister(fd); owner.pop(fd)[0].close(); closed += 1
    report(ready=True, opened=len(sent), sentKiB=sum(sent.values()) // 1024, full=sum(1 for v in sent.values() if v >= total), closed=closed)
EOF
chmod 0644 /tmp/conns.py
# conns_start NAME USER ARGS...: runs conns.py as USER in the background (its pid added to
# conns_pids). conns_ready NAME...: each wrote that it is ready (within 30 s). conns_stop NAME...:
# asks them to end and waits for them; kills by pid any that has not ended within 10 s.
conns_pids=""
conns_start() {
    local name=$1 user=$2; shift 2
    rm -f "/tmp/$name.status" "/tmp/$name.stop"
    runuser -u "$user" -- python3 /tmp/conns.py "$1" "/tmp/$name.status" "/tmp/$name.stop" "${@:2}" 2>"/tmp/$name.err" &
    conns_pids="$conns_pids $!"
}
conns_ready() {
    local name
    for name in "$@"; do eventually 30 sh -c "jq -e .ready /tmp/$name.status" || return 1; done
}
conns_stop() {
    local name child i
    for name in "$@"; do touch "/tmp/$name.stop"; done
    for child in $conns_pids; do
        for i in $(seq 50); do kill -0 "$child" 2>/dev/null || break; sleep 0.2; done
        kill "$child" 2>/dev/null
        wait "$child" 2>/dev/null
    done
    conns_pids=""
    for name in "$@"; do [ -s "/tmp/$name.err" ] && sed "s/^/  conns.py $name: /" "/tmp/$name.err"; done
}
# sample_start FILE: every 0.1 s, appends the daemon's open descriptors and resident KiB (and the
# unit's MemoryCurrent) to FILE, in the background (pid in sampler_pid); sample_stop ends it.
sample_start() {
    local file=$1 daemon=$2
    : > "$file"
    while :; do
        echo "$(ls /proc/$daemon/fd 2>/dev/null | wc -l) $(awk '/^VmRSS:/ { print $2 }' /proc/$daemon/status 2>/dev/null) $(prop fts-tokend MemoryCurrent)" >> "$file"
        sleep 0.1
    done &
    sampler_pid=$!
}
sample_stop() { kill "$sampler_pid" 2>/dev/null; wait "$sampler_pid" 2>/dev/null; }
most() { awk -v c="$2" '$c ~ /^[0-9]+$/ && $c + 0 > m { m = $c + 0 } END { print m + 0 }' "$1"; }
pid=$(prop fts-tokend MainPID)
check "descriptor budget: the daemon sees LimitNOFILE=1024 and lowers its connection limits to fit, with a warning" sh -c "journalctl -u fts-tokend _PID=$pid FTS_EVENT=config_warning -o cat | grep -q 'the descriptor limit (1024) leaves 960 for connections'"
# The reader's reports above forced logins minutes ago, but a 1 s floor makes this one certain.
install -m 0644 /tmp/config.floor /etc/fts-tokend/config.json
systemctl reload fts-tokend
sleep 1.5
since=$(date +%s)
sample_start /tmp/budget.samples "$pid"
conns_start budget reader hold 50 600 /run/fts-tokend/tokend.sock /run/fts-tokend/api.sock
if conns_ready budget; then
    ok "descriptor budget: a reader holds 600 connections to each socket"
else
    bad "descriptor budget: a reader holds 600 connections to each socket"
fi
sleep 2
fp=$(sha256sum < /run/fts-tokend/token | cut -c1-8)
logins_before=$(logins)
next=$(runuser -u reader -- fts-tokend token --rejected "$fp" --timeout 30)
check "descriptor budget: with both tables full, a reader's rejected-token report brings the next token with one login" sh -c "[ -n '$next' ] && [ \"\$(printf %s '$next' | sha256sum | cut -c1-8)\" != $fp ] && [ \"\$(curl -sf http://127.0.0.1:8080/_mock/stats | jq .loginRequests)\" = $((logins_before + 1)) ]"
tokens="$tokens $next"
check "descriptor budget: with both tables full, a new client of the token socket gets the token" sh -c 'runuser -u reader -- curl -sf --max-time 20 --unix-socket /run/fts-tokend/tokend.sock http://localhost/token | grep -q "^ey"'
check "descriptor budget: with both tables full, a new client of the proxy is served" sh -c "$(declare -f echo_as); echo_as reader | jq -e .tokenValid"
conns_stop budget
sample_stop
held=$(jq -r '"\(.opened) still open, \(.closed[0]) + \(.closed[1]) closed by the daemon"' /tmp/budget.status 2>/dev/null)
max_fds=$(most /tmp/budget.samples 1)
check "descriptor budget: the tables were full (the daemon closed idle connections: $held)" sh -c "jq -e '.closed[0] > 0 and .closed[1] > 0' /tmp/budget.status"
check "descriptor budget: at most $max_fds descriptors open in the daemon meanwhile, below LimitNOFILE=1024" [ "$max_fds" -lt 1024 ]
check "descriptor budget: no EMFILE (Too many open files) in the journal" sh -c "journalctl -u fts-tokend --since @$since -o cat > /tmp/budget.journal && ! grep -qiE 'EMFILE|too many open files|errno: 24' /tmp/budget.journal"
check "descriptor budget: the same process serves on" sh -c "[ \"\$(systemctl is-active fts-tokend)\" = active ] && [ \"\$(systemctl show -p MainPID --value fts-tokend)\" = $pid ]"

# --- 10d. a pipelining flood on the proxy stays far below MemoryMax=192M: 330 connections, each
# one slow GET and then 200 KiB of small requests pipelined behind it, none read. The proxy keeps
# a few queued requests per connection and reads no further (ProxyBoundaryTests measure the same
# outside the unit). Three members of fts-token flood, 110 connections each: a uid holds at most a
# quarter of the table in requests in flight (451 / 4 here), and one that asks for more is refused
# and closed, which would end most of a one-user flood at once. The lab's memory controller is
# read-only (cgroup v1): MemoryMax= is not enforced there and MemoryCurrent is "[not set]", so the
# daemon's peak RSS (VmHWM) is the measure, and MemoryCurrent as well where the unit has one.
slow=$'GET /api/slow?ms=10000 HTTP/1.1\r\nHost: localhost\r\n\r\n'
rss_before=$(awk '/^VmRSS:/ { print $2 }' /proc/$pid/status)
restarts_before=$(prop fts-tokend NRestarts)
sample_start /tmp/flood.samples "$pid"
for user in reader unlisted supplementary; do
    conns_start "flood-$user" "$user" flood 50 110 /run/fts-tokend/api.sock "$slow" "$slow" $((200 << 10))
done
if conns_ready flood-reader flood-unlisted flood-supplementary; then
    ok "proxy flood: three members of fts-token open 110 connections each, pipelining up to 200 KiB behind a slow GET without reading"
else
    bad "proxy flood: three members of fts-token open 110 connections each, pipelining up to 200 KiB behind a slow GET without reading"
fi
sleep 5
check "proxy flood: meanwhile a new client of the token socket gets the token" sh -c 'runuser -u listed -- curl -sf --max-time 20 --unix-socket /run/fts-tokend/tokend.sock http://localhost/token | grep -q "^ey"'
flood=$(jq -s -r '"\(map(.opened) | add) connections open, \(map(.sentKiB) | add) KiB sent, \(map(.full) | add) of them sent all 200 KiB"' /tmp/flood-*.status 2>/dev/null)
conns_stop flood-reader flood-unlisted flood-supplementary
sample_stop
closed=$(jq -s 'map(.closed) | add' /tmp/flood-*.status 2>/dev/null)
peak_kib=$(awk '/^VmHWM:/ { print $2 }' /proc/$pid/status)
max_rss=$(most /tmp/flood.samples 2)
memory_current=$(most /tmp/flood.samples 3)
[ "$memory_current" = 0 ] && memory_current="[not set]"
echo "proxy flood: $flood; $closed closed by the daemon before the end; RSS $((rss_before / 1024)) MiB before, at most $((max_rss / 1024)) MiB sampled, peak (VmHWM) $((peak_kib / 1024)) MiB; MemoryCurrent at most $memory_current; at most $(most /tmp/flood.samples 1) descriptors"
check "proxy flood: the daemon survives it (active, same MainPID, no restart)" sh -c "[ \"\$(systemctl is-active fts-tokend)\" = active ] && [ \"\$(systemctl show -p MainPID --value fts-tokend)\" = $pid ] && [ \"\$(systemctl show -p NRestarts --value fts-tokend)\" = $restarts_before ]"
check "proxy flood: peak RSS $((peak_kib / 1024)) MiB ($((rss_before / 1024)) MiB before), MemoryCurrent at most $memory_current: under half of MemoryMax=192M" sh -c "[ 0$rss_before -gt 0 ] && [ 0$peak_kib -lt $((96 << 10)) ] && { [ '$memory_current' = '[not set]' ] || [ '$memory_current' -lt $((96 << 20)) ]; }"
check "proxy flood: afterwards a reader's request is served" eventually 40 sh -c "$(declare -f echo_as); echo_as reader | jq -e .tokenValid"
check "proxy flood: no EMFILE (Too many open files) in the journal" sh -c "! journalctl -u fts-tokend --since @$since -o cat | grep -qiE 'EMFILE|too many open files|errno: 24'"
install -m 0644 /tmp/config.good /etc/fts-tokend/config.json
systemctl reload fts-tokend

# --- 6. journald fields
check "journal entries carry FTS_EVENT=login_ok" sh -c 'journalctl -u fts-tokend FTS_EVENT=login_ok -o json | jq -e "select(.FTS_TOKEN_FP != null and .FTS_EXPIRES_AT != null)" | grep -q .'
check "journal entries carry PRIORITY and CODE_FILE" sh -c 'journalctl -u fts-tokend FTS_EVENT=token_written -o json | jq -e "select(.PRIORITY == \"6\" and .CODE_FILE != null and .SYSLOG_IDENTIFIER == \"fts-tokend\")" | grep -q .'

# --- 4. watchdog: a stopped process is killed and restarted; the stored token is reused
mkdir -p /run/systemd/system/fts-tokend.service.d
printf '[Service]\nWatchdogSec=3\n' > /run/systemd/system/fts-tokend.service.d/watchdog.conf
systemctl daemon-reload
systemctl restart fts-tokend
before=$(logins)
pid=$(prop fts-tokend MainPID)
kill -STOP "$pid"
check "watchdog restarts a stopped daemon" eventually 40 sh -c "p=\$(systemctl show -p MainPID --value fts-tokend); [ \"\$p\" != 0 ] && [ \"\$p\" != $pid ] && [ \"\$(systemctl is-active fts-tokend)\" = active ]"
check "systemd logged the watchdog timeout" sh -c 'journalctl -u fts-tokend -o cat | grep -qi "watchdog timeout"'
check "no login after the watchdog restart (state reused)" sh -c "[ \"\$(curl -sf http://127.0.0.1:8080/_mock/stats | jq .loginRequests)\" = $before ]"
rm -rf /run/systemd/system/fts-tokend.service.d
systemctl daemon-reload
tokens="$tokens $(cat /run/fts-tokend/token)"

# --- 7. socket activation and the template
systemctl stop fts-tokend
# As on a fresh boot: /run is empty, tmpfiles runs, then sockets.target starts the socket unit.
rm -rf /run/fts-tokend
systemd-tmpfiles --create --boot fts-tokend.conf
systemctl start fts-tokend.socket
check "on a fresh boot the socket's folder is the daemon's, reachable by its readers" sh -c '[ "$(stat -c %U:%G:%a /run/fts-tokend)" = fts-tokend:fts-token:750 ] && runuser -u reader -- test -x /run/fts-tokend && ! runuser -u stranger -- test -x /run/fts-tokend'
check "socket unit listens without the service" sh -c '[ "$(systemctl is-active fts-tokend.service)" = inactive ] && test -S /run/fts-tokend/tokend.sock'
check "a connection starts the service and gets a token" sh -c 'runuser -u reader -- curl -sf --max-time 30 --unix-socket /run/fts-tokend/tokend.sock "http://localhost/token?wait=20" | grep -q "^ey"'
check "the service was started by the socket" sh -c '[ "$(systemctl is-active fts-tokend.service)" = active ]'
systemctl stop fts-tokend.socket fts-tokend.service
# --- 7b. template instances: each its own user and reader group (issue 11 item 7)
for instance in alpha beta; do
    install -d -m 0700 /etc/fts-tokend/credentials/$instance
    cp -p /etc/fts-tokend/credentials/email /etc/fts-tokend/credentials/password /etc/fts-tokend/credentials/api-key /etc/fts-tokend/credentials/$instance/
    jq --arg i "$instance" '.outputs = {tokenFile: {path: "/run/fts-tokend-\($i)/token", mode: "0640"}} | .stateFile = "/var/lib/fts-tokend-\($i)/state.json"' \
        /etc/fts-tokend/config.json > /etc/fts-tokend/$instance.json
done
systemctl start fts-tokend@alpha fts-tokend@beta
check "two template instances run side by side" sh -c 'test -s /run/fts-tokend-alpha/token && test -s /run/fts-tokend-beta/token && [ "$(systemctl is-active fts-tokend@alpha fts-tokend@beta | sort -u)" = active ]'
check "each instance runs as its own user" sh -c '[ "$(ps -o user= -p "$(systemctl show -p MainPID --value fts-tokend@alpha)")" = fts-tokend-alpha ] && [ "$(ps -o user= -p "$(systemctl show -p MainPID --value fts-tokend@beta)")" = fts-tokend-beta ]'
check "an instance's token belongs to its user and reader group" sh -c '[ "$(stat -c %U:%G:%a /run/fts-tokend-alpha/token)" = fts-tokend-alpha:fts-token-alpha:640 ] && [ "$(stat -c %U:%a /var/lib/fts-tokend-alpha/state.json)" = fts-tokend-alpha:600 ]'
# What one instance (or an onRotate program of it, which runs as the same user) can do to another.
check "one instance cannot read another's token" sh -c '! runuser -u fts-tokend-beta -- cat /run/fts-tokend-alpha/token'
check "one instance cannot read or replace another's state" sh -c '! runuser -u fts-tokend-beta -- cat /var/lib/fts-tokend-alpha/state.json && ! runuser -u fts-tokend-beta -- sh -c "echo x > /var/lib/fts-tokend-alpha/state.json" && ! runuser -u fts-tokend-beta -- sh -c "echo x > /var/lib/fts-tokend-alpha/forged"'
check "one instance cannot write into another's token folder" sh -c '! runuser -u fts-tokend-beta -- sh -c "echo x > /run/fts-tokend-alpha/token.new"'
useradd -m -G fts-token-alpha alpha-reader
check "a member of an instance's reader group reads that token and no other" sh -c 'runuser -u alpha-reader -- cat /run/fts-tokend-alpha/token | grep -q "^ey" && ! runuser -u alpha-reader -- cat /run/fts-tokend-beta/token && ! runuser -u reader -- cat /run/fts-tokend-alpha/token'
tokens="$tokens $(cat /run/fts-tokend-alpha/token) $(cat /run/fts-tokend-beta/token)"
systemctl stop fts-tokend@alpha fts-tokend@beta
check "an instance name too long for a user name fails its identity unit, clearly" sh -c '! systemctl start fts-tokend@a-name-longer-than-any-user-name && journalctl -u fts-tokend-identity@a-name-longer-than-any-user-name | grep -q "is not a valid user or group name"'

# --- 5. credentials rejected at start: failed with 78, no restart
fault '{"always":{"status":401}}'
rm -f /var/lib/fts-tokend/state.json
systemctl start fts-tokend && bad "start with rejected credentials fails" || ok "start with rejected credentials fails"
sleep 7
check "unit failed with exit status 78" sh -c '[ "$(systemctl is-failed fts-tokend)" = failed ] && [ "$(systemctl show -p ExecMainStatus --value fts-tokend)" = 78 ]'
check "not restarted (RestartPreventExitStatus=78)" sh -c '[ "$(systemctl show -p NRestarts --value fts-tokend)" = 0 ]'
fault '{}'
systemctl reset-failed fts-tokend

# --- 11. the package's life: an upgrade over the running service, a reinstall, remove, purge
systemctl start fts-tokend fts-tokend@alpha
tokens="$tokens $(cat /run/fts-tokend/token) $(cat /run/fts-tokend-alpha/token)"
old_version=$(dpkg-query -W -f '${Version}' fts-tokend)
new_version=$(dpkg-deb -f /root/fts-tokend-upgrade.deb Version)
pid=$(prop fts-tokend MainPID)
alpha_pid=$(prop fts-tokend@alpha MainPID)
before=$(logins)
dpkg -i /root/fts-tokend-upgrade.deb >/tmp/dpkg.log 2>&1 && ok "dpkg -i of version $new_version over $old_version" || { cat /tmp/dpkg.log; bad "dpkg -i of version $new_version over $old_version"; }
check "after the upgrade the package is the new version" sh -c "[ \"\$(dpkg-query -W -f '\${Version} \${db:Status-Abbrev}' fts-tokend)\" = '$new_version ii ' ]"
check "the upgrade restarted the running service: active, a new MainPID" sh -c "p=\$(systemctl show -p MainPID --value fts-tokend); [ \"\$(systemctl is-active fts-tokend)\" = active ] && [ \"\$p\" != 0 ] && [ \"\$p\" != $pid ]"
check "the upgrade restarted a running template instance" sh -c "p=\$(systemctl show -p MainPID --value fts-tokend@alpha); [ \"\$(systemctl is-active fts-tokend@alpha)\" = active ] && [ \"\$p\" != 0 ] && [ \"\$p\" != $alpha_pid ]"
check "the restarted daemon reused its stored token: no login" sh -c "[ \"\$(curl -sf http://127.0.0.1:8080/_mock/stats | jq .loginRequests)\" = $before ] && runuser -u reader -- fts-tokend status | grep -q '^status: *ok\$'"
check "the upgrade left a stopped unit stopped and the units disabled" sh -c '[ "$(systemctl is-active fts-tokend.socket)" = inactive ] && [ "$(systemctl is-enabled fts-tokend.service)" = disabled ]'
pid=$(prop fts-tokend MainPID)
dpkg -i /root/fts-tokend-upgrade.deb >/tmp/dpkg.log 2>&1 && ok "reinstalling the same version succeeds" || { cat /tmp/dpkg.log; bad "reinstalling the same version succeeds"; }
check "the reinstall restarted the service, again with no login" sh -c "p=\$(systemctl show -p MainPID --value fts-tokend); [ \"\$(systemctl is-active fts-tokend)\" = active ] && [ \"\$p\" != $pid ] && [ \"\$(curl -sf http://127.0.0.1:8080/_mock/stats | jq .loginRequests)\" = $before ]"
# Each maintainer script, run a second time by hand, succeeds (the upgrade ran each once).
check "postinst configure runs twice" sh -c "/var/lib/dpkg/info/fts-tokend.postinst configure $new_version && /var/lib/dpkg/info/fts-tokend.postinst configure $new_version"
# Removal with the socket listening and the service socket-activated, as on a host that uses both.
systemctl stop fts-tokend
systemctl start fts-tokend.socket
runuser -u reader -- curl -sf --max-time 30 --unix-socket /run/fts-tokend/tokend.sock "http://localhost/token?wait=20" >/dev/null
check "before removal: socket, service and an instance run" sh -c '[ "$(systemctl is-active fts-tokend.socket fts-tokend.service fts-tokend@alpha | sort -u)" = active ]'
dpkg -r fts-tokend >/tmp/dpkg.log 2>&1 && ok "dpkg -r" || { cat /tmp/dpkg.log; bad "dpkg -r"; }
check "remove stopped the socket, the service and the instance" sh -c '[ "$(systemctl is-active fts-tokend.socket fts-tokend.service fts-tokend@alpha | sort -u)" = inactive ] && ! test -S /run/fts-tokend/tokend.sock'
check "remove took the binary and the units" sh -c '! test -e /usr/bin/fts-tokend && ! test -e /lib/systemd/system/fts-tokend.service && [ "$(dpkg-query -W -f "\${db:Status-Abbrev}" fts-tokend)" = "rc " ]'
check "remove kept the config, the credentials, the state and the user" sh -c 'test -s /etc/fts-tokend/config.json && test -s /etc/fts-tokend/credentials/password && test -s /var/lib/fts-tokend/state.json && test -s /var/lib/fts-tokend-alpha/state.json && id fts-tokend'
dpkg -i /root/fts-tokend-upgrade.deb >/tmp/dpkg.log 2>&1 && ok "reinstall after remove" || { cat /tmp/dpkg.log; bad "reinstall after remove"; }
before=$(logins)
systemctl start fts-tokend
check "after the reinstall the daemon starts on the kept config and state, with no login" sh -c "[ \"\$(systemctl is-active fts-tokend)\" = active ] && grep -q 127.0.0.1:8080 /etc/fts-tokend/config.json && [ \"\$(curl -sf http://127.0.0.1:8080/_mock/stats | jq .loginRequests)\" = $before ]"
dpkg-deb -e /root/fts-tokend-upgrade.deb /tmp/control
dpkg -P fts-tokend >/tmp/dpkg.log 2>&1 && ok "dpkg -P of the installed, running package" || { cat /tmp/dpkg.log; bad "dpkg -P of the installed, running package"; }
check "purge stopped the service" sh -c '[ "$(systemctl is-active fts-tokend.service)" = inactive ]'
check "purge removed the state, the token files, the config and the credentials" sh -c '! test -e /var/lib/fts-tokend && ! test -e /var/lib/fts-tokend-alpha && ! test -e /run/fts-tokend && ! test -e /run/fts-tokend-alpha && ! test -e /etc/fts-tokend/config.json && ! test -e /etc/fts-tokend/credentials'
check "purge kept the instance config (the administrator's) and the system users" sh -c 'test -s /etc/fts-tokend/alpha.json && id fts-tokend && getent group fts-token && id fts-tokend-alpha'
check "after purge the package is not installed, not even its config" sh -c 's=$(dpkg-query -W -f "\${db:Status-Abbrev}" fts-tokend 2>/dev/null); [ -z "$s" ] || [ "$(printf %s "$s" | cut -c2)" = n ]'
check "prerm remove and postrm remove and purge run twice after a purge" sh -c '/tmp/control/prerm remove && /tmp/control/prerm remove && /tmp/control/postrm remove && /tmp/control/postrm remove && /tmp/control/postrm purge && /tmp/control/postrm purge'
check "purging a purged package succeeds" dpkg -P fts-tokend
dpkg -i /root/fts-tokend-upgrade.deb >/tmp/dpkg.log 2>&1 && dpkg -r fts-tokend >>/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; bad "install and remove before a purge"; }
check "purging a removed package succeeds and removes its folders" sh -c 'dpkg -P fts-tokend && ! test -e /etc/fts-tokend/config.json && ! test -e /etc/fts-tokend/credentials'
# Section 8 rates the installed unit: end installed, as a fresh install.
dpkg -i /root/fts-tokend.deb >/tmp/dpkg.log 2>&1 && ok "a fresh install after the purge" || { cat /tmp/dpkg.log; bad "a fresh install after the purge"; }

# --- 6. no secret anywhere in the journal
journalctl -o export > /tmp/journal.export
check "journal holds no password" sh -c "! grep -qF '$password' /tmp/journal.export"
check "journal holds no API key" sh -c "! grep -qF '$apikey' /tmp/journal.export"
leaked=0
for token in $tokens; do grep -qF "$token" /tmp/journal.export && leaked=1; done
check "journal holds no token" [ "$leaked" = 0 ]

# --- 8. systemd-analyze security
exposure=$(systemd-analyze security fts-tokend.service 2>/dev/null | sed -n 's/.*Overall exposure level for fts-tokend.service: \([0-9.]*\).*/\1/p')
echo "exposure: $exposure"
check "systemd-analyze security exposure at most 1.5" awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 1.5) }'

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
