/* keytable_index.c — the key-choice index of each pool.
 *
 * So that picking a key costs the same for ten keys or a hundred thousand, each pool keeps,
 * beside its rows and under its lock, where every key stands. Keys that can serve now (ready,
 * within their rpm, below their max_concurrent) are on a doubly linked list in the order acquire
 * takes them (use_seq, then row); keys that can serve from a known time on (cooling until then,
 * or out of their rpm until then) are in a min-heap by that time; keys that are only full are
 * counted. Acquire takes the list's head after moving every due heap entry onto the list, which
 * is the choice a scan of every row (kt_index_scan, the fallback) makes.
 *
 * Invariants: everything here runs under the pool's lock with the pool marked dirty. The rows are
 * the truth and the index is trusted only while index_valid: anything out of place met on the way
 * makes it stale rather than followed, and the next acquire rebuilds it from the rows. A change
 * that moves a row between places updates the index at once (O(1) or O(log n)); rare changes
 * (loading a bank, limits, a dead worker's leases, repair) only mark it stale. A key whose rest
 * ends goes back at its LRU place, found by walking in from both ends of the list.
 */

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>

#include "keypool/keytable.h"
#include "keytable_internal.h"

static void earliest(int64_t *at, int64_t candidate) {
        if (*at == 0 || candidate < *at)
                *at = candidate;
}

/* The order acquire takes keys in: least recently acquired first, then the earlier row, so the
 * primary goes first in a fresh pool. */
static bool key_before(const struct keytable *t, uint32_t a, uint32_t b) {
        uint64_t sa = t->keys[a].use_seq, sb = t->keys[b].use_seq;

        return sa < sb || (sa == sb && a < b);
}

/* Where a key belongs at now_ms and, for KT_DUE, the ms from which it can serve: the tests of
 * the scan (kt_index_scan), in the same order, so both make the same choice. */
static enum kt_place key_place_for(const struct kt_key *key, int64_t now_ms, int64_t *ret_at_ms) {
        switch (key->state) {
        case KEY_COOLING:
                *ret_at_ms = key->cooldown_until_ms;
                return KT_DUE;
        case KEY_READY:
                if (!kt_gcra_allows(key, now_ms, ret_at_ms))
                        return KT_DUE;
                if (kt_key_full(key))
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
        from_us = kt_add_sat(key->tat_us, -(KT_MINUTE_US - kt_gcra_interval_us(key)));
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
        kt_pool_range(t, p, &first, &end);
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
        kt_index_stale(t, p);
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

        kt_pool_range(t, p, &first, &end);
        *ret_room = end - first;
        return t->due + first;
}

static void heap_push(const struct keytable *t, unsigned p, uint32_t k, int64_t at_ms) {
        struct kt_pool *pool = &t->pools[p];
        unsigned room;
        struct kt_due *h = pool_heap(t, p, &room);
        uint32_t n = pool->n_due;

        if (n >= room) {
                kt_index_stale(t, p);
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
                kt_index_stale(t, p);
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
void kt_index_update(const struct keytable *t, unsigned p, uint32_t k, int64_t now_ms) {
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
void kt_index_rebuild(const struct keytable *t, unsigned p, int64_t now_ms) {
        struct kt_pool *pool = &t->pools[p];
        unsigned first, end;
        uint32_t n_listed = 0;
        struct kt_due *h;
        int64_t at = 0;

        kt_pool_range(t, p, &first, &end);
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

/* Keeps the recovery of the earliest row: the one the scan of every row reports. */
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

        kt_pool_range(t, p, &first, &end);
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
                        kt_index_stale(t, p);
                        return;
                }
                key_unplace(t, p, k);
                kt_key_recover_if_due(&t->keys[k], k, now_ms, &c);
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
unsigned kt_index_scan(const struct keytable *t, unsigned p, int64_t now_ms, unsigned avoid_key,
                       struct keytable_wait *wait, struct keytable_change *change) {
        unsigned first, end, best = UINT_MAX;
        uint64_t best_seq = UINT64_MAX;
        bool avoided_can_serve = false;
        int64_t at;

        kt_pool_range(t, p, &first, &end);
        for (unsigned k = first; k < end; k++) {
                struct kt_key *key = &t->keys[k];
                struct keytable_change c = { .changed = false };

                kt_key_recover_if_due(key, k, now_ms, &c);
                if (c.changed) {
                        change_merge(change, &c);
                        kt_index_update(t, p, k, now_ms);
                }
                if (key->state == KEY_COOLING) {
                        earliest(&wait->retry_at_ms, key->cooldown_until_ms);
                        continue;
                }
                if (key->state != KEY_READY)
                        continue;
                /* rpm first: a key out of its rate is not freed by a release, so it is not
                 * "busy" even when it is full as well. */
                if (!kt_gcra_allows(key, now_ms, &at)) {
                        earliest(&wait->retry_at_ms, at);
                        continue;
                }
                if (kt_key_full(key)) {
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

/* The choice acquire makes at now_ms: from the index when it can be trusted, else from the rows.
 * A negative clock is a test's: the scan's retry time treats 0 as "none", and only the scan
 * itself says what that makes of times at or below it. */
unsigned kt_index_choose(const struct keytable *t, unsigned p, int64_t now_ms, unsigned avoid_key,
                         struct keytable_wait *wait, struct keytable_change *change) {
        const struct kt_pool *pool = &t->pools[p];
        unsigned first, end, best = UINT_MAX;

        kt_pool_range(t, p, &first, &end);
        if (!pool->index_valid)
                kt_index_rebuild(t, p, now_ms);
        index_run_due(t, p, now_ms, change);
        if (pool->index_valid && now_ms >= 0 && now_ms >= pool->gcra_since_ms) {
                best = choose_from_index(t, p, avoid_key, wait);
                if (best != UINT_MAX && (best < first || best >= end))
                        kt_index_stale(t, p);
        }
        if (!pool->index_valid || now_ms < 0 || now_ms < pool->gcra_since_ms) {
                *wait = (struct keytable_wait) { .retry_at_ms = 0, .busy = false };
                best = kt_index_scan(t, p, now_ms, avoid_key, wait, change);
        }
        return best;
}

void kt_index_taken(const struct keytable *t, unsigned p, uint32_t k, int64_t now_ms) {
        const struct kt_pool *pool = &t->pools[p];
        unsigned first, end;

        index_requeue(t, p, k, now_ms);
        /* In a big pool the next key to go is a row no one has touched for a whole round: start
         * fetching it now, while this request is out, rather than in the next one's lock. */
        kt_pool_range(t, p, &first, &end);
        if (pool->index_valid && pool->head != KT_NIL && pool->head >= first && pool->head < end) {
                const char *row = (const char *) &t->keys[pool->head];

                for (size_t off = 0; off < sizeof(struct kt_key); off += KT_ALIGN)
                        __builtin_prefetch(row + off, 1);
                __builtin_prefetch(&t->links[pool->head], 1);
        }
}

bool kt_index_none_due(const struct keytable *t, unsigned p, int64_t now_ms) {
        const struct kt_pool *pool = &t->pools[p];
        unsigned first, end;

        kt_pool_range(t, p, &first, &end);
        /* Every cooling key is in the heap: none is due while its first entry is not. */
        return pool->index_valid && pool->n_due <= end - first &&
               (pool->n_due == 0 || t->due[first].at_ms > now_ms);
}

bool kt_index_some_key_serves(const struct keytable *t, unsigned p, int64_t now_ms) {
        const struct kt_pool *pool = &t->pools[p];
        unsigned first, end;

        kt_pool_range(t, p, &first, &end);
        /* A key that can serve (listed, full) is ready, and so is the first entry of the heap if
         * it is due (a key back within its rpm, or one whose rest is over). */
        return pool->index_valid &&
               (pool->head != KT_NIL || pool->n_full > 0 ||
                (pool->n_due > 0 && pool->n_due <= end - first && t->due[first].at_ms <= now_ms));
}
