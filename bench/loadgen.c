/* loadgen.c — the benchmark's HTTP/1.1 load generator, for UNIX sockets as well as TCP.
 *
 * wrk cannot reach a UNIX socket, and keypool's first interface is one, so this small tool drives
 * both with the same code: one thread, epoll, non-blocking keep-alive connections, responses
 * parsed with http-parser (the parser wrk itself uses). Three ways to offer load:
 *
 *   closed loop   -c N: N connections, each sends its next request as soon as the last answer
 *                 is complete (what wrk does);
 *   open loop     -R RATE: requests are due at fixed intervals whatever the server does, and are
 *                 sent on whichever of the N connections is idle; latency counts from the moment
 *                 a request was due, not from when a connection was free to send it, so a slow
 *                 server cannot hide its queueing (no coordinated omission, as in wrk2);
 *   one shot      -o: every connection sends one request, reads the whole answer (a stream that
 *                 may last minutes), and closes: how the 10,000-streams test holds its load.
 *
 * Latencies go into a log-bucketed histogram (64 linear sub-buckets per power of two, so any
 * percentile is within 1/64 of the truth, as HdrHistogram does with 2 significant digits). The
 * result is one line on stdout, "LOADGEN key=value ...", for scripts.
 *
 * Not part of the autotools build: bench/run builds it with gcc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <http_parser.h>

#define NS_PER_SEC      1000000000ULL
#define NS_PER_MS       1000000ULL
#define READ_BUF        (256 * 1024)
#define MAX_EVENTS      1024
#define TIMER_TAG       UINT64_MAX

/* --- histogram ----------------------------------------------------------------------------- */

#define SUB_BITS        6
#define SUB_COUNT       (1u << SUB_BITS)                /* 64 */
#define HIST_BUCKETS    (SUB_COUNT * 2 + 58 * SUB_COUNT)

struct hist {
        uint64_t count[HIST_BUCKETS];
        uint64_t n, max, sum;
};

static unsigned hist_index(uint64_t v) {
        unsigned msb, shift;

        if (v < 2 * SUB_COUNT)
                return (unsigned) v;
        msb = 63 - (unsigned) __builtin_clzll(v);
        shift = msb - SUB_BITS;                         /* >= 1 */
        return 2 * SUB_COUNT + (shift - 1) * SUB_COUNT + (unsigned) ((v >> shift) - SUB_COUNT);
}

/* The middle of the bucket: the estimate a percentile reports. */
static uint64_t hist_value(unsigned i) {
        unsigned shift;
        uint64_t sub;

        if (i < 2 * SUB_COUNT)
                return i;
        shift = (i - 2 * SUB_COUNT) / SUB_COUNT + 1;
        sub = (i - 2 * SUB_COUNT) % SUB_COUNT + SUB_COUNT;
        return (sub << shift) + ((1ULL << shift) >> 1);
}

static void hist_add(struct hist *h, uint64_t v) {
        unsigned i = hist_index(v);

        if (i >= HIST_BUCKETS)
                i = HIST_BUCKETS - 1;
        h->count[i]++;
        h->n++;
        h->sum += v;
        if (v > h->max)
                h->max = v;
}

static uint64_t hist_percentile(const struct hist *h, double p) {
        uint64_t want, seen = 0;

        if (h->n == 0)
                return 0;
        want = (uint64_t) ceil(p / 100.0 * (double) h->n);
        if (want < 1)
                want = 1;
        for (unsigned i = 0; i < HIST_BUCKETS; i++) {
                seen += h->count[i];
                if (seen >= want) {
                        uint64_t v = hist_value(i);
                        return v > h->max ? h->max : v;
                }
        }
        return h->max;
}

/* --- options and state --------------------------------------------------------------------- */

enum conn_state {
        CONN_FREE = 0,          /* no socket (waiting to connect, or done in one-shot mode) */
        CONN_CONNECTING,
        CONN_IDLE,              /* connected, no request outstanding */
        CONN_SENDING,
        CONN_RECEIVING,
};

struct conn {
        int fd;
        enum conn_state state;
        size_t sent;
        uint64_t t_start;       /* when the request was due (open loop) or sent */
        uint64_t retry_at;      /* CONN_FREE: when to connect again; 0 never */
        http_parser parser;
        bool complete;
        bool done;              /* one-shot: finished, nothing more to do */
        unsigned idx;
};

static struct {
        const char *unix_path;
        struct sockaddr_in tcp;
        bool is_tcp;
        unsigned conns;
        double duration, warmup, timeout;
        double rate;            /* open loop requests/s, 0: closed loop */
        double connect_rate;    /* one-shot: new connections/s, 0: all at once */
        uint64_t max_requests;  /* stop after this many completions, 0: none */
        bool one_shot;
        bool progress;
        const char *label;
        char *request;
        size_t request_len;
} opt = {
        .conns = 1, .duration = 5, .warmup = 0, .timeout = 30, .label = "-",
};

static struct {
        int epfd, timerfd;
        struct conn *conns;
        unsigned *idle;                 /* stack of idle connection indices (open loop) */
        unsigned n_idle;
        uint64_t *due;                  /* ring of due times not yet sent (open loop) */
        size_t due_cap, due_head, due_len;
        uint64_t scheduled;             /* open loop: requests made due so far */
        uint64_t t0, window_start, window_end, hard_end;
        uint64_t completed_total, completed_window, ok_window, non2xx, bytes_read;
        uint64_t err_connect, err_io, err_timeout, connect_retries;
        unsigned inflight, peak_inflight, opened, finished;
        unsigned next_unopened;         /* connections below this have been started once */
        unsigned n_retry;               /* connections waiting to reconnect (an upper bound) */
        uint64_t peak_at;
        struct hist hist;
        bool stopping;
        char *buf;
} g;

static uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * NS_PER_SEC + (uint64_t) ts.tv_nsec;
}

static void die(const char *what) {
        fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
        exit(2);
}

/* --- connections --------------------------------------------------------------------------- */

static int on_message_complete(http_parser *p) {
        struct conn *c = p->data;

        c->complete = true;
        /* Stop here: anything after the answer would be a server bug, not the next answer. */
        http_parser_pause(p, 1);
        return 0;
}

static const http_parser_settings parser_settings = {
        .on_message_complete = on_message_complete,
};

static void conn_close(struct conn *c) {
        if (c->fd >= 0) {
                close(c->fd);
                c->fd = -1;
        }
        if (c->state == CONN_SENDING || c->state == CONN_RECEIVING)
                g.inflight--;
        c->state = CONN_FREE;
}

static void idle_push(struct conn *c) {
        c->state = CONN_IDLE;
        g.idle[g.n_idle++] = c->idx;
}

static void idle_remove(struct conn *c) {
        for (unsigned i = 0; i < g.n_idle; i++)
                if (g.idle[i] == c->idx) {
                        g.idle[i] = g.idle[--g.n_idle];
                        return;
                }
}

static void conn_failed(struct conn *c, uint64_t *counter, uint64_t now) {
        bool had_request = c->state == CONN_SENDING || c->state == CONN_RECEIVING;

        if (c->state == CONN_IDLE)
                idle_remove(c);
        (*counter)++;
        conn_close(c);
        if (opt.one_shot && (had_request || counter == &g.err_connect)) {
                c->done = true;
                g.finished++;
                return;
        }
        c->retry_at = now + 10 * NS_PER_MS;
        g.n_retry++;
}

static void conn_send(struct conn *c, uint64_t t_start, uint64_t now);

static void conn_start(struct conn *c, uint64_t now) {
        int fd, r;

        fd = socket(opt.is_tcp ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                die("socket");
        if (opt.is_tcp) {
                int one = 1;

                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                r = connect(fd, (struct sockaddr *) &opt.tcp, sizeof opt.tcp);
        } else {
                struct sockaddr_un sa = { .sun_family = AF_UNIX };

                snprintf(sa.sun_path, sizeof sa.sun_path, "%s", opt.unix_path);
                r = connect(fd, (struct sockaddr *) &sa, sizeof sa);
        }
        if (r < 0 && errno == EAGAIN && !opt.is_tcp) {
                /* A UNIX listener's backlog is full: the server is slow to accept, not refusing.
                 * Try again shortly, as a client library with a retry would. */
                close(fd);
                g.connect_retries++;
                c->retry_at = now + NS_PER_MS;
                return;
        }
        if (r < 0 && errno != EINPROGRESS) {
                close(fd);
                c->fd = -1;
                c->state = CONN_FREE;
                conn_failed(c, &g.err_connect, now);
                return;
        }
        c->fd = fd;
        c->retry_at = 0;
        g.opened++;
        {
                struct epoll_event ev = {
                        .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                        .data.u64 = c->idx,
                };
                if (epoll_ctl(g.epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
                        die("epoll_ctl");
        }
        if (r < 0) {
                c->state = CONN_CONNECTING;
                return;
        }
        c->state = CONN_IDLE;
        if (opt.rate > 0)
                idle_push(c);
        else if (!g.stopping)
                conn_send(c, now, now);
}

static void conn_write(struct conn *c, uint64_t now) {
        while (c->sent < opt.request_len) {
                ssize_t n = write(c->fd, opt.request + c->sent, opt.request_len - c->sent);

                if (n < 0) {
                        if (errno == EAGAIN)
                                return;         /* EPOLLOUT will say when */
                        if (errno == EINTR)
                                continue;
                        conn_failed(c, &g.err_io, now);
                        return;
                }
                c->sent += (size_t) n;
        }
        c->state = CONN_RECEIVING;
}

static void conn_send(struct conn *c, uint64_t t_start, uint64_t now) {
        c->state = CONN_SENDING;
        c->sent = 0;
        c->t_start = t_start;
        c->complete = false;
        http_parser_init(&c->parser, HTTP_RESPONSE);
        c->parser.data = c;
        g.inflight++;
        if (g.inflight > g.peak_inflight) {
                g.peak_inflight = g.inflight;
                g.peak_at = now;
        }
        conn_write(c, now);
}

static void dispatch_due(uint64_t now);

static void conn_answered(struct conn *c, uint64_t now) {
        unsigned status = c->parser.status_code;
        bool keep = http_should_keep_alive(&c->parser);

        g.inflight--;
        c->state = CONN_IDLE;
        g.completed_total++;
        if (now >= g.window_start && now < g.window_end) {
                g.completed_window++;
                if (status >= 200 && status < 400) {
                        g.ok_window++;
                        hist_add(&g.hist, now - c->t_start);
                }
        }
        if (status < 200 || status >= 400)
                g.non2xx++;
        if (opt.max_requests && g.completed_total >= opt.max_requests)
                g.stopping = true;

        if (opt.one_shot) {
                conn_close(c);
                c->done = true;
                g.finished++;
                return;
        }
        if (!keep) {
                conn_close(c);
                c->retry_at = now;
                g.n_retry++;
                return;
        }
        if (g.stopping)
                return;
        if (opt.rate > 0) {
                idle_push(c);
                dispatch_due(now);
        } else
                conn_send(c, now, now);
}

static void conn_read(struct conn *c, uint64_t now) {
        for (;;) {
                ssize_t n = read(c->fd, g.buf, READ_BUF);
                size_t used;

                if (n < 0) {
                        if (errno == EAGAIN)
                                return;
                        if (errno == EINTR)
                                continue;
                        conn_failed(c, &g.err_io, now);
                        return;
                }
                if (c->state != CONN_RECEIVING && c->state != CONN_SENDING) {
                        /* Idle: the server closed the keep-alive connection (or spoke out of turn). */
                        if (c->state == CONN_IDLE)
                                idle_remove(c);
                        conn_close(c);
                        c->retry_at = now;
                        g.n_retry++;
                        return;
                }
                g.bytes_read += (uint64_t) n;
                used = http_parser_execute(&c->parser, &parser_settings, g.buf, (size_t) n);
                if (c->complete) {
                        conn_answered(c, now);
                        return;
                }
                if (n == 0 || HTTP_PARSER_ERRNO(&c->parser) != HPE_OK || used != (size_t) n) {
                        conn_failed(c, &g.err_io, now);
                        return;
                }
                /* A short read drained the socket: with edge triggering, the next byte to arrive
                 * raises a new event, so no read is needed to see EAGAIN. */
                if ((size_t) n < READ_BUF)
                        return;
        }
}

static void conn_event(struct conn *c, uint32_t events, uint64_t now) {
        if (c->state == CONN_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;

                if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
                        return;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                        conn_failed(c, &g.err_connect, now);
                        return;
                }
                if (opt.rate > 0)
                        idle_push(c);
                else if (!g.stopping)
                        conn_send(c, now, now);
                else
                        c->state = CONN_IDLE;
                return;
        }
        if ((events & EPOLLOUT) && c->state == CONN_SENDING)
                conn_write(c, now);
        if (c->fd >= 0 && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                conn_read(c, now);
}

/* --- open loop ---------------------------------------------------------------------------- */

static void due_push(uint64_t t) {
        if (g.due_len == g.due_cap) {
                size_t cap = g.due_cap ? g.due_cap * 2 : 1024;
                uint64_t *n = malloc(cap * sizeof *n);

                if (!n)
                        die("malloc");
                for (size_t i = 0; i < g.due_len; i++)
                        n[i] = g.due[(g.due_head + i) % g.due_cap];
                free(g.due);
                g.due = n;
                g.due_cap = cap;
                g.due_head = 0;
        }
        g.due[(g.due_head + g.due_len) % g.due_cap] = t;
        g.due_len++;
}

static void dispatch_due(uint64_t now) {
        while (g.due_len > 0 && g.n_idle > 0 && !g.stopping) {
                struct conn *c = &g.conns[g.idle[--g.n_idle]];
                uint64_t t = g.due[g.due_head];

                g.due_head = (g.due_head + 1) % g.due_cap;
                g.due_len--;
                conn_send(c, t, now);
        }
}

static void schedule_due(uint64_t now) {
        double interval = (double) NS_PER_SEC / opt.rate;

        for (;;) {
                uint64_t t = g.t0 + (uint64_t) ((double) g.scheduled * interval);

                if (t > now || t >= g.window_end)
                        break;
                due_push(t);
                g.scheduled++;
        }
        dispatch_due(now);
}

/* --- main ---------------------------------------------------------------------------------- */

static void usage(FILE *out) {
        fprintf(out,
                "Usage: loadgen (-U SOCKET | -T HOST:PORT) [OPTIONS]\n"
                "  -U PATH       connect to a UNIX stream socket\n"
                "  -T HOST:PORT  connect over TCP (IPv4)\n"
                "  -c N          connections (default 1)\n"
                "  -d SEC        measured duration (default 5)\n"
                "  -w SEC        warm-up before the measurement (default 0)\n"
                "  -R RATE       open loop: RATE requests/s in all (default: closed loop)\n"
                "  -n N          stop after N answers in all\n"
                "  -o            one request per connection, then close (streams); -d is the deadline\n"
                "  -C RATE       with -o: open at most RATE connections/s (default: all at once)\n"
                "  -t SEC        a request not answered in SEC is a timeout error (default 30)\n"
                "  -m METHOD     (default POST)\n"
                "  -p PATH       (default /v1/chat/completions)\n"
                "  -b BODY       request body\n"
                "  -B FILE       request body from FILE\n"
                "  -H 'N: V'     extra request header (repeatable)\n"
                "  -l LABEL      label in the result line\n"
                "  -P            progress lines on stderr every second\n");
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

static void build_request(const char *method, const char *path, const char *body, size_t body_len,
                          char **headers, unsigned n_headers) {
        size_t cap = 1024 + body_len, len;
        char *r = malloc(cap);

        if (!r)
                die("malloc");
        for (unsigned i = 0; i < n_headers; i++)
                cap += strlen(headers[i]) + 2;
        r = realloc(r, cap);
        if (!r)
                die("realloc");
        len = (size_t) snprintf(r, cap, "%s %s HTTP/1.1\r\nHost: %s\r\n", method, path,
                                opt.is_tcp ? "127.0.0.1" : "localhost");
        if (body)
                len += (size_t) snprintf(r + len, cap - len,
                                         "Content-Type: application/json\r\nContent-Length: %zu\r\n", body_len);
        for (unsigned i = 0; i < n_headers; i++)
                len += (size_t) snprintf(r + len, cap - len, "%s\r\n", headers[i]);
        len += (size_t) snprintf(r + len, cap - len, "\r\n");
        if (body) {
                memcpy(r + len, body, body_len);
                len += body_len;
        }
        opt.request = r;
        opt.request_len = len;
}

static void parse_tcp(const char *s) {
        char host[64];
        const char *colon = strrchr(s, ':');

        if (!colon || (size_t) (colon - s) >= sizeof host) {
                fprintf(stderr, "loadgen: -T wants HOST:PORT\n");
                exit(2);
        }
        memcpy(host, s, (size_t) (colon - s));
        host[colon - s] = 0;
        opt.tcp.sin_family = AF_INET;
        opt.tcp.sin_port = htons((uint16_t) atoi(colon + 1));
        if (inet_pton(AF_INET, strcmp(host, "localhost") == 0 ? "127.0.0.1" : host, &opt.tcp.sin_addr) != 1) {
                fprintf(stderr, "loadgen: bad IPv4 address '%s'\n", host);
                exit(2);
        }
        opt.is_tcp = true;
}

static void check_timeouts(uint64_t now) {
        uint64_t limit = (uint64_t) (opt.timeout * (double) NS_PER_SEC);

        for (unsigned i = 0; i < opt.conns; i++) {
                struct conn *c = &g.conns[i];

                if ((c->state == CONN_SENDING || c->state == CONN_RECEIVING) && now - c->t_start > limit)
                        conn_failed(c, &g.err_timeout, now);
        }
}

/* Connections due to (re)connect. Never-opened ones go in index order from a cursor, so a
 * 10,000-connection ramp costs nothing per loop; reconnects (rare) are found by a scan. */
static void start_pending(uint64_t now) {
        uint64_t allowed = opt.conns;

        if (opt.one_shot && opt.connect_rate > 0)
                allowed = (uint64_t) ((double) (now - g.t0) / (double) NS_PER_SEC * opt.connect_rate) + 1;
        if (g.n_retry > 0) {
                g.n_retry = 0;
                for (unsigned i = 0; i < g.next_unopened; i++) {
                        struct conn *c = &g.conns[i];

                        if (c->state != CONN_FREE || c->done || c->retry_at == 0)
                                continue;
                        if (c->retry_at > now) {
                                g.n_retry++;
                                continue;
                        }
                        conn_start(c, now);
                        if (c->state == CONN_FREE && !c->done)
                                g.n_retry++;
                }
        }
        while (g.next_unopened < opt.conns && g.opened < allowed) {
                struct conn *c = &g.conns[g.next_unopened];

                conn_start(c, now);
                if (c->fd < 0 && c->retry_at != 0 && !c->done)
                        break;          /* the backlog is full: the cursor waits */
                g.next_unopened++;
        }
}

int main(int argc, char **argv) {
        const char *method = "POST", *path = "/v1/chat/completions", *body = NULL;
        bool body_owned = false;
        size_t body_len = 0;
        char **headers = calloc((size_t) argc, sizeof *headers);
        unsigned n_headers = 0;
        struct epoll_event events[MAX_EVENTS];
        uint64_t next_check = 0, next_start = 0, next_progress = 0;
        int o;

        while ((o = getopt(argc, argv, "U:T:c:d:w:R:n:oC:t:m:p:b:B:H:l:Ph")) != -1) {
                switch (o) {
                case 'U': opt.unix_path = optarg; break;
                case 'T': parse_tcp(optarg); break;
                case 'c': opt.conns = (unsigned) strtoul(optarg, NULL, 10); break;
                case 'd': opt.duration = atof(optarg); break;
                case 'w': opt.warmup = atof(optarg); break;
                case 'R': opt.rate = atof(optarg); break;
                case 'n': opt.max_requests = strtoull(optarg, NULL, 10); break;
                case 'o': opt.one_shot = true; break;
                case 'C': opt.connect_rate = atof(optarg); break;
                case 't': opt.timeout = atof(optarg); break;
                case 'm': method = optarg; break;
                case 'p': path = optarg; break;
                case 'b':
                        if (body_owned)
                                free((char *) body);
                        body = optarg;
                        body_len = strlen(optarg);
                        body_owned = false;
                        break;
                case 'B':
                        if (body_owned)
                                free((char *) body);
                        body = read_file(optarg, &body_len);
                        body_owned = true;
                        break;
                case 'H': headers[n_headers++] = optarg; break;
                case 'l': opt.label = optarg; break;
                case 'P': opt.progress = true; break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (!opt.unix_path == !opt.is_tcp || opt.conns == 0 || opt.duration <= 0) {
                usage(stderr);
                return 2;
        }
        build_request(method, path, body, body_len, headers, n_headers);
        signal(SIGPIPE, SIG_IGN);

        g.buf = malloc(READ_BUF);
        g.conns = calloc(opt.conns, sizeof *g.conns);
        g.idle = calloc(opt.conns, sizeof *g.idle);
        g.epfd = epoll_create1(EPOLL_CLOEXEC);
        if (!g.buf || !g.conns || !g.idle || g.epfd < 0)
                die("setup");

        g.t0 = now_ns();
        g.window_start = g.t0 + (uint64_t) (opt.warmup * (double) NS_PER_SEC);
        g.window_end = g.window_start + (uint64_t) (opt.duration * (double) NS_PER_SEC);
        g.hard_end = g.window_end;
        if (opt.one_shot) {
                /* Every answer counts, however long the stream; -d is the deadline. */
                g.window_start = g.t0;
        }
        for (unsigned i = 0; i < opt.conns; i++) {
                g.conns[i].fd = -1;
                g.conns[i].idx = i;
                g.conns[i].retry_at = g.t0;
        }
        if (opt.rate > 0) {
                struct itimerspec its = {};
                uint64_t step = (uint64_t) ((double) NS_PER_SEC / opt.rate);
                struct epoll_event ev = { .events = EPOLLIN, .data.u64 = TIMER_TAG };

                if (step < 1000)
                        step = 1000;    /* above 1M/s the timer only batches: the schedule is exact anyway */
                g.timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
                its.it_value.tv_nsec = 1;
                its.it_interval.tv_sec = (time_t) (step / NS_PER_SEC);
                its.it_interval.tv_nsec = (long) (step % NS_PER_SEC);
                if (g.timerfd < 0 || timerfd_settime(g.timerfd, 0, &its, NULL) < 0 ||
                    epoll_ctl(g.epfd, EPOLL_CTL_ADD, g.timerfd, &ev) < 0)
                        die("timerfd");
        }

        start_pending(g.t0);
        for (;;) {
                uint64_t now = now_ns();
                int n, timeout_ms;

                if (now >= g.hard_end)
                        break;
                if (g.stopping && (g.inflight == 0 || opt.max_requests))
                        break;
                if (opt.one_shot && g.finished >= opt.conns)
                        break;
                timeout_ms = 10;
                n = epoll_wait(g.epfd, events, MAX_EVENTS, timeout_ms);
                if (n < 0 && errno != EINTR)
                        die("epoll_wait");
                now = now_ns();
                for (int i = 0; i < n; i++) {
                        if (events[i].data.u64 == TIMER_TAG) {
                                uint64_t ticks;

                                (void) !read(g.timerfd, &ticks, sizeof ticks);
                                schedule_due(now);
                                continue;
                        }
                        conn_event(&g.conns[events[i].data.u64], events[i].events, now);
                }
                if (now >= next_start) {
                        start_pending(now);
                        next_start = now + 2 * NS_PER_MS;
                }
                if (now >= next_check) {
                        check_timeouts(now);
                        next_check = now + 100 * NS_PER_MS;
                }
                if (opt.rate > 0)
                        dispatch_due(now);
                if (opt.progress && now >= next_progress) {
                        fprintf(stderr, "loadgen: t=%.1fs open=%u inflight=%u done=%" PRIu64 " failed=%" PRIu64 "\n",
                                (double) (now - g.t0) / NS_PER_SEC, g.opened, g.inflight, g.completed_total,
                                g.err_connect + g.err_io + g.err_timeout);
                        next_progress = now + NS_PER_SEC;
                }
        }

        {
                uint64_t end = now_ns();
                double window;
                unsigned unfinished = 0;

                if (end > g.window_end)
                        end = g.window_end;
                if (opt.one_shot || opt.max_requests)
                        end = now_ns();
                window = (double) (end - g.window_start) / NS_PER_SEC;
                if (opt.one_shot)
                        for (unsigned i = 0; i < opt.conns; i++)
                                unfinished += !g.conns[i].done;
                printf("LOADGEN label=%s transport=%s conns=%u mode=%s rate=%.0f duration_s=%.3f"
                       " requests=%" PRIu64 " ok=%" PRIu64 " rps=%.1f"
                       " p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f mean_us=%.1f"
                       " total=%" PRIu64 " non2xx=%" PRIu64 " err_connect=%" PRIu64 " err_io=%" PRIu64
                       " err_timeout=%" PRIu64 " unfinished=%u connect_retries=%" PRIu64
                       " peak_inflight=%u peak_at_s=%.3f bytes=%" PRIu64 " backlog=%zu\n",
                       opt.label, opt.is_tcp ? "tcp" : "unix", opt.conns,
                       opt.one_shot ? "oneshot" : opt.rate > 0 ? "open" : "closed", opt.rate, window,
                       g.completed_window, g.ok_window, window > 0 ? (double) g.completed_window / window : 0,
                       hist_percentile(&g.hist, 50) / 1e3, hist_percentile(&g.hist, 90) / 1e3,
                       hist_percentile(&g.hist, 99) / 1e3, hist_percentile(&g.hist, 99.9) / 1e3,
                       g.hist.max / 1e3, g.hist.n ? (double) g.hist.sum / (double) g.hist.n / 1e3 : 0,
                       g.completed_total, g.non2xx, g.err_connect, g.err_io, g.err_timeout, unfinished,
                       g.connect_retries, g.peak_inflight,
                       g.peak_at ? (double) (g.peak_at - g.t0) / NS_PER_SEC : 0, g.bytes_read, g.due_len);
        }
        fflush(stdout);
        for (unsigned i = 0; i < opt.conns; i++)
                if (g.conns[i].fd >= 0)
                        close(g.conns[i].fd);
        free(g.conns);
        free(g.idle);
        free(g.due);
        free(g.buf);
        free(opt.request);
        free(headers);
        if (body_owned)
                free((char *) body);
        return 0;
}
