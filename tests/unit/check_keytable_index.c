/* check_keytable_index.c — the key-choice index: that it chooses as a scan of every row would,
 * through keytable_acquire under random traffic, after holders die half-way through moving a
 * key, and in a big pool; and the index functions themselves (keytable_internal.h), driven on
 * rows set by hand. */

#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keypool/keytable.h"
#include "keytable_internal.h"

static void expect_killed(pid_t pid) {
        int status;
        pid_t r;

        do
                r = waitpid(pid, &status, 0);
        while (r < 0 && errno == EINTR);
        ck_assert_int_eq(r, pid);
        ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
                      "child should have died by SIGKILL (status %#x)", status);
}

/* --- the choice index against the rule it stands for -------------------------------------- */

/* The tests below drive the table with random traffic and compare every answer of
 * keytable_acquire with the rule the index replaces, computed from the rows themselves: of the
 * pool's keys that are ready (or whose rest is over), within their rpm and below their
 * max_concurrent, the one acquired least recently, the earlier in the list on a tie, the avoided
 * key only when alone; when none, the earliest time a rest ends or an rpm slot opens, and whether
 * some key is only full. The rows' state comes from the table (read raw, with a clock at the
 * start of time); what acquire alone changes (the LRU clock, the rpm arrival time) the test
 * keeps itself. */

#define MODEL_POOLS     2
#define MODEL_MAX_KEYS  48
#define MODEL_SLOTS     2
#define MODEL_LEASES    6

struct model {
        struct keytable *t;
        unsigned pool[MODEL_POOLS];             /* bank-relative */
        unsigned first[MODEL_POOLS], n[MODEL_POOLS];
        unsigned slot[MODEL_SLOTS];
        uint64_t seq[MODEL_POOLS];
        uint64_t use_seq[MODEL_MAX_KEYS];       /* by table-wide key row (bank 0) */
        int64_t tat_us[MODEL_MAX_KEYS];
        struct keytable_lease lease[MODEL_SLOTS * MODEL_LEASES];
        unsigned n_leases;
        int64_t now;
        unsigned seed, first_seed;              /* first_seed: the one that repeats the run */
        unsigned acquires, checked_eagain;
};

struct expectation {
        int r;
        unsigned key;
        struct keytable_wait wait;
        bool changed;
        unsigned change_key;
};

static unsigned model_rand(struct model *m, unsigned n) {
        return n == 0 ? 0 : (unsigned) rand_r(&m->seed) % n;
}

static void model_earliest(int64_t *at, int64_t candidate) {
        if (*at == 0 || candidate < *at)
                *at = candidate;
}

static void model_read(struct model *m, unsigned pi, struct keytable_key_view *v) {
        ck_assert_int_eq(keytable_pool_read(m->t, m->pool[pi], INT64_MIN, NULL, v, MODEL_MAX_KEYS),
                         (int) m->n[pi]);
}

/* The old scan, on the rows as they are now. */
static void model_expect(struct model *m, unsigned pi, unsigned avoid, struct expectation *e) {
        struct keytable_key_view v[MODEL_MAX_KEYS];
        uint64_t best_seq = UINT64_MAX;
        bool avoided = false;

        *e = (struct expectation) { .r = -EAGAIN, .key = KEYTABLE_NO_KEY };
        model_read(m, pi, v);
        for (unsigned i = 0; i < m->n[pi]; i++) {
                unsigned k = m->first[pi] + i;
                enum key_state state = v[i].state;

                if (state == KEY_COOLING && v[i].cooldown_until_ms <= m->now) {
                        state = KEY_READY;
                        if (!e->changed) {
                                e->changed = true;
                                e->change_key = k;
                        }
                }
                if (state == KEY_COOLING) {
                        model_earliest(&e->wait.retry_at_ms, v[i].cooldown_until_ms);
                        continue;
                }
                if (state != KEY_READY)
                        continue;
                if (v[i].rpm > 0) {
                        int64_t interval = 60000000 / v[i].rpm > 0 ? 60000000 / v[i].rpm : 1,
                                tol = 60000000 - interval;

                        if (m->tat_us[k] > m->now * 1000 + tol) {
                                int64_t x = m->tat_us[k] - tol;

                                model_earliest(&e->wait.retry_at_ms, x / 1000 + (x % 1000 > 0));
                                continue;
                        }
                }
                if (v[i].max_concurrent > 0 && v[i].in_flight >= v[i].max_concurrent) {
                        e->wait.busy = true;
                        continue;
                }
                if (k == avoid) {
                        avoided = true;
                        continue;
                }
                if (m->use_seq[k] < best_seq) {
                        best_seq = m->use_seq[k];
                        e->key = k;
                }
        }
        if (e->key == KEYTABLE_NO_KEY && avoided)
                e->key = avoid;
        if (e->key != KEYTABLE_NO_KEY)
                e->r = 0;
}

static unsigned model_slot_leases(const struct model *m, unsigned si) {
        unsigned n = 0;

        for (unsigned i = 0; i < m->n_leases; i++)
                n += m->lease[i].slot == m->slot[si];
        return n;
}

static void model_acquire(struct model *m, unsigned pi, unsigned si, unsigned avoid) {
        struct keytable_change c;
        struct keytable_wait w;
        struct keytable_lease l;
        struct expectation e;
        int r;

        if (model_slot_leases(m, si) >= MODEL_LEASES) {
                ck_assert_int_eq(keytable_acquire(m->t, m->slot[si], m->pool[pi], m->now, avoid, &l,
                                                  &w, &c), -ENOSPC);
                return;
        }
        model_expect(m, pi, avoid, &e);
        r = keytable_acquire(m->t, m->slot[si], m->pool[pi], m->now, avoid, &l, &w, &c);
        ck_assert_msg(r == e.r, "seed %u, acquire %u, pool %u at %lld: acquire gave %d, the scan says %d",
                      m->first_seed, m->acquires, pi, (long long) m->now, r, e.r);
        ck_assert_msg(c.changed == e.changed && (!e.changed || c.key == e.change_key),
                      "at %lld: recovery reported %d (key %u), the scan says %d (key %u)",
                      (long long) m->now, c.changed, c.key, e.changed, e.change_key);
        m->acquires++;
        if (r == -EAGAIN) {
                ck_assert_msg(w.retry_at_ms == e.wait.retry_at_ms && w.busy == e.wait.busy,
                              "at %lld: wait %lld/%d, the scan says %lld/%d", (long long) m->now,
                              (long long) w.retry_at_ms, w.busy,
                              (long long) e.wait.retry_at_ms, e.wait.busy);
                m->checked_eagain++;
                return;
        }
        ck_assert_msg(l.key == e.key, "at %lld (avoid %u): acquire chose key %u, the scan says %u",
                      (long long) m->now, avoid, l.key, e.key);
        {
                struct keytable_key_view v[MODEL_MAX_KEYS];
                unsigned k = l.key;

                model_read(m, pi, v);
                m->use_seq[k] = ++m->seq[pi];
                if (v[k - m->first[pi]].rpm > 0) {
                        int64_t interval = 60000000 / v[k - m->first[pi]].rpm;

                        if (interval < 1)
                                interval = 1;
                        m->tat_us[k] = (m->tat_us[k] > m->now * 1000 ? m->tat_us[k]
                                                                      : m->now * 1000) + interval;
                }
        }
        m->lease[m->n_leases++] = l;
}

static void model_release(struct model *m) {
        static const enum verdict_class classes[] = {
                VERDICT_OK, VERDICT_OK, VERDICT_OK, VERDICT_OK, VERDICT_RATE_LIMITED,
                VERDICT_RATE_LIMITED, VERDICT_TRANSIENT, VERDICT_TRANSIENT, VERDICT_AUTH,
                VERDICT_QUOTA, VERDICT_CALLER, VERDICT_NONE,
        };
        struct keytable_outcome o = { .figures = RATE_FIGURES_UNKNOWN };
        unsigned i = model_rand(m, m->n_leases);

        o.cls = classes[model_rand(m, sizeof classes / sizeof classes[0])];
        o.status = o.cls == VERDICT_RATE_LIMITED ? 429 : 200;
        if (o.cls == VERDICT_RATE_LIMITED)
                o.rest_ms = model_rand(m, 3000);
        else if (o.cls == VERDICT_OK && model_rand(m, 6) == 0)
                o.rest_ms = 1 + model_rand(m, 2000);
        keytable_release(m->t, &m->lease[i], model_rand(m, 20) == 0 ? NULL : &o, m->now, NULL);
        m->lease[i] = m->lease[--m->n_leases];
}

static void model_limits(struct model *m, unsigned k) {
        static const unsigned rpms[] = { 0, 0, 0, 1, 2, 3, 30, 600 };

        ck_assert_int_eq(keytable_set_key_limits(m->t, k, model_rand(m, 3),
                                                 rpms[model_rand(m, sizeof rpms / sizeof rpms[0])]),
                         0);
}

static void model_restore(struct model *m, unsigned pi, unsigned position) {
        struct keytable_key_state st = { .state = KEY_READY, .last_class = VERDICT_NONE };

        switch (model_rand(m, 3)) {
        case 0:
                break;
        case 1:
                st.state = KEY_COOLING;
                st.reason = KEY_REASON_RATE_LIMITED;
                st.cooldown_until_ms = m->now - 500 + model_rand(m, 3000);
                break;
        default:
                st.state = KEY_DISABLED;
                st.reason = KEY_REASON_QUOTA;
                break;
        }
        ck_assert_int_eq(keytable_restore_key(m->t, m->pool[pi], position, &st, m->now), 0);
}

/* keytable_recover_due against the rows: every cooling key whose rest is over, pool by pool. */
static void model_recover_due(struct model *m) {
        unsigned exp_pools[2 * MODEL_MAX_KEYS], exp_pos[2 * MODEL_MAX_KEYS], n_exp = 0;
        unsigned pools[2 * MODEL_MAX_KEYS], positions[2 * MODEL_MAX_KEYS], n;

        for (unsigned pi = 0; pi < MODEL_POOLS; pi++) {
                struct keytable_key_view v[MODEL_MAX_KEYS];

                model_read(m, pi, v);
                for (unsigned i = 0; i < m->n[pi]; i++)
                        if (v[i].state == KEY_COOLING && v[i].cooldown_until_ms <= m->now) {
                                exp_pools[n_exp] = m->pool[pi];
                                exp_pos[n_exp++] = i;
                        }
        }
        n = keytable_recover_due(m->t, m->now, pools, positions, 2 * MODEL_MAX_KEYS);
        ck_assert_uint_eq(n, n_exp);
        for (unsigned i = 0; i < n; i++) {
                ck_assert_uint_eq(pools[i], exp_pools[i]);
                ck_assert_uint_eq(positions[i], exp_pos[i]);
        }
}

/* One random step: mostly acquires and releases as traffic makes them, with the clock moving
 * (now and then a moment backwards, as two workers' clock reads race for the lock), and every
 * other thing that changes a key now and then. */
static void model_step(struct model *m) {
        unsigned pi = model_rand(m, MODEL_POOLS), what = model_rand(m, 100),
                 k = m->first[pi] + model_rand(m, m->n[pi]);
        struct keytable_key_view v[MODEL_MAX_KEYS];

        if (what < 40) {
                unsigned avoid = model_rand(m, 3) == 0 ? k : KEYTABLE_NO_KEY;

                model_acquire(m, pi, model_rand(m, MODEL_SLOTS), avoid);
        } else if (what < 72) {
                if (m->n_leases > 0)
                        model_release(m);
        } else if (what < 84) {
                m->now += model_rand(m, 4) == 0 ? (int64_t) model_rand(m, 2500)
                                                 : (int64_t) model_rand(m, 60);
        } else if (what < 87) {
                m->now -= model_rand(m, 4);
        } else if (what < 90) {
                ck_assert_int_eq(keytable_disable(m->t, k, model_rand(m, 2) ? KEY_REASON_OPERATOR
                                                                              : KEY_REASON_QUOTA,
                                                  m->now, NULL), 0);
        } else if (what < 94) {
                ck_assert_int_eq(keytable_enable(m->t, k, m->now, NULL), 0);
        } else if (what < 96) {
                model_recover_due(m);
        } else if (what < 97) {
                model_limits(m, k);
        } else if (what < 98) {
                model_restore(m, pi, k - m->first[pi]);
        } else if (what < 99) {
                unsigned key, pool;

                (void) keytable_probe_claim(m->t, m->now, &key, &pool);
        } else {
                /* A worker goes away with its leases, and a new one takes its slot. */
                unsigned si = model_rand(m, MODEL_SLOTS), old = m->slot[si];

                keytable_slot_release(m->t, old);
                for (unsigned i = 0; i < m->n_leases;)
                        if (m->lease[i].slot == old)
                                m->lease[i] = m->lease[--m->n_leases];
                        else
                                i++;
                ck_assert_int_eq(keytable_slot_claim(m->t, 1, m->now, &m->slot[si]), 0);
                keytable_slot_set_stage(m->t, m->slot[si], WORKER_STAGE_SERVING);
        }
        /* The rows stay sane whatever the index does. */
        model_read(m, pi, v);
}

/* Two pools, sizes[0] and sizes[1] keys, the second sharing some ids with the first (so a rate
 * limit with cooldown_scope_key reaches across), random limits on some keys. */
static void model_setup(struct model *m, unsigned seed, const unsigned sizes[MODEL_POOLS],
                        bool scope_key) {
        const struct keytable_limits lim = {
                .max_pools = 4, .max_keys = MODEL_MAX_KEYS * MODEL_POOLS,
                .n_slots = MODEL_SLOTS + 2, .leases_per_slot = MODEL_LEASES,
        };
        struct keytable_policy pol = {
                .cooldown_scope_key = scope_key, .transient_threshold = 2,
                .transient_cooldown_ms = 700, .probe_interval_ms = 5000, .probe_auth = true,
        };

        memset(m, 0, sizeof *m);
        m->seed = m->first_seed = seed;
        m->now = 100000;
        ck_assert_int_eq(keytable_create(&lim, m->now, &m->t), 0);
        keytable_set_policy(m->t, &pol);
        for (unsigned pi = 0; pi < MODEL_POOLS; pi++) {
                char name[16];

                snprintf(name, sizeof name, "pool%u", pi);
                ck_assert_int_eq(keytable_add_pool(m->t, name, "test/model", &m->pool[pi]), 0);
                for (unsigned i = 0; i < sizes[pi]; i++) {
                        char id[KEYID_ID_LEN + 1];
                        unsigned k;

                        /* Every third key of the second pool is a key of the first. */
                        snprintf(id, sizeof id, "kp-fake%u%03u", (pi == 1 && i % 3 == 0 ? 0 : pi) % 10,
                                 i % 1000);
                        ck_assert_int_eq(keytable_add_key(m->t, m->pool[pi], id, "sk-fake...", &k),
                                         0);
                        ck_assert_uint_lt(k, MODEL_MAX_KEYS * MODEL_POOLS);
                        if (i == 0)
                                m->first[pi] = k;
                }
                m->n[pi] = sizes[pi];
        }
        for (unsigned pi = 0; pi < MODEL_POOLS; pi++)
                for (unsigned i = 0; i < m->n[pi]; i++)
                        if (model_rand(m, 3) == 0)
                                model_limits(m, m->first[pi] + i);
        for (unsigned si = 0; si < MODEL_SLOTS; si++) {
                ck_assert_int_eq(keytable_slot_claim(m->t, 1, m->now, &m->slot[si]), 0);
                keytable_slot_set_stage(m->t, m->slot[si], WORKER_STAGE_SERVING);
        }
}

START_TEST(test_the_index_chooses_exactly_as_a_scan_of_every_key_would)
{
        unsigned acquires = 0, eagain = 0;

        for (unsigned seed = 1; seed <= 160; seed++) {
                struct model m;
                unsigned s = seed * 7919, sizes[MODEL_POOLS];

                sizes[0] = 1 + (unsigned) rand_r(&s) % 8;
                sizes[1] = 2 + (unsigned) rand_r(&s) % (seed % 5 == 0 ? 40 : 6);
                model_setup(&m, seed, sizes, seed % 2 == 0);
                for (unsigned step = 0; step < 600; step++)
                        model_step(&m);
                acquires += m.acquires;
                eagain += m.checked_eagain;
                keytable_destroy(m.t);
        }
        /* The walk must really have met both answers, many times. */
        ck_assert_uint_gt(acquires, 20000);
        ck_assert_uint_gt(eagain, 1000);
        ck_assert_uint_gt(acquires - eagain, 10000);
}
END_TEST

START_TEST(test_the_index_is_rebuilt_after_a_holder_dies_half_way_through_moving_a_key)
{
        struct model m;
        const unsigned sizes[MODEL_POOLS] = { 5, 7 };
        unsigned scribbled;
        pid_t pid;

        model_setup(&m, 4242, sizes, true);
        for (unsigned step = 0; step < 300; step++)
                model_step(&m);
        scribbled = m.first[1] + 2;

        pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
                if (keytable_test_die_holding_lock(m.t, m.pool[1], scribbled) < 0)
                        _exit(3);
                raise(SIGKILL);
                _exit(4);
        }
        expect_killed(pid);

        /* The repair forgets the scribbled row's rpm arrival time: so does the model. */
        m.tat_us[scribbled] = 0;
        for (unsigned i = 0; i < 40; i++)
                model_acquire(&m, 1, 0, KEYTABLE_NO_KEY);
        ck_assert_uint_eq(keytable_repairs(m.t), 1);
        for (unsigned step = 0; step < 2000; step++)
                model_step(&m);
        ck_assert_uint_eq(keytable_repairs(m.t), 1);
        keytable_destroy(m.t);
}
END_TEST

/* Workers killed at random moments while traffic rate limits keys and brings them back: after
 * each death (and the repair, when the worker held the lock), the choices are still the scan's. */
START_TEST(test_choices_stay_right_after_workers_die_in_the_middle_of_index_updates)
{
        struct model m;
        const unsigned sizes[MODEL_POOLS] = { 9, 4 };
        unsigned seed = 777;

        model_setup(&m, 99, sizes, false);
        for (unsigned round = 0; round < 12; round++) {
                struct keytable_key_view v[MODEL_MAX_KEYS];
                unsigned slot, n_keys = m.n[0], order[MODEL_MAX_KEYS];
                int64_t base = m.now;
                pid_t pid;

                ck_assert_int_eq(keytable_slot_claim(m.t, 2, m.now, &slot), 0);
                pid = fork();
                ck_assert_int_ge(pid, 0);
                if (pid == 0) {
                        unsigned s = round + 1;

                        /* Its own clock, one ms per request, ahead of the parent's. */
                        for (int64_t now = base + 1;; now++) {
                                struct keytable_outcome o = { .cls = VERDICT_OK, .status = 200,
                                                              .figures = RATE_FIGURES_UNKNOWN };
                                struct keytable_lease l;

                                if (rand_r(&s) % 4 == 0) {
                                        o.cls = VERDICT_RATE_LIMITED;
                                        o.rest_ms = rand_r(&s) % 40;
                                }
                                if (keytable_acquire(m.t, slot, m.pool[0], now, KEYTABLE_NO_KEY,
                                                     &l, NULL, NULL) == 0)
                                        keytable_release(m.t, &l, &o, now, NULL);
                        }
                }
                usleep(1000 + rand_r(&seed) % 3000);
                kill(pid, SIGKILL);
                expect_killed(pid);
                keytable_slot_release(m.t, slot);

                /* What the child did to the LRU order is its own: make every key ready again,
                 * past every rest, then learn the order from one round, which must take each key
                 * exactly once. The model's own leases go back first: that round needs a free
                 * lease in slot 0 for every acquire. */
                while (m.n_leases > 0)
                        keytable_release(m.t, &m.lease[--m.n_leases], NULL, m.now, NULL);
                model_read(&m, 0, v);
                for (unsigned i = 0; i < n_keys; i++) {
                        ck_assert_int_eq(keytable_enable(m.t, m.first[0] + i, m.now, NULL), 0);
                        ck_assert_int_eq(keytable_set_key_limits(m.t, m.first[0] + i, 0, 0), 0);
                        if (v[i].last_used_ms > m.now)
                                m.now = v[i].last_used_ms;
                }
                m.now += 1000;
                for (unsigned i = 0; i < n_keys; i++) {
                        struct keytable_lease l;

                        ck_assert_int_eq(keytable_acquire(m.t, m.slot[0], m.pool[0], m.now,
                                                          KEYTABLE_NO_KEY, &l, NULL, NULL), 0);
                        order[i] = l.key;
                        for (unsigned j = 0; j < i; j++)
                                ck_assert_msg(order[j] != l.key,
                                              "round %u: key %u taken twice in one round", round,
                                              l.key);
                        m.use_seq[l.key] = ++m.seq[0];
                        keytable_release(m.t, &l, NULL, m.now, NULL);
                }
                /* The next rounds go in the same order: least recently used first, whatever
                 * the dead worker left half-done in the index. (A longer random run against
                 * the model would compare with a reference that cannot know everything the
                 * child changed, such as its account-wide suspicion of the pool; the scribbled
                 * index test above does that comparison after a death at a known point.) */
                for (unsigned again = 0; again < 2; again++)
                        for (unsigned i = 0; i < n_keys; i++) {
                                struct keytable_lease l;

                                m.now++;
                                ck_assert_int_eq(keytable_acquire(m.t, m.slot[0], m.pool[0], m.now,
                                                                  KEYTABLE_NO_KEY, &l, NULL, NULL), 0);
                                ck_assert_msg(l.key == order[i], "round %u: key %u out of LRU order "
                                              "(expected %u)", round, l.key, order[i]);
                                keytable_release(m.t, &l, NULL, m.now, NULL);
                        }
        }
        keytable_destroy(m.t);
}
END_TEST

/* Rebuilding a big pool's index is the rare path; choosing from it is the common one. */
START_TEST(test_a_big_pool_serves_in_lru_order_around_cooling_and_full_keys)
{
        const struct keytable_limits big = {
                .max_pools = 2, .max_keys = 20000, .n_slots = 2, .leases_per_slot = 8,
        };
        struct keytable_outcome limited = { .cls = VERDICT_RATE_LIMITED, .status = 429,
                                            .rest_ms = 5000, .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200,
                                       .figures = RATE_FIGURES_UNKNOWN };
        struct keytable *t;
        struct keytable_lease l, held;
        struct keytable_wait w;
        unsigned pool, slot, first;

        ck_assert_int_eq(keytable_create(&big, 0, &t), 0);
        ck_assert_int_eq(keytable_add_pool(t, "big", "test/model", &pool), 0);
        for (unsigned i = 0; i < 20000; i++) {
                char id[KEYID_ID_LEN + 1];

                snprintf(id, sizeof id, "kp-fake%06u", i);
                ck_assert_int_eq(keytable_add_key(t, pool, id, "sk-test...xyz", i == 0 ? &first : NULL), 0);
        }
        ck_assert_int_eq(keytable_set_key_limits(t, first + 1, 1, 0), 0);
        ck_assert_int_eq(keytable_slot_claim(t, 1, 0, &slot), 0);

        /* Key 0 rests; key 1 is held (full); the rest go in order. */
        ck_assert_int_eq(keytable_acquire(t, slot, pool, 10, KEYTABLE_NO_KEY, &l, NULL, NULL), 0);
        ck_assert_uint_eq(l.key, first);
        keytable_release(t, &l, &limited, 10, NULL);
        ck_assert_int_eq(keytable_acquire(t, slot, pool, 10, KEYTABLE_NO_KEY, &held, NULL, NULL), 0);
        ck_assert_uint_eq(held.key, first + 1);
        for (unsigned i = 2; i < 20000; i++) {
                ck_assert_int_eq(keytable_acquire(t, slot, pool, 20, KEYTABLE_NO_KEY, &l, NULL,
                                                  NULL), 0);
                ck_assert_uint_eq(l.key, first + i);
                keytable_release(t, &l, &ok, 20, NULL);
        }
        /* Round again: key 1 still full, key 0 still resting. */
        ck_assert_int_eq(keytable_acquire(t, slot, pool, 30, KEYTABLE_NO_KEY, &l, NULL, NULL), 0);
        ck_assert_uint_eq(l.key, first + 2);
        keytable_release(t, &l, &ok, 30, NULL);
        /* Key 1 freed: it was used before all the others that are listed, so it goes first; then
         * key 0 once its rest ends, as the least recently used of all. */
        keytable_release(t, &held, &ok, 40, NULL);
        ck_assert_int_eq(keytable_acquire(t, slot, pool, 40, KEYTABLE_NO_KEY, &l, NULL, NULL), 0);
        ck_assert_uint_eq(l.key, first + 1);
        keytable_release(t, &l, &ok, 40, NULL);
        ck_assert_int_eq(keytable_acquire(t, slot, pool, 5010, KEYTABLE_NO_KEY, &l, &w, NULL), 0);
        ck_assert_uint_eq(l.key, first);
        keytable_release(t, &l, &ok, 5010, NULL);
        ck_assert_int_eq(keytable_acquire(t, slot, pool, 5010, KEYTABLE_NO_KEY, &l, &w, NULL), 0);
        ck_assert_uint_eq(l.key, first + 3);
        keytable_release(t, &l, &ok, 5010, NULL);
        keytable_destroy(t);
}
END_TEST


/* --- the index functions, on rows set by hand ------------------------------------------------ */

#define DIRECT_KEYS 6

/* One pool of DIRECT_KEYS keys in bank 0: p is its table-wide pool row, first its first key row. */
struct direct {
        struct keytable *t;
        unsigned p, first;
};

static void direct_setup(struct direct *d) {
        const struct keytable_limits lim = {
                .max_pools = 2, .max_keys = 16, .n_slots = 2, .leases_per_slot = 2,
        };
        unsigned pool;

        ck_assert_int_eq(keytable_create(&lim, 0, &d->t), 0);
        ck_assert_int_eq(keytable_add_pool(d->t, "direct", "test/model", &pool), 0);
        for (unsigned i = 0; i < DIRECT_KEYS; i++) {
                char id[KEYID_ID_LEN + 1];
                unsigned k;

                snprintf(id, sizeof id, "kp-fake%05u", i);
                ck_assert_int_eq(keytable_add_key(d->t, pool, id, "sk-fake...", &k), 0);
                if (i == 0)
                        d->first = k;
        }
        d->p = kt_bank_first_pool(d->t, 0) + pool;
}

static struct kt_key *direct_key(struct direct *d, unsigned i) {
        return &d->t->keys[d->first + i];
}

static void direct_cool(struct direct *d, unsigned i, int64_t until_ms) {
        direct_key(d, i)->state = KEY_COOLING;
        direct_key(d, i)->reason = KEY_REASON_RATE_LIMITED;
        direct_key(d, i)->cooldown_until_ms = until_ms;
}

/* The keys on the list, head to tail, as positions; returns how many. */
static unsigned direct_listed(struct direct *d, unsigned ret[DIRECT_KEYS]) {
        unsigned n = 0;

        for (uint32_t k = d->t->pools[d->p].head; k != KT_NIL; k = d->t->links[k].next) {
                ck_assert_uint_lt(n, DIRECT_KEYS);
                ret[n++] = k - d->first;
        }
        return n;
}

START_TEST(test_a_rebuild_lists_the_keys_that_can_serve_in_lru_order_and_heaps_the_resting_ones)
{
        struct direct d;
        unsigned order[DIRECT_KEYS], n;
        const unsigned want[] = { 4, 0, 5, 2 };

        direct_setup(&d);
        /* Used in the order 2, 5, 0, 4 (older first); 1 rests until 900; 3 is full. */
        direct_key(&d, 0)->use_seq = 3;
        direct_key(&d, 1)->use_seq = 1;
        direct_key(&d, 2)->use_seq = 7;
        direct_key(&d, 4)->use_seq = 0;
        direct_key(&d, 5)->use_seq = 3;
        direct_cool(&d, 1, 900);
        direct_key(&d, 3)->max_concurrent = 1;
        direct_key(&d, 3)->in_flight = 1;

        kt_index_rebuild(d.t, d.p, 100);

        ck_assert_uint_eq(d.t->pools[d.p].index_valid, 1);
        n = direct_listed(&d, order);
        ck_assert_uint_eq(n, 4);
        for (unsigned i = 0; i < n; i++)
                ck_assert_msg(order[i] == want[i], "list place %u: expected key %u, found key %u", i,
                              want[i], order[i]);
        ck_assert_uint_eq(d.t->pools[d.p].n_due, 1);
        ck_assert_uint_eq(d.t->due[d.first].key, d.first + 1);
        ck_assert_int_eq(d.t->due[d.first].at_ms, 900);
        ck_assert_uint_eq(d.t->pools[d.p].n_full, 1);
        keytable_destroy(d.t);
}
END_TEST

START_TEST(test_an_updated_key_moves_between_the_list_the_heap_and_the_full_ones)
{
        struct keytable_wait w = { .retry_at_ms = 0 };
        struct keytable_change c = { .changed = false };
        unsigned order[DIRECT_KEYS];
        struct direct d;

        direct_setup(&d);
        kt_index_rebuild(d.t, d.p, 100);
        ck_assert_uint_eq(direct_listed(&d, order), DIRECT_KEYS);

        /* The head goes to rest: it leaves the list for the heap. */
        direct_cool(&d, 0, 500);
        kt_index_update(d.t, d.p, d.first, 100);
        ck_assert_uint_eq(d.t->links[d.first].place, KT_DUE);
        ck_assert_uint_eq(d.t->pools[d.p].n_due, 1);
        ck_assert_uint_eq(direct_listed(&d, order), DIRECT_KEYS - 1);
        ck_assert_uint_eq(order[0], 1);

        /* Key 1 fills up: counted, not listed. */
        direct_key(&d, 1)->max_concurrent = 2;
        direct_key(&d, 1)->in_flight = 2;
        kt_index_update(d.t, d.p, d.first + 1, 100);
        ck_assert_uint_eq(d.t->links[d.first + 1].place, KT_FULL);
        ck_assert_uint_eq(d.t->pools[d.p].n_full, 1);
        ck_assert_uint_eq(kt_index_choose(d.t, d.p, 100, KEYTABLE_NO_KEY, &w, &c), d.first + 2);
        ck_assert(!c.changed);

        /* Back below its limit, key 1 goes back to its LRU place, the head. */
        direct_key(&d, 1)->in_flight = 1;
        kt_index_update(d.t, d.p, d.first + 1, 100);
        ck_assert_uint_eq(d.t->pools[d.p].n_full, 0);
        ck_assert_uint_eq(direct_listed(&d, order), DIRECT_KEYS - 1);
        ck_assert_uint_eq(order[0], 1);

        /* Once its rest is over, the choice ends it and lists key 0 first again. */
        ck_assert_uint_eq(kt_index_choose(d.t, d.p, 500, KEYTABLE_NO_KEY, &w, &c), d.first);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.key, d.first);
        ck_assert_int_eq(direct_key(&d, 0)->state, KEY_READY);
        ck_assert_uint_eq(d.t->pools[d.p].n_due, 0);
        keytable_destroy(d.t);
}
END_TEST

START_TEST(test_a_take_moves_the_key_to_the_tail)
{
        unsigned order[DIRECT_KEYS];
        struct direct d;

        direct_setup(&d);
        kt_index_rebuild(d.t, d.p, 100);
        direct_key(&d, 0)->use_seq = ++d.t->pools[d.p].use_seq;
        kt_index_taken(d.t, d.p, d.first, 100);
        ck_assert_uint_eq(direct_listed(&d, order), DIRECT_KEYS);
        ck_assert_uint_eq(order[0], 1);
        ck_assert_uint_eq(order[DIRECT_KEYS - 1], 0);
        keytable_destroy(d.t);
}
END_TEST

START_TEST(test_an_empty_list_gives_the_earliest_time_and_whether_a_key_is_only_full)
{
        struct keytable_wait w = { .retry_at_ms = 0, .busy = false };
        struct keytable_change c = { .changed = false };
        struct direct d;

        direct_setup(&d);
        for (unsigned i = 0; i < DIRECT_KEYS; i++)
                direct_cool(&d, i, 2000 + 100 * (DIRECT_KEYS - i));
        direct_key(&d, 2)->state = KEY_READY;
        direct_key(&d, 2)->reason = KEY_REASON_NONE;
        direct_key(&d, 2)->cooldown_until_ms = 0;
        direct_key(&d, 2)->max_concurrent = 1;
        direct_key(&d, 2)->in_flight = 1;
        kt_index_rebuild(d.t, d.p, 1000);

        ck_assert_uint_eq(kt_index_choose(d.t, d.p, 1000, KEYTABLE_NO_KEY, &w, &c), UINT_MAX);
        ck_assert_int_eq(w.retry_at_ms, 2100);
        ck_assert(w.busy);
        ck_assert(kt_index_none_due(d.t, d.p, 2099));
        ck_assert(!kt_index_none_due(d.t, d.p, 2100));
        /* Only full: no key serves now, the index says so without a scan. */
        ck_assert(kt_index_some_key_serves(d.t, d.p, 1000));
        direct_key(&d, 2)->state = KEY_DISABLED;
        direct_key(&d, 2)->reason = KEY_REASON_OPERATOR;
        kt_index_update(d.t, d.p, d.first + 2, 1000);
        ck_assert(!kt_index_some_key_serves(d.t, d.p, 1000));
        ck_assert(kt_index_some_key_serves(d.t, d.p, 2100));
        keytable_destroy(d.t);
}
END_TEST

START_TEST(test_a_stale_or_scribbled_index_is_rebuilt_by_the_next_choice)
{
        struct keytable_wait w = { .retry_at_ms = 0 };
        struct keytable_change c = { .changed = false };
        struct direct d;

        direct_setup(&d);
        kt_index_rebuild(d.t, d.p, 100);
        d.t->pools[d.p].head = d.first + 4;
        d.t->links[d.first + 4].next = UINT32_MAX - 5;
        d.t->pools[d.p].n_due = UINT32_MAX;
        kt_index_stale(d.t, d.p);

        ck_assert_uint_eq(kt_index_choose(d.t, d.p, 100, KEYTABLE_NO_KEY, &w, &c), d.first);
        ck_assert_uint_eq(d.t->pools[d.p].index_valid, 1);
        ck_assert_uint_eq(d.t->pools[d.p].n_due, 0);
        keytable_destroy(d.t);
}
END_TEST

/* Rows in random states (ready, cooling until some time, disabled, full, out of their rpm,
 * used at random): the index, rebuilt from them, chooses as the scan does, with the same wait
 * and the same recovery reported. */
struct row_state {
        uint32_t state, reason;
        int64_t cooldown_until_ms, tat_us;
        uint64_t use_seq;
        uint32_t in_flight, max_concurrent, rpm;
};

static void direct_set(struct direct *d, const struct row_state *rs) {
        for (unsigned i = 0; i < DIRECT_KEYS; i++) {
                struct kt_key *key = direct_key(d, i);

                key->state = rs[i].state;
                key->reason = rs[i].reason;
                key->cooldown_until_ms = rs[i].cooldown_until_ms;
                key->cooling_since_ms = 0;
                key->consecutive_failures = 0;
                key->tat_us = rs[i].tat_us;
                key->use_seq = rs[i].use_seq;
                key->in_flight = rs[i].in_flight;
                key->max_concurrent = rs[i].max_concurrent;
                key->rpm = rs[i].rpm;
        }
}

START_TEST(test_the_index_on_random_rows_chooses_as_the_scan_does)
{
        unsigned seed = 20240611, listed = 0, none = 0;
        struct direct d;

        direct_setup(&d);
        for (unsigned round = 0; round < 5000; round++) {
                struct row_state rs[DIRECT_KEYS];
                struct keytable_wait wi = { .retry_at_ms = 0 }, ws = { .retry_at_ms = 0 };
                struct keytable_change ci = { .changed = false }, cs = { .changed = false };
                int64_t now = 10000;
                unsigned avoid, bi, bs;

                for (unsigned i = 0; i < DIRECT_KEYS; i++) {
                        unsigned kind = (unsigned) rand_r(&seed) % 5;

                        rs[i] = (struct row_state) {
                                .state = KEY_READY,
                                .use_seq = (uint64_t) (rand_r(&seed) % 4),
                        };
                        if (kind == 1) {
                                rs[i].state = KEY_COOLING;
                                rs[i].reason = KEY_REASON_RATE_LIMITED;
                                rs[i].cooldown_until_ms = now - 50 + rand_r(&seed) % 100;
                        } else if (kind == 2) {
                                rs[i].state = KEY_DISABLED;
                                rs[i].reason = KEY_REASON_AUTH;
                        } else if (kind == 3) {
                                rs[i].max_concurrent = 1 + (unsigned) rand_r(&seed) % 2;
                                rs[i].in_flight = (unsigned) rand_r(&seed) % 3;
                        } else if (kind == 4) {
                                rs[i].rpm = 60;
                                rs[i].tat_us = (now + 59000 + rand_r(&seed) % 2000) * 1000;
                        }
                }
                avoid = rand_r(&seed) % 3 == 0 ? d.first + (unsigned) rand_r(&seed) % DIRECT_KEYS
                                               : KEYTABLE_NO_KEY;

                direct_set(&d, rs);
                kt_index_stale(d.t, d.p);
                bi = kt_index_choose(d.t, d.p, now, avoid, &wi, &ci);
                direct_set(&d, rs);
                bs = kt_index_scan(d.t, d.p, now, avoid, &ws, &cs);

                ck_assert_msg(bi == bs, "round %u: index chose %u, scan %u", round, bi, bs);
                /* The wait is acquire's answer only when no key is chosen. */
                ck_assert_msg(bi != UINT_MAX ||
                              (wi.retry_at_ms == ws.retry_at_ms && wi.busy == ws.busy),
                              "round %u: index waits until %lld (busy %d), scan %lld (busy %d)",
                              round, (long long) wi.retry_at_ms, wi.busy,
                              (long long) ws.retry_at_ms, ws.busy);
                ck_assert_msg(ci.changed == cs.changed && (!ci.changed || ci.key == cs.key),
                              "round %u: index reports recovery %d of %u, scan %d of %u", round,
                              ci.changed, ci.key, cs.changed, cs.key);
                if (bi == UINT_MAX)
                        none++;
                else
                        listed++;
        }
        /* Both answers, many times. */
        ck_assert_uint_gt(listed, 1000);
        ck_assert_uint_gt(none, 100);
        keytable_destroy(d.t);
}
END_TEST

static Suite *keytable_index_suite(void) {
        Suite *s = suite_create("keytable_index");
        TCase *tc;

        tc = tcase_create("index_functions");
        tcase_add_test(tc, test_a_rebuild_lists_the_keys_that_can_serve_in_lru_order_and_heaps_the_resting_ones);
        tcase_add_test(tc, test_an_updated_key_moves_between_the_list_the_heap_and_the_full_ones);
        tcase_add_test(tc, test_a_take_moves_the_key_to_the_tail);
        tcase_add_test(tc, test_an_empty_list_gives_the_earliest_time_and_whether_a_key_is_only_full);
        tcase_add_test(tc, test_a_stale_or_scribbled_index_is_rebuilt_by_the_next_choice);
        tcase_add_test(tc, test_the_index_on_random_rows_chooses_as_the_scan_does);
        suite_add_tcase(s, tc);

        tc = tcase_create("choice_index");
        tcase_set_timeout(tc, 120);
        tcase_add_test(tc, test_the_index_chooses_exactly_as_a_scan_of_every_key_would);
        tcase_add_test(tc, test_the_index_is_rebuilt_after_a_holder_dies_half_way_through_moving_a_key);
        tcase_add_test(tc, test_choices_stay_right_after_workers_die_in_the_middle_of_index_updates);
        tcase_add_test(tc, test_a_big_pool_serves_in_lru_order_around_cooling_and_full_keys);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        SRunner *sr = srunner_create(keytable_index_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
