/* worker.c — one forked worker process.
 *
 * A worker pulls jobs — client connections — from the listening socket it shares with its
 * siblings (non-blocking accept: whoever wakes first takes the connection) and serves all of them
 * from one sd-event loop; every upstream call is a transfer on the worker's curl multi handle, so
 * a slow upstream never holds up another client. Client and upstream sockets share one epoll set
 * (evloop.h): a wake-up serves a batch of either, and the work that follows, in one iteration. The proxy it creates is opaque: the worker
 * lends it the loop, the table and the multi handle, and asks it only through proxy.h.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "keypool/api.h"
#include "keypool/clock.h"
#include "keypool/curlmem.h"
#include "keypool/evloop.h"
#include "keypool/http.h"
#include "keypool/keyid.h"
#include "keypool/log.h"
#include "keypool/proxy.h"
#include "keypool/upstream.h"
#include "keypool/worker.h"

#define ACCEPT_BATCH            64      /* connections taken per wake-up, for fairness */
#define HEARTBEAT_USEC          (1000 * 1000)
/* sd-event's default accuracy (250 ms) would let a beat come 1.25 s after the last: a quarter
 * of the shortest worker_timeout (2 s) and of the coordinator's 1.5 s freshness check gone. */
#define HEARTBEAT_ACCURACY_USEC (10 * 1000)
#define ACCEPT_PAUSE_USEC       (200 * 1000)    /* accepting rests this long when it cannot go on */
#define ACCEPT_LOG_USEC         (10 * 1000 * 1000)      /* one line per this long about it */
/* Draining, a keep-alive connection gets this long to send its next request (answered with
 * Connection: close) before it is closed: a client between two requests sends within moments,
 * and closing while it does would lose its request. */
#define DRAIN_IDLE_USEC         (1000 * 1000)

struct client {
        struct client *prev, *next;
        struct http_conn *conn;
        struct worker *w;
};

struct worker {
        const struct worker_params *params;
        sd_event *event;
        sd_event_source *accept_source;
        sd_event_source *tcp_accept_source;
        sd_event_source *heartbeat;
        sd_event_source *accept_resume;         /* timer: accepting rests, see pause_accepting */
        bool accept_paused;
        uint64_t accept_logged_usec;            /* when the last line about it was written */
        unsigned accept_pauses;                 /* pauses since then */
        struct evloop *loop;            /* every client and upstream socket, one epoll set */
        struct upstream *upstream;
        struct http_poller *poller;     /* every client connection */
        struct proxy_context *proxy;
        struct api_context api;
        struct http_limits limits;
        struct client *clients;
        unsigned n_clients;
        bool draining;
};

static void set_accepting(struct worker *w, bool on);

/* Is hex (a token's digest) one of the list? Every digest is compared in full, so timing tells
 * nothing about which was close. */
static bool digest_listed(const char *hex, char *const *list, unsigned n) {
        bool match = false;

        for (unsigned i = 0; i < n; i++) {
                unsigned char diff = 0;

                for (unsigned k = 0; k < 64; k++)
                        diff |= (unsigned char) (hex[k] ^ list[i][k]);
                match |= diff == 0;
        }
        return match;
}

/* Over TCP a token is the only credential there is: a plain one (client_tokens) uses the API and
 * the proxy, an admin one (admin_tokens) also changes keys. Returns false after answering 401. */
static bool tcp_authorized(struct http_conn *c, const struct config *cfg, const struct http_request *req,
                           bool *ret_admin) {
        static const struct http_header challenge[] = { { "WWW-Authenticate", "Bearer" } };
        const char *auth = http_request_header(req, "Authorization");
        const char *problem = NULL;
        char hex[65];

        *ret_admin = false;
        if (cfg->n_client_tokens == 0 && cfg->n_admin_tokens == 0)
                return true;
        if (!auth)
                problem = "this listener requires a token: send an Authorization: Bearer header "
                          "with a token from client_tokens or admin_tokens";
        else if (strncasecmp(auth, "Bearer ", 7) != 0)
                problem = "the Authorization header is not a Bearer token";
        else if (keyid_sha256_hex(auth + 7, strlen(auth + 7), hex) < 0)
                problem = "the bearer token could not be checked";
        else if (digest_listed(hex, cfg->admin_tokens, cfg->n_admin_tokens))
                *ret_admin = true;
        else if (!digest_listed(hex, cfg->client_tokens, cfg->n_client_tokens))
                problem = "the bearer token in the Authorization header is not a configured token";
        if (!problem)
                return true;
        http_conn_respond_error(c, 401, "authentication_error", "invalid_client_token",
                                challenge, 1, "%s", problem);
        return false;
}

static void on_request(struct http_conn *c, struct http_request *req, void *userdata) {
        struct client *cl = userdata;
        struct worker *w = cl->w;
        const struct config *cfg = w->params->config;
        const struct http_peer *peer = http_conn_peer(c);
        bool admin;

        keytable_slot_count_request(w->params->table, w->params->slot);
        if (peer->tcp) {
                if (!tcp_authorized(c, cfg, req, &admin))
                        return;
        } else
                admin = peer->have_uid && (peer->uid == 0 || peer->uid == geteuid());
        if (api_handle(&w->api, c, req, admin))
                return;
        if (strncmp(req->url, "/v1/", 4) == 0) {
                proxy_handle(w->proxy, c, req);
                return;
        }
        http_conn_respond_error(c, 404, "invalid_request_error", "not_found", NULL, 0,
                                "no such endpoint: %.200s", req->url);
}

static void maybe_finish_draining(struct worker *w) {
        if (w->draining && w->n_clients == 0 && proxy_active(w->proxy) == 0)
                sd_event_exit(w->event, 0);
}

static void on_closed(struct http_conn *c, void *userdata) {
        struct client *cl = userdata;
        struct worker *w = cl->w;

        if (cl->prev)
                cl->prev->next = cl->next;
        else
                w->clients = cl->next;
        if (cl->next)
                cl->next->prev = cl->prev;
        w->n_clients--;
        free(cl);
        /* Below the limit again: take new connections (a pause ends on its own timer). */
        if (!w->accept_paused)
                set_accepting(w, true);
        maybe_finish_draining(w);
}

static void set_accepting(struct worker *w, bool on) {
        if (w->draining)
                return;
        if (w->accept_source)
                sd_event_source_set_enabled(w->accept_source, on ? SD_EVENT_ON : SD_EVENT_OFF);
        if (w->tcp_accept_source)
                sd_event_source_set_enabled(w->tcp_accept_source, on ? SD_EVENT_ON : SD_EVENT_OFF);
}

static int on_accept_resume(sd_event_source *s, uint64_t usec, void *userdata) {
        struct worker *w = userdata;

        w->accept_paused = false;
        set_accepting(w, true);
        return 0;
}

/* The worker cannot take another connection now (at max_connections, or out of descriptors or
 * memory). The listening socket stays readable while the backlog holds clients, so accepting
 * again at once would spin and log for ever: rest a moment, as nginx does, and say so once per
 * ACCEPT_LOG_USEC however often it happens. */
static void pause_accepting(struct worker *w, int error) {
        uint64_t now = 0;

        set_accepting(w, false);
        w->accept_paused = true;
        w->accept_pauses++;
        if (sd_event_now(w->event, CLOCK_MONOTONIC, &now) >= 0 &&
            (w->accept_logged_usec == 0 || now - w->accept_logged_usec >= ACCEPT_LOG_USEC)) {
                if (error)
                        log_warning("accept failed: %s; not accepting for %u ms (%u times in the last %u s)",
                                    strerror(error), ACCEPT_PAUSE_USEC / 1000, w->accept_pauses,
                                    ACCEPT_LOG_USEC / 1000000);
                else
                        log_warning("at max_connections (%u); not accepting for %u ms (%u times in the last %u s)",
                                    w->params->config->max_connections, ACCEPT_PAUSE_USEC / 1000,
                                    w->accept_pauses, ACCEPT_LOG_USEC / 1000000);
                w->accept_logged_usec = now;
                w->accept_pauses = 0;
        }
        if (sd_event_source_set_time_relative(w->accept_resume, ACCEPT_PAUSE_USEC) < 0 ||
            sd_event_source_set_enabled(w->accept_resume, SD_EVENT_ONESHOT) < 0) {
                /* No timer, no pause: better busy than deaf. */
                w->accept_paused = false;
                set_accepting(w, true);
        }
}

static const struct http_handler handler = {
        .on_request = on_request,
        .on_abort = proxy_on_abort,
        .on_drain = proxy_on_drain,
        .on_closed = on_closed,
};

/* Admin actions are for the socket's owner and root: remember who connected. */
static void set_peer(struct http_conn *c, int fd, bool tcp) {
        struct http_peer peer = { .tcp = tcp };
        struct ucred cred;
        socklen_t len = sizeof cred;

        if (!tcp && getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
                peer.have_uid = true;
                peer.uid = cred.uid;
        }
        if (tcp) {
                int one = 1;

                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        http_conn_set_peer(c, &peer);
}

static int on_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct worker *w = userdata;

        for (int i = 0; i < ACCEPT_BATCH; i++) {
                struct client *cl;
                int cfd;

                if (w->n_clients >= w->params->config->max_connections) {
                        pause_accepting(w, 0);
                        return 0;
                }
                cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) {
                        if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                                return 0;
                        pause_accepting(w, errno);
                        return 0;
                }
                cl = calloc(1, sizeof *cl);
                if (!cl || http_conn_new(w->poller, cfd, &w->limits, &handler, cl, &cl->conn) < 0) {
                        /* Out of memory or descriptors (the epoll registration): same as above. */
                        free(cl);
                        close(cfd);
                        pause_accepting(w, ENOMEM);
                        return 0;
                }
                set_peer(cl->conn, cfd, fd == w->params->tcp_listen_fd);
                cl->w = w;
                cl->next = w->clients;
                if (w->clients)
                        w->clients->prev = cl;
                w->clients = cl;
                w->n_clients++;
        }
        return 0;
}

static int on_heartbeat(sd_event_source *s, uint64_t usec, void *userdata) {
        struct worker *w = userdata;

        /* The coordinator is gone (killed outright): nobody reaps or watches us any more. */
        if (getppid() != w->params->coordinator_pid) {
                sd_event_exit(w->event, 1);
                return 0;
        }
        keytable_slot_heartbeat(w->params->table, w->params->slot, clock_mono_ms());
        sd_event_source_set_time_relative(s, HEARTBEAT_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

static void start_draining(struct worker *w) {
        if (w->draining)
                return;
        w->draining = true;
        keytable_slot_set_stage(w->params->table, w->params->slot, WORKER_STAGE_DRAINING);
        w->accept_source = sd_event_source_disable_unref(w->accept_source);
        w->tcp_accept_source = sd_event_source_disable_unref(w->tcp_accept_source);
        /* Drop our reference to the listening sockets: once the coordinator drops its own (at
         * shutdown), new clients are refused at once instead of waiting in a backlog nobody
         * serves. On a reload the new generation holds them open. */
        close(w->params->listen_fd);
        if (w->params->tcp_listen_fd >= 0)
                close(w->params->tcp_listen_fd);
        for (struct client *cl = w->clients, *next; cl; cl = next) {
                next = cl->next;
                http_conn_shutdown(cl->conn);
        }
        maybe_finish_draining(w);
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        struct worker *w = userdata;

        if (si->ssi_signo == SIGTERM)
                start_draining(w);
        else
                sd_event_exit(w->event, 0);
        return 0;
}

/* The coordinator's event loop must not live on in a worker: its epoll instance would keep the
 * coordinator's sources registered twice. Other inherited fds (the journal's socket among them,
 * which libsystemd keeps in a static) stay: they are few and harmless. */
static void close_inherited_fds(const struct worker_params *wp) {
        if (wp->coordinator_event_fd >= 0)
                close(wp->coordinator_event_fd);
}

static int on_wake(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct worker *w = userdata;
        uint64_t n;

        (void) !read(fd, &n, sizeof n);
        proxy_wake(w->proxy);
        return 0;
}

/* sd_event_loop, with the time each dispatch takes recorded: while one step runs, every other
 * ready event waits, so the step time is the loop's lag (a histogram in /metrics). Waiting for
 * events is not counted. */
static int run_loop(struct worker *w) {
        sd_event *e = w->event;

        while (sd_event_get_state(e) != SD_EVENT_FINISHED) {
                int r = sd_event_prepare(e);

                if (r == 0)
                        r = sd_event_wait(e, UINT64_MAX);
                if (r > 0) {
                        uint64_t start = clock_mono_us();

                        r = sd_event_dispatch(e);
                        keytable_slot_observe_lag(w->params->table, w->params->slot, clock_mono_us() - start);
                }
                if (r < 0)
                        return r;
        }
        {
                int code = 0;

                (void) sd_event_get_exit_code(e, &code);
                return code;
        }
}

int worker_run(const struct worker_params *wp) {
        struct worker w = { .params = wp };
        sigset_t mask;
        int r;

        /* Die with the coordinator rather than serve unsupervised. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        /* Inherited from the coordinator already; said again here, where the keys are used: no
         * other user may attach to a worker or read its memory (root with CAP_SYS_PTRACE still
         * can, and the key memory is MADV_DONTDUMP for that case). */
        prctl(PR_SET_DUMPABLE, 0);
        if (getppid() != wp->coordinator_pid)
                return 1;
        close_inherited_fds(wp);

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGQUIT);
        sigaddset(&mask, SIGHUP);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);

        /* libcurl's copies of the key headers are wiped when it frees them (curlmem.c). */
        if (curlmem_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
                log_error("worker: curl_global_init failed");
                return 1;
        }
        r = sd_event_new(&w.event);
        if (r >= 0)
                r = evloop_new(w.event, &w.loop);
        if (r >= 0)
                r = upstream_new(w.loop, wp->config, &w.upstream);
        if (r >= 0)
                r = http_poller_new(w.loop, &w.poller);
        if (r >= 0)
                r = sd_event_add_io(w.event, &w.accept_source, wp->listen_fd, EPOLLIN, on_accept, &w);
        if (r >= 0)
                r = sd_event_add_time_relative(w.event, &w.heartbeat, CLOCK_MONOTONIC, HEARTBEAT_USEC,
                                               HEARTBEAT_ACCURACY_USEC, on_heartbeat, &w);
        if (r >= 0)
                r = sd_event_add_time_relative(w.event, &w.accept_resume, CLOCK_MONOTONIC,
                                               ACCEPT_PAUSE_USEC, 0, on_accept_resume, &w);
        if (r >= 0)
                r = sd_event_source_set_enabled(w.accept_resume, SD_EVENT_OFF);
        if (r >= 0 && wp->tcp_listen_fd >= 0)
                r = sd_event_add_io(w.event, &w.tcp_accept_source, wp->tcp_listen_fd, EPOLLIN, on_accept, &w);
        if (r >= 0 && wp->slot < wp->n_wake_fds)
                r = sd_event_add_io(w.event, NULL, wp->wake_fds[wp->slot], EPOLLIN, on_wake, &w);
        if (r >= 0)
                r = sd_event_add_signal(w.event, NULL, SIGTERM, on_signal, &w);
        if (r >= 0)
                r = sd_event_add_signal(w.event, NULL, SIGINT, on_signal, &w);
        if (r >= 0)
                r = sd_event_add_signal(w.event, NULL, SIGQUIT, on_signal, &w);
        if (r < 0) {
                log_error("worker: cannot set up the event loop: %s", strerror(-r));
                return 1;
        }

        w.limits = (struct http_limits) {
                .max_header = wp->config->max_header,
                .max_body = wp->config->max_body,
                .timeout_usec = (uint64_t) wp->config->client_timeout * 1000000,
                .header_timeout_usec = (uint64_t) wp->config->header_timeout * 1000000,
                .body_min_rate = wp->config->body_min_rate,
                .body_budget = wp->config->body_budget,
                .drain_idle_usec = DRAIN_IDLE_USEC,
        };
        r = proxy_new(&(struct proxy_params) {
                        .config = wp->config,
                        .table = wp->table,
                        .upstream = w.upstream,
                        .event = w.event,
                        .slot = wp->slot,
                        .wake_fds = wp->wake_fds,
                        .n_wake_fds = wp->n_wake_fds,
                }, &w.proxy);
        if (r < 0) {
                log_error("worker: cannot set up the proxy: %s", strerror(-r));
                return 1;
        }
        w.api = (struct api_context) {
                .config = wp->config, .table = wp->table, .proxy = w.proxy,
                .coordinator_pid = wp->coordinator_pid,
        };

        keytable_slot_heartbeat(wp->table, wp->slot, clock_mono_ms());
        keytable_slot_set_stage(wp->table, wp->slot, WORKER_STAGE_SERVING);

        r = run_loop(&w);

        /* Fast stop: connections and transfers go with the process; the coordinator returns this
         * slot's leases when it reaps us. */
        return r < 0 ? 1 : 0;
}
