/* check_keytable.c — the shared key table: selection, cooldowns, leases, worker slots, and
 * surviving processes that die at the worst moment (robust mutexes, repair from the leases). */

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keypool/keytable.h"

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
        int r = keytable_acquire(f->t, slot, f->pool, now, &l, NULL, NULL);

        ck_assert_msg(r == 0, "acquire at %lld: expected success, got %d", (long long) now, r);
        return l;
}

static void release_as(struct fixture *f, const struct keytable_lease *l, enum verdict_class cls,
                       int status, int64_t rest_ms, int64_t now, struct keytable_change *ret_change) {
        struct keytable_outcome o = { .cls = cls, .status = status, .rest_ms = rest_ms };

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
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 31000, &l, NULL, &c), 0);
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
        int64_t rest[N_KEYS] = { 5000, 2000, 9000 }, retry = -1;

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        for (unsigned i = 0; i < N_KEYS; i++)
                release_as(&f, &l[i], VERDICT_RATE_LIMITED, 429, rest[i], 1000, NULL);

        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 1500, &untouched, &retry, NULL),
                         -EAGAIN);
        ck_assert_int_eq(retry, 3000);
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
        int64_t retry = -1;

        fixture_setup(&f);
        for (unsigned i = 0; i < N_KEYS; i++)
                l[i] = acquire_ok(&f, f.slot, 1000);
        release_as(&f, &l[0], VERDICT_AUTH, 401, 0, 1000, NULL);
        release_as(&f, &l[1], VERDICT_QUOTA, 429, 0, 1000, NULL);
        release_as(&f, &l[2], VERDICT_AUTH, 403, 0, 1000, NULL);

        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 2000, &l[0], &retry, NULL), -EAGAIN);
        ck_assert_int_eq(retry, 0);
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
                                       .tokens_out = 7 };
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
        ck_assert_int_eq(keytable_acquire(f.t, f.slot, f.pool, 2000, &l, NULL, &c), -ENOSPC);
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
        ck_assert_int_eq(keytable_acquire(f.t, slot2, f.pool, 2000, &other, NULL, &c), 0);
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
                        if (keytable_acquire(f.t, child_slot, f.pool, 1000, &l, NULL, NULL) < 0)
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
                        if (keytable_acquire(f->t, slot, f->pool, 1000, &l, NULL, NULL) < 0)
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
                        struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200 };
                        struct keytable_lease l;

                        for (;;)
                                if (keytable_acquire(f.t, slot, f.pool, 1000, &l, NULL, NULL) == 0)
                                        keytable_release(f.t, &l, &ok, 1000, NULL);
                }
                usleep(200 + rand_r(&seed) % 3000);
                kill(pid, SIGKILL);
                expect_killed(pid);
                keytable_slot_release(f.t, slot);
        }

        snapshot(&f, 1000, v);
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
                        struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200 };
                        struct keytable_lease l;

                        for (int n = 0; n < per_worker; n++) {
                                if (keytable_acquire(f.t, slots[i], f.pool, 1000, &l, NULL,
                                                     NULL) < 0)
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
                ck_assert_int_eq(keytable_acquire(t, slot, pool, 10, &l, NULL, NULL), 0);
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
        ck_assert_int_eq(keytable_acquire(t, 0, p0, 0, &l, NULL, NULL), -EINVAL);
        ck_assert_int_eq(keytable_slot_claim(t, 1, 0, &slot), 0);
        ck_assert_int_eq(keytable_acquire(t, slot, 5, 0, &l, NULL, NULL), -EINVAL);
        ck_assert_int_eq(keytable_acquire(t, 3, p0, 0, &l, NULL, NULL), -EINVAL);
        ck_assert_int_eq(keytable_acquire(t, slot, p0, 0, &l, NULL, NULL), 0);
        ck_assert_int_eq(keytable_acquire(t, slot, p1, 0, &l, NULL, NULL), -ENOSPC);
        keytable_destroy(t);
        keytable_destroy(NULL);
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

static Suite *keytable_suite(void) {
        Suite *s = suite_create("keytable");
        TCase *tc;

        tc = tcase_create("selection");
        tcase_add_test(tc, test_primary_goes_first_then_lru_rotates_through_the_backups);
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
        tcase_add_test(tc, test_workers_killed_at_random_moments_leave_the_counts_right);
        tcase_add_test(tc, test_concurrent_workers_share_one_table);
        suite_add_tcase(s, tc);

        tc = tcase_create("views_and_validation");
        tcase_set_timeout(tc, 60);
        tcase_add_test(tc, test_a_pool_of_100000_keys_can_be_built_and_served);
        tcase_add_test(tc, test_snapshot_shows_cooling_only_while_the_cooldown_lasts);
        tcase_add_test(tc, test_workers_view_lists_claimed_slots_until_released);
        tcase_add_test(tc, test_limits_and_names_are_validated);
        tcase_add_test(tc, test_nothing_is_left_in_dev_shm);
        tcase_add_test(tc, test_state_reason_and_stage_names);
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
