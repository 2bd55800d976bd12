/* cluster.h — the cluster process: one host's link to the others through Redis.
 *
 * Owns the process the coordinator forks when keypool.conf has cluster = { … }: it alone talks
 * to Redis (hiredis, async, on its own sd-event loop). Outbound, it follows the history ring and
 * publishes this node's cooldowns, disables and enables (a hash per key, written by a Lua script
 * so that the later rest wins, and a PUBLISH); inbound, it applies the other nodes' events to the
 * table. Every second it heartbeats the node, reads the live nodes and their reports, publishes
 * this node's usage per key and sums the others'. Each limited key's rpm and max_concurrent are
 * budgets in Redis from which this node leases slices ahead of need (cluster_lease.c) and puts
 * them into the table, where workers check them with no round trip. When Redis is away or
 * answers nonsense, it says so in the table (degraded), falls back to this node's static share
 * (limit ÷ live nodes last seen), and reconnects with backoff. Workers never wait on it.
 */
#pragma once

#include <stdint.h>
#include <sys/types.h>

#include "keypool/conf.h"
#include "keypool/keytable.h"

struct cluster_params {
        const struct config *config;    /* config->cluster is set */
        struct keytable *table;
        const int *wake_fds;            /* the workers' wake eventfds: a key became ready */
        unsigned n_wake_fds;
        pid_t coordinator_pid;
};

/* Runs the cluster process until SIGTERM/SIGINT or the coordinator's death; returns an exit
 * status. Called in the forked child only. */
int cluster_run(const struct cluster_params *p);

/* --- pure parts, for the tests ------------------------------------------------------------- */

/* This node's share of a cluster-wide limit: limit ÷ nodes, at least 1; 0 (no limit) stays 0. */
unsigned cluster_share(unsigned limit, unsigned nodes);

/* The event message published on the channel: "node\tid\tstate\treason\tuntil_wall_ms\tat_wall_ms". */
struct cluster_event {
        char node[KEYTABLE_NAME_MAX + 1];
        char id[KEYID_ID_LEN + 1];
        enum key_state state;
        enum key_reason reason;
        int64_t until_wall_ms;          /* KEY_COOLING: when the rest ends; else 0 */
        int64_t at_wall_ms;             /* when the node saw it */
};
int cluster_event_format(const struct cluster_event *e, char *buf, size_t size);
/* -EBADMSG for anything but a well-formed message (Redis or a stranger may send garbage). */
int cluster_event_parse(const char *s, size_t len, struct cluster_event *ret);
/* The state a history entry stands for, or -ENOENT for entries that are not shared. */
int cluster_event_from_history(const struct keytable_event *h, struct cluster_event *ret);

/* One limited key at one tick, as this node sees it. */
struct cluster_lease_input {
        unsigned rpm, max_concurrent;   /* the cluster-wide limits; 0: none */
        unsigned nodes;                 /* live nodes last seen */
        unsigned in_flight, slots, left;/* the table's row: in flight, slots held, slice left */
        unsigned held;                  /* the slots Redis records for this node */
        bool ready;                     /* the key may serve */
        bool active;                    /* used, or waited for, lately on this node */
        bool contended;                 /* another node was refused slots lately */
};
/* What to do about it: ask Redis for rpm_want more tokens, or give rpm_return back (taken out
 * of the table first); lower the table's slots to cap first (-1: leave); then ask Redis to
 * record ask slots for this node (-1: no ask), a raise when raise (the table then holds what is
 * granted). */
struct cluster_lease_plan {
        unsigned rpm_want, rpm_return;
        int cap, ask;
        bool raise;
};
/* Half a fair share of limit (ceil(ceil(limit ÷ nodes) ÷ 2)), at least 1; 0 stays 0. */
unsigned cluster_lease_slice(unsigned limit, unsigned nodes);
void cluster_lease_plan(const struct cluster_lease_input *in, struct cluster_lease_plan *ret);
