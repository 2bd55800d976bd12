/* notify.c — telling the service manager how keypool is doing.
 *
 * sd_notify with the pid of the process systemd watches (the coordinator). STATUS= is
 * rate-limited here, not by callers, so the coordinator can report every change it sees.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "keypool/notify.h"

void notify_init(struct notify *n) {
        uint64_t usec = 0;

        *n = (struct notify) {};
        if (sd_watchdog_enabled(0, &usec) > 0)
                n->watchdog_usec = usec;
}

static void send_with_status(struct notify *n, const char *what, const char *status) {
        if (status) {
                snprintf(n->status, sizeof n->status, "%s", status);
                n->pending[0] = 0;
                sd_notifyf(0, "%s\nSTATUS=%s", what, status);
        } else
                sd_notify(0, what);
}

void notify_ready(struct notify *n, const char *status) {
        char what[64];

        snprintf(what, sizeof what, "READY=1\nMAINPID=%d", (int) getpid());
        send_with_status(n, what, status);
}

void notify_reloading(struct notify *n, const char *status) {
        send_with_status(n, "RELOADING=1", status);
}

void notify_stopping(struct notify *n, const char *status) {
        send_with_status(n, "STOPPING=1", status);
}

void notify_status(struct notify *n, const char *status, int64_t now_ms) {
        if (strcmp(status, n->status) == 0) {
                n->pending[0] = 0;
                return;
        }
        if (now_ms - n->last_status_ms >= 1000) {
                snprintf(n->status, sizeof n->status, "%s", status);
                n->pending[0] = 0;
                n->last_status_ms = now_ms;
                sd_notifyf(0, "STATUS=%s", status);
                return;
        }
        snprintf(n->pending, sizeof n->pending, "%s", status);
}

void notify_tick(struct notify *n, int64_t now_ms, bool healthy) {
        if (n->pending[0] && now_ms - n->last_status_ms >= 1000) {
                snprintf(n->status, sizeof n->status, "%s", n->pending);
                n->pending[0] = 0;
                n->last_status_ms = now_ms;
                sd_notifyf(0, "STATUS=%s", n->status);
        }
        /* Silence is the alarm: when the workers are not all alive and fresh, no ping, and
         * systemd restarts the service once the watchdog interval passes. */
        if (n->watchdog_usec > 0 && healthy && (now_ms - n->last_ping_ms) * 1000 >= (int64_t) n->watchdog_usec / 2) {
                n->last_ping_ms = now_ms;
                sd_notify(0, "WATCHDOG=1");
        }
}
