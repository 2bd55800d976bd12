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
 * The choice index of each pool lives in keytable_index.c.
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
#include "keytable_internal.h"

const int64_t keytable_latency_bounds_ms[KEYTABLE_LATENCY_BUCKETS] = {
        50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, INT64_MAX,
};

/* --- locking and repair -------------------------------------------------------------------- */

typedef void (*repair_fn)(const struct keytable *t, unsigned arg);

/* A dead writer may have been anywhere between lease write and in_flight update, or between
 * marking a row dirty and clearing it: distrust the dirty rows' state and rebuild every key's
 * in_flight from the leases, which are written before the count goes up and cleared after it
 * goes down, and only under this pool's lock for this pool's keys. */
static void pool_repair(const struct keytable *t, unsigned p) {
        struct kt_pool *pool = &t->pools[p];
        unsigned first, end, n_leases = t->n_slots * t->leases_per_slot, b = p / t->max_pools,
                 lo = kt_bank_first_key(t, b), hi = lo + kt_bank_n_keys(t, b);
        uint64_t max_seq = pool->use_seq;

        kt_pool_range(t, p, &first, &end);
        for (unsigned k = first; k < end; k++) {
                struct kt_key *key = &t->keys[k];

                if (key->dirty || !kt_key_state_valid(key->state)) {
                        if (!kt_key_state_valid(key->state) ||
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
                if (KT_LOAD(&key->twin) < lo || KT_LOAD(&key->twin) >= hi)
                        KT_STORE(&key->twin, k);
                key->in_flight = 0;
                if (key->use_seq > max_seq)
                        max_seq = key->use_seq;
        }

        for (unsigned i = 0; i < n_leases; i++) {
                uint32_t v = KT_LOAD(&t->leases[i]);

                if (v != 0 && v - 1 >= first && v - 1 < end)
                        t->keys[v - 1].in_flight++;
        }

        pool->use_seq = max_seq;
        if (KT_LOAD(&pool->account_limit_until_ms) < 0)
                KT_STORE(&pool->account_limit_until_ms, 0);
        /* The dead owner may have been half-way through moving a key in the index, and the
         * counts above moved under it: the next acquire rebuilds it from the repaired rows. */
        kt_index_stale(t, p);
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
                KT_STORE(&h->bank, 0);
        if (h->fill >= KT_BANKS)
                KT_STORE(&h->fill, h->bank);
        for (unsigned s = 0; s < t->n_slots; s++)
                if (t->slots[s].stage >= _WORKER_STAGE_MAX)
                        /* Still held by someone as far as we know: the coordinator frees it
                         * when it reaps the owner. */
                        t->slots[s].stage = WORKER_STAGE_DRAINING;
}

/* The one place abandoned locks are handled. Any other error means this process already holds
 * the lock (EDEADLK) or a lock was released unrepaired (ENOTRECOVERABLE, which this module never
 * does): a broken invariant, not a condition to recover from. */
static void lock_abandoned(const struct keytable *t, pthread_mutex_t *m, int r, repair_fn repair,
                           unsigned arg) {
        if (r != EOWNERDEAD)
                abort();
        repair(t, arg);
        if (pthread_mutex_consistent(m) != 0)
                abort();
        __atomic_add_fetch(&t->hdr->repairs, 1, __ATOMIC_RELAXED);
}

void kt_header_lock_abandoned(const struct keytable *t, int r) {
        lock_abandoned(t, &t->hdr->lock, r, header_repair, 0);
}

void kt_pool_lock_abandoned(const struct keytable *t, unsigned p, int r) {
        lock_abandoned(t, &t->pools[p].lock, r, pool_repair, p);
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
        KT_STORE(&dst->rotations, src ? KT_LOAD(&src->rotations) : 0);
        for (unsigned i = 0; i < KEYTABLE_LATENCY_BUCKETS; i++)
                KT_STORE(&dst->latency_buckets[i], src ? KT_LOAD(&src->latency_buckets[i]) : 0);
        KT_STORE(&dst->latency_sum_ms, src ? KT_LOAD(&src->latency_sum_ms) : 0);
}

/* The current bank's pool row named name, or UINT_MAX. Names do not change while the bank is
 * current, so no lock is needed to compare them. */
static unsigned current_pool_named(const struct keytable *t, unsigned cur, const char *name) {
        unsigned p0 = kt_bank_first_pool(t, cur), n = kt_bank_n_pools(t, cur);

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

        kt_header_lock(t);
        b = kt_bank_fill(t);
        n = kt_bank_n_pools(t, b);
        if (n >= t->max_pools) {
                kt_header_unlock(t);
                return -ENOSPC;
        }
        p = kt_bank_first_pool(t, b) + n;
        /* A reload does not forget that the account looked limited a moment ago. */
        if (b != kt_bank_current(t)) {
                q = current_pool_named(t, kt_bank_current(t), name);
                if (q != UINT_MAX)
                        account_until = KT_LOAD(&t->pools[q].account_limit_until_ms);
        }

        /* No worker can see this row yet, but its lock may have been left abandoned by a dead
         * worker of the generation that used this bank last: taking it the usual way repairs
         * it (the bank is empty now, so there is nothing to recount) and leaves it consistent
         * for the generation to come. */
        kt_pool_lock(t, p);
        pool = &t->pools[p];
        memset(pool->name, 0, sizeof pool->name);
        memset(pool->model, 0, sizeof pool->model);
        strcpy(pool->name, name);
        strcpy(pool->model, model);
        pool->first_key = kt_bank_first_key(t, b) + kt_bank_n_keys(t, b);
        pool->n_keys = 0;
        pool->use_seq = 0;
        kt_index_stale(t, p);
        KT_STORE(&pool->account_limit_until_ms, account_until > 0 ? account_until : 0);
        /* What a generation before last counted here; the current pool's figures come over at
         * commit. */
        pool_counters_copy(pool, NULL);
        pool->dirty = 0;
        kt_pool_unlock(t, p);
        KT_STORE(&t->hdr->n_pools[b], n + 1);
        kt_header_unlock(t);

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

        if (!t || !kt_key_row_valid(t, key))
                return -EINVAL;
        p = t->keys[key].pool;
        kt_pool_lock(t, p);
        kt_pool_range(t, p, &first, &end);
        if (key < first || key >= end) {
                kt_pool_unlock(t, p);
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
        unsigned lo = kt_bank_first_key(t, cur), hi = lo + kt_bank_n_keys(t, cur), head, row;
        uint32_t e = *id_index_slot(t, cur, id);

        if (e == 0 || e - 1 < lo || e - 1 >= hi)
                return KEYTABLE_NO_KEY;
        head = row = e - 1;
        /* A circle holds one row per pool at most: the bound only matters if it was broken. */
        for (unsigned step = 0; step < kt_bank_n_pools(t, cur); step++) {
                unsigned p = t->keys[row].pool;

                if (kt_pool_row_valid(t, p) &&
                    strncmp(t->pools[p].name, pool_name, sizeof t->pools[p].name) == 0)
                        return row;
                row = KT_LOAD(&t->keys[row].twin);
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
        kt_pool_unlock(t, p);
        return 0;
}

/* What a row carried over by a reload keeps: its health, history and rate state. Not its
 * in-flight count (the old row keeps the leases, and they are returned there), nor its limits
 * (the new configuration's are set on the new row), nor its links. */
static void key_carry(struct kt_key *key, const struct kt_key *src) {
        key->state = kt_key_state_valid(src->state) ? src->state : KEY_READY;
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

        kt_header_lock(t);
        b = kt_bank_fill(t);
        /* Keys of a pool must stay contiguous, so only the newest pool can grow. */
        if (pool + 1 != kt_bank_n_pools(t, b)) {
                kt_header_unlock(t);
                return -EINVAL;
        }
        if (kt_bank_n_keys(t, b) >= t->max_keys) {
                kt_header_unlock(t);
                return -ENOSPC;
        }
        p = kt_bank_first_pool(t, b) + pool;
        lo = kt_bank_first_key(t, b);
        k = lo + kt_bank_n_keys(t, b);
        entry = id_index_slot(t, b, id);
        if (*entry != 0) {
                unsigned row = *entry - 1;

                /* A twin in its own pool would have its pool locked twice when cooled. */
                for (unsigned step = 0; step <= kt_bank_n_pools(t, b); step++) {
                        if (t->keys[row].pool == p) {
                                kt_header_unlock(t);
                                return -EEXIST;
                        }
                        row = KT_LOAD(&t->keys[row].twin);
                        if (row == *entry - 1 || row < lo || row >= k)
                                break;
                }
        }

        /* One pool lock at a time: the old row is copied under its own lock, and written to the
         * new bank only once that lock is let go. */
        if (b != kt_bank_current(t)) {
                unsigned src = carry_source(t, kt_bank_current(t), id, t->pools[p].name);

                carry = src != KEYTABLE_NO_KEY && key_copy(t, src, &carried) == 0;
        }

        kt_pool_lock(t, p);
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
                KT_STORE(&key->twin, k);
                *entry = k + 1;
        } else {
                struct kt_key *first = &t->keys[*entry - 1];

                /* The new row points into the circle before the circle points at it, so a
                 * walker already going round never steps off. */
                KT_STORE(&key->twin, KT_LOAD(&first->twin));
                KT_STORE(&first->twin, k);
        }
        KT_STORE(&t->hdr->n_keys[b], k - lo + 1);
        t->pools[p].n_keys++;
        /* Built by the first acquire, from all the rows at once. */
        kt_index_stale(t, p);
        kt_pool_unlock(t, p);
        kt_header_unlock(t);

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
        kt_mark(&row->dirty, 1);
        row->max_concurrent = max_concurrent;
        row->rpm = rpm;
        kt_mark(&row->dirty, 0);
        /* Limits change with the configuration, not per request: a rebuild is cheap enough. */
        kt_index_stale(t, p);
        kt_pool_unlock(t, p);
        return 0;
}

/* --- reload: the second bank --------------------------------------------------------------- */

int keytable_bank_begin(struct keytable *t) {
        unsigned target;

        if (!t)
                return -EINVAL;

        kt_header_lock(t);
        target = kt_bank_current(t) ^ 1u;
        /* Slots are claimed and freed under this lock, so none can start using the bank while
         * it is being emptied; one that still uses it may hold its rows or leases on them. */
        for (unsigned s = 0; s < t->n_slots; s++)
                if (KT_LOAD(&t->slots[s].stage) != WORKER_STAGE_FREE && kt_slot_bank(t, s) == target) {
                        kt_header_unlock(t);
                        return -EBUSY;
                }
        KT_STORE(&t->hdr->n_pools[target], 0);
        KT_STORE(&t->hdr->n_keys[target], 0);
        KT_STORE(&t->hdr->fill, target);
        kt_header_unlock(t);

        id_index_clear(t, target);
        return 0;
}

int keytable_bank_commit(struct keytable *t) {
        unsigned fill;

        if (!t)
                return -EINVAL;

        kt_header_lock(t);
        fill = kt_bank_fill(t);
        if (fill == kt_bank_current(t)) {
                kt_header_unlock(t);
                return -EINVAL;
        }
        /* Counters carry on from the pool of the same name, copied as late as possible: what
         * the old generation adds while it drains is not seen any more, but nothing a reader
         * saw before the switch goes backwards after it by more than that. */
        for (unsigned i = 0; i < kt_bank_n_pools(t, fill); i++) {
                unsigned p = kt_bank_first_pool(t, fill) + i,
                         q = current_pool_named(t, kt_bank_current(t), t->pools[p].name);

                if (q != UINT_MAX)
                        pool_counters_copy(&t->pools[p], &t->pools[q]);
        }
        /* One store: a reader sees the old bank or the new one, each whole, since every row of
         * the new bank was written before it. */
        KT_STORE(&t->hdr->bank, fill);
        kt_header_unlock(t);
        return 0;
}

void keytable_bank_abort(struct keytable *t) {
        unsigned fill, cur;

        if (!t)
                return;

        kt_header_lock(t);
        fill = kt_bank_fill(t);
        cur = kt_bank_current(t);
        if (fill != cur) {
                KT_STORE(&t->hdr->fill, cur);
                KT_STORE(&t->hdr->n_pools[fill], 0);
                KT_STORE(&t->hdr->n_keys[fill], 0);
        }
        kt_header_unlock(t);

        if (fill != cur)
                id_index_clear(t, fill);
}

unsigned keytable_bank_current(const struct keytable *t) {
        return t ? kt_bank_current(t) : 0;
}

void keytable_set_policy(struct keytable *t, const struct keytable_policy *p) {
        struct kt_policy *dst;

        if (!t || !p)
                return;
        dst = &t->hdr->policy;
        kt_header_lock(t);
        KT_STORE(&dst->cooldown_scope_key, p->cooldown_scope_key ? 1u : 0u);
        KT_STORE(&dst->transient_threshold, p->transient_threshold);
        KT_STORE(&dst->transient_cooldown_ms, p->transient_cooldown_ms);
        KT_STORE(&dst->probe_interval_ms, p->probe_interval_ms);
        KT_STORE(&dst->probe_auth, p->probe_auth ? 1u : 0u);
        kt_header_unlock(t);
}

/* --- worker slots -------------------------------------------------------------------------- */

int keytable_slot_claim(struct keytable *t, unsigned generation, int64_t now_ms, unsigned *ret_slot) {
        if (!t)
                return -EINVAL;

        kt_header_lock(t);
        for (unsigned s = 0; s < t->n_slots; s++) {
                struct kt_slot *slot = &t->slots[s];

                if (KT_LOAD(&slot->stage) != WORKER_STAGE_FREE)
                        continue;
                KT_STORE(&slot->generation, generation);
                /* Workers are forked after a commit, so the new generation gets the new bank. */
                KT_STORE(&slot->bank, kt_bank_current(t));
                KT_STORE(&slot->pid, 0);
                KT_STORE(&slot->lease_hint, 0);
                KT_STORE(&slot->waiters, 0);
                KT_STORE(&slot->started_ms, now_ms);
                KT_STORE(&slot->heartbeat_ms, now_ms);
                KT_STORE(&slot->requests, 0);
                KT_STORE(&slot->stage, WORKER_STAGE_STARTING);
                kt_header_unlock(t);
                if (ret_slot)
                        *ret_slot = s;
                return 0;
        }
        kt_header_unlock(t);
        return -EBUSY;
}

void keytable_slot_set_pid(struct keytable *t, unsigned slot, pid_t pid) {
        if (t && slot < t->n_slots)
                KT_STORE(&t->slots[slot].pid, (int32_t) pid);
}

void keytable_slot_set_stage(struct keytable *t, unsigned slot, enum worker_stage stage) {
        /* FREE is for keytable_slot_release alone: only it returns the slot's leases. */
        if (t && slot < t->n_slots && stage > WORKER_STAGE_FREE && stage < _WORKER_STAGE_MAX)
                KT_STORE(&t->slots[slot].stage, (uint32_t) stage);
}

void keytable_slot_heartbeat(struct keytable *t, unsigned slot, int64_t now_ms) {
        if (t && slot < t->n_slots)
                KT_STORE(&t->slots[slot].heartbeat_ms, now_ms);
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
        leases = kt_slot_leases(t, slot);
        for (unsigned i = 0; i < t->leases_per_slot; i++) {
                uint32_t v = KT_LOAD(&leases[i]);
                unsigned p;

                if (v == 0)
                        continue;
                if (!kt_key_row_valid(t, v - 1)) {
                        /* Names no key: nothing was ever counted for it. */
                        KT_STORE(&leases[i], 0);
                        continue;
                }
                p = t->keys[v - 1].pool;

                kt_pool_lock(t, p);
                kt_mark(&t->pools[p].dirty, 1);
                for (unsigned j = i; j < t->leases_per_slot; j++) {
                        uint32_t w = KT_LOAD(&leases[j]);
                        struct kt_key *key;

                        if (w == 0 || !kt_key_row_valid(t, w - 1) || t->keys[w - 1].pool != p)
                                continue;
                        key = &t->keys[w - 1];
                        if (key->in_flight > 0)
                                key->in_flight--;
                        KT_STORE(&leases[j], 0);
                }
                /* Keys that were full may serve again: a worker death is rare enough for a
                 * rebuild. */
                kt_index_stale(t, p);
                kt_mark(&t->pools[p].dirty, 0);
                kt_pool_unlock(t, p);
        }

        kt_header_lock(t);
        KT_STORE(&t->slots[slot].pid, 0);
        KT_STORE(&t->slots[slot].waiters, 0);
        KT_STORE(&t->slots[slot].stage, WORKER_STAGE_FREE);
        kt_header_unlock(t);
}

unsigned keytable_slot_bank(const struct keytable *t, unsigned slot) {
        return t && slot < t->n_slots ? kt_slot_bank(t, slot) : 0;
}

void keytable_slot_set_waiters(struct keytable *t, unsigned slot, unsigned n) {
        if (t && slot < t->n_slots)
                KT_STORE(&t->slots[slot].waiters, (uint32_t) n);
}

unsigned keytable_slots_with_waiters(const struct keytable *t, unsigned *ret_slots, unsigned max) {
        unsigned n = 0;

        if (!t || !ret_slots)
                return 0;
        /* No lock: a slot freed meanwhile costs its reader one needless wake-up at most. */
        for (unsigned s = 0; s < t->n_slots && n < max; s++)
                if (KT_LOAD(&t->slots[s].stage) != WORKER_STAGE_FREE && KT_LOAD(&t->slots[s].waiters) > 0)
                        ret_slots[n++] = s;
        return n;
}

/* --- observations -------------------------------------------------------------------------- */

/* The slot's bank's pool row for a pool index relative to it, or UINT_MAX. */
static unsigned slot_pool_row(const struct keytable *t, unsigned slot, unsigned pool) {
        unsigned b;

        if (!t || slot >= t->n_slots)
                return UINT_MAX;
        b = kt_slot_bank(t, slot);
        if (pool >= kt_bank_n_pools(t, b))
                return UINT_MAX;
        return kt_bank_first_pool(t, b) + pool;
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

        kt_header_lock(t);
        seq = t->hdr->history_seq;
        slot = &t->history[seq % t->history_size];
        kt_mark(&t->hdr->history_dirty, 1);
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
        KT_STORE(&t->hdr->history_seq, seq + 1);
        kt_mark(&t->hdr->history_dirty, 0);
        kt_header_unlock(t);
}

unsigned keytable_history_read(struct keytable *t, struct keytable_event *ret, unsigned max) {
        uint64_t seq, first;
        unsigned n = 0;

        if (!t || !ret || max == 0)
                return 0;

        kt_header_lock(t);
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
        kt_header_unlock(t);
        return n;
}

unsigned keytable_history_capacity(const struct keytable *t) {
        return t ? t->history_size : 0;
}

/* --- configuration generation -------------------------------------------------------------- */

void keytable_set_config_generation(struct keytable *t, unsigned generation) {
        if (t)
                KT_STORE(&t->hdr->config_generation, (uint32_t) generation);
}

unsigned keytable_config_generation(const struct keytable *t) {
        return t ? KT_LOAD(&t->hdr->config_generation) : 0;
}

/* --- acquire and release ------------------------------------------------------------------- */

static int slot_find_free_lease(const struct keytable *t, unsigned slot, unsigned *ret_index) {
        const uint32_t *leases = kt_slot_leases(t, slot);
        unsigned n = t->leases_per_slot, hint = KT_LOAD(&t->slots[slot].lease_hint) % n;

        for (unsigned i = 0; i < n; i++) {
                unsigned j = hint + i < n ? hint + i : hint + i - n;

                if (KT_LOAD(&leases[j]) == 0) {
                        *ret_index = j;
                        return 0;
                }
        }
        return -ENOSPC;
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
        if (KT_LOAD(&t->slots[slot].stage) == WORKER_STAGE_FREE)
                return -EINVAL;
        b = kt_slot_bank(t, slot);
        if (pool >= kt_bank_n_pools(t, b))
                return -EINVAL;
        gp = kt_bank_first_pool(t, b) + pool;

        kt_pool_lock(t, gp);
        p = &t->pools[gp];

        /* Only this slot's owner fills its leases, so a free entry found now stays free. Looked
         * up before anything is touched, so a full slot changes nothing. */
        r = slot_find_free_lease(t, slot, &index);
        if (r < 0) {
                kt_pool_unlock(t, gp);
                return r;
        }

        kt_mark(&p->dirty, 1);
        kt_pool_range(t, gp, &first, &end);
        best = kt_index_choose(t, gp, now_ms, avoid_key, &wait, &change);

        if (change.changed)
                change.key_position = change.key - first;
        if (best == UINT_MAX) {
                kt_mark(&p->dirty, 0);
                kt_pool_unlock(t, gp);
                if (ret_wait)
                        *ret_wait = wait;
                /* A key may have come back and still be unable to serve (out of rpm, full):
                 * its recovery is news all the same. */
                if (ret_change)
                        *ret_change = change;
                return -EAGAIN;
        }

        key = &t->keys[best];
        kt_mark(&key->dirty, 1);
        /* Lease first, count second: a recount after a death in between finds the truth. */
        KT_STORE(&kt_slot_leases(t, slot)[index], best + 1);
        key->in_flight++;
        key->requests++;
        key->use_seq = ++p->use_seq;
        key->last_used_ms = now_ms;
        kt_gcra_take(key, now_ms);
        kt_mark(&key->dirty, 0);
        kt_index_taken(t, gp, best, now_ms);
        KT_STORE(&t->slots[slot].lease_hint, index + 1 < t->leases_per_slot ? index + 1 : 0);
        kt_mark(&p->dirty, 0);
        kt_pool_unlock(t, gp);

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
                if (key_cool(key, KEY_REASON_RATE_LIMITED, kt_add_sat(now_ms, rest), now_ms))
                        report(change, k, from, key);
                break;

        case VERDICT_AUTH:
        case VERDICT_QUOTA:
                key->failures++;
                if (from == KEY_DISABLED)
                        break;
                key->state = KEY_DISABLED;
                key->reason = o->cls == VERDICT_AUTH ? KEY_REASON_AUTH : KEY_REASON_QUOTA;
                key->cooldown_until_ms = 0;
                key->cooling_since_ms = 0;
                key->next_probe_ms = kt_probe_time(pol, key->reason, now_ms);
                report(change, k, from, key);
                break;

        case VERDICT_OK:
                key->successes++;
                key->consecutive_failures = 0;
                /* The answer said the key has nothing left until then: rest it as for a rate
                 * limit (without counting one) rather than spend the next request on a 429. */
                if (o->rest_ms > 0 &&
                    key_cool(key, KEY_REASON_RATE_LIMITED, kt_add_sat(now_ms, o->rest_ms), now_ms))
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
                        if (key_cool(key, KEY_REASON_TRANSIENT, kt_add_sat(now_ms, rest), now_ms))
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
        int64_t until = 0, lo = kt_add_sat(now_ms, -KT_ACCOUNT_WINDOW_MS),
                hi = kt_add_sat(now_ms, KT_ACCOUNT_WINDOW_MS);
        unsigned first, end, n = 0;

        kt_pool_range(t, p, &first, &end);
        /* The index answers at once in the usual case, a pool where something can serve. */
        if (kt_index_some_key_serves(t, p, now_ms))
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
        unsigned b = k / t->max_keys, n = 0, cur = k, lo = kt_bank_first_key(t, b),
                 hi = lo + kt_bank_n_keys(t, b), n_pools = kt_bank_n_pools(t, b);
        char id[KEYID_ID_LEN + 1];

        /* Ids never change once written; copied so the check below compares with a string. */
        memcpy(id, t->keys[k].id, sizeof id - 1);
        id[sizeof id - 1] = '\0';

        /* A circle holds one row per pool at most: the bound only matters if it was broken. */
        for (unsigned step = 0; step < n_pools; step++) {
                unsigned next = KT_LOAD(&t->keys[cur].twin), q, first, end;
                struct kt_key *twin;

                if (next == k || next == cur || next < lo || next >= hi)
                        break;
                cur = next;
                q = t->keys[next].pool;
                if (!kt_pool_row_valid(t, q) || q / t->max_pools != b || q == pool)
                        continue;

                kt_pool_lock(t, q);
                kt_pool_range(t, q, &first, &end);
                twin = &t->keys[next];
                if (next >= first && next < end &&
                    strncmp(twin->id, id, sizeof twin->id) == 0) {
                        kt_mark(&t->pools[q].dirty, 1);
                        kt_key_recover_if_due(twin, next, now_ms, NULL);
                        kt_mark(&twin->dirty, 1);
                        if (key_cool(twin, KEY_REASON_RATE_LIMITED, until_ms, now_ms))
                                n++;
                        kt_mark(&twin->dirty, 0);
                        kt_index_update(t, q, next, now_ms);
                        kt_mark(&t->pools[q].dirty, 0);
                }
                kt_pool_unlock(t, q);
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
        b = kt_slot_bank(t, lease->slot);
        if (lease->pool >= kt_bank_n_pools(t, b))
                return;
        gp = kt_bank_first_pool(t, b) + lease->pool;

        kt_policy_load(t, &pol);
        kt_pool_lock(t, gp);
        p = &t->pools[gp];
        kt_pool_range(t, gp, &first, &end);
        entry = &kt_slot_leases(t, lease->slot)[lease->index];
        /* A lease released twice, or already returned by keytable_slot_release, must not take
         * a second request off the count. */
        if (lease->key < first || lease->key >= end || KT_LOAD(entry) != lease->key + 1) {
                kt_pool_unlock(t, gp);
                return;
        }

        key = &t->keys[lease->key];
        kt_mark(&p->dirty, 1);
        kt_key_recover_if_due(key, lease->key, now_ms, &change);
        was_full = key->max_concurrent > 0 && key->in_flight >= key->max_concurrent;
        kt_mark(&key->dirty, 1);
        if (o)
                key_record(key, lease->key, o, &pol, now_ms, &change);
        /* Count first, lease second: the mirror of acquire. */
        if (key->in_flight > 0)
                key->in_flight--;
        KT_STORE(entry, 0);
        kt_mark(&key->dirty, 0);
        /* Before the account check below, which reads the index. */
        kt_index_update(t, gp, lease->key, now_ms);

        if (o && change.changed && change.to == KEY_COOLING &&
            change.reason == KEY_REASON_RATE_LIMITED) {
                until = key->cooldown_until_ms;
                cool_twins = pol.cooldown_scope_key;
                /* A success proves the account serves: only real rate limits suspect it. */
                if (o->cls == VERDICT_RATE_LIMITED &&
                    pool_limited_at_once(t, gp, now_ms, &account_until)) {
                        if (account_until > KT_LOAD(&p->account_limit_until_ms))
                                KT_STORE(&p->account_limit_until_ms, account_until);
                        change.account_limit_suspected = true;
                }
        }
        change.key = lease->key;
        change.key_position = lease->key - first;
        /* A slot freed on a key that has just gone to rest frees nothing anyone can use. */
        /* Waiters for a full key must hear of this release even when the key now rests: the
         * rest has an end they can wait for, which they could not see while it was full. */
        change.freed_capacity = was_full;
        kt_mark(&p->dirty, 0);
        kt_pool_unlock(t, gp);

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
        b = kt_bank_current(t);
        for (unsigned i = 0; i < kt_bank_n_pools(t, b) && n < max; i++) {
                unsigned first, end, p = kt_bank_first_pool(t, b) + i;

                kt_pool_lock(t, p);
                kt_pool_range(t, p, &first, &end);
                if (kt_index_none_due(t, p, now_ms)) {
                        kt_pool_unlock(t, p);
                        continue;
                }
                kt_mark(&t->pools[p].dirty, 1);
                for (unsigned k = first; k < end && n < max; k++) {
                        struct keytable_change change = { .changed = false };

                        kt_key_recover_if_due(&t->keys[k], k, now_ms, &change);
                        if (!change.changed)
                                continue;
                        kt_index_update(t, p, k, now_ms);
                        ret_pools[n] = i;
                        ret_positions[n] = k - first;
                        n++;
                }
                kt_mark(&t->pools[p].dirty, 0);
                kt_pool_unlock(t, p);
        }
        return n;
}

int keytable_probe_claim(struct keytable *t, int64_t now_ms, unsigned *ret_key, unsigned *ret_pool) {
        struct keytable_policy pol;
        unsigned b;

        if (!t)
                return -EINVAL;
        kt_policy_load(t, &pol);
        /* Without an interval a claim could not move the probe ahead, and every worker would
         * probe the same key at once. */
        if (pol.probe_interval_ms <= 0)
                return -ENOENT;

        /* Only the current bank: an older generation's rows go away with it, and its keys that
         * live on were carried over with their probe times. */
        b = kt_bank_current(t);
        for (unsigned i = 0; i < kt_bank_n_pools(t, b); i++) {
                unsigned first, end, p = kt_bank_first_pool(t, b) + i;

                kt_pool_lock(t, p);
                kt_pool_range(t, p, &first, &end);
                for (unsigned k = first; k < end; k++) {
                        struct kt_key *key = &t->keys[k];

                        if (key->state != KEY_DISABLED || key->next_probe_ms <= 0 ||
                            key->next_probe_ms > now_ms)
                                continue;
                        if (key->reason != KEY_REASON_QUOTA &&
                            !(key->reason == KEY_REASON_AUTH && pol.probe_auth))
                                continue;
                        key->next_probe_ms = kt_add_sat(now_ms, pol.probe_interval_ms);
                        kt_pool_unlock(t, p);
                        if (ret_key)
                                *ret_key = k;
                        if (ret_pool)
                                *ret_pool = i;
                        return 0;
                }
                kt_pool_unlock(t, p);
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
        kt_mark(&t->pools[p].dirty, 1);
        kt_mark(&row->dirty, 1);
        row->state = KEY_READY;
        row->reason = KEY_REASON_NONE;
        row->consecutive_failures = 0;
        row->next_probe_ms = 0;
        row->cooldown_until_ms = 0;
        row->cooling_since_ms = 0;
        kt_mark(&row->dirty, 0);
        kt_index_update(t, p, key, now_ms);
        kt_mark(&t->pools[p].dirty, 0);
        kt_pool_unlock(t, p);

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
        kt_policy_load(t, &pol);
        r = key_lock(t, key, &p, &position);
        if (r < 0)
                return r;
        row = &t->keys[key];
        from = row->state;
        from_reason = row->reason;
        kt_mark(&t->pools[p].dirty, 1);
        kt_mark(&row->dirty, 1);
        row->state = KEY_DISABLED;
        row->reason = reason;
        row->cooldown_until_ms = 0;
        row->cooling_since_ms = 0;
        /* A key the operator took out stays out until the operator says otherwise. */
        row->next_probe_ms = kt_probe_time(&pol, reason, now_ms);
        kt_mark(&row->dirty, 0);
        kt_index_update(t, p, key, now_ms);
        kt_mark(&t->pools[p].dirty, 0);
        kt_pool_unlock(t, p);

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
        if (!kt_key_state_valid((uint32_t) st->state) || (unsigned) st->reason >= _KEY_REASON_MAX ||
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
        b = kt_bank_current(t);
        if (pool >= kt_bank_n_pools(t, b))
                return -EINVAL;
        p = kt_bank_first_pool(t, b) + pool;
        kt_policy_load(t, &pol);

        kt_pool_lock(t, p);
        kt_pool_range(t, p, &first, &end);
        if (position >= end - first) {
                kt_pool_unlock(t, p);
                return -EINVAL;
        }
        key = &t->keys[first + position];
        kt_mark(&t->pools[p].dirty, 1);
        kt_mark(&key->dirty, 1);
        key->state = st->state;
        key->reason = st->reason;
        key->cooldown_until_ms = st->state == KEY_COOLING ? st->cooldown_until_ms : 0;
        /* When the rest began is not known: a restored key never makes a later rate limit look
         * account-wide. */
        key->cooling_since_ms = 0;
        key->next_probe_ms = st->state == KEY_DISABLED ? kt_probe_time(&pol, st->reason, now_ms) : 0;
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
        kt_mark(&key->dirty, 0);
        /* A rest that ended while keypool was down ends as any other does. */
        kt_key_recover_if_due(key, first + position, now_ms, NULL);
        kt_index_update(t, p, first + position, now_ms);
        kt_mark(&t->pools[p].dirty, 0);
        kt_pool_unlock(t, p);
        return 0;
}

/* --- readers ------------------------------------------------------------------------------- */

unsigned keytable_n_pools(const struct keytable *t) {
        return t ? kt_bank_n_pools(t, kt_bank_current(t)) : 0;
}

unsigned keytable_n_keys(const struct keytable *t) {
        return t ? kt_bank_n_keys(t, kt_bank_current(t)) : 0;
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
        kt_pool_range(t, p, &first, &end);
        ret->first_key = first;
        ret->n_keys = end - first;
        ret->account_limit_until_ms = KT_LOAD(&pool->account_limit_until_ms);
        ret->rotations = KT_LOAD(&pool->rotations);
        for (unsigned i = 0; i < KEYTABLE_LATENCY_BUCKETS; i++) {
                ret->latency_buckets[i] = KT_LOAD(&pool->latency_buckets[i]);
                ret->latency_count += ret->latency_buckets[i];
        }
        ret->latency_sum_ms = KT_LOAD(&pool->latency_sum_ms);
}

static int bank_pool_info(const struct keytable *t, unsigned b, unsigned pool,
                          struct keytable_pool_view *ret) {
        struct keytable_pool_view v;
        unsigned p;

        if (pool >= kt_bank_n_pools(t, b))
                return -EINVAL;
        p = kt_bank_first_pool(t, b) + pool;
        kt_pool_lock(t, p);
        pool_view_locked(t, p, &v);
        kt_pool_unlock(t, p);
        *ret = v;
        return 0;
}

int keytable_pool_info(const struct keytable *t, unsigned pool, struct keytable_pool_view *ret) {
        if (!t || !ret)
                return -EINVAL;
        return bank_pool_info(t, kt_bank_current(t), pool, ret);
}

int keytable_slot_pool_info(const struct keytable *t, unsigned slot, unsigned pool,
                            struct keytable_pool_view *ret) {
        if (!t || !ret || slot >= t->n_slots)
                return -EINVAL;
        return bank_pool_info(t, kt_slot_bank(t, slot), pool, ret);
}

/* Copies the current bank's pool, view and keys, under its lock; the number of keys, or
 * -ENOBUFS when they are more than max. */
static int pool_read(struct keytable *t, unsigned pool, int64_t now_ms,
                     struct keytable_pool_view *ret_info, struct keytable_key_view *ret_keys,
                     unsigned max) {
        struct keytable_pool_view info;
        unsigned b = kt_bank_current(t), first, end, p;

        if (pool >= kt_bank_n_pools(t, b))
                return -EINVAL;
        p = kt_bank_first_pool(t, b) + pool;

        kt_pool_lock(t, p);
        kt_pool_range(t, p, &first, &end);
        if (end - first > max) {
                kt_pool_unlock(t, p);
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
        kt_pool_unlock(t, p);

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

        kt_header_lock(t);
        for (unsigned s = 0; s < t->n_slots && n < max; s++) {
                const struct kt_slot *slot = &t->slots[s];
                const uint32_t *leases = kt_slot_leases(t, s);
                uint32_t stage = KT_LOAD(&slot->stage);
                unsigned in_flight = 0;

                if (stage == WORKER_STAGE_FREE)
                        continue;
                /* Counted from the leases themselves, so a dead worker's requests show until its
                 * slot is released. */
                for (unsigned i = 0; i < t->leases_per_slot; i++)
                        if (KT_LOAD(&leases[i]) != 0)
                                in_flight++;
                ret[n++] = (struct keytable_worker_view) {
                        .slot = s,
                        .pid = KT_LOAD(&slot->pid),
                        .generation = KT_LOAD(&slot->generation),
                        .bank = KT_LOAD(&slot->bank) & 1u,
                        .stage = stage,
                        .started_ms = KT_LOAD(&slot->started_ms),
                        .heartbeat_ms = KT_LOAD(&slot->heartbeat_ms),
                        .requests = KT_LOAD(&slot->requests),
                        .in_flight = in_flight,
                        .waiters = KT_LOAD(&slot->waiters),
                };
        }
        kt_header_unlock(t);
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
        if (pool >= kt_bank_n_pools(t, b))
                return -EINVAL;
        gp = kt_bank_first_pool(t, b) + pool;

        kt_pool_lock(t, gp);
        p = &t->pools[gp];
        kt_pool_range(t, gp, &first, &end);
        if (key < first || key >= end) {
                kt_pool_unlock(t, gp);
                return -EINVAL;
        }
        kt_mark(&p->dirty, 1);
        kt_mark(&t->keys[key].dirty, 1);
        t->keys[key].state = 77;
        t->keys[key].in_flight += 5;
        /* Every field a writer touches may be left half-done, the new ones too. */
        t->keys[key].tat_us = INT64_MAX;
        t->keys[key].next_probe_ms = 1;
        t->keys[key].cooling_since_ms = -5;
        t->keys[key].figures_ms = -3;
        memset(t->keys[key].last_error, 'x', sizeof t->keys[key].last_error);
        KT_STORE(&t->keys[key].twin, UINT32_MAX - 7);
        KT_STORE(&p->account_limit_until_ms, -9);
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
