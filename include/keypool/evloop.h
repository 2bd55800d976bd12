/* evloop.h — a worker's sockets in one epoll set, and the work that follows their events.
 *
 * sd-event dispatches one source per loop iteration and polls before each. A proxied request
 * touches a client socket, an upstream socket and three kinds of follow-up work (the client's
 * next request or flush, curl's "act now", the proxy's queues); as separate sources each of
 * those cost an iteration of its own — a poll, a dispatch, often a timer update — per request.
 * Here every client and upstream socket of a worker is in one epoll set, watched by sd-event as
 * one source: a wake-up handles a batch of ready sockets of either kind, then runs the deferred
 * work they caused, round after round (bounded) until none is left, all in one iteration.
 * Work deferred from outside a batch (a timer, a signal) runs from one deferred source.
 *
 * A batch is also bounded in time, so that ready work never waits long behind one (evloop.c):
 * events a batch had no time for are reported again later, which is why every watch must be
 * level-triggered.
 *
 * It knows nothing of HTTP or curl: a watch is a callback, a deferral a callback.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <systemd/sd-event.h>

struct evloop;

/* Embedded in whatever owns a socket; epoll's data points at it. */
struct ev_watch {
        void (*on_event)(struct ev_watch *w, uint32_t events);
};

/* Embedded in whatever has follow-up work; queued at most once until it runs. */
struct ev_defer {
        void (*run)(struct ev_defer *d);
        struct ev_defer *next;
        bool due;
};

int evloop_new(sd_event *e, struct evloop **ret);
void evloop_free(struct evloop *l);
sd_event *evloop_event(const struct evloop *l);

/* epoll_ctl on the set: add, change or remove fd (0 or a negative errno; -EINVAL for EPOLLET,
 * EPOLLONESHOT or EPOLLEXCLUSIVE: a watch must be level-triggered). Removing is not needed
 * before close. Events of a watch whose fd left the set earlier in a batch may still arrive in
 * that batch: owners free what a watch points into only from deferred work (see http.c). */
int evloop_add(struct evloop *l, int fd, uint32_t events, struct ev_watch *w);
int evloop_mod(struct evloop *l, int fd, uint32_t events, struct ev_watch *w);
int evloop_del(struct evloop *l, int fd);

/* Runs d->run after the current batch (or in the next iteration, when called outside one). */
void evloop_defer(struct evloop *l, struct ev_defer *d);
/* Takes d out of the queue, if it is in it (before its owner frees it). */
void evloop_cancel(struct evloop *l, struct ev_defer *d);

/* The clock (monotonic µs) a batch's time is measured on: CLOCK_MONOTONIC unless a test sets
 * its own. */
void evloop_set_clock(struct evloop *l, uint64_t (*now_usec)(void *userdata), void *userdata);
