/* check_keytable.c — the shared key table: selection, per-key limits (max_concurrent, rpm),
 * cooldowns, rows shared across pools, account-wide limits, probes, leases, worker slots, the
 * history ring, observation counters, restoring saved state, and surviving processes that die at
 * the worst moment (robust mutexes, repair from the leases). */

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keypool/keytable.h"
#include "keytable_internal.h"      /* the consistency check's tests scribble on rows */

#define N_KEYS 3

/* A table with one pool of three keys and one claimed worker slot: the shape of the seed
 * configuration (a primary and two backups). */
struct fixture {
        struct keytable *t;
        unsigned pool;
        unsigned slot;
        unsigned key[N_KEYS];
};

static const struct keytable_limits small_limits = {
        .max_pools = 4,
        .max_keys = 64,
        .n_slots = 4,
        .leases_per_slot = 4,
};

static const char *const fake_ids[N_KEYS] = { "kp-fake00001", "kp-fake00002", "kp-fake00003" };
static const char *const fake_masks[N_KEYS] = {
        "sk-or-v1-fake00...001",
        "sk-or-v1-fake00...002",
        "sk-or-v1-fake00...003",
};

static void fixture_setup(struct fixture *f) {
        memset(f, 0, sizeof *f);
        ck_assert_int_eq(keytable_create(&small_limits, 1000, &f->t), 0);
        ck_assert_int_eq(keytable_add_pool(f->t, "openrouter", "openai/gpt-4o-mini", &f->pool), 0);
        for (unsigned i = 0; i < N_KEYS; i++)
                ck_assert_int_eq(keytable_add_key(f->t, f->pool, fake_ids[i], fake_masks[i],
                                                  &f->key[i]), 0);
        ck_assert_int_eq(keytable_slot_claim(f->t, 1, 1000, &f->slot), 0);
}

static void fixture_teardown(struct fixture *f) {
        keytable_destroy(f->t);
        f->t = NULL;
}

static struct keytable_lease acquire_ok(struct fixture *f, unsigned slot, int64_t now) {
        struct keytable_lease l;
        int r = keytable_acquire(f->t, slot, f->pool, now, KEYTABLE_NO_KEY, &l, NULL, NULL);

        ck_assert_msg(r == 0, "acquire at %lld: expected success, got %d", (long long) now, r);
        return l;
}

static void release_as(struct fixture *f, const struct keytable_lease *l, enum verdict_class cls,
                       int status, int64_t rest_ms, int64_t now, struct keytable_change *ret_change) {
        struct keytable_outcome o = { .cls = cls, .status = status, .rest_ms = rest_ms,
                                      .figures = RATE_FIGURES_UNKNOWN };

        keytable_release(f->t, l, &o, now, ret_change);
}

static void snapshot(struct fixture *f, int64_t now, struct keytable_key_view v[N_KEYS]) {
        ck_assert_int_eq(keytable_pool_snapshot(f->t, f->pool, now, v), 0);
}

static pid_t wait_child(pid_t pid, int *ret_status) {
        pid_t r;

        do
                r = waitpid(pid, ret_status, 0);
        while (r < 0 && errno == EINTR);
        return r;
}

/* --- selection ----------------------------------------------------------------------------- */

START_TEST(test_primary_goes_first_then_lru_rotates_through_the_backups)
{
        struct fixture f;
        unsigned expected[] = { 0, 1, 2, 0, 1, 2, 0 };

        fixture_setup(&f);
        for (unsigned i = 0; i < sizeof expected / sizeof expected[0]; i++) {
                struct keytable_lease l = acquire_ok(&f, f.slot, 1000 + i);

                ck_assert_msg(l.key == f.key[expected[i]], "request %u: expected key %u, got %u",
                              i, f.key[expected[i]], l.key);
                ck_assert_uint_eq(l.pool, f.pool);
                ck_assert_uint_eq(l.slot, f.slot);
                release_as(&f, &l, VERDICT_OK, 200, 0, 1000 + i, NULL);
        }
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_never_used_keys_tie_and_are_taken_in_list_order)
{
        struct fixture f;
        struct keytable_lease l[N_KEYS];

        fixture_setup(&f);
        /* Held at once: every key is still unused when the next one is chosen. */
        for (unsigned i = 0; i < N_KEYS; i++) {
                l[i] = acquire_ok(&f, f.slot, 1000);
                ck_assert_uint_eq(l[i].key, f.key[i]);
        }
        for (unsigned i = 0; i < N_KEYS; i++)
                release_as(&f, &l[i], VERDICT_OK, 200, 0, 1000, NULL);
        fixture_teardown(&f);
}
END_TEST

/* --- cooldowns and disabling --------------------------------------------------------------- */

START_TEST(test_rate_limited_key_gets_no_traffic_until_its_cooldown_passes)
{
        struct fixture f;
        struct keytable_change c;
        struct keytable_lease l;

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(l.key, f.key[0]);
        release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 30000, 1000, &c);
        ck_assert_msg(c.changed, "a rate limit must be reported as a state change");
        ck_assert_uint_eq(c.key, f.key[0]);
        ck_assert_int_eq(c.from, KEY_READY);
        ck_assert_int_eq(c.to, KEY_COOLING);
        ck_assert_int_eq(c.reason, KEY_REASON_RATE_LIMITED);
        ck_assert_int_eq(c.until_ms, 31000);

        for (int64_t now = 1000; now < 31000; now += 997) {
                l = acquire_ok(&f, f.slot, now);
                ck_assert_msg(l.key != f.key[0], "cooling key served a request at %lld",
                              (long long) now);
                release_as(&f, &l, VERDICT_OK, 200, 0, now, NULL);
        }
        l = acquire_ok(&f, f.slot, 30999);
        ck_assert_uint_ne(l.key, f.key[0]);
        release_as(&f, &l, VERDICT_OK, 200, 0, 30999, NULL);

        /* Its last use is the oldest, so the recovered key is the next one served. */
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 31000, KEYTABLE_NO_KEY, &l, NULL,
                                          &c), 0);
        ck_assert_uint_eq(l.key, f.key[0]);
        ck_assert_msg(c.changed, "recovery must be reported as a state change");
        ck_assert_uint_eq(c.key, f.key[0]);
        ck_assert_int_eq(c.from, KEY_COOLING);
        ck_assert_int_eq(c.to, KEY_READY);
        release_as(&f, &l, VERDICT_OK, 200, 0, 31000, NULL);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_rate_limit_with_no_rest_still_cools_the_key_for_a_moment)
{
        struct fixture f;
        struct keytable_change c;
        struct keytable_lease l;

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 5000);
        release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 0, 5000, &c);
        ck_assert(c.changed);
        ck_assert_int_eq(c.until_ms, 5001);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_shorter_rate_limit_hint_never_shortens_a_cooldown)
{
        struct fixture f;
        struct keytable_change c;
        struct keytable_lease a, b;
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        /* Two requests in flight on the primary; both come back rate limited. */
        a = acquire_ok(&f, f.slot, 1000);
        (void) acquire_ok(&f, f.slot, 1000);
        (void) acquire_ok(&f, f.slot, 1000);
        b = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(a.key, f.key[0]);
        ck_assert_uint_eq(b.key, f.key[0]);

        release_as(&f, &a, VERDICT_RATE_LIMITED, 429, 60000, 1000, &c);
        ck_assert_int_eq(c.until_ms, 61000);
        release_as(&f, &b, VERDICT_RATE_LIMITED, 429, 1000, 1100, &c);
        ck_assert_msg(!c.changed, "a shorter hint changed nothing and must not be reported");
        snapshot(&f, 2000, v);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_int_eq(v[0].cooldown_until_ms, 61000);
        ck_assert_uint_eq(v[0].rate_limited, 2);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_auth_and_quota_failures_disable_their_keys_for_good)
{
        struct fixture f;
        struct keytable_change c;
        struct keytable_lease l;
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(l.key, f.key[0]);
        release_as(&f, &l, VERDICT_AUTH, 401, 0, 1000, &c);
        ck_assert(c.changed);
        ck_assert_int_eq(c.from, KEY_READY);
        ck_assert_int_eq(c.to, KEY_DISABLED);
        ck_assert_int_eq(c.reason, KEY_REASON_AUTH);

        l = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(l.key, f.key[1]);
        release_as(&f, &l, VERDICT_QUOTA, 402, 0, 1000, &c);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.key, f.key[1]);
        ck_assert_int_eq(c.reason, KEY_REASON_QUOTA);

        /* No amount of time brings a disabled key back by itself. */
        for (int64_t now = 1000; now < 100000000; now *= 3) {
                l = acquire_ok(&f, f.slot, now);
                ck_assert_uint_eq(l.key, f.key[2]);
                release_as(&f, &l, VERDICT_OK, 200, 0, now, NULL);
        }

        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_DISABLED);
        ck_assert_int_eq(v[0].reason, KEY_REASON_AUTH);
        ck_assert_uint_eq(v[0].failures, 1);
        ck_assert_int_eq(v[0].last_status, 401);
        ck_assert_int_eq(v[0].last_class, VERDICT_AUTH);
        ck_assert_int_eq(v[1].state, KEY_DISABLED);
        ck_assert_int_eq(v[1].reason, KEY_REASON_QUOTA);
        ck_assert_int_eq(v[2].state, KEY_READY);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_all_keys_cooling_gives_eagain_with_the_earliest_recovery)
{
        struct fixture f;
        struct keytable_lease l[N_KEYS], untouched = { .pool = 99, .key = 99 };
        struct keytable_wait w = { .retry_at_ms = -1, .busy = true };
        int64_t rest[N_KEYS] = { 5000, 2000, 9000 };

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        for (unsigned i = 0; i < N_KEYS; i++)
                release_as(&f, &l[i], VERDICT_RATE_LIMITED, 429, rest[i], 1000, NULL);

        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 1500, KEYTABLE_NO_KEY, &untouched,
                                          &w, NULL), -EAGAIN);
        ck_assert_int_eq(w.retry_at_ms, 3000);
        ck_assert_msg(!w.busy, "no key is merely full");
        ck_assert_uint_eq(untouched.key, 99);

        /* The earliest one is back exactly then. */
        l[0] = acquire_ok(&f, f.slot, 3000);
        ck_assert_uint_eq(l[0].key, f.key[1]);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_all_keys_disabled_gives_eagain_with_no_retry_time)
{
        struct fixture f;
        struct keytable_lease l[N_KEYS];
        struct keytable_wait w = { .retry_at_ms = -1, .busy = true };

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l[0], VERDICT_AUTH, 401, 0, 1000, NULL);
        release_as(&f, &l[1], VERDICT_QUOTA, 429, 0, 1000, NULL);
        release_as(&f, &l[2], VERDICT_AUTH, 403, 0, 1000, NULL);

        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 2000, KEYTABLE_NO_KEY, &l[0], &w,
                                          NULL), -EAGAIN);
        ck_assert_int_eq(w.retry_at_ms, 0);
        ck_assert(!w.busy);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_late_rate_limit_does_not_revive_a_disabled_key)
{
        struct fixture f;
        struct keytable_lease a, b;
        struct keytable_change c;
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        a = acquire_ok(&f, f.slot, 1000);
        (void) acquire_ok(&f, f.slot, 1000);
        (void) acquire_ok(&f, f.slot, 1000);
        b = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(b.key, a.key);
        release_as(&f, &a, VERDICT_AUTH, 401, 0, 1000, NULL);
        release_as(&f, &b, VERDICT_RATE_LIMITED, 429, 1000, 1000, &c);
        ck_assert(!c.changed);
        snapshot(&f, 5000, v);
        ck_assert_int_eq(v[0].state, KEY_DISABLED);
        ck_assert_int_eq(v[0].reason, KEY_REASON_AUTH);
        fixture_teardown(&f);
}
END_TEST

/* --- outcomes and counters ----------------------------------------------------------------- */

START_TEST(test_release_records_counters_and_failure_streaks)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200, .tokens_in = 11,
                                       .tokens_out = 7, .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        /* Disable the backups so every request lands on the primary. */
        for (unsigned i = 0; i < N_KEYS; i++) {
                l = acquire_ok(&f, f.slot, 1000);
                release_as(&f, &l, i == 0 ? VERDICT_OK : VERDICT_AUTH, 200, 0, 1000, NULL);
        }

        l = acquire_ok(&f, f.slot, 1100);
        release_as(&f, &l, VERDICT_TRANSIENT, 502, 0, 1100, NULL);
        l = acquire_ok(&f, f.slot, 1200);
        release_as(&f, &l, VERDICT_TRANSIENT, 503, 0, 1200, NULL);
        snapshot(&f, 1200, v);
        ck_assert_uint_eq(v[0].consecutive_failures, 2);
        ck_assert_uint_eq(v[0].failures, 2);
        ck_assert_int_eq(v[0].last_status, 503);
        ck_assert_int_eq(v[0].last_class, VERDICT_TRANSIENT);
        ck_assert_int_eq(v[0].state, KEY_READY);

        l = acquire_ok(&f, f.slot, 1300);
        keytable_release(f.t, &l, &ok, 1300, NULL);
        snapshot(&f, 1300, v);
        ck_assert_msg(v[0].consecutive_failures == 0, "a success must end the failure streak");
        ck_assert_uint_eq(v[0].successes, 2);
        ck_assert_uint_eq(v[0].tokens_in, 11);
        ck_assert_uint_eq(v[0].tokens_out, 7);
        ck_assert_int_eq(v[0].last_used_ms, 1300);

        l = acquire_ok(&f, f.slot, 1400);
        release_as(&f, &l, VERDICT_CALLER, 400, 0, 1400, NULL);
        snapshot(&f, 1400, v);
        ck_assert_int_eq(v[0].state, KEY_READY);
        ck_assert_int_eq(v[0].last_status, 400);
        ck_assert_int_eq(v[0].last_class, VERDICT_CALLER);
        ck_assert_uint_eq(v[0].failures, 2);
        ck_assert_uint_eq(v[0].successes, 2);

        /* An aborted request records nothing but its return. */
        l = acquire_ok(&f, f.slot, 1500);
        release_as(&f, &l, VERDICT_NONE, 0, 0, 1500, NULL);
        snapshot(&f, 1500, v);
        ck_assert_int_eq(v[0].last_status, 400);
        ck_assert_int_eq(v[0].last_class, VERDICT_CALLER);
        ck_assert_uint_eq(v[0].requests, 6);
        ck_assert_uint_eq(v[0].in_flight, 0);
        fixture_teardown(&f);
}
END_TEST

/* --- per-key limits: max_concurrent and rpm ------------------------------------------------ */

static int try_acquire(struct fixture *f, int64_t now, unsigned avoid, struct keytable_lease *ret,
                       struct keytable_wait *ret_wait) {
        return keytable_acquire(f->t, f->slot, f->pool, now, avoid, ret, ret_wait, NULL);
}

static void release_outcome(struct fixture *f, const struct keytable_lease *l,
                            struct keytable_outcome o, int64_t now,
                            struct keytable_change *ret_change) {
        keytable_release(f->t, l, &o, now, ret_change);
}

/* Leaves key[keep] as the pool's only usable key. */
static void disable_all_but(struct fixture *f, unsigned keep) {
        for (unsigned i = 0; i < N_KEYS; i++)
                if (i != keep)
                        ck_assert_int_eq(keytable_disable(f->t, f->key[i], KEY_REASON_OPERATOR, 1000,
                                                          NULL), 0);
}

START_TEST(test_a_key_at_its_max_concurrent_is_skipped)
{
        struct fixture f;
        struct keytable_lease l[4];
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 1, 0), 0);
        for (unsigned i = 0; i < 4; i++)
                l[i] = acquire_ok(&f, f.slot, 1000 + i);
        ck_assert_uint_eq(l[0].key, f.key[0]);
        /* Least recently used, but full: the next key in line serves instead. */
        ck_assert_msg(l[3].key != f.key[0], "a key at max_concurrent 1 got a second request");
        snapshot(&f, 1010, v);
        ck_assert_uint_eq(v[0].max_concurrent, 1);
        ck_assert_uint_eq(v[0].in_flight, 1);
        ck_assert_uint_eq(v[1].max_concurrent, 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_every_key_at_its_max_concurrent_gives_eagain_busy_and_no_retry_time)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_wait w = { .retry_at_ms = -1 };

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[i], 1, 0), 0);
                (void) acquire_ok(&f, f.slot, 1000);
        }
        ck_assert_int_eq(try_acquire(&f, 1000, KEYTABLE_NO_KEY, &l, &w), -EAGAIN);
        ck_assert_msg(w.busy, "full keys must be reported busy: a release frees them");
        ck_assert_msg(w.retry_at_ms == 0, "nothing time-based is coming, got retry at %lld",
                      (long long) w.retry_at_ms);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_releasing_a_full_key_reports_freed_capacity_and_it_serves_again)
{
        struct fixture f;
        struct keytable_lease l[N_KEYS], again;
        struct keytable_change c;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 1, 0), 0);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[1], 1, 0), 0);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);

        release_as(&f, &l[1], VERDICT_OK, 200, 0, 1100, &c);
        ck_assert_msg(c.freed_capacity, "a release from a full key must say it freed capacity");
        ck_assert_uint_eq(c.key, f.key[1]);
        ck_assert(!c.changed);

        again = acquire_ok(&f, f.slot, 1200);
        ck_assert_uint_eq(again.key, f.key[1]);

        /* No limit, nothing to free. */
        release_as(&f, &l[2], VERDICT_OK, 200, 0, 1300, &c);
        ck_assert(!c.freed_capacity);
        /* A full key that goes to rest still wakes the waiters: they could not see its rest's end
         * while it was full, and must look again to learn when to come back. */
        release_as(&f, &l[0], VERDICT_RATE_LIMITED, 429, 5000, 1300, &c);
        ck_assert(c.changed);
        ck_assert_msg(c.freed_capacity, "waiters on a full key must hear it went to rest");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_max_concurrent_holds_across_processes)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_wait w = {};
        int ready[2], go[2], status;
        unsigned child_slot;
        char byte;
        pid_t pid;

        fixture_setup(&f);
        disable_all_but(&f, 0);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 2, 0), 0);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &child_slot), 0);
        ck_assert_int_eq(pipe(ready), 0);
        ck_assert_int_eq(pipe(go), 0);
        pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
                struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200,
                                               .figures = RATE_FIGURES_UNKNOWN };
                struct keytable_lease held[2];

                for (int i = 0; i < 2; i++)
                        if (keytable_acquire(f.t, child_slot, f.pool, 1000, KEYTABLE_NO_KEY,
                                             &held[i], NULL, NULL) < 0)
                                _exit(2);
                if (write(ready[1], "x", 1) != 1 || read(go[0], &byte, 1) != 1)
                        _exit(3);
                for (int i = 0; i < 2; i++)
                        keytable_release(f.t, &held[i], &ok, 1000, NULL);
                _exit(0);
        }
        ck_assert_int_eq(read(ready[0], &byte, 1), 1);

        ck_assert_msg(try_acquire(&f, 1000, KEYTABLE_NO_KEY, &l, &w) == -EAGAIN,
                      "another process's two leases must fill a key with max_concurrent 2");
        ck_assert(w.busy);

        ck_assert_int_eq(write(go[1], "x", 1), 1);
        ck_assert_int_eq(wait_child(pid, &status), pid);
        ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        l = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(l.key, f.key[0]);
        close(ready[0]);
        close(ready[1]);
        close(go[0]);
        close(go[1]);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_rpm_lets_a_burst_through_then_skips_the_key)
{
        struct fixture f;
        unsigned expected[] = { 0, 1, 2, 0, 1, 2, 1, 2 };
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 0, 2), 0);
        for (unsigned i = 0; i < sizeof expected / sizeof expected[0]; i++) {
                struct keytable_lease l = acquire_ok(&f, f.slot, 1000);

                ck_assert_msg(l.key == f.key[expected[i]], "request %u: expected key %u, got %u",
                              i, f.key[expected[i]], l.key);
                release_as(&f, &l, VERDICT_OK, 200, 0, 1000, NULL);
        }
        snapshot(&f, 1000, v);
        ck_assert_uint_eq(v[0].requests, 2);
        ck_assert_uint_eq(v[0].rpm, 2);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_rpm_wait_names_the_exact_ms_the_next_slot_opens)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_wait w = {};

        fixture_setup(&f);
        disable_all_but(&f, 0);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 0, 2), 0);
        for (int i = 0; i < 2; i++) {
                l = acquire_ok(&f, f.slot, 1000);
                release_as(&f, &l, VERDICT_OK, 200, 0, 1000, NULL);
        }
        ck_assert_int_eq(try_acquire(&f, 1000, KEYTABLE_NO_KEY, &l, &w), -EAGAIN);
        /* Two a minute: one every 30 s once the burst is spent. */
        ck_assert_int_eq(w.retry_at_ms, 31000);
        ck_assert_msg(!w.busy, "a key out of its rate is not busy");
        ck_assert_int_eq(try_acquire(&f, 30999, KEYTABLE_NO_KEY, &l, &w), -EAGAIN);
        ck_assert_int_eq(w.retry_at_ms, 31000);

        l = acquire_ok(&f, f.slot, 31000);
        ck_assert_uint_eq(l.key, f.key[0]);
        release_as(&f, &l, VERDICT_OK, 200, 0, 31000, NULL);
        ck_assert_int_eq(try_acquire(&f, 31000, KEYTABLE_NO_KEY, &l, &w), -EAGAIN);
        ck_assert_int_eq(w.retry_at_ms, 61000);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_each_key_keeps_its_own_rpm_so_an_override_beats_the_pool_default)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_wait w = {};
        struct keytable_key_view v[N_KEYS];
        unsigned served = 0;

        fixture_setup(&f);
        /* As config resolves them: the pool says 1 a minute, the primary overrides it with 3. */
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 0, 3), 0);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[1], 0, 1), 0);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[2], 0, 1), 0);
        while (try_acquire(&f, 1000, KEYTABLE_NO_KEY, &l, &w) == 0) {
                release_as(&f, &l, VERDICT_OK, 200, 0, 1000, NULL);
                ck_assert_uint_lt(++served, 100);
        }
        snapshot(&f, 1000, v);
        ck_assert_uint_eq(v[0].requests, 3);
        ck_assert_uint_eq(v[1].requests, 1);
        ck_assert_uint_eq(v[2].requests, 1);
        /* The primary's next slot (every 20 s) comes before the backups' (every 60 s). */
        ck_assert_int_eq(w.retry_at_ms, 21000);
        fixture_teardown(&f);
}
END_TEST

/* --- avoiding a key ------------------------------------------------------------------------ */

START_TEST(test_an_avoided_key_is_passed_over_while_another_can_serve)
{
        struct fixture f;
        struct keytable_lease l;

        fixture_setup(&f);
        /* The primary is least recently used (never), yet the retry goes elsewhere. */
        ck_assert_int_eq(try_acquire(&f, 1000, f.key[0], &l, NULL), 0);
        ck_assert_uint_eq(l.key, f.key[1]);
        release_as(&f, &l, VERDICT_OK, 200, 0, 1000, NULL);

        ck_assert_int_eq(keytable_disable(f.t, f.key[1], KEY_REASON_OPERATOR, 1000, NULL), 0);
        ck_assert_int_eq(try_acquire(&f, 1001, f.key[0], &l, NULL), 0);
        ck_assert_uint_eq(l.key, f.key[2]);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_an_avoided_key_is_taken_when_no_other_key_can_serve)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_wait w = {};

        fixture_setup(&f);
        disable_all_but(&f, 0);
        ck_assert_int_eq(try_acquire(&f, 1000, f.key[0], &l, NULL), 0);
        ck_assert_uint_eq(l.key, f.key[0]);

        /* …but only when it can serve itself. */
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 1, 0), 0);
        ck_assert_int_eq(try_acquire(&f, 1000, f.key[0], &l, &w), -EAGAIN);
        ck_assert(w.busy);
        fixture_teardown(&f);
}
END_TEST

/* --- outcomes: rests after success, runs of transient failures ----------------------------- */

START_TEST(test_a_success_that_leaves_nothing_cools_the_key_until_the_reset)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_change c;
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_OK, 200, 20000, 1000, &c);
        ck_assert_msg(c.changed, "a success with a rest must cool the key");
        ck_assert_int_eq(c.from, KEY_READY);
        ck_assert_int_eq(c.to, KEY_COOLING);
        ck_assert_int_eq(c.reason, KEY_REASON_RATE_LIMITED);
        ck_assert_int_eq(c.until_ms, 21000);

        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_uint_eq(v[0].successes, 1);
        ck_assert_msg(v[0].rate_limited == 0, "a success is not a rate limit");
        for (int64_t now = 1000; now < 21000; now += 1999) {
                l = acquire_ok(&f, f.slot, now);
                ck_assert_uint_ne(l.key, f.key[0]);
                release_as(&f, &l, VERDICT_OK, 200, 0, now, NULL);
        }
        fixture_teardown(&f);
}
END_TEST

static const struct keytable_policy transient_policy = {
        .transient_threshold = 3,
        .transient_cooldown_ms = 5000,
};

START_TEST(test_transient_failures_cool_a_key_only_after_threshold_in_a_row)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_change c;
        struct keytable_key_view v[N_KEYS];
        struct keytable_wait w = {};

        fixture_setup(&f);
        keytable_set_policy(f.t, &transient_policy);
        disable_all_but(&f, 0);
        for (int i = 0; i < 2; i++) {
                l = acquire_ok(&f, f.slot, 1000 + i);
                release_as(&f, &l, VERDICT_TRANSIENT, 502, 0, 1000 + i, &c);
                ck_assert_msg(!c.changed, "failure %d of 3 must not cool the key", i + 1);
        }
        l = acquire_ok(&f, f.slot, 1002);
        release_as(&f, &l, VERDICT_TRANSIENT, 503, 0, 1002, &c);
        ck_assert_msg(c.changed, "the third transient failure in a row must cool the key");
        ck_assert_int_eq(c.to, KEY_COOLING);
        ck_assert_int_eq(c.reason, KEY_REASON_TRANSIENT);
        ck_assert_int_eq(c.until_ms, 6002);
        snapshot(&f, 1002, v);
        ck_assert_uint_eq(v[0].failures, 3);
        ck_assert_int_eq(v[0].reason, KEY_REASON_TRANSIENT);

        ck_assert_int_eq(try_acquire(&f, 6001, KEYTABLE_NO_KEY, &l, &w), -EAGAIN);
        ck_assert_int_eq(w.retry_at_ms, 6002);

        /* After the rest it takes another whole run. */
        for (int i = 0; i < 2; i++) {
                l = acquire_ok(&f, f.slot, 6002 + i);
                release_as(&f, &l, VERDICT_TRANSIENT, 502, 0, 6002 + i, &c);
                ck_assert_msg(c.to != KEY_COOLING, "failure %d of a new run cooled the key", i + 1);
        }
        l = acquire_ok(&f, f.slot, 6004);
        release_as(&f, &l, VERDICT_TRANSIENT, 502, 0, 6004, &c);
        ck_assert(c.changed);
        ck_assert_int_eq(c.to, KEY_COOLING);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_success_between_transient_failures_resets_the_run)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_change c;
        enum verdict_class run[] = { VERDICT_TRANSIENT, VERDICT_TRANSIENT, VERDICT_OK,
                                     VERDICT_TRANSIENT, VERDICT_TRANSIENT };

        fixture_setup(&f);
        keytable_set_policy(f.t, &transient_policy);
        disable_all_but(&f, 0);
        for (unsigned i = 0; i < sizeof run / sizeof run[0]; i++) {
                l = acquire_ok(&f, f.slot, 1000 + i);
                release_as(&f, &l, run[i], run[i] == VERDICT_OK ? 200 : 502, 0, 1000 + i, &c);
                ck_assert_msg(!c.changed, "outcome %u cooled the key", i);
        }
        l = acquire_ok(&f, f.slot, 2000);
        release_as(&f, &l, VERDICT_TRANSIENT, 502, 0, 2000, &c);
        ck_assert_int_eq(c.to, KEY_COOLING);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_transient_failures_never_cool_without_a_threshold)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_change c;

        fixture_setup(&f);
        disable_all_but(&f, 0);
        for (int i = 0; i < 50; i++) {
                l = acquire_ok(&f, f.slot, 1000 + i);
                release_as(&f, &l, VERDICT_TRANSIENT, 502, 0, 1000 + i, &c);
                ck_assert(!c.changed);
        }
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_release_stores_the_figures_sent_and_sums_tokens)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_key_view v[N_KEYS];
        struct keytable_outcome o = {
                .cls = VERDICT_OK, .status = 200, .tokens_in = 10, .tokens_out = 20,
                .figures = { .remaining_requests = 5, .remaining_tokens = 1000,
                             .reset_requests_ms = 20000, .reset_tokens_ms = -1 },
        };

        fixture_setup(&f);
        disable_all_but(&f, 0);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].figures.remaining_requests, -1);
        ck_assert_int_eq(v[0].figures_ms, 0);

        l = acquire_ok(&f, f.slot, 1000);
        release_outcome(&f, &l, o, 1000, NULL);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].figures.remaining_requests, 5);
        ck_assert_int_eq(v[0].figures.remaining_tokens, 1000);
        ck_assert_int_eq(v[0].figures.reset_requests_ms, 20000);
        ck_assert_int_eq(v[0].figures.reset_tokens_ms, -1);
        ck_assert_int_eq(v[0].figures_ms, 1000);

        /* An answer with only some figures updates only those. */
        o = (struct keytable_outcome) {
                .cls = VERDICT_TRANSIENT, .status = 502, .tokens_in = 1, .tokens_out = 2,
                .figures = { .remaining_requests = -1, .remaining_tokens = 900,
                             .reset_requests_ms = -1, .reset_tokens_ms = 3000 },
        };
        l = acquire_ok(&f, f.slot, 2000);
        release_outcome(&f, &l, o, 2000, NULL);
        /* An answer with none leaves them and their time alone. */
        l = acquire_ok(&f, f.slot, 3000);
        release_as(&f, &l, VERDICT_OK, 200, 0, 3000, NULL);

        snapshot(&f, 3000, v);
        ck_assert_int_eq(v[0].figures.remaining_requests, 5);
        ck_assert_int_eq(v[0].figures.remaining_tokens, 900);
        ck_assert_int_eq(v[0].figures.reset_requests_ms, 20000);
        ck_assert_int_eq(v[0].figures.reset_tokens_ms, 3000);
        ck_assert_int_eq(v[0].figures_ms, 2000);
        ck_assert_uint_eq(v[0].tokens_in, 11);
        ck_assert_uint_eq(v[0].tokens_out, 22);
        fixture_teardown(&f);
}
END_TEST

/* --- one key in several pools (cooldown_scope key) ----------------------------------------- */

/* Two pools sharing one key: A = { shared, a_only }, B = { b_only, shared }. */
struct twin_fixture {
        struct keytable *t;
        unsigned a, b, slot;
        unsigned a_shared, a_only, b_only, b_shared;
};

static void twin_setup(struct twin_fixture *f, bool scope_key) {
        struct keytable_policy pol = { .cooldown_scope_key = scope_key };

        memset(f, 0, sizeof *f);
        ck_assert_int_eq(keytable_create(&small_limits, 1000, &f->t), 0);
        keytable_set_policy(f->t, &pol);
        ck_assert_int_eq(keytable_add_pool(f->t, "mini", "openai/gpt-4o-mini", &f->a), 0);
        ck_assert_int_eq(keytable_add_key(f->t, f->a, fake_ids[0], fake_masks[0], &f->a_shared), 0);
        ck_assert_int_eq(keytable_add_key(f->t, f->a, fake_ids[1], fake_masks[1], &f->a_only), 0);
        ck_assert_int_eq(keytable_add_pool(f->t, "big", "openai/gpt-4o", &f->b), 0);
        ck_assert_int_eq(keytable_add_key(f->t, f->b, fake_ids[2], fake_masks[2], &f->b_only), 0);
        ck_assert_int_eq(keytable_add_key(f->t, f->b, fake_ids[0], fake_masks[0], &f->b_shared), 0);
        ck_assert_int_eq(keytable_slot_claim(f->t, 1, 1000, &f->slot), 0);
}

/* Takes the lease on key in pool and returns it rate limited. */
static void twin_rate_limit(struct twin_fixture *f, unsigned pool, unsigned key, int64_t rest,
                            int64_t now, struct keytable_change *ret_change) {
        struct keytable_outcome o = { .cls = VERDICT_RATE_LIMITED, .status = 429, .rest_ms = rest,
                                      .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_lease l;
        unsigned other = pool == f->a ? (key == f->a_shared ? f->a_only : f->a_shared)
                                      : (key == f->b_shared ? f->b_only : f->b_shared);

        ck_assert_int_eq(keytable_acquire(f->t, f->slot, pool, now, other, &l, NULL, NULL), 0);
        ck_assert_uint_eq(l.key, key);
        keytable_release(f->t, &l, &o, now, ret_change);
}

static struct keytable_key_view twin_view(struct twin_fixture *f, unsigned pool, unsigned key,
                                          int64_t now) {
        struct keytable_key_view v[2];
        struct keytable_pool_view pv;

        ck_assert_int_eq(keytable_pool_info(f->t, pool, &pv), 0);
        ck_assert_int_eq(keytable_pool_snapshot(f->t, pool, now, v), 0);
        return v[key - pv.first_key];
}

START_TEST(test_scope_key_rate_limit_cools_the_same_key_in_other_pools)
{
        struct twin_fixture f;
        struct keytable_change c;
        struct keytable_key_view v;
        struct keytable_lease l;

        twin_setup(&f, true);
        twin_rate_limit(&f, f.a, f.a_shared, 30000, 1000, &c);
        ck_assert(c.changed);
        ck_assert_msg(c.twins_cooled == 1, "expected the row in the other pool cooled, got %u",
                      c.twins_cooled);

        v = twin_view(&f, f.b, f.b_shared, 1000);
        ck_assert_int_eq(v.state, KEY_COOLING);
        ck_assert_int_eq(v.reason, KEY_REASON_RATE_LIMITED);
        ck_assert_int_eq(v.cooldown_until_ms, 31000);
        ck_assert_msg(v.rate_limited == 0, "twins share the rest, not the counters");
        ck_assert_int_eq(twin_view(&f, f.b, f.b_only, 1000).state, KEY_READY);

        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.b, 2000, KEYTABLE_NO_KEY, &l, NULL, NULL),
                         0);
        ck_assert_uint_eq(l.key, f.b_only);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.b, 2000, KEYTABLE_NO_KEY, &l, NULL, NULL),
                         0);
        ck_assert_msg(l.key == f.b_only, "the cooled twin served in the other pool");
        keytable_destroy(f.t);
}
END_TEST

START_TEST(test_scope_pool_rate_limit_cools_only_its_own_row)
{
        struct twin_fixture f;
        struct keytable_change c;

        twin_setup(&f, false);
        twin_rate_limit(&f, f.a, f.a_shared, 30000, 1000, &c);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.twins_cooled, 0);
        ck_assert_int_eq(twin_view(&f, f.a, f.a_shared, 1000).state, KEY_COOLING);
        ck_assert_int_eq(twin_view(&f, f.b, f.b_shared, 1000).state, KEY_READY);
        keytable_destroy(f.t);
}
END_TEST

START_TEST(test_scope_key_never_shortens_a_twins_longer_cooldown)
{
        struct twin_fixture f;
        struct keytable_change c;
        struct keytable_policy scope_key = { .cooldown_scope_key = true };
        struct keytable_key_view v;

        twin_setup(&f, false);
        twin_rate_limit(&f, f.b, f.b_shared, 60000, 1000, &c);
        keytable_set_policy(f.t, &scope_key);

        twin_rate_limit(&f, f.a, f.a_shared, 10000, 2000, &c);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.twins_cooled, 0);
        v = twin_view(&f, f.b, f.b_shared, 2000);
        ck_assert_int_eq(v.state, KEY_COOLING);
        ck_assert_msg(v.cooldown_until_ms == 61000, "the twin's longer rest was cut to %lld",
                      (long long) v.cooldown_until_ms);
        keytable_destroy(f.t);
}
END_TEST

START_TEST(test_scope_key_leaves_a_disabled_twin_disabled)
{
        struct twin_fixture f;
        struct keytable_change c;
        struct keytable_key_view v;

        twin_setup(&f, true);
        ck_assert_int_eq(keytable_disable(f.t, f.b_shared, KEY_REASON_AUTH, 1000, NULL), 0);
        twin_rate_limit(&f, f.a, f.a_shared, 30000, 1000, &c);
        ck_assert_uint_eq(c.twins_cooled, 0);
        v = twin_view(&f, f.b, f.b_shared, 1000);
        ck_assert_int_eq(v.state, KEY_DISABLED);
        ck_assert_int_eq(v.reason, KEY_REASON_AUTH);
        keytable_destroy(f.t);
}
END_TEST

START_TEST(test_the_same_key_twice_in_one_pool_is_refused)
{
        struct twin_fixture f;

        twin_setup(&f, true);
        ck_assert_int_eq(keytable_add_key(f.t, f.b, fake_ids[0], fake_masks[0], NULL), -EEXIST);
        ck_assert_int_eq(keytable_add_key(f.t, f.b, fake_ids[2], fake_masks[2], NULL), -EEXIST);
        ck_assert_uint_eq(keytable_n_keys(f.t), 4);
        keytable_destroy(f.t);
}
END_TEST

/* --- account-wide limits ------------------------------------------------------------------- */

START_TEST(test_every_key_limited_within_a_second_suspects_an_account_limit)
{
        struct fixture f;
        struct keytable_lease l[N_KEYS];
        struct keytable_change c;
        struct keytable_pool_view pv;
        int64_t at[N_KEYS] = { 1000, 1400, 1900 }, rest[N_KEYS] = { 30000, 45000, 20000 };

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        for (unsigned i = 0; i < N_KEYS; i++) {
                release_as(&f, &l[i], VERDICT_RATE_LIMITED, 429, rest[i], at[i], &c);
                ck_assert(c.changed);
                ck_assert_msg(c.account_limit_suspected == (i == N_KEYS - 1),
                              "after %u limited keys: suspected %d", i + 1,
                              c.account_limit_suspected);
        }
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_int_eq(pv.account_limit_until_ms, 46400);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_keys_limited_seconds_apart_are_not_an_account_limit)
{
        struct fixture f;
        struct keytable_lease l[N_KEYS];
        struct keytable_change c;
        struct keytable_pool_view pv;

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        for (unsigned i = 0; i < N_KEYS; i++) {
                release_as(&f, &l[i], VERDICT_RATE_LIMITED, 429, 60000, 1000 + 2000 * i, &c);
                ck_assert(c.changed);
                ck_assert(!c.account_limit_suspected);
        }
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_int_eq(pv.account_limit_until_ms, 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_key_limited_again_while_resting_keeps_the_time_its_rest_began)
{
        struct fixture f;
        struct keytable_lease first, again, l[2];
        struct keytable_change c;

        fixture_setup(&f);
        first = acquire_ok(&f, f.slot, 1000);
        l[0] = acquire_ok(&f, f.slot, 1000);
        l[1] = acquire_ok(&f, f.slot, 1000);
        again = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(again.key, first.key);

        release_as(&f, &first, VERDICT_RATE_LIMITED, 429, 10000, 1000, &c);
        /* A request that was already in flight comes back limited too, later and longer. */
        release_as(&f, &again, VERDICT_RATE_LIMITED, 429, 30000, 2500, &c);
        ck_assert(c.changed);
        ck_assert_int_eq(c.until_ms, 32500);
        release_as(&f, &l[0], VERDICT_RATE_LIMITED, 429, 30000, 2600, &c);
        release_as(&f, &l[1], VERDICT_RATE_LIMITED, 429, 30000, 2700, &c);
        ck_assert_msg(!c.account_limit_suspected,
                      "the primary's rest began 1.7 s earlier: not one limit for all");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_scope_key_cools_the_key_in_every_other_pool)
{
        const char *names[3] = { "one", "two", "three" };
        struct keytable_policy pol = { .cooldown_scope_key = true };
        struct keytable_outcome o = { .cls = VERDICT_RATE_LIMITED, .status = 429, .rest_ms = 5000,
                                      .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_change c;
        struct keytable_lease l;
        struct keytable_key_view v[2];
        struct keytable *t;
        unsigned pool[3], slot;

        ck_assert_int_eq(keytable_create(&small_limits, 1000, &t), 0);
        keytable_set_policy(t, &pol);
        for (unsigned i = 0; i < 3; i++) {
                ck_assert_int_eq(keytable_add_pool(t, names[i], "test/model", &pool[i]), 0);
                ck_assert_int_eq(keytable_add_key(t, pool[i], fake_ids[0], fake_masks[0], NULL), 0);
                ck_assert_int_eq(keytable_add_key(t, pool[i], fake_ids[1 + i % 2],
                                                  fake_masks[1 + i % 2], NULL), 0);
        }
        ck_assert_int_eq(keytable_slot_claim(t, 1, 1000, &slot), 0);
        /* From each pool in turn, after the last rest is over: every row reaches every other. */
        for (unsigned from = 0; from < 3; from++) {
                int64_t now = 1000 + 10000 * from;

                ck_assert_int_eq(keytable_acquire(t, slot, pool[from], now, KEYTABLE_NO_KEY, &l,
                                                  NULL, NULL), 0);
                ck_assert_uint_eq(l.key, 2 * from);
                keytable_release(t, &l, &o, now, &c);
                ck_assert_msg(c.twins_cooled == 2, "limited in pool %u: expected both other "
                              "pools' rows cooled, got %u", from, c.twins_cooled);
                for (unsigned i = 0; i < 3; i++) {
                        ck_assert_int_eq(keytable_pool_snapshot(t, pool[i], now, v), 0);
                        ck_assert_int_eq(v[0].state, KEY_COOLING);
                        ck_assert_int_eq(v[0].cooldown_until_ms, now + 5000);
                        /* kp-fake00002 sits in pools one and three, untouched by another key. */
                        ck_assert_int_eq(v[1].state, KEY_READY);
                }
        }
        keytable_destroy(t);
}
END_TEST

START_TEST(test_disabled_keys_do_not_count_against_an_account_limit_but_one_key_is_not_enough)
{
        struct fixture f;
        struct keytable_lease l[2];
        struct keytable_change c;

        fixture_setup(&f);
        l[0] = acquire_ok(&f, f.slot, 1000);
        l[1] = acquire_ok(&f, f.slot, 1000);
        ck_assert_int_eq(keytable_disable(f.t, f.key[2], KEY_REASON_AUTH, 1000, NULL), 0);
        release_as(&f, &l[0], VERDICT_RATE_LIMITED, 429, 10000, 1000, &c);
        ck_assert(!c.account_limit_suspected);
        release_as(&f, &l[1], VERDICT_RATE_LIMITED, 429, 10000, 1500, &c);
        ck_assert_msg(c.account_limit_suspected, "both usable keys limited within 1 s");
        fixture_teardown(&f);

        fixture_setup(&f);
        disable_all_but(&f, 0);
        l[0] = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l[0], VERDICT_RATE_LIMITED, 429, 10000, 1000, &c);
        ck_assert_msg(!c.account_limit_suspected, "one key alone says nothing of the account");
        fixture_teardown(&f);
}
END_TEST

/* --- probes and operator actions ----------------------------------------------------------- */

static const struct keytable_policy probe_policy = { .probe_interval_ms = 60000 };

START_TEST(test_a_quota_disabled_key_is_claimed_for_a_probe_once_due)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_key_view v[N_KEYS];
        unsigned key = 99, pool = 99;

        fixture_setup(&f);
        keytable_set_policy(f.t, &probe_policy);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_QUOTA, 402, 0, 1000, NULL);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].next_probe_ms, 61000);

        ck_assert_int_eq(keytable_probe_claim(f.t, 60999, &key, &pool), -ENOENT);
        ck_assert_uint_eq(key, 99);
        ck_assert_int_eq(keytable_probe_claim(f.t, 61000, &key, &pool), 0);
        ck_assert_uint_eq(key, f.key[0]);
        ck_assert_uint_eq(pool, f.pool);
        ck_assert_msg(keytable_probe_claim(f.t, 61000, &key, &pool) == -ENOENT,
                      "a claimed probe must not be handed to a second worker");
        snapshot(&f, 61000, v);
        ck_assert_int_eq(v[0].next_probe_ms, 121000);
        ck_assert_int_eq(v[0].state, KEY_DISABLED);
        ck_assert_int_eq(keytable_probe_claim(f.t, 121000, &key, &pool), 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_an_auth_disabled_key_is_probed_only_with_probe_auth)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_key_view v[N_KEYS];
        struct keytable_policy with_auth = probe_policy;
        unsigned key, pool;

        fixture_setup(&f);
        keytable_set_policy(f.t, &probe_policy);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_AUTH, 401, 0, 1000, NULL);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].next_probe_ms, 0);
        ck_assert_int_eq(keytable_probe_claim(f.t, 10000000, &key, &pool), -ENOENT);

        with_auth.probe_auth = true;
        keytable_set_policy(f.t, &with_auth);
        l = acquire_ok(&f, f.slot, 2000);
        ck_assert_uint_eq(l.key, f.key[1]);
        release_as(&f, &l, VERDICT_AUTH, 403, 0, 2000, NULL);
        ck_assert_int_eq(keytable_probe_claim(f.t, 61999, &key, &pool), -ENOENT);
        ck_assert_int_eq(keytable_probe_claim(f.t, 62000, &key, &pool), 0);
        ck_assert_uint_eq(key, f.key[1]);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_enable_brings_a_disabled_key_back_ready)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_change c;
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        keytable_set_policy(f.t, &probe_policy);
        disable_all_but(&f, 0);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_TRANSIENT, 502, 0, 1000, NULL);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_QUOTA, 402, 0, 1000, NULL);

        ck_assert_int_eq(keytable_enable(f.t, f.key[0], 2000, &c), 0);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.key, f.key[0]);
        ck_assert_int_eq(c.from, KEY_DISABLED);
        ck_assert_int_eq(c.to, KEY_READY);
        snapshot(&f, 2000, v);
        ck_assert_int_eq(v[0].state, KEY_READY);
        ck_assert_int_eq(v[0].reason, KEY_REASON_NONE);
        ck_assert_int_eq(v[0].next_probe_ms, 0);
        ck_assert_uint_eq(v[0].consecutive_failures, 0);
        l = acquire_ok(&f, f.slot, 2000);
        ck_assert_uint_eq(l.key, f.key[0]);

        ck_assert_int_eq(keytable_enable(f.t, f.key[0], 2000, &c), 0);
        ck_assert_msg(!c.changed, "enabling a ready key changes nothing");
        ck_assert_int_eq(keytable_enable(f.t, 999, 2000, &c), -EINVAL);
        ck_assert_int_eq(keytable_enable(NULL, 0, 2000, &c), -EINVAL);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_an_operator_disabled_key_is_never_probed)
{
        struct fixture f;
        struct keytable_change c;
        struct keytable_key_view v[N_KEYS];
        unsigned key, pool;

        fixture_setup(&f);
        keytable_set_policy(f.t, &probe_policy);
        ck_assert_int_eq(keytable_disable(f.t, f.key[0], KEY_REASON_OPERATOR, 1000, &c), 0);
        ck_assert(c.changed);
        ck_assert_int_eq(c.from, KEY_READY);
        ck_assert_int_eq(c.to, KEY_DISABLED);
        ck_assert_int_eq(c.reason, KEY_REASON_OPERATOR);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].next_probe_ms, 0);
        ck_assert_int_eq(keytable_probe_claim(f.t, 100000000, &key, &pool), -ENOENT);
        for (int i = 0; i < 5; i++) {
                struct keytable_lease l = acquire_ok(&f, f.slot, 1000 + i);

                ck_assert_uint_ne(l.key, f.key[0]);
                release_as(&f, &l, VERDICT_OK, 200, 0, 1000 + i, NULL);
        }

        ck_assert_int_eq(keytable_disable(f.t, f.key[0], KEY_REASON_OPERATOR, 1000, &c), 0);
        ck_assert_msg(!c.changed, "disabling again for the same reason changes nothing");
        /* Disabled for quota (by a probe that failed, say), it is probed on schedule. */
        ck_assert_int_eq(keytable_disable(f.t, f.key[0], KEY_REASON_QUOTA, 2000, &c), 0);
        ck_assert(c.changed);
        ck_assert_int_eq(keytable_probe_claim(f.t, 62000, &key, &pool), 0);
        ck_assert_uint_eq(key, f.key[0]);

        ck_assert_int_eq(keytable_disable(f.t, f.key[0], KEY_REASON_NONE, 1000, &c), -EINVAL);
        ck_assert_int_eq(keytable_disable(f.t, 999, KEY_REASON_OPERATOR, 1000, &c), -EINVAL);
        fixture_teardown(&f);
}
END_TEST

/* --- waiters ------------------------------------------------------------------------------- */

START_TEST(test_slots_with_waiters_lists_only_live_slots_that_have_some)
{
        struct fixture f;
        unsigned s2, s3, again, slots[4];

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &s2), 0);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &s3), 0);
        ck_assert_uint_eq(keytable_slots_with_waiters(f.t, slots, 4), 0);

        keytable_slot_set_waiters(f.t, f.slot, 2);
        keytable_slot_set_waiters(f.t, s2, 0);
        keytable_slot_set_waiters(f.t, s3, 1);
        keytable_slot_set_waiters(f.t, 99, 1);
        ck_assert_uint_eq(keytable_slots_with_waiters(f.t, slots, 4), 2);
        ck_assert_uint_eq(slots[0], f.slot);
        ck_assert_uint_eq(slots[1], s3);
        ck_assert_uint_eq(keytable_slots_with_waiters(f.t, slots, 1), 1);

        /* A dead worker's waiters died with it. */
        keytable_slot_release(f.t, s3);
        ck_assert_uint_eq(keytable_slots_with_waiters(f.t, slots, 4), 1);
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &again), 0);
        ck_assert_uint_eq(again, s3);
        ck_assert_uint_eq(keytable_slots_with_waiters(f.t, slots, 4), 1);

        keytable_slot_set_waiters(f.t, f.slot, 0);
        ck_assert_uint_eq(keytable_slots_with_waiters(f.t, slots, 4), 0);
        fixture_teardown(&f);
}
END_TEST

/* --- leases -------------------------------------------------------------------------------- */

START_TEST(test_in_flight_counts_follow_leases_out_and_back)
{
        struct fixture f;
        struct keytable_lease l[4];
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        for (unsigned i = 0; i < 4; i++)
                l[i] = acquire_ok(&f, f.slot, 1000 + i);
        snapshot(&f, 1010, v);
        ck_assert_uint_eq(v[0].in_flight, 2);
        ck_assert_uint_eq(v[1].in_flight, 1);
        ck_assert_uint_eq(v[2].in_flight, 1);
        ck_assert_uint_eq(v[0].requests, 2);

        for (unsigned i = 0; i < 4; i++)
                release_as(&f, &l[i], VERDICT_OK, 200, 0, 1010, NULL);
        snapshot(&f, 1010, v);
        for (unsigned i = 0; i < N_KEYS; i++)
                ck_assert_uint_eq(v[i].in_flight, 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_releasing_a_lease_twice_takes_one_request_off)
{
        struct fixture f;
        struct keytable_lease l[4];
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        for (unsigned i = 0; i < 4; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(l[3].key, f.key[0]);
        release_as(&f, &l[0], VERDICT_OK, 200, 0, 1000, NULL);
        release_as(&f, &l[0], VERDICT_OK, 200, 0, 1000, NULL);
        snapshot(&f, 1000, v);
        ck_assert_uint_eq(v[0].in_flight, 1);
        ck_assert_uint_eq(v[0].successes, 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_full_slot_gets_enospc_and_changes_nothing)
{
        struct fixture f;
        struct keytable_lease l, other;
        struct keytable_change c;
        struct keytable_key_view before[N_KEYS], after[N_KEYS];
        unsigned slot2;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &slot2), 0);
        /* Primary cools briefly, from another worker's request. */
        other = acquire_ok(&f, slot2, 1000);
        release_as(&f, &other, VERDICT_RATE_LIMITED, 429, 10, 1000, NULL);

        for (unsigned i = 0; i < small_limits.leases_per_slot; i++)
                (void) acquire_ok(&f, f.slot, 1001);
        snapshot(&f, 1001, before);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 2000, KEYTABLE_NO_KEY, &l, NULL, &c),
                         -ENOSPC);
        snapshot(&f, 1001, after);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_msg(before[i].state == after[i].state &&
                              before[i].cooldown_until_ms == after[i].cooldown_until_ms &&
                              before[i].requests == after[i].requests &&
                              before[i].in_flight == after[i].in_flight &&
                              before[i].last_used_ms == after[i].last_used_ms,
                              "a refused acquire must leave key %u as it was", i);
        }

        /* The cooldown ran out during the refused call, and is still there to be noticed. */
        ck_assert_int_eq(keytable_acquire(f.t, slot2, f.pool, 2000, KEYTABLE_NO_KEY, &other, NULL,
                                          &c), 0);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.key, f.key[0]);
        ck_assert_int_eq(c.to, KEY_READY);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_slot_release_returns_a_dead_workers_leases)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct keytable_worker_view w[4];
        unsigned child_slot;
        int status;
        pid_t pid;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &child_slot), 0);
        pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
                struct keytable_lease l;

                for (int i = 0; i < 3; i++)
                        if (keytable_acquire(f.t, child_slot, f.pool, 1000, KEYTABLE_NO_KEY, &l,
                                             NULL, NULL) < 0)
                                _exit(2);
                _exit(0);       /* without releasing: a crash, as far as the table knows */
        }
        keytable_slot_set_pid(f.t, child_slot, pid);
        ck_assert_int_eq(wait_child(pid, &status), pid);
        ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

        snapshot(&f, 1000, v);
        for (unsigned i = 0; i < N_KEYS; i++)
                ck_assert_uint_eq(v[i].in_flight, 1);
        ck_assert_uint_eq(keytable_workers(f.t, w, 4), 2);
        ck_assert_uint_eq(w[1].slot, child_slot);
        ck_assert_uint_eq(w[1].in_flight, 3);

        keytable_slot_release(f.t, child_slot);
        snapshot(&f, 1000, v);
        for (unsigned i = 0; i < N_KEYS; i++)
                ck_assert_msg(v[i].in_flight == 0, "key %u still counts %u in flight", i,
                              v[i].in_flight);
        ck_assert_uint_eq(keytable_workers(f.t, w, 4), 1);
        ck_assert_uint_eq(keytable_repairs(f.t), 0);
        fixture_teardown(&f);
}
END_TEST

/* --- robustness: processes dying with a pool lock held ------------------------------------- */

static pid_t fork_dier(struct fixture *f, unsigned slot, unsigned n_leases, unsigned scribbled) {
        pid_t pid = fork();

        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
                struct keytable_lease l;

                for (unsigned i = 0; i < n_leases; i++)
                        if (keytable_acquire(f->t, slot, f->pool, 1000, KEYTABLE_NO_KEY, &l, NULL,
                                             NULL) < 0)
                                _exit(2);
                if (keytable_test_die_holding_lock(f->t, f->pool, scribbled) < 0)
                        _exit(3);
                raise(SIGKILL);
                _exit(4);
        }
        return pid;
}

static void expect_killed(pid_t pid) {
        int status;

        ck_assert_int_eq(wait_child(pid, &status), pid);
        ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
                      "child should have died by SIGKILL holding the lock (status %#x)", status);
}

START_TEST(test_next_locker_repairs_a_pool_whose_holder_died)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_key_view v[N_KEYS];
        pid_t pid;

        fixture_setup(&f);
        pid = fork_dier(&f, f.slot, 0, f.key[1]);
        expect_killed(pid);

        /* Neither hangs nor fails. */
        l = acquire_ok(&f, f.slot, 2000);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        ck_assert_uint_eq(l.key, f.key[0]);

        snapshot(&f, 2000, v);
        ck_assert_msg(v[1].state == KEY_READY, "scribbled state %d was not repaired", v[1].state);
        ck_assert_int_eq(v[1].reason, KEY_REASON_NONE);
        ck_assert_msg(v[1].in_flight == 0, "phantom in-flight count %u survived the repair",
                      v[1].in_flight);
        ck_assert_uint_eq(v[0].in_flight, 1);
        release_as(&f, &l, VERDICT_OK, 200, 0, 2000, NULL);

        for (int64_t now = 2001; now < 2301; now++) {
                l = acquire_ok(&f, f.slot, now);
                release_as(&f, &l, VERDICT_OK, 200, 0, now, NULL);
        }
        snapshot(&f, 3000, v);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_int_eq(v[i].state, KEY_READY);
                ck_assert_uint_eq(v[i].in_flight, 0);
                ck_assert_uint_ge(v[i].requests, 100);
        }
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_repair_keeps_the_leases_a_dead_lock_holder_really_held)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_key_view v[N_KEYS];
        struct keytable_worker_view w[4];
        unsigned child_slot;
        pid_t pid;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &child_slot), 0);
        pid = fork_dier(&f, child_slot, 1, f.key[1]);
        expect_killed(pid);

        /* The child's lease is on the primary; the next unused key is the first backup. */
        l = acquire_ok(&f, f.slot, 2000);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        ck_assert_uint_eq(l.key, f.key[1]);
        snapshot(&f, 2000, v);
        ck_assert_msg(v[0].in_flight == 1, "the dead worker's real lease must still count, got %u",
                      v[0].in_flight);
        ck_assert_msg(v[1].in_flight == 1, "only the new lease counts on the scribbled key, got %u",
                      v[1].in_flight);
        ck_assert_int_eq(v[1].state, KEY_READY);

        ck_assert_uint_eq(keytable_workers(f.t, w, 4), 2);
        ck_assert_uint_eq(w[1].in_flight, 1);

        keytable_slot_release(f.t, child_slot);
        release_as(&f, &l, VERDICT_OK, 200, 0, 2000, NULL);
        snapshot(&f, 2000, v);
        for (unsigned i = 0; i < N_KEYS; i++)
                ck_assert_uint_eq(v[i].in_flight, 0);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_slot_release_copes_with_a_worker_that_died_holding_the_lock)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        unsigned child_slot;
        pid_t pid;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &child_slot), 0);
        pid = fork_dier(&f, child_slot, 2, f.key[2]);
        expect_killed(pid);

        keytable_slot_release(f.t, child_slot);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        snapshot(&f, 2000, v);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_uint_eq(v[i].in_flight, 0);
                ck_assert_int_eq(v[i].state, KEY_READY);
        }
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_repair_makes_the_new_fields_of_a_scribbled_row_safe)
{
        struct fixture f;
        struct keytable_policy pol = { .cooldown_scope_key = true, .probe_interval_ms = 60000 };
        struct keytable_lease l[2];
        struct keytable_change c;
        struct keytable_pool_view pv;
        struct keytable_key_view v[N_KEYS];
        pid_t pid;

        fixture_setup(&f);
        keytable_set_policy(f.t, &pol);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[1], 1, 1), 0);
        pid = fork_dier(&f, f.slot, 0, f.key[1]);
        expect_killed(pid);

        l[0] = acquire_ok(&f, f.slot, 2000);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        ck_assert_uint_eq(l[0].key, f.key[0]);
        snapshot(&f, 2000, v);
        ck_assert_int_eq(v[1].state, KEY_READY);
        ck_assert_int_eq(v[1].next_probe_ms, 0);
        ck_assert_int_eq(v[1].figures_ms, 0);
        ck_assert_msg(strlen(v[1].last_error) == KEYTABLE_ERROR_MAX,
                      "an unterminated last error must be cut at its size, got %zu bytes",
                      strlen(v[1].last_error));
        ck_assert_uint_eq(v[1].rpm, 1);
        ck_assert_uint_eq(v[1].max_concurrent, 1);
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_int_eq(pv.account_limit_until_ms, 0);

        /* A scribbled rate timestamp does not shut the key out, nor does its limit go away. */
        l[1] = acquire_ok(&f, f.slot, 2000);
        ck_assert_msg(l[1].key == f.key[1], "the repaired key must serve, got key %u", l[1].key);
        /* Its broken twin link leads nowhere, and cooling it must not go round for ever. */
        release_as(&f, &l[1], VERDICT_RATE_LIMITED, 429, 1000, 2000, &c);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.twins_cooled, 0);
        release_as(&f, &l[0], VERDICT_OK, 200, 0, 2000, NULL);
        snapshot(&f, 2000, v);
        for (unsigned i = 0; i < N_KEYS; i++)
                ck_assert_uint_eq(v[i].in_flight, 0);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_workers_killed_at_random_moments_leave_the_counts_right)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        uint64_t requests = 0, successes = 0;
        const unsigned rounds = 20;
        unsigned seed = 12345;

        fixture_setup(&f);
        for (unsigned round = 0; round < rounds; round++) {
                unsigned slot;
                pid_t pid;

                ck_assert_int_eq(keytable_slot_claim(f.t, round, 1000, &slot), 0);
                pid = fork();
                ck_assert_int_ge(pid, 0);
                if (pid == 0) {
                        struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200,
                                                       .figures = RATE_FIGURES_UNKNOWN };
                        struct keytable_lease l;

                        for (;;)
                                if (keytable_acquire(f.t, slot, f.pool, 1000, KEYTABLE_NO_KEY, &l,
                                                     NULL, NULL) == 0)
                                        keytable_release(f.t, &l, &ok, 1000, NULL);
                }
                /* The kill is timed from the child's first success, not from the fork. */
                for (uint64_t before = successes;;) {
                        snapshot(&f, 1000, v);
                        successes = 0;
                        for (unsigned i = 0; i < N_KEYS; i++)
                                successes += v[i].successes;
                        if (successes > before)
                                break;
                        sched_yield();
                }
                usleep(rand_r(&seed) % 3000);
                kill(pid, SIGKILL);
                expect_killed(pid);
                keytable_slot_release(f.t, slot);
        }

        snapshot(&f, 1000, v);
        successes = 0;
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_int_eq(v[i].state, KEY_READY);
                ck_assert_msg(v[i].in_flight == 0, "key %u: %u in flight after all workers died",
                              i, v[i].in_flight);
                requests += v[i].requests;
                successes += v[i].successes;
        }
        /* Each death can cost at most the one request it had in hand. */
        ck_assert_uint_ge(requests, successes);
        ck_assert_uint_le(requests - successes, rounds);
        ck_assert_uint_gt(successes, 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_concurrent_workers_share_one_table)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        unsigned slots[3];
        pid_t pids[3];
        const int per_worker = 2000;
        uint64_t requests = 0, successes = 0;

        fixture_setup(&f);
        for (unsigned i = 0; i < 3; i++) {
                ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &slots[i]), 0);
                pids[i] = fork();
                ck_assert_int_ge(pids[i], 0);
                if (pids[i] == 0) {
                        struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200,
                                                       .figures = RATE_FIGURES_UNKNOWN };
                        struct keytable_lease l;

                        for (int n = 0; n < per_worker; n++) {
                                if (keytable_acquire(f.t, slots[i], f.pool, 1000,
                                                     KEYTABLE_NO_KEY, &l, NULL, NULL) < 0)
                                        _exit(2);
                                keytable_release(f.t, &l, &ok, 1000, NULL);
                        }
                        _exit(0);
                }
        }
        for (unsigned i = 0; i < 3; i++) {
                int status;

                ck_assert_int_eq(wait_child(pids[i], &status), pids[i]);
                ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
                keytable_slot_release(f.t, slots[i]);
        }
        snapshot(&f, 1000, v);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_uint_eq(v[i].in_flight, 0);
                requests += v[i].requests;
                successes += v[i].successes;
        }
        ck_assert_uint_eq(requests, 3 * per_worker);
        ck_assert_uint_eq(successes, 3 * per_worker);
        ck_assert_uint_eq(keytable_repairs(f.t), 0);
        fixture_teardown(&f);
}
END_TEST

/* --- reload: the second bank --------------------------------------------------------------- */

static const char *const new_id = "kp-fake00009";

/* Adds a pool named name holding the keys ids to the bank being filled; the rows go to
 * ret_keys when not NULL. */
static unsigned fill_pool(struct keytable *t, const char *name, const char *const *ids, unsigned n,
                          unsigned *ret_keys) {
        unsigned pool, key;

        ck_assert_int_eq(keytable_add_pool(t, name, "openai/gpt-4o-mini", &pool), 0);
        for (unsigned i = 0; i < n; i++) {
                ck_assert_int_eq(keytable_add_key(t, pool, ids[i], "sk-test...fake", &key), 0);
                if (ret_keys)
                        ret_keys[i] = key;
        }
        return pool;
}

/* Reloads the fixture's configuration unchanged; the new rows go to ret_keys. */
static void reload_same(struct fixture *f, unsigned ret_keys[N_KEYS]) {
        ck_assert_int_eq(keytable_bank_begin(f->t), 0);
        ck_assert_uint_eq(fill_pool(f->t, "openrouter", fake_ids, N_KEYS, ret_keys), f->pool);
        ck_assert_int_eq(keytable_bank_commit(f->t), 0);
}

/* The view of the key with id among n views, failing the test when there is none. */
static const struct keytable_key_view *view_of(const struct keytable_key_view *v, unsigned n,
                                               const char *id) {
        for (unsigned i = 0; i < n; i++)
                if (strcmp(v[i].id, id) == 0)
                        return &v[i];
        ck_abort_msg("no key %s in the snapshot", id);
        return NULL;
}

START_TEST(test_a_reload_keeps_a_cooling_key_cooling_until_the_same_time_with_its_counters)
{
        struct fixture f;
        struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200, .tokens_in = 11,
                                       .tokens_out = 7,
                                       .figures = { 5, 900, 20000, 3000 } };
        struct keytable_key_view before[N_KEYS], after[N_KEYS];
        struct keytable_pool_view pv;
        struct keytable_lease l;
        unsigned rows[N_KEYS];

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);
        ck_assert_uint_eq(l.key, f.key[0]);
        release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 30000, 1000, NULL);
        l = acquire_ok(&f, f.slot, 1100);
        ck_assert_uint_eq(l.key, f.key[1]);
        keytable_release(f.t, &l, &ok, 1100, NULL);
        l = acquire_ok(&f, f.slot, 1200);
        release_as(&f, &l, VERDICT_TRANSIENT, 502, 0, 1200, NULL);
        snapshot(&f, 2000, before);

        reload_same(&f, rows);
        ck_assert_uint_eq(keytable_bank_current(f.t), 1);
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_uint_eq(pv.n_keys, N_KEYS);
        ck_assert_msg(pv.first_key == rows[0] && rows[0] >= small_limits.max_keys,
                      "the new pool's keys are new rows (first %u, got %u)", pv.first_key, rows[0]);
        snapshot(&f, 2000, after);

        ck_assert_int_eq(after[0].state, KEY_COOLING);
        ck_assert_int_eq(after[0].reason, KEY_REASON_RATE_LIMITED);
        ck_assert_msg(after[0].cooldown_until_ms == 31000, "the rest moved to %lld",
                      (long long) after[0].cooldown_until_ms);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_str_eq(after[i].id, before[i].id);
                ck_assert_uint_eq(after[i].position, i);
                ck_assert_uint_eq(after[i].requests, before[i].requests);
                ck_assert_uint_eq(after[i].successes, before[i].successes);
                ck_assert_uint_eq(after[i].rate_limited, before[i].rate_limited);
                ck_assert_uint_eq(after[i].failures, before[i].failures);
                ck_assert_uint_eq(after[i].tokens_in, before[i].tokens_in);
                ck_assert_uint_eq(after[i].tokens_out, before[i].tokens_out);
                ck_assert_uint_eq(after[i].consecutive_failures, before[i].consecutive_failures);
                ck_assert_int_eq(after[i].last_status, before[i].last_status);
                ck_assert_int_eq(after[i].last_class, before[i].last_class);
                ck_assert_int_eq(after[i].last_used_ms, before[i].last_used_ms);
                ck_assert_int_eq(after[i].figures_ms, before[i].figures_ms);
                ck_assert(memcmp(&after[i].figures, &before[i].figures, sizeof after[i].figures) == 0);
        }
        ck_assert_uint_eq(after[1].successes, 1);
        ck_assert_uint_eq(after[1].tokens_in, 11);
        ck_assert_int_eq(after[1].figures.remaining_tokens, 900);
        ck_assert_uint_eq(after[2].consecutive_failures, 1);

        /* Still resting in the new bank: a new worker is served by the others until 31000. */
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 2000, &f.slot), 0);
        for (int64_t now = 2000; now < 31000; now += 4999) {
                l = acquire_ok(&f, f.slot, now);
                ck_assert_uint_ne(l.key, rows[0]);
                release_as(&f, &l, VERDICT_OK, 200, 0, now, NULL);
        }
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_reload_keeps_a_disabled_key_disabled_with_its_reason_and_probe_time)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct keytable_lease l;
        unsigned key, pool;

        fixture_setup(&f);
        keytable_set_policy(f.t, &probe_policy);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_QUOTA, 402, 0, 1000, NULL);
        ck_assert_int_eq(keytable_disable(f.t, f.key[2], KEY_REASON_OPERATOR, 1000, NULL), 0);

        reload_same(&f, NULL);
        snapshot(&f, 2000, v);
        ck_assert_int_eq(v[0].state, KEY_DISABLED);
        ck_assert_int_eq(v[0].reason, KEY_REASON_QUOTA);
        ck_assert_int_eq(v[0].next_probe_ms, 61000);
        ck_assert_uint_eq(v[0].failures, 1);
        ck_assert_int_eq(v[2].state, KEY_DISABLED);
        ck_assert_int_eq(v[2].reason, KEY_REASON_OPERATOR);
        ck_assert_int_eq(v[1].state, KEY_READY);

        /* The probe is still due when it was: once, on the new row, pool relative to the bank. */
        ck_assert_int_eq(keytable_probe_claim(f.t, 60999, &key, &pool), -ENOENT);
        ck_assert_int_eq(keytable_probe_claim(f.t, 61000, &key, &pool), 0);
        ck_assert_uint_ge(key, small_limits.max_keys);
        ck_assert_uint_eq(pool, f.pool);
        ck_assert_msg(keytable_probe_claim(f.t, 61000, &key, &pool) == -ENOENT,
                      "the old bank's row of the key must not be probed as well");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_key_new_in_a_reload_starts_ready_with_zero_counters)
{
        struct fixture f;
        const char *const ids[] = { fake_ids[0], new_id };
        struct keytable_key_view v[2];
        const struct keytable_key_view *k;
        struct keytable_lease l;

        fixture_setup(&f);
        for (int i = 0; i < 3; i++) {
                l = acquire_ok(&f, f.slot, 1000 + i);
                release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 60000, 1000 + i, NULL);
        }

        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", ids, 2, NULL);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);
        ck_assert_int_eq(keytable_pool_snapshot(f.t, f.pool, 2000, v), 0);
        k = view_of(v, 2, new_id);
        ck_assert_int_eq(k->state, KEY_READY);
        ck_assert_int_eq(k->reason, KEY_REASON_NONE);
        ck_assert_uint_eq(k->requests, 0);
        ck_assert_uint_eq(k->rate_limited, 0);
        ck_assert_uint_eq(k->failures, 0);
        ck_assert_uint_eq(k->in_flight, 0);
        ck_assert_int_eq(k->last_used_ms, 0);
        ck_assert_int_eq(k->last_status, 0);
        ck_assert_int_eq(k->figures.remaining_requests, -1);
        ck_assert_uint_eq(k->position, 1);
        ck_assert_int_eq(view_of(v, 2, fake_ids[0])->state, KEY_COOLING);

        /* It serves at once, while the kept key rests. */
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 2000, &f.slot), 0);
        l = acquire_ok(&f, f.slot, 2000);
        ck_assert_uint_eq(l.position, 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_key_removed_by_a_reload_is_gone_from_the_current_snapshot)
{
        struct fixture f;
        const char *const ids[] = { fake_ids[0], fake_ids[2] };
        struct keytable_key_view v[N_KEYS];
        struct keytable_pool_view pv;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", ids, 2, NULL);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);

        ck_assert_uint_eq(keytable_n_keys(f.t), 2);
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_uint_eq(pv.n_keys, 2);
        memset(v, 0, sizeof v);
        snapshot(&f, 1000, v);
        ck_assert_str_eq(v[0].id, fake_ids[0]);
        ck_assert_str_eq(v[1].id, fake_ids[2]);
        ck_assert_msg(v[2].id[0] == '\0', "a removed key's view was written: %s", v[2].id);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_key_moved_to_another_pool_keeps_its_state)
{
        struct fixture f;
        const char *const stay[] = { fake_ids[0], fake_ids[1] }, *const moved[] = { fake_ids[2] };
        struct keytable_key_view v[1];
        struct keytable_lease l[N_KEYS];
        unsigned other;

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l[0], VERDICT_OK, 200, 0, 1000, NULL);
        release_as(&f, &l[1], VERDICT_OK, 200, 0, 1000, NULL);
        release_as(&f, &l[2], VERDICT_RATE_LIMITED, 429, 45000, 1000, NULL);

        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", stay, 2, NULL);
        other = fill_pool(f.t, "elsewhere", moved, 1, NULL);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);

        ck_assert_uint_eq(other, 1);
        ck_assert_int_eq(keytable_pool_snapshot(f.t, other, 2000, v), 0);
        ck_assert_str_eq(v[0].id, fake_ids[2]);
        ck_assert_uint_eq(v[0].pool, other);
        ck_assert_uint_eq(v[0].position, 0);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_int_eq(v[0].cooldown_until_ms, 46000);
        ck_assert_uint_eq(v[0].rate_limited, 1);
        ck_assert_uint_eq(v[0].requests, 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_key_in_several_pools_carries_the_row_of_the_pool_with_the_same_name)
{
        struct twin_fixture f;
        const char *const mini[] = { fake_ids[0], fake_ids[1] }, *const big[] = { fake_ids[2],
                                                                                   fake_ids[0] };
        struct keytable_change c;
        struct keytable_key_view v[2];

        twin_setup(&f, false);
        /* The rows of one key differ: cooling in "mini", disabled in "big". */
        twin_rate_limit(&f, f.a, f.a_shared, 30000, 1000, &c);
        ck_assert_int_eq(keytable_disable(f.t, f.b_shared, KEY_REASON_AUTH, 1000, NULL), 0);

        /* The pools swap places: matching goes by name, not by index. */
        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        ck_assert_uint_eq(fill_pool(f.t, "big", big, 2, NULL), 0);
        ck_assert_uint_eq(fill_pool(f.t, "mini", mini, 2, NULL), 1);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);

        ck_assert_int_eq(keytable_pool_snapshot(f.t, 1, 2000, v), 0);
        ck_assert_str_eq(v[0].id, fake_ids[0]);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_int_eq(v[0].cooldown_until_ms, 31000);
        ck_assert_uint_eq(v[0].rate_limited, 1);
        ck_assert_int_eq(keytable_pool_snapshot(f.t, 0, 2000, v), 0);
        ck_assert_str_eq(v[1].id, fake_ids[0]);
        ck_assert_int_eq(v[1].state, KEY_DISABLED);
        ck_assert_int_eq(v[1].reason, KEY_REASON_AUTH);
        ck_assert_uint_eq(v[1].rate_limited, 0);
        keytable_destroy(f.t);
}
END_TEST

START_TEST(test_readers_see_the_old_bank_until_commit_and_the_new_one_after)
{
        struct fixture f;
        const char *const ids[] = { new_id };
        struct keytable_key_view v[N_KEYS];
        struct keytable_pool_view pv;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "renamed", ids, 1, NULL);
        fill_pool(f.t, "second", fake_ids, N_KEYS, NULL);

        ck_assert_uint_eq(keytable_bank_current(f.t), 0);
        ck_assert_uint_eq(keytable_n_pools(f.t), 1);
        ck_assert_uint_eq(keytable_n_keys(f.t), N_KEYS);
        ck_assert_int_eq(keytable_pool_info(f.t, 0, &pv), 0);
        ck_assert_str_eq(pv.name, "openrouter");
        ck_assert_uint_eq(pv.first_key, f.key[0]);
        ck_assert_int_eq(keytable_pool_info(f.t, 1, &pv), -EINVAL);
        snapshot(&f, 1000, v);
        ck_assert_str_eq(v[0].id, fake_ids[0]);

        ck_assert_int_eq(keytable_bank_commit(f.t), 0);
        ck_assert_uint_eq(keytable_bank_current(f.t), 1);
        ck_assert_uint_eq(keytable_n_pools(f.t), 2);
        ck_assert_uint_eq(keytable_n_keys(f.t), 1 + N_KEYS);
        ck_assert_int_eq(keytable_pool_info(f.t, 0, &pv), 0);
        ck_assert_str_eq(pv.name, "renamed");
        ck_assert_uint_eq(pv.n_keys, 1);
        ck_assert_int_eq(keytable_pool_info(f.t, 1, &pv), 0);
        ck_assert_str_eq(pv.name, "second");
        ck_assert_uint_eq(pv.n_keys, N_KEYS);
        ck_assert_int_eq(keytable_pool_snapshot(f.t, 0, 1000, v), 0);
        ck_assert_str_eq(v[0].id, new_id);
        ck_assert_msg(keytable_bank_commit(f.t) == -EINVAL, "nothing is being filled any more");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_slot_claimed_after_commit_acquires_from_the_new_bank_while_an_older_one_keeps_the_old)
{
        struct fixture f;
        const char *const ids[] = { new_id, fake_ids[0] };
        struct keytable_worker_view w[4];
        struct keytable_pool_view old_pv, new_pv;
        struct keytable_key_view v[2];
        struct keytable_lease old_l, new_l;
        unsigned new_slot, rows[2];

        fixture_setup(&f);
        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", ids, 2, rows);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &new_slot), 0);
        ck_assert_uint_eq(keytable_slot_bank(f.t, f.slot), 0);
        ck_assert_uint_eq(keytable_slot_bank(f.t, new_slot), 1);

        new_l = acquire_ok(&f, new_slot, 1000);
        ck_assert_uint_eq(new_l.key, rows[0]);
        ck_assert_uint_eq(new_l.pool, f.pool);
        ck_assert_uint_eq(new_l.position, 0);
        old_l = acquire_ok(&f, f.slot, 1000);
        ck_assert_msg(old_l.key == f.key[0], "the old worker must serve from the old rows, got %u",
                      old_l.key);
        ck_assert_uint_eq(old_l.position, 0);

        /* Each worker maps its lease through its own bank's pool. */
        ck_assert_int_eq(keytable_slot_pool_info(f.t, f.slot, f.pool, &old_pv), 0);
        ck_assert_int_eq(keytable_slot_pool_info(f.t, new_slot, f.pool, &new_pv), 0);
        ck_assert_uint_eq(old_pv.n_keys, N_KEYS);
        ck_assert_uint_eq(new_pv.n_keys, 2);
        ck_assert_uint_eq(old_l.key - old_pv.first_key, old_l.position);
        ck_assert_uint_eq(new_l.key - new_pv.first_key, new_l.position);

        /* The old worker's request finishes on the old row; the new row of that key takes the
         * rest it learned (so the new generation does not walk into it), not its counters. */
        release_as(&f, &old_l, VERDICT_RATE_LIMITED, 429, 30000, 1000, NULL);
        ck_assert_int_eq(keytable_pool_snapshot(f.t, f.pool, 1000, v), 0);
        ck_assert_int_eq(v[1].state, KEY_COOLING);
        ck_assert_uint_eq(v[1].rate_limited, 0);
        ck_assert_uint_eq(v[0].in_flight, 1);
        release_as(&f, &new_l, VERDICT_OK, 200, 0, 1000, NULL);
        ck_assert_int_eq(keytable_pool_snapshot(f.t, f.pool, 1000, v), 0);
        ck_assert_uint_eq(v[0].in_flight, 0);
        ck_assert_uint_eq(v[0].successes, 1);

        ck_assert_uint_eq(keytable_workers(f.t, w, 4), 2);
        ck_assert_uint_eq(w[0].bank, 0);
        ck_assert_uint_eq(w[1].bank, 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_bank_begin_is_busy_while_a_slot_of_the_bank_before_last_lives)
{
        struct fixture f;
        unsigned new_slot;

        fixture_setup(&f);
        /* f.slot uses bank 0; the first reload fills bank 1 beside it. */
        reload_same(&f, NULL);
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &new_slot), 0);

        ck_assert_msg(keytable_bank_begin(f.t) == -EBUSY,
                      "bank 0 is still used by a draining worker and must not be refilled");
        keytable_slot_set_stage(f.t, f.slot, WORKER_STAGE_DRAINING);
        ck_assert_int_eq(keytable_bank_begin(f.t), -EBUSY);
        keytable_slot_release(f.t, f.slot);

        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", fake_ids, N_KEYS, NULL);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);
        ck_assert_uint_eq(keytable_bank_current(f.t), 0);
        /* Now the generation of new_slot is the old one. */
        ck_assert_int_eq(keytable_bank_begin(f.t), -EBUSY);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_abort_leaves_the_current_bank_untouched)
{
        struct fixture f;
        struct keytable_pool_view pv;
        struct keytable_key_view v[N_KEYS];
        struct keytable_lease l;
        unsigned pool, key;

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 30000, 1000, NULL);

        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "half", fake_ids, 2, NULL);
        keytable_bank_abort(f.t);

        ck_assert_uint_eq(keytable_bank_current(f.t), 0);
        ck_assert_int_eq(keytable_bank_commit(f.t), -EINVAL);
        ck_assert_uint_eq(keytable_n_pools(f.t), 1);
        ck_assert_uint_eq(keytable_n_keys(f.t), N_KEYS);
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_str_eq(pv.name, "openrouter");
        ck_assert_uint_eq(pv.first_key, f.key[0]);
        snapshot(&f, 2000, v);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_int_eq(v[0].cooldown_until_ms, 31000);
        l = acquire_ok(&f, f.slot, 2000);
        ck_assert_uint_eq(l.key, f.key[1]);
        release_as(&f, &l, VERDICT_OK, 200, 0, 2000, NULL);

        /* The forgotten bank leaves nothing behind: the same ids fill a new one afresh. */
        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        ck_assert_int_eq(keytable_add_pool(f.t, "half", NULL, &pool), 0);
        ck_assert_uint_eq(pool, 0);
        ck_assert_int_eq(keytable_add_key(f.t, pool, fake_ids[0], NULL, &key), 0);
        ck_assert_int_eq(keytable_add_key(f.t, pool, fake_ids[0], NULL, NULL), -EEXIST);
        keytable_bank_abort(f.t);
        ck_assert_uint_eq(keytable_n_keys(f.t), N_KEYS);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_leases_on_old_rows_are_returned_by_slot_release_after_a_commit)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct keytable_lease l;
        struct keytable_wait w = {};
        unsigned other_old_slot, new_slot;
        pid_t pid;

        fixture_setup(&f);
        disable_all_but(&f, 0);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 1, 0), 0);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &other_old_slot), 0);

        /* A worker of the old generation takes the only key and dies holding it. */
        pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
                if (keytable_acquire(f.t, f.slot, f.pool, 1000, KEYTABLE_NO_KEY, &l, NULL,
                                     NULL) < 0)
                        _exit(2);
                _exit(0);
        }
        ck_assert_int_eq(wait_child(pid, (int[]) { 0 }), pid);

        reload_same(&f, NULL);
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &new_slot), 0);
        ck_assert_int_eq(keytable_acquire(f.t, other_old_slot, f.pool, 1000, KEYTABLE_NO_KEY, &l,
                                          &w, NULL), -EAGAIN);
        ck_assert_msg(w.busy, "the old row is full with the dead worker's lease");
        snapshot(&f, 1000, v);
        ck_assert_uint_eq(v[0].in_flight, 0);

        keytable_slot_release(f.t, f.slot);
        ck_assert_int_eq(keytable_acquire(f.t, other_old_slot, f.pool, 1000, KEYTABLE_NO_KEY, &l,
                                          NULL, NULL), 0);
        ck_assert_msg(l.key == f.key[0], "the old row's capacity must come back, got key %u",
                      l.key);
        release_as(&f, &l, VERDICT_OK, 200, 0, 1000, NULL);
        snapshot(&f, 1000, v);
        ck_assert_uint_eq(v[0].in_flight, 0);
        ck_assert_uint_eq(keytable_repairs(f.t), 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_repair_after_a_dead_lock_holder_works_in_the_second_bank)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct keytable_lease l;
        unsigned rows[N_KEYS], new_slot, child_slot;
        pid_t pid;

        fixture_setup(&f);
        reload_same(&f, rows);
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &new_slot), 0);
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &child_slot), 0);

        pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
                if (keytable_acquire(f.t, child_slot, f.pool, 1000, KEYTABLE_NO_KEY, &l, NULL,
                                     NULL) < 0 || l.key != rows[0])
                        _exit(2);
                if (keytable_test_die_holding_lock(f.t, f.pool, rows[1]) < 0)
                        _exit(3);
                raise(SIGKILL);
                _exit(4);
        }
        expect_killed(pid);

        l = acquire_ok(&f, new_slot, 2000);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        ck_assert_uint_eq(l.key, rows[1]);
        snapshot(&f, 2000, v);
        ck_assert_int_eq(v[1].state, KEY_READY);
        ck_assert_msg(v[0].in_flight == 1, "the dead worker's real lease must still count, got %u",
                      v[0].in_flight);
        ck_assert_msg(v[1].in_flight == 1, "phantom in-flight count survived: %u", v[1].in_flight);

        keytable_slot_release(f.t, child_slot);
        release_as(&f, &l, VERDICT_OK, 200, 0, 2000, NULL);
        snapshot(&f, 2000, v);
        for (unsigned i = 0; i < N_KEYS; i++)
                ck_assert_uint_eq(v[i].in_flight, 0);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_refilling_a_bank_repairs_a_pool_lock_a_dead_old_worker_left)
{
        struct fixture f;
        struct keytable_lease l;
        unsigned new_slot;
        pid_t pid;

        fixture_setup(&f);
        reload_same(&f, NULL);
        /* A draining worker of bank 0 dies holding its pool's lock, with no leases to return:
         * no one of the new generation ever takes that lock. */
        pid = fork_dier(&f, f.slot, 0, f.key[1]);
        expect_killed(pid);
        keytable_slot_release(f.t, f.slot);
        ck_assert_uint_eq(keytable_repairs(f.t), 0);

        /* Bank 0 is filled again: the abandoned lock must be taken, not waited on for ever. */
        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", fake_ids, N_KEYS, NULL);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);
        ck_assert_uint_eq(keytable_repairs(f.t), 1);

        ck_assert_int_eq(keytable_slot_claim(f.t, 3, 1000, &new_slot), 0);
        ck_assert_uint_eq(keytable_slot_bank(f.t, new_slot), 0);
        l = acquire_ok(&f, new_slot, 2000);
        ck_assert_uint_eq(l.key, f.key[0]);
        release_as(&f, &l, VERDICT_OK, 200, 0, 2000, NULL);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_twins_link_within_the_new_bank)
{
        struct twin_fixture f;
        const char *const mini[] = { fake_ids[0], fake_ids[1] }, *const big[] = { fake_ids[2],
                                                                                   fake_ids[0] };
        struct keytable_outcome limited = { .cls = VERDICT_RATE_LIMITED, .status = 429,
                                            .rest_ms = 30000, .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_key_view v[2];
        struct keytable_change c;
        struct keytable_lease l;
        unsigned rows_mini[2], rows_big[2], new_slot;

        twin_setup(&f, true);
        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "mini", mini, 2, rows_mini);
        fill_pool(f.t, "big", big, 2, rows_big);
        ck_assert_int_eq(keytable_add_key(f.t, 0, fake_ids[2], NULL, NULL), -EINVAL);
        ck_assert_int_eq(keytable_add_key(f.t, 1, fake_ids[0], NULL, NULL), -EEXIST);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);

        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &new_slot), 0);
        ck_assert_int_eq(keytable_acquire(f.t, new_slot, 0, 1000, rows_mini[1], &l, NULL, NULL), 0);
        ck_assert_uint_eq(l.key, rows_mini[0]);
        keytable_release(f.t, &l, &limited, 1000, &c);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.key, rows_mini[0]);
        ck_assert_uint_eq(c.key_position, 0);
        ck_assert_msg(c.twins_cooled == 1, "exactly the new bank's other row must cool, got %u",
                      c.twins_cooled);

        ck_assert_int_eq(keytable_pool_snapshot(f.t, 1, 1000, v), 0);
        ck_assert_int_eq(v[1].state, KEY_COOLING);
        ck_assert_int_eq(v[1].cooldown_until_ms, 31000);

        /* The old bank's rows are another generation's: untouched. */
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.b, 1000, f.b_only, &l, NULL, NULL), 0);
        ck_assert_uint_eq(l.key, f.b_shared);
        keytable_destroy(f.t);
}
END_TEST

START_TEST(test_positions_map_keys_to_their_place_in_the_pool_in_either_bank)
{
        struct fixture f;
        const char *const ids[] = { new_id, fake_ids[1], fake_ids[0] };
        struct keytable_change c;
        struct keytable_pool_view pv;
        struct keytable_lease l;
        unsigned rows[3], new_slot;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_disable(f.t, f.key[2], KEY_REASON_OPERATOR, 1000, &c), 0);
        ck_assert_uint_eq(c.key_position, 2);

        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "first", fake_ids, 1, NULL);
        fill_pool(f.t, "openrouter", ids, 3, rows);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);
        ck_assert_int_eq(keytable_pool_info(f.t, 1, &pv), 0);
        for (unsigned i = 0; i < 3; i++)
                ck_assert_uint_eq(rows[i] - pv.first_key, i);

        ck_assert_int_eq(keytable_disable(f.t, rows[2], KEY_REASON_OPERATOR, 1000, &c), 0);
        ck_assert(c.changed);
        ck_assert_uint_eq(c.key, rows[2]);
        ck_assert_uint_eq(c.key_position, 2);
        ck_assert_int_eq(keytable_enable(f.t, rows[2], 1000, &c), 0);
        ck_assert_uint_eq(c.key_position, 2);
        ck_assert_int_eq(keytable_set_key_limits(f.t, rows[1], 1, 0), 0);

        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &new_slot), 0);
        ck_assert_int_eq(keytable_acquire(f.t, new_slot, 1, 1000, rows[0], &l, NULL, NULL), 0);
        ck_assert_uint_eq(l.key, rows[1]);
        ck_assert_uint_eq(l.position, 1);
        release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 1000, 1000, &c);
        ck_assert_uint_eq(c.key_position, 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_reload_applies_the_new_limits_to_a_kept_key)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        unsigned rows[N_KEYS];

        fixture_setup(&f);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[0], 1, 5), 0);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[1], 2, 0), 0);
        reload_same(&f, rows);
        snapshot(&f, 1000, v);
        ck_assert_msg(v[0].max_concurrent == 0 && v[0].rpm == 0,
                      "limits the new configuration dropped must go");
        ck_assert_int_eq(keytable_bank_begin(f.t), -EBUSY);
        keytable_slot_release(f.t, f.slot);
        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", fake_ids, N_KEYS, rows);
        ck_assert_int_eq(keytable_set_key_limits(f.t, rows[1], 3, 60), 0);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);
        snapshot(&f, 1000, v);
        ck_assert_uint_eq(v[1].max_concurrent, 3);
        ck_assert_uint_eq(v[1].rpm, 60);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_pool_read_refuses_a_buffer_sized_before_a_reload_grew_the_pool)
{
        struct fixture f;
        const char *const ids[] = { fake_ids[0], fake_ids[1], fake_ids[2], new_id };
        struct keytable_key_view v[4];
        struct keytable_pool_view pv, info;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_int_eq(keytable_pool_read(f.t, f.pool, 1000, &info, v, pv.n_keys), N_KEYS);
        ck_assert_uint_eq(info.n_keys, N_KEYS);

        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", ids, 4, NULL);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);

        memset(&info, 0, sizeof info);
        ck_assert_int_eq(keytable_pool_read(f.t, f.pool, 1000, &info, v, pv.n_keys), -ENOBUFS);
        ck_assert_uint_eq(info.n_keys, 0);
        ck_assert_int_eq(keytable_pool_read(f.t, f.pool, 1000, &info, v, 4), 4);
        ck_assert_uint_eq(info.n_keys, 4);
        ck_assert_str_eq(v[3].id, new_id);
        ck_assert_int_eq(keytable_pool_read(f.t, f.pool, 1000, NULL, NULL, 0), -ENOBUFS);
        ck_assert_int_eq(keytable_pool_read(f.t, 7, 1000, NULL, v, 4), -EINVAL);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_removed_key_is_not_probed_from_the_old_bank)
{
        struct fixture f;
        const char *const ids[] = { fake_ids[1], fake_ids[2] };
        struct keytable_lease l;
        unsigned key, pool;

        fixture_setup(&f);
        keytable_set_policy(f.t, &probe_policy);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_QUOTA, 402, 0, 1000, NULL);

        ck_assert_int_eq(keytable_bank_begin(f.t), 0);
        fill_pool(f.t, "openrouter", ids, 2, NULL);
        ck_assert_int_eq(keytable_bank_commit(f.t), 0);
        ck_assert_int_eq(keytable_probe_claim(f.t, 100000, &key, &pool), -ENOENT);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_pool_keeps_its_account_limit_across_a_reload)
{
        struct fixture f;
        struct keytable_lease l[N_KEYS];
        struct keytable_pool_view pv;

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        for (unsigned i = 0; i < N_KEYS; i++)
                release_as(&f, &l[i], VERDICT_RATE_LIMITED, 429, 20000, 1000, NULL);
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_int_eq(pv.account_limit_until_ms, 21000);

        reload_same(&f, NULL);
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_int_eq(pv.account_limit_until_ms, 21000);
        fixture_teardown(&f);
}
END_TEST

/* --- scale, views, validation -------------------------------------------------------------- */

START_TEST(test_a_pool_of_100000_keys_can_be_built_and_served)
{
        const struct keytable_limits big = {
                .max_pools = 2, .max_keys = 100000, .n_slots = 2, .leases_per_slot = 8,
        };
        struct keytable *t;
        struct keytable_lease l;
        struct keytable_pool_view pv;
        unsigned pool, slot;

        ck_assert_int_eq(keytable_create(&big, 0, &t), 0);
        ck_assert_int_eq(keytable_add_pool(t, "big", "test/model", &pool), 0);
        for (unsigned i = 0; i < 100000; i++) {
                char id[KEYID_ID_LEN + 1];

                snprintf(id, sizeof id, "kp-fake%06u", i);
                ck_assert_int_eq(keytable_add_key(t, pool, id, "sk-test...xyz", NULL), 0);
        }
        ck_assert_int_eq(keytable_add_key(t, pool, "kp-fake-extra", NULL, NULL), -ENOSPC);
        ck_assert_uint_eq(keytable_n_keys(t), 100000);
        ck_assert_int_eq(keytable_pool_info(t, pool, &pv), 0);
        ck_assert_uint_eq(pv.n_keys, 100000);

        ck_assert_int_eq(keytable_slot_claim(t, 1, 0, &slot), 0);
        for (unsigned i = 0; i < 5; i++) {
                ck_assert_int_eq(keytable_acquire(t, slot, pool, 10, KEYTABLE_NO_KEY, &l, NULL,
                                                  NULL), 0);
                ck_assert_uint_eq(l.key, i);
        }
        keytable_destroy(t);
}
END_TEST

START_TEST(test_snapshot_shows_cooling_only_while_the_cooldown_lasts)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_key_view v[N_KEYS];

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 5000, 1000, NULL);

        snapshot(&f, 1000, v);
        ck_assert_str_eq(v[0].id, fake_ids[0]);
        ck_assert_str_eq(v[0].masked, fake_masks[0]);
        ck_assert_uint_eq(v[0].pool, f.pool);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_int_eq(v[0].reason, KEY_REASON_RATE_LIMITED);
        ck_assert_int_eq(v[0].cooldown_until_ms, 6000);
        ck_assert_uint_eq(v[0].rate_limited, 1);
        ck_assert_int_eq(v[1].cooldown_until_ms, 0);
        ck_assert_int_eq(v[1].last_used_ms, 0);

        snapshot(&f, 5999, v);
        ck_assert_int_eq(v[0].state, KEY_COOLING);

        snapshot(&f, 6000, v);
        ck_assert_msg(v[0].state == KEY_READY, "a finished cooldown must read as ready");
        ck_assert_int_eq(v[0].reason, KEY_REASON_NONE);
        ck_assert_int_eq(v[0].cooldown_until_ms, 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_workers_view_lists_claimed_slots_until_released)
{
        struct fixture f;
        struct keytable_worker_view w[8];
        unsigned s2, extra;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 7, 1500, &s2), 0);
        keytable_slot_set_pid(f.t, s2, 4242);
        keytable_slot_set_stage(f.t, s2, WORKER_STAGE_SERVING);
        keytable_slot_heartbeat(f.t, s2, 1700);
        for (int i = 0; i < 3; i++)
                keytable_slot_count_request(f.t, s2);
        (void) acquire_ok(&f, s2, 1700);
        (void) acquire_ok(&f, s2, 1700);

        ck_assert_uint_eq(keytable_workers(f.t, w, 8), 2);
        ck_assert_uint_eq(w[0].slot, f.slot);
        ck_assert_int_eq(w[0].stage, WORKER_STAGE_STARTING);
        ck_assert_uint_eq(w[1].slot, s2);
        ck_assert_int_eq(w[1].pid, 4242);
        ck_assert_uint_eq(w[1].generation, 7);
        ck_assert_int_eq(w[1].stage, WORKER_STAGE_SERVING);
        ck_assert_int_eq(w[1].started_ms, 1500);
        ck_assert_int_eq(w[1].heartbeat_ms, 1700);
        ck_assert_uint_eq(w[1].requests, 3);
        ck_assert_uint_eq(w[1].in_flight, 2);
        ck_assert_uint_eq(keytable_workers(f.t, w, 1), 1);

        /* Out-of-range slots are ignored, not written past the table. */
        keytable_slot_set_pid(f.t, 99, 1);
        keytable_slot_heartbeat(f.t, 99, 1);
        keytable_slot_count_request(f.t, 99);
        keytable_slot_set_stage(f.t, 99, WORKER_STAGE_SERVING);
        keytable_slot_release(f.t, 99);

        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &extra), 0);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &extra), 0);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &extra), -EBUSY);

        keytable_slot_release(f.t, s2);
        ck_assert_uint_eq(keytable_workers(f.t, w, 8), 3);
        for (unsigned i = 0; i < 3; i++)
                ck_assert_uint_ne(w[i].slot, s2);
        ck_assert_uint_eq(keytable_n_slots(f.t), 4);
        ck_assert_int_eq(keytable_created_ms(f.t), 1000);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_limits_and_names_are_validated)
{
        struct keytable_limits lim = { .max_pools = 2, .max_keys = 2, .n_slots = 1,
                                       .leases_per_slot = 1 };
        struct keytable_limits zero;
        struct keytable *t = NULL;
        struct keytable_lease l;
        char long_name[KEYTABLE_NAME_MAX + 2], long_model[KEYTABLE_MODEL_MAX + 2];
        unsigned p0, p1, slot;

        for (int i = 0; i < 4; i++) {
                zero = lim;
                if (i == 0)
                        zero.max_pools = 0;
                else if (i == 1)
                        zero.max_keys = 0;
                else if (i == 2)
                        zero.n_slots = 0;
                else
                        zero.leases_per_slot = 0;
                ck_assert_int_eq(keytable_create(&zero, 0, &t), -EINVAL);
                ck_assert_ptr_null(t);
        }

        memset(long_name, 'n', sizeof long_name - 1);
        long_name[sizeof long_name - 1] = '\0';
        memset(long_model, 'm', sizeof long_model - 1);
        long_model[sizeof long_model - 1] = '\0';

        ck_assert_int_eq(keytable_create(&lim, 0, &t), 0);
        ck_assert_int_eq(keytable_add_key(t, 0, "kp-fake00001", NULL, NULL), -EINVAL);
        ck_assert_int_eq(keytable_add_pool(t, long_name, "m", &p0), -ENAMETOOLONG);
        ck_assert_int_eq(keytable_add_pool(t, "a", long_model, &p0), -ENAMETOOLONG);
        long_name[KEYTABLE_NAME_MAX] = '\0';
        ck_assert_int_eq(keytable_add_pool(t, long_name, "m", &p0), 0);
        ck_assert_int_eq(keytable_add_key(t, p0, "kp-fake0000001", NULL, NULL), -ENAMETOOLONG);
        ck_assert_int_eq(keytable_add_key(t, p0, "kp-fake00001", "sk-test-fake-masked-too-long",
                                          NULL), -ENAMETOOLONG);
        ck_assert_int_eq(keytable_add_key(t, p0, "kp-fake00001", "sk-...001", NULL), 0);
        ck_assert_int_eq(keytable_add_pool(t, "b", "m", &p1), 0);
        ck_assert_int_eq(keytable_add_pool(t, "c", "m", NULL), -ENOSPC);
        ck_assert_msg(keytable_add_key(t, p0, "kp-fake00002", NULL, NULL) == -EINVAL,
                      "keys may only join the newest pool");
        ck_assert_int_eq(keytable_add_key(t, p1, "kp-fake00002", NULL, NULL), 0);
        ck_assert_int_eq(keytable_add_key(t, p1, "kp-fake00003", NULL, NULL), -ENOSPC);
        ck_assert_uint_eq(keytable_n_pools(t), 2);
        ck_assert_uint_eq(keytable_n_keys(t), 2);

        /* Leases only for claimed slots and existing pools. */
        ck_assert_int_eq(keytable_acquire(t, 0, p0, 0, KEYTABLE_NO_KEY, &l, NULL, NULL), -EINVAL);
        ck_assert_int_eq(keytable_slot_claim(t, 1, 0, &slot), 0);
        ck_assert_int_eq(keytable_acquire(t, slot, 5, 0, KEYTABLE_NO_KEY, &l, NULL, NULL), -EINVAL);
        ck_assert_int_eq(keytable_acquire(t, 3, p0, 0, KEYTABLE_NO_KEY, &l, NULL, NULL), -EINVAL);
        ck_assert_int_eq(keytable_acquire(t, slot, p0, 0, KEYTABLE_NO_KEY, &l, NULL, NULL), 0);
        ck_assert_int_eq(keytable_acquire(t, slot, p1, 0, KEYTABLE_NO_KEY, &l, NULL, NULL),
                         -ENOSPC);
        keytable_destroy(t);
        keytable_destroy(NULL);
}
END_TEST

START_TEST(test_limits_too_large_for_two_banks_are_refused)
{
        /* Both banks' key rows, + 1 in a lease, must fit in 32 bits. */
        struct keytable_limits lim = { .max_pools = 1, .max_keys = UINT32_MAX / 2 + 1,
                                       .n_slots = 1, .leases_per_slot = 1 };
        struct keytable *t = NULL;

        ck_assert_int_eq(keytable_create(&lim, 0, &t), -E2BIG);
        lim.max_keys = 1;
        lim.max_pools = UINT32_MAX / 2 + 1;
        ck_assert_int_eq(keytable_create(&lim, 0, &t), -E2BIG);
        ck_assert_ptr_null(t);
}
END_TEST

START_TEST(test_nothing_is_left_in_dev_shm)
{
        struct fixture f;
        char prefix[64];
        struct dirent *de;
        DIR *d;

        fixture_setup(&f);
        snprintf(prefix, sizeof prefix, "keypool-%ld-", (long) getpid());
        d = opendir("/dev/shm");
        if (d) {
                while ((de = readdir(d)))
                        ck_assert_msg(strncmp(de->d_name, prefix, strlen(prefix)) != 0,
                                      "segment %s left in /dev/shm", de->d_name);
                closedir(d);
        }
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_state_reason_and_stage_names)
{
        ck_assert_str_eq(keytable_state_name(KEY_READY), "ready");
        ck_assert_str_eq(keytable_state_name(KEY_COOLING), "cooling");
        ck_assert_str_eq(keytable_state_name(KEY_DISABLED), "disabled");
        ck_assert_str_eq(keytable_state_name(KEY_STATE_INVALID), "invalid");
        ck_assert_str_eq(keytable_state_name((enum key_state) 77), "invalid");

        ck_assert_ptr_null(keytable_reason_name(KEY_REASON_NONE));
        ck_assert_str_eq(keytable_reason_name(KEY_REASON_RATE_LIMITED), "rate_limited");
        ck_assert_str_eq(keytable_reason_name(KEY_REASON_AUTH), "auth");
        ck_assert_str_eq(keytable_reason_name(KEY_REASON_QUOTA), "quota");
        ck_assert_str_eq(keytable_reason_name(KEY_REASON_TRANSIENT), "transient");
        ck_assert_str_eq(keytable_reason_name(KEY_REASON_OPERATOR), "operator");

        ck_assert_str_eq(keytable_stage_name(WORKER_STAGE_FREE), "free");
        ck_assert_str_eq(keytable_stage_name(WORKER_STAGE_STARTING), "starting");
        ck_assert_str_eq(keytable_stage_name(WORKER_STAGE_SERVING), "serving");
        ck_assert_str_eq(keytable_stage_name(WORKER_STAGE_DRAINING), "draining");
}
END_TEST

/* --- history, observations and restoring ------------------------------------------------- */

static struct keytable_event event_numbered(unsigned n) {
        struct keytable_event e = {
                .wall_ms = 1700000000000 + n,
                .kind = HISTORY_ROTATE,
                .status = 429,
                .reason = KEY_REASON_RATE_LIMITED,
                .cooldown_ms = n * 1000,
        };

        snprintf(e.pool, sizeof e.pool, "pool-%u", n);
        snprintf(e.key_from, sizeof e.key_from, "kp-%010u", n);
        snprintf(e.key_to, sizeof e.key_to, "kp-%010u", n + 1);
        return e;
}

START_TEST(test_history_ring_wraps_and_returns_the_newest_oldest_first)
{
        struct keytable_limits lim = small_limits;
        struct keytable_event out[16];
        struct keytable *t;
        unsigned n;

        lim.history_size = 4;
        ck_assert_int_eq(keytable_create(&lim, 1000, &t), 0);
        ck_assert_uint_eq(keytable_history_capacity(t), 4);
        ck_assert_uint_eq(keytable_history_read(t, out, 16), 0);

        for (unsigned i = 0; i < 10; i++) {
                struct keytable_event e = event_numbered(i);

                keytable_history_add(t, &e);
        }
        n = keytable_history_read(t, out, 16);
        ck_assert_msg(n == 4, "a ring of 4 holds 4 entries, read %u", n);
        for (unsigned i = 0; i < n; i++) {
                struct keytable_event want = event_numbered(6 + i);

                ck_assert_msg(out[i].seq == 7 + i, "entry %u: seq %llu, expected %u", i,
                              (unsigned long long) out[i].seq, 7 + i);
                ck_assert_int_eq(out[i].wall_ms, want.wall_ms);
                ck_assert_int_eq(out[i].kind, HISTORY_ROTATE);
                ck_assert_str_eq(out[i].pool, want.pool);
                ck_assert_str_eq(out[i].key_from, want.key_from);
                ck_assert_str_eq(out[i].key_to, want.key_to);
                ck_assert_int_eq(out[i].status, 429);
                ck_assert_int_eq(out[i].reason, KEY_REASON_RATE_LIMITED);
                ck_assert_int_eq(out[i].cooldown_ms, want.cooldown_ms);
        }

        /* Fewer asked for: the newest of them, still oldest first. */
        n = keytable_history_read(t, out, 2);
        ck_assert_uint_eq(n, 2);
        ck_assert_uint_eq(out[0].seq, 9);
        ck_assert_uint_eq(out[1].seq, 10);
        keytable_destroy(t);

        lim.history_size = 0;
        ck_assert_int_eq(keytable_create(&lim, 1000, &t), 0);
        ck_assert_uint_eq(keytable_history_capacity(t), 1024);
        keytable_destroy(t);
}
END_TEST

START_TEST(test_history_add_cuts_over_long_names_and_kind_names_are_stable)
{
        struct keytable_event e = { .kind = HISTORY_COOLDOWN }, out;
        struct keytable *t;

        ck_assert_int_eq(keytable_create(&small_limits, 1000, &t), 0);
        memset(e.pool, 'p', sizeof e.pool);             /* unterminated */
        memset(e.key_from, 'k', sizeof e.key_from);
        keytable_history_add(t, &e);
        ck_assert_uint_eq(keytable_history_read(t, &out, 1), 1);
        ck_assert_uint_eq(strlen(out.pool), KEYTABLE_NAME_MAX);
        ck_assert_uint_eq(strlen(out.key_from), KEYID_ID_LEN);
        ck_assert_str_eq(out.key_to, "");
        keytable_destroy(t);

        ck_assert_ptr_null(keytable_history_kind_name(HISTORY_NONE));
        ck_assert_str_eq(keytable_history_kind_name(HISTORY_ROTATE), "rotate");
        ck_assert_str_eq(keytable_history_kind_name(HISTORY_COOLDOWN), "cooldown");
        ck_assert_str_eq(keytable_history_kind_name(HISTORY_RECOVER), "recover");
        ck_assert_str_eq(keytable_history_kind_name(HISTORY_DISABLE), "disable");
        ck_assert_str_eq(keytable_history_kind_name(HISTORY_ENABLE), "enable");
        ck_assert_str_eq(keytable_history_kind_name(HISTORY_PROBE), "probe");
        ck_assert_ptr_null(keytable_history_kind_name(_HISTORY_MAX));
}
END_TEST

/* Appenders killed at random moments, most of them inside an append holding the header lock:
 * every entry read afterwards is whole, seqs only grow, and appending goes on. */
START_TEST(test_history_stays_whole_when_appenders_die_mid_append)
{
        struct keytable_limits lim = small_limits;
        struct keytable_event out[8];
        struct keytable *t;
        unsigned seed = 4242, n;
        uint64_t last_seq = 0;

        lim.history_size = 8;
        ck_assert_int_eq(keytable_create(&lim, 1000, &t), 0);
        /* At least 20 rounds, and on until one appender has died holding the lock: where the
         * kill lands is up to the scheduler, so the count of rounds that needs is not fixed. */
        for (unsigned round = 0; round < 20 || keytable_repairs(t) == 0; round++) {
                int status;
                pid_t pid;

                ck_assert_msg(round < 5000, "no appender died holding the lock in 5000 rounds");
                pid = fork();
                ck_assert_int_ge(pid, 0);
                if (pid == 0)
                        for (unsigned i = round * 1000000;; i++) {
                                struct keytable_event e = event_numbered(i);

                                keytable_history_add(t, &e);
                        }
                /* The child is appending before the kill is timed: a kill before its first
                 * append would test nothing. */
                for (;;) {
                        n = keytable_history_read(t, out, 1);
                        if (n == 1 && out[0].seq > last_seq)
                                break;
                        sched_yield();
                }
                usleep(rand_r(&seed) % 2000);
                kill(pid, SIGKILL);
                ck_assert_int_eq(wait_child(pid, &status), pid);

                n = keytable_history_read(t, out, 8);
                ck_assert_uint_le(n, 8);
                for (unsigned i = 0; i < n; i++) {
                        unsigned num;
                        struct keytable_event want;

                        ck_assert_msg(sscanf(out[i].pool, "pool-%u", &num) == 1,
                                      "round %u: a torn entry (pool '%s')", round, out[i].pool);
                        want = event_numbered(num);
                        ck_assert_msg(memcmp(&out[i].wall_ms, &want.wall_ms, sizeof want.wall_ms) == 0 &&
                                      strcmp(out[i].key_from, want.key_from) == 0 &&
                                      strcmp(out[i].key_to, want.key_to) == 0 &&
                                      out[i].cooldown_ms == want.cooldown_ms,
                                      "round %u: entry %u is a mix of two appends", round, num);
                        ck_assert_msg(i == 0 || out[i].seq > out[i - 1].seq,
                                      "round %u: seqs out of order", round);
                }
                if (n > 0) {
                        ck_assert_uint_ge(out[n - 1].seq, last_seq);
                        last_seq = out[n - 1].seq;
                }
        }
        ck_assert_uint_gt(keytable_repairs(t), 0);

        /* Appending goes on where the ring left off. */
        {
                struct keytable_event e = event_numbered(7);

                keytable_history_add(t, &e);
                n = keytable_history_read(t, out, 1);
                ck_assert_uint_eq(n, 1);
                ck_assert_str_eq(out[0].pool, "pool-7");
                ck_assert_uint_gt(out[0].seq, last_seq);
        }
        keytable_destroy(t);
}
END_TEST

START_TEST(test_release_counts_each_outcome_by_class)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        const enum verdict_class classes[] = { VERDICT_OK, VERDICT_OK, VERDICT_CALLER,
                                               VERDICT_TRANSIENT, VERDICT_NONE, VERDICT_OK };
        struct keytable_lease l;

        fixture_setup(&f);
        /* Keys 1 and 2 out of the way: every outcome lands on key 0. */
        ck_assert_int_eq(keytable_disable(f.t, f.key[1], KEY_REASON_OPERATOR, 1000, NULL), 0);
        ck_assert_int_eq(keytable_disable(f.t, f.key[2], KEY_REASON_OPERATOR, 1000, NULL), 0);
        for (unsigned i = 0; i < sizeof classes / sizeof classes[0]; i++) {
                l = acquire_ok(&f, f.slot, 1000 + i);
                ck_assert_uint_eq(l.key, f.key[0]);
                release_as(&f, &l, classes[i], 200, 0, 1000 + i, NULL);
        }
        l = acquire_ok(&f, f.slot, 2000);
        release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 1000, 2000, NULL);
        l = acquire_ok(&f, f.slot, 4000);
        keytable_release(f.t, &l, NULL, 4000, NULL);

        snapshot(&f, 4000, v);
        ck_assert_uint_eq(v[0].by_class[VERDICT_NONE], 0);
        ck_assert_uint_eq(v[0].by_class[VERDICT_OK], 3);
        ck_assert_uint_eq(v[0].by_class[VERDICT_CALLER], 1);
        ck_assert_uint_eq(v[0].by_class[VERDICT_TRANSIENT], 1);
        ck_assert_uint_eq(v[0].by_class[VERDICT_RATE_LIMITED], 1);
        ck_assert_uint_eq(v[0].by_class[VERDICT_AUTH], 0);
        ck_assert_uint_eq(v[0].by_class[VERDICT_QUOTA], 0);
        for (unsigned c = 0; c < _VERDICT_MAX; c++)
                ck_assert_uint_eq(v[1].by_class[c], 0);
        fixture_teardown(&f);
}
END_TEST

static void release_with_error(struct fixture *f, enum verdict_class cls, const char *error,
                               int64_t now) {
        struct keytable_outcome o = { .cls = cls, .status = cls == VERDICT_OK ? 200 : 502,
                                      .figures = RATE_FIGURES_UNKNOWN, .error = error };
        struct keytable_lease l = acquire_ok(f, f->slot, now);

        ck_assert_uint_eq(l.key, f->key[0]);
        keytable_release(f->t, &l, &o, now, NULL);
}

START_TEST(test_last_error_is_kept_cut_to_size_until_the_next_one)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        char long_error[300], utf8_error[200];

        fixture_setup(&f);
        ck_assert_int_eq(keytable_disable(f.t, f.key[1], KEY_REASON_OPERATOR, 1000, NULL), 0);
        ck_assert_int_eq(keytable_disable(f.t, f.key[2], KEY_REASON_OPERATOR, 1000, NULL), 0);
        snapshot(&f, 1000, v);
        ck_assert_str_eq(v[0].last_error, "");

        release_with_error(&f, VERDICT_TRANSIENT, "upstream answered 502\nBad gateway", 1000);
        snapshot(&f, 1000, v);
        ck_assert_str_eq(v[0].last_error, "upstream answered 502 Bad gateway");

        /* A success has nothing to say about it. */
        release_with_error(&f, VERDICT_OK, NULL, 1001);
        snapshot(&f, 1001, v);
        ck_assert_str_eq(v[0].last_error, "upstream answered 502 Bad gateway");

        memset(long_error, 'e', sizeof long_error - 1);
        long_error[sizeof long_error - 1] = '\0';
        release_with_error(&f, VERDICT_TRANSIENT, long_error, 1002);
        snapshot(&f, 1002, v);
        ck_assert_uint_eq(strlen(v[0].last_error), KEYTABLE_ERROR_MAX);
        ck_assert(strspn(v[0].last_error, "e") == KEYTABLE_ERROR_MAX);

        /* "é" straddles the cut: it goes whole, never half. */
        memset(utf8_error, 'a', KEYTABLE_ERROR_MAX - 1);
        strcpy(utf8_error + KEYTABLE_ERROR_MAX - 1, "\xc3\xa9 and more");
        release_with_error(&f, VERDICT_TRANSIENT, utf8_error, 1003);
        snapshot(&f, 1003, v);
        ck_assert_uint_eq(strlen(v[0].last_error), KEYTABLE_ERROR_MAX - 1);
        ck_assert(strspn(v[0].last_error, "a") == KEYTABLE_ERROR_MAX - 1);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_latency_lands_in_its_bucket_with_count_and_sum)
{
        struct fixture f;
        struct keytable_pool_view pv;
        const int64_t samples[] = { 0, 50, 51, 100, 120000, 120001, 999999999, -5 };
        uint64_t sum = 0;

        fixture_setup(&f);
        for (unsigned i = 0; i < sizeof samples / sizeof samples[0]; i++) {
                keytable_observe_latency(f.t, f.slot, f.pool, samples[i]);
                sum += samples[i] > 0 ? (uint64_t) samples[i] : 0;
        }
        keytable_count_rotation(f.t, f.slot, f.pool);
        keytable_count_rotation(f.t, f.slot, f.pool);
        /* A bad slot or pool counts nowhere. */
        keytable_observe_latency(f.t, 99, f.pool, 10);
        keytable_observe_latency(f.t, f.slot, 7, 10);
        keytable_count_rotation(f.t, f.slot, 7);

        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_msg(pv.latency_buckets[0] == 3, "≤ 50 ms: 0, 50 and a negative, got %llu",
                      (unsigned long long) pv.latency_buckets[0]);
        ck_assert_uint_eq(pv.latency_buckets[1], 2);
        for (unsigned i = 2; i < 10; i++)
                ck_assert_uint_eq(pv.latency_buckets[i], 0);
        ck_assert_uint_eq(pv.latency_buckets[10], 1);
        ck_assert_uint_eq(pv.latency_buckets[11], 2);
        ck_assert_uint_eq(pv.latency_count, 8);
        ck_assert_uint_eq(pv.latency_sum_ms, sum);
        ck_assert_uint_eq(pv.rotations, 2);
        ck_assert_int_eq(keytable_latency_bounds_ms[0], 50);
        ck_assert_int_eq(keytable_latency_bounds_ms[KEYTABLE_LATENCY_BUCKETS - 1], INT64_MAX);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_reload_carries_pool_counters_outcome_classes_and_the_last_error)
{
        struct fixture f;
        struct keytable_pool_view pv;
        struct keytable_key_view v[N_KEYS];
        struct keytable_event e = event_numbered(1), out;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_disable(f.t, f.key[1], KEY_REASON_OPERATOR, 1000, NULL), 0);
        ck_assert_int_eq(keytable_disable(f.t, f.key[2], KEY_REASON_OPERATOR, 1000, NULL), 0);
        release_with_error(&f, VERDICT_TRANSIENT, "timed out", 1000);
        release_with_error(&f, VERDICT_OK, NULL, 1001);
        keytable_observe_latency(f.t, f.slot, f.pool, 300);
        keytable_count_rotation(f.t, f.slot, f.pool);
        keytable_history_add(f.t, &e);
        keytable_set_config_generation(f.t, 2);

        reload_same(&f, NULL);
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_uint_eq(pv.rotations, 1);
        ck_assert_uint_eq(pv.latency_buckets[3], 1);
        ck_assert_uint_eq(pv.latency_count, 1);
        ck_assert_uint_eq(pv.latency_sum_ms, 300);
        snapshot(&f, 1001, v);
        ck_assert_uint_eq(v[0].by_class[VERDICT_OK], 1);
        ck_assert_uint_eq(v[0].by_class[VERDICT_TRANSIENT], 1);
        ck_assert_str_eq(v[0].last_error, "timed out");
        ck_assert_uint_eq(keytable_history_read(f.t, &out, 1), 1);
        ck_assert_str_eq(out.pool, e.pool);
        ck_assert_uint_eq(keytable_config_generation(f.t), 2);

        /* What the draining generation counts after the switch stays in the old bank. */
        keytable_count_rotation(f.t, f.slot, f.pool);   /* the old slot: old bank */
        ck_assert_int_eq(keytable_slot_claim(f.t, 3, 1001, &f.slot), 0);
        keytable_count_rotation(f.t, f.slot, f.pool);   /* new bank */
        ck_assert_int_eq(keytable_pool_info(f.t, f.pool, &pv), 0);
        ck_assert_uint_eq(pv.rotations, 2);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_new_pool_in_a_reload_starts_with_zero_counters)
{
        struct fixture f;
        struct keytable_pool_view pv;
        unsigned p;

        fixture_setup(&f);
        keytable_count_rotation(f.t, f.slot, f.pool);
        keytable_observe_latency(f.t, f.slot, f.pool, 10);
        /* Two reloads, so the second refills the very row that counted above. */
        for (unsigned round = 0; round < 2; round++) {
                const char *name = round == 0 ? "another" : "third";

                ck_assert_int_eq(keytable_bank_begin(f.t), 0);
                ck_assert_int_eq(keytable_add_pool(f.t, name, "m", &p), 0);
                ck_assert_int_eq(keytable_add_key(f.t, p, fake_ids[0], fake_masks[0], NULL), 0);
                ck_assert_int_eq(keytable_bank_commit(f.t), 0);
                ck_assert_int_eq(keytable_pool_info(f.t, p, &pv), 0);
                ck_assert_str_eq(pv.name, name);
                ck_assert_uint_eq(pv.rotations, 0);
                ck_assert_uint_eq(pv.latency_count, 0);
                ck_assert_uint_eq(pv.latency_sum_ms, 0);
                /* The old generation is gone: its bank may be refilled. */
                keytable_slot_release(f.t, f.slot);
        }
        ck_assert_uint_eq(keytable_bank_current(f.t), 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_workers_view_shows_each_workers_waiting_requests)
{
        struct fixture f;
        struct keytable_worker_view w[4];

        fixture_setup(&f);
        keytable_slot_set_waiters(f.t, f.slot, 5);
        ck_assert_uint_eq(keytable_workers(f.t, w, 4), 1);
        ck_assert_uint_eq(w[0].waiters, 5);
        keytable_slot_set_waiters(f.t, f.slot, 0);
        ck_assert_uint_eq(keytable_workers(f.t, w, 4), 1);
        ck_assert_uint_eq(w[0].waiters, 0);
        fixture_teardown(&f);
}
END_TEST

static struct keytable_key_state saved_counters(void) {
        return (struct keytable_key_state) {
                .state = KEY_READY,
                .reason = KEY_REASON_NONE,
                .last_used_ms = 900,
                .requests = 40, .successes = 30, .rate_limited = 5, .failures = 4,
                .tokens_in = 1234, .tokens_out = 567,
                .consecutive_failures = 2,
                .last_status = 429,
                .last_class = VERDICT_RATE_LIMITED,
        };
}

START_TEST(test_restore_key_refuses_impossible_states_and_changes_nothing)
{
        struct fixture f;
        struct keytable_key_view before[N_KEYS], after[N_KEYS];
        struct keytable_key_state bad[9];

        fixture_setup(&f);
        for (unsigned i = 0; i < 9; i++)
                bad[i] = saved_counters();
        bad[0].state = KEY_STATE_INVALID;
        bad[1].state = (enum key_state) 77;
        bad[2].reason = (enum key_reason) 77;
        bad[3].state = KEY_COOLING;                     /* no time, no reason */
        bad[4].state = KEY_COOLING;                     /* a reason but no time */
        bad[4].reason = KEY_REASON_RATE_LIMITED;
        bad[5].state = KEY_DISABLED;                    /* no reason */
        bad[6].reason = KEY_REASON_AUTH;                /* ready with a reason */
        bad[7].last_class = (enum verdict_class) 99;
        bad[8].last_status = -1;

        snapshot(&f, 1000, before);
        for (unsigned i = 0; i < 9; i++)
                ck_assert_msg(keytable_restore_key(f.t, f.pool, 0, &bad[i], 1000) == -EINVAL,
                              "impossible state %u was accepted", i);
        ck_assert_int_eq(keytable_restore_key(f.t, f.pool, N_KEYS, &bad[6], 1000), -EINVAL);
        bad[6].reason = KEY_REASON_NONE;
        ck_assert_int_eq(keytable_restore_key(f.t, f.pool, N_KEYS, &bad[6], 1000), -EINVAL);
        ck_assert_int_eq(keytable_restore_key(f.t, 3, 0, &bad[6], 1000), -EINVAL);
        ck_assert_int_eq(keytable_restore_key(f.t, f.pool, 0, NULL, 1000), -EINVAL);
        snapshot(&f, 1000, after);
        ck_assert(memcmp(before, after, sizeof before) == 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_restore_key_keeps_a_cooling_key_cooling_with_its_counters)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct keytable_key_state st = saved_counters();
        struct keytable_lease l;

        fixture_setup(&f);
        st.state = KEY_COOLING;
        st.reason = KEY_REASON_RATE_LIMITED;
        st.cooldown_until_ms = 31000;
        ck_assert_int_eq(keytable_restore_key(f.t, f.pool, 1, &st, 1000), 0);

        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[1].state, KEY_COOLING);
        ck_assert_int_eq(v[1].reason, KEY_REASON_RATE_LIMITED);
        ck_assert_int_eq(v[1].cooldown_until_ms, 31000);
        ck_assert_uint_eq(v[1].requests, 40);
        ck_assert_uint_eq(v[1].successes, 30);
        ck_assert_uint_eq(v[1].rate_limited, 5);
        ck_assert_uint_eq(v[1].failures, 4);
        ck_assert_uint_eq(v[1].tokens_in, 1234);
        ck_assert_uint_eq(v[1].tokens_out, 567);
        ck_assert_uint_eq(v[1].consecutive_failures, 2);
        ck_assert_int_eq(v[1].last_status, 429);
        ck_assert_int_eq(v[1].last_class, VERDICT_RATE_LIMITED);
        ck_assert_int_eq(v[1].last_used_ms, 900);
        ck_assert_uint_eq(v[1].in_flight, 0);

        /* It serves no request until its rest is over. */
        for (int64_t now = 1000; now < 31000; now += 3000) {
                l = acquire_ok(&f, f.slot, now);
                ck_assert_uint_ne(l.key, f.key[1]);
                release_as(&f, &l, VERDICT_OK, 200, 0, now, NULL);
        }
        snapshot(&f, 31000, v);
        ck_assert_int_eq(v[1].state, KEY_READY);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_restore_key_ends_a_rest_that_ran_out_while_stopped)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct keytable_key_state st = saved_counters();

        fixture_setup(&f);
        st.state = KEY_COOLING;
        st.reason = KEY_REASON_RATE_LIMITED;
        st.cooldown_until_ms = 500;
        ck_assert_int_eq(keytable_restore_key(f.t, f.pool, 0, &st, 1000), 0);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_READY);
        ck_assert_int_eq(v[0].reason, KEY_REASON_NONE);
        ck_assert_int_eq(v[0].cooldown_until_ms, 0);
        ck_assert_uint_eq(v[0].requests, 40);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_restore_key_disabled_for_quota_is_probed_after_an_interval)
{
        struct fixture f;
        struct keytable_policy pol = { .probe_interval_ms = 60000 };
        struct keytable_key_view v[N_KEYS];
        struct keytable_key_state st = saved_counters();
        unsigned key, pool;

        fixture_setup(&f);
        keytable_set_policy(f.t, &pol);
        st.state = KEY_DISABLED;
        st.reason = KEY_REASON_QUOTA;
        ck_assert_int_eq(keytable_restore_key(f.t, f.pool, 2, &st, 1000), 0);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[2].state, KEY_DISABLED);
        ck_assert_int_eq(v[2].reason, KEY_REASON_QUOTA);
        ck_assert_int_eq(v[2].next_probe_ms, 61000);
        ck_assert_int_eq(keytable_probe_claim(f.t, 60999, &key, &pool), -ENOENT);
        ck_assert_int_eq(keytable_probe_claim(f.t, 61000, &key, &pool), 0);
        ck_assert_uint_eq(key, f.key[2]);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_config_generation_starts_at_one_and_follows_the_coordinator)
{
        struct fixture f;

        fixture_setup(&f);
        ck_assert_uint_eq(keytable_config_generation(f.t), 1);
        keytable_set_config_generation(f.t, 5);
        ck_assert_uint_eq(keytable_config_generation(f.t), 5);
        ck_assert_uint_eq(keytable_config_generation(NULL), 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_recover_due_ends_cooldowns_that_ran_out_and_reports_them) {
        struct keytable_limits lim = { .max_pools = 4, .max_keys = 8, .n_slots = 2, .leases_per_slot = 4 };
        struct keytable *t = NULL;
        struct keytable_lease lease;
        struct keytable_wait wait;
        struct keytable_outcome o = { .cls = VERDICT_RATE_LIMITED, .status = 429, .rest_ms = 1000,
                                      .figures = RATE_FIGURES_UNKNOWN };
        unsigned pool, slot, pools[4], positions[4];

        ck_assert_int_eq(keytable_create(&lim, 1000, &t), 0);
        ck_assert_int_eq(keytable_add_pool(t, "P", "m", &pool), 0);
        ck_assert_int_eq(keytable_add_key(t, pool, "kp-0000000001", "...001", NULL), 0);
        ck_assert_int_eq(keytable_add_key(t, pool, "kp-0000000002", "...002", NULL), 0);
        ck_assert_int_eq(keytable_slot_claim(t, 1, 1000, &slot), 0);
        ck_assert_int_eq(keytable_acquire(t, slot, pool, 1000, KEYTABLE_NO_KEY, &lease, &wait, NULL), 0);
        keytable_release(t, &lease, &o, 1000, NULL);

        ck_assert_uint_eq(keytable_recover_due(t, 1999, pools, positions, 4), 0);
        ck_assert_uint_eq(keytable_recover_due(t, 2000, pools, positions, 4), 1);
        ck_assert_uint_eq(pools[0], pool);
        ck_assert_uint_eq(positions[0], 0);
        /* Once only. */
        ck_assert_uint_eq(keytable_recover_due(t, 3000, pools, positions, 4), 0);
        keytable_slot_release(t, slot);
        keytable_destroy(t);
}
END_TEST


/* --- the consistency check ----------------------------------------------------------------- */

static void check_report(struct fixture *f, struct keytable_check_report *r) {
        ck_assert_int_eq(keytable_check(f->t, r), 0);
}

/* Fails unless some problem of the report contains words. */
static void assert_problem(const struct keytable_check_report *r, const char *words) {
        for (unsigned i = 0; i < r->n_problems && i < KEYTABLE_CHECK_PROBLEMS_MAX; i++)
                if (strstr(r->problems[i], words))
                        return;
        ck_abort_msg("expected a problem with '%s', got %u problems, first: '%s'", words,
                     r->n_problems, r->n_problems ? r->problems[0] : "");
}

START_TEST(test_check_passes_a_table_in_use_with_leases_rests_and_a_reload)
{
        struct fixture f;
        struct keytable_check_report r;
        struct keytable_lease a, b;
        unsigned fresh[N_KEYS];

        fixture_setup(&f);
        ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[2], 1, 0), 0);
        a = acquire_ok(&f, f.slot, 1000);
        b = acquire_ok(&f, f.slot, 1001);
        release_as(&f, &a, VERDICT_RATE_LIMITED, 429, 60000, 1002, NULL);
        (void) acquire_ok(&f, f.slot, 1003);        /* key 2, now full */
        check_report(&f, &r);
        ck_assert_msg(r.n_problems == 0, "a consistent table: expected no problem, got '%s'",
                      r.problems[0]);
        ck_assert_uint_eq(r.in_flight, 2);
        ck_assert_uint_eq(r.leases, 2);
        ck_assert_uint_eq(r.by_state[KEY_COOLING], 1);
        ck_assert_uint_eq(r.by_state[KEY_READY], 2);

        release_as(&f, &b, VERDICT_OK, 200, 0, 1004, NULL);
        reload_same(&f, fresh);
        check_report(&f, &r);
        ck_assert_msg(r.n_problems == 0, "after a reload: expected no problem, got '%s'", r.problems[0]);
        ck_assert_uint_eq(r.pools, 2);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_check_reports_a_scribbled_in_flight_count)
{
        struct fixture f;
        struct keytable_check_report r;

        fixture_setup(&f);
        (void) acquire_ok(&f, f.slot, 1000);
        f.t->keys[f.key[1]].in_flight = 3;
        check_report(&f, &r);
        assert_problem(&r, "key 1: in_flight 3, but 0 leases name it");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_check_reports_a_leaked_lease)
{
        struct fixture f;
        struct keytable_check_report r;
        unsigned other;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &other), 0);
        /* A lease written with no count behind it: a release that cleared the count only. */
        kt_slot_leases(f.t, other)[2] = f.key[0] + 1;
        check_report(&f, &r);
        assert_problem(&r, "key 0: in_flight 0, but 1 leases name it");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_check_reports_a_lease_left_on_a_free_slot)
{
        struct fixture f;
        struct keytable_check_report r;

        fixture_setup(&f);
        kt_slot_leases(f.t, f.slot + 1)[0] = f.key[1] + 1;
        f.t->keys[f.key[1]].in_flight = 1;
        check_report(&f, &r);
        assert_problem(&r, "free, yet holds a lease");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_check_reports_a_stale_index)
{
        struct fixture f;
        struct keytable_check_report r;
        struct keytable_lease l;

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);       /* builds the index */
        release_as(&f, &l, VERDICT_OK, 200, 0, 1001, NULL);
        check_report(&f, &r);
        ck_assert_msg(r.n_problems == 0, "before: expected no problem, got '%s'", r.problems[0]);
        /* The row says disabled; the index still lists the key, as a lost update would. */
        f.t->keys[f.key[1]].state = KEY_DISABLED;
        f.t->keys[f.key[1]].reason = KEY_REASON_OPERATOR;
        check_report(&f, &r);
        assert_problem(&r, "key 1: in the index's list but disabled");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_check_reports_index_counts_that_disagree_with_the_rows)
{
        struct fixture f;
        struct keytable_check_report r;
        struct keytable_lease l;

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l, VERDICT_OK, 200, 0, 1001, NULL);
        f.t->pools[f.t->keys[f.key[0]].pool].n_full = 2;
        check_report(&f, &r);
        assert_problem(&r, "index counts 2 full keys, the rows 0");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_check_reports_a_dirty_marker_left_set)
{
        struct fixture f;
        struct keytable_check_report r;

        fixture_setup(&f);
        f.t->keys[f.key[2]].dirty = 1;
        check_report(&f, &r);
        assert_problem(&r, "key 2: dirty marker left set");
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_check_passes_again_after_a_dead_worker_is_repaired)
{
        struct fixture f;
        struct keytable_check_report r;
        int status;
        pid_t pid;

        fixture_setup(&f);
        (void) acquire_ok(&f, f.slot, 1000);
        pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
                keytable_test_die_holding_lock(f.t, f.pool, f.key[1]);
                _exit(0);
        }
        ck_assert_int_eq(wait_child(pid, &status), pid);
        check_report(&f, &r);       /* takes the abandoned lock: repairs, then checks */
        ck_assert_msg(r.n_problems == 0, "after repair: expected no problem, got '%s'", r.problems[0]);
        ck_assert_uint_eq(r.in_flight, 1);
        fixture_teardown(&f);
}
END_TEST

/* --- waiting in arrival order across workers ------------------------------------------------ */

START_TEST(test_a_freed_key_goes_to_the_oldest_waiter_of_any_worker)
{
        struct fixture f;
        struct keytable_lease held[N_KEYS], l;
        struct keytable_wait w;
        unsigned other;
        uint64_t first, second;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &other), 0);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_int_eq(keytable_set_key_limits(f.t, f.key[i], 1, 0), 0);
        }
        for (unsigned i = 0; i < N_KEYS; i++)
                held[i] = acquire_ok(&f, f.slot, 1000);
        /* Every key is full: a request of the other worker waits first, then one of ours. */
        first = keytable_wait_ticket(f.t, other, f.pool);
        keytable_slot_set_waiters(f.t, other, 1);
        keytable_slot_set_wait_head(f.t, other, f.pool, first);
        second = keytable_wait_ticket(f.t, f.slot, f.pool);
        ck_assert_uint_gt(second, first);
        keytable_slot_set_waiters(f.t, f.slot, 1);
        keytable_slot_set_wait_head(f.t, f.slot, f.pool, second);

        release_as(&f, &held[0], VERDICT_OK, 200, 0, 1010, NULL);
        /* Our later waiter, and a newcomer, leave the key to the other worker's older one. */
        ck_assert_int_eq(keytable_acquire_waiter(f.t, f.slot, f.pool, 1011, KEYTABLE_NO_KEY, second,
                                                 &l, &w, NULL), -EAGAIN);
        ck_assert_msg(w.busy && w.retry_at_ms > 1011, "a yield says look again soon");
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 1011, KEYTABLE_NO_KEY, &l, &w, NULL),
                         -EAGAIN);
        ck_assert_int_eq(keytable_acquire_waiter(f.t, other, f.pool, 1012, KEYTABLE_NO_KEY, first,
                                                 &l, &w, NULL), 0);
        ck_assert_uint_eq(l.key, f.key[0]);
        keytable_slot_set_waiters(f.t, other, 0);
        keytable_slot_set_wait_head(f.t, other, f.pool, 0);

        /* With the older waiter served, ours is next. */
        release_as(&f, &held[1], VERDICT_OK, 200, 0, 1013, NULL);
        ck_assert_int_eq(keytable_acquire_waiter(f.t, f.slot, f.pool, 1014, KEYTABLE_NO_KEY, second,
                                                 &l, &w, NULL), 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_waiter_of_a_stopped_or_freed_worker_is_not_waited_for)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_wait w;
        unsigned other;
        uint64_t ticket;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &other), 0);
        ticket = keytable_wait_ticket(f.t, other, f.pool);
        keytable_slot_set_waiters(f.t, other, 1);
        keytable_slot_set_wait_head(f.t, other, f.pool, ticket);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 1001, KEYTABLE_NO_KEY, &l, &w, NULL),
                         -EAGAIN);
        /* Its heartbeat stopped long ago (SIGSTOP, a wedge): no one waits on it. */
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 100000, KEYTABLE_NO_KEY, &l, &w, NULL), 0);
        keytable_release(f.t, &l, NULL, 100000, NULL);
        keytable_slot_heartbeat(f.t, other, 100000);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 100001, KEYTABLE_NO_KEY, &l, &w, NULL),
                         -EAGAIN);
        /* Dead and released: its tickets go with it. */
        keytable_slot_release(f.t, other);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 100002, KEYTABLE_NO_KEY, &l, &w, NULL), 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_waiters_of_one_worker_are_yielded_to_while_others_come_and_go)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_wait w;
        unsigned one, two;
        uint64_t ticket;

        fixture_setup(&f);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &one), 0);
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1000, &two), 0);
        ticket = keytable_wait_ticket(f.t, one, f.pool);
        keytable_slot_set_waiters(f.t, one, 1);
        keytable_slot_set_wait_head(f.t, one, f.pool, ticket);
        keytable_slot_set_waiters(f.t, one, 3);
        ticket = keytable_wait_ticket(f.t, two, f.pool);
        keytable_slot_set_waiters(f.t, two, 1);
        keytable_slot_set_wait_head(f.t, two, f.pool, ticket);
        /* The second worker's waiters go, twice over, then the worker itself while waiting
         * again: the first one's older waiter is still owed the key each time. */
        keytable_slot_set_waiters(f.t, two, 0);
        keytable_slot_set_waiters(f.t, two, 0);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 1001, KEYTABLE_NO_KEY, &l, &w, NULL),
                         -EAGAIN);
        keytable_slot_set_waiters(f.t, two, 2);
        keytable_slot_release(f.t, two);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 1002, KEYTABLE_NO_KEY, &l, &w, NULL),
                         -EAGAIN);
        /* The slot claimed again starts with none, and the first worker's waiters are served. */
        ck_assert_int_eq(keytable_slot_claim(f.t, 1, 1003, &two), 0);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 1003, KEYTABLE_NO_KEY, &l, &w, NULL),
                         -EAGAIN);
        keytable_slot_set_waiters(f.t, one, 0);
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 1004, KEYTABLE_NO_KEY, &l, &w, NULL), 0);
        keytable_release(f.t, &l, NULL, 1004, NULL);
        fixture_teardown(&f);
}
END_TEST

/* --- the old generation's news after a commit ----------------------------------------------- */

START_TEST(test_a_cooldown_learned_while_draining_reaches_the_new_bank)
{
        struct fixture f;
        struct keytable_lease l;
        struct keytable_key_view v[N_KEYS];
        struct keytable_check_report r;
        unsigned fresh[N_KEYS];

        fixture_setup(&f);
        l = acquire_ok(&f, f.slot, 1000);       /* the old generation, on key 0 */
        reload_same(&f, fresh);
        release_as(&f, &l, VERDICT_RATE_LIMITED, 429, 30000, 1100, NULL);

        snapshot(&f, 1101, v);
        ck_assert_msg(v[0].state == KEY_COOLING && v[0].cooldown_until_ms == 31100,
                      "the new bank's row: expected cooling until 31100, got %s until %lld",
                      keytable_state_name(v[0].state), (long long) v[0].cooldown_until_ms);
        ck_assert_int_eq(v[0].reason, KEY_REASON_RATE_LIMITED);
        ck_assert_uint_eq(v[0].in_flight, 0);
        ck_assert_int_eq(v[1].state, KEY_READY);
        check_report(&f, &r);
        ck_assert_msg(r.n_problems == 0, "expected no problem, got '%s'", r.problems[0]);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_disable_learned_while_draining_reaches_the_new_bank_and_a_longer_rest_stands)
{
        struct fixture f;
        struct keytable_lease a, b;
        struct keytable_key_view v[N_KEYS];
        struct keytable_lease n;
        unsigned fresh[N_KEYS], slot2;

        fixture_setup(&f);
        a = acquire_ok(&f, f.slot, 1000);       /* key 0 */
        b = acquire_ok(&f, f.slot, 1000);       /* key 1 */
        reload_same(&f, fresh);
        ck_assert_int_eq(keytable_slot_claim(f.t, 2, 1000, &slot2), 0);
        /* The new generation cools key 1 for long first. */
        for (;;) {
                ck_assert_int_eq(keytable_acquire(f.t, slot2, f.pool, 1050, KEYTABLE_NO_KEY, &n, NULL,
                                                  NULL), 0);
                if (n.key == fresh[1])
                        break;
                release_as(&f, &n, VERDICT_OK, 200, 0, 1050, NULL);
        }
        release_as(&f, &n, VERDICT_RATE_LIMITED, 429, 100000, 1060, NULL);

        release_as(&f, &a, VERDICT_AUTH, 401, 0, 1100, NULL);
        release_as(&f, &b, VERDICT_RATE_LIMITED, 429, 5000, 1100, NULL);
        snapshot(&f, 1101, v);
        ck_assert_int_eq(v[0].state, KEY_DISABLED);
        ck_assert_int_eq(v[0].reason, KEY_REASON_AUTH);
        ck_assert_msg(v[1].state == KEY_COOLING && v[1].cooldown_until_ms == 101060,
                      "the longer rest stands: expected until 101060, got %lld",
                      (long long) v[1].cooldown_until_ms);
        fixture_teardown(&f);
}
END_TEST

static Suite *keytable_suite(void) {
        Suite *s = suite_create("keytable");
        TCase *tc;

        tc = tcase_create("selection");
        tcase_add_test(tc, test_primary_goes_first_then_lru_rotates_through_the_backups);
        tcase_add_test(tc, test_recover_due_ends_cooldowns_that_ran_out_and_reports_them);
        tcase_add_test(tc, test_never_used_keys_tie_and_are_taken_in_list_order);
        suite_add_tcase(s, tc);

        tc = tcase_create("cooldowns");
        tcase_add_test(tc, test_rate_limited_key_gets_no_traffic_until_its_cooldown_passes);
        tcase_add_test(tc, test_rate_limit_with_no_rest_still_cools_the_key_for_a_moment);
        tcase_add_test(tc, test_a_shorter_rate_limit_hint_never_shortens_a_cooldown);
        tcase_add_test(tc, test_auth_and_quota_failures_disable_their_keys_for_good);
        tcase_add_test(tc, test_all_keys_cooling_gives_eagain_with_the_earliest_recovery);
        tcase_add_test(tc, test_all_keys_disabled_gives_eagain_with_no_retry_time);
        tcase_add_test(tc, test_a_late_rate_limit_does_not_revive_a_disabled_key);
        suite_add_tcase(s, tc);

        tc = tcase_create("limits");
        tcase_add_test(tc, test_a_key_at_its_max_concurrent_is_skipped);
        tcase_add_test(tc, test_every_key_at_its_max_concurrent_gives_eagain_busy_and_no_retry_time);
        tcase_add_test(tc, test_releasing_a_full_key_reports_freed_capacity_and_it_serves_again);
        tcase_add_test(tc, test_max_concurrent_holds_across_processes);
        tcase_add_test(tc, test_rpm_lets_a_burst_through_then_skips_the_key);
        tcase_add_test(tc, test_rpm_wait_names_the_exact_ms_the_next_slot_opens);
        tcase_add_test(tc, test_each_key_keeps_its_own_rpm_so_an_override_beats_the_pool_default);
        tcase_add_test(tc, test_an_avoided_key_is_passed_over_while_another_can_serve);
        tcase_add_test(tc, test_an_avoided_key_is_taken_when_no_other_key_can_serve);
        suite_add_tcase(s, tc);

        tc = tcase_create("rests_scopes_and_probes");
        tcase_add_test(tc, test_a_success_that_leaves_nothing_cools_the_key_until_the_reset);
        tcase_add_test(tc, test_transient_failures_cool_a_key_only_after_threshold_in_a_row);
        tcase_add_test(tc, test_a_success_between_transient_failures_resets_the_run);
        tcase_add_test(tc, test_transient_failures_never_cool_without_a_threshold);
        tcase_add_test(tc, test_release_stores_the_figures_sent_and_sums_tokens);
        tcase_add_test(tc, test_scope_key_rate_limit_cools_the_same_key_in_other_pools);
        tcase_add_test(tc, test_scope_key_cools_the_key_in_every_other_pool);
        tcase_add_test(tc, test_scope_pool_rate_limit_cools_only_its_own_row);
        tcase_add_test(tc, test_scope_key_never_shortens_a_twins_longer_cooldown);
        tcase_add_test(tc, test_scope_key_leaves_a_disabled_twin_disabled);
        tcase_add_test(tc, test_the_same_key_twice_in_one_pool_is_refused);
        tcase_add_test(tc, test_every_key_limited_within_a_second_suspects_an_account_limit);
        tcase_add_test(tc, test_keys_limited_seconds_apart_are_not_an_account_limit);
        tcase_add_test(tc, test_a_key_limited_again_while_resting_keeps_the_time_its_rest_began);
        tcase_add_test(tc, test_disabled_keys_do_not_count_against_an_account_limit_but_one_key_is_not_enough);
        tcase_add_test(tc, test_a_quota_disabled_key_is_claimed_for_a_probe_once_due);
        tcase_add_test(tc, test_an_auth_disabled_key_is_probed_only_with_probe_auth);
        tcase_add_test(tc, test_enable_brings_a_disabled_key_back_ready);
        tcase_add_test(tc, test_an_operator_disabled_key_is_never_probed);
        tcase_add_test(tc, test_slots_with_waiters_lists_only_live_slots_that_have_some);
        suite_add_tcase(s, tc);

        tc = tcase_create("outcomes_and_leases");
        tcase_add_test(tc, test_release_records_counters_and_failure_streaks);
        tcase_add_test(tc, test_in_flight_counts_follow_leases_out_and_back);
        tcase_add_test(tc, test_releasing_a_lease_twice_takes_one_request_off);
        tcase_add_test(tc, test_full_slot_gets_enospc_and_changes_nothing);
        tcase_add_test(tc, test_slot_release_returns_a_dead_workers_leases);
        suite_add_tcase(s, tc);

        tc = tcase_create("robustness");
        tcase_set_timeout(tc, 60);
        tcase_add_test(tc, test_next_locker_repairs_a_pool_whose_holder_died);
        tcase_add_test(tc, test_repair_keeps_the_leases_a_dead_lock_holder_really_held);
        tcase_add_test(tc, test_slot_release_copes_with_a_worker_that_died_holding_the_lock);
        tcase_add_test(tc, test_repair_makes_the_new_fields_of_a_scribbled_row_safe);
        tcase_add_test(tc, test_workers_killed_at_random_moments_leave_the_counts_right);
        tcase_add_test(tc, test_concurrent_workers_share_one_table);
        suite_add_tcase(s, tc);

        tc = tcase_create("reload");
        tcase_set_timeout(tc, 60);
        tcase_add_test(tc, test_a_reload_keeps_a_cooling_key_cooling_until_the_same_time_with_its_counters);
        tcase_add_test(tc, test_a_reload_keeps_a_disabled_key_disabled_with_its_reason_and_probe_time);
        tcase_add_test(tc, test_a_key_new_in_a_reload_starts_ready_with_zero_counters);
        tcase_add_test(tc, test_a_key_removed_by_a_reload_is_gone_from_the_current_snapshot);
        tcase_add_test(tc, test_a_key_moved_to_another_pool_keeps_its_state);
        tcase_add_test(tc, test_a_key_in_several_pools_carries_the_row_of_the_pool_with_the_same_name);
        tcase_add_test(tc, test_readers_see_the_old_bank_until_commit_and_the_new_one_after);
        tcase_add_test(tc, test_a_slot_claimed_after_commit_acquires_from_the_new_bank_while_an_older_one_keeps_the_old);
        tcase_add_test(tc, test_bank_begin_is_busy_while_a_slot_of_the_bank_before_last_lives);
        tcase_add_test(tc, test_abort_leaves_the_current_bank_untouched);
        tcase_add_test(tc, test_leases_on_old_rows_are_returned_by_slot_release_after_a_commit);
        tcase_add_test(tc, test_repair_after_a_dead_lock_holder_works_in_the_second_bank);
        tcase_add_test(tc, test_refilling_a_bank_repairs_a_pool_lock_a_dead_old_worker_left);
        tcase_add_test(tc, test_twins_link_within_the_new_bank);
        tcase_add_test(tc, test_positions_map_keys_to_their_place_in_the_pool_in_either_bank);
        tcase_add_test(tc, test_a_reload_applies_the_new_limits_to_a_kept_key);
        tcase_add_test(tc, test_pool_read_refuses_a_buffer_sized_before_a_reload_grew_the_pool);
        tcase_add_test(tc, test_a_removed_key_is_not_probed_from_the_old_bank);
        tcase_add_test(tc, test_a_pool_keeps_its_account_limit_across_a_reload);
        suite_add_tcase(s, tc);

        tc = tcase_create("views_and_validation");
        tcase_set_timeout(tc, 60);
        tcase_add_test(tc, test_a_pool_of_100000_keys_can_be_built_and_served);
        tcase_add_test(tc, test_snapshot_shows_cooling_only_while_the_cooldown_lasts);
        tcase_add_test(tc, test_workers_view_lists_claimed_slots_until_released);
        tcase_add_test(tc, test_limits_and_names_are_validated);
        tcase_add_test(tc, test_limits_too_large_for_two_banks_are_refused);
        tcase_add_test(tc, test_nothing_is_left_in_dev_shm);
        tcase_add_test(tc, test_state_reason_and_stage_names);
        suite_add_tcase(s, tc);

        tc = tcase_create("history_observations_and_restore");
        tcase_set_timeout(tc, 60);
        tcase_add_test(tc, test_history_ring_wraps_and_returns_the_newest_oldest_first);
        tcase_add_test(tc, test_history_add_cuts_over_long_names_and_kind_names_are_stable);
        tcase_add_test(tc, test_history_stays_whole_when_appenders_die_mid_append);
        tcase_add_test(tc, test_release_counts_each_outcome_by_class);
        tcase_add_test(tc, test_last_error_is_kept_cut_to_size_until_the_next_one);
        tcase_add_test(tc, test_latency_lands_in_its_bucket_with_count_and_sum);
        tcase_add_test(tc, test_a_reload_carries_pool_counters_outcome_classes_and_the_last_error);
        tcase_add_test(tc, test_a_new_pool_in_a_reload_starts_with_zero_counters);
        tcase_add_test(tc, test_workers_view_shows_each_workers_waiting_requests);
        tcase_add_test(tc, test_restore_key_refuses_impossible_states_and_changes_nothing);
        tcase_add_test(tc, test_restore_key_keeps_a_cooling_key_cooling_with_its_counters);
        tcase_add_test(tc, test_restore_key_ends_a_rest_that_ran_out_while_stopped);
        tcase_add_test(tc, test_restore_key_disabled_for_quota_is_probed_after_an_interval);
        tcase_add_test(tc, test_config_generation_starts_at_one_and_follows_the_coordinator);
        suite_add_tcase(s, tc);

        tc = tcase_create("check_fifo_and_drain");
        tcase_add_test(tc, test_check_passes_a_table_in_use_with_leases_rests_and_a_reload);
        tcase_add_test(tc, test_check_reports_a_scribbled_in_flight_count);
        tcase_add_test(tc, test_check_reports_a_leaked_lease);
        tcase_add_test(tc, test_check_reports_a_lease_left_on_a_free_slot);
        tcase_add_test(tc, test_check_reports_a_stale_index);
        tcase_add_test(tc, test_check_reports_index_counts_that_disagree_with_the_rows);
        tcase_add_test(tc, test_check_reports_a_dirty_marker_left_set);
        tcase_add_test(tc, test_check_passes_again_after_a_dead_worker_is_repaired);
        tcase_add_test(tc, test_a_freed_key_goes_to_the_oldest_waiter_of_any_worker);
        tcase_add_test(tc, test_a_waiter_of_a_stopped_or_freed_worker_is_not_waited_for);
        tcase_add_test(tc, test_waiters_of_one_worker_are_yielded_to_while_others_come_and_go);
        tcase_add_test(tc, test_a_cooldown_learned_while_draining_reaches_the_new_bank);
        tcase_add_test(tc, test_a_disable_learned_while_draining_reaches_the_new_bank_and_a_longer_rest_stands);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        SRunner *sr = srunner_create(keytable_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
