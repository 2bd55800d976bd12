/* supervisor.h — the coordinator: keypoold's main process.
 *
 * Owns the shared key table, the listening sockets (opened through listen.h before the first
 * fork, closed when stopping) and the worker processes: forks them, reaps
 * and respawns them (backing off when they keep dying), returns what a dead worker held in the
 * table, reloads on SIGHUP, reports to systemd (sd_notify, watchdog), and shuts everything down on
 * SIGTERM (graceful), SIGINT (fast) or SIGQUIT (immediate).
 * It never touches libcurl and never blocks on a client.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "keypool/conf.h"

/* Runs keypool with cfg (taking ownership: a reload replaces it) until it is stopped; returns
 * the process exit status. */
int supervisor_run(struct config *cfg);

/* --- the coordinator's decisions, pure so that they can be tested on their own ------------- */

/* starting → running ⇄ reloading → stopping → stopped; stopping from any state before it. */
enum supervisor_state {
        SUPERVISOR_STARTING = 1,
        SUPERVISOR_RUNNING,
        SUPERVISOR_RELOADING,
        SUPERVISOR_STOPPING,
        SUPERVISOR_STOPPED,
        _SUPERVISOR_STATE_MAX,
};

/* "starting", "running", …; "none" for 0, before the coordinator has started. */
const char *supervisor_state_to_string(enum supervisor_state state);

/* What the state depends on, as the event handlers recorded it. */
struct supervisor_facts {
        enum supervisor_state state;    /* 0 before the coordinator has started */
        int stop_signal;                /* the stop asked for (SIGTERM, SIGINT, SIGQUIT), or 0 */
        bool current_serving;           /* every worker of the newest generation has accepted */
        unsigned live_workers;          /* worker processes of every generation */
};

/* The state that follows facts->state, one step at a time: the caller applies it and asks again
 * until the state stays put. A reload shows as a running coordinator whose newest generation
 * does not serve yet. */
enum supervisor_state supervisor_next_state(const struct supervisor_facts *facts);

/* Does stop signal sig change how keypool stops, when it is already stopping as `stopping` says
 * (0: not stopping)? SIGTERM or a repeat changes nothing; SIGINT or SIGQUIT otherwise takes over
 * to escalate (SIGINT after SIGQUIT too, though it is softer: kept as it always was). */
bool supervisor_stop_takes_over(int stopping, int sig);

/* How long the workers have to stop after sig before they are killed. */
uint64_t supervisor_stop_deadline_usec(int sig, unsigned shutdown_timeout_sec);

/* A worker position's quick deaths in a row, after its process exited having lived lived_ms. */
unsigned supervisor_crashes_after_exit(unsigned crashes, int64_t lived_ms, bool killed_wedged);

/* How long to wait before forking a position again after that many quick deaths in a row. */
uint64_t supervisor_respawn_delay_ms(unsigned crashes);
