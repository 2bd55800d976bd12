/* keytable.c — the shared key table: the segment, its locks and their repair, the banks.
 *
 * Owns the POSIX shared-memory segment that every keypoold process maps (created, sized and
 * mapped once, before the first fork), the robust mutexes and the one place an abandoned one is
 * repaired, and the two banks of pool and key rows that a reload fills and commits. The other
 * parts of the module are keytable_index.c, keytable_keys.c, keytable_slots.c and
 * keytable_views.c; the layout they share is in keytable_internal.h. Nothing here does I/O while
 * a lock is held, nothing knows about HTTP or libcurl, and secrets never enter this memory.
 *
 * Layout: a header, then the pool rows, key rows, worker slots, lease arrays, history ring and
 * the choice index's links and heaps, located by offsets stored in the header, never pointers.
 * The process-local struct keytable caches the array addresses and the limits, so a scribbled
 * header can never send this process out of bounds.
 *
 * Locks: header before pool, never two pools at once. A dirty row is one its writer may have
 * left half-written: the next locker of an abandoned pool lock trusts nothing in it but its
 * identity, rebuilds every in_flight from the leases (the truth about requests in flight: a
 * slot's entry per request, key row + 1, 0 free), and leaves the choice index to be rebuilt.
 *
 * Banks: bank b's pools are rows [b * max_pools, (b + 1) * max_pools) and its keys
 * [b * max_keys, (b + 1) * max_keys), so a lease says by itself which bank it is in. A reload
 * fills the bank that is not current, then switches with one store under the header lock. A
 * bank is only refilled once no live slot uses it, so rows someone may still hold never change
 * under them; pool and key rows (pool, first_key, id, twin) are written once per fill and read
 * without locks after that. Internally every pool index is a table-wide row; callers' pool
 * indices are relative to a bank and translated at the edge. Rows of the same key id in
 * different pools of one bank are linked in a circle (twin), built as keys are added and never
 * changed after. The table-wide policy lives in the header and is read with atomic loads.
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

/* Where everything sits in the segment: offsets from its start, and its whole size. */
struct kt_layout {
        size_t size, hdr, pools, keys, slots, leases, history, links, due, tickets;
        unsigned history_size;
};

static int layout_compute(const struct keytable_limits *limits, struct kt_layout *ret) {
        struct kt_layout l = {};
        size_t n_leases, off = 0;
        int r;

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
        l.history_size = limits->history_size > 0 ? limits->history_size : KT_HISTORY_DEFAULT;

        r = layout_add(&off, 1, sizeof(struct kt_header), &l.hdr);
        if (r == 0)
                r = layout_add(&off, (size_t) KT_BANKS * limits->max_pools, sizeof(struct kt_pool),
                               &l.pools);
        if (r == 0)
                r = layout_add(&off, (size_t) KT_BANKS * limits->max_keys, sizeof(struct kt_key),
                               &l.keys);
        if (r == 0)
                r = layout_add(&off, limits->n_slots, sizeof(struct kt_slot), &l.slots);
        if (r == 0)
                r = layout_add(&off, n_leases, sizeof(uint32_t), &l.leases);
        if (r == 0)
                r = layout_add(&off, l.history_size, sizeof(struct kt_event), &l.history);
        if (r == 0)
                r = layout_add(&off, (size_t) KT_BANKS * limits->max_keys, sizeof(struct kt_link),
                               &l.links);
        if (r == 0)
                r = layout_add(&off, (size_t) KT_BANKS * limits->max_keys, sizeof(struct kt_due),
                               &l.due);
        if (r == 0)
                r = layout_add(&off, (size_t) limits->n_slots * limits->max_pools, sizeof(uint64_t),
                               &l.tickets);
        if (r < 0)
                return r;
        if (off > (size_t) INT64_MAX)
                return -ENOMEM;
        l.size = off;
        *ret = l;
        return 0;
}

/* A fresh, zero-filled shared mapping of size bytes, its memory committed. */
static int segment_map(size_t size, void **ret) {
        void *base;
        int fd, r;

        fd = shm_open_anonymous();
        if (fd < 0)
                return fd;
        if (ftruncate(fd, (off_t) size) < 0) {
                r = -errno;
                goto out;
        }
        /* Commit the memory now: running out of /dev/shm later would be a SIGBUS in the middle
         * of some worker's critical section instead of an error at start. */
        r = -posix_fallocate(fd, 0, (off_t) size);
        if (r < 0)
                goto out;
        base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
                r = -errno;
                goto out;
        }
        *ret = base;
out:
        (void) close(fd);
        return r;
}

/* Points t into the mapping at base and writes the header. The segment comes zero-filled: every
 * slot FREE, every lease free, both banks empty, bank 0 current and being filled. */
static void segment_init(struct keytable *t, void *base, const struct kt_layout *l,
                         const struct keytable_limits *limits, int64_t now_ms) {
        t->base = base;
        t->size = l->size;
        t->hdr = (struct kt_header *) ((char *) base + l->hdr);
        t->pools = (struct kt_pool *) ((char *) base + l->pools);
        t->keys = (struct kt_key *) ((char *) base + l->keys);
        t->slots = (struct kt_slot *) ((char *) base + l->slots);
        t->leases = (uint32_t *) ((char *) base + l->leases);
        t->history = (struct kt_event *) ((char *) base + l->history);
        t->links = (struct kt_link *) ((char *) base + l->links);
        t->due = (struct kt_due *) ((char *) base + l->due);
        t->tickets = (uint64_t *) ((char *) base + l->tickets);
        t->history_size = l->history_size;
        t->max_pools = limits->max_pools;
        t->max_keys = limits->max_keys;
        t->n_slots = limits->n_slots;
        t->leases_per_slot = limits->leases_per_slot;

        *t->hdr = (struct kt_header) {
                .magic = KT_MAGIC,
                .version = KT_VERSION,
                .max_pools = limits->max_pools,
                .max_keys = limits->max_keys,
                .n_slots = limits->n_slots,
                .leases_per_slot = limits->leases_per_slot,
                .bank = 0,
                .fill = 0,
                .size = l->size,
                .off_pools = l->pools,
                .off_keys = l->keys,
                .off_slots = l->slots,
                .off_leases = l->leases,
                .off_history = l->history,
                .off_links = l->links,
                .off_due = l->due,
                .off_tickets = l->tickets,
                .history_size = l->history_size,
                .config_generation = 1,
                .created_ms = now_ms,
        };
}

int keytable_create(const struct keytable_limits *limits, int64_t now_ms, struct keytable **ret) {
        struct kt_layout layout;
        size_t index_size;
        struct keytable *t;
        void *base = NULL;
        int r;

        if (!limits || !ret)
                return -EINVAL;
        r = layout_compute(limits, &layout);
        if (r < 0)
                return r;

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

        r = segment_map(layout.size, &base);
        if (r < 0)
                goto fail;
        segment_init(t, base, &layout, limits, now_ms);

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
        KT_STORE(&pool->ticket_seq, 0);
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
int kt_key_lock(const struct keytable *t, unsigned key, unsigned *ret_pool,
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

        r = kt_key_lock(t, k, &p, NULL);
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

/* The current bank's row of id: in the pool named pool_name if there is one, else the first
 * row with the id; KEYTABLE_NO_KEY when none. A scan, not the id index: the index is the
 * coordinator's, and a worker's copy of it dates from its fork. Only a draining generation's
 * rare state changes come here. */
static unsigned current_row_of(const struct keytable *t, unsigned cur, const char *id,
                               const char *pool_name) {
        unsigned q = current_pool_named(t, cur, pool_name), lo = kt_bank_first_key(t, cur),
                 hi = lo + kt_bank_n_keys(t, cur), first = lo, end = hi;

        if (q != UINT_MAX)
                kt_pool_range(t, q, &first, &end);
        for (unsigned pass = 0; pass < 2; pass++) {
                for (unsigned k = first; k < end; k++)
                        if (strncmp(t->keys[k].id, id, sizeof t->keys[k].id) == 0)
                                return k;
                first = lo;
                end = hi;
        }
        return KEYTABLE_NO_KEY;
}

unsigned kt_carry_forward(struct keytable *t, unsigned k, int64_t now_ms) {
        unsigned cur = kt_bank_current(t), row, p;
        struct kt_key src;
        struct kt_key *key;

        if (!kt_key_row_valid(t, k) || k / t->max_keys == cur || key_copy(t, k, &src) < 0 ||
            !kt_pool_row_valid(t, src.pool))
                return KEYTABLE_NO_KEY;
        row = current_row_of(t, cur, src.id, t->pools[src.pool].name);
        if (row == KEYTABLE_NO_KEY || kt_key_lock(t, row, &p, NULL) < 0)
                return KEYTABLE_NO_KEY;
        key = &t->keys[row];
        kt_mark(&t->pools[p].dirty, 1);
        kt_mark(&key->dirty, 1);
        /* The stronger verdict stands, as when the new generation learns it itself: a disable
         * over anything, a longer rest over a shorter one. */
        if (src.state == KEY_DISABLED && key->state != KEY_DISABLED) {
                key->state = KEY_DISABLED;
                key->reason = src.reason < _KEY_REASON_MAX ? src.reason : KEY_REASON_OPERATOR;
                key->cooldown_until_ms = 0;
                key->cooling_since_ms = 0;
                key->next_probe_ms = src.next_probe_ms;
        } else if (src.state == KEY_COOLING && key->state != KEY_DISABLED &&
                   src.cooldown_until_ms > now_ms &&
                   (key->state != KEY_COOLING || key->cooldown_until_ms < src.cooldown_until_ms)) {
                key->state = KEY_COOLING;
                key->reason = src.reason < _KEY_REASON_MAX ? src.reason : KEY_REASON_RATE_LIMITED;
                key->cooldown_until_ms = src.cooldown_until_ms;
                key->cooling_since_ms = src.cooling_since_ms;
        }
        kt_mark(&key->dirty, 0);
        kt_index_update(t, p, row, now_ms);
        kt_mark(&t->pools[p].dirty, 0);
        kt_pool_unlock(t, p);
        return row;
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

        r = kt_key_lock(t, key, &p, NULL);
        if (r < 0)
                return r;
        row = &t->keys[key];
        /* The arrival time stays: a lower rpm then only stretches the wait already earned. */
        kt_mark(&row->dirty, 1);
        row->max_concurrent = max_concurrent;
        row->rpm = rpm;
        /* Local limits end cluster leases (keytable_cluster.c), and what they held with them. */
        row->lease_on = row->lease_slots = row->lease_left = 0;
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
                if (KT_LOAD(&t->slots[s].stage) != WORKER_STAGE_FREE &&
                    kt_slot_bank(t, s) == target) {
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

int keytable_bank_revert(struct keytable *t) {
        unsigned cur, other;

        if (!t)
                return -EINVAL;

        kt_header_lock(t);
        cur = kt_bank_current(t);
        other = cur ^ 1u;
        if (kt_bank_fill(t) != cur || kt_bank_n_pools(t, other) == 0) {
                kt_header_unlock(t);
                return -EINVAL;
        }
        /* The other bank was not refilled since it was current: keytable_bank_begin is the
         * only way to do that, and it would have made it the one being filled. */
        KT_STORE(&t->hdr->fill, other);
        KT_STORE(&t->hdr->bank, other);
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

/* --- configuration generation -------------------------------------------------------------- */

void keytable_set_config_generation(struct keytable *t, unsigned generation) {
        if (t)
                KT_STORE(&t->hdr->config_generation, (uint32_t) generation);
}

unsigned keytable_config_generation(const struct keytable *t) {
        return t ? KT_LOAD(&t->hdr->config_generation) : 0;
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
