/* keytable_slots.c — the worker scoreboard and the rotation history ring.
 *
 * Owns the worker slots (one per live worker of any generation: pid, generation, bank, stage,
 * heartbeat, counters, waiters) and the history ring. A slot is claimed and freed under the
 * header lock, with stage written last on claim and FREE written last on release, so a reader
 * never sees a half-claimed slot; between the two only its worker writes it, with atomic stores.
 * Only keytable_slot_release frees a slot, and only after returning the dead worker's leases
 * under each pool's lock. A history append takes many stores under the header lock, marked
 * dirty, and commits with one store of history_seq; an entry whose seq is not the one its place
 * calls for is no entry.
 */

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "keypool/keytable.h"
#include "keytable_internal.h"

/* --- worker slots -------------------------------------------------------------------------- */

/* Under the header lock, for a slot whose owner is gone or not yet born: its waiters to 0. */
static void slot_clear_waiters(struct keytable *t, unsigned slot) {
        if (__atomic_exchange_n(&t->slots[slot].waiters, 0, __ATOMIC_ACQ_REL) > 0)
                __atomic_sub_fetch(&t->hdr->waiting_slots, 1, __ATOMIC_ACQ_REL);
}

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
                slot_clear_waiters(t, s);
                kt_fifo_slot_clear(t, s);
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

const uint64_t keytable_lag_bounds_usec[KEYTABLE_LAG_BUCKETS] = {
        100, 250, 500, 1000, 2000, 5000, 10000, 25000, 100000, 1000000, UINT64_MAX,
};

void keytable_slot_observe_lag(struct keytable *t, unsigned slot, uint64_t usec) {
        struct kt_slot *s;
        unsigned i = 0;

        if (!t || slot >= t->n_slots)
                return;
        s = &t->slots[slot];
        while (i + 1 < KEYTABLE_LAG_BUCKETS && usec > keytable_lag_bounds_usec[i])
                i++;
        /* The owner alone writes; readers may see a count a step ahead of its bucket, which a
         * scrape tolerates. */
        __atomic_add_fetch(&s->lag_buckets[i], 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->lag_sum_usec, usec, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->lag_count, 1, __ATOMIC_RELAXED);
}

void keytable_loop_lag(const struct keytable *t, struct keytable_lag *ret) {
        *ret = (struct keytable_lag) {};
        for (unsigned s = 0; t && s < t->n_slots; s++) {
                const struct kt_slot *slot = &t->slots[s];

                for (unsigned i = 0; i < KEYTABLE_LAG_BUCKETS; i++)
                        ret->buckets[i] += __atomic_load_n(&slot->lag_buckets[i], __ATOMIC_RELAXED);
                ret->sum_usec += __atomic_load_n(&slot->lag_sum_usec, __ATOMIC_RELAXED);
        }
        /* The count is the buckets' total, so that +Inf and _count always agree. */
        for (unsigned i = 0; i < KEYTABLE_LAG_BUCKETS; i++)
                ret->count += ret->buckets[i];
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
        slot_clear_waiters(t, slot);
        kt_fifo_slot_clear(t, slot);
        KT_STORE(&t->slots[slot].stage, WORKER_STAGE_FREE);
        kt_header_unlock(t);
}

unsigned keytable_slot_bank(const struct keytable *t, unsigned slot) {
        return t && slot < t->n_slots ? kt_slot_bank(t, slot) : 0;
}

void keytable_slot_set_waiters(struct keytable *t, unsigned slot, unsigned n) {
        uint32_t *w;

        if (!t || slot >= t->n_slots)
                return;
        /* Only the owner writes its slot's waiters (and the header lock's holder, once the
         * owner is gone): the count moves on 0 <-> non-0 and stays an upper bound. */
        w = &t->slots[slot].waiters;
        if (n > 0 && KT_LOAD(w) == 0)
                __atomic_add_fetch(&t->hdr->waiting_slots, 1, __ATOMIC_ACQ_REL);
        else if (n == 0 && KT_LOAD(w) > 0) {
                KT_STORE(w, 0);
                __atomic_sub_fetch(&t->hdr->waiting_slots, 1, __ATOMIC_ACQ_REL);
                return;
        }
        KT_STORE(w, (uint32_t) n);
}


unsigned keytable_slots_with_waiters(const struct keytable *t, unsigned *ret_slots, unsigned max) {
        unsigned n = 0;

        if (!t || !ret_slots)
                return 0;
        /* No lock: a slot freed meanwhile costs its reader one needless wake-up at most. */
        for (unsigned s = 0; s < t->n_slots && n < max; s++)
                if (KT_LOAD(&t->slots[s].stage) != WORKER_STAGE_FREE &&
                    KT_LOAD(&t->slots[s].waiters) > 0)
                        ret_slots[n++] = s;
        return n;
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
        /* Unnamed events are this node's: the cluster publishes only those. */
        copy_field(slot->node, sizeof slot->node, e->node[0] ? e->node : t->hdr->cluster.node);
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
                kt_event_copy(src, s, e);
                n++;
        }
        kt_header_unlock(t);
        return n;
}

unsigned keytable_history_capacity(const struct keytable *t) {
        return t ? t->history_size : 0;
}
