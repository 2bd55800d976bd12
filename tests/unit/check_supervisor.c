/* check_supervisor.c — the coordinator's decisions: which state follows which facts, how a stop
 * escalates and how long it may take, and how a worker that keeps dying is respawned. */
#include <check.h>
#include <signal.h>
#include <stdlib.h>

#include "keypool/supervisor.h"

#define N(a) (sizeof (a) / sizeof (a)[0])

struct transition {
        const char *why;
        struct supervisor_facts facts;
        enum supervisor_state want;
};

static void check_transitions(const struct transition *t, size_t n) {
        for (size_t i = 0; i < n; i++) {
                enum supervisor_state got = supervisor_next_state(&t[i].facts);

                ck_assert_msg(got == t[i].want, "%s: from %s expected %s, got %s", t[i].why,
                              supervisor_state_to_string(t[i].facts.state),
                              supervisor_state_to_string(t[i].want), supervisor_state_to_string(got));
        }
}

START_TEST(test_a_coordinator_that_has_not_started_starts)
{
        static const struct transition t[] = {
                { "first advance", { .state = 0 }, SUPERVISOR_STARTING },
                /* Logged as starting before it is logged as stopping. */
                { "stop asked before the first advance", { .state = 0, .stop_signal = SIGTERM },
                  SUPERVISOR_STARTING },
        };

        check_transitions(t, N(t));
}
END_TEST

START_TEST(test_starting_and_reloading_become_running_once_the_newest_generation_serves)
{
        static const struct transition t[] = {
                { "workers not all accepting yet", { SUPERVISOR_STARTING, 0, false, 3 }, SUPERVISOR_STARTING },
                { "every worker accepts", { SUPERVISOR_STARTING, 0, true, 3 }, SUPERVISOR_RUNNING },
                { "new generation not all accepting yet", { SUPERVISOR_RELOADING, 0, false, 6 },
                  SUPERVISOR_RELOADING },
                { "new generation accepts", { SUPERVISOR_RELOADING, 0, true, 6 }, SUPERVISOR_RUNNING },
        };

        check_transitions(t, N(t));
}
END_TEST

START_TEST(test_a_generation_that_has_yet_to_serve_takes_running_into_reloading)
{
        static const struct transition t[] = {
                { "nothing happened", { SUPERVISOR_RUNNING, 0, true, 3 }, SUPERVISOR_RUNNING },
                { "a worker died: still running", { SUPERVISOR_RUNNING, 0, true, 2 }, SUPERVISOR_RUNNING },
                { "a reload put a new generation in place", { SUPERVISOR_RUNNING, 0, false, 3 },
                  SUPERVISOR_RELOADING },
        };

        check_transitions(t, N(t));
}
END_TEST

START_TEST(test_a_stop_request_wins_over_every_state_before_stopping)
{
        static const struct transition t[] = {
                { "SIGTERM while starting", { SUPERVISOR_STARTING, SIGTERM, false, 3 }, SUPERVISOR_STOPPING },
                { "SIGTERM as the workers serve", { SUPERVISOR_STARTING, SIGTERM, true, 3 },
                  SUPERVISOR_STOPPING },
                { "SIGINT while running", { SUPERVISOR_RUNNING, SIGINT, true, 3 }, SUPERVISOR_STOPPING },
                { "SIGQUIT while reloading", { SUPERVISOR_RELOADING, SIGQUIT, false, 6 }, SUPERVISOR_STOPPING },
                { "stop with no worker alive goes through stopping",
                  { SUPERVISOR_RUNNING, SIGTERM, true, 0 }, SUPERVISOR_STOPPING },
        };

        check_transitions(t, N(t));
}
END_TEST

START_TEST(test_stopping_ends_only_when_no_worker_of_any_generation_lives)
{
        static const struct transition t[] = {
                { "workers still draining", { SUPERVISOR_STOPPING, SIGTERM, true, 2 }, SUPERVISOR_STOPPING },
                { "the last worker exited", { SUPERVISOR_STOPPING, SIGTERM, true, 0 }, SUPERVISOR_STOPPED },
                { "stopped while the newest generation never served",
                  { SUPERVISOR_STOPPING, SIGQUIT, false, 0 }, SUPERVISOR_STOPPED },
        };

        check_transitions(t, N(t));
}
END_TEST

START_TEST(test_stopped_is_final)
{
        static const struct transition t[] = {
                { "another signal", { SUPERVISOR_STOPPED, SIGQUIT, false, 0 }, SUPERVISOR_STOPPED },
                { "a generation serving", { SUPERVISOR_STOPPED, SIGTERM, true, 0 }, SUPERVISOR_STOPPED },
        };

        check_transitions(t, N(t));
}
END_TEST

START_TEST(test_a_stop_with_no_worker_left_reaches_stopped_in_two_logged_steps)
{
        struct supervisor_facts f = { SUPERVISOR_RUNNING, SIGTERM, true, 0 };
        enum supervisor_state seen[4];
        unsigned steps = 0;

        for (;;) {
                enum supervisor_state next = supervisor_next_state(&f);

                if (next == f.state)
                        break;
                ck_assert_msg(steps < N(seen), "the state never stays put");
                seen[steps++] = next;
                f.state = next;
        }
        ck_assert_uint_eq(steps, 2);
        ck_assert_msg(seen[0] == SUPERVISOR_STOPPING && seen[1] == SUPERVISOR_STOPPED,
                      "expected running → stopping → stopped, got → %s → %s",
                      supervisor_state_to_string(seen[0]), supervisor_state_to_string(seen[1]));
}
END_TEST

START_TEST(test_a_harder_stop_signal_escalates_and_sigterm_or_a_repeat_changes_nothing)
{
        static const struct {
                int stopping, sig;
                bool takes_over;
        } t[] = {
                { 0, SIGTERM, true },
                { 0, SIGINT, true },
                { 0, SIGQUIT, true },
                { SIGTERM, SIGTERM, false },
                { SIGTERM, SIGINT, true },
                { SIGTERM, SIGQUIT, true },
                { SIGINT, SIGTERM, false },
                { SIGINT, SIGINT, false },
                { SIGINT, SIGQUIT, true },
                { SIGQUIT, SIGTERM, false },
                { SIGQUIT, SIGQUIT, false },
        };

        for (size_t i = 0; i < N(t); i++)
                ck_assert_msg(supervisor_stop_takes_over(t[i].stopping, t[i].sig) == t[i].takes_over,
                              "stopping by signal %d, then signal %d: expected %s", t[i].stopping, t[i].sig,
                              t[i].takes_over ? "it to take over" : "no change");
}
END_TEST

START_TEST(test_workers_get_shutdown_timeout_on_sigterm_5s_on_sigint_1s_on_sigquit)
{
        static const struct {
                int sig;
                unsigned shutdown_timeout;
                uint64_t usec;
        } t[] = {
                { SIGTERM, 30, 30000000 },
                { SIGTERM, 0, 0 },
                { SIGINT, 30, 5000000 },
                { SIGQUIT, 30, 1000000 },
        };

        for (size_t i = 0; i < N(t); i++)
                ck_assert_msg(supervisor_stop_deadline_usec(t[i].sig, t[i].shutdown_timeout) == t[i].usec,
                              "signal %d, shutdown_timeout %u: expected %llu µs", t[i].sig,
                              t[i].shutdown_timeout, (unsigned long long) t[i].usec);
}
END_TEST

START_TEST(test_respawn_waits_nothing_first_then_doubles_from_100ms_up_to_10s)
{
        static const struct {
                unsigned crashes;
                uint64_t ms;
        } t[] = {
                { 0, 0 }, { 1, 100 }, { 2, 200 }, { 3, 400 }, { 4, 800 }, { 5, 1600 }, { 6, 3200 },
                { 7, 6400 }, { 8, 10000 }, { 9, 10000 }, { 40, 10000 }, { 4000000000u, 10000 },
        };

        for (size_t i = 0; i < N(t); i++)
                ck_assert_msg(supervisor_respawn_delay_ms(t[i].crashes) == t[i].ms,
                              "%u crashes in a row: expected %llu ms, got %llu", t[i].crashes,
                              (unsigned long long) t[i].ms,
                              (unsigned long long) supervisor_respawn_delay_ms(t[i].crashes));
}
END_TEST

START_TEST(test_only_a_quick_death_of_its_own_counts_as_a_crash)
{
        static const struct {
                const char *why;
                unsigned crashes;
                int64_t lived_ms;
                bool killed_wedged;
                unsigned want;
        } t[] = {
                { "died at once", 0, 10, false, 1 },
                { "died at once again", 3, 1999, false, 4 },
                { "lived 2 s: its history is forgiven", 3, 2000, false, 0 },
                { "lived long", 5, 3600000, false, 0 },
                { "killed by us for a stale heartbeat", 3, 10, true, 0 },
        };

        for (size_t i = 0; i < N(t); i++)
                ck_assert_msg(supervisor_crashes_after_exit(t[i].crashes, t[i].lived_ms, t[i].killed_wedged) ==
                              t[i].want, "%s: expected %u crashes in a row", t[i].why, t[i].want);
}
END_TEST

static Suite *supervisor_suite(void) {
        Suite *s = suite_create("supervisor");
        TCase *states = tcase_create("states"), *stop = tcase_create("stop"), *respawn = tcase_create("respawn");

        tcase_add_test(states, test_a_coordinator_that_has_not_started_starts);
        tcase_add_test(states, test_starting_and_reloading_become_running_once_the_newest_generation_serves);
        tcase_add_test(states, test_a_generation_that_has_yet_to_serve_takes_running_into_reloading);
        tcase_add_test(states, test_a_stop_request_wins_over_every_state_before_stopping);
        tcase_add_test(states, test_stopping_ends_only_when_no_worker_of_any_generation_lives);
        tcase_add_test(states, test_stopped_is_final);
        tcase_add_test(states, test_a_stop_with_no_worker_left_reaches_stopped_in_two_logged_steps);
        tcase_add_test(stop, test_a_harder_stop_signal_escalates_and_sigterm_or_a_repeat_changes_nothing);
        tcase_add_test(stop, test_workers_get_shutdown_timeout_on_sigterm_5s_on_sigint_1s_on_sigquit);
        tcase_add_test(respawn, test_respawn_waits_nothing_first_then_doubles_from_100ms_up_to_10s);
        tcase_add_test(respawn, test_only_a_quick_death_of_its_own_counts_as_a_crash);
        suite_add_tcase(s, states);
        suite_add_tcase(s, stop);
        suite_add_tcase(s, respawn);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(supervisor_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
