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

#include "keypool/conf.h"

/* Runs keypool with cfg (taking ownership: a reload replaces it) until it is stopped; returns
 * the process exit status. */
int supervisor_run(struct config *cfg);
