/* worker.c — one forked worker process.
 *
 * A worker pulls jobs — client connections — from the listening socket it shares with its
 * siblings (non-blocking accept: whoever wakes first takes the connection) and serves all of them
 * from one sd-event loop; every upstream call is a transfer on the worker's curl multi handle, so
 * a slow upstream never holds up another client.
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
#include "keypool/http.h"
#include "keypool/keyid.h"
#include "keypool/log.h"
#include "keypool/proxy.h"
#include "keypool/upstream.h"
#include "keypool/worker.h"

#define ACCEPT_BATCH            64      /* connections taken per wake-up, for fairness */
#define HEARTBEAT_USEC          (1000 * 1000)

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
        struct upstream *upstream;
        struct http_poller *poller;     /* every client connection's socket */
        struct proxy_context proxy;
        struct api_context api;
        struct http_limits limits;
        struct client *clients;
        unsigned n_clients;
        bool draining;
};

/* Does the request carry one of the configured client tokens (Authorization: Bearer …)? */
static bool has_client_token(const struct config *cfg, const struct http_request *req) {
        const char *auth = http_request_header(req, "Authorization");
        char hex[65];
        bool match = false;

        if (!auth || strncasecmp(auth, "Bearer ", 7) != 0 ||
            keyid_sha256_hex(auth + 7, strlen(auth + 7), hex) < 0)
                return false;
        /* Compare every digest in full, so timing tells nothing about which was close. */
        for (unsigned i = 0; i < cfg->n_client_tokens; i++) {
                unsigned char diff = 0;

                for (unsigned k = 0; k < 64; k++)
                        diff |= (unsigned char) (hex[k] ^ cfg->client_tokens[i][k]);
                match |= diff == 0;
        }
        return match;
}

static void on_request(struct http_conn *c, struct http_request *req, void *userdata) {
        struct client *cl = userdata;
        struct worker *w = cl->w;
        const struct config *cfg = w->params->config;
        const struct http_peer *peer = http_conn_peer(c);
        bool admin;

        keytable_slot_count_request(w->params->table, w->params->slot);
        if (peer->tcp) {
                /* Over TCP a client token is the only credential there is. */
                admin = cfg->n_client_tokens > 0 && has_client_token(cfg, req);
                if (cfg->n_client_tokens > 0 && !admin) {
                        http_conn_respond_error(c, 401, "authentication_error", "invalid_client_token",
                                                (const struct http_header[]) { { "WWW-Authenticate", "Bearer" } }, 1,
                                                "a valid client token is required (Authorization: Bearer …)");
                        return;
                }
        } else
                admin = peer->have_uid && (peer->uid == 0 || peer->uid == geteuid());
        if (api_handle(&w->api, c, req, admin))
                return;
        if (strncmp(req->url, "/v1/", 4) == 0) {
                proxy_handle(&w->proxy, c, req);
                return;
        }
        http_conn_respond_error(c, 404, "invalid_request_error", "not_found", NULL, 0,
                                "no such endpoint: %.200s", req->url);
}

static void maybe_finish_draining(struct worker *w) {
        if (w->draining && w->n_clients == 0 && w->proxy.active == 0)
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
        /* Below the limit again: take new connections. */
        if (w->accept_source && !w->draining)
                sd_event_source_set_enabled(w->accept_source, SD_EVENT_ON);
        if (w->tcp_accept_source && !w->draining)
                sd_event_source_set_enabled(w->tcp_accept_source, SD_EVENT_ON);
        maybe_finish_draining(w);
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
                        sd_event_source_set_enabled(s, SD_EVENT_OFF);
                        return 0;
                }
                cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) {
                        if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                                return 0;
                        log_warning("accept failed: %s", strerror(errno));
                        return 0;
                }
                cl = calloc(1, sizeof *cl);
                if (!cl || http_conn_new(w->poller, cfd, &w->limits, &handler, cl, &cl->conn) < 0) {
                        free(cl);
                        close(cfd);
                        continue;
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
        proxy_wake(&w->proxy);
        return 0;
}

/* sd_event_loop, with the time each dispatch takes recorded: while one step runs, every other
 * ready event waits, so the step time is the loop's lag (a histogram in /metrics). Waiting for
 * events is not counted. */
static uint64_t mono_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}

static int run_loop(struct worker *w) {
        sd_event *e = w->event;

        while (sd_event_get_state(e) != SD_EVENT_FINISHED) {
                int r = sd_event_prepare(e);

                if (r == 0)
                        r = sd_event_wait(e, UINT64_MAX);
                if (r > 0) {
                        uint64_t start = mono_usec();

                        r = sd_event_dispatch(e);
                        keytable_slot_observe_lag(w->params->table, w->params->slot, mono_usec() - start);
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

        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
                log_error("worker: curl_global_init failed");
                return 1;
        }
        r = sd_event_new(&w.event);
        if (r >= 0)
                r = upstream_new(w.event, wp->config, &w.upstream);
        if (r >= 0)
                r = http_poller_new(w.event, &w.poller);
        if (r >= 0)
                r = sd_event_add_io(w.event, &w.accept_source, wp->listen_fd, EPOLLIN, on_accept, &w);
        if (r >= 0)
                r = sd_event_add_time_relative(w.event, &w.heartbeat, CLOCK_MONOTONIC, HEARTBEAT_USEC, 0,
                                               on_heartbeat, &w);
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
        };
        w.api = (struct api_context) {
                .config = wp->config, .table = wp->table, .proxy = &w.proxy,
                .coordinator_pid = wp->coordinator_pid,
        };
        w.proxy = (struct proxy_context) {
                .config = wp->config,
                .table = wp->table,
                .upstream = w.upstream,
                .event = w.event,
                .slot = wp->slot,
                .wake_fds = wp->wake_fds,
                .n_wake_fds = wp->n_wake_fds,
                .policy = {
                        .recovery_ms = (int64_t) wp->config->recovery_time * 1000,
                        .max_cooldown_ms = (int64_t) wp->config->max_cooldown * 1000,
                        .phrases = (const char *const *) wp->config->rate_limit_phrases,
                        .n_phrases = wp->config->n_rate_limit_phrases,
                },
        };
        r = proxy_init(&w.proxy);
        if (r < 0) {
                log_error("worker: cannot set up the proxy: %s", strerror(-r));
                return 1;
        }

        keytable_slot_heartbeat(wp->table, wp->slot, clock_mono_ms());
        keytable_slot_set_stage(wp->table, wp->slot, WORKER_STAGE_SERVING);

        r = run_loop(&w);

        /* Fast stop: connections and transfers go with the process; the coordinator returns this
         * slot's leases when it reaps us. */
        return r < 0 ? 1 : 0;
}
