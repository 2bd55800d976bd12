#!/bin/bash
# test_systemd_e2e.sh — keypool under a real systemd, end to end.
#
# Boots systemd as PID 1 in private PID and mount namespaces (the recipe and its dangers:
# ../shared/reference/systemd-in-a-namespace.md), installs the shipped keypool.service (only
# ExecStart's binary substituted), keypool.socket, keypool.sysusers and keypool.catalog, and
# drives them the way an operator does: systemctl start, status, reload, stop; journalctl -u,
# -x and KEYPOOL_* field matches; socket activation. Upstream is the simulator, started here
# outside the namespace on loopback, behind a TLS relay so the sandboxed daemon speaks HTTPS.
#
# Beyond the reference recipe, the namespace gets (all private to it, nothing reaches the host):
#   - a tmpfs of its own on /sys/fs/cgroup where the host has a tmpfs there (cgroup v1/hybrid):
#     systemd remounts that tmpfs read-only, and the host shares its superblock, so without it
#     the host's /sys/fs/cgroup turned read-only (seen in a trial);
#   - /proc/sys and /sys read-only, and a UTS namespace: PID 1 tunes sysctls and sets the
#     hostname at boot, and the host shares those;
#   - overlays (tmpfs upper) on /etc, /var/lib and /usr/local: the unit creates /etc/keypool and
#     /var/lib/keypool, systemd-sysusers adds the keypool user, the catalog is installed and
#     the test CA trusted, all in the overlay;
#   - /run marked shared: systemd considers itself in a container and leaves propagation
#     private, and then the credentials mount (LoadCredential=) never reaches the service.
# cgroup directories the inner systemd creates in the host's hierarchies are removed afterwards.
# Runs of this test on one machine take turns (flock on this file): two inner systemds would
# share system.slice/keypool.service in the host's cgroup hierarchies.
#
# Exit: 0 all passed, 1 a check failed, 77 this machine cannot boot systemd that way (says why).
# Environment: KEYPOOLD (default $KEYPOOL_SRCDIR/build-check/keypoold), KEYPOOLD_PLAIN (a build
# without sanitizers, preferred when set), KEYPOOL_SRCDIR, KEYPOOL_E2E_KEEP=1 keeps the work dir.

set -u
export LC_ALL=C

srcdir=${KEYPOOL_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
if [ -n "${KEYPOOLD_PLAIN:-}" ] && [ -x "$KEYPOOLD_PLAIN" ]; then
        keypoold=$KEYPOOLD_PLAIN
else
        keypoold=${KEYPOOLD:-$srcdir/build-check/keypoold}
fi
keypoold=$(realpath -e "$keypoold" 2>/dev/null || echo "$keypoold")
. "$srcdir/tests/integration/systemd_ns.sh"

SECRET_PRIMARY=sk-or-v1-fake0000000000000000000000000000000000000000000e2e01
SECRET_BACKUP=sk-or-v1-fake0000000000000000000000000000000000000000000e2e02
ID_STARTUP=4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a11
ID_READY=4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a12
ID_RELOAD=4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a13
ID_ROTATE=4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a18
ID_COOLDOWN=4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a19
SOCK=/run/keypool/keypool.sock

failures=0
work='' upid='' pid1='' sim_pid='' relay_pid=''

say() { printf '%s\n' "$*"; }
pass() { say "PASS: $*"; }
fail() { say "FAIL: $*"; failures=$((failures + 1)); }
skip() { say "SKIP: $*"; exit 77; }
check() {               # check DESCRIPTION COMMAND...: PASS or FAIL by the command's status
        local what=$1; shift
        if "$@"; then pass "$what"; else fail "$what"; fi
}
# Stops at once: the remaining checks depend on this one.
fatal() { fail "$*"; diagnostics; exit 1; }

ns() { nsenter -t "$pid1" -p -m -- "$@"; }
kcurl() { ns curl -sS --max-time 20 --unix-socket "$SOCK" "$@"; }
key_id() { printf 'kp-%s' "$(printf '%s' "$1" | sha256sum | cut -c1-10)"; }
json() {                # json PYTHON-EXPRESSION: evaluates it with d = the JSON document on stdin
        python3 -c 'import json, sys; d = json.load(sys.stdin); r = eval(sys.argv[1]); print(r if not isinstance(r, bool) else int(r))' "$1"
}
# journalctl -o json prints one object per line; jlines EXPR evaluates EXPR over e = [entries].
jlines() {
        python3 -c 'import json, sys
e = [json.loads(l) for l in sys.stdin if l.strip()]
r = eval(sys.argv[1]); print(r if not isinstance(r, bool) else int(r))' "$1"
}
wait_until() {          # wait_until SECONDS COMMAND...
        local deadline=$(( $(date +%s) + $1 )); shift
        until "$@"; do
                [ "$(date +%s)" -ge "$deadline" ] && return 1
                sleep 0.2
        done
}

diagnostics() {
        [ -n "$pid1" ] || return 0
        say "--- systemctl status keypool.service keypool.socket"
        ns systemctl status --no-pager keypool.service keypool.socket 2>&1 | sed 's/^/    /' | head -40
        say "--- journalctl -u keypool.service -u keypool.socket (last 60 lines)"
        ns journalctl --no-pager -n 60 -u keypool.service -u keypool.socket 2>&1 | sed 's/^/    /'
}

host_state() {          # what this test must leave exactly as it was on the host
        sha256sum /etc/passwd /etc/group /etc/ssl/certs/ca-certificates.crt 2>/dev/null
        for p in /etc/keypool /var/lib/keypool /var/lib/private/keypool /run/keypool \
                 /usr/local/lib/systemd/catalog/keypool.catalog /etc/systemd/system/keypool.service; do
                [ -e "$p" ] && echo "exists $p"
        done
        awk '$5 == "/sys/fs/cgroup" { print "cgroup-mount", $6, $NF }' /proc/self/mountinfo
        for k in kernel/hostname kernel/pid_max fs/file-max fs/nr_open net/unix/max_dgram_qlen \
                 kernel/core_pattern kernel/printk; do
                printf 'sysctl %s = %s\n' "$k" "$(tr '\t' ' ' < "/proc/sys/$k" 2>/dev/null)"
        done
}

cleanup() {
        local rc=$?
        trap - EXIT INT TERM
        ns_teardown "/etc, /var/lib, /usr/local, cgroup mount, sysctls and hostname" || rc=1
        [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
        [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
        if [ -n "$work" ] && [ -d "$work" ]; then
                if [ "${KEYPOOL_E2E_KEEP:-0}" = 1 ]; then say "work directory kept: $work"; else rm -rf "$work"; fi
        fi
        exit "$rc"
}

# --- can this machine do it at all? -------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root (unshare of PID and mount namespaces, systemd as PID 1)"
for tool in unshare nsenter curl python3 sha256sum setpriv flock; do
        command -v "$tool" >/dev/null || skip "$tool is not installed"
done
systemd_bin=/lib/systemd/systemd
[ -x "$systemd_bin" ] || skip "no systemd at $systemd_bin (apt-get install systemd)"
[ -x "$keypoold" ] || { say "FAIL: keypoold is not built: $keypoold (set KEYPOOLD)"; exit 1; }
grep -aq 'READY=1' "$keypoold" ||
        { say "FAIL: $keypoold never sends READY=1: Type=notify would time out"; exit 1; }
for f in keypool.service.in keypool.socket keypool.sysusers keypool.catalog; do
        [ -f "$srcdir/systemd/$f" ] || { say "FAIL: missing $srcdir/systemd/$f"; exit 1; }
done

exec 9<"$0"      # the lock; long-lived children get 9<&- so it dies with this script
flock -w 120 9 || skip "another run of this test did not finish within 120s"
work=$(mktemp -d "${KEYPOOL_E2E_WORKDIR:-$PWD}/e2e-systemd.XXXXXX") || skip "cannot create a work directory"
trap cleanup EXIT
trap 'exit 1' INT TERM
host_state > "$work/host.before"

# --- upstream: the simulator, and a TLS relay in front of it ----------------------------------
python3 "$srcdir/tests/upstream_sim.py" --port 0 --port-file "$work/sim.port" \
        >"$work/sim.out" 2>"$work/sim.err" </dev/null 9<&- &
sim_pid=$!
wait_until 10 test -s "$work/sim.port" || { say "FAIL: the simulator did not start:"; cat "$work/sim.err"; exit 1; }
sim_port=$(cat "$work/sim.port")

cat > "$work/tls_relay.py" <<'EOF'
# TLS in front of the simulator: accepts TLS on 127.0.0.1, relays the plain bytes both ways.
import select, socket, ssl, sys, threading

cert, key, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(128)
print(listener.getsockname()[1], flush=True)

def relay(conn):
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
        up = socket.create_connection(("127.0.0.1", target))
    except OSError:
        conn.close()
        return
    try:
        while True:
            ready = [tls] if tls.pending() else select.select([tls, up], [], [], 120)[0]
            if not ready:
                break
            if tls in ready:
                data = tls.recv(65536)
                if not data:
                    break
                up.sendall(data)
            if up in ready:
                data = up.recv(65536)
                if not data:
                    break
                tls.sendall(data)
    except OSError:
        pass
    finally:
        up.close()
        tls.close()

while True:
    c, _ = listener.accept()
    threading.Thread(target=relay, args=(c,), daemon=True).start()
EOF
upstream="http://127.0.0.1:$sim_port/api/v1"
https=0
if command -v openssl >/dev/null &&
   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$work/tls.key" -out "$work/tls.crt" >/dev/null 2>&1; then
        python3 -u "$work/tls_relay.py" "$work/tls.crt" "$work/tls.key" "$sim_port" \
                >"$work/relay.port" 2>"$work/relay.err" </dev/null 9<&- &
        relay_pid=$!
        if wait_until 10 test -s "$work/relay.port"; then
                upstream="https://localhost:$(cat "$work/relay.port")/api/v1"
                https=1
        fi
fi
[ "$https" = 1 ] || say "note: no openssl or TLS relay: upstream is plain HTTP (HTTPS not checked)"

# --- the files to install -------------------------------------------------------------------------
stage=$work/stage
mkdir -p "$stage/units/keypool.service.d"
exec_path=$keypoold
case $keypoold in
/home/*|/root/*|/run/*|/tmp/*|/var/tmp/*|/dev/shm/*)
        # Hidden from the service (ProtectHome=, or the namespace's own tmpfs): use a copy.
        cp "$keypoold" "$stage/keypoold"
        exec_path=/run/kp-e2e/stage/keypoold ;;
esac
# The shipped unit; only where the binary lives changes. @sysconfdir@ is /etc as on a distro.
sed -e "s|@sbindir@/keypoold|$exec_path|g" -e 's|@sysconfdir@|/etc|g' \
    -e 's|@docdir@|/usr/share/doc/keypool|g' "$srcdir/systemd/keypool.service.in" \
        > "$stage/units/keypool.service"
cp "$srcdir/systemd/keypool.socket" "$stage/units/"
# What an operator adds with `systemctl edit keypool`: the key behind "cred:glm45-primary".
cat > "$stage/units/keypool.service.d/10-credentials.conf" <<'EOF'
[Service]
LoadCredential=glm45-primary:/etc/keypool/keys/glm45-primary
EOF
if grep -aq __asan_init "$keypoold"; then
        # Sanitizer builds only: LeakSanitizer inspects the process with ptrace(), which the
        # unit's SystemCallFilter= rightly forbids; leaks are the unit tests' business.
        cat > "$stage/units/keypool.service.d/90-asan.conf" <<'EOF'
[Service]
Environment=ASAN_OPTIONS=detect_leaks=0
EOF
        say "note: $keypoold is an ASan build: LeakSanitizer off under the unit's syscall filter"
fi
cp "$srcdir/systemd/keypool.sysusers" "$stage/keypool.sysusers"
sed 's|@docdir@|/usr/share/doc/keypool|g' "$srcdir/systemd/keypool.catalog" > "$stage/keypool.catalog"
printf '%s\n' "$SECRET_PRIMARY" > "$stage/glm45-primary"
cat > "$stage/keypool.conf" <<EOF
# keypool.conf for the systemd end-to-end test
socket = "$SOCK";
workers = 2;
shutdown_timeout = 10;
providers = ( { name = "sim"; base_url = "$upstream"; } );
pools = (
        { name = "GLM45"; provider = "sim"; model = "z-ai/glm-4.5";
          keys = [ "cred:glm45-primary", "$SECRET_BACKUP" ]; }
);
EOF
[ "$https" = 1 ] && cp "$work/tls.crt" "$stage/test-ca.crt"

# --- the unit files themselves ---------------------------------------------------------------------
if [ -f "$srcdir/src/log.c" ]; then
        missing=$(python3 - "$srcdir/src/log.c" "$srcdir/systemd/keypool.catalog" <<'EOF'
import re, sys
used = set(re.findall(r'"([0-9a-f]{32})"', open(sys.argv[1]).read()))
documented = set(re.findall(r'^-- ([0-9a-f]{32})\s*$', open(sys.argv[2]).read(), re.M))
print(" ".join(sorted(used - documented)) if used else "none found in log.c")
EOF
)
        check "keypool.catalog explains every MESSAGE_ID keypoold sends${missing:+ (missing: $missing)}" \
                test -z "$missing"
fi
if command -v systemd-analyze >/dev/null; then
        if [ "$exec_path" = "$keypoold" ]; then
                check "systemd-analyze verify keypool.service keypool.socket" \
                        systemd-analyze verify "$stage/units/keypool.service" "$stage/units/keypool.socket"
        fi
        exposure=$(systemd-analyze security --offline=true "$stage/units/keypool.service" 2>/dev/null |
                   sed -n 's/.*Overall exposure level for keypool.service: \([0-9.]*\).*/\1/p')
        check "systemd-analyze security --offline=true rates keypool.service ${exposure:-?} (at most 1.5)" \
                awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 1.5) }'
fi

# --- boot (systemd_ns.sh) -------------------------------------------------------------------------
if ! ns_boot /run/kp-e2e /etc /var/lib /usr/local; then
        say "--- boot log"; tail -20 "$work/boot.log" | sed 's/^/    /'
        if ! kill -0 "$upid" 2>/dev/null; then
                skip "could not boot systemd in a private PID and mount namespace (see the boot log above)"
        fi
        skip "systemd did not reach running within 30s (state: $(ns systemctl is-system-running 2>&1))"
fi
pass "systemd booted as PID 1 in private PID and mount namespaces ($(ns systemctl is-system-running))"

# --- install, inside the namespace only -------------------------------------------------------------
install_script='
set -e
# Never write to the host: every destination must be one of the namespace'"'"'s own mounts.
for d in /etc /etc/systemd/system /var/lib /usr/local; do
  case $(stat -f -c %T "$d") in overlayfs|tmpfs) ;; *) echo "refusing: $d is not private"; exit 1 ;; esac
done
s=/run/kp-e2e/stage
systemd-sysusers "$s/keypool.sysusers"
install -d -m 0755 /etc/keypool; install -d -m 0700 /etc/keypool/keys
install -m 0644 "$s/keypool.conf" /etc/keypool/keypool.conf
install -m 0600 "$s/glm45-primary" /etc/keypool/keys/glm45-primary
cp -r "$s/units/." /etc/systemd/system/
install -D -m 0644 "$s/keypool.catalog" /usr/local/lib/systemd/catalog/keypool.catalog
journalctl --update-catalog
if [ -f "$s/test-ca.crt" ]; then cat "$s/test-ca.crt" >> /etc/ssl/certs/ca-certificates.crt; fi
systemctl daemon-reload
'
if ! tar -C "$stage" -cf - . | ns sh -c 'mkdir -p /run/kp-e2e/stage && tar -C /run/kp-e2e/stage -xf -' ||
   ! ns sh -c "$install_script" > "$work/install.log" 2>&1; then
        cat "$work/install.log"
        fatal "installing the units, the config, the user and the catalog in the namespace"
fi
pass "installed keypool.service, keypool.socket, the keypool user and the journal catalog"

kid_primary=$(key_id "$SECRET_PRIMARY")
kid_backup=$(key_id "$SECRET_BACKUP")
# The primary's first request is rate limited: the request must rotate to the backup.
curl -sS --max-time 5 -o /dev/null -X POST "http://127.0.0.1:$sim_port/_sim/keys" \
     -d "{\"$kid_primary\": {\"status\": 429, \"retry_after\": 60, \"count\": 1}}" ||
        fatal "installing the simulator's rate-limit rule"

chat='{"model":"z-ai/glm-4.5","messages":[{"role":"user","content":"hi"}]}'
chat_status() { kcurl -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' -d "$chat" \
                http://keypool/v1/chat/completions 2>&1; }
show() { ns systemctl show -p "$1" --value keypool.service; }
primary_cooling() {     # 1 when /api/key-status says the primary key is cooling
        kcurl http://keypool/api/key-status | json "(lambda f: f(f, d))(lambda f, x: (isinstance(x, dict) and x.get('id') == '$kid_primary' and x.get('state') == 'cooling') or any(f(f, v) for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else [])))"
}

# --- systemctl start ---------------------------------------------------------------------------------
if ! ns timeout 30 systemctl start keypool.service; then
        fatal "systemctl start keypool.service"
fi
check "systemctl start keypool.service: active (Type=notify: READY=1 arrived)" \
        test "$(ns systemctl is-active keypool.service)" = active
status_json=$(kcurl http://keypool/status)
mainpid=$(show MainPID)
check "MainPID ($mainpid) is the coordinator /status reports" \
        test "$(printf '%s' "$status_json" | json 'd["pid"]' 2>/dev/null)" = "$mainpid"
check "the service runs as the keypool user" \
        test "$(ns ps -o user= -p "$mainpid" | tr -d ' ')" = keypool
code=$(chat_status)
check "a chat completion through $SOCK answers 200 (upstream ${upstream%%:*})" test "$code" = 200
sim_log=$(curl -sS --max-time 5 "http://127.0.0.1:$sim_port/_sim/log")
check "the credential's key (LoadCredential=, cred:) reached upstream and was rate limited" \
        test "$(printf '%s' "$sim_log" | json "any(e.get('key_id') == '$kid_primary' and e.get('status') == 429 for e in d['requests'])")" = 1
check "the request moved on to the backup key, which answered 200" \
        test "$(printf '%s' "$sim_log" | json "any(e.get('key_id') == '$kid_backup' and e.get('status') == 200 for e in d['requests'])")" = 1
check "GET /health through the socket" test "$(kcurl -o /dev/null -w '%{http_code}' http://keypool/health)" = 200

# The socket keypoold made itself: group keypool may connect, nobody else (but root).
gid=$(ns getent group keypool | cut -d: -f3)
check "a member of group keypool may use the socket" \
        ns setpriv --reuid=65534 --regid="$gid" --clear-groups \
                curl -sS -o /dev/null --max-time 5 --unix-socket "$SOCK" http://keypool/health
ns setpriv --reuid=65534 --regid=65534 --clear-groups \
        curl -s -o /dev/null --max-time 5 --unix-socket "$SOCK" http://keypool/health
check "a user outside group keypool may not (curl: couldn't connect)" test $? = 7

# --- systemctl status --------------------------------------------------------------------------------
sleep 1.2       # STATUS= is refreshed at most once a second; let the counters settle
status_text=$(show StatusText)
say "    StatusText: $status_text"
check "STATUS= reports ready keys" eval 'printf "%s" "$status_text" | grep -q "ready"'
ns systemctl status --no-pager keypool.service > "$work/status.txt" 2>&1
check "systemctl status keypool shows the Status: line" grep -q "Status: \"" "$work/status.txt"

# --- systemctl reload --------------------------------------------------------------------------------
check "systemctl reload keypool" ns timeout 30 systemctl reload keypool.service
all_gen2() {
        kcurl http://keypool/status 2>/dev/null |
                json 'len(d["workers"]) > 0 and all(w["generation"] == 2 for w in d["workers"])' 2>/dev/null |
                grep -qx 1
}
check "after the reload every worker is of generation 2 (the old generation drained)" wait_until 20 all_gen2
check "still active after the reload" test "$(ns systemctl is-active keypool.service)" = active
check "the main PID did not change across the reload" test "$(show MainPID)" = "$mainpid"
check "a request after the reload answers 200" test "$(chat_status)" = 200
sleep 1.2
status_text=$(show StatusText)
check "STATUS= is not a reload failure ($status_text)" eval '! printf "%s" "$status_text" | grep -qi "fail"'

# --- journalctl ---------------------------------------------------------------------------------------
jq_events() { ns journalctl -u keypool --no-pager -o json "$@" 2>/dev/null; }
check "journalctl -u keypool has the startup and ready entries" \
        eval 'ns journalctl -u keypool --no-pager | grep -q "starting" &&
              ns journalctl -u keypool --no-pager | grep -q "ready"'
check "KEYPOOL_EVENT=startup: MESSAGE_ID $ID_STARTUP, SYSLOG_IDENTIFIER=keypoold" \
        test "$(jq_events KEYPOOL_EVENT=startup | jlines "len(e) > 0 and all(x.get('MESSAGE_ID') == '$ID_STARTUP' and x.get('SYSLOG_IDENTIFIER') == 'keypoold' for x in e)")" = 1
check "KEYPOOL_EVENT=ready: MESSAGE_ID $ID_READY, at start and after the reload" \
        test "$(jq_events KEYPOOL_EVENT=ready | jlines "len(e) >= 2 and all(x.get('MESSAGE_ID') == '$ID_READY' for x in e)")" = 1
check "journalctl -u keypool KEYPOOL_EVENT=reload -o json has the field and MESSAGE_ID $ID_RELOAD" \
        test "$(jq_events KEYPOOL_EVENT=reload | jlines "len(e) > 0 and all(x.get('KEYPOOL_EVENT') == 'reload' and x.get('MESSAGE_ID') == '$ID_RELOAD' for x in e)")" = 1
check "KEYPOOL_EVENT=rotate KEYPOOL_POOL=GLM45: key $kid_primary, status 429" \
        test "$(jq_events KEYPOOL_EVENT=rotate KEYPOOL_POOL=GLM45 | jlines "any(x.get('KEYPOOL_KEY') == '$kid_primary' and x.get('KEYPOOL_STATUS') == '429' and x.get('MESSAGE_ID') == '$ID_ROTATE' for x in e)")" = 1
check "KEYPOOL_EVENT=cooldown: the key rests for the provider's 60 s" \
        test "$(jq_events KEYPOOL_EVENT=cooldown | jlines "any(x.get('KEYPOOL_KEY') == '$kid_primary' and x.get('KEYPOOL_RETRY_AFTER') == '60' and x.get('MESSAGE_ID') == '$ID_COOLDOWN' for x in e)")" = 1
check "journalctl -u keypool KEYPOOL_POOL=GLM45 --since -1h lists the pool's events" \
        eval '[ -n "$(ns journalctl -u keypool KEYPOOL_POOL=GLM45 --since -1h --no-pager -q)" ]'
check "journalctl -xu keypool explains the entries from keypool.catalog" \
        eval 'ns journalctl -xu keypool --no-pager | grep -q "Subject: keypoold is ready and serving requests"'
# The README's recipes, as written there.
check "README: journalctl -u keypool KEYPOOL_EVENT=rotate -o json-pretty" \
        eval 'ns journalctl -u keypool KEYPOOL_EVENT=rotate -o json-pretty --no-pager |
              grep -q "\"KEYPOOL_EVENT\" : \"rotate\""'
check "README: journalctl -F KEYPOOL_EVENT lists the kinds of events seen" \
        eval 'ns journalctl -F KEYPOOL_EVENT | grep -qx cooldown'
check "README: journalctl -u keypool KEYPOOL_KEY=$kid_primary" \
        eval 'ns journalctl -u keypool KEYPOOL_KEY="$kid_primary" --no-pager -q | grep -q "resting"'
check "README: journalctl -u keypool KEYPOOL_EVENT=cooldown KEYPOOL_STATUS=429" \
        eval 'ns journalctl -u keypool KEYPOOL_EVENT=cooldown KEYPOOL_STATUS=429 --no-pager -q | grep -q "resting"'
check "README: CREDENTIALS_DIRECTORY=/etc/keypool/keys keypoold --check-config (cred: keys checked too)" \
        ns env ASAN_OPTIONS=detect_leaks=0 CREDENTIALS_DIRECTORY=/etc/keypool/keys \
                "$exec_path" --check-config -c /etc/keypool/keypool.conf
key_status=$(kcurl http://keypool/api/key-status)
check "README: curl --unix-socket $SOCK http://keypool/api/key-status shows the primary cooling" \
        test "$(primary_cooling)" = 1
ns journalctl --no-pager -o verbose > "$work/journal.txt" 2>&1
printf '%s' "$key_status" > "$work/key-status.json"
check "no secret anywhere in the journal, systemctl status or /api/key-status" \
        eval '! grep -qF -e "$SECRET_PRIMARY" -e "$SECRET_BACKUP" "$work/journal.txt" "$work/status.txt" "$work/key-status.json"'

# --- systemctl stop -----------------------------------------------------------------------------------
t0=$(date +%s)
check "systemctl stop keypool" ns timeout 60 systemctl stop keypool.service
check "stopped cleanly: inactive, exit status 0, result success (took $(( $(date +%s) - t0 ))s)" \
        test "$(ns systemctl is-active keypool.service)-$(show ExecMainStatus)-$(show Result)" = inactive-0-success
check "nothing left in /dev/shm" eval '[ -z "$(ns ls -A /dev/shm)" ]'
check "the socket keypoold created is gone" ns test ! -e "$SOCK"
persist=0
if grep -aq /var/lib/keypool/state.json "$keypoold"; then
        persist=1
        state_perm=$(ns stat -c '%U %a' /var/lib/keypool/state.json 2>&1)
        check "the state was saved in StateDirectory= (/var/lib/keypool/state.json: $state_perm)" \
                eval '[ "${state_perm% *}" = keypool ] && [ $(( 0${state_perm#* } & 077 )) = 0 ]'
fi

# --- socket activation (and the watchdog) ----------------------------------------------------------
# A short watchdog for this phase: the shipped 30 s would make the test wait 15 s for a ping.
printf '[Service]\nWatchdogSec=2s\n' |
        ns sh -c 'cat > /etc/systemd/system/keypool.service.d/50-e2e-watchdog.conf && systemctl daemon-reload'
check "systemctl start keypool.socket" ns systemctl start keypool.socket
check "keypool.socket listens on $SOCK as keypool:keypool 0660" \
        test "$(ns stat -c '%F %U:%G %a' "$SOCK")" = "socket keypool:keypool 660"
inode=$(ns stat -c %i "$SOCK")
check "keypool.service is not running yet" test "$(ns systemctl is-active keypool.service)" != active
check "the first connection starts keypool.service and is answered 200" test "$(chat_status)" = 200
check "keypool.service is active, activated by the socket" \
        test "$(ns systemctl is-active keypool.service)" = active
check "keypoold serves the socket it was given (same inode, no socket file of its own)" \
        test "$(ns stat -c %i "$SOCK")" = "$inode"
check "the socket's status line reaches systemctl" eval '[ -n "$(show StatusText)" ]'
if [ "$persist" = 1 ]; then
        check "the primary still rests after the restart (state read back from /var/lib/keypool)" \
                test "$(primary_cooling)" = 1
fi
mainpid=$(show MainPID)
wd1=$(show WatchdogTimestampMonotonic)
sleep 3.5
wd2=$(show WatchdogTimestampMonotonic)
check "WATCHDOG=1 arrives from the main PID (WatchdogSec=2s): no restart after 3.5s" \
        test "$wd2" -gt "$wd1" -a "$(show MainPID)" = "$mainpid" -a "$(show NRestarts)" = 0 \
             -a "$(ns systemctl is-active keypool.service)" = active
check "systemctl stop keypool.service while the socket stays" \
        eval 'ns timeout 60 systemctl stop keypool.service 2>/dev/null'   # (it warns: the socket can start it)
check "the socket file survives the service's stop (RuntimeDirectoryPreserve=yes)" \
        test "$(ns stat -c %i "$SOCK" 2>/dev/null)" = "$inode"
check "a new connection activates the service again" test "$(chat_status)" = 200
check "systemctl stop keypool.socket keypool.service" \
        ns timeout 60 systemctl stop keypool.socket keypool.service
check "both inactive, the socket file removed" \
        eval 'ns test ! -e "$SOCK" && [ "$(ns systemctl is-active keypool.service keypool.socket | sort -u)" = inactive ]'

if [ "$failures" -gt 0 ]; then
        diagnostics
        say "FAIL: $failures check(s) failed"
        exit 1
fi
say "PASS: all checks"
exit 0
