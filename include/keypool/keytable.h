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
 * Times are CLOCK_MONOTONIC milliseconds (the same clock in every process), passed in by the
 * caller so tests can drive the clock.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "keypool/keyid.h"
#include "keypool/verdict.h"

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

struct keytable_limits {
        unsigned max_pools;
        unsigned max_keys;
        unsigned n_slots;               /* worker slots (live workers of all generations) */
        unsigned leases_per_slot;       /* requests one worker may have in flight */
};

/* A key held by one request of one worker. */
struct keytable_lease {
        unsigned pool;
        unsigned key;                   /* table-wide key index */
        unsigned slot;
        unsigned index;                 /* position in the slot's lease array */
};

/* What an upstream attempt did, to be recorded on the key. */
struct keytable_outcome {
        enum verdict_class cls;         /* VERDICT_NONE: released without an answer (aborted) */
        int status;                     /* HTTP status, 0 when none */
        int64_t rest_ms;                /* for VERDICT_RATE_LIMITED */
        uint64_t tokens_in, tokens_out;
};

/* A state change made by a release or an acquire, to be logged outside the lock. */
struct keytable_change {
        bool changed;
        unsigned key;
        enum key_state from, to;
        enum key_reason reason;
        int64_t until_ms;               /* for KEY_COOLING */
};

struct keytable_key_view {
        char id[KEYID_ID_LEN + 1];
        char masked[KEYID_MASK_MAX + 1];
        unsigned pool;
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
};

struct keytable_pool_view {
        char name[KEYTABLE_NAME_MAX + 1];
        char model[KEYTABLE_MODEL_MAX + 1];
        unsigned first_key, n_keys;
};

struct keytable_worker_view {
        unsigned slot;
        pid_t pid;
        unsigned generation;
        enum worker_stage stage;
        int64_t started_ms, heartbeat_ms;
        uint64_t requests;
        unsigned in_flight;             /* leases held */
};

/* --- coordinator: creation, before the first fork ------------------------------------------- */

/* Creates, maps and unlinks an anonymous-named shm segment sized for limits (so nothing is left
 * in /dev/shm whatever happens to the process). */
int keytable_create(const struct keytable_limits *limits, int64_t now_ms, struct keytable **ret);
void keytable_destroy(struct keytable *t);              /* unmaps; NULL is fine */

/* Pools are filled in order; a pool's keys are added right after it. -ENOSPC past the limits,
 * -ENAMETOOLONG for over-long names. */
int keytable_add_pool(struct keytable *t, const char *name, const char *model, unsigned *ret_pool);
int keytable_add_key(struct keytable *t, unsigned pool, const char *id, const char *masked,
                     unsigned *ret_key);

/* --- coordinator: worker slots ------------------------------------------------------------- */

/* Reserves a free slot for a worker about to be forked (stage STARTING). -EBUSY when none. */
int keytable_slot_claim(struct keytable *t, unsigned generation, int64_t now_ms, unsigned *ret_slot);
void keytable_slot_set_pid(struct keytable *t, unsigned slot, pid_t pid);
/* After the worker in slot has died: returns its leases (in-flight counts) and frees the slot.
 * Safe to call whatever state the dead worker left. */
void keytable_slot_release(struct keytable *t, unsigned slot);

/* --- worker ---------------------------------------------------------------------------------- */

void keytable_slot_set_stage(struct keytable *t, unsigned slot, enum worker_stage stage);
void keytable_slot_heartbeat(struct keytable *t, unsigned slot, int64_t now_ms);
void keytable_slot_count_request(struct keytable *t, unsigned slot);

/* Picks the pool's ready key used least recently (on a tie, the earlier in the list, so the
 * primary goes first), counts a request and an in-flight lease on it. A cooling key whose time has
 * passed becomes ready again (reported in ret_change when not NULL).
 * Returns 0 and writes ret_lease; -EAGAIN when no key is ready, with *ret_retry_at_ms the
 * earliest time a cooling key recovers (0 when no key is cooling: all disabled); -ENOSPC when the
 * slot holds leases_per_slot leases already. */
int keytable_acquire(struct keytable *t, unsigned slot, unsigned pool, int64_t now_ms,
                     struct keytable_lease *ret_lease, int64_t *ret_retry_at_ms,
                     struct keytable_change *ret_change);

/* Records the outcome on the key and returns the lease. VERDICT_RATE_LIMITED cools the key for
 * rest_ms, VERDICT_AUTH and VERDICT_QUOTA disable it (reason auth/quota), VERDICT_OK resets its
 * consecutive failures, VERDICT_TRANSIENT counts one, VERDICT_CALLER and VERDICT_NONE change
 * nothing but the in-flight count. ret_change may be NULL. */
void keytable_release(struct keytable *t, const struct keytable_lease *lease,
                      const struct keytable_outcome *o, int64_t now_ms,
                      struct keytable_change *ret_change);

/* --- readers (any process) ------------------------------------------------------------------- */

unsigned keytable_n_pools(const struct keytable *t);
unsigned keytable_n_keys(const struct keytable *t);
unsigned keytable_n_slots(const struct keytable *t);
int64_t keytable_created_ms(const struct keytable *t);
uint64_t keytable_repairs(const struct keytable *t);     /* EOWNERDEAD repairs done so far */

int keytable_pool_info(const struct keytable *t, unsigned pool, struct keytable_pool_view *ret);
/* Copies the pool's keys under its lock. ret must hold the pool's n_keys entries. */
int keytable_pool_snapshot(struct keytable *t, unsigned pool, int64_t now_ms,
                           struct keytable_key_view *ret);
/* Copies the live (non-FREE) worker slots; returns how many, at most max. */
unsigned keytable_workers(struct keytable *t, struct keytable_worker_view *ret, unsigned max);

const char *keytable_state_name(enum key_state s);       /* "ready", "cooling", "disabled" */
const char *keytable_reason_name(enum key_reason r);     /* NULL for KEY_REASON_NONE */
const char *keytable_stage_name(enum worker_stage s);

/* --- tests only ------------------------------------------------------------------------------ */

/* Simulates a process that dies mid-update: locks the pool, marks key dirty, scribbles an
 * impossible state and a phantom in-flight count on it, and returns still holding the lock. The
 * caller is expected to exit without unlocking. */
int keytable_test_die_holding_lock(struct keytable *t, unsigned pool, unsigned key);
