/* upstream.c — a worker's libcurl multi handle, driven by its event loop.
 *
 * The classic multi_socket integration: curl tells us which sockets to watch and when to wake
 * it; we tell curl which socket is ready or that its timeout passed; after every action finished
 * transfers are collected and handed back. Nothing here blocks.
 *
 * curl's sockets live in the worker's one epoll set (evloop.h), with the client sockets, drained
 * a batch at a time; curl's "act now" is deferred work run right after the batch. sd-event
 * dispatches one source per loop iteration and polls before each, so with thousands of upstream
 * connections (long streams) a source per socket made every event cost a scan of all ready
 * sockets, and a source per kind of work cost an iteration per request for each.
 *
 * curl stops watching a connection's socket after every transfer and watches it again for the
 * next one on the same connection: an EPOLL_CTL_DEL and an EPOLL_CTL_ADD per request. Sockets
 * curl opens for connections (CURLOPT_OPENSOCKETFUNCTION) therefore stay in the epoll set while
 * idle, and we remember what each number is registered for. That memory is only trusted within
 * one period of curl watching a socket (marked with curl_multi_assign, which curl forgets when it
 * stops): curl 7.88 closes a socket that is still connecting without calling
 * CURLOPT_CLOSESOCKETFUNCTION, so a number may be closed and reused (by a resolver's socketpair,
 * say) behind our back. Each period therefore starts with one real epoll_ctl, and a table that
 * was wrong is corrected by the kernel's answer (ENOENT, EEXIST) instead of failing the transfer.
 * Other descriptors curl watches leave the set when curl stops watching them.
 *
 * TLS must cost a handshake and nothing more. curl caches the CA store it builds from a CA file
 * in the multi handle (CURLOPT_CA_CACHE_TIMEOUT), but only when no CA directory is set: Debian's
 * libcurl sets both by default, so every new connection parsed the whole system bundle again
 * (~27 ms of a blocked loop each). The directory is therefore set only when a provider asks for
 * one; the system bundle holds the same certificates. TLS sessions and DNS answers live in one
 * share handle per worker, set on every transfer, so new connections resume their sessions.
 *
 * An HTTP/2 connection carries many transfers, but curl 7.88 shares one only once it is set up:
 * a connection still connecting is marked "close" until then, so the transfers that find every
 * set-up connection full of streams each open a connection of their own. A burst of 500 to one
 * provider opened 200 to 400 TLS connections instead of a handful (libcurl alone does the same),
 * each paying a new SSL_CTX and a handshake. curl's per-host connection limit
 * (CURLMOPT_MAX_HOST_CONNECTIONS) makes the rest wait for the connections being set up instead,
 * but it is one number for every host, and a provider speaking HTTP/1.1 needs a connection per
 * running transfer. So the limit follows the running transfers: each counts a connection of its
 * own, except those asking for HTTP/2 of a provider not seen refusing to share, which count the
 * connections their ready ones are on and one per STREAMS_PER_CONNECTION of the others;
 * SPARE_CONNECTIONS more on top. As a sum over all providers it covers every host. Whether a
 * provider shares is seen in CURLOPT_PREREQFUNCTION (two running transfers ready on the same
 * local port: it does; a second connection while it had few ready transfers: it does not) and in
 * an answer over HTTP/1.x. It must be assumed before it is seen: a cold burst's transfers all
 * start before the first connection is up, and curl opens the extra connections inside the very
 * call that sets it up, before the limit could be lowered. A provider that turns out not to
 * share has the transfers the limit held woken when it rises (limit_host_connections).
 */
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "keypool/clock.h"
#include "keypool/evloop.h"
#include "keypool/upstream.h"

#define IDLE_CONNECTIONS        256     /* idle upstream connections kept beyond those in use */
#define H2_BODY_MAX             (60 * 1024)     /* larger request bodies go over HTTP/1.1 */
/* Streams counted on per HTTP/2 connection (see the top): below curl's own 100 and the 100 that
 * RFC 9113 asks servers to allow at least, so that a server allowing fewer costs connections
 * rather than queued requests. */
#define STREAMS_PER_CONNECTION  64
#define SPARE_CONNECTIONS       4
/* Time one kick may spend connecting queued transfers (see upstream_start), and what a new
 * transfer's connection is assumed to cost before one was measured. */
#define KICK_BUDGET_USEC        1000
#define START_COST_USEC         20

struct transfer {
        upstream_done_fn done;
        void *userdata;
        struct transfer *next_free;
        CURL *easy;
        struct transfer *next_queued;   /* while queued, not yet handed to curl */
        bool queued;
        struct upstream *upstream;
        int provider;                   /* its place in config->providers, or -1 */
        bool may_multiplex;             /* asked for HTTP/2 over TLS: may share a connection */
        int port;                       /* its connection's local port once ready, else -1 */
        char error[CURL_ERROR_SIZE];    /* curl's full text of what went wrong */
};

/* Whether a provider's connections were seen carrying several transfers (see the top). */
enum sharing {
        SHARING_UNKNOWN = 1,            /* counted as sharing until seen otherwise */
        SHARING_YES,                    /* two running transfers ready on one connection */
        SHARING_NO,                     /* a second connection while the provider had few */
        _SHARING_MAX,
};

/* Per provider: the connections its running transfers that may share one occupy and need. */
struct provider_load {
        unsigned n_multiplex;           /* running transfers that may share a connection */
        unsigned n_ready;               /* … of them on a connection already (past prereq) */
        unsigned n_ports;               /* … the connections those are on */
        uint32_t *on_port;              /* ready transfers per local port, from the first one */
        enum sharing sharing;
};

/* What we know of a descriptor curl uses, indexed by its number. */
enum {
        FD_CONN         = 1 << 0,       /* opened by curl for a connection (ours to track) */
        FD_REGISTERED   = 1 << 1,       /* in the epoll set */
        FD_WATCHED      = 1 << 2,       /* curl wants events from it now */
        FD_IDLE         = 1 << 3,       /* a connection curl stopped watching: idle (or paused) */
};

/* One per descriptor number curl has used, kept (and reused for the number) until
 * upstream_free: an event may name a socket closed earlier in the same batch. */
struct fd_state {
        struct ev_watch watch;          /* first: the evloop hands this back */
        struct upstream *u;
        int fd;
        uint8_t flags;
        uint32_t events;                /* registered for, when FD_REGISTERED */
};

struct upstream {
        struct evloop *loop;            /* curl's sockets, in the worker's one epoll set */
        CURLM *multi;
        sd_event_source *timer;
        struct ev_defer kick;           /* curl's "call me now": no timer needed */
        unsigned running;
        unsigned max_connections;       /* CURLMOPT_MAXCONNECTS: see upstream_start */
        unsigned n_idle;                /* connections' sockets marked FD_IDLE: see upstream_start */
        struct transfer *queue, **queue_tail;   /* started, not yet handed to curl */
        uint64_t start_cost_usec;       /* a kick's time per transfer it handed to curl, smoothed */
        struct fd_state **fds;
        size_t n_fds;
        struct transfer *free_transfers; /* ended transfers' records, for the next ones */
        CURLSH *share;                  /* TLS sessions and DNS answers of all transfers */
        char *default_ca_file;          /* libcurl's built-in CA bundle, or NULL */
        char *default_ca_path;          /* … its CA directory, used only without a bundle */
        char error[CURL_ERROR_SIZE];    /* the ending transfer's text, while its done runs */
        const struct config *config;
        int64_t *reported_ms;           /* per provider: when a failure was last reported */
        struct provider_load *load;     /* per provider */
        unsigned connections_needed;    /* by the running transfers, SPARE_CONNECTIONS left out */
        unsigned n_waiting;             /* running transfers not yet on a connection */
        unsigned max_host_connections;  /* CURLMOPT_MAX_HOST_CONNECTIONS as set */
        bool wake_waiting;              /* the limit rose: curl's waiting transfers may go */
        CURL *nudge;                    /* never runs: see limit_host_connections */
};

static void transfer_put(struct upstream *u, struct transfer *t) {
        t->next_free = u->free_transfers;
        u->free_transfers = t;
}

/* Connections a provider's transfers that may share one need: the connections the ready ones
 * are on, and one per STREAMS_PER_CONNECTION of the others; one each once it was seen not to
 * share. Counting the connections actually occupied keeps those an HTTP/2 server ended (GOAWAY)
 * counted while their last streams finish: curl keeps them among the host's connections. */
static unsigned load_connections(const struct provider_load *l) {
        if (l->sharing == SHARING_NO)
                return l->n_multiplex;
        return l->n_ports + (l->n_multiplex - l->n_ready + STREAMS_PER_CONNECTION - 1) / STREAMS_PER_CONNECTION;
}

/* Tells curl the per-host limit the running transfers call for (see the top). Never from
 * inside one of curl's callbacks, where curl refuses its API: what prereq_cb learns waits for
 * the end of the curl call that ran it. A transfer that found its host's limit reached waits in
 * a queue curl moves only when another transfer moves on, one at a time, and the head of it may
 * be waiting for something else (another host's first connection); when the limit rises, each
 * transfer not yet on a connection gets a turn: every time a handle that never runs is added and
 * removed, curl retries the first in its queue. */
static void limit_host_connections(struct upstream *u) {
        unsigned limit = u->connections_needed + SPARE_CONNECTIONS;
        bool wake = u->wake_waiting;

        u->wake_waiting = false;
        if (limit == u->max_host_connections ||
            curl_multi_setopt(u->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long) limit) != CURLM_OK)
                return;
        u->max_host_connections = limit;
        for (unsigned i = 0; wake && i < u->n_waiting; i++)
                if (curl_multi_add_handle(u->multi, u->nudge) != CURLM_OK ||
                    curl_multi_remove_handle(u->multi, u->nudge) != CURLM_OK)
                        break;
}

/* The load t puts on its provider's connections, if it may share one. */
static struct provider_load *load_of(struct upstream *u, const struct transfer *t) {
        struct provider_load *l = t->provider >= 0 && t->may_multiplex ? &u->load[t->provider] : NULL;

        return l && l->on_port ? l : NULL;
}

/* Runs change on l between taking its connections out of the sum and putting them back. */
#define LOAD_UPDATE(u, l, change) do {                                  \
                (u)->connections_needed -= load_connections(l);         \
                change;                                                 \
                (u)->connections_needed += load_connections(l);         \
        } while (0)

static void load_add(struct upstream *u, const struct transfer *t) {
        struct provider_load *l = load_of(u, t);

        u->n_waiting++;
        if (l)
                LOAD_UPDATE(u, l, l->n_multiplex++);
        else
                u->connections_needed++;
}

static void load_remove(struct upstream *u, const struct transfer *t) {
        struct provider_load *l = load_of(u, t);

        if (t->port < 0)
                u->n_waiting--;
        if (!l) {
                u->connections_needed--;
                return;
        }
        LOAD_UPDATE(u, l, {
                l->n_multiplex--;
                if (t->port >= 0) {
                        l->n_ready--;
                        l->n_ports -= --l->on_port[t->port] == 0;
                }
        });
}

/* Only learning that a provider does not share raises the limit (and wakes what it held). */
static void load_learn(struct upstream *u, struct provider_load *l, enum sharing sharing) {
        if (l->sharing == sharing)
                return;
        LOAD_UPDATE(u, l, l->sharing = sharing);
        u->wake_waiting = u->wake_waiting || sharing == SHARING_NO;
}

/* CURLOPT_PREREQFUNCTION: t's connection is ready and its request about to go, local_port
 * naming the connection. Another running transfer of the provider ready on it means the
 * provider shares connections. A new one while the provider had fewer ready transfers than an
 * HTTP/2 server takes on one means it does not: curl opens a connection beside a shared one
 * only when that one is full. (A transfer that ended on a connection is counted on it until
 * collect_done has it, so one reusing that HTTP/1.1 connection in the same curl call looks like
 * sharing; its HTTP/1.1 answer, seen at its end right after, says otherwise again.) */
static int prereq_cb(void *clientp, char *primary_ip, char *local_ip, int primary_port, int local_port) {
        struct transfer *t = clientp;
        struct upstream *u = t->upstream;
        struct provider_load *l = load_of(u, t);

        if (t->port >= 0 || local_port < 0 || local_port > UINT16_MAX)
                return CURL_PREREQFUNC_OK;
        t->port = local_port;
        u->n_waiting--;
        if (!l)
                return CURL_PREREQFUNC_OK;
        if (l->on_port[local_port] > 0)
                load_learn(u, l, SHARING_YES);
        else if (l->n_ready > 0 && l->n_ready < STREAMS_PER_CONNECTION)
                load_learn(u, l, SHARING_NO);
        LOAD_UPDATE(u, l, {
                l->n_ready++;
                l->n_ports += l->on_port[local_port]++ == 0;
        });
        return CURL_PREREQFUNC_OK;
}

/* A handle goes back to its owner holding nothing of this upstream: no transfer record, no
 * error buffer, no share. Handles are kept for reuse after their transfer (the proxy's spares),
 * and one still attached to the share would pin it: upstream_free could not free it. */
static void handle_detach(CURL *easy) {
        curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
        curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, NULL);
        curl_easy_setopt(easy, CURLOPT_SHARE, NULL);
        curl_easy_setopt(easy, CURLOPT_PREREQFUNCTION, NULL);
        curl_easy_setopt(easy, CURLOPT_PREREQDATA, NULL);
}

/* t's transfer is over (ended or cancelled): out of the count, its record back. An answer over
 * HTTP/1.x where HTTP/2 was asked for means its provider does not (or no longer) multiplex. */
static void transfer_end(struct upstream *u, CURL *easy, struct transfer *t) {
        struct provider_load *l = load_of(u, t);
        long version = CURL_HTTP_VERSION_NONE;

        if (l && curl_easy_getinfo(easy, CURLINFO_HTTP_VERSION, &version) == CURLE_OK &&
            (version == CURL_HTTP_VERSION_1_0 || version == CURL_HTTP_VERSION_1_1))
                load_learn(u, l, SHARING_NO);
        load_remove(u, t);
        limit_host_connections(u);
        u->running--;
        transfer_put(u, t);
        handle_detach(easy);
}

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
                if (t) {
                        upstream_done_fn done = t->done;
                        void *userdata = t->userdata;

                        memcpy(u->error, t->error, sizeof u->error);
                        u->error[sizeof u->error - 1] = 0;
                        transfer_end(u, easy, t);
                        done(easy, res, userdata);
                        u->error[0] = 0;
                }
        }
}

static void on_socket_event(struct ev_watch *w, uint32_t events);

static struct fd_state *fd_state(struct upstream *u, int fd) {
        if (fd < 0)
                return NULL;
        if ((size_t) fd >= u->n_fds) {
                size_t n = u->n_fds ? u->n_fds : 64;
                struct fd_state **p;

                while (n <= (size_t) fd)
                        n *= 2;
                p = reallocarray(u->fds, n, sizeof *p);
                if (!p)
                        return NULL;
                memset(p + u->n_fds, 0, (n - u->n_fds) * sizeof *p);
                u->fds = p;
                u->n_fds = n;
        }
        if (!u->fds[fd]) {
                u->fds[fd] = calloc(1, sizeof **u->fds);
                if (!u->fds[fd])
                        return NULL;
                *u->fds[fd] = (struct fd_state) { .watch.on_event = on_socket_event, .u = u, .fd = fd };
        }
        return u->fds[fd];
}

/* Forgets what was known of the number: the socket it named is gone. */
static void fd_forget(struct fd_state *st) {
        if (st->flags & FD_IDLE)
                st->u->n_idle--;
        st->flags = 0;
        st->events = 0;
}

/* Makes the epoll set hold fd for events (0: out of the set). With trusted, a registration the
 * table already shows is not repeated. 0 or a negative errno. */
static int fd_register(struct upstream *u, int fd, struct fd_state *st, uint32_t events, bool trusted) {
        bool mod;
        int r;

        if (events == 0) {
                if (st->flags & FD_REGISTERED)
                        (void) evloop_del(u->loop, fd);
                st->flags &= (uint8_t) ~FD_REGISTERED;
                return 0;
        }
        if (trusted && (st->flags & FD_REGISTERED) && st->events == events)
                return 0;
        mod = st->flags & FD_REGISTERED;
        r = mod ? evloop_mod(u->loop, fd, events, &st->watch) : evloop_add(u->loop, fd, events, &st->watch);
        if (r < 0) {
                /* The table was wrong about this number: the kernel's view wins. */
                if ((r != -ENOENT && r != -EEXIST) ||
                    (mod ? evloop_add(u->loop, fd, events, &st->watch)
                         : evloop_mod(u->loop, fd, events, &st->watch)) < 0) {
                        st->flags &= (uint8_t) ~FD_REGISTERED;
                        return r;
                }
        }
        st->flags |= FD_REGISTERED;
        st->events = events;
        return 0;
}

/* One of curl's sockets is ready (in a batch of the worker's sockets). Finished transfers are
 * collected at once: their answers go out to clients in the same batch's follow-up work. */
static void on_socket_event(struct ev_watch *w, uint32_t events) {
        struct fd_state *st = (struct fd_state *) w;
        struct upstream *u = st->u;
        int action = 0, still;

        /* An idle connection's socket woke (the server closed it, say), or the socket was closed
         * earlier in this batch: curl will find out when it next looks at the connection; until
         * then it stays quiet. */
        if (!(st->flags & FD_WATCHED)) {
                fd_register(u, st->fd, st, 0, true);
                return;
        }
        if (events & EPOLLIN)
                action |= CURL_CSELECT_IN;
        if (events & EPOLLOUT)
                action |= CURL_CSELECT_OUT;
        if (events & (EPOLLERR | EPOLLHUP))
                action |= CURL_CSELECT_ERR;
        curl_multi_socket_action(u->multi, st->fd, action, &still);
        limit_host_connections(u);
        collect_done(u);
}

static void act_on_timeout(struct upstream *u) {
        int still;

        curl_multi_socket_action(u->multi, CURL_SOCKET_TIMEOUT, 0, &still);
        limit_host_connections(u);
        collect_done(u);
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        act_on_timeout(userdata);
        return 0;
}

static void fail_queued(struct upstream *u, struct transfer *t, CURLcode res) {
        upstream_done_fn done = t->done;
        void *userdata = t->userdata;
        CURL *easy = t->easy;

        transfer_end(u, easy, t);
        done(easy, res, userdata);
}

/* Hands curl as many queued transfers as its last kicks say fit in KICK_BUDGET_USEC, connects
 * them (and whatever else is due), and kicks again for the rest: the evloop runs that in a later
 * round, or a later step once this one is out of time. */
static void on_kick(struct ev_defer *d) {
        struct upstream *u = (struct upstream *) ((char *) d - offsetof(struct upstream, kick));
        uint64_t fit = KICK_BUDGET_USEC / (u->start_cost_usec ? u->start_cost_usec : 1), start;
        unsigned n = 0;

        /* However dear a connection has become, each kick hands curl one. */
        if (fit == 0)
                fit = 1;

        while (u->queue && n < fit) {
                struct transfer *t = u->queue;

                u->queue = t->next_queued;
                if (!u->queue)
                        u->queue_tail = &u->queue;
                t->queued = false;
                t->next_queued = NULL;
                /* See upstream_start: whether a connection is idle is known only now. */
                curl_easy_setopt(t->easy, CURLOPT_FRESH_CONNECT, u->n_idle == 0 ? 1L : 0L);
                if (curl_multi_add_handle(u->multi, t->easy) != CURLM_OK) {
                        fail_queued(u, t, CURLE_OUT_OF_MEMORY);
                        continue;
                }
                n++;
        }
        start = clock_mono_us();
        act_on_timeout(u);
        if (n > 0)
                u->start_cost_usec = (u->start_cost_usec * 3 + (clock_mono_us() - start) / n) / 4;
        if (u->queue)
                evloop_defer(u->loop, &u->kick);
}

/* CURLMOPT_SOCKETFUNCTION: keep each socket curl uses in our epoll set with the events it wants.
 * socketp is set from the first registration of a watching period on (see the top). Failing here
 * would stop the whole multi handle: a socket we cannot watch costs its transfer a timeout. */
static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
        struct upstream *u = userp;
        struct fd_state *st = fd_state(u, fd);
        uint32_t events = 0;

        if (!st)
                return 0;
        if (what == CURL_POLL_REMOVE) {
                st->flags &= (uint8_t) ~FD_WATCHED;
                /* A connection's socket stays registered while idle (see the top). */
                if (!(st->flags & FD_CONN))
                        fd_register(u, fd, st, 0, true);
                else if (!(st->flags & FD_IDLE)) {
                        st->flags |= FD_IDLE;
                        u->n_idle++;
                }
                return 0;
        }
        if (st->flags & FD_IDLE) {
                st->flags &= (uint8_t) ~FD_IDLE;
                u->n_idle--;
        }
        if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
                events |= EPOLLIN;
        if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
                events |= EPOLLOUT;
        if (fd_register(u, fd, st, events, socketp != NULL) < 0)
                return 0;
        if (!socketp)
                curl_multi_assign(u->multi, fd, u);
        st->flags |= FD_WATCHED;
        return 0;
}

/* CURLOPT_OPENSOCKETFUNCTION: a connection's socket, which we may keep registered while idle. */
static curl_socket_t open_socket_cb(void *userp, curlsocktype purpose, struct curl_sockaddr *addr) {
        struct upstream *u = userp;
        struct fd_state *st;
        int fd;

        fd = socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol);
        if (fd < 0)
                return CURL_SOCKET_BAD;
        st = fd_state(u, fd);
        if (!st) {
                close(fd);
                return CURL_SOCKET_BAD;
        }
        /* Whatever the table said of this number was about a socket that is gone. */
        fd_forget(st);
        st->flags = FD_CONN;
        return fd;
}

/* CURLOPT_CLOSESOCKETFUNCTION: closing drops the socket from the epoll set by itself. (Not called
 * for every close: see the top.) */
static int close_socket_cb(void *userp, curl_socket_t fd) {
        struct upstream *u = userp;

        if ((size_t) fd < u->n_fds && u->fds[fd])
                fd_forget(u->fds[fd]);
        return close(fd);
}

/* CURLMOPT_TIMERFUNCTION: one time source, re-armed whenever curl asks. curl asks for "now"
 * after every new transfer and for its long timeouts after every step: the first is a deferred
 * call (no timer to program), and the second may be late by a fraction of itself, so that moving
 * it a little on every request does not reprogram the kernel's timer each time. */
static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
        struct upstream *u = userp;
        uint64_t accuracy_usec;

        if (timeout_ms < 0) {
                if (!u->queue)
                        evloop_cancel(u->loop, &u->kick);
                return sd_event_source_set_enabled(u->timer, SD_EVENT_OFF) < 0 ? -1 : 0;
        }
        if (timeout_ms == 0) {
                sd_event_source_set_enabled(u->timer, SD_EVENT_OFF);
                evloop_defer(u->loop, &u->kick);
                return 0;
        }
        if (!u->queue)
                evloop_cancel(u->loop, &u->kick);
        accuracy_usec = (uint64_t) timeout_ms * 1000 / 16;
        if (accuracy_usec > 250000)
                accuracy_usec = 250000;
        if (sd_event_source_set_time_accuracy(u->timer, accuracy_usec ? accuracy_usec : 1) < 0 ||
            sd_event_source_set_time_relative(u->timer, (uint64_t) timeout_ms * 1000) < 0)
                return -1;
        return sd_event_source_set_enabled(u->timer, SD_EVENT_ONESHOT) < 0 ? -1 : 0;
}

/* libcurl's built-in trust (the distribution's bundle and directory), read once: a handle that
 * served a provider with its own ca_file must get it back for the next provider. */
static int read_default_trust(struct upstream *u) {
        CURL *easy = curl_easy_init();
        char *file = NULL, *path = NULL;

        if (!easy)
                return -ENOMEM;
        (void) curl_easy_getinfo(easy, CURLINFO_CAINFO, &file);
        (void) curl_easy_getinfo(easy, CURLINFO_CAPATH, &path);
        u->default_ca_file = file ? strdup(file) : NULL;
        u->default_ca_path = path ? strdup(path) : NULL;
        curl_easy_cleanup(easy);
        if ((file && !u->default_ca_file) || (path && !u->default_ca_path))
                return -ENOMEM;
        return 0;
}

static void free_owned(struct upstream *u) {
        if (u->share)
                (void) curl_share_cleanup(u->share);
        free(u->default_ca_file);
        free(u->default_ca_path);
        free(u->reported_ms);
        for (size_t i = 0; u->load && i < u->config->n_providers; i++)
                free(u->load[i].on_port);
        free(u->load);
}

/* A provider's transfers may share connections only over TLS with HTTP/2 asked for: only those
 * get the count per local port (256 KiB of address space, of which the pages of the ports in
 * use are touched). */
static int load_new(struct upstream *u) {
        u->load = calloc(u->config->n_providers ? u->config->n_providers : 1, sizeof *u->load);
        if (!u->load)
                return -ENOMEM;
        for (size_t i = 0; i < u->config->n_providers; i++) {
                const struct config_provider *prov = &u->config->providers[i];

                u->load[i].sharing = SHARING_UNKNOWN;
                if (prov->http2 && prov->base_url && strncmp(prov->base_url, "https://", 8) == 0 &&
                    !(u->load[i].on_port = calloc(UINT16_MAX + 1, sizeof *u->load[i].on_port)))
                        return -ENOMEM;
        }
        return 0;
}

static int share_new(struct upstream *u) {
        u->share = curl_share_init();
        if (!u->share)
                return -ENOMEM;
        /* One worker, one thread: no lock callbacks needed. */
        if (curl_share_setopt(u->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK ||
            curl_share_setopt(u->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) != CURLSHE_OK)
                return -EINVAL;
        return 0;
}

int upstream_new(struct evloop *loop, const struct config *cfg, struct upstream **ret) {
        struct upstream *u;
        int r;

        u = calloc(1, sizeof *u);
        if (!u)
                return -ENOMEM;
        u->config = cfg;
        u->loop = loop;
        u->kick.run = on_kick;
        u->queue_tail = &u->queue;
        u->start_cost_usec = START_COST_USEC;
        u->reported_ms = calloc(cfg->n_providers ? cfg->n_providers : 1, sizeof *u->reported_ms);
        r = u->reported_ms ? load_new(u) : -ENOMEM;
        if (r >= 0)
                r = read_default_trust(u);
        if (r >= 0)
                r = share_new(u);
        if (r >= 0) {
                u->multi = curl_multi_init();
                u->nudge = curl_easy_init();
                if (!u->multi || !u->nudge)
                        r = -ENOMEM;
        }
        /* Accuracy 1 µs: curl's short timeouts must not be coalesced with sd-event's default
         * 250 ms (timer_cb widens it for long ones). */
        if (r >= 0)
                r = sd_event_add_time_relative(evloop_event(loop), &u->timer, CLOCK_MONOTONIC, 0, 1,
                                               on_timer, u);
        if (r >= 0)
                r = sd_event_source_set_enabled(u->timer, SD_EVENT_OFF);
        if (r < 0) {
                upstream_free(u);
                return r;
        }
        curl_multi_setopt(u->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
        curl_multi_setopt(u->multi, CURLMOPT_SOCKETDATA, u);
        curl_multi_setopt(u->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
        curl_multi_setopt(u->multi, CURLMOPT_TIMERDATA, u);
        /* Reuse upstream connections across requests; HTTP/2 streams share one where possible. */
        curl_multi_setopt(u->multi, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX);
        u->max_connections = IDLE_CONNECTIONS;
        curl_multi_setopt(u->multi, CURLMOPT_MAXCONNECTS, (long) u->max_connections);
        *ret = u;
        return 0;
}

void upstream_free(struct upstream *u) {
        if (!u)
                return;
        if (u->multi)
                curl_multi_cleanup(u->multi);
        if (u->nudge)
                curl_easy_cleanup(u->nudge);
        evloop_cancel(u->loop, &u->kick);
        sd_event_source_disable_unref(u->timer);
        while (u->queue) {
                struct transfer *t = u->queue;

                u->queue = t->next_queued;
                handle_detach(t->easy);
                free(t);
        }
        for (size_t i = 0; i < u->n_fds; i++)
                free(u->fds[i]);
        free(u->fds);
        while (u->free_transfers) {
                struct transfer *t = u->free_transfers;

                u->free_transfers = t->next_free;
                free(t);
        }
        /* The share goes last: the connections the multi handle closed kept their TLS sessions
         * in it, and no handle holds it any more once its transfer ended (handle_detach), spares
         * kept for the next transfer included. */
        free_owned(u);
        free(u);
}

int upstream_start(struct upstream *u, CURL *easy, const struct upstream_route *route, upstream_done_fn done,
                   void *userdata) {
        struct transfer *t;
        CURLMcode mc;

        t = u->free_transfers;
        if (t)
                u->free_transfers = t->next_free;
        else if (!(t = malloc(sizeof *t)))
                return -ENOMEM;
        t->done = done;
        t->userdata = userdata;
        t->upstream = u;
        t->provider = route ? route->provider : -1;
        t->may_multiplex = route && route->multiplex;
        t->port = -1;
        t->error[0] = 0;
        t->easy = easy;
        t->queued = false;
        t->next_queued = NULL;
        curl_easy_setopt(easy, CURLOPT_PRIVATE, t);
        curl_easy_setopt(easy, CURLOPT_PREREQFUNCTION, prereq_cb);
        curl_easy_setopt(easy, CURLOPT_PREREQDATA, t);
        curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, t->error);
        curl_easy_setopt(easy, CURLOPT_SHARE, u->share);
        curl_easy_setopt(easy, CURLOPT_OPENSOCKETFUNCTION, open_socket_cb);
        curl_easy_setopt(easy, CURLOPT_OPENSOCKETDATA, u);
        curl_easy_setopt(easy, CURLOPT_CLOSESOCKETFUNCTION, close_socket_cb);
        curl_easy_setopt(easy, CURLOPT_CLOSESOCKETDATA, u);
        curl_easy_setopt(easy, CURLOPT_FRESH_CONNECT, 0L);
        /* A transfer that cannot share a connection is queued and handed to curl by the kick, as
         * many per kick as fit in KICK_BUDGET_USEC. curl connects every transfer added since its
         * last call in its next one, and a new connection costs from 50 µs to a millisecond
         * (curl's walks below, the kernel's search for a free local port among thousands used):
         * the hundreds of new streams a worker gets in a second held its loop for 10–100 ms.
         *
         * curl 7.88 also looks for a connection to reuse by walking every connection it holds to
         * the host, in use or not, several cache misses each: with 5,000 streams open, ~150 µs
         * of each new transfer. With no connection idle there is nothing to find, and such a
         * transfer opens a connection of its own either way: the kick sets
         * CURLOPT_FRESH_CONNECT then. The count errs towards "some idle" (a paused transfer's
         * socket, a number reused behind our back), which only costs the walk. Transfers that
         * may share an HTTP/2 connection go to curl at once, for the count of the limit below
         * (see the top). */
        if (!t->may_multiplex) {
                t->queued = true;
                *u->queue_tail = t;
                u->queue_tail = &t->next_queued;
                evloop_defer(u->loop, &u->kick);
        } else {
                mc = curl_multi_add_handle(u->multi, easy);
                if (mc != CURLM_OK) {
                        handle_detach(easy);
                        transfer_put(u, t);
                        return mc == CURLM_OUT_OF_MEMORY ? -ENOMEM : -EINVAL;
                }
        }
        u->running++;
        load_add(u, t);
        limit_host_connections(u);
        /* curl 7.88 keeps every connection, in use or idle, in one cache, and while it holds
         * more than MAXCONNECTS, each transfer's end walks all of them for the oldest idle one
         * to close: with thousands of open streams, thousands of connections walked per ending
         * stream, and steps of a second when a burst of them ends. The limit follows the most
         * transfers at once, so that only idle connections beyond that many (and
         * IDLE_CONNECTIONS) are closed; those left after a burst go when idle for curl's
         * CURLOPT_MAXAGE_CONN or when the upstream closes them. */
        if (u->running + IDLE_CONNECTIONS > u->max_connections) {
                u->max_connections = u->running + IDLE_CONNECTIONS + u->running / 4;
                curl_multi_setopt(u->multi, CURLMOPT_MAXCONNECTS, (long) u->max_connections);
        }
        return 0;
}

void upstream_cancel(struct upstream *u, CURL *easy) {
        struct transfer *t = NULL;

        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &t);
        if (!t)
                return;
        if (t->queued) {
                struct transfer **p = &u->queue;

                while (*p != t)
                        p = &(*p)->next_queued;
                *p = t->next_queued;
                if (u->queue_tail == &t->next_queued)
                        u->queue_tail = p;
                t->queued = false;
        } else {
                curl_multi_remove_handle(u->multi, easy);
        }
        transfer_end(u, easy, t);
}

void upstream_resume(struct upstream *u, CURL *easy) {
        curl_easy_pause(easy, CURLPAUSE_CONT);
}

unsigned upstream_running(const struct upstream *u) {
        return u->running;
}

struct upstream_route upstream_configure(struct upstream *u, CURL *easy, const struct config_provider *prov,
                                         size_t body_len, bool http1) {
        size_t i = (size_t) (prov - u->config->providers);
        bool https = strncmp(prov->base_url, "https://", 8) == 0;
        struct upstream_route route;
        /* A provider's own trust replaces the system's. A CA directory defeats curl's store
         * cache (see the top), and with it the system bundle would be parsed for every new
         * connection: a directory alone then is the whole trust. Without either, the system
         * bundle alone (its directory only when libcurl has no bundle). */
        const char *ca_file = prov->ca_file ? prov->ca_file : prov->ca_path ? NULL : u->default_ca_file;
        const char *ca_path = prov->ca_path ? prov->ca_path : ca_file ? NULL : u->default_ca_path;

        curl_easy_setopt(easy, CURLOPT_CAINFO, ca_file);
        curl_easy_setopt(easy, CURLOPT_CAPATH, ca_path);
        curl_easy_setopt(easy, CURLOPT_CA_CACHE_TIMEOUT, 86400L);
        curl_easy_setopt(easy, CURLOPT_SSL_VERIFYPEER, prov->tls_verify ? 1L : 0L);
        curl_easy_setopt(easy, CURLOPT_SSL_VERIFYHOST, prov->tls_verify ? 2L : 0L);
        /* NULL leaves https_proxy, no_proxy and friends from the environment in charge. */
        curl_easy_setopt(easy, CURLOPT_PROXY, prov->proxy);
        /* libcurl 7.88 fails (or hangs) an HTTP/2 stream whose server answers before it has
         * read a body beyond its window (a provider's early 401/413/429 on a long context):
         * "Stream error in the HTTP/2 framing layer". Such bodies go over HTTP/1.1, and so does
         * a retry after that race hit a short one (proxy.c, decide_retry). */
        if (body_len > H2_BODY_MAX)
                http1 = true;
        curl_easy_setopt(easy, CURLOPT_HTTP_VERSION,
                         prov->http2 && !http1 ? (long) CURL_HTTP_VERSION_2TLS : (long) CURL_HTTP_VERSION_1_1);
        /* Over HTTP/2 a burst should wait for the connection being set up and share it rather
         * than open one connection each. Not for plain HTTP, nor for a transfer kept on HTTP/1.1:
         * nothing to share there, and the wait would serialise connection setup. */
        route = (struct upstream_route) {
                .provider = i < u->config->n_providers ? (int) i : -1,
                .multiplex = prov->http2 && https && !http1,
        };
        curl_easy_setopt(easy, CURLOPT_PIPEWAIT, route.multiplex ? 1L : 0L);
        return route;
}

enum upstream_failure upstream_failure_class(CURLcode res) {
        switch (res) {
        case CURLE_OK:
                return UPSTREAM_FAILURE_INVALID;
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_ISSUER_ERROR:
        case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
        case CURLE_SSL_INVALIDCERTSTATUS:
        case CURLE_SSL_CRL_BADFILE:
        case CURLE_SSL_CERTPROBLEM:
                return UPSTREAM_FAILURE_CERTIFICATE;
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_SSL_CIPHER:
        case CURLE_SSL_ENGINE_NOTFOUND:
        case CURLE_SSL_ENGINE_SETFAILED:
        case CURLE_SSL_ENGINE_INITFAILED:
        case CURLE_SSL_SHUTDOWN_FAILED:
        case CURLE_USE_SSL_FAILED:
                return UPSTREAM_FAILURE_TLS;
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
                return UPSTREAM_FAILURE_DNS;
        case CURLE_HTTP2_STREAM:
                return UPSTREAM_FAILURE_STREAM;
        default:
                return UPSTREAM_FAILURE_OTHER;
        }
}

const char *upstream_error_text(const struct upstream *u) {
        return u->error;
}

bool upstream_report_due(struct upstream *u, const struct config_provider *prov, int64_t now_ms,
                         int64_t interval_ms) {
        size_t i = (size_t) (prov - u->config->providers);

        if (i >= u->config->n_providers)
                return true;
        if (u->reported_ms[i] != 0 && now_ms - u->reported_ms[i] < interval_ms)
                return false;
        u->reported_ms[i] = now_ms;
        return true;
}
