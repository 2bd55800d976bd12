/* keytable_keys.c — what happens to keys: acquire, release, probes, operator actions, restore.
 *
 * Owns the transitions of a key row's health (ready, cooling, disabled) and its counters, and
 * the leases that tie a request to a key. Invariants: every change to a row happens under its
 * pool's lock, with the pool and the row marked dirty for its length, so a repair after a death
 * knows what to distrust; a lease is written before in_flight goes up and cleared after it goes
 * down, so a recount from the leases finds the truth; each change that moves a row in the choice
 * index updates the index before the lock is let go. One pool lock at a time: a rate limit that
 * cools a key's rows in other pools takes their locks one after another, after letting go of
 * its own. The observation counters (latency, rotations) are added to with atomics, no lock.
 */

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "keypool/keytable.h"
#include "keytable_internal.h"

const int64_t keytable_latency_bounds_ms[KEYTABLE_LATENCY_BUCKETS] = {
        50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, INT64_MAX,
};

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

/* A caller that yields to an older waiter of another worker looks again this soon: that
 * waiter's worker was woken by the same event, and by then has taken its key. */
#define KT_FIFO_RETRY_MS 20

int keytable_acquire(struct keytable *t, unsigned slot, unsigned pool, int64_t now_ms,
                     unsigned avoid_key, struct keytable_lease *ret_lease,
                     struct keytable_wait *ret_wait, struct keytable_change *ret_change) {
        return keytable_acquire_waiter(t, slot, pool, now_ms, avoid_key, 0, ret_lease, ret_wait,
                                       ret_change);
}

int keytable_acquire_waiter(struct keytable *t, unsigned slot, unsigned pool, int64_t now_ms,
                            unsigned avoid_key, uint64_t ticket, struct keytable_lease *ret_lease,
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
        if (best != UINT_MAX && kt_fifo_yields(t, slot, gp, ticket, now_ms)) {
                best = UINT_MAX;
                wait = (struct keytable_wait) { .retry_at_ms = now_ms + KT_FIFO_RETRY_MS,
                                                .busy = true };
        }
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
        if (key->lease_on && key->rpm > 0 && key->lease_left > 0)
                key->lease_left--;
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
                if (from == KEY_DISABLED || o->unconfirmed)
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
        was_full = kt_key_full(key);
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
        /* Waiters for a full key must hear of this release even when the key now rests: the
         * rest has an end they can wait for, which they could not see while it was full. */
        change.freed_capacity = was_full;
        kt_mark(&p->dirty, 0);
        kt_pool_unlock(t, gp);

        if (cool_twins)
                change.twins_cooled = twins_cool(t, lease->key, gp, until, now_ms);
        /* A generation draining after a reload learns on rows the new one no longer reads. */
        if (change.changed && (change.to == KEY_COOLING || change.to == KEY_DISABLED) &&
            b != kt_bank_current(t)) {
                unsigned row = kt_carry_forward(t, lease->key, now_ms);

                if (cool_twins && row != KEYTABLE_NO_KEY)
                        (void) twins_cool(t, row, t->keys[row].pool, until, now_ms);
        }
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

        r = kt_key_lock(t, key, &p, &position);
        if (r < 0)
                return r;
        row = &t->keys[key];
        from = row->state;
        kt_mark(&t->pools[p].dirty, 1);
        kt_mark(&row->dirty, 1);
        kt_key_set_ready(row);
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
        r = kt_key_lock(t, key, &p, &position);
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
        key->next_probe_ms =
                st->state == KEY_DISABLED ? kt_probe_time(&pol, st->reason, now_ms) : 0;
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
