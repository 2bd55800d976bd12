/* keytable.h — the shared key table.
 *
 * Owns the POSIX shared-memory segment that every keypoold process maps: per-pool key health
 * and counters, the pool locks, and the worker scoreboard with each worker's leases (the keys it
 * has requests in flight on). It is created and filled by the coordinator before the first fork
 * and never remapped. Secrets never enter it: keys are known by id and masked form.
 *
 * Locking: one robust, process-shared, error-checking mutex per pool (the hot path takes only
 * its pool's) and one for the header. Lock order: header before pool; never two pools. Critical
 * sections do no syscalls, no logging, no allocation. A process that dies holding a lock leaves
 * rows marked dirty; the next locker gets EOWNERDEAD, repairs the pool (recounting in-flight
 * figures from the leases, resetting impossible states) and marks the mutex consistent.
 *
 * Reload: the segment holds two banks of pool and key rows, each sized for the limits. One is
 * current. A reload fills the other beside it (keytable_bank_begin, add_pool/add_key, then
 * keytable_bank_commit): a key whose id is in the current bank starts from that row's health and
 * counters. A worker slot uses the bank that was current when it was claimed, so a new generation
 * of workers serves from the new rows while the old one drains on the old. Slots and leases are
 * shared by both banks.
 *
 * Indices: pool indices that callers pass are relative to a bank — the slot's bank for
 * keytable_acquire, the current bank for the readers (n_pools, n_keys, pool_info,
 * pool_snapshot, probe_claim). Key indices (in leases, changes, views' first_key, enable,
 * disable, set_key_limits) are table-wide rows across both banks; a key's place in its pool is
 * its position (0-based), also key - first_key of its pool's view.
 *
 * Times are CLOCK_MONOTONIC milliseconds (the same clock in every process), passed in by the
 * caller so tests can drive the clock.
 */
#pragma once

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "keypool/keyid.h"
#include "keypool/verdict.h"

#define KEYTABLE_NO_KEY    UINT_MAX
#define KEYTABLE_NAME_MAX  63
#define KEYTABLE_MODEL_MAX 127

enum key_state {
        KEY_STATE_INVALID = 0,
        KEY_READY,
        KEY_COOLING,
        KEY_DISABLED,
        _KEY_STATE_MAX,
};

enum key_reason {
        KEY_REASON_NONE = 0,
        KEY_REASON_RATE_LIMITED,
        KEY_REASON_AUTH,
        KEY_REASON_QUOTA,
        KEY_REASON_TRANSIENT,
        KEY_REASON_OPERATOR,
        _KEY_REASON_MAX,
};

enum worker_stage {
        WORKER_STAGE_FREE = 0,  /* slot unused */
        WORKER_STAGE_STARTING,
        WORKER_STAGE_SERVING,
        WORKER_STAGE_DRAINING,  /* stopped accepting, finishing in-flight requests */
        _WORKER_STAGE_MAX,
};

struct keytable;                /* process-local handle on the mapping */

#define KEYTABLE_LATENCY_BUCKETS 12      /* ≤ 0.05 0.1 0.25 0.5 1 2.5 5 10 30 60 120 s, +Inf */
#define KEYTABLE_ERROR_MAX       95
#define KEYTABLE_LAG_BUCKETS     11      /* ≤ 0.1 0.25 0.5 1 2 5 10 25 100 1000 ms, +Inf */

enum history_kind {
        HISTORY_NONE = 0,
        HISTORY_ROTATE,                 /* a request moved from key_from to key_to ("" none ready) */
        HISTORY_COOLDOWN,
        HISTORY_RECOVER,
        HISTORY_DISABLE,
        HISTORY_ENABLE,
        HISTORY_PROBE,
        _HISTORY_MAX,
};

/* One entry of the rotation history ring. */
struct keytable_event {
        uint64_t seq;                   /* assigned by keytable_history_add, increasing */
        int64_t wall_ms;                /* when, ms since the epoch */
        enum history_kind kind;
        char pool[KEYTABLE_NAME_MAX + 1];
        char key_from[KEYID_ID_LEN + 1];/* the key that left, or the key concerned; "" none */
        char key_to[KEYID_ID_LEN + 1];  /* the key that took over; "" none */
        int status;                     /* upstream status, 0 none */
        enum key_reason reason;
        int64_t cooldown_ms;            /* the rest given, 0 none */
        char node[KEYTABLE_NAME_MAX + 1];/* the cluster node that saw it; "" (when added): this
                                         * one, or none when clustering is off */
};

/* A key's persistent state, for state files and import. Times are monotonic ms. */
struct keytable_key_state {
        enum key_state state;
        enum key_reason reason;
        int64_t cooldown_until_ms;
        int64_t last_used_ms;           /* 0 never */
        uint64_t requests, successes, rate_limited, failures, tokens_in, tokens_out;
        unsigned consecutive_failures;
        int last_status;
        enum verdict_class last_class;
};

struct keytable_limits {
        unsigned max_pools;             /* per bank */
        unsigned max_keys;              /* per bank */
        unsigned n_slots;               /* worker slots (live workers of all generations) */
        unsigned leases_per_slot;       /* requests one worker may have in flight */
        unsigned history_size;          /* rotation history ring entries (0: 1024) */
};

/* A key held by one request of one worker. */
struct keytable_lease {
        unsigned pool;                  /* relative to the slot's bank */
        unsigned key;                   /* table-wide key index */
        unsigned position;              /* the key's place in its pool (0-based) */
        unsigned slot;
        unsigned index;                 /* position in the slot's lease array */
};

/* Table-wide rules, set by the coordinator before the first fork. */
struct keytable_policy {
        bool cooldown_scope_key;        /* a rate limit cools every row with the same key id */
        unsigned transient_threshold;   /* transient failures in a row that cool a key (0: never) */
        int64_t transient_cooldown_ms;  /* … for this long */
        int64_t probe_interval_ms;      /* a disabled quota key is probed this often */
        bool probe_auth;                /* auth-disabled keys are probed too */
};

/* What an upstream attempt did, to be recorded on the key. */
struct keytable_outcome {
        enum verdict_class cls;         /* VERDICT_NONE: released without an answer (aborted) */
        int status;                     /* HTTP status, 0 when none */
        int64_t rest_ms;                /* RATE_LIMITED: the rest; OK: > 0 cools the key after a
                                         * success that left it nothing (remaining 0) */
        uint64_t tokens_in, tokens_out;
        struct rate_figures figures;    /* what the answer said; RATE_FIGURES_UNKNOWN if nothing */
        const char *error;              /* a short, already sanitized error message, or NULL */
        bool unconfirmed;               /* AUTH not yet confirmed by a probe: counted, no disable */
};

/* A state change made by a release or an acquire, to be logged outside the lock. */
struct keytable_change {
        bool changed;
        unsigned key;                   /* table-wide key index */
        unsigned key_position;          /* its place in its pool (0-based) */
        enum key_state from, to;
        enum key_reason reason;
        int64_t until_ms;               /* for KEY_COOLING */
        unsigned twins_cooled;          /* rows of the same key in other pools cooled with it */
        bool account_limit_suspected;   /* every key of the pool got rate limited within 1 s */
        bool freed_capacity;            /* the key was at max_concurrent before this release
                                         * (whatever its state now: waiters must look again) */
};

/* Why acquire found no key, and when to try again. */
struct keytable_wait {
        int64_t retry_at_ms;            /* earliest time-based recovery (a cooldown's end or an rpm
                                         * slot); 0 when none is coming */
        bool busy;                      /* some key is only at its max_concurrent: a release frees it */
};

struct keytable_key_view {
        char id[KEYID_ID_LEN + 1];
        char masked[KEYID_MASK_MAX + 1];
        unsigned pool;                  /* relative to the key's bank */
        unsigned position;              /* place in its pool (0-based) */
        enum key_state state;           /* COOLING only while until_ms > now */
        enum key_reason reason;
        int64_t cooldown_until_ms;      /* 0 when not cooling */
        int64_t last_used_ms;           /* 0 when never used */
        uint64_t requests, successes, rate_limited, failures;
        uint64_t tokens_in, tokens_out;
        int last_status;                /* 0 when none */
        enum verdict_class last_class;
        unsigned in_flight;
        unsigned consecutive_failures;
        unsigned max_concurrent, rpm;   /* 0: no limit */
        int64_t next_probe_ms;          /* disabled keys that are probed: when next; else 0 */
        struct rate_figures figures;    /* the provider's last figures for this key */
        int64_t figures_ms;             /* when they were seen (monotonic), 0 never */
        uint64_t by_class[_VERDICT_MAX];/* outcomes recorded, by class */
        char last_error[KEYTABLE_ERROR_MAX + 1];        /* "" none */
};

struct keytable_pool_view {
        char name[KEYTABLE_NAME_MAX + 1];
        char model[KEYTABLE_MODEL_MAX + 1];
        unsigned first_key, n_keys;     /* first_key: table-wide index of the pool's first key */
        int64_t account_limit_until_ms; /* > now: every key was limited at once (account/IP-wide
                                         * limit suspected) until this time */
        uint64_t rotations;             /* requests moved from one key to another */
        uint64_t latency_buckets[KEYTABLE_LATENCY_BUCKETS];     /* cumulative counts are the
                                         * caller's business: these are per bucket */
        uint64_t latency_count;
        uint64_t latency_sum_ms;
};

struct keytable_worker_view {
        unsigned slot;
        pid_t pid;
        unsigned generation;
        unsigned bank;                  /* the bank its acquires use */
        enum worker_stage stage;
        int64_t started_ms, heartbeat_ms;
        uint64_t requests;
        unsigned in_flight;             /* leases held */
        unsigned waiters;               /* requests waiting for a key */
};

/* --- coordinator: creation, before the first fork ------------------------------------------- */

/* Creates, maps and unlinks an anonymous-named shm segment sized for limits (so nothing is left
 * in /dev/shm whatever happens to the process). */
int keytable_create(const struct keytable_limits *limits, int64_t now_ms, struct keytable **ret);
void keytable_destroy(struct keytable *t);              /* unmaps; NULL is fine */

/* Pools are filled in order; a pool's keys are added right after it. They go into the bank
 * being filled: bank 0 from creation (it is current at once), the other bank between
 * keytable_bank_begin and keytable_bank_commit/abort, the current bank again after those. pool
 * and ret_pool are relative to that bank; ret_key is table-wide. -ENOSPC past the limits,
 * -ENAMETOOLONG for over-long names, -EEXIST for an id already in the pool, -EINVAL for a pool
 * other than the newest.
 * During a reload, a key whose id has a row in the current bank copies that row's health and
 * counters (the row in the pool of the same name if there is one, else any row with the id):
 * state, reason, cooldown, probe time, counters, failure streak, last status, last use,
 * figures and rpm arrival time; in_flight starts at 0 (the old row keeps its leases) and the
 * limits at none (set them with keytable_set_key_limits). Other keys start ready. A pool copies
 * the account-limit time of the current pool of the same name. */
int keytable_add_pool(struct keytable *t, const char *name, const char *model, unsigned *ret_pool);
int keytable_add_key(struct keytable *t, unsigned pool, const char *id, const char *masked,
                     unsigned *ret_key);
int keytable_set_key_limits(struct keytable *t, unsigned key, unsigned max_concurrent, unsigned rpm);
void keytable_set_policy(struct keytable *t, const struct keytable_policy *p);

/* --- coordinator: reload ------------------------------------------------------------------- */

/* Starts filling the bank that is not current, empty (a half-filled one is started afresh).
 * -EBUSY while a live (non-FREE) slot still uses that bank: a generation older than the current
 * one is still draining, or its dead workers' slots are not released yet. */
int keytable_bank_begin(struct keytable *t);
/* The filled bank becomes current: readers switch at once, slots claimed from now on use it.
 * -EINVAL when no bank is being filled. */
int keytable_bank_commit(struct keytable *t);
/* Undoes the last commit: the bank current before it is current again (and being filled), for
 * a reload whose new generation never served. Slots keep the bank they were claimed with.
 * -EINVAL when a bank is being filled or the other bank holds no pools. */
int keytable_bank_revert(struct keytable *t);
/* Forgets the half-filled bank; the current bank is untouched. */
void keytable_bank_abort(struct keytable *t);
unsigned keytable_bank_current(const struct keytable *t);   /* 0 or 1 */

/* --- coordinator: worker slots ------------------------------------------------------------- */

/* Reserves a free slot for a worker about to be forked (stage STARTING), using the bank that is
 * current now. -EBUSY when none. */
int keytable_slot_claim(struct keytable *t, unsigned generation, int64_t now_ms, unsigned *ret_slot);
void keytable_slot_set_pid(struct keytable *t, unsigned slot, pid_t pid);
/* After the worker in slot has died: returns its leases (in-flight counts) and frees the slot.
 * Safe to call whatever state the dead worker left. */
void keytable_slot_release(struct keytable *t, unsigned slot);
/* The bank the slot's acquires use (0 or 1): a draining worker's differs from
 * keytable_bank_current once a reload has committed. */
unsigned keytable_slot_bank(const struct keytable *t, unsigned slot);

/* --- worker ---------------------------------------------------------------------------------- */

void keytable_slot_set_stage(struct keytable *t, unsigned slot, enum worker_stage stage);
void keytable_slot_heartbeat(struct keytable *t, unsigned slot, int64_t now_ms);
void keytable_slot_count_request(struct keytable *t, unsigned slot);
/* One step of the worker's event loop took usec. Counts survive the slot's reuse, so the sums
 * over all slots only grow (a Prometheus counter's rule). */
void keytable_slot_observe_lag(struct keytable *t, unsigned slot, uint64_t usec);

/* The event loops' step times summed over every slot: buckets (not cumulative, the last one
 * +Inf), their sum in µs and count. */
struct keytable_lag {
        uint64_t buckets[KEYTABLE_LAG_BUCKETS];
        uint64_t sum_usec;
        uint64_t count;
};
extern const uint64_t keytable_lag_bounds_usec[KEYTABLE_LAG_BUCKETS];
void keytable_loop_lag(const struct keytable *t, struct keytable_lag *ret);

/* Picks the pool's ready key used least recently (on a tie, the earlier in the list, so the
 * primary goes first), skipping keys at their max_concurrent or rpm limit, and counts a request
 * and an in-flight lease on it. pool is relative to the slot's bank. avoid_key (or
 * KEYTABLE_NO_KEY) is taken only when no other key can serve. A cooling key whose time has passed
 * becomes ready again (reported in ret_change when not NULL). rpm is enforced with GCRA (one
 * timestamp per key; bursts up to rpm).
 * Returns 0 and writes ret_lease; -EAGAIN when no key can serve now, with ret_wait saying when one
 * may; -ENOSPC when the slot holds leases_per_slot leases already. */
int keytable_acquire(struct keytable *t, unsigned slot, unsigned pool, int64_t now_ms,
                     unsigned avoid_key, struct keytable_lease *ret_lease,
                     struct keytable_wait *ret_wait, struct keytable_change *ret_change);

/* keytable_acquire for a request that waits for a key with ticket (keytable_wait_ticket; 0 for
 * one that never waited, which keytable_acquire is). Waiting is first come, first served across
 * workers: while a waiter of another live worker of the same bank holds an older ticket of the
 * pool, a key that could serve is left to it and -EAGAIN comes back with ret_wait saying busy
 * and to look again in a few ms. */
int keytable_acquire_waiter(struct keytable *t, unsigned slot, unsigned pool, int64_t now_ms,
                            unsigned avoid_key, uint64_t ticket, struct keytable_lease *ret_lease,
                            struct keytable_wait *ret_wait, struct keytable_change *ret_change);

/* Records the outcome on the key and returns the lease. VERDICT_RATE_LIMITED cools the key for
 * rest_ms (with cooldown_scope_key, every row of the same id in other pools too, each pool locked
 * in turn after this one is released), VERDICT_AUTH and VERDICT_QUOTA disable it (reason
 * auth/quota), VERDICT_OK resets its consecutive failures (and cools it, reason rate_limited,
 * when rest_ms > 0), VERDICT_TRANSIENT counts one and cools the key for transient_cooldown_ms
 * once transient_threshold come in a row, VERDICT_CALLER and VERDICT_NONE change nothing but the
 * in-flight count. Figures other than -1 are stored. ret_change may be NULL. An unconfirmed
 * VERDICT_AUTH (a caller's path refused, no probe yet) is counted but disables nothing. */
void keytable_release(struct keytable *t, const struct keytable_lease *lease,
                      const struct keytable_outcome *o, int64_t now_ms,
                      struct keytable_change *ret_change);

/* Claims a disabled key of the current bank whose probe is due (reason quota; auth too with
 * probe_auth): its next probe moves probe_interval_ms ahead, so no other worker probes it
 * meanwhile. 0 and the key (table-wide) and its pool (relative to the current bank), or -ENOENT
 * when none is due. A worker of an older generation should not probe: its configuration is not
 * the current bank's. */
int keytable_probe_claim(struct keytable *t, int64_t now_ms, unsigned *ret_key, unsigned *ret_pool);

/* Ends every cooldown of the current bank that has run out (acquire does it lazily too), so a
 * recovery is seen when it happens, not at the next request. Returns how many keys recovered,
 * at most max, with their pools (bank-relative) and positions. */
unsigned keytable_recover_due(struct keytable *t, int64_t now_ms, unsigned *ret_pools,
                              unsigned *ret_positions, unsigned max);

/* Operator and probe actions on a key row (table-wide index, either bank): enable makes a key
 * ready (counts reset to none in a row); disable makes it disabled with reason. ret_change may
 * be NULL. -EINVAL for a bad key. */
int keytable_enable(struct keytable *t, unsigned key, int64_t now_ms, struct keytable_change *ret_change);
int keytable_disable(struct keytable *t, unsigned key, enum key_reason reason, int64_t now_ms,
                     struct keytable_change *ret_change);

/* Waiting requests: a worker says how many it has waiting for a key to free up, so a worker
 * that frees one (freed_capacity) knows whom to wake. */
void keytable_slot_set_waiters(struct keytable *t, unsigned slot, unsigned n);
/* Slots with waiters, at most max; returns how many. */
unsigned keytable_slots_with_waiters(const struct keytable *t, unsigned *ret_slots, unsigned max);
/* A new ticket for a request of slot about to wait for a key of pool (relative to the slot's
 * bank): tickets of a pool increase across all workers, so they say who came first. */
uint64_t keytable_wait_ticket(struct keytable *t, unsigned slot, unsigned pool);
/* Publishes the ticket of the slot's oldest waiter for pool (0: none waits). */
void keytable_slot_set_wait_head(struct keytable *t, unsigned slot, unsigned pool, uint64_t ticket);

/* --- observations (any worker; lock-free counters) ---------------------------------------- */

/* Upper bounds of the latency buckets in ms (the last is INT64_MAX). */
extern const int64_t keytable_latency_bounds_ms[KEYTABLE_LATENCY_BUCKETS];
/* One upstream attempt took ms; pool is relative to the slot's bank. */
void keytable_observe_latency(struct keytable *t, unsigned slot, unsigned pool, int64_t ms);
/* A request moved from one key to another in this pool (slot's bank). */
void keytable_count_rotation(struct keytable *t, unsigned slot, unsigned pool);

/* --- history ring (header lock) ---------------------------------------------------------- */

/* Appends e (seq assigned here), overwriting the oldest entry when full. */
void keytable_history_add(struct keytable *t, const struct keytable_event *e);
/* The most recent entries, at most max, oldest first; returns how many. */
unsigned keytable_history_read(struct keytable *t, struct keytable_event *ret, unsigned max);
unsigned keytable_history_capacity(const struct keytable *t);

/* --- persistence --------------------------------------------------------------------------- */

/* Sets a key's state and counters (current bank, pool-relative position) from a saved state.
 * An impossible state is -EINVAL and changes nothing; a cooling key whose time has passed
 * becomes ready. */
int keytable_restore_key(struct keytable *t, unsigned pool, unsigned position,
                         const struct keytable_key_state *st, int64_t now_ms);

/* The configuration generation readers report (1 at start, +1 per reload): set by the
 * coordinator. */
void keytable_set_config_generation(struct keytable *t, unsigned generation);
unsigned keytable_config_generation(const struct keytable *t);

/* --- readers (any process) ------------------------------------------------------------------- */

/* All of the current bank, except keytable_slot_pool_info (the slot's bank). */

unsigned keytable_n_pools(const struct keytable *t);
unsigned keytable_n_keys(const struct keytable *t);
unsigned keytable_n_slots(const struct keytable *t);
int64_t keytable_created_ms(const struct keytable *t);
uint64_t keytable_repairs(const struct keytable *t);     /* EOWNERDEAD repairs done so far */

int keytable_pool_info(const struct keytable *t, unsigned pool, struct keytable_pool_view *ret);
/* The pool of the slot's bank: what a worker of any generation needs to map its leases. */
int keytable_slot_pool_info(const struct keytable *t, unsigned slot, unsigned pool,
                            struct keytable_pool_view *ret);
/* Copies the pool's keys under its lock. ret must hold the pool's n_keys entries; a reload
 * committed since keytable_pool_info was read can change them: keytable_pool_read is safe. */
int keytable_pool_snapshot(struct keytable *t, unsigned pool, int64_t now_ms,
                           struct keytable_key_view *ret);
/* The pool's view and its keys, both under one lock and from one bank, at most max keys.
 * Returns how many keys were written (the pool's n_keys), -EINVAL for a bad pool, or -ENOBUFS
 * (nothing written) when the pool has more than max keys. ret_info may be NULL. */
int keytable_pool_read(struct keytable *t, unsigned pool, int64_t now_ms,
                       struct keytable_pool_view *ret_info, struct keytable_key_view *ret_keys,
                       unsigned max);
/* keytable_pool_read into a malloc'ed array sized for the pool (retried if a reload grows it
 * meanwhile). Returns the number of keys and *ret_keys (free() it), or a negative errno. */
int keytable_pool_read_alloc(struct keytable *t, unsigned pool, int64_t now_ms,
                             struct keytable_pool_view *ret_info, struct keytable_key_view **ret_keys);
/* Copies the live (non-FREE) worker slots; returns how many, at most max. */
unsigned keytable_workers(struct keytable *t, struct keytable_worker_view *ret, unsigned max);

const char *keytable_state_name(enum key_state s);       /* "ready", "cooling", "disabled" */
const char *keytable_reason_name(enum key_reason r);     /* NULL for KEY_REASON_NONE */
const char *keytable_stage_name(enum worker_stage s);
const char *keytable_history_kind_name(enum history_kind k);    /* "rotate", "cooldown", … */

/* --- consistency check (tests, keypoolctl check) ------------------------------------------ */

#define KEYTABLE_CHECK_PROBLEMS_MAX 32
#define KEYTABLE_CHECK_TEXT_MAX     160

/* What keytable_check found. */
struct keytable_check_report {
        unsigned n_problems;            /* found; only the first KEYTABLE_CHECK_PROBLEMS_MAX are
                                         * written out */
        char problems[KEYTABLE_CHECK_PROBLEMS_MAX][KEYTABLE_CHECK_TEXT_MAX];
        unsigned pools, keys;           /* rows checked, both banks */
        unsigned by_state[_KEY_STATE_MAX];      /* the current bank's keys, by state */
        unsigned in_flight;             /* the current bank's in-flight requests (by the rows) */
        unsigned leases;                /* leases held, every slot */
        unsigned workers;               /* live (non-FREE) slots */
};

/* Checks, under the locks (the header's, then each pool's in turn), that the table agrees with
 * itself: every pool's rows lie in its bank and its range, states and reasons are possible, no
 * dirty marker is left set (none can be while the lock is free), every key's in_flight is the
 * number of leases naming it, FREE slots hold no lease, and a trusted choice index holds every
 * key where its row says (the list in acquire's order, the heap in order, the counts right).
 * Changes nothing and does no I/O. 0 with ret filled (ret->n_problems == 0: consistent), or
 * -ENOMEM. */
int keytable_check(struct keytable *t, struct keytable_check_report *ret);
/* --- cluster (cluster.c's process; any reader) ------------------------------------------------ */

#define KEYTABLE_NODES_MAX 32

/* Usage counters of one key row. */
struct keytable_usage {
        uint64_t requests, successes, rate_limited, failures, tokens_in, tokens_out;
};

/* A live node of the cluster and what it last reported. */
struct keytable_node {
        char name[KEYTABLE_NAME_MAX + 1];
        int64_t seen_wall_ms;           /* its last heartbeat, ms since the epoch */
        uint64_t requests, tokens_in, tokens_out;
        unsigned keys_ready, keys_cooling, keys_disabled;
        unsigned connected;             /* it talked to Redis when it reported (always 1 for
                                         * others: a report comes through Redis) */
};

struct keytable_cluster_view {
        bool enabled;                   /* cluster = { … } is configured */
        bool connected;                 /* the cluster process talks to Redis now */
        unsigned live_nodes;            /* as last seen, this one included (1 before any) */
        int64_t since_wall_ms;          /* when connected last changed, 0 never */
        char node[KEYTABLE_NAME_MAX + 1];
        unsigned n_nodes;
        struct keytable_node nodes[KEYTABLE_NODES_MAX];
};

/* Coordinator, before the first fork: clustering is on and this host is node. */
void keytable_cluster_init(struct keytable *t, const char *node);
/* The cluster process: whether it talks to Redis, and how many nodes it last saw (0: keep). */
void keytable_cluster_set_link(struct keytable *t, bool connected, unsigned live_nodes, int64_t wall_ms);
void keytable_cluster_set_nodes(struct keytable *t, const struct keytable_node *nodes, unsigned n);
/* A copy of what the cluster process keeps; enabled false when clustering is off. */
void keytable_cluster_read(struct keytable *t, struct keytable_cluster_view *ret);

/* The history entries the cluster process has published (its cursor survives its restarts). */
uint64_t keytable_cluster_cursor(struct keytable *t);
void keytable_cluster_set_cursor(struct keytable *t, uint64_t seq);
/* The newest history seq, read without the lock. */
uint64_t keytable_history_seq(const struct keytable *t);
/* History entries after seq after, oldest first, at most max; *ret_lost is how many were
 * overwritten before they could be read. */
unsigned keytable_history_since(struct keytable *t, uint64_t after, struct keytable_event *ret,
                                unsigned max, uint64_t *ret_lost);

/* Applies a state another node saw to every row of key id (both banks): state KEY_COOLING until
 * until_ms (monotonic, here) when that is later than the row's own rest and the row is not
 * disabled; KEY_DISABLED with reason; KEY_READY ends a rest or a disable. No history entry is
 * written: the caller adds one naming the node. Returns how many rows changed, and the first
 * changed row's pool name in ret_pool (may be NULL; size KEYTABLE_NAME_MAX + 1). */
int keytable_cluster_apply(struct keytable *t, const char *id, enum key_state state,
                           enum key_reason reason, int64_t until_ms, int64_t now_ms, char *ret_pool);
/* The other nodes' counters for the row of position in pool (current bank); read them back with
 * keytable_cluster_usage (key: table-wide row). */
int keytable_cluster_set_usage(struct keytable *t, unsigned pool, unsigned position,
                               const struct keytable_usage *others);
int keytable_cluster_usage(struct keytable *t, unsigned key, struct keytable_usage *ret);

/* Cluster budgets leased from Redis (key: table-wide row). A row under leases keeps the
 * cluster-wide max_concurrent and rpm as its limits and serves only within what this host holds:
 * in_flight below its slots, and a request only while its rpm slice is not empty. Every change
 * moves the row in the choice index; wake the workers after one that lets a row serve. */
struct keytable_lease_view {
        bool on;
        bool ready;                     /* the row's state is ready */
        unsigned in_flight;
        unsigned slots;                 /* concurrency slots held */
        unsigned left;                  /* requests left in the rpm slice */
        uint64_t requests;              /* acquires so far on this host: its use */
};
int keytable_cluster_lease_read(struct keytable *t, unsigned key, struct keytable_lease_view *ret);
/* Leases on (limits: the cluster-wide ones), with nothing held yet; or off, back to local limits
 * (the static share), as keytable_set_key_limits, which also ends leases. */
int keytable_cluster_lease_mode(struct keytable *t, unsigned key, bool on, unsigned max_concurrent,
                                unsigned rpm, int64_t now_ms);
/* Adds n requests to the rpm slice. */
int keytable_cluster_lease_add(struct keytable *t, unsigned key, unsigned n, int64_t now_ms);
/* Takes back up to n requests of the slice, so that no worker uses them: how many were taken
 * (for the caller to return to Redis), or a negative errno. */
int keytable_cluster_lease_take(struct keytable *t, unsigned key, unsigned n, int64_t now_ms);
/* Holds slots, or, with at_least_in_flight, never fewer than are in flight (a lowering must not
 * let Redis hand out a slot still in use here): how many are held now, or a negative errno. */
int keytable_cluster_lease_slots(struct keytable *t, unsigned key, unsigned slots,
                                 bool at_least_in_flight, int64_t now_ms);
/* True when a request on this host waits for a key of pool (current bank): demand for leases. */
bool keytable_cluster_pool_waiting(struct keytable *t, unsigned pool, int64_t now_ms);

/* --- tests only ------------------------------------------------------------------------------ */

/* Simulates a process that dies mid-update: locks the pool (relative to key's bank), marks key
 * dirty, scribbles an impossible state and a phantom in-flight count on it, and returns still
 * holding the lock. The caller is expected to exit without unlocking. */
int keytable_test_die_holding_lock(struct keytable *t, unsigned pool, unsigned key);
