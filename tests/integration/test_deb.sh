#!/bin/bash
# test_deb.sh — the Debian package, built and installed for real, and its service started.
#
# Builds keypool_*.deb with scripts/package (DEB_BUILD_OPTIONS=nocheck), checks it with lintian
# (no errors), then boots systemd as PID 1 in private PID, mount and UTS namespaces
# (systemd_ns.sh: the recipe of ../shared/reference/systemd-in-a-namespace.md and its dangers),
# with tmpfs-backed overlays on /etc, /usr, /var/lib, /var/log and /var/cache so that `dpkg -i`
# writes nothing to the host. There the package's maintainer
# scripts create the keypool user and enable keypool.socket; the test points keypool.conf at
# the simulator (outside, on loopback), starts keypool.service and asks it for a completion.
# Takes turns with test_systemd_e2e.sh (flock on that file): two inner systemds would share
# system.slice/keypool.service in the host's cgroup hierarchies.
#
# Exit: 0 all passed, 1 a check failed, 77 skipped (not root, no dpkg-buildpackage/debhelper,
# or systemd cannot be booted here; says why). KEYPOOL_DEB=path tests that package instead of
# building one; KEYPOOL_E2E_KEEP=1 keeps the work directory.

set -u
export LC_ALL=C

srcdir=${KEYPOOL_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
. "$srcdir/tests/integration/systemd_ns.sh"
SOCK=/run/keypool/keypool.sock
SECRET=sk-or-v1-fake0000000000000000000000000000000000000000000deb01
failures=0
work='' upid='' pid1='' sim_pid=''

say() { printf '%s\n' "$*"; }
pass() { say "PASS: $*"; }
fail() { say "FAIL: $*"; failures=$((failures + 1)); }
skip() { say "SKIP: $*"; exit 77; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
ns() { nsenter -t "$pid1" -p -m -u -- "$@"; }
wait_until() {
        local deadline=$(( $(date +%s) + $1 )); shift
        until "$@"; do [ "$(date +%s)" -ge "$deadline" ] && return 1; sleep 0.2; done
}
diagnostics() {
        [ -n "$pid1" ] || return 0
        ns systemctl status --no-pager keypool.service keypool.socket 2>&1 | sed 's/^/    /' | head -30
        ns journalctl --no-pager -n 40 -u keypool.service 2>&1 | sed 's/^/    /'
}
fatal() { fail "$*"; diagnostics; exit 1; }

host_state() {          # what must be exactly as it was on the host afterwards
        sha256sum /etc/passwd /etc/group /var/lib/dpkg/status 2>/dev/null
        for p in /etc/keypool /var/lib/keypool /run/keypool /usr/sbin/keypoold /usr/bin/keypoolctl \
                 /lib/systemd/system/keypool.service /usr/lib/systemd/catalog/keypool.catalog; do
                [ -e "$p" ] && echo "exists $p"
        done
        awk '$5 == "/sys/fs/cgroup" { print "cgroup-mount", $6, $NF }' /proc/self/mountinfo
        cat /proc/sys/kernel/hostname
}

cleanup() {
        local rc=$?
        trap - EXIT INT TERM
        ns_teardown "/etc, /usr, /var/lib, cgroup mount and hostname" || rc=1
        [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
        if [ -n "$work" ] && [ -d "$work" ]; then
                if [ "${KEYPOOL_E2E_KEEP:-0}" = 1 ]; then say "work directory kept: $work"; else rm -rf "$work"; fi
        fi
        exit "$rc"
}

[ "$(id -u)" = 0 ] || skip "needs root (dpkg -i and systemd as PID 1 in private namespaces)"
for tool in unshare nsenter curl python3 flock dpkg-deb; do
        command -v "$tool" >/dev/null || skip "$tool is not installed"
done
if [ -z "${KEYPOOL_DEB:-}" ]; then
        for tool in dpkg-buildpackage dh scdoc; do
                command -v "$tool" >/dev/null || skip "$tool is not installed (scripts/deps installs it)"
        done
fi
[ -x /lib/systemd/systemd ] || skip "no systemd at /lib/systemd/systemd"
[ -x "$srcdir/scripts/package" ] || { say "FAIL: missing $srcdir/scripts/package"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/kp-deb.XXXXXX") || skip "cannot create a work directory"
trap cleanup EXIT
trap 'exit 1' INT TERM

# --- the package ---------------------------------------------------------------------------------
if [ -n "${KEYPOOL_DEB:-}" ]; then
        deb=$KEYPOOL_DEB
else
        t0=$(date +%s)
        if ! deb=$(TMPDIR=$work DEB_BUILD_OPTIONS=nocheck "$srcdir/scripts/package" "$work/out" 2>"$work/package.err" | tail -1) ||
           [ ! -f "$deb" ]; then
                cat "$work/package.err"
                fatal "scripts/package builds the .deb (dpkg-buildpackage -us -uc -b)"
        fi
        pass "scripts/package built $(basename "$deb") in $(( $(date +%s) - t0 ))s"
fi
contents=$(dpkg-deb -c "$deb")
for f in ./usr/sbin/keypoold ./usr/bin/keypoolctl ./lib/systemd/system/keypool.service \
         ./lib/systemd/system/keypool.socket ./usr/lib/sysusers.d/keypool.conf \
         ./usr/lib/systemd/catalog/keypool.catalog ./etc/keypool/keypool.conf \
         ./usr/share/man/man8/keypoold.8.gz ./usr/share/man/man1/keypoolctl.1.gz \
         ./usr/share/man/man5/keypool.conf.5.gz ./usr/share/man/man5/keypool-env.5.gz \
         ./usr/share/bash-completion/completions/keypoolctl; do
        check "the package ships ${f#.}" eval 'printf "%s\n" "$contents" | grep -q " $f\$"'
done
dpkg-deb -e "$deb" "$work/control"
check "/etc/keypool/keypool.conf is a conffile" grep -qx /etc/keypool/keypool.conf "$work/control/conffiles"
check "postinst creates the keypool user (systemd-sysusers)" grep -q "systemd-sysusers.*keypool.conf" "$work/control/postinst"
check "postinst enables keypool.socket (dh_installsystemd)" grep -q "enable 'keypool.socket'" "$work/control/postinst"
if command -v lintian >/dev/null; then
        lintian --fail-on error "$deb" > "$work/lintian.out" 2>&1
        check "lintian reports no errors" test $? = 0
        grep -E '^[EW]:' "$work/lintian.out" | sed 's/^/    /'
else
        say "note: lintian is not installed: not run"
fi

# --- upstream: the simulator ---------------------------------------------------------------------
exec 9<"$srcdir/tests/integration/test_systemd_e2e.sh"
flock -w 300 9 || skip "a run of test_systemd_e2e.sh or of this test did not finish within 300s"
host_state > "$work/host.before"
python3 "$srcdir/tests/upstream_sim.py" --port 0 --port-file "$work/sim.port" \
        >"$work/sim.out" 2>"$work/sim.err" </dev/null 9<&- &
sim_pid=$!
wait_until 10 test -s "$work/sim.port" || { cat "$work/sim.err"; fatal "the simulator starts"; }
sim_port=$(cat "$work/sim.port")
mkdir -p "$work/stage"
cp "$deb" "$work/stage/keypool.deb"
cat > "$work/stage/keypool.conf" <<EOF
# keypool.conf of the package test: one pool on the simulator
workers = 1;
providers = ( { name = "sim"; base_url = "http://127.0.0.1:$sim_port/api/v1"; } );
pools = ( { name = "GLM45"; provider = "sim"; model = "z-ai/glm-4.5"; keys = [ "$SECRET" ]; } );
EOF

# --- boot (systemd_ns.sh), with overlays for everything dpkg writes ------------------------------
if ! ns_boot /run/kp-deb /etc /usr /var/lib /var/log /var/cache; then
        tail -20 "$work/boot.log" | sed 's/^/    /'
        skip "could not boot systemd in private namespaces (see the boot log above)"
fi
pass "systemd booted as PID 1 in private namespaces ($(ns systemctl is-system-running))"

# --- dpkg -i, inside the namespace only ----------------------------------------------------------
install_script='
set -e
for d in /etc /etc/systemd/system /usr /var/lib /var/log /var/cache; do
  case $(stat -f -c %T "$d") in overlayfs|tmpfs) ;; *) echo "refusing: $d is not private"; exit 1 ;; esac
done
# A container image'"'"'s policy-rc.d (exit 101) forbids starting services from maintainer
# scripts; this namespace is the machine the package installs on: let them, as on a real one.
rm -f /usr/sbin/policy-rc.d
DEBIAN_FRONTEND=noninteractive dpkg -i /run/kp-deb/stage/keypool.deb
'
if ! tar -C "$work/stage" -cf - . | ns sh -c 'mkdir -p /run/kp-deb/stage && tar -C /run/kp-deb/stage -xf -' ||
   ! ns sh -c "$install_script" > "$work/install.log" 2>&1; then
        cat "$work/install.log"
        fatal "dpkg -i keypool.deb in the namespace"
fi
pass "dpkg -i installed the package (maintainer scripts included)"
check "the keypool user and group exist (sysusers)" ns getent passwd keypool
check "keypool.socket is enabled and listening after the install" \
        eval '[ "$(ns systemctl is-enabled keypool.socket)" = enabled ] && [ "$(ns systemctl is-active keypool.socket)" = active ]'
check "keypool.service is enabled" test "$(ns systemctl is-enabled keypool.service)" = enabled
check "dpkg knows /etc/keypool/keypool.conf as a conffile" \
        eval 'ns dpkg-query -W -f="\${Conffiles}" keypool | grep -q " /etc/keypool/keypool.conf "'
check "the journal catalog is indexed (the systemd trigger ran journalctl --update-catalog)" \
        eval 'ns journalctl --list-catalog 2>/dev/null | grep -qi keypool'
check "man keypool.conf finds the installed page" eval 'ns man -w keypool.conf >/dev/null 2>&1'

# --- the service ---------------------------------------------------------------------------------
ns sh -c 'cat > /etc/keypool/keypool.conf' < "$work/stage/keypool.conf" ||
        fatal "writing /etc/keypool/keypool.conf in the namespace"
check "keypoold --check-config accepts it" ns /usr/sbin/keypoold --check-config -c /etc/keypool/keypool.conf
if ! ns timeout 60 systemctl start keypool.service; then
        fatal "systemctl start keypool.service"
fi
check "keypool.service is active" test "$(ns systemctl is-active keypool.service)" = active
mainpid=$(ns systemctl show -p MainPID --value keypool.service)
check "it runs as the keypool user" test "$(ns ps -o user= -p "$mainpid" | tr -d ' ')" = keypool
code=$(ns curl -sS --max-time 20 --unix-socket "$SOCK" -o /dev/null -w '%{http_code}' \
        -H 'Content-Type: application/json' \
        -d '{"model":"z-ai/glm-4.5","messages":[{"role":"user","content":"hi"}]}' \
        http://keypool/v1/chat/completions 2>&1)
check "a chat completion through $SOCK answers 200 ($code)" test "$code" = 200
check "keypoolctl keys lists the pool" eval 'ns keypoolctl keys | grep -q GLM45'
check "/var/lib/keypool is owned by keypool (StateDirectory=)" \
        test "$(ns stat -c %U /var/lib/keypool 2>&1)" = keypool
check "systemctl stop keypool.service" ns timeout 60 systemctl stop keypool.service
check "stopped cleanly" test "$(ns systemctl show -p Result --value keypool.service)" = success

if [ "$failures" -gt 0 ]; then
        diagnostics
        say "FAIL: $failures check(s) failed"
        exit 1
fi
say "PASS: all checks"
exit 0
