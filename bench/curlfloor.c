/* curlfloor.c — what one core does with libcurl alone: the floor under keypoold's design.
 *
 * keypoold must make its upstream calls with libcurl, so part of its per-request cost is not its
 * own. This tool measures that part in isolation: one process, one curl multi handle driven by
 * epoll the way src/upstream.c drives it (CURLMOPT_SOCKETFUNCTION and TIMERFUNCTION, connection
 * sockets kept in the epoll set while idle, kept-alive connections, CURLMOPT_MAXCONNECTS 256, a
 * share handle for TLS sessions and DNS answers),
 * and N transfers always in flight: when one ends, its easy handle starts the next at once
 * (closed loop). Each transfer is what keypoold's proxy asks of curl: a POST of the bench's body
 * to the upstream with the easy options of src/proxy.c's easy_get(), and per request the URL,
 * the body and a fresh header list (Authorization with a fake key, Content-Type, "Expect:").
 * The answer's body is copied into a small buffer, as keypoold keeps a buffered answer.
 *
 * There is no client side: no accept, no request parsing, no key choice, no answer to relay. The
 * result is one line on stdout, "CURLFLOOR key=value ...", with the CPU time the process used
 * (getrusage, user + system) per request over the measured window.
 *
 * Over HTTPS, --cacert FILE trusts FILE alone (a provider's ca_file) and --http2 asks for HTTP/2
 * with PIPEWAIT as a provider with http2 = true (the default) does; without --http2, HTTP/1.1.
 *
 * --burst ROUNDS is the other mode, the floor under the bench's cold burst: N transfers started at
 * once, all waited for, ROUNDS times on the same multi handle. The first round is cold (no
 * connection, no TLS session, no CA store yet: what a fresh worker has); the later ones find the
 * connections the first left, as warm workers do. Each transfer's time from its start to its end
 * goes to --latencies FILE as "ROUND MICROSECONDS ok|failed" lines, and a "CURLFLOOR mode=burst"
 * line per round says how many ended well. A round not over in BURST_DEADLINE_SEC ends the run.
 *
 * Usage: curlfloor -u URL [-c N] [-d SEC] [-w SEC] [-B FILE] [--cacert FILE] [--http2]
 *                  [--burst ROUNDS --latencies FILE]
 * Not part of the autotools build: bench/run builds it with gcc -O2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#define NS_PER_SEC      1000000000ULL
#define NS_PER_MS       1000000ULL
#define EVENT_BATCH     256
#define ANSWER_KEEP     4096            /* bytes of each answer kept, as a buffered answer is */
#define BURST_DEADLINE_SEC 120U         /* a --burst round longer than this has hung */

/* Obviously fake, and as long as the bench's keys so that the header is the same size. */
#define FAKE_KEY        "sk-or-v1-fake-00000000000000000000000000000000000000000000000001"

static const char default_body[] =
        "{\"model\":\"bench/model\",\"messages\":[{\"role\":\"system\",\"content\":\"You are terse.\"},"
        "{\"role\":\"user\",\"content\":\"Say hello in one short sentence.\"}],\"max_tokens\":32}";

/* What we know of a descriptor curl uses, indexed by its number (as in src/upstream.c). */
enum {
        FD_CONN         = 1 << 0,
        FD_REGISTERED   = 1 << 1,
        FD_WATCHED      = 1 << 2,
};

struct fd_state {
        uint8_t flags;
        uint32_t events;
};

struct transfer {
        CURL *easy;
        uint64_t started;               /* --burst: when it went into the multi handle */
        struct curl_slist *headers;
        size_t answer_len;
        char answer[ANSWER_KEEP];
};

static struct {
        const char *url;
        const char *body;
        size_t body_len;
        const char *cacert;
        bool http2;
        unsigned conns;
        unsigned burst;                 /* rounds of --burst, 0 for the closed loop */
        const char *latencies;
        double duration, warmup;
} opt = { .conns = 16, .duration = 5 };

static struct {
        CURLM *multi;
        CURLSH *share;                  /* as src/upstream.c's: new connections resume sessions */
        int epfd;
        struct fd_state *fds;
        size_t n_fds;
        struct transfer *xfers;
        bool kick;                      /* curl asked to be called now */
        uint64_t deadline;              /* curl's timeout, 0 when none */
        bool measuring, stopping;
        uint64_t completed, errors;     /* in the measured window */
        uint64_t completed_total, errors_total;
        FILE *latencies;                /* --burst */
        unsigned round;
} g;

static void die(const char *what) {
        fprintf(stderr, "curlfloor: %s: %s\n", what, strerror(errno));
        exit(1);
}

static uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * NS_PER_SEC + (uint64_t) ts.tv_nsec;
}

static uint64_t cpu_us(void) {
        struct rusage ru;

        getrusage(RUSAGE_SELF, &ru);
        return (uint64_t) (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 +
               (uint64_t) (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

/* --- the epoll integration, as src/upstream.c does it -------------------------------------- */

static struct fd_state *fd_state(int fd) {
        if (fd < 0)
                return NULL;
        if ((size_t) fd >= g.n_fds) {
                size_t n = g.n_fds ? g.n_fds : 64;
                struct fd_state *p;

                while (n <= (size_t) fd)
                        n *= 2;
                p = reallocarray(g.fds, n, sizeof *p);
                if (!p)
                        return NULL;
                memset(p + g.n_fds, 0, (n - g.n_fds) * sizeof *p);
                g.fds = p;
                g.n_fds = n;
        }
        return &g.fds[fd];
}

static int fd_register(int fd, struct fd_state *st, uint32_t events) {
        struct epoll_event ev = { .events = events, .data.fd = fd };

        if (events == 0) {
                if (st->flags & FD_REGISTERED)
                        (void) epoll_ctl(g.epfd, EPOLL_CTL_DEL, fd, NULL);
                st->flags &= (uint8_t) ~FD_REGISTERED;
                return 0;
        }
        if ((st->flags & FD_REGISTERED) && st->events == events)
                return 0;
        if (epoll_ctl(g.epfd, (st->flags & FD_REGISTERED) ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev) < 0)
                return -1;
        st->flags |= FD_REGISTERED;
        st->events = events;
        return 0;
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
        struct fd_state *st = fd_state(fd);
        uint32_t events = 0;

        if (!st)
                return -1;
        if (what == CURL_POLL_REMOVE) {
                st->flags &= (uint8_t) ~FD_WATCHED;
                if (!(st->flags & FD_CONN))
                        fd_register(fd, st, 0);
                return 0;
        }
        if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
                events |= EPOLLIN;
        if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
                events |= EPOLLOUT;
        st->flags |= FD_WATCHED;
        return fd_register(fd, st, events);
}

static curl_socket_t open_socket_cb(void *userp, curlsocktype purpose, struct curl_sockaddr *addr) {
        struct fd_state *st;
        int fd;

        fd = socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol);
        if (fd < 0)
                return CURL_SOCKET_BAD;
        st = fd_state(fd);
        if (!st) {
                close(fd);
                return CURL_SOCKET_BAD;
        }
        if (st->flags & FD_REGISTERED)
                (void) epoll_ctl(g.epfd, EPOLL_CTL_DEL, fd, NULL);
        *st = (struct fd_state) { .flags = FD_CONN };
        return fd;
}

static int close_socket_cb(void *userp, curl_socket_t fd) {
        if ((size_t) fd < g.n_fds)
                g.fds[fd] = (struct fd_state) {};
        return close(fd);
}

/* sd-event's "defer" source for 0, its timer for the rest: here a flag and a deadline that the
 * loop turns into epoll_wait's timeout. */
static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
        if (timeout_ms < 0) {
                g.kick = false;
                g.deadline = 0;
        } else if (timeout_ms == 0) {
                g.kick = true;
                g.deadline = 0;
        } else {
                g.kick = false;
                g.deadline = now_ns() + (uint64_t) timeout_ms * NS_PER_MS;
        }
        return 0;
}

/* --- transfers ----------------------------------------------------------------------------- */

static size_t on_header(char *data, size_t size, size_t nmemb, void *userdata) {
        return size * nmemb;
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *userdata) {
        struct transfer *t = userdata;
        size_t len = size * nmemb, n = len;

        if (n > ANSWER_KEEP - t->answer_len)
                n = ANSWER_KEEP - t->answer_len;
        memcpy(t->answer + t->answer_len, data, n);
        t->answer_len += n;
        return len;
}

/* The options that do not change between requests, as src/proxy.c's easy_get() sets them. */
static CURL *easy_new(void) {
        CURL *easy = curl_easy_init();

        if (!easy)
                return NULL;
        curl_easy_setopt(easy, CURLOPT_POST, 1L);
        curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT, 10L);
        curl_easy_setopt(easy, CURLOPT_TIMEOUT, 600L);
        curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
        curl_easy_setopt(easy, CURLOPT_TCP_NODELAY, 1L);
        curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
        /* As src/upstream.c's upstream_configure() for a provider with ca_file and http2. */
        if (opt.cacert) {
                curl_easy_setopt(easy, CURLOPT_CAINFO, opt.cacert);
                curl_easy_setopt(easy, CURLOPT_CAPATH, NULL);
                curl_easy_setopt(easy, CURLOPT_CA_CACHE_TIMEOUT, 86400L);
        }
        curl_easy_setopt(easy, CURLOPT_HTTP_VERSION,
                         opt.http2 ? (long) CURL_HTTP_VERSION_2TLS : (long) CURL_HTTP_VERSION_1_1);
        curl_easy_setopt(easy, CURLOPT_PIPEWAIT,
                         opt.http2 && strncmp(opt.url, "https://", 8) == 0 ? 1L : 0L);
        return easy;
}

/* One request on t's handle: what keypoold sets per attempt, then into the multi handle. */
static void transfer_start(struct transfer *t) {
        char auth[128];

        curl_slist_free_all(t->headers);
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", FAKE_KEY);
        t->headers = curl_slist_append(NULL, auth);
        t->headers = curl_slist_append(t->headers, "Content-Type: application/json");
        t->headers = curl_slist_append(t->headers, "Expect:");
        if (!t->headers)
                die("curl_slist_append");
        t->answer_len = 0;
        curl_easy_setopt(t->easy, CURLOPT_URL, opt.url);
        curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, opt.body);
        curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) opt.body_len);
        curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->headers);
        curl_easy_setopt(t->easy, CURLOPT_HEADERDATA, t);
        curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t);
        curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t);
        curl_easy_setopt(t->easy, CURLOPT_SHARE, g.share);
        curl_easy_setopt(t->easy, CURLOPT_OPENSOCKETFUNCTION, open_socket_cb);
        curl_easy_setopt(t->easy, CURLOPT_CLOSESOCKETFUNCTION, close_socket_cb);
        t->started = now_ns();
        if (curl_multi_add_handle(g.multi, t->easy) != CURLM_OK) {
                fprintf(stderr, "curlfloor: curl_multi_add_handle failed\n");
                exit(1);
        }
}

static void collect_done(void) {
        CURLMsg *m;
        int left;

        while ((m = curl_multi_info_read(g.multi, &left))) {
                struct transfer *t = NULL;
                CURL *easy = m->easy_handle;
                long status = 0;
                bool failed;

                if (m->msg != CURLMSG_DONE)
                        continue;
                failed = m->data.result != CURLE_OK;
                curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &t);
                curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
                curl_multi_remove_handle(g.multi, easy);
                failed = failed || status != 200;
                g.completed_total++;
                g.errors_total += failed;
                if (g.measuring) {
                        g.completed++;
                        g.errors += failed;
                }
                if (g.latencies)
                        fprintf(g.latencies, "%u %.1f %s\n", g.round, (double) (now_ns() - t->started) / 1000.0,
                                failed ? "failed" : "ok");
                if (!g.stopping)
                        transfer_start(t);
        }
}

static void sockets_ready(struct epoll_event *ev, int n) {
        int still;

        for (int i = 0; i < n; i++) {
                int fd = ev[i].data.fd;
                struct fd_state *st = (size_t) fd < g.n_fds ? &g.fds[fd] : NULL;
                int action = 0;

                if (st && !(st->flags & FD_WATCHED)) {
                        fd_register(fd, st, 0);
                        continue;
                }
                if (ev[i].events & EPOLLIN)
                        action |= CURL_CSELECT_IN;
                if (ev[i].events & EPOLLOUT)
                        action |= CURL_CSELECT_OUT;
                if (ev[i].events & (EPOLLERR | EPOLLHUP))
                        action |= CURL_CSELECT_ERR;
                curl_multi_socket_action(g.multi, fd, action, &still);
        }
        collect_done();
}

static void curl_timeout(void) {
        int still;

        curl_multi_socket_action(g.multi, CURL_SOCKET_TIMEOUT, 0, &still);
        collect_done();
}

/* Waits on the sockets and curl's timer once; the loop of both modes. */
static void step(uint64_t until) {
        struct epoll_event ev[EVENT_BATCH];
        uint64_t now = now_ns();
        int n, timeout_ms = 100;

        if (g.kick) {
                g.kick = false;
                curl_timeout();
                return;
        }
        if (g.deadline && now >= g.deadline) {
                g.deadline = 0;
                curl_timeout();
                return;
        }
        /* Wake for curl's deadline, the caller's, or at least every 100 ms. */
        if (g.deadline && (g.deadline - now) / NS_PER_MS + 1 < (uint64_t) timeout_ms)
                timeout_ms = (int) ((g.deadline - now) / NS_PER_MS + 1);
        if (until && until > now && (until - now) / NS_PER_MS + 1 < (uint64_t) timeout_ms)
                timeout_ms = (int) ((until - now) / NS_PER_MS + 1);
        n = epoll_wait(g.epfd, ev, EVENT_BATCH, timeout_ms);
        if (n < 0 && errno != EINTR)
                die("epoll_wait");
        if (n > 0)
                sockets_ready(ev, n);
}

/* --burst: every round starts all N transfers at once and waits for the last; nothing restarts. */
static int run_bursts(void) {
        g.stopping = true;
        g.measuring = true;
        /* As keypoold's workers after a burst: the connections a round opened stay for the next. */
        curl_multi_setopt(g.multi, CURLMOPT_MAXCONNECTS, (long) opt.conns + 16);
        for (g.round = 1; g.round <= opt.burst; g.round++) {
                uint64_t start = now_ns(), before = g.completed, errors = g.errors;

                for (unsigned i = 0; i < opt.conns; i++)
                        transfer_start(&g.xfers[i]);
                while (g.completed - before < opt.conns) {
                        if (now_ns() - start > BURST_DEADLINE_SEC * NS_PER_SEC) {
                                fprintf(stderr, "curlfloor: burst round %u not over after %u s\n", g.round,
                                        BURST_DEADLINE_SEC);
                                return 1;
                        }
                        step(start + BURST_DEADLINE_SEC * NS_PER_SEC);
                }
                printf("CURLFLOOR mode=burst round=%u conns=%u ok=%" PRIu64 " errors=%" PRIu64 " duration_s=%.3f\n",
                       g.round, opt.conns, opt.conns - (g.errors - errors), g.errors - errors,
                       (double) (now_ns() - start) / NS_PER_SEC);
        }
        fflush(stdout);
        return g.errors ? 1 : 0;
}

/* --- main ---------------------------------------------------------------------------------- */

static void usage(FILE *out) {
        fprintf(out,
                "Usage: curlfloor -u URL [OPTIONS]\n"
                "  -u URL        the upstream to POST to\n"
                "  -c N          transfers always in flight (default 16)\n"
                "  -d SEC        measured duration (default 5)\n"
                "  -w SEC        warm-up before the measurement (default 0)\n"
                "  -B FILE       request body from FILE (default: the bench's chat completion)\n"
                "  --cacert FILE trust FILE alone for HTTPS (as a provider's ca_file)\n"
                "  --http2       HTTP/2 over TLS, waiting to multiplex (default: HTTP/1.1)\n"
                "  --burst R     R rounds of N transfers started at once (the first one cold)\n"
                "  --latencies F each burst transfer's time, \"ROUND MICROSECONDS ok|failed\" per line, to F\n");
}

static char *read_file(const char *path, size_t *ret_len) {
        FILE *f = fopen(path, "rb");
        char *s = NULL;
        size_t cap = 0, len = 0, n;

        if (!f)
                die(path);
        do {
                if (len + 4096 > cap) {
                        cap = cap ? cap * 2 : 8192;
                        s = realloc(s, cap);
                        if (!s)
                                die("realloc");
                }
                n = fread(s + len, 1, cap - len, f);
                len += n;
        } while (n > 0);
        fclose(f);
        *ret_len = len;
        return s;
}

int main(int argc, char **argv) {
        char *body_owned = NULL;
        uint64_t t0, window_start, window_end, t_start = 0, t_end = 0, cpu_start = 0, cpu_end = 0;
        double window;
        static const struct option longopts[] = {
                { "cacert", required_argument, NULL, 'A' },
                { "http2", no_argument, NULL, '2' },
                { "burst", required_argument, NULL, 'b' },
                { "latencies", required_argument, NULL, 'L' },
                { NULL, 0, NULL, 0 },
        };
        int o;

        opt.body = default_body;
        opt.body_len = sizeof default_body - 1;
        while ((o = getopt_long(argc, argv, "u:c:d:w:B:h", longopts, NULL)) != -1) {
                switch (o) {
                case 'A': opt.cacert = optarg; break;
                case '2': opt.http2 = true; break;
                case 'b': opt.burst = (unsigned) strtoul(optarg, NULL, 10); break;
                case 'L': opt.latencies = optarg; break;
                case 'u': opt.url = optarg; break;
                case 'c': opt.conns = (unsigned) strtoul(optarg, NULL, 10); break;
                case 'd': opt.duration = atof(optarg); break;
                case 'w': opt.warmup = atof(optarg); break;
                case 'B':
                        free(body_owned);
                        body_owned = read_file(optarg, &opt.body_len);
                        opt.body = body_owned;
                        break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (!opt.url || opt.conns == 0 || opt.duration <= 0 || opt.warmup < 0 ||
            (opt.burst && !opt.latencies)) {
                usage(stderr);
                return 2;
        }
        signal(SIGPIPE, SIG_IGN);
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
                fprintf(stderr, "curlfloor: curl_global_init failed\n");
                return 1;
        }

        g.epfd = epoll_create1(EPOLL_CLOEXEC);
        g.multi = curl_multi_init();
        g.share = curl_share_init();
        g.xfers = calloc(opt.conns, sizeof *g.xfers);
        if (g.epfd < 0 || !g.multi || !g.share || !g.xfers ||
            curl_share_setopt(g.share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK ||
            curl_share_setopt(g.share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) != CURLSHE_OK)
                die("setup");
        curl_multi_setopt(g.multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
        curl_multi_setopt(g.multi, CURLMOPT_TIMERFUNCTION, timer_cb);
        curl_multi_setopt(g.multi, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX);
        curl_multi_setopt(g.multi, CURLMOPT_MAXCONNECTS, 256L);
        /* As src/upstream.c limits a provider that shares connections: one per 64 transfers and
         * 4 more (without it, curl 7.88 opens one connection per transfer beyond the first
         * connection's 100 streams when they all start at once). */
        if (opt.http2)
                curl_multi_setopt(g.multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long) ((opt.conns + 63) / 64 + 4));
        for (unsigned i = 0; i < opt.conns; i++) {
                g.xfers[i].easy = easy_new();
                if (!g.xfers[i].easy)
                        die("curl_easy_init");
        }

        if (opt.burst) {
                int r;

                g.latencies = fopen(opt.latencies, "w");
                if (!g.latencies)
                        die(opt.latencies);
                r = run_bursts();
                fclose(g.latencies);
                return r;
        }

        t0 = now_ns();
        window_start = t0 + (uint64_t) (opt.warmup * (double) NS_PER_SEC);
        window_end = window_start + (uint64_t) (opt.duration * (double) NS_PER_SEC);
        for (unsigned i = 0; i < opt.conns; i++)
                transfer_start(&g.xfers[i]);

        for (;;) {
                uint64_t now = now_ns();

                if (!g.measuring && now >= window_start) {
                        g.measuring = true;
                        t_start = now;
                        cpu_start = cpu_us();
                }
                if (now >= window_end) {
                        cpu_end = cpu_us();
                        t_end = now_ns();
                        break;
                }
                step(g.measuring ? window_end : window_start);
        }

        window = (double) (t_end - t_start) / NS_PER_SEC;
        printf("CURLFLOOR conns=%u duration_s=%.3f requests=%" PRIu64 " rps=%.1f cpu_us_per_req=%.2f"
               " cpu_s=%.3f errors=%" PRIu64 " total=%" PRIu64 " errors_total=%" PRIu64 " body_bytes=%zu\n",
               opt.conns, window, g.completed, window > 0 ? (double) g.completed / window : 0,
               g.completed ? (double) (cpu_end - cpu_start) / (double) g.completed : 0,
               (double) (cpu_end - cpu_start) / 1e6, g.errors, g.completed_total, g.errors_total,
               opt.body_len);
        fflush(stdout);

        g.stopping = true;
        for (unsigned i = 0; i < opt.conns; i++) {
                curl_multi_remove_handle(g.multi, g.xfers[i].easy);
                curl_easy_cleanup(g.xfers[i].easy);
                curl_slist_free_all(g.xfers[i].headers);
        }
        curl_multi_cleanup(g.multi);
        curl_share_cleanup(g.share);
        curl_global_cleanup();
        close(g.epfd);
        free(g.xfers);
        free(g.fds);
        free(body_owned);
        return g.completed_total > 0 && g.errors_total == g.completed_total ? 1 : 0;
}
