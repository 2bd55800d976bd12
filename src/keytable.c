/* keytable.c — the shared key table.
 *
 * Owns the POSIX shared-memory segment that every keypoold process maps: key health and
 * counters, the pool locks, and the worker scoreboard with each worker's leases. Nothing here
 * does I/O while a lock is held, nothing here knows about HTTP or libcurl, and secrets never
 * enter this memory.
 *
 * Layout: a header, then the pool rows, key rows, worker slots and lease arrays, located by
 * offsets stored in the header (never pointers: the segment is one mapping, inherited by fork at
 * the same address, but its contents must not depend on that). The process-local struct keytable
 * caches the array addresses and the limits, so a scribbled header can never send this process
 * out of bounds.
 *
 * The leases are the truth about in-flight requests: a worker's slot holds one entry per request
 * in flight (key index + 1; 0 is free). A key's in_flight is a cache of how many lease entries
 * name it, and is rebuilt from them whenever a lock is found abandoned.
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
#define KT_VERSION 1u
#define KT_ALIGN   64u                             /* a cache line: rows locked apart stay apart */

struct kt_header {
        uint64_t magic;
        uint32_t version;
        uint32_t max_pools, max_keys, n_slots, leases_per_slot;
        uint32_t n_pools, n_keys;               /* read atomically: any process may look */
        uint64_t size;
        uint64_t off_pools, off_keys, off_slots, off_leases;
        int64_t created_ms;
        uint64_t repairs;                       /* atomic: bumped under pool locks too */
        pthread_mutex_t lock;                   /* counts, slot claim/free */
};

struct kt_pool {
        pthread_mutex_t lock;
        char name[KEYTABLE_NAME_MAX + 1];
        char model[KEYTABLE_MODEL_MAX + 1];
        uint32_t first_key, n_keys;
        uint64_t use_seq;                       /* bumped per acquire: the LRU clock */
        uint32_t dirty;
} __attribute__((aligned(KT_ALIGN)));

/* state, reason and last_class are stored as plain integers: a dead writer may leave any value
 * in them, and repair has to be able to look at it without trusting it to be an enum member. */
struct kt_key {
        char id[KEYID_ID_LEN + 1];
        char masked[KEYID_MASK_MAX + 1];
        uint32_t pool;
        uint32_t state, reason;
        uint32_t dirty;
        uint32_t in_flight, consecutive_failures;
        int32_t last_status;
        uint32_t last_class;
        int64_t cooldown_until_ms, last_used_ms;
        uint64_t use_seq;                       /* pool's use_seq at last acquire; 0 = never */
        uint64_t requests, successes, rate_limited, failures, tokens_in, tokens_out;
};

/* Written by the owning worker with atomic stores and no lock; claimed and freed under the
 * header lock, with stage written last on claim so a reader never sees a half-claimed slot. */
struct kt_slot {
        uint32_t stage;
        uint32_t generation;
        int32_t pid;
        uint32_t lease_hint;                    /* where the next free-lease search starts */
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
        unsigned max_pools, max_keys, n_slots, leases_per_slot;
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

static unsigned n_pools_of(const struct keytable *t) {
        unsigned n = LOAD(&t->hdr->n_pools);

        return n < t->max_pools ? n : t->max_pools;
}

static unsigned n_keys_of(const struct keytable *t) {
        unsigned n = LOAD(&t->hdr->n_keys);

        return n < t->max_keys ? n : t->max_keys;
}

static uint32_t *slot_leases(const struct keytable *t, unsigned slot) {
        return t->leases + (size_t) slot * t->leases_per_slot;
}

static bool key_state_valid(uint32_t s) {
        return s > KEY_STATE_INVALID && s < _KEY_STATE_MAX;
}

/* A pool row's key range, clamped to the keys that exist. */
static void pool_range(const struct keytable *t, const struct kt_pool *p, unsigned *ret_first,
                       unsigned *ret_end) {
        unsigned nk = n_keys_of(t), first = p->first_key, end;

        if (first > nk)
                first = nk;
        end = p->n_keys > nk - first ? nk : first + p->n_keys;
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
        unsigned first, end, n_leases = t->n_slots * t->leases_per_slot;
        uint64_t max_seq = pool->use_seq;

        pool_range(t, pool, &first, &end);
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
                        key->dirty = 0;
                }
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
        pool->dirty = 0;
}

/* The header lock guards the counts and the FREE/claimed transitions of slots; each of those is
 * a single store made last, so a dead holder leaves nothing half-done worth undoing. Only values
 * no writer of this module produces are put right. */
static void header_repair(const struct keytable *t, unsigned unused) {
        struct kt_header *h = t->hdr;

        if (h->n_pools > t->max_pools)
                h->n_pools = t->max_pools;
        if (h->n_keys > t->max_keys)
                h->n_keys = t->max_keys;
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
        size_t off = 0, off_hdr, off_pools, off_keys, off_slots, off_leases, n_leases;
        struct keytable *t;
        void *base;
        int fd, r;

        if (!limits || !ret)
                return -EINVAL;
        if (limits->max_pools == 0 || limits->max_keys == 0 || limits->n_slots == 0 ||
            limits->leases_per_slot == 0)
                return -EINVAL;
        /* A lease stores key index + 1 in 32 bits, and counts stay 32-bit. */
        if (limits->max_keys >= UINT32_MAX || limits->max_pools >= UINT32_MAX)
                return -E2BIG;
        if (__builtin_mul_overflow((size_t) limits->n_slots, (size_t) limits->leases_per_slot,
                                   &n_leases) || n_leases > UINT32_MAX)
                return -E2BIG;

        r = layout_add(&off, 1, sizeof(struct kt_header), &off_hdr);
        if (r == 0)
                r = layout_add(&off, limits->max_pools, sizeof(struct kt_pool), &off_pools);
        if (r == 0)
                r = layout_add(&off, limits->max_keys, sizeof(struct kt_key), &off_keys);
        if (r == 0)
                r = layout_add(&off, limits->n_slots, sizeof(struct kt_slot), &off_slots);
        if (r == 0)
                r = layout_add(&off, n_leases, sizeof(uint32_t), &off_leases);
        if (r < 0)
                return r;
        if (off > (size_t) INT64_MAX)
                return -ENOMEM;

        t = calloc(1, sizeof *t);
        if (!t)
                return -ENOMEM;

        fd = shm_open_anonymous();
        if (fd < 0) {
                free(t);
                return fd;
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
        t->max_pools = limits->max_pools;
        t->max_keys = limits->max_keys;
        t->n_slots = limits->n_slots;
        t->leases_per_slot = limits->leases_per_slot;

        /* The segment comes zero-filled: every slot FREE, every lease free. */
        t->hdr->magic = KT_MAGIC;
        t->hdr->version = KT_VERSION;
        t->hdr->max_pools = limits->max_pools;
        t->hdr->max_keys = limits->max_keys;
        t->hdr->n_slots = limits->n_slots;
        t->hdr->leases_per_slot = limits->leases_per_slot;
        t->hdr->size = off;
        t->hdr->off_pools = off_pools;
        t->hdr->off_keys = off_keys;
        t->hdr->off_slots = off_slots;
        t->hdr->off_leases = off_leases;
        t->hdr->created_ms = now_ms;

        r = mutex_init_shared(&t->hdr->lock);
        for (unsigned p = 0; r == 0 && p < t->max_pools; p++)
                r = mutex_init_shared(&t->pools[p].lock);
        if (r < 0) {
                keytable_destroy(t);
                return r;
        }

        *ret = t;
        return 0;

fail_fd:
        (void) close(fd);
        free(t);
        return r;
}

void keytable_destroy(struct keytable *t) {
        if (!t)
                return;
        /* The mutexes are left alone: other processes may still hold the mapping. */
        (void) munmap(t->base, t->size);
        free(t);
}

int keytable_add_pool(struct keytable *t, const char *name, const char *model, unsigned *ret_pool) {
        struct kt_pool *pool;
        unsigned p;

        if (!t || !name || name[0] == '\0')
                return -EINVAL;
        if (!model)
                model = "";
        if (strlen(name) > KEYTABLE_NAME_MAX || strlen(model) > KEYTABLE_MODEL_MAX)
                return -ENAMETOOLONG;

        header_lock(t);
        p = n_pools_of(t);
        if (p >= t->max_pools) {
                header_unlock(t);
                return -ENOSPC;
        }
        pool_lock(t, p);
        pool = &t->pools[p];
        strcpy(pool->name, name);
        strcpy(pool->model, model);
        pool->first_key = n_keys_of(t);
        pool->n_keys = 0;
        pool->use_seq = 0;
        pool->dirty = 0;
        pool_unlock(t, p);
        STORE(&t->hdr->n_pools, p + 1);
        header_unlock(t);

        if (ret_pool)
                *ret_pool = p;
        return 0;
}

int keytable_add_key(struct keytable *t, unsigned pool, const char *id, const char *masked,
                     unsigned *ret_key) {
        struct kt_key *key;
        unsigned k;

        if (!t || !id || id[0] == '\0')
                return -EINVAL;
        if (!masked)
                masked = "";
        if (strlen(id) > KEYID_ID_LEN || strlen(masked) > KEYID_MASK_MAX)
                return -ENAMETOOLONG;

        header_lock(t);
        /* Keys of a pool must stay contiguous, so only the newest pool can grow. */
        if (pool + 1 != n_pools_of(t)) {
                header_unlock(t);
                return -EINVAL;
        }
        k = n_keys_of(t);
        if (k >= t->max_keys) {
                header_unlock(t);
                return -ENOSPC;
        }
        pool_lock(t, pool);
        key = &t->keys[k];
        memset(key, 0, sizeof *key);
        strcpy(key->id, id);
        strcpy(key->masked, masked);
        key->pool = pool;
        key->state = KEY_READY;
        key->reason = KEY_REASON_NONE;
        key->last_class = VERDICT_NONE;
        STORE(&t->hdr->n_keys, k + 1);
        t->pools[pool].n_keys++;
        pool_unlock(t, pool);
        header_unlock(t);

        if (ret_key)
                *ret_key = k;
        return 0;
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
                STORE(&slot->pid, 0);
                STORE(&slot->lease_hint, 0);
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
        unsigned n_keys;

        if (!t || slot >= t->n_slots)
                return;

        /* The owner is gone, so this slot's leases change only here. Each lease names its pool
         * through its key; take that pool's lock once and return all of the slot's leases in it.
         * If the dead worker held that lock, locking it repairs the pool first (recounting from
         * these very leases), and the decrements below then apply to a true count. */
        leases = slot_leases(t, slot);
        n_keys = n_keys_of(t);
        for (unsigned i = 0; i < t->leases_per_slot; i++) {
                uint32_t v = LOAD(&leases[i]);
                unsigned p;

                if (v == 0)
                        continue;
                if (v - 1 >= n_keys || (p = t->keys[v - 1].pool) >= n_pools_of(t)) {
                        /* Names no key: nothing was ever counted for it. */
                        STORE(&leases[i], 0);
                        continue;
                }

                pool_lock(t, p);
                mark(&t->pools[p].dirty, 1);
                for (unsigned j = i; j < t->leases_per_slot; j++) {
                        uint32_t w = LOAD(&leases[j]);
                        struct kt_key *key;

                        if (w == 0 || w - 1 >= n_keys || t->keys[w - 1].pool != p)
                                continue;
                        key = &t->keys[w - 1];
                        if (key->in_flight > 0)
                                key->in_flight--;
                        STORE(&leases[j], 0);
                }
                mark(&t->pools[p].dirty, 0);
                pool_unlock(t, p);
        }

        header_lock(t);
        STORE(&t->slots[slot].pid, 0);
        STORE(&t->slots[slot].stage, WORKER_STAGE_FREE);
        header_unlock(t);
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

int keytable_acquire(struct keytable *t, unsigned slot, unsigned pool, int64_t now_ms,
                     struct keytable_lease *ret_lease, int64_t *ret_retry_at_ms,
                     struct keytable_change *ret_change) {
        struct keytable_change change = { .changed = false };
        unsigned first, end, index, best = UINT_MAX;
        uint64_t best_seq = UINT64_MAX;
        int64_t retry_at = 0;
        struct kt_pool *p;
        struct kt_key *key;
        int r;

        if (!t || !ret_lease || slot >= t->n_slots || pool >= n_pools_of(t))
                return -EINVAL;
        /* A lease on a FREE slot would never be returned by keytable_slot_release. */
        if (LOAD(&t->slots[slot].stage) == WORKER_STAGE_FREE)
                return -EINVAL;

        pool_lock(t, pool);
        p = &t->pools[pool];

        /* Only this slot's owner fills its leases, so a free entry found now stays free. Looked
         * up before anything is touched, so a full slot changes nothing. */
        r = slot_find_free_lease(t, slot, &index);
        if (r < 0) {
                pool_unlock(t, pool);
                return r;
        }

        mark(&p->dirty, 1);
        pool_range(t, p, &first, &end);
        for (unsigned k = first; k < end; k++) {
                key = &t->keys[k];

                if (key->state == KEY_COOLING && key->cooldown_until_ms <= now_ms) {
                        mark(&key->dirty, 1);
                        if (!change.changed)
                                change = (struct keytable_change) {
                                        .changed = true,
                                        .key = k,
                                        .from = KEY_COOLING,
                                        .to = KEY_READY,
                                        .reason = KEY_REASON_NONE,
                                };
                        key->state = KEY_READY;
                        key->reason = KEY_REASON_NONE;
                        key->cooldown_until_ms = 0;
                        mark(&key->dirty, 0);
                }

                if (key->state == KEY_COOLING) {
                        if (retry_at == 0 || key->cooldown_until_ms < retry_at)
                                retry_at = key->cooldown_until_ms;
                } else if (key->state == KEY_READY && key->use_seq < best_seq) {
                        best = k;
                        best_seq = key->use_seq;
                }
        }

        if (best == UINT_MAX) {
                /* Nothing recovered either: a recovered key would be ready. */
                mark(&p->dirty, 0);
                pool_unlock(t, pool);
                if (ret_retry_at_ms)
                        *ret_retry_at_ms = retry_at;
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
        mark(&key->dirty, 0);
        STORE(&t->slots[slot].lease_hint, index + 1 < t->leases_per_slot ? index + 1 : 0);
        mark(&p->dirty, 0);
        pool_unlock(t, pool);

        *ret_lease = (struct keytable_lease) {
                .pool = pool,
                .key = best,
                .slot = slot,
                .index = index,
        };
        if (ret_change)
                *ret_change = change;
        return 0;
}

/* Applies one outcome to a key row; the caller holds the pool lock and has marked the row. */
static void key_record(struct kt_key *key, unsigned k, const struct keytable_outcome *o,
                       int64_t now_ms, struct keytable_change *change) {
        uint32_t from = key->state;
        int64_t from_until = key->cooldown_until_ms, until, rest;

        switch (o->cls) {
        case VERDICT_RATE_LIMITED:
                key->rate_limited++;
                /* A disabled key stays disabled: the stronger verdict stands. */
                if (from == KEY_DISABLED)
                        break;
                rest = o->rest_ms < 1 ? 1 : o->rest_ms;
                if (__builtin_add_overflow(now_ms, rest, &until))
                        until = INT64_MAX;
                /* Requests overlap: never let a later, shorter hint shorten a rest a provider
                 * asked for. */
                if (from == KEY_COOLING && from_until > until)
                        until = from_until;
                key->state = KEY_COOLING;
                key->reason = KEY_REASON_RATE_LIMITED;
                key->cooldown_until_ms = until;
                if (from != KEY_COOLING || until != from_until)
                        *change = (struct keytable_change) {
                                .changed = true,
                                .key = k,
                                .from = from,
                                .to = KEY_COOLING,
                                .reason = KEY_REASON_RATE_LIMITED,
                                .until_ms = until,
                        };
                break;

        case VERDICT_AUTH:
        case VERDICT_QUOTA:
                key->failures++;
                if (from == KEY_DISABLED)
                        break;
                key->state = KEY_DISABLED;
                key->reason = o->cls == VERDICT_AUTH ? KEY_REASON_AUTH : KEY_REASON_QUOTA;
                key->cooldown_until_ms = 0;
                *change = (struct keytable_change) {
                        .changed = true,
                        .key = k,
                        .from = from,
                        .to = KEY_DISABLED,
                        .reason = key->reason,
                };
                break;

        case VERDICT_OK:
                key->successes++;
                key->consecutive_failures = 0;
                key->tokens_in += o->tokens_in;
                key->tokens_out += o->tokens_out;
                break;

        case VERDICT_TRANSIENT:
                key->failures++;
                key->consecutive_failures++;
                break;

        case VERDICT_CALLER:
        default:
                break;
        }

        if (o->cls > VERDICT_NONE && o->cls < _VERDICT_MAX) {
                key->last_status = o->status;
                key->last_class = o->cls;
        }
}

void keytable_release(struct keytable *t, const struct keytable_lease *lease,
                      const struct keytable_outcome *o, int64_t now_ms,
                      struct keytable_change *ret_change) {
        struct keytable_change change = { .changed = false };
        unsigned first, end;
        uint32_t *entry;
        struct kt_pool *p;
        struct kt_key *key;

        if (ret_change)
                *ret_change = change;
        if (!t || !lease || lease->slot >= t->n_slots || lease->index >= t->leases_per_slot ||
            lease->pool >= n_pools_of(t))
                return;

        pool_lock(t, lease->pool);
        p = &t->pools[lease->pool];
        pool_range(t, p, &first, &end);
        entry = &slot_leases(t, lease->slot)[lease->index];
        /* A lease released twice, or already returned by keytable_slot_release, must not take
         * a second request off the count. */
        if (lease->key < first || lease->key >= end || LOAD(entry) != lease->key + 1) {
                pool_unlock(t, lease->pool);
                return;
        }

        key = &t->keys[lease->key];
        mark(&p->dirty, 1);
        mark(&key->dirty, 1);
        if (o)
                key_record(key, lease->key, o, now_ms, &change);
        /* Count first, lease second: the mirror of acquire. */
        if (key->in_flight > 0)
                key->in_flight--;
        STORE(entry, 0);
        mark(&key->dirty, 0);
        mark(&p->dirty, 0);
        pool_unlock(t, lease->pool);

        if (ret_change)
                *ret_change = change;
}

/* --- readers ------------------------------------------------------------------------------- */

unsigned keytable_n_pools(const struct keytable *t) {
        return t ? n_pools_of(t) : 0;
}

unsigned keytable_n_keys(const struct keytable *t) {
        return t ? n_keys_of(t) : 0;
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

int keytable_pool_info(const struct keytable *t, unsigned pool, struct keytable_pool_view *ret) {
        const struct kt_pool *p;
        struct keytable_pool_view v = {};
        unsigned first, end;

        if (!t || !ret || pool >= n_pools_of(t))
                return -EINVAL;

        pool_lock(t, pool);
        p = &t->pools[pool];
        memcpy(v.name, p->name, sizeof v.name - 1);
        memcpy(v.model, p->model, sizeof v.model - 1);
        pool_range(t, p, &first, &end);
        pool_unlock(t, pool);

        v.first_key = first;
        v.n_keys = end - first;
        *ret = v;
        return 0;
}

int keytable_pool_snapshot(struct keytable *t, unsigned pool, int64_t now_ms,
                           struct keytable_key_view *ret) {
        unsigned first, end;

        if (!t || !ret || pool >= n_pools_of(t))
                return -EINVAL;

        pool_lock(t, pool);
        pool_range(t, &t->pools[pool], &first, &end);
        for (unsigned k = first; k < end; k++) {
                const struct kt_key *key = &t->keys[k];
                struct keytable_key_view *v = &ret[k - first];

                *v = (struct keytable_key_view) {
                        .pool = key->pool,
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
                };
                memcpy(v->id, key->id, sizeof v->id - 1);
                memcpy(v->masked, key->masked, sizeof v->masked - 1);
        }
        pool_unlock(t, pool);

        /* A cooldown that has run out is over, whether or not an acquire has noticed yet. */
        for (unsigned i = 0; i < end - first; i++) {
                struct keytable_key_view *v = &ret[i];

                if (v->state == KEY_COOLING && v->cooldown_until_ms <= now_ms) {
                        v->state = KEY_READY;
                        v->reason = KEY_REASON_NONE;
                }
                if (v->state != KEY_COOLING)
                        v->cooldown_until_ms = 0;
        }
        return 0;
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
                        .stage = stage,
                        .started_ms = LOAD(&slot->started_ms),
                        .heartbeat_ms = LOAD(&slot->heartbeat_ms),
                        .requests = LOAD(&slot->requests),
                        .in_flight = in_flight,
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

/* --- tests only ---------------------------------------------------------------------------- */

int keytable_test_die_holding_lock(struct keytable *t, unsigned pool, unsigned key) {
        struct kt_pool *p;
        unsigned first, end;

        if (!t || pool >= n_pools_of(t))
                return -EINVAL;

        pool_lock(t, pool);
        p = &t->pools[pool];
        pool_range(t, p, &first, &end);
        if (key < first || key >= end) {
                pool_unlock(t, pool);
                return -EINVAL;
        }
        mark(&p->dirty, 1);
        mark(&t->keys[key].dirty, 1);
        t->keys[key].state = 77;
        t->keys[key].in_flight += 5;
        return 0;
}
