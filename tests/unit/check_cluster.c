/* check_cluster.c — the cluster's pure parts and the table's side of it: the share of a limit,
 * the event message (and that garbage is refused), which history entries are shared, how another
 * node's state lands on the rows (the later rest wins, a disable is not undone by a cooldown, no
 * history is written), the cursor over the history ring, the cluster = { … } settings, and the
 * leased budgets (the plan per key, and that a row under leases serves only within them). */

#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keypool/cluster.h"
#include "keypool/conf.h"
#include "keypool/keytable.h"

#define ID_A "kp-0123456789"
#define ID_B "kp-abcdefabcd"

START_TEST(test_share_divides_a_limit_by_the_live_nodes_and_never_reaches_zero) {
        ck_assert_uint_eq(cluster_share(10, 2), 5);
        ck_assert_uint_eq(cluster_share(10, 3), 3);
        ck_assert_uint_eq(cluster_share(10, 1), 10);
        ck_assert_uint_eq(cluster_share(10, 0), 10);
        ck_assert_uint_eq(cluster_share(2, 5), 1);
        ck_assert_uint_eq(cluster_share(0, 4), 0);      /* no limit stays no limit */
}
END_TEST

START_TEST(test_event_message_round_trips) {
        struct cluster_event e = {
                .node = "alpha", .id = ID_A, .state = KEY_COOLING, .reason = KEY_REASON_RATE_LIMITED,
                .until_wall_ms = 1700000060000, .at_wall_ms = 1700000000000,
        }, back;
        char buf[256];
        int n = cluster_event_format(&e, buf, sizeof buf);

        ck_assert_int_gt(n, 0);
        ck_assert_int_eq(cluster_event_parse(buf, (size_t) n, &back), 0);
        ck_assert_str_eq(back.node, "alpha");
        ck_assert_str_eq(back.id, ID_A);
        ck_assert_int_eq(back.state, KEY_COOLING);
        ck_assert_int_eq(back.reason, KEY_REASON_RATE_LIMITED);
        ck_assert(back.until_wall_ms == e.until_wall_ms && back.at_wall_ms == e.at_wall_ms);
}
END_TEST

START_TEST(test_garbage_messages_are_refused) {
        static const char *const bad[] = {
                "", "garbage", "alpha\tkp-0123456789\tcooling\t1\t5",
                "alpha\tkp-0123456789\tsleeping\t1\t5\t6",
                "alpha\tkp-short\tcooling\t1\t5\t6",
                "\tkp-0123456789\tcooling\t1\t5\t6",
                "alpha\tkp-0123456789\tcooling\t99\t5\t6",
                "alpha\tkp-0123456789\tcooling\t1\tfive\t6",
                "alpha\tkp-0123456789\tdisabled\t0\t0\t6",     /* a disable needs a reason */
                "alpha\tkp-0123456789\tready\t0\t0\t6\textra",
        };
        struct cluster_event e;

        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
                ck_assert_msg(cluster_event_parse(bad[i], strlen(bad[i]), &e) == -EBADMSG,
                              "'%s' should be refused", bad[i]);
        ck_assert_int_eq(cluster_event_parse("a\0b", 3, &e), -EBADMSG);
}
END_TEST

START_TEST(test_only_cooldowns_disables_and_enables_are_shared) {
        struct keytable_event h = { .kind = HISTORY_COOLDOWN, .wall_ms = 1000, .cooldown_ms = 500,
                                    .reason = KEY_REASON_RATE_LIMITED, .key_from = ID_A, .node = "alpha" };
        struct cluster_event e;

        ck_assert_int_eq(cluster_event_from_history(&h, &e), 0);
        ck_assert_int_eq(e.state, KEY_COOLING);
        ck_assert(e.until_wall_ms == 1500 && e.at_wall_ms == 1000);
        h.kind = HISTORY_DISABLE;
        h.reason = KEY_REASON_AUTH;
        ck_assert_int_eq(cluster_event_from_history(&h, &e), 0);
        ck_assert_int_eq(e.state, KEY_DISABLED);
        h.kind = HISTORY_ENABLE;
        ck_assert_int_eq(cluster_event_from_history(&h, &e), 0);
        ck_assert_int_eq(e.state, KEY_READY);
        h.kind = HISTORY_RECOVER;               /* each host's own clock ends a rest */
        ck_assert_int_eq(cluster_event_from_history(&h, &e), -ENOENT);
        h.kind = HISTORY_ROTATE;
        ck_assert_int_eq(cluster_event_from_history(&h, &e), -ENOENT);
}
END_TEST

/* --- leased budgets ---------------------------------------------------------------------------- */

START_TEST(test_lease_slice_is_half_a_fair_share_and_at_least_one) {
        ck_assert_uint_eq(cluster_lease_slice(60, 2), 15);
        ck_assert_uint_eq(cluster_lease_slice(6, 2), 2);
        ck_assert_uint_eq(cluster_lease_slice(7, 2), 2);        /* ceil(ceil(7/2)/2) */
        ck_assert_uint_eq(cluster_lease_slice(1, 2), 1);        /* never 0 for a limit */
        ck_assert_uint_eq(cluster_lease_slice(1, 0), 1);
        ck_assert_uint_eq(cluster_lease_slice(0, 2), 0);
}
END_TEST

START_TEST(test_plan_tops_up_the_rpm_slice_ahead_of_need_and_gives_it_back_when_idle) {
        struct cluster_lease_input in = { .rpm = 60, .nodes = 2, .ready = true, .active = true };
        struct cluster_lease_plan plan;

        in.left = 0;
        cluster_lease_plan(&in, &plan);
        ck_assert_uint_eq(plan.rpm_want, 15);
        in.left = 7;                    /* half used: the next slice is asked for now */
        cluster_lease_plan(&in, &plan);
        ck_assert_uint_eq(plan.rpm_want, 8);
        in.left = 8;
        cluster_lease_plan(&in, &plan);
        ck_assert_uint_eq(plan.rpm_want, 0);
        ck_assert_uint_eq(plan.rpm_return, 0);
        in.active = false;              /* idle: nothing asked, all given back */
        cluster_lease_plan(&in, &plan);
        ck_assert_uint_eq(plan.rpm_want, 0);
        ck_assert_uint_eq(plan.rpm_return, 8);
        in.active = true;
        in.ready = false;               /* resting: likewise */
        cluster_lease_plan(&in, &plan);
        ck_assert_uint_eq(plan.rpm_return, 8);
        ck_assert_int_eq(plan.ask, -1);
        ck_assert_int_eq(plan.cap, -1);
}
END_TEST

START_TEST(test_plan_raises_slots_with_headroom_lowers_when_idle_and_yields_when_contended) {
        struct cluster_lease_input in = { .max_concurrent = 8, .nodes = 2, .ready = true, .active = true,
                                          .in_flight = 1, .slots = 1, .held = 1 };
        struct cluster_lease_plan plan;

        cluster_lease_plan(&in, &plan);
        ck_assert_int_eq(plan.ask, 3);                  /* in flight + half a fair share */
        ck_assert(plan.raise);
        ck_assert_int_eq(plan.cap, -1);
        ck_assert_uint_eq(plan.rpm_want, 0);            /* no rpm limit, no rpm ask */
        in.in_flight = 7;
        in.slots = in.held = 7;
        cluster_lease_plan(&in, &plan);
        ck_assert_int_eq(plan.ask, 8);                  /* never beyond the limit */
        in.in_flight = 1;
        in.slots = in.held = 3;
        in.active = false;                              /* idle: keep what is in flight */
        cluster_lease_plan(&in, &plan);
        ck_assert_int_eq(plan.cap, 1);
        ck_assert_int_eq(plan.ask, 1);
        ck_assert(!plan.raise);
        in.active = true;
        in.contended = true;                            /* another node waits: no new request */
        cluster_lease_plan(&in, &plan);
        ck_assert_int_eq(plan.cap, 0);
        ck_assert_int_eq(plan.ask, 1);                  /* Redis still counts the one in flight */
        ck_assert(!plan.raise);
        in.slots = 0;
        in.held = 1;
        in.in_flight = 0;                               /* it ended: the slot goes back */
        cluster_lease_plan(&in, &plan);
        ck_assert_int_eq(plan.cap, -1);
        ck_assert_int_eq(plan.ask, 0);
}
END_TEST

START_TEST(test_a_row_under_leases_serves_only_within_its_slice_and_slots) {
        struct keytable_limits lim = { .max_pools = 2, .max_keys = 4, .n_slots = 2, .leases_per_slot = 8 };
        struct keytable_outcome ok = { .cls = VERDICT_OK, .status = 200, .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_lease l1, l2, l3;
        struct keytable_lease_view v;
        struct keytable_wait w;
        struct keytable_check_report rep;
        struct keytable *t;
        unsigned p, k, slot;

        ck_assert_int_eq(keytable_create(&lim, 1000, &t), 0);
        ck_assert_int_eq(keytable_add_pool(t, "one", "m1", &p), 0);
        ck_assert_int_eq(keytable_add_key(t, p, ID_A, "sk-...aaaa", &k), 0);
        ck_assert_int_eq(keytable_slot_claim(t, 1, 1000, &slot), 0);
        keytable_cluster_init(t, "alpha");
        ck_assert_int_eq(keytable_cluster_lease_mode(t, k, true, 2, 60, 1000), 0);

        /* Nothing leased yet: the key waits as at any local limit, "busy" until a lease comes. */
        ck_assert_int_eq(keytable_acquire(t, slot, p, 1000, KEYTABLE_NO_KEY, &l1, &w, NULL), -EAGAIN);
        ck_assert(w.busy);
        ck_assert_int_eq(keytable_cluster_lease_slots(t, k, 2, false, 1000), 2);
        ck_assert_int_eq(keytable_cluster_lease_add(t, k, 1, 1000), 0);
        ck_assert_int_eq(keytable_acquire(t, slot, p, 1001, KEYTABLE_NO_KEY, &l1, NULL, NULL), 0);
        /* The slice of 1 is spent, though a slot is free. */
        ck_assert_int_eq(keytable_acquire(t, slot, p, 1002, KEYTABLE_NO_KEY, &l2, &w, NULL), -EAGAIN);
        ck_assert_int_eq(keytable_cluster_lease_add(t, k, 5, 1003), 0);
        ck_assert_int_eq(keytable_acquire(t, slot, p, 1004, KEYTABLE_NO_KEY, &l2, NULL, NULL), 0);
        /* Both slots are taken, though the slice is not spent. */
        ck_assert_int_eq(keytable_acquire(t, slot, p, 1005, KEYTABLE_NO_KEY, &l3, &w, NULL), -EAGAIN);
        ck_assert_int_eq(keytable_cluster_lease_read(t, k, &v), 0);
        ck_assert(v.on && v.ready);
        ck_assert_uint_eq(v.in_flight, 2);
        ck_assert_uint_eq(v.left, 4);
        ck_assert_uint_eq(v.requests, 2);
        ck_assert_int_eq(keytable_check(t, &rep), 0);
        ck_assert_uint_eq(rep.n_problems, 0);

        /* Lowering never goes below what is in flight when asked not to; giving back takes only
         * what is there. */
        ck_assert_int_eq(keytable_cluster_lease_slots(t, k, 0, true, 1006), 2);
        ck_assert_int_eq(keytable_cluster_lease_take(t, k, 10, 1006), 4);
        keytable_release(t, &l1, &ok, 1007, NULL);
        ck_assert_int_eq(keytable_acquire(t, slot, p, 1008, KEYTABLE_NO_KEY, &l3, NULL, NULL), -EAGAIN);

        /* Leases off: the static share serves again, and the row's lease calls are refused. */
        ck_assert_int_eq(keytable_cluster_lease_mode(t, k, false, 1, 30, 1009), 0);
        keytable_release(t, &l2, &ok, 1010, NULL);
        ck_assert_int_eq(keytable_acquire(t, slot, p, 1011, KEYTABLE_NO_KEY, &l3, NULL, NULL), 0);
        ck_assert_int_eq(keytable_cluster_lease_add(t, k, 1, 1012), -ESTALE);
        ck_assert_int_eq(keytable_check(t, &rep), 0);
        ck_assert_uint_eq(rep.n_problems, 0);
        keytable_destroy(t);
}
END_TEST

/* --- the table's side ------------------------------------------------------------------------ */

static struct keytable *table_with_two_pools(unsigned *ret_a0, unsigned *ret_a1) {
        struct keytable_limits lim = { .max_pools = 4, .max_keys = 8, .n_slots = 2, .leases_per_slot = 4 };
        struct keytable *t;
        unsigned p, k;

        ck_assert_int_eq(keytable_create(&lim, 1000, &t), 0);
        ck_assert_int_eq(keytable_add_pool(t, "one", "m1", &p), 0);
        ck_assert_int_eq(keytable_add_key(t, p, ID_A, "sk-...aaaa", ret_a0), 0);
        ck_assert_int_eq(keytable_add_key(t, p, ID_B, "sk-...bbbb", &k), 0);
        ck_assert_int_eq(keytable_add_pool(t, "two", "m2", &p), 0);
        ck_assert_int_eq(keytable_add_key(t, p, ID_A, "sk-...aaaa", ret_a1), 0);
        keytable_cluster_init(t, "alpha");
        return t;
}

static enum key_state state_of(struct keytable *t, unsigned pool, unsigned position, int64_t now,
                               int64_t *ret_until) {
        struct keytable_key_view *kv = NULL;
        enum key_state s;

        ck_assert_int_gt(keytable_pool_read_alloc(t, pool, now, NULL, &kv), (int) position);
        s = kv[position].state;
        if (ret_until)
                *ret_until = kv[position].cooldown_until_ms;
        free(kv);
        return s;
}

START_TEST(test_another_nodes_cooldown_cools_every_row_of_the_key_and_writes_no_history) {
        unsigned a0, a1;
        struct keytable *t = table_with_two_pools(&a0, &a1);
        struct keytable_event ev[4];
        char pool[KEYTABLE_NAME_MAX + 1];
        int64_t until;

        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_COOLING, KEY_REASON_RATE_LIMITED, 5000, 1000,
                                                pool), 2);
        ck_assert_str_eq(pool, "one");
        ck_assert_int_eq(state_of(t, 0, 0, 1000, &until), KEY_COOLING);
        ck_assert(until == 5000);
        ck_assert_int_eq(state_of(t, 1, 0, 1000, NULL), KEY_COOLING);
        ck_assert_int_eq(state_of(t, 0, 1, 1000, NULL), KEY_READY);
        ck_assert_uint_eq(keytable_history_read(t, ev, 4), 0);
        /* The same news again changes nothing; a shorter rest does not cut the longer one. */
        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_COOLING, KEY_REASON_RATE_LIMITED, 5000, 1000,
                                                NULL), 0);
        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_COOLING, KEY_REASON_RATE_LIMITED, 3000, 1000,
                                                NULL), 0);
        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_COOLING, KEY_REASON_RATE_LIMITED, 9000, 1000,
                                                NULL), 2);
        state_of(t, 0, 0, 1000, &until);
        ck_assert(until == 9000);
        keytable_destroy(t);
}
END_TEST

START_TEST(test_a_cooldown_does_not_undo_a_disable_but_an_enable_does) {
        unsigned a0, a1;
        struct keytable *t = table_with_two_pools(&a0, &a1);

        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_DISABLED, KEY_REASON_OPERATOR, 0, 1000, NULL), 2);
        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_COOLING, KEY_REASON_RATE_LIMITED, 9000, 1000,
                                                NULL), 0);
        ck_assert_int_eq(state_of(t, 0, 0, 1000, NULL), KEY_DISABLED);
        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_READY, KEY_REASON_NONE, 0, 1000, NULL), 2);
        ck_assert_int_eq(state_of(t, 0, 0, 1000, NULL), KEY_READY);
        /* A rest already over is no news; nonsense is refused. */
        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_COOLING, KEY_REASON_RATE_LIMITED, 900, 1000,
                                                NULL), 0);
        ck_assert_int_eq(keytable_cluster_apply(t, ID_A, KEY_DISABLED, KEY_REASON_NONE, 0, 1000, NULL), -EINVAL);
        ck_assert_int_eq(keytable_cluster_apply(t, "kp-unknown000", KEY_READY, 0, 0, 1000, NULL), 0);
        keytable_destroy(t);
}
END_TEST

START_TEST(test_history_names_the_node_and_the_cursor_sees_what_is_new) {
        unsigned a0, a1;
        struct keytable *t = table_with_two_pools(&a0, &a1);
        struct keytable_event mine = { .kind = HISTORY_DISABLE, .pool = "one", .key_from = ID_A,
                                       .reason = KEY_REASON_OPERATOR };
        struct keytable_event theirs = mine, ev[4];
        uint64_t lost = 1;

        ck_assert(keytable_cluster_cursor(t) == 0);
        snprintf(theirs.node, sizeof theirs.node, "beta");
        keytable_history_add(t, &mine);
        keytable_history_add(t, &theirs);
        ck_assert(keytable_history_seq(t) == 2);
        ck_assert_uint_eq(keytable_history_since(t, 0, ev, 4, &lost), 2);
        ck_assert(lost == 0);
        ck_assert_str_eq(ev[0].node, "alpha");
        ck_assert_str_eq(ev[1].node, "beta");
        ck_assert_uint_eq(keytable_history_since(t, 1, ev, 4, NULL), 1);
        ck_assert(ev[0].seq == 2);
        keytable_cluster_set_cursor(t, 2);
        ck_assert(keytable_cluster_cursor(t) == 2);
        ck_assert_uint_eq(keytable_history_since(t, 2, ev, 4, NULL), 0);
        keytable_destroy(t);
}
END_TEST

START_TEST(test_link_nodes_and_usage_are_kept_for_the_readers) {
        unsigned a0, a1;
        struct keytable *t = table_with_two_pools(&a0, &a1);
        struct keytable_cluster_view *v = malloc(sizeof *v);
        struct keytable_node nodes[2] = { { .name = "alpha", .requests = 3 }, { .name = "beta", .requests = 2 } };
        struct keytable_usage u = { .requests = 7, .tokens_in = 70 }, got;

        keytable_cluster_read(t, v);
        ck_assert(v->enabled && !v->connected);
        ck_assert_str_eq(v->node, "alpha");
        keytable_cluster_set_link(t, true, 2, 123);
        keytable_cluster_set_nodes(t, nodes, 2);
        keytable_cluster_read(t, v);
        ck_assert(v->connected);
        ck_assert_uint_eq(v->live_nodes, 2);
        ck_assert_uint_eq(v->n_nodes, 2);
        ck_assert_str_eq(v->nodes[1].name, "beta");
        ck_assert_int_eq(keytable_cluster_set_usage(t, 1, 0, &u), 0);
        ck_assert_int_eq(keytable_cluster_usage(t, a1, &got), 0);
        ck_assert(got.requests == 7 && got.tokens_in == 70);
        ck_assert_int_eq(keytable_cluster_usage(t, a0, &got), 0);
        ck_assert(got.requests == 0);
        ck_assert_int_eq(keytable_cluster_set_usage(t, 1, 5, &u), -EINVAL);
        free(v);
        keytable_destroy(t);
}
END_TEST

/* --- cluster = { … } ----------------------------------------------------------------------- */

static int load(const char *cluster, struct config **ret, struct config_diag *diag) {
        char dir[] = "/tmp/check_cluster-XXXXXX", path[64];
        FILE *f;
        int r;

        ck_assert_ptr_nonnull(mkdtemp(dir));
        snprintf(path, sizeof path, "%s/keypool.conf", dir);
        f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        fprintf(f, "state_file = \"\";\nproviders = ( { name = \"p\"; base_url = \"http://127.0.0.1:9\"; } );\n"
                   "pools = ( { name = \"one\"; provider = \"p\"; model = \"m\"; keys = [ \"sk-fake-cluster-0001\" ]; } );\n"
                   "%s\n", cluster);
        fclose(f);
        r = config_load(path, ret, diag);
        unlink(path);
        rmdir(dir);
        return r;
}

START_TEST(test_config_reads_a_unix_socket_and_defaults_the_rest) {
        struct config *c = NULL;
        char host[256] = "";

        ck_assert_int_eq(load("cluster = { redis = \"unix:/run/redis/redis.sock\"; };", &c, NULL), 0);
        ck_assert_ptr_nonnull(c->cluster);
        ck_assert_str_eq(c->cluster->redis_path, "/run/redis/redis.sock");
        ck_assert_str_eq(c->cluster->prefix, "keypool:");
        gethostname(host, sizeof host - 1);
        host[strcspn(host, ".")] = '\0';
        ck_assert_int_eq(strncmp(c->cluster->node, host, 63), 0);
        ck_assert_ptr_null(c->cluster->password);
        config_free(c);
}
END_TEST

START_TEST(test_config_reads_a_redis_url_and_no_group_means_a_single_host) {
        struct config *c = NULL;

        ck_assert_int_eq(load("cluster = { redis = \"redis://10.0.0.5:6380/2\"; node = \"web-1\"; prefix = \"kp:\"; };",
                              &c, NULL), 0);
        ck_assert_str_eq(c->cluster->redis_host, "10.0.0.5");
        ck_assert_uint_eq(c->cluster->redis_port, 6380);
        ck_assert_uint_eq(c->cluster->redis_db, 2);
        ck_assert_str_eq(c->cluster->node, "web-1");
        ck_assert_str_eq(c->cluster->prefix, "kp:");
        config_free(c);
        ck_assert_int_eq(load("", &c, NULL), 0);
        ck_assert_ptr_null(c->cluster);
        config_free(c);
}
END_TEST

START_TEST(test_config_rejects_bad_cluster_settings_with_a_line) {
        static const char *const bad[] = {
                "cluster = { };",
                "cluster = { redis = \"tcp://x\"; };",
                "cluster = { redis = \"unix:relative.sock\"; };",
                "cluster = { redis = \"redis://host:0\"; };",
                "cluster = { redis = \"redis://host:6379/99\"; };",
                "cluster = { redis = \"redis://:6379\"; };",
                "cluster = { redis = \"unix:/r.sock\"; node = \"bad name\"; };",
                "cluster = { redis = \"unix:/r.sock\"; colour = \"blue\"; };",
                "cluster = { redis = \"unix:/r.sock\"; password = \"env:KP_CHECK_NO_SUCH_VAR\"; };",
                "cluster = \"unix:/r.sock\";",
        };

        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
                struct config_diag diag = { 0 };
                struct config *c = NULL;

                ck_assert_msg(load(bad[i], &c, &diag) == -EINVAL, "'%s' should be refused", bad[i]);
                ck_assert_msg(diag.n > 0 && strstr(diag.messages[0], "keypool.conf:"),
                              "'%s': a message with the file", bad[i]);
                config_diag_clear(&diag);
        }
}
END_TEST

static Suite *cluster_suite(void) {
        Suite *s = suite_create("cluster");
        TCase *tc = tcase_create("pure");

        tcase_add_test(tc, test_share_divides_a_limit_by_the_live_nodes_and_never_reaches_zero);
        tcase_add_test(tc, test_event_message_round_trips);
        tcase_add_test(tc, test_garbage_messages_are_refused);
        tcase_add_test(tc, test_lease_slice_is_half_a_fair_share_and_at_least_one);
        tcase_add_test(tc, test_plan_tops_up_the_rpm_slice_ahead_of_need_and_gives_it_back_when_idle);
        tcase_add_test(tc, test_plan_raises_slots_with_headroom_lowers_when_idle_and_yields_when_contended);
        tcase_add_test(tc, test_only_cooldowns_disables_and_enables_are_shared);
        suite_add_tcase(s, tc);
        tc = tcase_create("table");
        tcase_add_test(tc, test_another_nodes_cooldown_cools_every_row_of_the_key_and_writes_no_history);
        tcase_add_test(tc, test_a_cooldown_does_not_undo_a_disable_but_an_enable_does);
        tcase_add_test(tc, test_history_names_the_node_and_the_cursor_sees_what_is_new);
        tcase_add_test(tc, test_link_nodes_and_usage_are_kept_for_the_readers);
        tcase_add_test(tc, test_a_row_under_leases_serves_only_within_its_slice_and_slots);
        suite_add_tcase(s, tc);
        tc = tcase_create("config");
        tcase_add_test(tc, test_config_reads_a_unix_socket_and_defaults_the_rest);
        tcase_add_test(tc, test_config_reads_a_redis_url_and_no_group_means_a_single_host);
        tcase_add_test(tc, test_config_rejects_bad_cluster_settings_with_a_line);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(cluster_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
