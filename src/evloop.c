/* evloop.c — a worker's sockets in one epoll set, and the work that follows their events.
 *
 * Owns the epoll set and the queue of deferred work; see evloop.h for why. A batch is one
 * epoll_wait of up to EVENT_BATCH events; the deferred work it caused runs right after it, for
 * at most DEFER_ROUNDS rounds (work queued by a round runs in the next one), so that work which
 * keeps queueing itself cannot hold the loop: what is left runs from the deferred source, at idle
 * priority, once sd-event has dispatched whatever else is due (timers, signals).
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "keypool/evloop.h"

/* A batch's events are all handled before anything else runs, so its length is the loop's lag.
 * With thousands of open streams nearly every event is a stream's, and one costs tens of µs
 * (more while curl walks its connections, see upstream.c): 256 of them made steps of 10–25 ms;
 * 64 keep a step near 5 ms at the cost of four epoll_wait calls where there was one. */
#define EVENT_BATCH     64
#define DEFER_ROUNDS    8

struct evloop {
        sd_event *event;
        int epoll_fd;
        sd_event_source *source;        /* epoll_fd readable: sockets are ready */
        sd_event_source *later;         /* deferred work queued outside a batch, or left over */
        struct ev_defer *head, **tail;  /* the due work, in the order it was deferred */
        unsigned n_due;
        bool in_batch;
};

sd_event *evloop_event(const struct evloop *l) {
        return l->event;
}

static int ctl(struct evloop *l, int op, int fd, uint32_t events, struct ev_watch *w) {
        struct epoll_event ev = { .events = events, .data.ptr = w };

        return epoll_ctl(l->epoll_fd, op, fd, &ev) < 0 ? -errno : 0;
}

int evloop_add(struct evloop *l, int fd, uint32_t events, struct ev_watch *w) {
        return ctl(l, EPOLL_CTL_ADD, fd, events, w);
}

int evloop_mod(struct evloop *l, int fd, uint32_t events, struct ev_watch *w) {
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

static void run_deferred(struct evloop *l) {
        l->in_batch = true;
        for (int round = 0; round < DEFER_ROUNDS && l->head; round++)
                run_round(l);
        l->in_batch = false;
        if (l->head)
                sd_event_source_set_enabled(l->later, SD_EVENT_ONESHOT);
}

static int on_ready(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct evloop *l = userdata;
        struct epoll_event ev[EVENT_BATCH];
        int n;

        /* One batch per wake-up; any left keep epoll_fd readable for the next. */
        n = epoll_wait(l->epoll_fd, ev, EVENT_BATCH, 0);
        l->in_batch = true;
        for (int i = 0; i < n; i++) {
                struct ev_watch *w = ev[i].data.ptr;

                w->on_event(w, ev[i].events);
        }
        run_deferred(l);
        return 0;
}

static int on_later(sd_event_source *s, void *userdata) {
        run_deferred(userdata);
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
