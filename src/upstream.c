/* upstream.c — a worker's libcurl multi handle, driven by its sd-event loop.
 *
 * The classic multi_socket integration: curl tells us which sockets to watch and when to wake
 * it; we tell curl which socket is ready or that its timeout passed; after every action finished
 * transfers are collected and handed back. Nothing here blocks.
 *
 * curl's sockets live in an epoll instance of their own, watched by sd-event as one source and
 * drained a batch at a time. sd-event dispatches one source per loop iteration and polls before
 * each, so with thousands of upstream connections (long streams) a source per socket made every
 * event cost a scan of all ready sockets: the loop starved and its heartbeat with it.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "keypool/upstream.h"

struct transfer {
        upstream_done_fn done;
        void *userdata;
};

#define EVENT_BATCH 256

struct upstream {
        sd_event *event;
        CURLM *multi;
        int epoll_fd;                   /* curl's sockets */
        sd_event_source *epoll_source;
        sd_event_source *timer;
        unsigned running;
};

static void collect_done(struct upstream *u) {
        CURLMsg *m;
        int left;

        while ((m = curl_multi_info_read(u->multi, &left))) {
                struct transfer *t = NULL;
                CURL *easy = m->easy_handle;
                CURLcode res = m->data.result;

                if (m->msg != CURLMSG_DONE)
                        continue;
                curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &t);
                curl_multi_remove_handle(u->multi, easy);
                u->running--;
                if (t) {
                        upstream_done_fn done = t->done;
                        void *userdata = t->userdata;

                        free(t);
                        curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
                        done(easy, res, userdata);
                }
        }
}

static int on_sockets_ready(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct upstream *u = userdata;
        struct epoll_event ev[EVENT_BATCH];
        int n, still;

        /* One batch per wake-up; anything left keeps the epoll fd readable for the next. */
        n = epoll_wait(u->epoll_fd, ev, EVENT_BATCH, 0);
        for (int i = 0; i < n; i++) {
                int action = 0;

                if (ev[i].events & EPOLLIN)
                        action |= CURL_CSELECT_IN;
                if (ev[i].events & EPOLLOUT)
                        action |= CURL_CSELECT_OUT;
                if (ev[i].events & (EPOLLERR | EPOLLHUP))
                        action |= CURL_CSELECT_ERR;
                curl_multi_socket_action(u->multi, ev[i].data.fd, action, &still);
        }
        collect_done(u);
        return 0;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct upstream *u = userdata;
        int still;

        curl_multi_socket_action(u->multi, CURL_SOCKET_TIMEOUT, 0, &still);
        collect_done(u);
        return 0;
}

/* CURLMOPT_SOCKETFUNCTION: keep each socket curl uses in our epoll set with the events it wants
 * (socketp marks the ones already added). */
static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
        struct upstream *u = userp;
        struct epoll_event ev = { .data.fd = fd };

        if (what == CURL_POLL_REMOVE) {
                if (socketp) {
                        (void) epoll_ctl(u->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
                        curl_multi_assign(u->multi, fd, NULL);
                }
                return 0;
        }
        if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
                ev.events |= EPOLLIN;
        if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
                ev.events |= EPOLLOUT;

        if (!socketp) {
                if (epoll_ctl(u->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0)
                        return -1;
                curl_multi_assign(u->multi, fd, u);
                return 0;
        }
        return epoll_ctl(u->epoll_fd, EPOLL_CTL_MOD, fd, &ev) < 0 ? -1 : 0;
}

/* CURLMOPT_TIMERFUNCTION: one time source, re-armed whenever curl asks. */
static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
        struct upstream *u = userp;

        if (timeout_ms < 0)
                return sd_event_source_set_enabled(u->timer, SD_EVENT_OFF) < 0 ? -1 : 0;
        if (sd_event_source_set_time_relative(u->timer, (uint64_t) timeout_ms * 1000) < 0)
                return -1;
        return sd_event_source_set_enabled(u->timer, SD_EVENT_ONESHOT) < 0 ? -1 : 0;
}

int upstream_new(sd_event *e, struct upstream **ret) {
        struct upstream *u;
        int r;

        u = calloc(1, sizeof *u);
        if (!u)
                return -ENOMEM;
        u->event = e;
        u->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (u->epoll_fd < 0) {
                r = -errno;
                free(u);
                return r;
        }
        u->multi = curl_multi_init();
        if (!u->multi) {
                close(u->epoll_fd);
                free(u);
                return -ENOMEM;
        }
        r = sd_event_add_io(e, &u->epoll_source, u->epoll_fd, EPOLLIN, on_sockets_ready, u);
        if (r < 0) {
                curl_multi_cleanup(u->multi);
                close(u->epoll_fd);
                free(u);
                return r;
        }
        /* Accuracy 1 µs: curl's "call me now" must not be coalesced with sd-event's default 250 ms. */
        r = sd_event_add_time_relative(e, &u->timer, CLOCK_MONOTONIC, 0, 1, on_timer, u);
        if (r < 0) {
                sd_event_source_disable_unref(u->epoll_source);
                curl_multi_cleanup(u->multi);
                close(u->epoll_fd);
                free(u);
                return r;
        }
        sd_event_source_set_enabled(u->timer, SD_EVENT_OFF);
        curl_multi_setopt(u->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
        curl_multi_setopt(u->multi, CURLMOPT_SOCKETDATA, u);
        curl_multi_setopt(u->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
        curl_multi_setopt(u->multi, CURLMOPT_TIMERDATA, u);
        /* Reuse upstream connections across requests; HTTP/2 streams share one where possible. */
        curl_multi_setopt(u->multi, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX);
        curl_multi_setopt(u->multi, CURLMOPT_MAXCONNECTS, 256L);
        *ret = u;
        return 0;
}

void upstream_free(struct upstream *u) {
        if (!u)
                return;
        curl_multi_cleanup(u->multi);
        sd_event_source_disable_unref(u->timer);
        sd_event_source_disable_unref(u->epoll_source);
        close(u->epoll_fd);
        free(u);
}

int upstream_start(struct upstream *u, CURL *easy, upstream_done_fn done, void *userdata) {
        struct transfer *t;
        CURLMcode mc;

        t = malloc(sizeof *t);
        if (!t)
                return -ENOMEM;
        t->done = done;
        t->userdata = userdata;
        curl_easy_setopt(easy, CURLOPT_PRIVATE, t);
        mc = curl_multi_add_handle(u->multi, easy);
        if (mc != CURLM_OK) {
                curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
                free(t);
                return mc == CURLM_OUT_OF_MEMORY ? -ENOMEM : -EINVAL;
        }
        u->running++;
        return 0;
}

void upstream_cancel(struct upstream *u, CURL *easy) {
        struct transfer *t = NULL;

        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &t);
        if (!t)
                return;
        curl_multi_remove_handle(u->multi, easy);
        curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
        free(t);
        u->running--;
}

void upstream_resume(struct upstream *u, CURL *easy) {
        curl_easy_pause(easy, CURLPAUSE_CONT);
}

unsigned upstream_running(const struct upstream *u) {
        return u->running;
}
