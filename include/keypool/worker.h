/* worker.h — one forked worker process.
 *
 * Owns everything a worker runs after fork: its own sd-event loop and curl multi handle (created
 * here, never inherited), the client connections it accepted from the shared listening socket,
 * its heartbeat in the shared table, and its own shutdown (graceful on SIGTERM: stop accepting,
 * finish what is in flight; at once on SIGINT or SIGQUIT).
 */
#pragma once

#include <sys/types.h>

#include "keypool/conf.h"
#include "keypool/keytable.h"

struct worker_params {
        const struct config *config;
        struct keytable *table;
        unsigned slot;
        unsigned generation;
        int listen_fd;
        int tcp_listen_fd;              /* http_listen, or -1 */
        const int *wake_fds;            /* one eventfd per slot (index = slot) */
        unsigned n_wake_fds;
        int coordinator_event_fd;       /* the coordinator's epoll fd, closed in the worker */
        pid_t coordinator_pid;
};

/* Runs the worker until it is told to stop; returns the exit status for _exit(). Call only in a
 * freshly forked child. */
int worker_run(const struct worker_params *wp);
