/* clock.h — the two clocks keypool reads, in milliseconds (monotonic also in µs).
 *
 * Monotonic time is what the shared table keeps (cooldowns, heartbeats): every process on the
 * machine reads the same CLOCK_MONOTONIC, and wall-clock jumps cannot shorten a cooldown. Wall
 * time is only for turning provider timestamps (HTTP-dates, epoch resets) into durations.
 */
#pragma once

#include <stdint.h>
#include <time.h>

static inline int64_t clock_mono_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* For timing work of a few µs to ms: the event loop's steps. */
static inline uint64_t clock_mono_us(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}

static inline int64_t clock_wall_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
