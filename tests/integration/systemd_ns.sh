# systemd_ns.sh — systemd booted as PID 1 in private PID, mount and UTS namespaces, for the tests
# that drive real units (sourced by test_systemd_e2e.sh and test_deb.sh).
#
# The recipe is ../shared/reference/systemd-in-a-namespace.md, followed exactly, plus what
# test_systemd_e2e.sh's header explains: /run shared (LoadCredential=), /proc/sys and /sys
# read-only, a tmpfs of its own on /sys/fs/cgroup where the host has a tmpfs there, and
# tmpfs-backed overlays on the directories the test installs into, so nothing reaches the host.
# The caller defines say, wait_until, ns (nsenter into $pid1), $work, and takes the machine-wide
# turn (flock on test_systemd_e2e.sh) before booting.

# ns_boot RUNDIR DIR...: boots, with an overlay on each DIR (upper layers under RUNDIR, itself in
# the namespace's /run). Sets upid (the unshare) and pid1; 0 once systemd is running or
# degraded, 1 if it never got there (its console is in $work/boot.log).
ns_boot() {
        local rundir=$1 inner; shift
        inner='
set -e
mount -t tmpfs tmpfs /run; mkdir -p /run/systemd
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /var/tmp; mount -t tmpfs tmpfs /dev/shm
[ -d /var/log/journal ] && mount -t tmpfs tmpfs /var/log/journal
# additions to the reference recipe, explained at the top of test_systemd_e2e.sh
mount --make-rshared /run
mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys
if [ "$(stat -f -c %T /sys/fs/cgroup)" = tmpfs ]; then mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup; fi
mount -o remount,bind,ro /sys
for d in '"$*"'; do
  o='"$rundir"'/overlay$(echo "$d" | tr / _)
  mkdir -p "$o/upper" "$o/work"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$o/upper,workdir=$o/work" "$d"
done
mount -t tmpfs tmpfs /etc/systemd/system
for u in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service \
         systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer systemd-sysusers.service \
         systemd-sysctl.service systemd-remount-fs.service systemd-binfmt.service \
         systemd-modules-load.service systemd-journal-flush.service systemd-update-utmp.service \
         console-getty.service getty@tty1.service systemd-logind.service; do
  ln -s /dev/null /etc/systemd/system/$u
done
exec /lib/systemd/systemd --system --unit=basic.target --log-target=console
'
        find /sys/fs/cgroup -mindepth 1 -type d 2>/dev/null | sort > "$work/cgroups.before"
        unshare --pid --fork --mount --mount-proc --uts sh -c "$inner" >"$work/boot.log" 2>&1 </dev/null 9<&- &
        upid=$!
        wait_until 10 eval 'pid1=$(pgrep -P "$upid"); [ -n "$pid1" ] || ! kill -0 "$upid" 2>/dev/null'
        [ -n "$pid1" ] && wait_until 30 ns_booted
}

ns_booted() {
        kill -0 "$upid" 2>/dev/null || return 2
        case $(ns systemctl is-system-running 2>/dev/null) in running|degraded) return 0 ;; esac
        return 1
}

# ns_cleanup_cgroups: removes the cgroup directories the inner systemd created in the host's
# hierarchies (deepest first; after PID 1 was killed).
ns_cleanup_cgroups() {
        [ -f "$work/cgroups.before" ] || return 0
        local _ p
        for _ in 1 2 3 4 5; do
                find /sys/fs/cgroup -mindepth 1 -type d 2>/dev/null | sort > "$work/cgroups.after"
                comm -13 "$work/cgroups.before" "$work/cgroups.after" |
                        awk -F/ '$NF ~ /\.(slice|scope|service|mount|socket|swap)$/ { print NF, $0 }' |
                        sort -rn | cut -d' ' -f2- > "$work/cgroups.new"
                [ -s "$work/cgroups.new" ] || return 0
                while read -r p; do rmdir "$p" 2>/dev/null; done < "$work/cgroups.new"
                sleep 0.2
        done
        say "note: $(wc -l < "$work/cgroups.new") cgroup directories of the test could not be removed"
}

# ns_teardown WHAT: kills PID 1 (everything inside dies with it), removes its cgroups, and
# compares the caller's host_state with $work/host.before, saying PASS or FAIL about WHAT;
# 1 when the host changed.
ns_teardown() {
        [ -n "$pid1" ] && kill -KILL "$pid1" 2>/dev/null
        [ -n "$upid" ] && wait "$upid" 2>/dev/null
        { [ -n "$work" ] && [ -d "$work" ]; } || return 0
        ns_cleanup_cgroups
        [ -f "$work/host.before" ] || return 0
        host_state > "$work/host.after"
        if cmp -s "$work/host.before" "$work/host.after"; then
                say "PASS: the host's $1 are untouched"
                return 0
        fi
        say "FAIL: the host changed:"; diff "$work/host.before" "$work/host.after"
        return 1
}
