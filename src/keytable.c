/* keytable.c — the shared key table.
 *
 * Owns the POSIX shared-memory segment that every keypoold process maps: key health and
 * counters, the pool locks, the worker scoreboard with each worker's leases, and the rotation
 * history ring. Nothing here does I/O while a lock is held, nothing here knows about HTTP or
 * libcurl, and secrets never enter this memory.
 *
 * Layout: a header, then the pool rows, key rows, worker slots, lease arrays and history ring,
 * located by offsets stored in the header (never pointers: the segment is one mapping, inherited
 * by fork at the same address, but its contents must not depend on that). The process-local
 * struct keytable caches the array addresses and the limits, so a scribbled header can never send
 * this process out of bounds.
 *
 * The leases are the truth about in-flight requests: a worker's slot holds one entry per request
 * in flight (key index + 1; 0 is free). A key's in_flight is a cache of how many lease entries
 * name it, and is rebuilt from them whenever a lock is found abandoned.
 *
 * Two banks of pool and key rows share the slots and leases: bank b's pools are rows
 * [b * max_pools, (b + 1) * max_pools) and its keys [b * max_keys, (b + 1) * max_keys), so a
 * lease (a table-wide key row) says by itself which bank it is in. A reload fills the bank that
 * is not current while the current one serves, then switches with one store under the header
 * lock. A bank is only refilled once no live slot uses it, so rows that someone may still hold
 * never change under them; pool and key rows (pool, first_key, id, twin) are written once per
 * fill and read without locks after that. Internally every pool index is a table-wide row;
 * callers' pool indices are relative to a bank and translated at the edge.
 *
 * Rows of the same key id in different pools of one bank are linked in a circle (twin), built
 * when keys are added and never changed after, so a rate limit can cool every row of a key one
 * pool lock at a time. The table-wide policy lives in the header, written before the first fork
 * and read with atomic loads, never under a lock.
 *
 * The choice index: so that picking a key costs the same for ten keys or a hundred thousand,
 * each pool keeps, beside its rows and under its lock, where every key stands. Keys that can serve
 * now (ready, within their rpm, below their max_concurrent) are on a doubly linked list in the
 * order acquire takes them (use_seq, then row); keys that can serve from a known time on (cooling
 * until then, or out of their rpm until then) are in a min-heap by that time; keys that are only
 * full are counted. Acquire takes the list's head, after moving every heap entry that is due onto
 * the list, so it makes the choice the old scan of every row made. Each change to a row that moves
 * it between these places updates the index at once (O(1) or O(log n)); rare changes (loading a
 * bank, limits, a dead worker's leases, repair) just mark it stale, and the next acquire rebuilds
 * it from the rows (one pass and a sort). The rows stay the truth: a repair always rebuilds the
 * index. One walk is not O(1): a key whose rest ends goes back at its LRU place, found from both
 * ends of the list, which is a step or two unless its rest lasted about half a round of the pool.
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keypool/keytable.h"

#define KT_MAGIC   UINT64_C(0x6b6579706f6f6c31)    /* "keypool1" */
#define KT_VERSION 5u
#define KT_BANKS   2u
#define KT_ALIGN   64u                             /* a cache line: rows locked apart stay apart */

/* Keys rate limited within this long of each other look like one account- or IP-wide limit. */
#define KT_ACCOUNT_WINDOW_MS 1000

/* GCRA works in µs: a whole minute split rpm ways stays exact enough for any rpm. */
#define KT_MINUTE_US INT64_C(60000000)

#define KT_HISTORY_DEFAULT 1024u

#define KT_NIL UINT32_MAX                          /* no key: an end of the list, not in the heap */

const int64_t keytable_latency_bounds_ms[KEYTABLE_LATENCY_BUCKETS] = {
        50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, INT64_MAX,
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
        uint64_t off_pools, off_keys, off_slots, off_leases, off_history, off_links, off_due;
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
        pthread_mutex_t lock;                   /* banks, counts, slot claim/free, policy,
                                                 * history */
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

#define LOAD(p)     __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* A process can be killed between any two instructions, so the dirty marker must really be
 * written before the row and cleared after it, in program order: the compiler may not move the
 * row's stores across it. Other processes see the row only through the mutex. */
static void mark(uint32_t *marker, uint32_t v) {
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        __atomic_store_n(marker, v, __ATOMIC_RELAXED);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static unsigned bank_current(const struct keytable *t) {
        return LOAD(&t->hdr->bank) & 1u;
}

static unsigned bank_fill(const struct keytable *t) {
        return LOAD(&t->hdr->fill) & 1u;
}

static unsigned slot_bank(const struct keytable *t, unsigned slot) {
        return LOAD(&t->slots[slot].bank) & 1u;
}

static unsigned bank_n_pools(const struct keytable *t, unsigned b) {
        unsigned n = LOAD(&t->hdr->n_pools[b]);

        return n < t->max_pools ? n : t->max_pools;
}

static unsigned bank_n_keys(const struct keytable *t, unsigned b) {
        unsigned n = LOAD(&t->hdr->n_keys[b]);

        return n < t->max_keys ? n : t->max_keys;
}

static unsigned bank_first_pool(const struct keytable *t, unsigned b) {
        return b * t->max_pools;
}

static unsigned bank_first_key(const struct keytable *t, unsigned b) {
        return b * t->max_keys;
}

/* Is p a pool row that exists in its bank? */
static bool pool_row_valid(const struct keytable *t, unsigned p) {
        return p < KT_BANKS * t->max_pools && p % t->max_pools < bank_n_pools(t, p / t->max_pools);
}

/* Is k a key row that exists in its bank, and does its pool row exist in the same bank? */
static bool key_row_valid(const struct keytable *t, unsigned k) {
        unsigned b, p;

        if (k >= KT_BANKS * t->max_keys)
                return false;
        b = k / t->max_keys;
        if (k % t->max_keys >= bank_n_keys(t, b))
                return false;
        p = t->keys[k].pool;
        return pool_row_valid(t, p) && p / t->max_pools == b;
}

static uint32_t *slot_leases(const struct keytable *t, unsigned slot) {
        return t->leases + (size_t) slot * t->leases_per_slot;
}

static bool key_state_valid(uint32_t s) {
        return s > KEY_STATE_INVALID && s < _KEY_STATE_MAX;
}

static int64_t add_sat(int64_t a, int64_t b) {
        int64_t r;

        if (__builtin_add_overflow(a, b, &r))
                return b > 0 ? INT64_MAX : INT64_MIN;
        return r;
}

static int64_t ms_to_us(int64_t ms) {
        int64_t r;

        if (__builtin_mul_overflow(ms, INT64_C(1000), &r))
                return ms > 0 ? INT64_MAX : INT64_MIN;
        return r;
}

static void policy_load(const struct keytable *t, struct keytable_policy *ret) {
        const struct kt_policy *p = &t->hdr->policy;

        *ret = (struct keytable_policy) {
                .cooldown_scope_key = LOAD(&p->cooldown_scope_key) != 0,
                .transient_threshold = LOAD(&p->transient_threshold),
                .transient_cooldown_ms = LOAD(&p->transient_cooldown_ms),
                .probe_interval_ms = LOAD(&p->probe_interval_ms),
                .probe_auth = LOAD(&p->probe_auth) != 0,
        };
}

/* When a key disabled for reason is probed next, or 0 when it is left to the operator. */
static int64_t probe_time(const struct keytable_policy *pol, uint32_t reason, int64_t now_ms) {
        if (pol->probe_interval_ms <= 0)
                return 0;
        if (reason == KEY_REASON_QUOTA || (reason == KEY_REASON_AUTH && pol->probe_auth))
                return add_sat(now_ms, pol->probe_interval_ms);
        return 0;
}

/* Pool row p's key range, clamped to the keys that exist in its bank. */
static void pool_range(const struct keytable *t, unsigned p, unsigned *ret_first, unsigned *ret_end) {
        const struct kt_pool *pool = &t->pools[p];
        unsigned b = p / t->max_pools, lo = bank_first_key(t, b), hi = lo + bank_n_keys(t, b),
                 first = pool->first_key, end;

        /* Written once per fill: out of the bank means a broken row, which owns no keys. */
        if (first < lo || first > hi)
                first = hi;
        end = pool->n_keys > hi - first ? hi : first + pool->n_keys;
        *ret_first = first;
        *ret_end = end;
}

/* --- locking and repair -------------------------------------------------------------------- */

typedef void (*repair_fn)(const struct keytable *t, unsigned arg);

/* A dead writer may have been anywhere between lease write and in_flight update, or between
 * marking a row dirty and clearing it: distrust the dirty rows' state and rebuild every key's
 * in_flight from the leases, which are written before the count goes up and cleared after it
 * goes down, and only under this pool's lock for this pool's keys. */
static void pool_repair(const struct keytable *t, unsigned p) {
        struct kt_pool *pool = &t->pools[p];
        unsigned first, end, n_leases = t->n_slots * t->leases_per_slot, b = p / t->max_pools,
                 lo = bank_first_key(t, b), hi = lo + bank_n_keys(t, b);
        uint64_t max_seq = pool->use_seq;

        pool_range(t, p, &first, &end);
        for (unsigned k = first; k < end; k++) {
                struct kt_key *key = &t->keys[k];

                if (key->dirty || !key_state_valid(key->state)) {
                        if (!key_state_valid(key->state) ||
                            (key->state == KEY_COOLING && key->cooldown_until_ms <= 0)) {
                                key->state = KEY_READY;
                                key->reason = KEY_REASON_NONE;
                                key->cooldown_until_ms = 0;
                        }
                        if (key->state == KEY_READY) {
                                key->reason = KEY_REASON_NONE;
                                key->cooldown_until_ms = 0;
                        }
                        if (key->reason >= _KEY_REASON_MAX)
                                key->reason = key->state == KEY_COOLING ? KEY_REASON_RATE_LIMITED
                                                                        : KEY_REASON_OPERATOR;
                        if (key->last_class >= _VERDICT_MAX)
                                key->last_class = VERDICT_NONE;
                        /* A scribbled arrival time could shut the key out for ever; forgetting
                         * it costs at most one extra burst. */
                        key->tat_us = 0;
                        if (key->state != KEY_COOLING || key->cooling_since_ms < 0)
                                key->cooling_since_ms = 0;
                        if (key->state != KEY_DISABLED || key->next_probe_ms < 0)
                                key->next_probe_ms = 0;
                        if (key->figures_ms < 0)
                                key->figures_ms = 0;
                        /* A copy cut short may have lost its terminator. */
                        key->last_error[KEYTABLE_ERROR_MAX] = '\0';
                        key->dirty = 0;
                }
                /* Written outside any dirty mark, but a link out of the bank is no link. */
                if (LOAD(&key->twin) < lo || LOAD(&key->twin) >= hi)
                        STORE(&key->twin, k);
                key->in_flight = 0;
                if (key->use_seq > max_seq)
                        max_seq = key->use_seq;
        }

        for (unsigned i = 0; i < n_leases; i++) {
                uint32_t v = LOAD(&t->leases[i]);

                if (v != 0 && v - 1 >= first && v - 1 < end)
                        t->keys[v - 1].in_flight++;
        }

        pool->use_seq = max_seq;
        if (LOAD(&pool->account_limit_until_ms) < 0)
                STORE(&pool->account_limit_until_ms, 0);
        /* The dead owner may have been half-way through moving a key in the index, and the
         * counts above moved under it: the next acquire rebuilds it from the repaired rows. */
        pool->index_valid = 0;
        pool->dirty = 0;
}

/* The header lock guards the counts and the FREE/claimed transitions of slots; each of those is
 * a single store made last, so a dead holder leaves nothing half-done worth undoing. Only values
 * no writer of this module produces are put right. The history is the exception: an entry takes
 * many stores, so an append marks itself, and a marked ring loses the entry at its head. That is
 * the entry being written when the commit (one store of history_seq) had not landed, or the
 * oldest entry, next to be overwritten anyway, when it had. */
static void header_repair(const struct keytable *t, unsigned unused) {
        struct kt_header *h = t->hdr;

        if (h->history_dirty) {
                memset(&t->history[h->history_seq % t->history_size], 0, sizeof(struct kt_event));
                h->history_dirty = 0;
        }

        for (unsigned b = 0; b < KT_BANKS; b++) {
                if (h->n_pools[b] > t->max_pools)
                        h->n_pools[b] = t->max_pools;
                if (h->n_keys[b] > t->max_keys)
                        h->n_keys[b] = t->max_keys;
        }
        if (h->bank >= KT_BANKS)
                STORE(&h->bank, 0);
        if (h->fill >= KT_BANKS)
                STORE(&h->fill, h->bank);
        for (unsigned s = 0; s < t->n_slots; s++)
                if (t->slots[s].stage >= _WORKER_STAGE_MAX)
                        /* Still held by someone as far as we know: the coordinator frees it
                         * when it reaps the owner. */
                        t->slots[s].stage = WORKER_STAGE_DRAINING;
}

/* The one place abandoned locks are handled. Any other error means this process already holds
 * the lock (EDEADLK) or a lock was released unrepaired (ENOTRECOVERABLE, which this module never
 * does): a broken invariant, not a condition to recover from. */
static void lock_robust(const struct keytable *t, pthread_mutex_t *m, repair_fn repair,
                        unsigned arg) {
        int r = pthread_mutex_lock(m);

        if (r == 0)
                return;
        if (r != EOWNERDEAD)
                abort();
        repair(t, arg);
        if (pthread_mutex_consistent(m) != 0)
                abort();
        __atomic_add_fetch(&t->hdr->repairs, 1, __ATOMIC_RELAXED);
}

static void unlock(pthread_mutex_t *m) {
        if (pthread_mutex_unlock(m) != 0)
                abort();
}

static void header_lock(const struct keytable *t) {
        lock_robust(t, &t->hdr->lock, header_repair, 0);
}

static void header_unlock(const struct keytable *t) {
        unlock(&t->hdr->lock);
}

static void pool_lock(const struct keytable *t, unsigned p) {
        lock_robust(t, &t->pools[p].lock, pool_repair, p);
}

static void pool_unlock(const struct keytable *t, unsigned p) {
        unlock(&t->pools[p].lock);
}

/* --- creation ------------------------------------------------------------------------------ */

static int mutex_init_shared(pthread_mutex_t *m) {
        pthread_mutexattr_t a;
        int r;

        r = pthread_mutexattr_init(&a);
        if (r != 0)
                return -r;
        r = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        if (r == 0)
                r = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        if (r == 0)
                r = pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
        if (r == 0)
                r = pthread_mutex_init(m, &a);
        pthread_mutexattr_destroy(&a);
        return -r;
}

static int layout_add(size_t *off, size_t n, size_t each, size_t *ret_at) {
        size_t bytes, at;

        if (__builtin_mul_overflow(n, each, &bytes))
                return -ENOMEM;
        if (__builtin_add_overflow(*off, (size_t) KT_ALIGN - 1, &at))
                return -ENOMEM;
        at &= ~((size_t) KT_ALIGN - 1);
        if (__builtin_add_overflow(at, bytes, off))
                return -ENOMEM;
        *ret_at = at;
        return 0;
}

/* Opens a fresh segment and unlinks its name at once, so nothing is left in /dev/shm whatever
 * happens to this process later. */
static int shm_open_anonymous(void) {
        static unsigned counter;

        for (int attempt = 0; attempt < 64; attempt++) {
                char name[64];
                int fd;

                snprintf(name, sizeof name, "/keypool-%ld-%u", (long) getpid(),
                         __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED));
                fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
                if (fd >= 0) {
                        (void) shm_unlink(name);
                        return fd;
                }
                if (errno != EEXIST)
                        return -errno;
        }
        return -EEXIST;
}

int keytable_create(const struct keytable_limits *limits, int64_t now_ms, struct keytable **ret) {
        size_t off = 0, off_hdr, off_pools, off_keys, off_slots, off_leases, off_history, off_links,
               off_due, n_leases, index_size;
        unsigned history_size;
        struct keytable *t;
        void *base;
        int fd, r;

        if (!limits || !ret)
                return -EINVAL;
        if (limits->max_pools == 0 || limits->max_keys == 0 || limits->n_slots == 0 ||
            limits->leases_per_slot == 0)
                return -EINVAL;
        /* A lease stores a table-wide key row + 1 in 32 bits, both banks' rows fit in 32 bits
         * with KEYTABLE_NO_KEY to spare, and counts stay 32-bit. */
        if (limits->max_keys > (UINT32_MAX - 1) / KT_BANKS ||
            limits->max_pools > (UINT32_MAX - 1) / KT_BANKS)
                return -E2BIG;
        if (__builtin_mul_overflow((size_t) limits->n_slots, (size_t) limits->leases_per_slot,
                                   &n_leases) || n_leases > UINT32_MAX)
                return -E2BIG;
        history_size = limits->history_size > 0 ? limits->history_size : KT_HISTORY_DEFAULT;

        r = layout_add(&off, 1, sizeof(struct kt_header), &off_hdr);
        if (r == 0)
                r = layout_add(&off, (size_t) KT_BANKS * limits->max_pools, sizeof(struct kt_pool),
                               &off_pools);
        if (r == 0)
                r = layout_add(&off, (size_t) KT_BANKS * limits->max_keys, sizeof(struct kt_key),
                               &off_keys);
        if (r == 0)
                r = layout_add(&off, limits->n_slots, sizeof(struct kt_slot), &off_slots);
        if (r == 0)
                r = layout_add(&off, n_leases, sizeof(uint32_t), &off_leases);
        if (r == 0)
                r = layout_add(&off, history_size, sizeof(struct kt_event), &off_history);
        if (r == 0)
                r = layout_add(&off, (size_t) KT_BANKS * limits->max_keys, sizeof(struct kt_link),
                               &off_links);
        if (r == 0)
                r = layout_add(&off, (size_t) KT_BANKS * limits->max_keys, sizeof(struct kt_due),
                               &off_due);
        if (r < 0)
                return r;
        if (off > (size_t) INT64_MAX)
                return -ENOMEM;

        t = calloc(1, sizeof *t);
        if (!t)
                return -ENOMEM;
        /* At most half full, so a probe run stays short. */
        for (index_size = 16; index_size < 2 * (size_t) limits->max_keys; index_size *= 2)
                ;
        t->id_index_mask = index_size - 1;
        for (unsigned b = 0; b < KT_BANKS; b++) {
                t->id_index[b] = calloc(index_size, sizeof *t->id_index[b]);
                if (!t->id_index[b]) {
                        r = -ENOMEM;
                        goto fail;
                }
        }

        fd = shm_open_anonymous();
        if (fd < 0) {
                r = fd;
                goto fail;
        }
        if (ftruncate(fd, (off_t) off) < 0) {
                r = -errno;
                goto fail_fd;
        }
        /* Commit the memory now: running out of /dev/shm later would be a SIGBUS in the middle
         * of some worker's critical section instead of an error at start. */
        r = posix_fallocate(fd, 0, (off_t) off);
        if (r != 0) {
                r = -r;
                goto fail_fd;
        }
        base = mmap(NULL, off, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
                r = -errno;
                goto fail_fd;
        }
        (void) close(fd);

        t->base = base;
        t->size = off;
        t->hdr = (struct kt_header *) ((char *) base + off_hdr);
        t->pools = (struct kt_pool *) ((char *) base + off_pools);
        t->keys = (struct kt_key *) ((char *) base + off_keys);
        t->slots = (struct kt_slot *) ((char *) base + off_slots);
        t->leases = (uint32_t *) ((char *) base + off_leases);
        t->history = (struct kt_event *) ((char *) base + off_history);
        t->links = (struct kt_link *) ((char *) base + off_links);
        t->due = (struct kt_due *) ((char *) base + off_due);
        t->history_size = history_size;
        t->max_pools = limits->max_pools;
        t->max_keys = limits->max_keys;
        t->n_slots = limits->n_slots;
        t->leases_per_slot = limits->leases_per_slot;

        /* The segment comes zero-filled: every slot FREE, every lease free, both banks empty,
         * bank 0 current and being filled. */
        t->hdr->magic = KT_MAGIC;
        t->hdr->version = KT_VERSION;
        t->hdr->max_pools = limits->max_pools;
        t->hdr->max_keys = limits->max_keys;
        t->hdr->n_slots = limits->n_slots;
        t->hdr->leases_per_slot = limits->leases_per_slot;
        t->hdr->bank = 0;
        t->hdr->fill = 0;
        t->hdr->size = off;
        t->hdr->off_pools = off_pools;
        t->hdr->off_keys = off_keys;
        t->hdr->off_slots = off_slots;
        t->hdr->off_leases = off_leases;
        t->hdr->off_history = off_history;
        t->hdr->off_links = off_links;
        t->hdr->off_due = off_due;
        t->hdr->history_size = history_size;
        t->hdr->config_generation = 1;
        t->hdr->created_ms = now_ms;

        /* Every pool row of both banks gets its mutex once, here, and never again: a process
         * that read the current bank just before a commit may still be about to lock one. */
        r = mutex_init_shared(&t->hdr->lock);
        for (unsigned p = 0; r == 0 && p < KT_BANKS * t->max_pools; p++)
                r = mutex_init_shared(&t->pools[p].lock);
        if (r < 0) {
                keytable_destroy(t);
                return r;
        }

        *ret = t;
        return 0;

fail_fd:
        (void) close(fd);
fail:
        for (unsigned b = 0; b < KT_BANKS; b++)
                free(t->id_index[b]);
        free(t);
        return r;
}

void keytable_destroy(struct keytable *t) {
        if (!t)
                return;
        /* The mutexes are left alone: other processes may still hold the mapping. */
        (void) munmap(t->base, t->size);
        for (unsigned b = 0; b < KT_BANKS; b++)
                free(t->id_index[b]);
        free(t);
}

/* Sets dst's observation counters to src's, or to zero when src is NULL. */
static void pool_counters_copy(struct kt_pool *dst, const struct kt_pool *src) {
        STORE(&dst->rotations, src ? LOAD(&src->rotations) : 0);
        for (unsigned i = 0; i < KEYTABLE_LATENCY_BUCKETS; i++)
                STORE(&dst->latency_buckets[i], src ? LOAD(&src->latency_buckets[i]) : 0);
        STORE(&dst->latency_sum_ms, src ? LOAD(&src->latency_sum_ms) : 0);
}

/* The current bank's pool row named name, or UINT_MAX. Names do not change while the bank is
 * current, so no lock is needed to compare them. */
static unsigned current_pool_named(const struct keytable *t, unsigned cur, const char *name) {
        unsigned p0 = bank_first_pool(t, cur), n = bank_n_pools(t, cur);

        for (unsigned p = p0; p < p0 + n; p++)
                if (strncmp(t->pools[p].name, name, sizeof t->pools[p].name) == 0)
                        return p;
        return UINT_MAX;
}

int keytable_add_pool(struct keytable *t, const char *name, const char *model, unsigned *ret_pool) {
        struct kt_pool *pool;
        int64_t account_until = 0;
        unsigned b, n, p, q;

        if (!t || !name || name[0] == '\0')
                return -EINVAL;
        if (!model)
                model = "";
        if (strlen(name) > KEYTABLE_NAME_MAX || strlen(model) > KEYTABLE_MODEL_MAX)
                return -ENAMETOOLONG;

        header_lock(t);
        b = bank_fill(t);
        n = bank_n_pools(t, b);
        if (n >= t->max_pools) {
                header_unlock(t);
                return -ENOSPC;
        }
        p = bank_first_pool(t, b) + n;
        /* A reload does not forget that the account looked limited a moment ago. */
        if (b != bank_current(t)) {
                q = current_pool_named(t, bank_current(t), name);
                if (q != UINT_MAX)
                        account_until = LOAD(&t->pools[q].account_limit_until_ms);
        }

        /* No worker can see this row yet, but its lock may have been left abandoned by a dead
         * worker of the generation that used this bank last: taking it the usual way repairs
         * it (the bank is empty now, so there is nothing to recount) and leaves it consistent
         * for the generation to come. */
        pool_lock(t, p);
        pool = &t->pools[p];
        memset(pool->name, 0, sizeof pool->name);
        memset(pool->model, 0, sizeof pool->model);
        strcpy(pool->name, name);
        strcpy(pool->model, model);
        pool->first_key = bank_first_key(t, b) + bank_n_keys(t, b);
        pool->n_keys = 0;
        pool->use_seq = 0;
        pool->index_valid = 0;
        STORE(&pool->account_limit_until_ms, account_until > 0 ? account_until : 0);
        /* What a generation before last counted here; the current pool's figures come over at
         * commit. */
        pool_counters_copy(pool, NULL);
        pool->dirty = 0;
        pool_unlock(t, p);
        STORE(&t->hdr->n_pools[b], n + 1);
        header_unlock(t);

        if (ret_pool)
                *ret_pool = n;
        return 0;
}

/* FNV-1a: ids are already random hex, anything that spreads them will do. */
static uint64_t id_hash(const char *id) {
        uint64_t h = UINT64_C(0xcbf29ce484222325);

        for (; *id; id++)
                h = (h ^ (unsigned char) *id) * UINT64_C(0x100000001b3);
        return h;
}

/* Bank b's index entry for id: the one holding its first row in b, or the empty one where it
 * would go. */
static uint32_t *id_index_slot(const struct keytable *t, unsigned b, const char *id) {
        uint32_t *index = t->id_index[b];
        size_t i = (size_t) id_hash(id) & t->id_index_mask;

        for (;; i = (i + 1) & t->id_index_mask) {
                uint32_t e = index[i];

                if (e == 0 || strncmp(t->keys[e - 1].id, id, sizeof t->keys[0].id) == 0)
                        return &index[i];
        }
}

static void id_index_clear(struct keytable *t, unsigned b) {
        memset(t->id_index[b], 0, (t->id_index_mask + 1) * sizeof *t->id_index[b]);
}

/* Locks the pool of key (a table-wide row, either bank) and checks the key is in it; -EINVAL
 * (nothing locked) if not. ret_position (may be NULL): the key's place in its pool. */
static int key_lock(const struct keytable *t, unsigned key, unsigned *ret_pool,
                    unsigned *ret_position) {
        unsigned p, first, end;

        if (!t || !key_row_valid(t, key))
                return -EINVAL;
        p = t->keys[key].pool;
        pool_lock(t, p);
        pool_range(t, p, &first, &end);
        if (key < first || key >= end) {
                pool_unlock(t, p);
                return -EINVAL;
        }
        *ret_pool = p;
        if (ret_position)
                *ret_position = key - first;
        return 0;
}

/* The current bank's row whose health a new row of id in a pool named pool_name carries on: the
 * row in the pool of that name if there is one, else the first row with the id; KEYTABLE_NO_KEY
 * when the id is new. Ids, names and twin links do not change while a bank is current. */
static unsigned carry_source(const struct keytable *t, unsigned cur, const char *id,
                             const char *pool_name) {
        unsigned lo = bank_first_key(t, cur), hi = lo + bank_n_keys(t, cur), head, row;
        uint32_t e = *id_index_slot(t, cur, id);

        if (e == 0 || e - 1 < lo || e - 1 >= hi)
                return KEYTABLE_NO_KEY;
        head = row = e - 1;
        /* A circle holds one row per pool at most: the bound only matters if it was broken. */
        for (unsigned step = 0; step < bank_n_pools(t, cur); step++) {
                unsigned p = t->keys[row].pool;

                if (pool_row_valid(t, p) &&
                    strncmp(t->pools[p].name, pool_name, sizeof t->pools[p].name) == 0)
                        return row;
                row = LOAD(&t->keys[row].twin);
                if (row == head || row < lo || row >= hi)
                        break;
        }
        return head;
}

/* Copies key row k under its pool's lock, so the copy is one consistent moment of the row (a
 * row an abandoned lock left dirty is repaired first). */
static int key_copy(const struct keytable *t, unsigned k, struct kt_key *ret) {
        unsigned p;
        int r;

        r = key_lock(t, k, &p, NULL);
        if (r < 0)
                return r;
        *ret = t->keys[k];
        pool_unlock(t, p);
        return 0;
}

/* What a row carried over by a reload keeps: its health, history and rate state. Not its
 * in-flight count (the old row keeps the leases, and they are returned there), nor its limits
 * (the new configuration's are set on the new row), nor its links. */
static void key_carry(struct kt_key *key, const struct kt_key *src) {
        key->state = key_state_valid(src->state) ? src->state : KEY_READY;
        key->reason = src->reason < _KEY_REASON_MAX ? src->reason : KEY_REASON_NONE;
        key->cooldown_until_ms = src->cooldown_until_ms;
        key->cooling_since_ms = src->cooling_since_ms;
        key->next_probe_ms = src->next_probe_ms;
        key->consecutive_failures = src->consecutive_failures;
        key->last_status = src->last_status;
        key->last_class = src->last_class < _VERDICT_MAX ? src->last_class : VERDICT_NONE;
        key->last_used_ms = src->last_used_ms;
        key->use_seq = src->use_seq;
        key->requests = src->requests;
        key->successes = src->successes;
        key->rate_limited = src->rate_limited;
        key->failures = src->failures;
        key->tokens_in = src->tokens_in;
        key->tokens_out = src->tokens_out;
        key->tat_us = src->tat_us;
        key->figures = src->figures;
        key->figures_ms = src->figures_ms;
        memcpy(key->by_class, src->by_class, sizeof key->by_class);
        memcpy(key->last_error, src->last_error, sizeof key->last_error);
        key->last_error[KEYTABLE_ERROR_MAX] = '\0';
        if (key->state == KEY_READY) {
                key->reason = KEY_REASON_NONE;
                key->cooldown_until_ms = 0;
        }
}

int keytable_add_key(struct keytable *t, unsigned pool, const char *id, const char *masked,
                     unsigned *ret_key) {
        struct kt_key carried = {};
        bool carry = false;
        struct kt_key *key;
        unsigned b, p, k, lo;
        uint32_t *entry;

        if (!t || !id || id[0] == '\0')
                return -EINVAL;
        if (!masked)
                masked = "";
        if (strlen(id) > KEYID_ID_LEN || strlen(masked) > KEYID_MASK_MAX)
                return -ENAMETOOLONG;

        header_lock(t);
        b = bank_fill(t);
        /* Keys of a pool must stay contiguous, so only the newest pool can grow. */
        if (pool + 1 != bank_n_pools(t, b)) {
                header_unlock(t);
                return -EINVAL;
        }
        if (bank_n_keys(t, b) >= t->max_keys) {
                header_unlock(t);
                return -ENOSPC;
        }
        p = bank_first_pool(t, b) + pool;
        lo = bank_first_key(t, b);
        k = lo + bank_n_keys(t, b);
        entry = id_index_slot(t, b, id);
        if (*entry != 0) {
                unsigned row = *entry - 1;

                /* A twin in its own pool would have its pool locked twice when cooled. */
                for (unsigned step = 0; step <= bank_n_pools(t, b); step++) {
                        if (t->keys[row].pool == p) {
                                header_unlock(t);
                                return -EEXIST;
                        }
                        row = LOAD(&t->keys[row].twin);
                        if (row == *entry - 1 || row < lo || row >= k)
                                break;
                }
        }

        /* One pool lock at a time: the old row is copied under its own lock, and written to the
         * new bank only once that lock is let go. */
        if (b != bank_current(t)) {
                unsigned src = carry_source(t, bank_current(t), id, t->pools[p].name);

                carry = src != KEYTABLE_NO_KEY && key_copy(t, src, &carried) == 0;
        }

        pool_lock(t, p);
        key = &t->keys[k];
        memset(key, 0, sizeof *key);
        strcpy(key->id, id);
        strcpy(key->masked, masked);
        key->pool = p;
        key->state = KEY_READY;
        key->reason = KEY_REASON_NONE;
        key->last_class = VERDICT_NONE;
        key->figures = RATE_FIGURES_UNKNOWN;
        if (carry) {
                key_carry(key, &carried);
                /* The pool's LRU clock must run ahead of every row's, or a carried key would
                 * look unused to the next acquires. */
                if (key->use_seq > t->pools[p].use_seq)
                        t->pools[p].use_seq = key->use_seq;
        }
        if (*entry == 0) {
                STORE(&key->twin, k);
                *entry = k + 1;
        } else {
                struct kt_key *first = &t->keys[*entry - 1];

                /* The new row points into the circle before the circle points at it, so a
                 * walker already going round never steps off. */
                STORE(&key->twin, LOAD(&first->twin));
                STORE(&first->twin, k);
        }
        STORE(&t->hdr->n_keys[b], k - lo + 1);
        t->pools[p].n_keys++;
        /* Built by the first acquire, from all the rows at once. */
        t->pools[p].index_valid = 0;
        pool_unlock(t, p);
        header_unlock(t);

        if (ret_key)
                *ret_key = k;
        return 0;
}

int keytable_set_key_limits(struct keytable *t, unsigned key, unsigned max_concurrent, unsigned rpm) {
        struct kt_key *row;
        unsigned p;
        int r;

        r = key_lock(t, key, &p, NULL);
        if (r < 0)
                return r;
        row = &t->keys[key];
        /* The arrival time stays: a lower rpm then only stretches the wait already earned. */
        mark(&row->dirty, 1);
        row->max_concurrent = max_concurrent;
        row->rpm = rpm;
        mark(&row->dirty, 0);
        /* Limits change with the configuration, not per request: a rebuild is cheap enough. */
        t->pools[p].index_valid = 0;
        pool_unlock(t, p);
        return 0;
}

/* --- reload: the second bank --------------------------------------------------------------- */

int keytable_bank_begin(struct keytable *t) {
        unsigned target;

        if (!t)
                return -EINVAL;

        header_lock(t);
        target = bank_current(t) ^ 1u;
        /* Slots are claimed and freed under this lock, so none can start using the bank while
         * it is being emptied; one that still uses it may hold its rows or leases on them. */
        for (unsigned s = 0; s < t->n_slots; s++)
                if (LOAD(&t->slots[s].stage) != WORKER_STAGE_FREE && slot_bank(t, s) == target) {
                        header_unlock(t);
                        return -EBUSY;
                }
        STORE(&t->hdr->n_pools[target], 0);
        STORE(&t->hdr->n_keys[target], 0);
        STORE(&t->hdr->fill, target);
        header_unlock(t);

        id_index_clear(t, target);
        return 0;
}

int keytable_bank_commit(struct keytable *t) {
        unsigned fill;

        if (!t)
                return -EINVAL;

        header_lock(t);
        fill = bank_fill(t);
        if (fill == bank_current(t)) {
                header_unlock(t);
                return -EINVAL;
        }
        /* Counters carry on from the pool of the same name, copied as late as possible: what
         * the old generation adds while it drains is not seen any more, but nothing a reader
         * saw before the switch goes backwards after it by more than that. */
        for (unsigned i = 0; i < bank_n_pools(t, fill); i++) {
                unsigned p = bank_first_pool(t, fill) + i,
                         q = current_pool_named(t, bank_current(t), t->pools[p].name);

                if (q != UINT_MAX)
                        pool_counters_copy(&t->pools[p], &t->pools[q]);
        }
        /* One store: a reader sees the old bank or the new one, each whole, since every row of
         * the new bank was written before it. */
        STORE(&t->hdr->bank, fill);
        header_unlock(t);
        return 0;
}

void keytable_bank_abort(struct keytable *t) {
        unsigned fill, cur;

        if (!t)
                return;

        header_lock(t);
        fill = bank_fill(t);
        cur = bank_current(t);
        if (fill != cur) {
                STORE(&t->hdr->fill, cur);
                STORE(&t->hdr->n_pools[fill], 0);
                STORE(&t->hdr->n_keys[fill], 0);
        }
        header_unlock(t);

        if (fill != cur)
                id_index_clear(t, fill);
}

unsigned keytable_bank_current(const struct keytable *t) {
        return t ? bank_current(t) : 0;
}

void keytable_set_policy(struct keytable *t, const struct keytable_policy *p) {
        struct kt_policy *dst;

        if (!t || !p)
                return;
        dst = &t->hdr->policy;
        header_lock(t);
        STORE(&dst->cooldown_scope_key, p->cooldown_scope_key ? 1u : 0u);
        STORE(&dst->transient_threshold, p->transient_threshold);
        STORE(&dst->transient_cooldown_ms, p->transient_cooldown_ms);
        STORE(&dst->probe_interval_ms, p->probe_interval_ms);
        STORE(&dst->probe_auth, p->probe_auth ? 1u : 0u);
        header_unlock(t);
}

/* --- worker slots -------------------------------------------------------------------------- */

int keytable_slot_claim(struct keytable *t, unsigned generation, int64_t now_ms, unsigned *ret_slot) {
        if (!t)
                return -EINVAL;

        header_lock(t);
        for (unsigned s = 0; s < t->n_slots; s++) {
                struct kt_slot *slot = &t->slots[s];

                if (LOAD(&slot->stage) != WORKER_STAGE_FREE)
                        continue;
                STORE(&slot->generation, generation);
                /* Workers are forked after a commit, so the new generation gets the new bank. */
                STORE(&slot->bank, bank_current(t));
                STORE(&slot->pid, 0);
                STORE(&slot->lease_hint, 0);
                STORE(&slot->waiters, 0);
                STORE(&slot->started_ms, now_ms);
                STORE(&slot->heartbeat_ms, now_ms);
                STORE(&slot->requests, 0);
                STORE(&slot->stage, WORKER_STAGE_STARTING);
                header_unlock(t);
                if (ret_slot)
                        *ret_slot = s;
                return 0;
        }
        header_unlock(t);
        return -EBUSY;
}

void keytable_slot_set_pid(struct keytable *t, unsigned slot, pid_t pid) {
        if (t && slot < t->n_slots)
                STORE(&t->slots[slot].pid, (int32_t) pid);
}

void keytable_slot_set_stage(struct keytable *t, unsigned slot, enum worker_stage stage) {
        /* FREE is for keytable_slot_release alone: only it returns the slot's leases. */
        if (t && slot < t->n_slots && stage > WORKER_STAGE_FREE && stage < _WORKER_STAGE_MAX)
                STORE(&t->slots[slot].stage, (uint32_t) stage);
}

void keytable_slot_heartbeat(struct keytable *t, unsigned slot, int64_t now_ms) {
        if (t && slot < t->n_slots)
                STORE(&t->slots[slot].heartbeat_ms, now_ms);
}

void keytable_slot_count_request(struct keytable *t, unsigned slot) {
        if (t && slot < t->n_slots)
                __atomic_add_fetch(&t->slots[slot].requests, 1, __ATOMIC_RELAXED);
}

void keytable_slot_release(struct keytable *t, unsigned slot) {
        uint32_t *leases;

        if (!t || slot >= t->n_slots)
                return;

        /* The owner is gone, so this slot's leases change only here. Each lease names its pool
         * (and so its bank) through its key; take that pool's lock once and return all of the
         * slot's leases in it. If the dead worker held that lock, locking it repairs the pool
         * first (recounting from these very leases), and the decrements below then apply to a
         * true count. The bank cannot be refilled under us: the slot is not FREE yet. */
        leases = slot_leases(t, slot);
        for (unsigned i = 0; i < t->leases_per_slot; i++) {
                uint32_t v = LOAD(&leases[i]);
                unsigned p;

                if (v == 0)
                        continue;
                if (!key_row_valid(t, v - 1)) {
                        /* Names no key: nothing was ever counted for it. */
                        STORE(&leases[i], 0);
                        continue;
                }
                p = t->keys[v - 1].pool;

                pool_lock(t, p);
                mark(&t->pools[p].dirty, 1);
                for (unsigned j = i; j < t->leases_per_slot; j++) {
                        uint32_t w = LOAD(&leases[j]);
                        struct kt_key *key;

                        if (w == 0 || !key_row_valid(t, w - 1) || t->keys[w - 1].pool != p)
                                continue;
                        key = &t->keys[w - 1];
                        if (key->in_flight > 0)
                                key->in_flight--;
                        STORE(&leases[j], 0);
                }
                /* Keys that were full may serve again: a worker death is rare enough for a
                 * rebuild. */
                t->pools[p].index_valid = 0;
                mark(&t->pools[p].dirty, 0);
                pool_unlock(t, p);
        }

        header_lock(t);
        STORE(&t->slots[slot].pid, 0);
        STORE(&t->slots[slot].waiters, 0);
        STORE(&t->slots[slot].stage, WORKER_STAGE_FREE);
        header_unlock(t);
}

unsigned keytable_slot_bank(const struct keytable *t, unsigned slot) {
        return t && slot < t->n_slots ? slot_bank(t, slot) : 0;
}

void keytable_slot_set_waiters(struct keytable *t, unsigned slot, unsigned n) {
        if (t && slot < t->n_slots)
                STORE(&t->slots[slot].waiters, (uint32_t) n);
}

unsigned keytable_slots_with_waiters(const struct keytable *t, unsigned *ret_slots, unsigned max) {
        unsigned n = 0;

        if (!t || !ret_slots)
                return 0;
        /* No lock: a slot freed meanwhile costs its reader one needless wake-up at most. */
        for (unsigned s = 0; s < t->n_slots && n < max; s++)
                if (LOAD(&t->slots[s].stage) != WORKER_STAGE_FREE && LOAD(&t->slots[s].waiters) > 0)
                        ret_slots[n++] = s;
        return n;
}

/* --- observations -------------------------------------------------------------------------- */

/* The slot's bank's pool row for a pool index relative to it, or UINT_MAX. */
static unsigned slot_pool_row(const struct keytable *t, unsigned slot, unsigned pool) {
        unsigned b;

        if (!t || slot >= t->n_slots)
                return UINT_MAX;
        b = slot_bank(t, slot);
        if (pool >= bank_n_pools(t, b))
                return UINT_MAX;
        return bank_first_pool(t, b) + pool;
}

void keytable_observe_latency(struct keytable *t, unsigned slot, unsigned pool, int64_t ms) {
        unsigned p = slot_pool_row(t, slot, pool), i = 0;

        if (p == UINT_MAX)
                return;
        if (ms < 0)
                ms = 0;
        while (i + 1 < KEYTABLE_LATENCY_BUCKETS && ms > keytable_latency_bounds_ms[i])
                i++;
        __atomic_add_fetch(&t->pools[p].latency_buckets[i], 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&t->pools[p].latency_sum_ms, (uint64_t) ms, __ATOMIC_RELAXED);
}

void keytable_count_rotation(struct keytable *t, unsigned slot, unsigned pool) {
        unsigned p = slot_pool_row(t, slot, pool);

        if (p != UINT_MAX)
                __atomic_add_fetch(&t->pools[p].rotations, 1, __ATOMIC_RELAXED);
}

/* --- history ------------------------------------------------------------------------------- */

static void copy_field(char *dst, size_t size, const char *src) {
        size_t n = src ? strnlen(src, size - 1) : 0;

        if (n > 0)
                memcpy(dst, src, n);
        memset(dst + n, 0, size - n);
}

void keytable_history_add(struct keytable *t, const struct keytable_event *e) {
        struct kt_event *slot;
        uint64_t seq;

        if (!t || !e)
                return;

        header_lock(t);
        seq = t->hdr->history_seq;
        slot = &t->history[seq % t->history_size];
        mark(&t->hdr->history_dirty, 1);
        slot->seq = 0;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        slot->wall_ms = e->wall_ms;
        slot->cooldown_ms = e->cooldown_ms;
        slot->kind = (uint32_t) e->kind;
        slot->reason = (uint32_t) e->reason;
        slot->status = e->status;
        copy_field(slot->pool, sizeof slot->pool, e->pool);
        copy_field(slot->key_from, sizeof slot->key_from, e->key_from);
        copy_field(slot->key_to, sizeof slot->key_to, e->key_to);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        slot->seq = seq + 1;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        /* The commit. */
        STORE(&t->hdr->history_seq, seq + 1);
        mark(&t->hdr->history_dirty, 0);
        header_unlock(t);
}

unsigned keytable_history_read(struct keytable *t, struct keytable_event *ret, unsigned max) {
        uint64_t seq, first;
        unsigned n = 0;

        if (!t || !ret || max == 0)
                return 0;

        header_lock(t);
        seq = t->hdr->history_seq;
        first = seq > t->history_size ? seq - t->history_size + 1 : 1;
        if (seq >= first && seq - first + 1 > max)
                first = seq - max + 1;
        for (uint64_t s = first; s <= seq; s++) {
                const struct kt_event *src = &t->history[(s - 1) % t->history_size];
                struct keytable_event *e = &ret[n];

                /* Lost to a repair, or never there. */
                if (src->seq != s || src->kind == HISTORY_NONE || src->kind >= _HISTORY_MAX)
                        continue;
                *e = (struct keytable_event) {
                        .seq = s,
                        .wall_ms = src->wall_ms,
                        .kind = src->kind,
                        .status = src->status,
                        .reason = src->reason < _KEY_REASON_MAX ? src->reason : KEY_REASON_NONE,
                        .cooldown_ms = src->cooldown_ms,
                };
                memcpy(e->pool, src->pool, sizeof e->pool - 1);
                memcpy(e->key_from, src->key_from, sizeof e->key_from - 1);
                memcpy(e->key_to, src->key_to, sizeof e->key_to - 1);
                n++;
        }
        header_unlock(t);
        return n;
}

unsigned keytable_history_capacity(const struct keytable *t) {
        return t ? t->history_size : 0;
}

/* --- configuration generation -------------------------------------------------------------- */

void keytable_set_config_generation(struct keytable *t, unsigned generation) {
        if (t)
                STORE(&t->hdr->config_generation, (uint32_t) generation);
}

unsigned keytable_config_generation(const struct keytable *t) {
        return t ? LOAD(&t->hdr->config_generation) : 0;
}

/* --- acquire and release ------------------------------------------------------------------- */

static int slot_find_free_lease(const struct keytable *t, unsigned slot, unsigned *ret_index) {
        const uint32_t *leases = slot_leases(t, slot);
        unsigned n = t->leases_per_slot, hint = LOAD(&t->slots[slot].lease_hint) % n;

        for (unsigned i = 0; i < n; i++) {
                unsigned j = hint + i < n ? hint + i : hint + i - n;

                if (LOAD(&leases[j]) == 0) {
                        *ret_index = j;
                        return 0;
                }
        }
        return -ENOSPC;
}

/* Ends a cooldown that has run out. The caller holds the pool lock and has marked the pool, but
 * not the row. */
static void key_recover_if_due(struct kt_key *key, unsigned k, int64_t now_ms,
                               struct keytable_change *change) {
        if (key->state != KEY_COOLING || key->cooldown_until_ms > now_ms)
                return;
        mark(&key->dirty, 1);
        key->state = KEY_READY;
        key->reason = KEY_REASON_NONE;
        key->cooldown_until_ms = 0;
        key->cooling_since_ms = 0;
        /* A rest ends the run of failures that may have caused it: cooling the key again for
         * failures takes a whole new run. */
        key->consecutive_failures = 0;
        mark(&key->dirty, 0);
        if (change && !change->changed)
                *change = (struct keytable_change) {
                        .changed = true,
                        .key = k,
                        .from = KEY_COOLING,
                        .to = KEY_READY,
                        .reason = KEY_REASON_NONE,
                };
}

/* GCRA with emission interval T = a minute / rpm and burst tolerance a minute - T: up to rpm
 * requests pass at once, then one every T, and one timestamp per key is all it keeps. False with
 * the earliest ms a request passes when none may now. */
static int64_t gcra_interval_us(const struct kt_key *key) {
        int64_t t_us = KT_MINUTE_US / key->rpm;

        return t_us > 0 ? t_us : 1;
}

static bool gcra_allows(const struct kt_key *key, int64_t now_ms, int64_t *ret_at_ms) {
        int64_t tol_us, earliest_us;

        if (key->rpm == 0)
                return true;
        tol_us = KT_MINUTE_US - gcra_interval_us(key);
        if (key->tat_us <= add_sat(ms_to_us(now_ms), tol_us))
                return true;
        earliest_us = key->tat_us - tol_us;
        /* Rounded up: at the ms given the request really passes. */
        *ret_at_ms = earliest_us / 1000 + (earliest_us % 1000 > 0);
        return false;
}

static void gcra_take(struct kt_key *key, int64_t now_ms) {
        int64_t now_us = ms_to_us(now_ms);

        if (key->rpm == 0)
                return;
        key->tat_us = add_sat(key->tat_us > now_us ? key->tat_us : now_us, gcra_interval_us(key));
}

static void earliest(int64_t *at, int64_t candidate) {
        if (*at == 0 || candidate < *at)
                *at = candidate;
}

/* --- the choice index ---------------------------------------------------------------------- */

/* All of these run under the pool's lock, with the pool marked dirty. They trust the index only
 * while index_valid, and anything out of place they meet makes it stale rather than followed: the
 * next acquire rebuilds it from the rows. */

static void index_stale(const struct keytable *t, unsigned p) {
        t->pools[p].index_valid = 0;
}

/* The order acquire takes keys in: least recently acquired first, then the earlier row, so the
 * primary goes first in a fresh pool. */
static bool key_before(const struct keytable *t, uint32_t a, uint32_t b) {
        uint64_t sa = t->keys[a].use_seq, sb = t->keys[b].use_seq;

        return sa < sb || (sa == sb && a < b);
}

/* Where a key belongs at now_ms and, for KT_DUE, the ms from which it can serve: the tests of
 * the scan (choose_by_scan), in the same order, so both make the same choice. */
static enum kt_place key_place_for(const struct kt_key *key, int64_t now_ms, int64_t *ret_at_ms) {
        switch (key->state) {
        case KEY_COOLING:
                *ret_at_ms = key->cooldown_until_ms;
                return KT_DUE;
        case KEY_READY:
                if (!gcra_allows(key, now_ms, ret_at_ms))
                        return KT_DUE;
                if (key->max_concurrent > 0 && key->in_flight >= key->max_concurrent)
                        return KT_FULL;
                return KT_LISTED;
        default:
                return KT_NOWHERE;
        }
}

/* A key whose rpm counts joins the list or the full ones: note the ms its rate let it in from
 * (a time, by then, at or before now). */
static void index_note_rate(struct kt_pool *pool, const struct kt_key *key) {
        int64_t from_us, from_ms;

        if (key->rpm == 0)
                return;
        from_us = add_sat(key->tat_us, -(KT_MINUTE_US - gcra_interval_us(key)));
        from_ms = from_us / 1000 + (from_us % 1000 > 0);
        if (from_ms > pool->gcra_since_ms)
                pool->gcra_since_ms = from_ms;
}

static void list_link_after(const struct keytable *t, struct kt_pool *pool, uint32_t k,
                            uint32_t after) {
        struct kt_link *l = &t->links[k];
        uint32_t next = after == KT_NIL ? pool->head : t->links[after].next;

        l->prev = after;
        l->next = next;
        if (next == KT_NIL)
                pool->tail = k;
        else
                t->links[next].prev = k;
        if (after == KT_NIL)
                pool->head = k;
        else
                t->links[after].next = k;
}

static void list_unlink(const struct keytable *t, struct kt_pool *pool, uint32_t k) {
        struct kt_link *l = &t->links[k];

        if (l->prev == KT_NIL)
                pool->head = l->next;
        else
                t->links[l->prev].next = l->next;
        if (l->next == KT_NIL)
                pool->tail = l->prev;
        else
                t->links[l->next].prev = l->prev;
        l->prev = l->next = KT_NIL;
}

/* Is listed key a before k (whose use_seq is seq) in acquire's order? */
static bool listed_before(const struct keytable *t, uint32_t a, uint64_t seq, uint32_t k) {
        uint64_t sa = t->links[a].use_seq;

        return sa < seq || (sa == seq && a < k);
}

/* Puts k in its place on the list, walking in from both ends at once: a key just used belongs
 * next to the tail, one unused for long next to the head, and either is found in a step or two.
 * The tail is looked at first: after a take the key is the newest, and the head's row is then
 * never touched. */
static void list_insert(const struct keytable *t, unsigned p, uint32_t k) {
        struct kt_pool *pool = &t->pools[p];
        uint32_t back = pool->tail, front = pool->head;
        uint64_t seq = t->keys[k].use_seq;
        unsigned first, end;

        t->links[k].use_seq = seq;
        pool_range(t, p, &first, &end);
        for (unsigned steps = 0; steps <= end - first; steps++) {
                if (back == KT_NIL || listed_before(t, back, seq, k)) {
                        list_link_after(t, pool, k, back);
                        return;
                }
                if (front == KT_NIL || !listed_before(t, front, seq, k)) {
                        list_link_after(t, pool, k, front == KT_NIL ? pool->tail
                                                                   : t->links[front].prev);
                        return;
                }
                back = t->links[back].prev;
                front = t->links[front].next;
                if ((back != KT_NIL && (back < first || back >= end)) ||
                    (front != KT_NIL && (front < first || front >= end)))
                        break;
        }
        /* Longer than the pool or leading out of it: not a list any more. */
        index_stale(t, p);
}

static bool due_before(const struct kt_due *a, const struct kt_due *b) {
        return a->at_ms < b->at_ms || (a->at_ms == b->at_ms && a->key < b->key);
}

static void heap_set(const struct keytable *t, struct kt_due *h, uint32_t i, struct kt_due e) {
        h[i] = e;
        t->links[e.key].heap_at = i;
}

static void heap_up(const struct keytable *t, struct kt_due *h, uint32_t i) {
        struct kt_due e = h[i];

        while (i > 0) {
                uint32_t parent = (i - 1) / 2;

                if (!due_before(&e, &h[parent]))
                        break;
                heap_set(t, h, i, h[parent]);
                i = parent;
        }
        heap_set(t, h, i, e);
}

static void heap_down(const struct keytable *t, struct kt_due *h, uint32_t n, uint32_t i) {
        struct kt_due e = h[i];

        for (;;) {
                uint32_t c = 2 * i + 1;

                if (c >= n)
                        break;
                if (c + 1 < n && due_before(&h[c + 1], &h[c]))
                        c++;
                if (!due_before(&h[c], &e))
                        break;
                heap_set(t, h, i, h[c]);
                i = c;
        }
        heap_set(t, h, i, e);
}

/* The pool's heap: its entries live in due[] over the pool's own range of rows. */
static struct kt_due *pool_heap(const struct keytable *t, unsigned p, unsigned *ret_room) {
        unsigned first, end;

        pool_range(t, p, &first, &end);
        *ret_room = end - first;
        return t->due + first;
}

static void heap_push(const struct keytable *t, unsigned p, uint32_t k, int64_t at_ms) {
        struct kt_pool *pool = &t->pools[p];
        unsigned room;
        struct kt_due *h = pool_heap(t, p, &room);
        uint32_t n = pool->n_due;

        if (n >= room) {
                index_stale(t, p);
                return;
        }
        heap_set(t, h, n, (struct kt_due) { .at_ms = at_ms, .key = k });
        pool->n_due = n + 1;
        heap_up(t, h, n);
}

static void heap_remove(const struct keytable *t, unsigned p, uint32_t k) {
        struct kt_pool *pool = &t->pools[p];
        unsigned room;
        struct kt_due *h = pool_heap(t, p, &room);
        uint32_t i = t->links[k].heap_at, n = pool->n_due, moved;

        t->links[k].heap_at = KT_NIL;
        if (n > room || i >= n || h[i].key != k) {
                index_stale(t, p);
                return;
        }
        pool->n_due = --n;
        if (i == n)
                return;
        /* The last entry fills the hole, then finds its level, up or down. */
        moved = h[n].key;
        heap_set(t, h, i, h[n]);
        heap_up(t, h, i);
        heap_down(t, h, n, t->links[moved].heap_at);
}

/* Takes k out of the index, wherever it is. */
static void key_unplace(const struct keytable *t, unsigned p, uint32_t k) {
        struct kt_pool *pool = &t->pools[p];
        struct kt_link *l = &t->links[k];

        switch (l->place) {
        case KT_LISTED:
                list_unlink(t, pool, k);
                break;
        case KT_DUE:
                heap_remove(t, p, k);
                break;
        case KT_FULL:
                if (pool->n_full > 0)
                        pool->n_full--;
                break;
        default:
                break;
        }
        l->place = KT_NOWHERE;
}

/* Puts k, which is nowhere in the index, where key_place_for said. */
static void key_put(const struct keytable *t, unsigned p, uint32_t k, enum kt_place place,
                    int64_t at_ms) {
        struct kt_pool *pool = &t->pools[p];

        /* Taking the key out found the index out of order: it is rebuilt, not followed. */
        if (!pool->index_valid)
                return;
        t->links[k].place = place;
        switch (place) {
        case KT_LISTED:
                list_insert(t, p, k);
                index_note_rate(pool, &t->keys[k]);
                break;
        case KT_DUE:
                heap_push(t, p, k, at_ms);
                break;
        case KT_FULL:
                pool->n_full++;
                index_note_rate(pool, &t->keys[k]);
                break;
        default:
                break;
        }
}

/* After a change to row k (its state, rest, in-flight count): moves it to where it now belongs.
 * Its place on the list depends on use_seq alone, which only a take changes (index_requeue). */
static void index_update(const struct keytable *t, unsigned p, uint32_t k, int64_t now_ms) {
        enum kt_place place;
        int64_t at = 0;
        unsigned room;

        if (!t->pools[p].index_valid)
                return;
        place = key_place_for(&t->keys[k], now_ms, &at);
        if (place == t->links[k].place) {
                const struct kt_due *h = pool_heap(t, p, &room);
                uint32_t i = t->links[k].heap_at;

                if (place != KT_DUE || (i < room && h[i].key == k && h[i].at_ms == at))
                        return;
        }
        key_unplace(t, p, k);
        key_put(t, p, k, place, at);
}

/* After a take: the key is now the most recently used, so it goes to the tail if it still
 * serves. */
static void index_requeue(const struct keytable *t, unsigned p, uint32_t k, int64_t now_ms) {
        enum kt_place place;
        int64_t at = 0;

        if (!t->pools[p].index_valid)
                return;
        key_unplace(t, p, k);
        place = key_place_for(&t->keys[k], now_ms, &at);
        key_put(t, p, k, place, at);
}

/* Sorts rows into acquire's order (heapsort: in place, no allocation under the lock). */
static void rows_sift(const struct keytable *t, struct kt_due *a, uint32_t n, uint32_t i) {
        for (;;) {
                uint32_t c = 2 * i + 1, m = i;
                struct kt_due tmp;

                if (c < n && key_before(t, a[m].key, a[c].key))
                        m = c;
                if (c + 1 < n && key_before(t, a[m].key, a[c + 1].key))
                        m = c + 1;
                if (m == i)
                        return;
                tmp = a[i];
                a[i] = a[m];
                a[m] = tmp;
                i = m;
        }
}

static void rows_sort(const struct keytable *t, struct kt_due *a, uint32_t n) {
        for (uint32_t i = n / 2; i-- > 0;)
                rows_sift(t, a, n, i);
        for (uint32_t e = n; e > 1;) {
                struct kt_due tmp = a[0];

                a[0] = a[--e];
                a[e] = tmp;
                rows_sift(t, a, e, 0);
        }
}

/* Builds pool p's index from its rows as they stand at now_ms: O(n log n), for the rare paths
 * (first use after a bank is filled, new limits, a dead worker, a repair). */
static void index_rebuild(const struct keytable *t, unsigned p, int64_t now_ms) {
        struct kt_pool *pool = &t->pools[p];
        unsigned first, end;
        uint32_t n_listed = 0;
        struct kt_due *h;
        int64_t at = 0;

        pool_range(t, p, &first, &end);
        h = t->due + first;
        pool->index_valid = 0;
        pool->head = pool->tail = KT_NIL;
        pool->n_due = 0;
        pool->n_full = 0;
        pool->gcra_since_ms = INT64_MIN;

        /* The keys that can serve are sorted in the heap's room before the heap needs it. */
        for (unsigned k = first; k < end; k++) {
                struct kt_link *l = &t->links[k];

                l->prev = l->next = l->heap_at = KT_NIL;
                l->place = key_place_for(&t->keys[k], now_ms, &at);
                if (l->place == KT_LISTED)
                        h[n_listed++] = (struct kt_due) { .key = k };
        }
        rows_sort(t, h, n_listed);
        for (uint32_t i = 0; i < n_listed; i++) {
                t->links[h[i].key].use_seq = t->keys[h[i].key].use_seq;
                list_link_after(t, pool, h[i].key, pool->tail);
                index_note_rate(pool, &t->keys[h[i].key]);
        }

        for (unsigned k = first; k < end; k++) {
                switch (t->links[k].place) {
                case KT_FULL:
                        pool->n_full++;
                        index_note_rate(pool, &t->keys[k]);
                        break;
                case KT_DUE:
                        (void) key_place_for(&t->keys[k], now_ms, &at);
                        h[pool->n_due] = (struct kt_due) { .at_ms = at, .key = k };
                        t->links[k].heap_at = pool->n_due++;
                        break;
                default:
                        break;
                }
        }
        for (uint32_t i = pool->n_due / 2; i-- > 0;)
                heap_down(t, h, pool->n_due, i);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        pool->index_valid = 1;
}

/* Keeps the recovery of the earliest row: the one the scan of every row reported. */
static void change_merge(struct keytable_change *change, const struct keytable_change *c) {
        if (c->changed && (!change->changed || c->key < change->key))
                *change = *c;
}

/* Ends every rest that is over and lets back in every key whose rpm allows it again: each heap
 * entry due at now_ms moves its key to where it belongs now. */
static void index_run_due(const struct keytable *t, unsigned p, int64_t now_ms,
                          struct keytable_change *change) {
        struct kt_pool *pool = &t->pools[p];
        unsigned first, end;
        struct kt_due *h;

        pool_range(t, p, &first, &end);
        h = t->due + first;
        /* Each entry moves once: bounded even if a row and its entry disagree. */
        for (uint32_t guard = pool->n_due; guard > 0; guard--) {
                struct keytable_change c = { .changed = false };
                enum kt_place place;
                int64_t at = 0;
                uint32_t k;

                if (!pool->index_valid || pool->n_due == 0 || pool->n_due > end - first ||
                    h[0].at_ms > now_ms)
                        return;
                k = h[0].key;
                if (k < first || k >= end || t->links[k].place != KT_DUE) {
                        index_stale(t, p);
                        return;
                }
                key_unplace(t, p, k);
                key_recover_if_due(&t->keys[k], k, now_ms, &c);
                change_merge(change, &c);
                place = key_place_for(&t->keys[k], now_ms, &at);
                key_put(t, p, k, place, at);
        }
}

/* The choice as the index has it: the list's head, or the next key when the head is to be
 * avoided (the avoided key only when it is alone). UINT_MAX with wait filled when the list is
 * empty. */
static unsigned choose_from_index(const struct keytable *t, unsigned p, unsigned avoid_key,
                                  struct keytable_wait *wait) {
        const struct kt_pool *pool = &t->pools[p];
        uint32_t k = pool->head;
        unsigned room;
        const struct kt_due *h;

        if (k == KT_NIL) {
                h = pool_heap(t, p, &room);
                wait->busy = pool->n_full > 0;
                wait->retry_at_ms = pool->n_due > 0 ? h[0].at_ms : 0;
                return UINT_MAX;
        }
        if (k == avoid_key && t->links[k].next != KT_NIL)
                k = t->links[k].next;
        return k;
}

/* The choice from the rows themselves, O(n): when the index cannot be trusted, or the caller's
 * clock is behind the index's (a key let in by its rpm at a later ms may not serve at this
 * one). Ends the rests that are over as it goes. */
static unsigned choose_by_scan(const struct keytable *t, unsigned p, int64_t now_ms,
                               unsigned avoid_key, struct keytable_wait *wait,
                               struct keytable_change *change) {
        unsigned first, end, best = UINT_MAX;
        uint64_t best_seq = UINT64_MAX;
        bool avoided_can_serve = false;
        int64_t at;

        pool_range(t, p, &first, &end);
        for (unsigned k = first; k < end; k++) {
                struct kt_key *key = &t->keys[k];
                struct keytable_change c = { .changed = false };

                key_recover_if_due(key, k, now_ms, &c);
                if (c.changed) {
                        change_merge(change, &c);
                        index_update(t, p, k, now_ms);
                }
                if (key->state == KEY_COOLING) {
                        earliest(&wait->retry_at_ms, key->cooldown_until_ms);
                        continue;
                }
                if (key->state != KEY_READY)
                        continue;
                /* rpm first: a key out of its rate is not freed by a release, so it is not
                 * "busy" even when it is full as well. */
                if (!gcra_allows(key, now_ms, &at)) {
                        earliest(&wait->retry_at_ms, at);
                        continue;
                }
                if (key->max_concurrent > 0 && key->in_flight >= key->max_concurrent) {
                        wait->busy = true;
                        continue;
                }
                if (k == avoid_key) {
                        avoided_can_serve = true;
                        continue;
                }
                if (key->use_seq < best_seq) {
                        best = k;
                        best_seq = key->use_seq;
                }
        }
        if (best == UINT_MAX && avoided_can_serve)
                best = avoid_key;
        return best;
}

int keytable_acquire(struct keytable *t, unsigned slot, unsigned pool, int64_t now_ms,
                     unsigned avoid_key, struct keytable_lease *ret_lease,
                     struct keytable_wait *ret_wait, struct keytable_change *ret_change) {
        struct keytable_change change = { .changed = false };
        struct keytable_wait wait = { .retry_at_ms = 0, .busy = false };
        unsigned first, end, index, best, b, gp;
        struct kt_pool *p;
        struct kt_key *key;
        int r;

        if (!t || !ret_lease || slot >= t->n_slots)
                return -EINVAL;
        /* A lease on a FREE slot would never be returned by keytable_slot_release. */
        if (LOAD(&t->slots[slot].stage) == WORKER_STAGE_FREE)
                return -EINVAL;
        b = slot_bank(t, slot);
        if (pool >= bank_n_pools(t, b))
                return -EINVAL;
        gp = bank_first_pool(t, b) + pool;

        pool_lock(t, gp);
        p = &t->pools[gp];

        /* Only this slot's owner fills its leases, so a free entry found now stays free. Looked
         * up before anything is touched, so a full slot changes nothing. */
        r = slot_find_free_lease(t, slot, &index);
        if (r < 0) {
                pool_unlock(t, gp);
                return r;
        }

        mark(&p->dirty, 1);
        pool_range(t, gp, &first, &end);
        if (!p->index_valid)
                index_rebuild(t, gp, now_ms);
        index_run_due(t, gp, now_ms, &change);
        best = UINT_MAX;
        /* A negative clock is a test's: the scan's retry time treats 0 as "none", and only
         * the scan itself says what that makes of times at or below it. */
        if (p->index_valid && now_ms >= 0 && now_ms >= p->gcra_since_ms) {
                best = choose_from_index(t, gp, avoid_key, &wait);
                if (best != UINT_MAX && (best < first || best >= end))
                        index_stale(t, gp);
        }
        if (!p->index_valid || now_ms < 0 || now_ms < p->gcra_since_ms) {
                wait = (struct keytable_wait) { .retry_at_ms = 0, .busy = false };
                best = choose_by_scan(t, gp, now_ms, avoid_key, &wait, &change);
        }

        if (change.changed)
                change.key_position = change.key - first;
        if (best == UINT_MAX) {
                mark(&p->dirty, 0);
                pool_unlock(t, gp);
                if (ret_wait)
                        *ret_wait = wait;
                /* A key may have come back and still be unable to serve (out of rpm, full):
                 * its recovery is news all the same. */
                if (ret_change)
                        *ret_change = change;
                return -EAGAIN;
        }

        key = &t->keys[best];
        mark(&key->dirty, 1);
        /* Lease first, count second: a recount after a death in between finds the truth. */
        STORE(&slot_leases(t, slot)[index], best + 1);
        key->in_flight++;
        key->requests++;
        key->use_seq = ++p->use_seq;
        key->last_used_ms = now_ms;
        gcra_take(key, now_ms);
        mark(&key->dirty, 0);
        index_requeue(t, gp, best, now_ms);
        /* In a big pool the next key to go is a row no one has touched for a whole round: start
         * fetching it now, while this request is out, rather than in the next one's lock. */
        if (p->index_valid && p->head != KT_NIL && p->head >= first && p->head < end) {
                const char *row = (const char *) &t->keys[p->head];

                for (size_t off = 0; off < sizeof(struct kt_key); off += KT_ALIGN)
                        __builtin_prefetch(row + off, 1);
                __builtin_prefetch(&t->links[p->head], 1);
        }
        STORE(&t->slots[slot].lease_hint, index + 1 < t->leases_per_slot ? index + 1 : 0);
        mark(&p->dirty, 0);
        pool_unlock(t, gp);

        *ret_lease = (struct keytable_lease) {
                .pool = pool,
                .key = best,
                .position = best - first,
                .slot = slot,
                .index = index,
        };
        if (ret_change)
                *ret_change = change;
        return 0;
}

/* Cools a ready or cooling key until at least until_ms: a longer rest already there stands, and
 * a disabled key stays disabled (the stronger verdict). True when the row changed. The caller
 * has marked the row and ended any cooldown that had run out. */
static bool key_cool(struct kt_key *key, uint32_t reason, int64_t until_ms, int64_t now_ms) {
        if (key->state == KEY_DISABLED)
                return false;
        /* Requests overlap: never let a later, shorter hint shorten a rest already given. */
        if (key->state == KEY_COOLING && key->cooldown_until_ms >= until_ms)
                return false;
        /* Only a fresh rate limit moves the start: more 429s from requests already in flight
         * are the same limit. */
        if (reason == KEY_REASON_RATE_LIMITED &&
            (key->state != KEY_COOLING || key->reason != KEY_REASON_RATE_LIMITED))
                key->cooling_since_ms = now_ms;
        key->state = KEY_COOLING;
        key->reason = reason;
        key->cooldown_until_ms = until_ms;
        return true;
}

static void report(struct keytable_change *change, unsigned k, uint32_t from,
                   const struct kt_key *key) {
        *change = (struct keytable_change) {
                .changed = true,
                .key = k,
                .from = from,
                .to = key->state,
                .reason = key->reason,
                .until_ms = key->state == KEY_COOLING ? key->cooldown_until_ms : 0,
        };
}

/* Copies a message into a row, cut to fit at a character boundary (readers put it into JSON,
 * which takes only whole UTF-8) and with control bytes blanked (it ends up on terminals). */
static void error_copy(char dst[KEYTABLE_ERROR_MAX + 1], const char *src) {
        size_t n = strnlen(src, KEYTABLE_ERROR_MAX + 1);

        if (n > KEYTABLE_ERROR_MAX) {
                n = KEYTABLE_ERROR_MAX;
                /* Back off the continuation bytes of a character the cut would split, and its
                 * lead byte. */
                while (n > 0 && ((unsigned char) src[n] & 0xC0) == 0x80)
                        n--;
        }
        for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char) src[i];

                dst[i] = c < 0x20 || c == 0x7f ? ' ' : (char) c;
        }
        dst[n] = '\0';
}

/* Applies one outcome to a key row; the caller holds the pool lock and has marked the row. */
static void key_record(struct kt_key *key, unsigned k, const struct keytable_outcome *o,
                       const struct keytable_policy *pol, int64_t now_ms,
                       struct keytable_change *change) {
        uint32_t from = key->state;
        int64_t rest;

        switch (o->cls) {
        case VERDICT_RATE_LIMITED:
                key->rate_limited++;
                rest = o->rest_ms < 1 ? 1 : o->rest_ms;
                if (key_cool(key, KEY_REASON_RATE_LIMITED, add_sat(now_ms, rest), now_ms))
                        report(change, k, from, key);
                break;

        case VERDICT_AUTH:
        case VERDICT_QUOTA:
                key->failures++;
                if (from == KEY_DISABLED || o->unconfirmed)
                        break;
                key->state = KEY_DISABLED;
                key->reason = o->cls == VERDICT_AUTH ? KEY_REASON_AUTH : KEY_REASON_QUOTA;
                key->cooldown_until_ms = 0;
                key->cooling_since_ms = 0;
                key->next_probe_ms = probe_time(pol, key->reason, now_ms);
                report(change, k, from, key);
                break;

        case VERDICT_OK:
                key->successes++;
                key->consecutive_failures = 0;
                /* The answer said the key has nothing left until then: rest it as for a rate
                 * limit (without counting one) rather than spend the next request on a 429. */
                if (o->rest_ms > 0 &&
                    key_cool(key, KEY_REASON_RATE_LIMITED, add_sat(now_ms, o->rest_ms), now_ms))
                        report(change, k, from, key);
                break;

        case VERDICT_TRANSIENT:
                key->failures++;
                if (key->consecutive_failures < UINT32_MAX)
                        key->consecutive_failures++;
                /* Upstream trouble is not blamed on one key, but a key that fails run after run
                 * while others work is worth a rest. A resting key is not cooled again. */
                if (pol->transient_threshold > 0 && from == KEY_READY &&
                    key->consecutive_failures >= pol->transient_threshold) {
                        rest = pol->transient_cooldown_ms < 1 ? 1 : pol->transient_cooldown_ms;
                        if (key_cool(key, KEY_REASON_TRANSIENT, add_sat(now_ms, rest), now_ms))
                                report(change, k, from, key);
                }
                break;

        case VERDICT_CALLER:
        default:
                break;
        }

        /* Whatever the outcome, tokens the caller counted were spent on this key. */
        key->tokens_in += o->tokens_in;
        key->tokens_out += o->tokens_out;

        if (o->figures.remaining_requests != -1 || o->figures.remaining_tokens != -1 ||
            o->figures.reset_requests_ms != -1 || o->figures.reset_tokens_ms != -1) {
                /* Providers send some figures on some answers: keep the last of each. */
                if (o->figures.remaining_requests != -1)
                        key->figures.remaining_requests = o->figures.remaining_requests;
                if (o->figures.remaining_tokens != -1)
                        key->figures.remaining_tokens = o->figures.remaining_tokens;
                if (o->figures.reset_requests_ms != -1)
                        key->figures.reset_requests_ms = o->figures.reset_requests_ms;
                if (o->figures.reset_tokens_ms != -1)
                        key->figures.reset_tokens_ms = o->figures.reset_tokens_ms;
                key->figures_ms = now_ms;
        }

        if (o->cls > VERDICT_NONE && o->cls < _VERDICT_MAX) {
                key->last_status = o->status;
                key->last_class = o->cls;
                key->by_class[o->cls]++;
        }
        /* A success says nothing about the last error: it stays until the next one. */
        if (o->error)
                error_copy(key->last_error, o->error);
}

/* After a rate limit cooled a key: is every usable key of the pool resting from a rate limit
 * that began within KT_ACCOUNT_WINDOW_MS of now? Keys failing together like that point at a
 * limit on the account or the address, not on the keys. Caller holds the pool lock. */
static bool pool_limited_at_once(const struct keytable *t, unsigned p, int64_t now_ms,
                                 int64_t *ret_until_ms) {
        int64_t until = 0, lo = add_sat(now_ms, -KT_ACCOUNT_WINDOW_MS),
                hi = add_sat(now_ms, KT_ACCOUNT_WINDOW_MS);
        const struct kt_pool *pool = &t->pools[p];
        unsigned first, end, n = 0;

        pool_range(t, p, &first, &end);
        /* The index answers at once in the usual case, a pool where something can serve: a
         * key that can (listed, full) is ready, and so is the first entry of the heap if it is
         * due (a key back within its rpm, or one whose rest is over). */
        if (pool->index_valid &&
            (pool->head != KT_NIL || pool->n_full > 0 ||
             (pool->n_due > 0 && pool->n_due <= end - first && t->due[first].at_ms <= now_ms)))
                return false;
        for (unsigned k = first; k < end; k++) {
                const struct kt_key *key = &t->keys[k];

                if (key->state == KEY_DISABLED)
                        continue;
                if (key->state != KEY_COOLING || key->reason != KEY_REASON_RATE_LIMITED ||
                    key->cooldown_until_ms <= now_ms || key->cooling_since_ms < lo ||
                    key->cooling_since_ms > hi)
                        return false;
                n++;
                if (key->cooldown_until_ms > until)
                        until = key->cooldown_until_ms;
        }
        /* One key limited alone says nothing about the account. */
        if (n < 2)
                return false;
        *ret_until_ms = until;
        return true;
}

/* Cools the rows of key k's id in other pools of its bank until at least until_ms, one pool
 * lock at a time (the caller holds none). pool is k's pool row. Returns how many rows it
 * changed. */
static unsigned twins_cool(struct keytable *t, unsigned k, unsigned pool, int64_t until_ms,
                           int64_t now_ms) {
        unsigned b = k / t->max_keys, n = 0, cur = k, lo = bank_first_key(t, b),
                 hi = lo + bank_n_keys(t, b), n_pools = bank_n_pools(t, b);
        char id[KEYID_ID_LEN + 1];

        /* Ids never change once written; copied so the check below compares with a string. */
        memcpy(id, t->keys[k].id, sizeof id - 1);
        id[sizeof id - 1] = '\0';

        /* A circle holds one row per pool at most: the bound only matters if it was broken. */
        for (unsigned step = 0; step < n_pools; step++) {
                unsigned next = LOAD(&t->keys[cur].twin), q, first, end;
                struct kt_key *twin;

                if (next == k || next == cur || next < lo || next >= hi)
                        break;
                cur = next;
                q = t->keys[next].pool;
                if (!pool_row_valid(t, q) || q / t->max_pools != b || q == pool)
                        continue;

                pool_lock(t, q);
                pool_range(t, q, &first, &end);
                twin = &t->keys[next];
                if (next >= first && next < end &&
                    strncmp(twin->id, id, sizeof twin->id) == 0) {
                        mark(&t->pools[q].dirty, 1);
                        key_recover_if_due(twin, next, now_ms, NULL);
                        mark(&twin->dirty, 1);
                        if (key_cool(twin, KEY_REASON_RATE_LIMITED, until_ms, now_ms))
                                n++;
                        mark(&twin->dirty, 0);
                        index_update(t, q, next, now_ms);
                        mark(&t->pools[q].dirty, 0);
                }
                pool_unlock(t, q);
        }
        return n;
}

void keytable_release(struct keytable *t, const struct keytable_lease *lease,
                      const struct keytable_outcome *o, int64_t now_ms,
                      struct keytable_change *ret_change) {
        struct keytable_change change = { .changed = false };
        struct keytable_policy pol;
        unsigned first, end, b, gp;
        bool was_full, cool_twins = false;
        int64_t until = 0, account_until;
        uint32_t *entry;
        struct kt_pool *p;
        struct kt_key *key;

        if (ret_change)
                *ret_change = change;
        if (!t || !lease || lease->slot >= t->n_slots || lease->index >= t->leases_per_slot)
                return;
        /* The slot's bank is the one its leases were taken in, whatever is current now. */
        b = slot_bank(t, lease->slot);
        if (lease->pool >= bank_n_pools(t, b))
                return;
        gp = bank_first_pool(t, b) + lease->pool;

        policy_load(t, &pol);
        pool_lock(t, gp);
        p = &t->pools[gp];
        pool_range(t, gp, &first, &end);
        entry = &slot_leases(t, lease->slot)[lease->index];
        /* A lease released twice, or already returned by keytable_slot_release, must not take
         * a second request off the count. */
        if (lease->key < first || lease->key >= end || LOAD(entry) != lease->key + 1) {
                pool_unlock(t, gp);
                return;
        }

        key = &t->keys[lease->key];
        mark(&p->dirty, 1);
        key_recover_if_due(key, lease->key, now_ms, &change);
        was_full = key->max_concurrent > 0 && key->in_flight >= key->max_concurrent;
        mark(&key->dirty, 1);
        if (o)
                key_record(key, lease->key, o, &pol, now_ms, &change);
        /* Count first, lease second: the mirror of acquire. */
        if (key->in_flight > 0)
                key->in_flight--;
        STORE(entry, 0);
        mark(&key->dirty, 0);
        /* Before the account check below, which reads the index. */
        index_update(t, gp, lease->key, now_ms);

        if (o && change.changed && change.to == KEY_COOLING &&
            change.reason == KEY_REASON_RATE_LIMITED) {
                until = key->cooldown_until_ms;
                cool_twins = pol.cooldown_scope_key;
                /* A success proves the account serves: only real rate limits suspect it. */
                if (o->cls == VERDICT_RATE_LIMITED &&
                    pool_limited_at_once(t, gp, now_ms, &account_until)) {
                        if (account_until > LOAD(&p->account_limit_until_ms))
                                STORE(&p->account_limit_until_ms, account_until);
                        change.account_limit_suspected = true;
                }
        }
        change.key = lease->key;
        change.key_position = lease->key - first;
        /* A slot freed on a key that has just gone to rest frees nothing anyone can use. */
        /* Waiters for a full key must hear of this release even when the key now rests: the
         * rest has an end they can wait for, which they could not see while it was full. */
        change.freed_capacity = was_full;
        mark(&p->dirty, 0);
        pool_unlock(t, gp);

        if (cool_twins)
                change.twins_cooled = twins_cool(t, lease->key, gp, until, now_ms);
        if (ret_change)
                *ret_change = change;
}

/* --- probes and operator actions ----------------------------------------------------------- */

unsigned keytable_recover_due(struct keytable *t, int64_t now_ms, unsigned *ret_pools,
                              unsigned *ret_positions, unsigned max) {
        unsigned b, n = 0;

        if (!t || (max > 0 && (!ret_pools || !ret_positions)))
                return 0;
        b = bank_current(t);
        for (unsigned i = 0; i < bank_n_pools(t, b) && n < max; i++) {
                unsigned first, end, p = bank_first_pool(t, b) + i;

                pool_lock(t, p);
                pool_range(t, p, &first, &end);
                /* Every cooling key is in the heap: none is due while its first entry is not. */
                if (t->pools[p].index_valid && t->pools[p].n_due <= end - first &&
                    (t->pools[p].n_due == 0 || t->due[first].at_ms > now_ms)) {
                        pool_unlock(t, p);
                        continue;
                }
                mark(&t->pools[p].dirty, 1);
                for (unsigned k = first; k < end && n < max; k++) {
                        struct keytable_change change = { .changed = false };

                        key_recover_if_due(&t->keys[k], k, now_ms, &change);
                        if (!change.changed)
                                continue;
                        index_update(t, p, k, now_ms);
                        ret_pools[n] = i;
                        ret_positions[n] = k - first;
                        n++;
                }
                mark(&t->pools[p].dirty, 0);
                pool_unlock(t, p);
        }
        return n;
}

int keytable_probe_claim(struct keytable *t, int64_t now_ms, unsigned *ret_key, unsigned *ret_pool) {
        struct keytable_policy pol;
        unsigned b;

        if (!t)
                return -EINVAL;
        policy_load(t, &pol);
        /* Without an interval a claim could not move the probe ahead, and every worker would
         * probe the same key at once. */
        if (pol.probe_interval_ms <= 0)
                return -ENOENT;

        /* Only the current bank: an older generation's rows go away with it, and its keys that
         * live on were carried over with their probe times. */
        b = bank_current(t);
        for (unsigned i = 0; i < bank_n_pools(t, b); i++) {
                unsigned first, end, p = bank_first_pool(t, b) + i;

                pool_lock(t, p);
                pool_range(t, p, &first, &end);
                for (unsigned k = first; k < end; k++) {
                        struct kt_key *key = &t->keys[k];

                        if (key->state != KEY_DISABLED || key->next_probe_ms <= 0 ||
                            key->next_probe_ms > now_ms)
                                continue;
                        if (key->reason != KEY_REASON_QUOTA &&
                            !(key->reason == KEY_REASON_AUTH && pol.probe_auth))
                                continue;
                        key->next_probe_ms = add_sat(now_ms, pol.probe_interval_ms);
                        pool_unlock(t, p);
                        if (ret_key)
                                *ret_key = k;
                        if (ret_pool)
                                *ret_pool = i;
                        return 0;
                }
                pool_unlock(t, p);
        }
        return -ENOENT;
}

int keytable_enable(struct keytable *t, unsigned key, int64_t now_ms,
                    struct keytable_change *ret_change) {
        struct keytable_change change = { .changed = false, .key = key };
        struct kt_key *row;
        uint32_t from;
        unsigned p, position;
        int r;

        r = key_lock(t, key, &p, &position);
        if (r < 0)
                return r;
        row = &t->keys[key];
        from = row->state;
        mark(&t->pools[p].dirty, 1);
        mark(&row->dirty, 1);
        row->state = KEY_READY;
        row->reason = KEY_REASON_NONE;
        row->consecutive_failures = 0;
        row->next_probe_ms = 0;
        row->cooldown_until_ms = 0;
        row->cooling_since_ms = 0;
        mark(&row->dirty, 0);
        index_update(t, p, key, now_ms);
        mark(&t->pools[p].dirty, 0);
        pool_unlock(t, p);

        change.key_position = position;
        if (from != KEY_READY)
                change = (struct keytable_change) {
                        .changed = true,
                        .key = key,
                        .key_position = position,
                        .from = from,
                        .to = KEY_READY,
                        .reason = KEY_REASON_NONE,
                };
        if (ret_change)
                *ret_change = change;
        return 0;
}

int keytable_disable(struct keytable *t, unsigned key, enum key_reason reason, int64_t now_ms,
                     struct keytable_change *ret_change) {
        struct keytable_change change = { .changed = false, .key = key };
        struct keytable_policy pol;
        uint32_t from, from_reason;
        struct kt_key *row;
        unsigned p, position;
        int r;

        if (!t || reason <= KEY_REASON_NONE || reason >= _KEY_REASON_MAX)
                return -EINVAL;
        policy_load(t, &pol);
        r = key_lock(t, key, &p, &position);
        if (r < 0)
                return r;
        row = &t->keys[key];
        from = row->state;
        from_reason = row->reason;
        mark(&t->pools[p].dirty, 1);
        mark(&row->dirty, 1);
        row->state = KEY_DISABLED;
        row->reason = reason;
        row->cooldown_until_ms = 0;
        row->cooling_since_ms = 0;
        /* A key the operator took out stays out until the operator says otherwise. */
        row->next_probe_ms = probe_time(&pol, reason, now_ms);
        mark(&row->dirty, 0);
        index_update(t, p, key, now_ms);
        mark(&t->pools[p].dirty, 0);
        pool_unlock(t, p);

        change.key_position = position;
        if (from != KEY_DISABLED || from_reason != (uint32_t) reason)
                change = (struct keytable_change) {
                        .changed = true,
                        .key = key,
                        .key_position = position,
                        .from = from,
                        .to = KEY_DISABLED,
                        .reason = reason,
                };
        if (ret_change)
                *ret_change = change;
        return 0;
}

/* --- persistence --------------------------------------------------------------------------- */

/* Can a key really be in st? Only what the writers of this module produce is let in. */
static bool key_state_possible(const struct keytable_key_state *st) {
        if (!key_state_valid((uint32_t) st->state) || (unsigned) st->reason >= _KEY_REASON_MAX ||
            (unsigned) st->last_class >= _VERDICT_MAX)
                return false;
        if (st->last_status < 0 || st->last_status > 999 || st->last_used_ms < 0)
                return false;
        switch (st->state) {
        case KEY_READY:
                return st->reason == KEY_REASON_NONE;
        case KEY_COOLING:
                return st->reason != KEY_REASON_NONE && st->cooldown_until_ms > 0;
        case KEY_DISABLED:
                return st->reason != KEY_REASON_NONE;
        default:
                return false;
        }
}

int keytable_restore_key(struct keytable *t, unsigned pool, unsigned position,
                         const struct keytable_key_state *st, int64_t now_ms) {
        struct keytable_policy pol;
        unsigned b, p, first, end;
        struct kt_key *key;

        if (!t || !st || !key_state_possible(st))
                return -EINVAL;
        b = bank_current(t);
        if (pool >= bank_n_pools(t, b))
                return -EINVAL;
        p = bank_first_pool(t, b) + pool;
        policy_load(t, &pol);

        pool_lock(t, p);
        pool_range(t, p, &first, &end);
        if (position >= end - first) {
                pool_unlock(t, p);
                return -EINVAL;
        }
        key = &t->keys[first + position];
        mark(&t->pools[p].dirty, 1);
        mark(&key->dirty, 1);
        key->state = st->state;
        key->reason = st->reason;
        key->cooldown_until_ms = st->state == KEY_COOLING ? st->cooldown_until_ms : 0;
        /* When the rest began is not known: a restored key never makes a later rate limit look
         * account-wide. */
        key->cooling_since_ms = 0;
        key->next_probe_ms = st->state == KEY_DISABLED ? probe_time(&pol, st->reason, now_ms) : 0;
        key->consecutive_failures = st->consecutive_failures;
        key->requests = st->requests;
        key->successes = st->successes;
        key->rate_limited = st->rate_limited;
        key->failures = st->failures;
        key->tokens_in = st->tokens_in;
        key->tokens_out = st->tokens_out;
        key->last_status = st->last_status;
        key->last_class = st->last_class;
        key->last_used_ms = st->last_used_ms;
        mark(&key->dirty, 0);
        /* A rest that ended while keypool was down ends as any other does. */
        key_recover_if_due(key, first + position, now_ms, NULL);
        index_update(t, p, first + position, now_ms);
        mark(&t->pools[p].dirty, 0);
        pool_unlock(t, p);
        return 0;
}

/* --- readers ------------------------------------------------------------------------------- */

unsigned keytable_n_pools(const struct keytable *t) {
        return t ? bank_n_pools(t, bank_current(t)) : 0;
}

unsigned keytable_n_keys(const struct keytable *t) {
        return t ? bank_n_keys(t, bank_current(t)) : 0;
}

unsigned keytable_n_slots(const struct keytable *t) {
        return t ? t->n_slots : 0;
}

int64_t keytable_created_ms(const struct keytable *t) {
        return t ? t->hdr->created_ms : 0;
}

uint64_t keytable_repairs(const struct keytable *t) {
        return t ? __atomic_load_n(&t->hdr->repairs, __ATOMIC_RELAXED) : 0;
}

/* Pool row p's view; the caller holds its lock. */
static void pool_view_locked(const struct keytable *t, unsigned p, struct keytable_pool_view *ret) {
        const struct kt_pool *pool = &t->pools[p];
        unsigned first, end;

        *ret = (struct keytable_pool_view) {};
        memcpy(ret->name, pool->name, sizeof ret->name - 1);
        memcpy(ret->model, pool->model, sizeof ret->model - 1);
        pool_range(t, p, &first, &end);
        ret->first_key = first;
        ret->n_keys = end - first;
        ret->account_limit_until_ms = LOAD(&pool->account_limit_until_ms);
        ret->rotations = LOAD(&pool->rotations);
        for (unsigned i = 0; i < KEYTABLE_LATENCY_BUCKETS; i++) {
                ret->latency_buckets[i] = LOAD(&pool->latency_buckets[i]);
                ret->latency_count += ret->latency_buckets[i];
        }
        ret->latency_sum_ms = LOAD(&pool->latency_sum_ms);
}

static int bank_pool_info(const struct keytable *t, unsigned b, unsigned pool,
                          struct keytable_pool_view *ret) {
        struct keytable_pool_view v;
        unsigned p;

        if (pool >= bank_n_pools(t, b))
                return -EINVAL;
        p = bank_first_pool(t, b) + pool;
        pool_lock(t, p);
        pool_view_locked(t, p, &v);
        pool_unlock(t, p);
        *ret = v;
        return 0;
}

int keytable_pool_info(const struct keytable *t, unsigned pool, struct keytable_pool_view *ret) {
        if (!t || !ret)
                return -EINVAL;
        return bank_pool_info(t, bank_current(t), pool, ret);
}

int keytable_slot_pool_info(const struct keytable *t, unsigned slot, unsigned pool,
                            struct keytable_pool_view *ret) {
        if (!t || !ret || slot >= t->n_slots)
                return -EINVAL;
        return bank_pool_info(t, slot_bank(t, slot), pool, ret);
}

/* Copies the current bank's pool, view and keys, under its lock; the number of keys, or
 * -ENOBUFS when they are more than max. */
static int pool_read(struct keytable *t, unsigned pool, int64_t now_ms,
                     struct keytable_pool_view *ret_info, struct keytable_key_view *ret_keys,
                     unsigned max) {
        struct keytable_pool_view info;
        unsigned b = bank_current(t), first, end, p;

        if (pool >= bank_n_pools(t, b))
                return -EINVAL;
        p = bank_first_pool(t, b) + pool;

        pool_lock(t, p);
        pool_range(t, p, &first, &end);
        if (end - first > max) {
                pool_unlock(t, p);
                return -ENOBUFS;
        }
        pool_view_locked(t, p, &info);
        for (unsigned k = first; k < end; k++) {
                const struct kt_key *key = &t->keys[k];
                struct keytable_key_view *v = &ret_keys[k - first];

                *v = (struct keytable_key_view) {
                        .pool = pool,
                        .position = k - first,
                        .state = key->state,
                        .reason = key->reason,
                        .cooldown_until_ms = key->cooldown_until_ms,
                        .last_used_ms = key->last_used_ms,
                        .requests = key->requests,
                        .successes = key->successes,
                        .rate_limited = key->rate_limited,
                        .failures = key->failures,
                        .tokens_in = key->tokens_in,
                        .tokens_out = key->tokens_out,
                        .last_status = key->last_status,
                        .last_class = key->last_class,
                        .in_flight = key->in_flight,
                        .consecutive_failures = key->consecutive_failures,
                        .max_concurrent = key->max_concurrent,
                        .rpm = key->rpm,
                        .next_probe_ms = key->state == KEY_DISABLED ? key->next_probe_ms : 0,
                        .figures = key->figures,
                        .figures_ms = key->figures_ms,
                };
                memcpy(v->id, key->id, sizeof v->id - 1);
                memcpy(v->masked, key->masked, sizeof v->masked - 1);
                memcpy(v->by_class, key->by_class, sizeof v->by_class);
                memcpy(v->last_error, key->last_error, sizeof v->last_error - 1);
        }
        pool_unlock(t, p);

        /* A cooldown that has run out is over, whether or not an acquire has noticed yet. */
        for (unsigned i = 0; i < end - first; i++) {
                struct keytable_key_view *v = &ret_keys[i];

                if (v->state == KEY_COOLING && v->cooldown_until_ms <= now_ms) {
                        v->state = KEY_READY;
                        v->reason = KEY_REASON_NONE;
                        /* As the next acquire or release will find it: a new run begins. */
                        v->consecutive_failures = 0;
                }
                if (v->state != KEY_COOLING)
                        v->cooldown_until_ms = 0;
        }
        if (ret_info)
                *ret_info = info;
        return (int) (end - first);
}

int keytable_pool_snapshot(struct keytable *t, unsigned pool, int64_t now_ms,
                           struct keytable_key_view *ret) {
        int r;

        if (!t || !ret)
                return -EINVAL;
        r = pool_read(t, pool, now_ms, NULL, ret, UINT_MAX);
        return r < 0 ? r : 0;
}

int keytable_pool_read(struct keytable *t, unsigned pool, int64_t now_ms,
                       struct keytable_pool_view *ret_info, struct keytable_key_view *ret_keys,
                       unsigned max) {
        if (!t || (!ret_keys && max > 0))
                return -EINVAL;
        return pool_read(t, pool, now_ms, ret_info, ret_keys, max);
}

unsigned keytable_workers(struct keytable *t, struct keytable_worker_view *ret, unsigned max) {
        unsigned n = 0;

        if (!t || !ret)
                return 0;

        header_lock(t);
        for (unsigned s = 0; s < t->n_slots && n < max; s++) {
                const struct kt_slot *slot = &t->slots[s];
                const uint32_t *leases = slot_leases(t, s);
                uint32_t stage = LOAD(&slot->stage);
                unsigned in_flight = 0;

                if (stage == WORKER_STAGE_FREE)
                        continue;
                /* Counted from the leases themselves, so a dead worker's requests show until its
                 * slot is released. */
                for (unsigned i = 0; i < t->leases_per_slot; i++)
                        if (LOAD(&leases[i]) != 0)
                                in_flight++;
                ret[n++] = (struct keytable_worker_view) {
                        .slot = s,
                        .pid = LOAD(&slot->pid),
                        .generation = LOAD(&slot->generation),
                        .bank = LOAD(&slot->bank) & 1u,
                        .stage = stage,
                        .started_ms = LOAD(&slot->started_ms),
                        .heartbeat_ms = LOAD(&slot->heartbeat_ms),
                        .requests = LOAD(&slot->requests),
                        .in_flight = in_flight,
                        .waiters = LOAD(&slot->waiters),
                };
        }
        header_unlock(t);
        return n;
}

/* --- names --------------------------------------------------------------------------------- */

const char *keytable_state_name(enum key_state s) {
        static const char *const names[_KEY_STATE_MAX] = {
                [KEY_READY] = "ready",
                [KEY_COOLING] = "cooling",
                [KEY_DISABLED] = "disabled",
        };

        if ((unsigned) s >= _KEY_STATE_MAX || !names[s])
                return "invalid";
        return names[s];
}

const char *keytable_reason_name(enum key_reason r) {
        static const char *const names[_KEY_REASON_MAX] = {
                [KEY_REASON_RATE_LIMITED] = "rate_limited",
                [KEY_REASON_AUTH] = "auth",
                [KEY_REASON_QUOTA] = "quota",
                [KEY_REASON_TRANSIENT] = "transient",
                [KEY_REASON_OPERATOR] = "operator",
        };

        if ((unsigned) r >= _KEY_REASON_MAX)
                return NULL;
        return names[r];
}

const char *keytable_stage_name(enum worker_stage s) {
        static const char *const names[_WORKER_STAGE_MAX] = {
                [WORKER_STAGE_FREE] = "free",
                [WORKER_STAGE_STARTING] = "starting",
                [WORKER_STAGE_SERVING] = "serving",
                [WORKER_STAGE_DRAINING] = "draining",
        };

        if ((unsigned) s >= _WORKER_STAGE_MAX)
                return "invalid";
        return names[s];
}

const char *keytable_history_kind_name(enum history_kind k) {
        static const char *const names[_HISTORY_MAX] = {
                [HISTORY_ROTATE] = "rotate",
                [HISTORY_COOLDOWN] = "cooldown",
                [HISTORY_RECOVER] = "recover",
                [HISTORY_DISABLE] = "disable",
                [HISTORY_ENABLE] = "enable",
                [HISTORY_PROBE] = "probe",
        };

        if ((unsigned) k >= _HISTORY_MAX)
                return NULL;
        return names[k];
}

/* --- tests only ---------------------------------------------------------------------------- */

int keytable_test_die_holding_lock(struct keytable *t, unsigned pool, unsigned key) {
        struct kt_pool *p;
        unsigned first, end, b, gp;

        if (!t || key >= KT_BANKS * t->max_keys)
                return -EINVAL;
        b = key / t->max_keys;
        if (pool >= bank_n_pools(t, b))
                return -EINVAL;
        gp = bank_first_pool(t, b) + pool;

        pool_lock(t, gp);
        p = &t->pools[gp];
        pool_range(t, gp, &first, &end);
        if (key < first || key >= end) {
                pool_unlock(t, gp);
                return -EINVAL;
        }
        mark(&p->dirty, 1);
        mark(&t->keys[key].dirty, 1);
        t->keys[key].state = 77;
        t->keys[key].in_flight += 5;
        /* Every field a writer touches may be left half-done, the new ones too. */
        t->keys[key].tat_us = INT64_MAX;
        t->keys[key].next_probe_ms = 1;
        t->keys[key].cooling_since_ms = -5;
        t->keys[key].figures_ms = -3;
        memset(t->keys[key].last_error, 'x', sizeof t->keys[key].last_error);
        STORE(&t->keys[key].twin, UINT32_MAX - 7);
        STORE(&p->account_limit_until_ms, -9);
        /* … and the choice index half-way through a move. */
        t->links[key].prev = UINT32_MAX - 3;
        t->links[key].next = key;
        t->links[key].place = KT_DUE;
        t->links[key].heap_at = UINT32_MAX - 1;
        p->head = key;
        p->tail = UINT32_MAX - 2;
        p->n_due = UINT32_MAX;
        p->n_full = 3;
        p->gcra_since_ms = INT64_MAX;
        return 0;
}

int keytable_pool_read_alloc(struct keytable *t, unsigned pool, int64_t now_ms,
                             struct keytable_pool_view *ret_info, struct keytable_key_view **ret_keys) {
        /* Sized from a first look; a reload committed in between can only make it too small,
         * and then the read says so without writing. */
        for (int tries = 0; tries < 4; tries++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys;
                int r;

                r = keytable_pool_info(t, pool, &info);
                if (r < 0)
                        return r;
                keys = calloc(info.n_keys ? info.n_keys : 1, sizeof *keys);
                if (!keys)
                        return -ENOMEM;
                r = keytable_pool_read(t, pool, now_ms, ret_info, keys, info.n_keys);
                if (r == -ENOBUFS) {
                        free(keys);
                        continue;
                }
                if (r < 0) {
                        free(keys);
                        return r;
                }
                *ret_keys = keys;
                return r;
        }
        return -EAGAIN;
}
