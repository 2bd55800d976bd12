/* loop_wait.h — the unit suites' way of waiting on a real sd-event loop.
 *
 * A test waits for a condition, with a bound, by running the loop (RUN_UNTIL), or until the loop
 * has nothing ready (run_idle); never with a sleep, which is either too short on a loaded machine
 * or wasted time on an idle one.
 */
#pragma once

#include <check.h>
#include <stdint.h>
#include <time.h>

#include <systemd/sd-event.h>

#define LOOP_WAIT_USEC  (10 * 1000000ULL)       /* bound on any wait for a condition */

static inline uint64_t loop_now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}

/* Runs the loop until cond holds; fails the test if it does not within LOOP_WAIT_USEC. */
#define RUN_UNTIL(event, cond) do {                                                             \
                uint64_t end_ = loop_now_usec() + LOOP_WAIT_USEC;                               \
                while (!(cond)) {                                                               \
                        ck_assert_msg(loop_now_usec() < end_, "timed out waiting for: %s", #cond); \
                        ck_assert_int_ge(sd_event_run((event), 50000), 0);                      \
                }                                                                               \
        } while (0)

/* Runs the loop until nothing is ready; fails if it keeps finding work (a source that stays
 * ready for ever would make a worker spin). */
static inline void run_idle(sd_event *event) {
        for (int i = 0; i < 10000; i++) {
                int r = sd_event_run(event, 0);

                ck_assert_int_ge(r, 0);
                if (r == 0)
                        return;
        }
        ck_abort_msg("the loop never went idle");
}
