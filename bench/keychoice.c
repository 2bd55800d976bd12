/* keychoice.c — what choosing a key costs as a pool grows.
 *
 * The target: key choice costs the same per request for pools of 10, 1,000 and 100,000 keys.
 * This times the hot path a proxied request takes through the key table — keytable_acquire
 * (lock the pool, pick its least recently used ready key, take a lease) and keytable_release
 * (record a success, return the lease) — on one table holding three pools of those sizes, all
 * keys ready, and prints ns per acquire+release pair and the ratio to the 10-key pool.
 *
 * A second case has every key but the last cooling (a pool mostly rate limited): a request then
 * most needs to be quick, and only one key can be taken.
 *
 * The machine may be busy with other work: each pool is timed in several rounds, the pools taking
 * turns, and its best round counts, so a burst of someone else's load lands on no pool alone.
 *
 * Links build/libkeypool.a; not part of the autotools build (bench/run builds it).
 * Output, one line per pool: "KEYCHOICE case=ready keys=N ns_per_op=X ratio=Y".
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "keypool/keytable.h"

static const unsigned sizes[] = { 10, 1000, 100000 };
#define N_SIZES (sizeof sizes / sizeof sizes[0])
#define ROUNDS  21

static uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ULL + (uint64_t) ts.tv_nsec;
}

static int64_t now_ms(void) {
        return (int64_t) (now_ns() / 1000000);
}

static void fail(const char *what, int r) {
        fprintf(stderr, "keychoice: %s: %s\n", what, strerror(-r));
        exit(1);
}

/* Acquire and release on pool until at least min_ns have passed; returns ns per pair. */
static double time_pool(struct keytable *t, unsigned slot, unsigned pool, uint64_t min_ns) {
        struct keytable_outcome ok = {
                .cls = VERDICT_OK, .status = 200, .figures = RATE_FIGURES_UNKNOWN,
        };
        uint64_t iters = 0, batch = 64, start = now_ns(), elapsed;

        for (;;) {
                int64_t ms = now_ms();

                for (uint64_t i = 0; i < batch; i++) {
                        struct keytable_lease lease;
                        struct keytable_wait wait;
                        int r = keytable_acquire(t, slot, pool, ms, KEYTABLE_NO_KEY, &lease, &wait, NULL);

                        if (r < 0)
                                fail("keytable_acquire", r);
                        keytable_release(t, &lease, &ok, ms, NULL);
                }
                iters += batch;
                elapsed = now_ns() - start;
                if (elapsed >= min_ns)
                        break;
                if (batch < 65536)
                        batch *= 2;
        }
        return (double) elapsed / (double) iters;
}

/* Every key of the pool but its last rate limited for an hour, written the way a state file is
 * restored (quicker to set up than a 429 per key). */
static void cool_all_but_last(struct keytable *t, unsigned pool, unsigned n) {
        int64_t ms = now_ms();
        struct keytable_key_state st = {
                .state = KEY_COOLING, .reason = KEY_REASON_RATE_LIMITED,
                .cooldown_until_ms = ms + 3600 * 1000, .last_status = 429,
                .last_class = VERDICT_RATE_LIMITED,
        };

        for (unsigned i = 0; i + 1 < n; i++) {
                int r = keytable_restore_key(t, pool, i, &st, ms);

                if (r < 0)
                        fail("keytable_restore_key", r);
        }
}

int main(int argc, char **argv) {
        struct keytable_limits limits = {
                .max_pools = N_SIZES * 2,
                .max_keys = 0,
                .n_slots = 1,
                .leases_per_slot = 64,
                .history_size = 1024,
        };
        struct keytable_policy policy = {
                .cooldown_scope_key = false,
                .transient_threshold = 3,
                .transient_cooldown_ms = 30000,
                .probe_interval_ms = 3600000,
        };
        uint64_t min_ns = (argc > 1 ? strtoull(argv[1], NULL, 10) : 300) * 1000000ULL;
        unsigned pools[2][N_SIZES], slot;
        struct keytable *t;
        double best[2][N_SIZES];
        int r;

        for (unsigned i = 0; i < N_SIZES; i++)
                limits.max_keys += 2 * sizes[i];
        r = keytable_create(&limits, now_ms(), &t);
        if (r < 0)
                fail("keytable_create", r);
        keytable_set_policy(t, &policy);

        for (unsigned c = 0; c < 2; c++)
                for (unsigned i = 0; i < N_SIZES; i++) {
                        char name[32];

                        snprintf(name, sizeof name, "pool%u-%u", c, sizes[i]);
                        r = keytable_add_pool(t, name, name, &pools[c][i]);
                        if (r < 0)
                                fail("keytable_add_pool", r);
                        for (unsigned k = 0; k < sizes[i]; k++) {
                                char id[KEYID_ID_LEN + 1], masked[KEYID_MASK_MAX + 1];
                                unsigned key;

                                /* Ids and masks only: the table never sees a secret. */
                                snprintf(id, sizeof id, "kp-%02x%08x", c * 16 + i, k);
                                snprintf(masked, sizeof masked, "sk-fake-test...%03u", k % 1000);
                                r = keytable_add_key(t, pools[c][i], id, masked, &key);
                                if (r < 0)
                                        fail("keytable_add_key", r);
                        }
                }
        r = keytable_slot_claim(t, 1, now_ms(), &slot);
        if (r < 0)
                fail("keytable_slot_claim", r);
        keytable_slot_set_stage(t, slot, WORKER_STAGE_SERVING);

        for (unsigned i = 0; i < N_SIZES; i++)
                cool_all_but_last(t, pools[1][i], sizes[i]);

        /* A first pass faults the rows in and warms the caches. */
        for (unsigned c = 0; c < 2; c++)
                for (unsigned i = 0; i < N_SIZES; i++) {
                        (void) time_pool(t, slot, pools[c][i], min_ns / 4);
                        best[c][i] = 0;
                }
        for (unsigned round = 0; round < ROUNDS; round++)
                for (unsigned c = 0; c < 2; c++)
                        for (unsigned i = 0; i < N_SIZES; i++) {
                                double ns = time_pool(t, slot, pools[c][i], min_ns / ROUNDS);

                                if (best[c][i] == 0 || ns < best[c][i])
                                        best[c][i] = ns;
                        }
        for (unsigned c = 0; c < 2; c++)
                for (unsigned i = 0; i < N_SIZES; i++) {
                        printf("KEYCHOICE case=%s keys=%u ns_per_op=%.1f ratio=%.2f\n",
                               c == 0 ? "ready" : "cooling", sizes[i], best[c][i],
                               best[c][i] / best[c][0]);
                        fflush(stdout);
                }
        keytable_destroy(t);
        return 0;
}
