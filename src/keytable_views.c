/* keytable_views.c — the read-only views of the table: pools, keys, workers, names.
 *
 * Copies what readers (status, metrics, keypoolctl, state files) need out of the segment. A
 * pool's view and its keys are copied under the pool's lock, from one bank, so they are one
 * consistent moment; the workers under the header lock. Nothing here changes a row: a cooldown
 * that has run out is shown as over in the copy, and left to acquire or recover_due to end.
 */

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/keytable.h"
#include "keytable_internal.h"

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
