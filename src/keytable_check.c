/* keytable_check.c — the table's consistency check.
 *
 * Owns keytable_check: a read-only walk over both banks that says where the table disagrees with
 * itself, for the tests (a chaos run must leave a consistent table) and for operators
 * (keypoolctl check). It takes the header lock, then each pool's lock in turn, as any reader
 * does, so what it compares is one moment of each pool; a lease and the in-flight count it
 * stands for change together under the pool's lock, so under that lock they must agree exactly.
 * Nothing here repairs: a problem found is reported in words, and repair stays where it is
 * (keytable.c, on an abandoned lock).
 */

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/keytable.h"
#include "keytable_internal.h"

static void problem(struct keytable_check_report *r, const char *fmt, ...)
        __attribute__((format(printf, 2, 3)));

static void problem(struct keytable_check_report *r, const char *fmt, ...) {
        va_list ap;

        if (r->n_problems < KEYTABLE_CHECK_PROBLEMS_MAX) {
                va_start(ap, fmt);
                vsnprintf(r->problems[r->n_problems], KEYTABLE_CHECK_TEXT_MAX, fmt, ap);
                va_end(ap);
        }
        r->n_problems++;
}

/* Counts into leased[k - first] the leases naming each key row of [first, end), every slot;
 * the caller holds the pool's lock, under which those leases change. */
static void leases_count(const struct keytable *t, unsigned first, unsigned end, unsigned *leased) {
        unsigned n_leases = t->n_slots * t->leases_per_slot;

        memset(leased, 0, (size_t) (end - first) * sizeof *leased);
        for (unsigned i = 0; i < n_leases; i++) {
                uint32_t v = KT_LOAD(&t->leases[i]);

                if (v != 0 && v - 1 >= first && v - 1 < end)
                        leased[v - 1 - first]++;
        }
}

/* The header and the slots; the caller holds the header lock. */
static void check_header(const struct keytable *t, struct keytable_check_report *r) {
        const struct kt_header *h = t->hdr;

        if (h->history_dirty)
                problem(r, "history: an append's dirty marker is left set");
        if (h->bank >= KT_BANKS || h->fill >= KT_BANKS)
                problem(r, "header: bank %u / fill %u out of range", h->bank, h->fill);
        for (unsigned b = 0; b < KT_BANKS; b++)
                if (h->n_pools[b] > t->max_pools || h->n_keys[b] > t->max_keys)
                        problem(r, "bank %u: %u pools, %u keys: over the limits", b,
                                h->n_pools[b], h->n_keys[b]);

        for (unsigned s = 0; s < t->n_slots; s++) {
                uint32_t stage = KT_LOAD(&t->slots[s].stage);
                const uint32_t *leases = kt_slot_leases(t, s);

                if (stage >= _WORKER_STAGE_MAX)
                        problem(r, "slot %u: impossible stage %u", s, stage);
                if (stage != WORKER_STAGE_FREE)
                        r->workers++;
                for (unsigned i = 0; i < t->leases_per_slot; i++) {
                        uint32_t v = KT_LOAD(&leases[i]);

                        if (v == 0)
                                continue;
                        r->leases++;
                        if (stage == WORKER_STAGE_FREE)
                                problem(r, "slot %u: free, yet holds a lease on key row %u", s, v - 1);
                        if (!kt_key_row_valid(t, v - 1))
                                problem(r, "slot %u: lease %u names no key (row %u)", s, i, v - 1);
                        else if ((v - 1) / t->max_keys != kt_slot_bank(t, s))
                                problem(r, "slot %u: lease on key row %u outside its bank %u", s,
                                        v - 1, kt_slot_bank(t, s));
                }
        }
}

/* Where the row says key k belongs, and whether place agrees. */
static void check_place(const struct keytable *t, unsigned k, const char *pool_name,
                        unsigned position, struct keytable_check_report *r) {
        const struct kt_key *key = &t->keys[k];
        const struct kt_link *l = &t->links[k];
        bool full = kt_key_full(key);

        switch (l->place) {
        case KT_LISTED:
                if (key->state != KEY_READY || full)
                        problem(r, "pool %s key %u: in the index's list but %s%s", pool_name,
                                position, keytable_state_name(key->state),
                                full ? " and full" : "");
                break;
        case KT_FULL:
                if (key->state != KEY_READY || !full)
                        problem(r, "pool %s key %u: counted full but %s with %u of %u in flight",
                                pool_name, position, keytable_state_name(key->state),
                                key->in_flight, key->max_concurrent);
                break;
        case KT_DUE:
                if (key->state == KEY_DISABLED || (key->state == KEY_READY && key->rpm == 0))
                        problem(r, "pool %s key %u: in the index's heap but %s%s", pool_name,
                                position, keytable_state_name(key->state),
                                key->state == KEY_READY ? " with no rpm limit" : "");
                break;
        case KT_NOWHERE:
                if (key->state != KEY_DISABLED)
                        problem(r, "pool %s key %u: missing from the index but %s", pool_name,
                                position, keytable_state_name(key->state));
                break;
        default:
                problem(r, "pool %s key %u: impossible index place %u", pool_name, position,
                        l->place);
                break;
        }
}

/* The choice index of pool row p against its rows; the caller holds the pool's lock. */
static void check_index(const struct keytable *t, unsigned p, unsigned first, unsigned end,
                        struct keytable_check_report *r) {
        const struct kt_pool *pool = &t->pools[p];
        const struct kt_due *h = t->due + first;
        unsigned n = end - first, n_listed = 0, n_full = 0, n_due = 0, walked = 0;
        uint32_t prev = KT_NIL;

        if (!pool->index_valid)
                return;         /* rebuilt from the rows by the next acquire: nothing to trust */

        for (unsigned k = first; k < end; k++) {
                switch (t->links[k].place) {
                case KT_LISTED: n_listed++; break;
                case KT_FULL: n_full++; break;
                case KT_DUE: n_due++; break;
                default: break;
                }
                check_place(t, k, pool->name, k - first, r);
        }
        if (pool->n_full != n_full)
                problem(r, "pool %s: index counts %u full keys, the rows %u", pool->name,
                        pool->n_full, n_full);
        if (pool->n_due != n_due)
                problem(r, "pool %s: index heap holds %u keys, the rows place %u there", pool->name,
                        pool->n_due, n_due);

        /* The list: every listed key once, linked both ways, in acquire's order. */
        for (uint32_t k = pool->head; k != KT_NIL; k = t->links[k].next) {
                if (k < first || k >= end || walked > n) {
                        problem(r, "pool %s: the index's list leads out of the pool", pool->name);
                        return;
                }
                if (t->links[k].place != KT_LISTED || t->links[k].prev != prev)
                        problem(r, "pool %s key %u: on the list but not linked as listed",
                                pool->name, k - first);
                if (t->links[k].use_seq != t->keys[k].use_seq)
                        problem(r, "pool %s key %u: listed by use %llu, the row says %llu",
                                pool->name, k - first, (unsigned long long) t->links[k].use_seq,
                                (unsigned long long) t->keys[k].use_seq);
                if (prev != KT_NIL && (t->links[prev].use_seq > t->links[k].use_seq ||
                                       (t->links[prev].use_seq == t->links[k].use_seq && prev > k)))
                        problem(r, "pool %s key %u: listed out of acquire's order", pool->name,
                                k - first);
                prev = k;
                walked++;
        }
        if (pool->tail != prev)
                problem(r, "pool %s: the index's tail is not the list's last key", pool->name);
        if (walked != n_listed)
                problem(r, "pool %s: the index's list holds %u keys, the rows place %u there",
                        pool->name, walked, n_listed);

        /* The heap: entries name their keys back, and no child comes before its parent. */
        for (unsigned i = 0; i < pool->n_due && i < n; i++) {
                uint32_t k = h[i].key;

                if (k < first || k >= end || t->links[k].place != KT_DUE || t->links[k].heap_at != i) {
                        problem(r, "pool %s: heap entry %u does not name a key placed there",
                                pool->name, i);
                        continue;
                }
                if (t->keys[k].state == KEY_COOLING && h[i].at_ms != t->keys[k].cooldown_until_ms)
                        problem(r, "pool %s key %u: due at %lld in the heap, its rest ends at %lld",
                                pool->name, k - first, (long long) h[i].at_ms,
                                (long long) t->keys[k].cooldown_until_ms);
                if (i > 0 && (h[i].at_ms < h[(i - 1) / 2].at_ms))
                        problem(r, "pool %s: heap entry %u comes before its parent", pool->name, i);
        }
}

/* Pool row p of bank b, whose keys should start at *next_key; the caller holds no pool lock. */
static void check_pool(const struct keytable *t, unsigned b, unsigned p, unsigned *next_key,
                       unsigned *leased, struct keytable_check_report *r) {
        const struct kt_pool *pool = &t->pools[p];
        bool current = b == kt_bank_current(t);
        unsigned first, end;

        kt_pool_lock(t, p);
        r->pools++;
        if (pool->dirty)
                problem(r, "pool %s (bank %u): dirty marker left set", pool->name, b);
        kt_pool_range(t, p, &first, &end);
        if (pool->first_key != *next_key || end - first != pool->n_keys)
                problem(r, "pool %s (bank %u): rows %u..%u, expected from %u (%u keys)", pool->name,
                        b, pool->first_key, pool->first_key + pool->n_keys, *next_key, pool->n_keys);
        *next_key = end;
        leases_count(t, first, end, leased);

        for (unsigned k = first; k < end; k++) {
                const struct kt_key *key = &t->keys[k];

                r->keys++;
                if (key->pool != p)
                        problem(r, "pool %s key %u: the row names pool row %u", pool->name,
                                k - first, key->pool);
                if (key->dirty)
                        problem(r, "pool %s key %u: dirty marker left set", pool->name, k - first);
                if (!kt_key_state_valid(key->state)) {
                        problem(r, "pool %s key %u: impossible state %u", pool->name, k - first,
                                key->state);
                        continue;
                }
                if (key->reason >= _KEY_REASON_MAX ||
                    (key->state == KEY_READY && (key->reason != KEY_REASON_NONE ||
                                                 key->cooldown_until_ms != 0)) ||
                    (key->state == KEY_COOLING && key->cooldown_until_ms <= 0))
                        problem(r, "pool %s key %u: %s with reason %u and rest until %lld",
                                pool->name, k - first, keytable_state_name(key->state),
                                key->reason, (long long) key->cooldown_until_ms);
                if (key->in_flight != leased[k - first])
                        problem(r, "pool %s key %u: in_flight %u, but %u leases name it",
                                pool->name, k - first, key->in_flight, leased[k - first]);
                if (current) {
                        r->by_state[key->state]++;
                        r->in_flight += key->in_flight;
                }
        }
        check_index(t, p, first, end, r);
        kt_pool_unlock(t, p);
}

int keytable_check(struct keytable *t, struct keytable_check_report *ret) {
        struct keytable_check_report r = {};
        unsigned *leased;

        if (!t || !ret)
                return -EINVAL;
        /* Allocated before any lock is taken: a pool's keys never outnumber a bank's. */
        leased = calloc(t->max_keys, sizeof *leased);
        if (!leased)
                return -ENOMEM;

        /* The header lock keeps slots from being claimed or freed, and banks from being
         * refilled, while the pools are looked at one by one. */
        kt_header_lock(t);
        check_header(t, &r);
        for (unsigned b = 0; b < KT_BANKS; b++) {
                unsigned next_key = kt_bank_first_key(t, b);

                for (unsigned i = 0; i < kt_bank_n_pools(t, b); i++)
                        check_pool(t, b, kt_bank_first_pool(t, b) + i, &next_key, leased, &r);
                if (next_key != kt_bank_first_key(t, b) + kt_bank_n_keys(t, b))
                        problem(&r, "bank %u: its pools hold rows up to %u, the bank has %u keys",
                                b, next_key - kt_bank_first_key(t, b), kt_bank_n_keys(t, b));
        }
        kt_header_unlock(t);
        free(leased);
        *ret = r;
        return 0;
}
