/* evloop.c — a worker's sockets in one epoll set, and the work that follows their events.
 *
 * Owns the epoll set and the queue of deferred work; see evloop.h for why. A step is one
 * epoll_wait of up to batch_max events; the deferred work they caused runs right after them, for
 * at most DEFER_ROUNDS rounds (work queued by a round runs in the next one), so that work which
 * keeps queueing itself cannot hold the loop: what is left runs from the deferred source, at idle
 * priority, once sd-event has dispatched whatever else is due (timers, signals), or after the
 * next step's events.
 *
 * A step also ends at a time budget, STEP_BUDGET_USEC: events are handled before anything else
 * runs, so a step's length is how long ready work waits behind it (the loop's lag). The budget
 * ends a step early in two ways. Events left when it runs out are dropped unhandled: every watch
 * is level-triggered (evloop_add refuses others), so the kernel reports each again, as it then
 * is, to a later step. And the batch follows what the steps cost: a step over the budget sets the
 * next one's batch to the events that would have fit at its cost per event, follow-up work
 * included (curl starts new transfers in one call after the batch, which the first cut cannot
 * see); a step under half of it grows the batch again by a quarter, up to EVENT_BATCH (slowly:
 * during a ramp of new streams the costly steps come between cheap ones, and doubling after each
 * cheap one undid every cut). Cheap steps thus keep their full batch, and so the epoll_wait calls
 * it saves.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "keypool/clock.h"
#include "keypool/evloop.h"

/* At most this many events per step: one epoll_wait for a busy loop's whole round of sockets
 * when events are cheap (a proxied request costs a few µs of each). */
#define EVENT_BATCH     64
#define DEFER_ROUNDS    8
/* Issue #12 asks for a lag p99 of 5 ms; a step may overrun its budget by the event or the
 * round of deferred work that crossed it, and two workers may share a CPU. */
#define STEP_BUDGET_USEC 2000

struct evloop {
        sd_event *event;
        int epoll_fd;
        sd_event_source *source;        /* epoll_fd readable: sockets are ready */
        sd_event_source *later;         /* deferred work queued outside a batch, or left over */
        struct ev_defer *head, **tail;  /* the due work, in the order it was deferred */
        unsigned n_due;
        bool in_batch;
        unsigned batch_max;             /* events taken by the next step, 1 to EVENT_BATCH */
        uint64_t (*now_usec)(void *userdata);
        void *clock_userdata;
};

static uint64_t mono_usec(void *userdata) {
        return clock_mono_us();
}

void evloop_set_clock(struct evloop *l, uint64_t (*now_usec)(void *userdata), void *userdata) {
        l->now_usec = now_usec;
        l->clock_userdata = userdata;
}

static uint64_t elapsed(const struct evloop *l, uint64_t start) {
        uint64_t now = l->now_usec(l->clock_userdata);

        return now > start ? now - start : 0;
}

sd_event *evloop_event(const struct evloop *l) {
        return l->event;
}

static int ctl(struct evloop *l, int op, int fd, uint32_t events, struct ev_watch *w) {
        struct epoll_event ev = { .events = events, .data.ptr = w };

        return epoll_ctl(l->epoll_fd, op, fd, &ev) < 0 ? -errno : 0;
}

/* A step may leave events it was given unhandled (see the top): only a level-triggered watch is
 * reported again. */
#define NOT_LEVEL_TRIGGERED (EPOLLET | EPOLLONESHOT | EPOLLEXCLUSIVE)

int evloop_add(struct evloop *l, int fd, uint32_t events, struct ev_watch *w) {
        if (events & NOT_LEVEL_TRIGGERED)
                return -EINVAL;
        return ctl(l, EPOLL_CTL_ADD, fd, events, w);
}

int evloop_mod(struct evloop *l, int fd, uint32_t events, struct ev_watch *w) {
        if (events & NOT_LEVEL_TRIGGERED)
                return -EINVAL;
        return ctl(l, EPOLL_CTL_MOD, fd, events, w);
}

int evloop_del(struct evloop *l, int fd) {
        return ctl(l, EPOLL_CTL_DEL, fd, 0, NULL);
}

void evloop_defer(struct evloop *l, struct ev_defer *d) {
        if (d->due)
                return;
        d->due = true;
        d->next = NULL;
        *l->tail = d;
        l->tail = &d->next;
        l->n_due++;
        if (!l->in_batch)
                sd_event_source_set_enabled(l->later, SD_EVENT_ONESHOT);
}

static struct ev_defer *pop(struct evloop *l) {
        struct ev_defer *d = l->head;

        l->head = d->next;
        if (!l->head)
                l->tail = &l->head;
        l->n_due--;
        d->due = false;
        d->next = NULL;
        return d;
}

void evloop_cancel(struct evloop *l, struct ev_defer *d) {
        if (!d->due)
                return;
        for (struct ev_defer **p = &l->head; *p; p = &(*p)->next)
                if (*p == d) {
                        *p = d->next;
                        if (l->tail == &d->next)
                                l->tail = p;
                        l->n_due--;
                        break;
                }
        d->due = false;
        d->next = NULL;
}

/* Runs as many items as were due when the round began, taking each off the one queue as it goes,
 * so that a run may cancel (or defer again) any other; what a run defers waits for a later round
 * (or runs in this one in place of an item cancelled). */
static void run_round(struct evloop *l) {
        for (unsigned n = l->n_due; n > 0 && l->head; n--) {
                struct ev_defer *d = pop(l);

                d->run(d);              /* may free d */
        }
}

/* The first round always runs: it is the follow-up of the events just handled (or the work left
 * for the deferred source), and a step must make progress however late it already is. */
static void run_deferred(struct evloop *l, uint64_t start) {
        l->in_batch = true;
        for (int round = 0; round < DEFER_ROUNDS && l->head; round++) {
                if (round > 0 && elapsed(l, start) >= STEP_BUDGET_USEC)
                        break;
                run_round(l);
        }
        l->in_batch = false;
        if (l->head)
                sd_event_source_set_enabled(l->later, SD_EVENT_ONESHOT);
}

/* The next step's batch, from what this one cost for its n events (see the top). */
static void adapt_batch(struct evloop *l, unsigned n, uint64_t cost) {
        if (cost > STEP_BUDGET_USEC) {
                uint64_t fit = (uint64_t) n * STEP_BUDGET_USEC / cost;

                l->batch_max = fit > 0 ? (unsigned) fit : 1;
        } else if (cost * 2 < STEP_BUDGET_USEC && l->batch_max < EVENT_BATCH) {
                unsigned grown = l->batch_max + l->batch_max / 4 + 1;

                l->batch_max = grown < EVENT_BATCH ? grown : EVENT_BATCH;
        }
}

static int on_ready(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct evloop *l = userdata;
        struct epoll_event ev[EVENT_BATCH];
        uint64_t start = l->now_usec(l->clock_userdata);
        int n, i;

        /* One batch per wake-up; any left keep epoll_fd readable for the next. */
        n = epoll_wait(l->epoll_fd, ev, (int) l->batch_max, 0);
        l->in_batch = true;
        for (i = 0; i < n; i++) {
                struct ev_watch *w = ev[i].data.ptr;

                w->on_event(w, ev[i].events);
                /* Those after it are reported again (level-triggered) to a later step. */
                if (elapsed(l, start) >= STEP_BUDGET_USEC) {
                        i++;
                        break;
                }
        }
        run_deferred(l, start);
        if (n > 0)
                adapt_batch(l, (unsigned) i, elapsed(l, start));
        return 0;
}

static int on_later(sd_event_source *s, void *userdata) {
        struct evloop *l = userdata;

        run_deferred(l, l->now_usec(l->clock_userdata));
        return 0;
}

int evloop_new(sd_event *e, struct evloop **ret) {
        struct evloop *l;
        int r;

        l = calloc(1, sizeof *l);
        if (!l)
                return -ENOMEM;
        l->event = sd_event_ref(e);
        l->tail = &l->head;
        l->batch_max = EVENT_BATCH;
        l->now_usec = mono_usec;
        l->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (l->epoll_fd < 0) {
                r = -errno;
                evloop_free(l);
                return r;
        }
        r = sd_event_add_io(e, &l->source, l->epoll_fd, EPOLLIN, on_ready, l);
        if (r >= 0)
                r = sd_event_add_defer(e, &l->later, on_later, l);
        /* Below everything else: sd-event dispatches a deferred source ahead of a timer that fell
         * due while it was pending, so work that keeps deferring itself would hold back every
         * timer (the heartbeat among them). A batch of sockets runs the queue too. */
        if (r >= 0)
                r = sd_event_source_set_priority(l->later, SD_EVENT_PRIORITY_IDLE);
        if (r >= 0)
                r = sd_event_source_set_enabled(l->later, SD_EVENT_OFF);
        if (r < 0) {
                evloop_free(l);
                return r;
        }
        *ret = l;
        return 0;
}

void evloop_free(struct evloop *l) {
        if (!l)
                return;
        sd_event_source_disable_unref(l->source);
        sd_event_source_disable_unref(l->later);
        if (l->epoll_fd >= 0)
                close(l->epoll_fd);
        sd_event_unref(l->event);
        free(l);
}
