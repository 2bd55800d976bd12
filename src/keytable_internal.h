/* keytable_internal.h — what the files of the key table module share, and nothing else.
 *
 * Private to src/keytable*.c (and the module's own unit tests): the layout of the shared segment,
 * the process-local handle on it, and the small helpers every part uses. The public face of the
 * module stays include/keypool/keytable.h. Functions here carry the kt_ prefix; the ones on the
 * hot path (locking, bank arithmetic, GCRA) are static inline, since libkeypool is built without
 * LTO and a call across files would not be inlined otherwise.
 *
 * The parts: keytable.c (segment, locks and repair, banks), keytable_index.c (the choice index),
 * keytable_keys.c (acquire, release, probes, operator actions, restore), keytable_slots.c
 * (worker scoreboard, history ring), keytable_views.c (read-only views and names).
 */
#pragma once

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#include "keypool/keytable.h"

#define KT_MAGIC   UINT64_C(0x6b6579706f6f6c31)    /* "keypool1" */
#define KT_VERSION 8u
#define KT_BANKS   2u
#define KT_ALIGN   64u                             /* a cache line: rows locked apart stay apart */

/* Keys rate limited within this long of each other look like one account- or IP-wide limit. */
#define KT_ACCOUNT_WINDOW_MS 1000

/* GCRA works in µs: a whole minute split rpm ways stays exact enough for any rpm. */
#define KT_MINUTE_US INT64_C(60000000)

#define KT_HISTORY_DEFAULT 1024u

#define KT_NIL UINT32_MAX                          /* no key: an end of the list, not in the heap */

/* What the cluster process (cluster.c) keeps for the readers: whether it talks to Redis, and the
 * live nodes it last saw with what each reported. Written by the cluster process alone, under the
 * header lock, so a reader copies one consistent picture. Zero: clustering is off. */
struct kt_cluster {
        uint32_t enabled;
        uint32_t connected;
        uint32_t live_nodes;                    /* last seen, this one included; 0 never seen */
        uint32_t n_nodes;
        int64_t since_wall_ms;                  /* when connected last changed */
        uint64_t published_seq;                 /* history entries up to this one are out */
        char node[KEYTABLE_NAME_MAX + 1];       /* this host's name */
        struct keytable_node nodes[KEYTABLE_NODES_MAX];
};

/* Read field by field with atomic loads: written once before the first fork, perhaps again on
 * reload, and a reader mixing two versions of it gets two sane policies' fields. */
struct kt_policy {
        uint32_t cooldown_scope_key;
        uint32_t transient_threshold;
        uint32_t probe_auth;
        int64_t transient_cooldown_ms;
        int64_t probe_interval_ms;
};

struct kt_header {
        uint64_t magic;
        uint32_t version;
        uint32_t max_pools, max_keys, n_slots, leases_per_slot;    /* rows per bank */
        uint32_t bank;                          /* atomic: the current bank */
        uint32_t fill;                          /* the bank add_pool/add_key write into: the
                                                 * current one, or the other during a reload */
        uint32_t n_pools[KT_BANKS], n_keys[KT_BANKS];   /* atomic: any process may look */
        uint64_t size;
        uint64_t off_pools, off_keys, off_slots, off_leases, off_history, off_links, off_due,
                 off_tickets;
        int64_t created_ms;
        uint64_t repairs;                       /* atomic: bumped under pool locks too */
        struct kt_policy policy;
        uint32_t config_generation;             /* atomic */
        uint32_t history_size;                  /* ring entries */
        /* Entries ever appended: the one number that says where the ring's head is and how
         * full it is, so an append commits with a single store. Entry n (1-based) lives at
         * (n - 1) % history_size. */
        uint64_t history_seq;
        uint32_t history_dirty;                 /* an append is between its first write and
                                                 * its commit */
        /* atomic: an upper bound on the slots whose waiters are not 0 (raised before a slot's
         * waiters leave 0, lowered after they return to it), so that a worker that finds it 0
         * skips kt_fifo_yields' scan of every slot on each acquire. A worker that dies between
         * the two steps leaves it too high, which only costs scans. */
        uint32_t waiting_slots;
        pthread_mutex_t lock;                   /* banks, counts, slot claim/free, policy,
                                                 * history, cluster */
        struct kt_cluster cluster;
};

struct kt_pool {
        pthread_mutex_t lock;
        char name[KEYTABLE_NAME_MAX + 1];
        char model[KEYTABLE_MODEL_MAX + 1];
        uint32_t first_key, n_keys;             /* table-wide rows, within the pool's bank */
        uint64_t use_seq;                       /* bumped per acquire: the LRU clock */
        int64_t account_limit_until_ms;         /* atomic: readers may look without the lock */
        uint32_t dirty;
        /* Observations, added to with atomics and no lock: a worker that dies mid-add loses
         * at most its own one. */
        uint64_t rotations;
        uint64_t latency_buckets[KEYTABLE_LATENCY_BUCKETS];
        uint64_t latency_sum_ms;                /* the count is the buckets' sum, so the two
                                                 * always agree */
        /* The choice index, trusted only while index_valid (see the top of this file): */
        uint32_t index_valid;
        uint32_t head, tail;                    /* the list of keys that can serve, KT_NIL: none */
        uint32_t n_due;                         /* heap entries, in the pool's range of due[] */
        uint32_t n_full;                        /* keys that serve once a request comes back */
        /* No key on the list or full, when its rpm counts, was let in later than this: a
         * request timed before it (another worker's clock read a moment earlier) must look at
         * the rows, as the index only moves forward in time. */
        int64_t gcra_since_ms;
        /* Waiting in arrival order across workers (keytable_fifo.c): the last ticket handed
         * out to a waiter of this pool, taken with an atomic add and no lock. */
        uint64_t ticket_seq;
} __attribute__((aligned(KT_ALIGN)));

/* state, reason and last_class are stored as plain integers: a dead writer may leave any value
 * in them, and repair has to be able to look at it without trusting it to be an enum member. */
struct kt_key {
        char id[KEYID_ID_LEN + 1];
        char masked[KEYID_MASK_MAX + 1];
        uint32_t pool;                          /* table-wide pool row, in the key's bank */
        uint32_t state, reason;
        uint32_t dirty;
        uint32_t in_flight, consecutive_failures;
        int32_t last_status;
        uint32_t last_class;
        int64_t cooldown_until_ms, last_used_ms;
        uint64_t use_seq;                       /* pool's use_seq at last acquire; 0 = never */
        uint64_t requests, successes, rate_limited, failures, tokens_in, tokens_out;
        uint32_t max_concurrent, rpm;           /* 0: no limit */
        int64_t tat_us;                         /* GCRA theoretical arrival time, 0 = never */
        int64_t cooling_since_ms;               /* entered its current rate-limit cooldown */
        int64_t next_probe_ms;                  /* disabled and probed: when next; else 0 */
        int64_t figures_ms;
        struct rate_figures figures;
        uint32_t twin;                          /* atomic: next row with this id; itself if none */
        uint64_t by_class[_VERDICT_MAX];
        char last_error[KEYTABLE_ERROR_MAX + 1];
        struct keytable_usage others;           /* the other nodes' counters for this row, as
                                                 * the cluster process last summed them */
        /* Cluster budgets leased from Redis (keytable_cluster.c): while lease_on, the row serves
         * only within what this host holds, lease_slots requests at once (max_concurrent set)
         * and lease_left more requests (rpm set); the limits above stay the cluster-wide ones. */
        uint32_t lease_on, lease_slots, lease_left;
};

/* Where a key stands in its pool's choice index. */
enum kt_place {
        KT_NOWHERE = 0,                         /* disabled (or a row being repaired) */
        KT_LISTED,                              /* can serve now */
        KT_DUE,                                 /* can serve from its heap entry's time on */
        KT_FULL,                                /* can serve once one of its requests is back */
};

/* A key's links in the choice index, apart from its row so walking the index stays within a few
 * cache lines. Indexed by table-wide key row. */
struct kt_link {
        uint64_t use_seq;                       /* on the list: the row's, so a walk reads no row */
        uint32_t prev, next;                    /* on the list: table-wide rows or KT_NIL */
        uint32_t heap_at;                       /* in the heap: its place there */
        uint32_t place;                         /* enum kt_place */
};

/* A heap entry: a pool's heap lives in due[first_key, first_key + n_keys), so it never needs
 * more room than the pool has keys. */
struct kt_due {
        int64_t at_ms;
        uint32_t key;
        uint32_t unused;
};

/* A history entry as stored: kind and reason as plain integers, for the same reason as a key
 * row's state. seq is written last, and 0 while the entry is being written, so an entry whose
 * seq is not the one its place in the ring calls for is no entry. */
struct kt_event {
        uint64_t seq;
        int64_t wall_ms;
        int64_t cooldown_ms;
        uint32_t kind, reason;
        int32_t status;
        char pool[KEYTABLE_NAME_MAX + 1];
        char key_from[KEYID_ID_LEN + 1];
        char key_to[KEYID_ID_LEN + 1];
        char node[KEYTABLE_NAME_MAX + 1];
};

/* Written by the owning worker with atomic stores and no lock; claimed and freed under the
 * header lock, with stage written last on claim so a reader never sees a half-claimed slot. */
struct kt_slot {
        uint32_t stage;
        uint32_t generation;
        uint32_t bank;                          /* current when claimed; its acquires use it */
        int32_t pid;
        uint32_t lease_hint;                    /* where the next free-lease search starts */
        uint32_t waiters;                       /* requests the owner has waiting for a key */
        int64_t started_ms, heartbeat_ms;
        uint64_t requests;
        uint64_t lag_buckets[KEYTABLE_LAG_BUCKETS];     /* never reset: see keytable_slot_observe_lag */
        uint64_t lag_sum_usec, lag_count;
} __attribute__((aligned(KT_ALIGN)));

struct keytable {
        void *base;
        size_t size;
        struct kt_header *hdr;
        struct kt_pool *pools;
        struct kt_key *keys;
        struct kt_slot *slots;
        uint32_t *leases;
        struct kt_event *history;
        struct kt_link *links;
        struct kt_due *due;
        uint64_t *tickets;                      /* per slot, per pool of its bank: the ticket
                                                 * of its oldest waiter, 0 none */
        unsigned max_pools, max_keys, n_slots, leases_per_slot;    /* per bank */
        unsigned history_size;
        /* Process-local, used by keytable_add_key only (the coordinator's): per bank, open
         * addressing from an id to the first row of that bank carrying it (row + 1; 0 empty),
         * so finding a key's twins, or its row in the current bank, costs no scan. A bank's
         * index is emptied when the bank is (re)filled. */
        uint32_t *id_index[KT_BANKS];
        size_t id_index_mask;
};


/* --- small helpers ------------------------------------------------------------------------- */

#define KT_LOAD(p)     __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define KT_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* A process can be killed between any two instructions, so the dirty marker must really be
 * written before the row and cleared after it, in program order: the compiler may not move the
 * row's stores across it. Other processes see the row only through the mutex. */
static inline void kt_mark(uint32_t *marker, uint32_t v) {
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        __atomic_store_n(marker, v, __ATOMIC_RELAXED);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static inline unsigned kt_bank_current(const struct keytable *t) {
        return KT_LOAD(&t->hdr->bank) & 1u;
}

static inline unsigned kt_bank_fill(const struct keytable *t) {
        return KT_LOAD(&t->hdr->fill) & 1u;
}

static inline unsigned kt_slot_bank(const struct keytable *t, unsigned slot) {
        return KT_LOAD(&t->slots[slot].bank) & 1u;
}

static inline unsigned kt_bank_n_pools(const struct keytable *t, unsigned b) {
        unsigned n = KT_LOAD(&t->hdr->n_pools[b]);

        return n < t->max_pools ? n : t->max_pools;
}

static inline unsigned kt_bank_n_keys(const struct keytable *t, unsigned b) {
        unsigned n = KT_LOAD(&t->hdr->n_keys[b]);

        return n < t->max_keys ? n : t->max_keys;
}

static inline unsigned kt_bank_first_pool(const struct keytable *t, unsigned b) {
        return b * t->max_pools;
}

static inline unsigned kt_bank_first_key(const struct keytable *t, unsigned b) {
        return b * t->max_keys;
}

/* Is p a pool row that exists in its bank? */
static inline bool kt_pool_row_valid(const struct keytable *t, unsigned p) {
        return p < KT_BANKS * t->max_pools &&
               p % t->max_pools < kt_bank_n_pools(t, p / t->max_pools);
}

/* Is k a key row that exists in its bank, and does its pool row exist in the same bank? */
static inline bool kt_key_row_valid(const struct keytable *t, unsigned k) {
        unsigned b, p;

        if (k >= KT_BANKS * t->max_keys)
                return false;
        b = k / t->max_keys;
        if (k % t->max_keys >= kt_bank_n_keys(t, b))
                return false;
        p = t->keys[k].pool;
        return kt_pool_row_valid(t, p) && p / t->max_pools == b;
}

static inline uint64_t *kt_slot_tickets(const struct keytable *t, unsigned slot) {
        return t->tickets + (size_t) slot * t->max_pools;
}

static inline uint32_t *kt_slot_leases(const struct keytable *t, unsigned slot) {
        return t->leases + (size_t) slot * t->leases_per_slot;
}

static inline bool kt_key_state_valid(uint32_t s) {
        return s > KEY_STATE_INVALID && s < _KEY_STATE_MAX;
}

static inline int64_t kt_add_sat(int64_t a, int64_t b) {
        int64_t r;

        if (__builtin_add_overflow(a, b, &r))
                return b > 0 ? INT64_MAX : INT64_MIN;
        return r;
}

static inline int64_t kt_ms_to_us(int64_t ms) {
        int64_t r;

        if (__builtin_mul_overflow(ms, INT64_C(1000), &r))
                return ms > 0 ? INT64_MAX : INT64_MIN;
        return r;
}

static inline void kt_policy_load(const struct keytable *t, struct keytable_policy *ret) {
        const struct kt_policy *p = &t->hdr->policy;

        *ret = (struct keytable_policy) {
                .cooldown_scope_key = KT_LOAD(&p->cooldown_scope_key) != 0,
                .transient_threshold = KT_LOAD(&p->transient_threshold),
                .transient_cooldown_ms = KT_LOAD(&p->transient_cooldown_ms),
                .probe_interval_ms = KT_LOAD(&p->probe_interval_ms),
                .probe_auth = KT_LOAD(&p->probe_auth) != 0,
        };
}

/* When a key disabled for reason is probed next, or 0 when it is left to the operator. */
static inline int64_t kt_probe_time(const struct keytable_policy *pol, uint32_t reason,
                                    int64_t now_ms) {
        if (pol->probe_interval_ms <= 0)
                return 0;
        if (reason == KEY_REASON_QUOTA || (reason == KEY_REASON_AUTH && pol->probe_auth))
                return kt_add_sat(now_ms, pol->probe_interval_ms);
        return 0;
}

/* Pool row p's key range, clamped to the keys that exist in its bank. */
static inline void kt_pool_range(const struct keytable *t, unsigned p, unsigned *ret_first,
                                 unsigned *ret_end) {
        const struct kt_pool *pool = &t->pools[p];
        unsigned b = p / t->max_pools, lo = kt_bank_first_key(t, b), hi = lo + kt_bank_n_keys(t, b),
                 first = pool->first_key, end;

        /* Written once per fill: out of the bank means a broken row, which owns no keys. */
        if (first < lo || first > hi)
                first = hi;
        end = pool->n_keys > hi - first ? hi : first + pool->n_keys;
        *ret_first = first;
        *ret_end = end;
}

/* A stored history entry as readers get it; the caller has checked src->seq == seq and the kind. */
static inline void kt_event_copy(const struct kt_event *src, uint64_t seq, struct keytable_event *e) {
        *e = (struct keytable_event) {
                .seq = seq,
                .wall_ms = src->wall_ms,
                .kind = src->kind,
                .status = src->status,
                .reason = src->reason < _KEY_REASON_MAX ? src->reason : KEY_REASON_NONE,
                .cooldown_ms = src->cooldown_ms,
        };
        __builtin_memcpy(e->pool, src->pool, sizeof e->pool - 1);
        __builtin_memcpy(e->key_from, src->key_from, sizeof e->key_from - 1);
        __builtin_memcpy(e->key_to, src->key_to, sizeof e->key_to - 1);
        __builtin_memcpy(e->node, src->node, sizeof e->node - 1);
}

/* A row becomes ready, as an operator's enable makes it: no rest, no probe, no failure streak.
 * The caller holds the pool lock and has marked the row dirty. */
static inline void kt_key_set_ready(struct kt_key *row) {
        row->state = KEY_READY;
        row->reason = KEY_REASON_NONE;
        row->consecutive_failures = 0;
        row->next_probe_ms = 0;
        row->cooldown_until_ms = 0;
        row->cooling_since_ms = 0;
}

/* --- locking ------------------------------------------------------------------------------- */

/* Lock order: header before pool, never two pools at once. A lock its holder died with is
 * repaired by the next locker (keytable.c), in the cold path below. */
void kt_header_lock_abandoned(const struct keytable *t, int r) __attribute__((cold));
void kt_pool_lock_abandoned(const struct keytable *t, unsigned p, int r) __attribute__((cold));

static inline void kt_unlock(pthread_mutex_t *m) {
        if (pthread_mutex_unlock(m) != 0)
                abort();
}

static inline void kt_header_lock(const struct keytable *t) {
        int r = pthread_mutex_lock(&t->hdr->lock);

        if (__builtin_expect(r != 0, 0))
                kt_header_lock_abandoned(t, r);
}

static inline void kt_header_unlock(const struct keytable *t) {
        kt_unlock(&t->hdr->lock);
}

static inline void kt_pool_lock(const struct keytable *t, unsigned p) {
        int r = pthread_mutex_lock(&t->pools[p].lock);

        if (__builtin_expect(r != 0, 0))
                kt_pool_lock_abandoned(t, p, r);
}

static inline void kt_pool_unlock(const struct keytable *t, unsigned p) {
        kt_unlock(&t->pools[p].lock);
}

/* --- key rows -------------------------------------------------------------------------------- */

/* Locks the pool of key (a table-wide row, either bank) and checks the key is in it; -EINVAL
 * (nothing locked) if not. ret_position (may be NULL): the key's place in its pool. */
int kt_key_lock(const struct keytable *t, unsigned key, unsigned *ret_pool, unsigned *ret_position);

/* --- key rows: rests and rates (used by the index and by acquire/release) ------------------- */

/* Ends a cooldown that has run out. The caller holds the pool lock and has marked the pool, but
 * not the row. */
static inline void kt_key_recover_if_due(struct kt_key *key, unsigned k, int64_t now_ms,
                                         struct keytable_change *change) {
        if (key->state != KEY_COOLING || key->cooldown_until_ms > now_ms)
                return;
        kt_mark(&key->dirty, 1);
        key->state = KEY_READY;
        key->reason = KEY_REASON_NONE;
        key->cooldown_until_ms = 0;
        key->cooling_since_ms = 0;
        /* A rest ends the run of failures that may have caused it: cooling the key again for
         * failures takes a whole new run. */
        key->consecutive_failures = 0;
        kt_mark(&key->dirty, 0);
        if (change && !change->changed)
                *change = (struct keytable_change) {
                        .changed = true,
                        .key = k,
                        .from = KEY_COOLING,
                        .to = KEY_READY,
                        .reason = KEY_REASON_NONE,
                };
}

/* At its concurrency limit, or, under cluster leases, out of its slots or its rpm slice: such
 * a row serves again on a release or when the cluster process leases it more. */
static inline bool kt_key_full(const struct kt_key *key) {
        if (key->lease_on)
                return (key->max_concurrent > 0 && key->in_flight >= key->lease_slots) ||
                       (key->rpm > 0 && key->lease_left == 0);
        return key->max_concurrent > 0 && key->in_flight >= key->max_concurrent;
}

/* GCRA with emission interval T = a minute / rpm and burst tolerance a minute - T: up to rpm
 * requests pass at once, then one every T, and one timestamp per key is all it keeps. False with
 * the earliest ms a request passes when none may now. */
static inline int64_t kt_gcra_interval_us(const struct kt_key *key) {
        int64_t t_us = KT_MINUTE_US / key->rpm;

        return t_us > 0 ? t_us : 1;
}

static inline bool kt_gcra_allows(const struct kt_key *key, int64_t now_ms, int64_t *ret_at_ms) {
        int64_t tol_us, earliest_us;

        if (key->rpm == 0)
                return true;
        tol_us = KT_MINUTE_US - kt_gcra_interval_us(key);
        if (key->tat_us <= kt_add_sat(kt_ms_to_us(now_ms), tol_us))
                return true;
        earliest_us = key->tat_us - tol_us;
        /* Rounded up: at the ms given the request really passes. */
        *ret_at_ms = earliest_us / 1000 + (earliest_us % 1000 > 0);
        return false;
}

static inline void kt_gcra_take(struct kt_key *key, int64_t now_ms) {
        int64_t now_us = kt_ms_to_us(now_ms);

        if (key->rpm == 0)
                return;
        key->tat_us = kt_add_sat(key->tat_us > now_us ? key->tat_us : now_us,
                                 kt_gcra_interval_us(key));
}

/* --- the choice index (keytable_index.c) ----------------------------------------------------
 *
 * All under the pool's lock, with the pool marked dirty; p is a table-wide pool row and k a
 * table-wide key row of it. */

/* The next kt_index_choose rebuilds the pool's index from its rows. */
static inline void kt_index_stale(const struct keytable *t, unsigned p) {
        t->pools[p].index_valid = 0;
}

/* Builds pool p's index from its rows as they stand at now_ms: O(n log n). */
void kt_index_rebuild(const struct keytable *t, unsigned p, int64_t now_ms);
/* The key acquire takes at now_ms, or UINT_MAX with wait filled (retry time, busy). Ends the rests
 * that are over on the way: the earliest such row is reported in change. wait starts zeroed. */
unsigned kt_index_choose(const struct keytable *t, unsigned p, int64_t now_ms, unsigned avoid_key,
                         struct keytable_wait *wait, struct keytable_change *change);
/* The same choice from the rows alone, O(n), with no trust in the index: the fallback, and the
 * rule the index stands for. */
unsigned kt_index_scan(const struct keytable *t, unsigned p, int64_t now_ms, unsigned avoid_key,
                       struct keytable_wait *wait, struct keytable_change *change);
/* After acquire took k (its use_seq bumped): k goes to the tail if it still serves. */
void kt_index_taken(const struct keytable *t, unsigned p, uint32_t k, int64_t now_ms);
/* After a change to row k (its state, rest, in-flight count): moves it to where it now belongs. */
void kt_index_update(const struct keytable *t, unsigned p, uint32_t k, int64_t now_ms);
/* True when the index is trusted and no rest or rpm wait of the pool is over at now_ms. */
bool kt_index_none_due(const struct keytable *t, unsigned p, int64_t now_ms);
/* True when the index is trusted and says some key of the pool is ready at now_ms. */
bool kt_index_some_key_serves(const struct keytable *t, unsigned p, int64_t now_ms);

/* --- waiting in arrival order (keytable_fifo.c) --------------------------------------------- */

/* True when a waiter of another live worker of the same bank holds a ticket of pool p (a
 * table-wide row) older than ticket (0: a request that never waited, younger than every
 * ticket): the key a caller with ticket could take now is that waiter's to take first. */
bool kt_fifo_yields(const struct keytable *t, unsigned slot, unsigned p, uint64_t ticket,
                    int64_t now_ms);
/* A slot's published tickets are forgotten (claim, release); the caller holds the header lock. */
void kt_fifo_slot_clear(const struct keytable *t, unsigned slot);

/* --- carrying the old generation's news (keytable.c) ---------------------------------------- */

/* After a change to key row k of a bank that is no longer current (the old generation learned
 * it while draining): the current bank's row of the same key takes the same rest or disable, so
 * the new generation does not walk into it again. Takes the pool locks itself, one at a time.
 * Returns the current bank's row, or KEYTABLE_NO_KEY when the key is not in it. */
unsigned kt_carry_forward(struct keytable *t, unsigned k, int64_t now_ms);
