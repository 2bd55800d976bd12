/* notify.h — telling the service manager how keypool is doing.
 *
 * Owns the coordinator's conversation with systemd over NOTIFY_SOCKET: READY/RELOADING/STOPPING,
 * a STATUS= line kept current (sent when it changes, at most once a second), and the watchdog,
 * pinged at half its interval only when the caller vouches that the workers are alive. Without
 * NOTIFY_SOCKET every call is a cheap no-op.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

struct notify {
        uint64_t watchdog_usec;         /* 0: no watchdog requested */
        int64_t last_ping_ms;
        int64_t last_status_ms;
        char status[256];               /* the STATUS= line systemd has */
        char pending[256];              /* a newer one waiting for its second */
};

/* Reads WATCHDOG_USEC (for this process). */
void notify_init(struct notify *n);

void notify_ready(struct notify *n, const char *status);
void notify_reloading(struct notify *n, const char *status);
void notify_stopping(struct notify *n, const char *status);

/* Sets the STATUS= line; sent now if the last one went out a second ago or more, else on a later
 * notify_tick. */
void notify_status(struct notify *n, const char *status, int64_t now_ms);

/* Call about every second: flushes a pending STATUS and pings the watchdog when due and healthy. */
void notify_tick(struct notify *n, int64_t now_ms, bool healthy);
