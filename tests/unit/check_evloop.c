/* check_evloop.c — one epoll set for a worker's sockets, and the work that follows their events:
 * deferred work runs after the batch that caused it, in the same loop iteration, for a bounded
 * number of rounds; work may cancel other work; work deferred outside a batch still runs. A batch
 * ends at a time budget (on a clock the tests set): the events it had no time for are handled,
 * once each, by the next; the next batch takes as many as fitted; cheap batches stay whole. */
#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "keypool/evloop.h"

struct task {
        struct ev_defer d;              /* first */
        struct evloop *l;
        unsigned runs;
        unsigned requeue;               /* defer itself again this many times */
        struct task *cancel;            /* cancel this one when run */
        struct task *defer;             /* defer this one when run */
        unsigned *order;                /* where to write its run's sequence number */
};

struct sock {
        struct ev_watch w;              /* first */
        int fd;
        unsigned events;
        struct task *defer;             /* deferred on each event */
        uint64_t cost;                  /* µs the fake clock moves on each event */
};

static unsigned seq;
static uint64_t fake_now;               /* µs, when a test sets the fake clock */
static uint64_t task_cost;              /* µs the fake clock moves on each task run */

static uint64_t fake_clock(void *userdata) {
        return fake_now;
}

static void task_run(struct ev_defer *d) {
        struct task *t = (struct task *) d;

        t->runs++;
        fake_now += task_cost;
        if (t->order)
                *t->order = ++seq;
        if (t->cancel)
                evloop_cancel(t->l, &t->cancel->d);
        if (t->defer)
                evloop_defer(t->l, &t->defer->d);
        if (t->requeue > 0) {
                t->requeue--;
                evloop_defer(t->l, &t->d);
        }
}

static void sock_event(struct ev_watch *w, uint32_t events) {
        struct sock *s = (struct sock *) w;
        char buf[64];

        s->events++;
        fake_now += s->cost;
        (void) !read(s->fd, buf, sizeof buf);
        if (s->defer)
                evloop_defer(s->defer->l, &s->defer->d);
}

static sd_event *E;
static struct evloop *L;
static int sv[2];

static void setup(void) {
        seq = 0;
        fake_now = 1000000;
        task_cost = 0;
        ck_assert_int_ge(sd_event_new(&E), 0);
        ck_assert_int_eq(evloop_new(E, &L), 0);
        ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

static void teardown(void) {
        evloop_free(L);
        sd_event_unref(E);
        close(sv[0]);
        close(sv[1]);
}

static struct task task(void) {
        return (struct task) { .d.run = task_run, .l = L };
}

START_TEST(test_work_a_socket_event_defers_runs_in_the_same_iteration) {
        struct task t = task();
        struct sock s = { .w.on_event = sock_event, .fd = sv[0], .defer = &t };

        ck_assert_int_eq(evloop_add(L, sv[0], EPOLLIN, &s.w), 0);
        ck_assert_int_eq(write(sv[1], "x", 1), 1);
        ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_uint_eq(s.events, 1);
        ck_assert_uint_eq(t.runs, 1);
}
END_TEST

START_TEST(test_work_deferred_by_work_runs_in_a_later_round_of_the_same_iteration) {
        struct task second = task(), first = task();
        struct sock s = { .w.on_event = sock_event, .fd = sv[0], .defer = &first };
        unsigned first_at = 0, second_at = 0;

        first.defer = &second;
        first.order = &first_at;
        second.order = &second_at;
        ck_assert_int_eq(evloop_add(L, sv[0], EPOLLIN, &s.w), 0);
        ck_assert_int_eq(write(sv[1], "x", 1), 1);
        ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_uint_eq(second.runs, 1);
        ck_assert_uint_lt(first_at, second_at);
}
END_TEST

START_TEST(test_work_cancelled_by_earlier_work_does_not_run_and_the_rest_still_does) {
        struct task a = task(), b = task(), c = task();

        a.cancel = &b;
        evloop_defer(L, &a.d);
        evloop_defer(L, &b.d);
        evloop_defer(L, &c.d);
        ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_uint_eq(a.runs, 1);
        ck_assert_uint_eq(b.runs, 0);
        ck_assert_uint_eq(c.runs, 1);
        /* b can be deferred again: its cancellation left it out of the queue, not stuck in it. */
        evloop_defer(L, &b.d);
        ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_uint_eq(b.runs, 1);
}
END_TEST

START_TEST(test_work_deferred_outside_a_batch_runs) {
        struct task t = task();

        evloop_defer(L, &t.d);
        evloop_defer(L, &t.d);          /* once, however often it is deferred */
        ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_uint_eq(t.runs, 1);
        ck_assert_int_eq(sd_event_run(E, 0), 0);        /* nothing left */
}
END_TEST

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        (*(unsigned *) userdata)++;
        return 0;
}

START_TEST(test_work_that_keeps_deferring_itself_cannot_hold_the_loop) {
        struct task t = task();
        unsigned fired = 0;
        sd_event_source *timer = NULL;

        t.requeue = 1000000;
        ck_assert_int_ge(sd_event_add_time_relative(E, &timer, CLOCK_MONOTONIC, 0, 1, on_timer, &fired), 0);
        evloop_defer(L, &t.d);
        for (int i = 0; i < 100 && fired == 0; i++)
                ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_uint_eq(fired, 1);
        /* Bounded per iteration: far from the million it asked for. */
        ck_assert_uint_lt(t.runs, 1000);
        evloop_cancel(L, &t.d);
        sd_event_source_unref(timer);
}
END_TEST

/* Sockets with a byte to read each, watched by s[i]; their other ends closed by close_pairs. */
#define N_PAIRS 12
static int pairs[N_PAIRS][2];

static void ready_socks(struct sock *s, unsigned n, uint64_t cost, struct task *defer) {
        for (unsigned i = 0; i < n; i++) {
                ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pairs[i]), 0);
                s[i] = (struct sock) { .w.on_event = sock_event, .fd = pairs[i][0], .cost = cost, .defer = defer };
                ck_assert_int_eq(evloop_add(L, pairs[i][0], EPOLLIN, &s[i].w), 0);
                ck_assert_int_eq(write(pairs[i][1], "x", 1), 1);
        }
}

static void close_pairs(unsigned n) {
        for (unsigned i = 0; i < n; i++) {
                close(pairs[i][0]);
                close(pairs[i][1]);
        }
}

static unsigned events_of(const struct sock *s, unsigned n) {
        unsigned sum = 0;

        for (unsigned i = 0; i < n; i++)
                sum += s[i].events;
        return sum;
}

START_TEST(test_a_batch_out_of_time_leaves_its_other_events_to_the_next_once_each) {
        struct sock s[3];
        struct task t = task();

        /* Each event alone costs more than a batch's budget (10 s). */
        evloop_set_clock(L, fake_clock, NULL);
        ready_socks(s, 3, 10000000, &t);
        for (unsigned step = 1; step <= 3; step++) {
                ck_assert_int_gt(sd_event_run(E, 1000000), 0);
                ck_assert_msg(events_of(s, 3) == step, "step %u: %u events handled, expected %u", step,
                              events_of(s, 3), step);
                /* The work an event deferred ran in its batch, cut short or not. */
                ck_assert_uint_eq(t.runs, step);
        }
        for (unsigned i = 0; i < 3; i++)
                ck_assert_msg(s[i].events == 1, "socket %u handled %u times, expected once", i, s[i].events);
        ck_assert_int_eq(sd_event_run(E, 0), 0);        /* nothing left, nothing lost */
        close_pairs(3);
}
END_TEST

START_TEST(test_batches_that_cost_nothing_take_every_ready_event_at_once) {
        struct sock s[N_PAIRS];

        evloop_set_clock(L, fake_clock, NULL);
        ready_socks(s, N_PAIRS, 0, NULL);
        ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_uint_eq(events_of(s, N_PAIRS), N_PAIRS);
        close_pairs(N_PAIRS);
}
END_TEST

START_TEST(test_follow_up_work_over_budget_shrinks_the_next_batch_until_batches_are_cheap_again) {
        struct sock s[N_PAIRS];
        struct task t = task();
        unsigned before;

        /* The events are free, the one piece of work they defer is not: 4 events' batch costs
         * ten times any budget, so the next batch takes fewer. */
        evloop_set_clock(L, fake_clock, NULL);
        ready_socks(s, 4, 0, &t);
        task_cost = 10000000;
        ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_uint_eq(events_of(s, 4), 4);          /* the first cut cannot see that cost */
        close_pairs(4);

        ready_socks(s, N_PAIRS, 0, &t);
        ck_assert_int_gt(sd_event_run(E, 1000000), 0);
        ck_assert_msg(events_of(s, N_PAIRS) == 1, "%u events after an expensive batch, expected 1",
                      events_of(s, N_PAIRS));
        /* Once follow-up work is cheap (from the batch after that one's), each batch may take a
         * quarter more than the last (and one). */
        task_cost = 0;
        before = events_of(s, N_PAIRS);
        for (unsigned i = 0, expect[] = { 1, 2, 3, 4 }; i < 4; i++) {
                ck_assert_int_gt(sd_event_run(E, 1000000), 0);
                ck_assert_msg(events_of(s, N_PAIRS) - before == expect[i], "%u events in a batch, expected %u",
                              events_of(s, N_PAIRS) - before, expect[i]);
                before = events_of(s, N_PAIRS);
        }
        close_pairs(N_PAIRS);
}
END_TEST

START_TEST(test_a_watch_that_is_not_level_triggered_is_refused) {
        struct sock s = { .w.on_event = sock_event, .fd = sv[0] };

        ck_assert_int_eq(evloop_add(L, sv[0], EPOLLIN | EPOLLET, &s.w), -EINVAL);
        ck_assert_int_eq(evloop_add(L, sv[0], EPOLLIN | EPOLLONESHOT, &s.w), -EINVAL);
        ck_assert_int_eq(evloop_add(L, sv[0], EPOLLIN, &s.w), 0);
        ck_assert_int_eq(evloop_mod(L, sv[0], EPOLLIN | EPOLLET, &s.w), -EINVAL);
}
END_TEST

static Suite *evloop_suite(void) {
        Suite *s = suite_create("evloop");
        TCase *tc = tcase_create("core");

        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_work_a_socket_event_defers_runs_in_the_same_iteration);
        tcase_add_test(tc, test_work_deferred_by_work_runs_in_a_later_round_of_the_same_iteration);
        tcase_add_test(tc, test_work_cancelled_by_earlier_work_does_not_run_and_the_rest_still_does);
        tcase_add_test(tc, test_work_deferred_outside_a_batch_runs);
        tcase_add_test(tc, test_work_that_keeps_deferring_itself_cannot_hold_the_loop);
        tcase_add_test(tc, test_a_batch_out_of_time_leaves_its_other_events_to_the_next_once_each);
        tcase_add_test(tc, test_batches_that_cost_nothing_take_every_ready_event_at_once);
        tcase_add_test(tc, test_follow_up_work_over_budget_shrinks_the_next_batch_until_batches_are_cheap_again);
        tcase_add_test(tc, test_a_watch_that_is_not_level_triggered_is_refused);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(evloop_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
