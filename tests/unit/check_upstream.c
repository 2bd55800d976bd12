/* check_upstream.c — the curl multi handle driven by sd-event: transfers start, end, fail,
 * pause, get cancelled, and share connections; and which transport failures are the upstream's
 * configuration, not a key's.
 *
 * The upstream is a tiny HTTP/1.1 server written here, listening on 127.0.0.1 and served from the
 * same sd-event loop as the multi handle, so one thread drives both ends. What it answers depends
 * on the path:
 *   /ok/…       200, the path as body, connection kept
 *   /big/N      200, N bytes of 'x'
 *   /truncate   200 announcing 1000 bytes, 7 sent, then closed
 *   /silent     nothing, ever
 * Waiting is always for a condition (RUN_UNTIL, bounded), never a sleep.
 */
#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <curl/curl.h>
#include <systemd/sd-event.h>

#include "keypool/evloop.h"
#include "keypool/upstream.h"
#include "loop_wait.h"

#define MAX_XFERS       80

struct srv_conn {
        int fd;
        sd_event_source *source;
        char in[8192];
        size_t in_len;
        char *out;
        size_t out_len, out_off;
        bool close_when_written;
        struct srv_conn *next;
};

struct xfer {
        CURL *easy;
        char url[128];
        char *body;                     /* what the write callback was given */
        size_t body_len;
        unsigned n_done;
        bool running;                   /* started and not yet done or cancelled */
        CURLcode res;
        bool pause_first;               /* the first write pauses the transfer */
        bool paused;
        bool fail_in_write;             /* the first write refuses the data */
        bool abort_in_progress;         /* progress callback aborts once data came in */
        unsigned repeat;                /* done starts the same handle again until n_done reaches it */
        char error_text[CURL_ERROR_SIZE]; /* upstream_error_text as done saw it */
};

static struct harness {
        sd_event *event;
        struct evloop *loop;
        struct upstream *up;
        int listen_fd;
        sd_event_source *listen_source;
        unsigned short port;
        struct srv_conn *conns;
        unsigned accepted, requests, open, max_open;
        unsigned peer_closes;           /* connections curl closed */
        struct xfer xfers[MAX_XFERS];
        size_t n_xfers;
} H;

/* --- the upstream server ----------------------------------------------------------------- */

static void srv_close(struct srv_conn *sc) {
        for (struct srv_conn **p = &H.conns; *p; p = &(*p)->next)
                if (*p == sc) {
                        *p = sc->next;
                        break;
                }
        sd_event_source_disable_unref(sc->source);
        close(sc->fd);
        free(sc->out);
        free(sc);
        H.open--;
}

/* Writes what the socket takes. false when the connection was closed. */
static bool srv_flush(struct srv_conn *sc) {
        while (sc->out_off < sc->out_len) {
                ssize_t n = send(sc->fd, sc->out + sc->out_off, sc->out_len - sc->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);

                if (n < 0 && errno == EAGAIN)
                        break;
                if (n < 0) {
                        srv_close(sc);
                        return false;
                }
                sc->out_off += (size_t) n;
        }
        if (sc->out_off == sc->out_len && sc->close_when_written) {
                srv_close(sc);
                return false;
        }
        ck_assert_int_ge(sd_event_source_set_io_events(sc->source,
                                                       EPOLLIN | (sc->out_off < sc->out_len ? EPOLLOUT : 0)), 0);
        return true;
}

static void srv_queue(struct srv_conn *sc, const char *data, size_t len) {
        sc->out = realloc(sc->out, sc->out_len + len);
        ck_assert_ptr_nonnull(sc->out);
        memcpy(sc->out + sc->out_len, data, len);
        sc->out_len += len;
}

static void srv_answer(struct srv_conn *sc, const char *path) {
        char head[256];
        int n;

        H.requests++;
        if (strcmp(path, "/silent") == 0)
                return;
        if (strcmp(path, "/truncate") == 0) {
                n = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial");
                srv_queue(sc, head, (size_t) n);
                sc->close_when_written = true;
                return;
        }
        if (strncmp(path, "/big/", 5) == 0) {
                size_t size = strtoul(path + 5, NULL, 10);
                char *body = malloc(size);

                ck_assert_ptr_nonnull(body);
                memset(body, 'x', size);
                n = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n", size);
                srv_queue(sc, head, (size_t) n);
                srv_queue(sc, body, size);
                free(body);
                return;
        }
        n = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n%s", strlen(path), path);
        srv_queue(sc, head, (size_t) n);
}

static int on_srv_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct srv_conn *sc = userdata;
        char *end;

        if ((revents & EPOLLOUT) && !srv_flush(sc))
                return 0;
        if (!(revents & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                return 0;
        ck_assert_uint_lt(sc->in_len, sizeof sc->in - 1);
        ssize_t n = recv(fd, sc->in + sc->in_len, sizeof sc->in - 1 - sc->in_len, MSG_DONTWAIT);
        if (n < 0 && errno == EAGAIN)
                return 0;
        if (n <= 0) {
                H.peer_closes++;
                srv_close(sc);
                return 0;
        }
        sc->in_len += (size_t) n;
        sc->in[sc->in_len] = 0;
        /* Requests here have no body: each ends at its blank line. */
        while ((end = strstr(sc->in, "\r\n\r\n"))) {
                char path[256] = "";
                size_t used = (size_t) (end + 4 - sc->in);

                ck_assert_int_eq(sscanf(sc->in, "GET %255s HTTP/1.1", path), 1);
                srv_answer(sc, path);
                memmove(sc->in, sc->in + used, sc->in_len - used + 1);
                sc->in_len -= used;
        }
        srv_flush(sc);
        return 0;
}

static int on_srv_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        int cfd;

        while ((cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                struct srv_conn *sc = calloc(1, sizeof *sc);

                ck_assert_ptr_nonnull(sc);
                sc->fd = cfd;
                ck_assert_int_ge(sd_event_add_io(H.event, &sc->source, cfd, EPOLLIN, on_srv_io, sc), 0);
                sc->next = H.conns;
                H.conns = sc;
                H.accepted++;
                if (++H.open > H.max_open)
                        H.max_open = H.open;
        }
        return 0;
}

/* A TCP socket bound to a free port of 127.0.0.1; its port in ret_port. */
static int bound_socket(unsigned short *ret_port) {
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof a;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(bind(fd, (struct sockaddr *) &a, sizeof a), 0);
        ck_assert_int_eq(getsockname(fd, (struct sockaddr *) &a, &len), 0);
        *ret_port = ntohs(a.sin_port);
        return fd;
}

/* --- transfers --------------------------------------------------------------------------- */

static size_t on_write(char *data, size_t size, size_t n, void *userdata) {
        struct xfer *x = userdata;
        size_t len = size * n;

        if (x->pause_first && !x->paused) {
                x->paused = true;
                return CURL_WRITEFUNC_PAUSE;
        }
        if (x->fail_in_write)
                return 0;
        x->body = realloc(x->body, x->body_len + len + 1);
        ck_assert_ptr_nonnull(x->body);
        memcpy(x->body + x->body_len, data, len);
        x->body_len += len;
        x->body[x->body_len] = 0;
        return len;
}

static int on_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow) {
        struct xfer *x = userdata;

        return x->abort_in_progress && dlnow > 0;
}

static void xfer_start(struct xfer *x);

static void on_done(CURL *easy, CURLcode res, void *userdata) {
        struct xfer *x = userdata;

        ck_assert_ptr_eq(easy, x->easy);
        ck_assert_msg(x->running, "done called for a transfer that is not running");
        x->running = false;
        x->res = res;
        snprintf(x->error_text, sizeof x->error_text, "%s", upstream_error_text(H.up));
        x->n_done++;
        if (x->n_done < x->repeat)
                xfer_start(x);
}

/* A transfer of path from the test's server (or from port, when not 0), not yet started. */
static struct xfer *xfer_new_on(unsigned short port, const char *path) {
        struct xfer *x;

        ck_assert_uint_lt(H.n_xfers, MAX_XFERS);
        x = &H.xfers[H.n_xfers++];
        snprintf(x->url, sizeof x->url, "http://127.0.0.1:%u%s", port ? port : H.port, path);
        x->easy = curl_easy_init();
        ck_assert_ptr_nonnull(x->easy);
        curl_easy_setopt(x->easy, CURLOPT_URL, x->url);
        curl_easy_setopt(x->easy, CURLOPT_WRITEFUNCTION, on_write);
        curl_easy_setopt(x->easy, CURLOPT_WRITEDATA, x);
        curl_easy_setopt(x->easy, CURLOPT_XFERINFOFUNCTION, on_progress);
        curl_easy_setopt(x->easy, CURLOPT_XFERINFODATA, x);
        curl_easy_setopt(x->easy, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(x->easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(x->easy, CURLOPT_PROXY, "");          /* whatever the environment says */
        curl_easy_setopt(x->easy, CURLOPT_TIMEOUT, 30L);
        return x;
}

static struct xfer *xfer_new(const char *path) {
        return xfer_new_on(0, path);
}

static void xfer_start(struct xfer *x) {
        x->running = true;
        ck_assert_int_eq(upstream_start(H.up, x->easy, NULL, on_done, x), 0);
}

/* Runs x to its end. */
static void xfer_run(struct xfer *x) {
        xfer_start(x);
        RUN_UNTIL(H.event, x->n_done == 1);
}

/* Starts x against /silent and cancels it once the server has its request. */
static void cancel_after_request(struct xfer *x) {
        xfer_start(x);
        RUN_UNTIL(H.event, H.requests == 1);
        upstream_cancel(H.up, x->easy);
        x->running = false;
        ck_assert_uint_eq(upstream_running(H.up), 0);
}

static void assert_ok_with_body(const struct xfer *x, const char *body) {
        ck_assert_msg(x->res == CURLE_OK, "%s: %s", x->url, curl_easy_strerror(x->res));
        ck_assert_str_eq(x->body ? x->body : "", body);
}

static long connects_made(const struct xfer *x) {
        long n = -1;

        ck_assert_int_eq(curl_easy_getinfo(x->easy, CURLINFO_NUM_CONNECTS, &n), CURLE_OK);
        return n;
}

/* --- fixture ----------------------------------------------------------------------------- */

/* The first as a provider whose transfers may share connections (HTTPS, HTTP/2) is counted. */
static struct config_provider providers[2] = {
        { .name = "first", .base_url = "https://first.test", .http2 = true },
        { .name = "second" },
};
static const struct config config = { .providers = providers, .n_providers = 2 };

static void setup(void) {
        H = (struct harness) { .listen_fd = -1 };
        ck_assert_int_eq(curl_global_init(CURL_GLOBAL_DEFAULT), CURLE_OK);
        ck_assert_int_ge(sd_event_new(&H.event), 0);
        ck_assert_int_eq(evloop_new(H.event, &H.loop), 0);
        ck_assert_int_eq(upstream_new(H.loop, &config, &H.up), 0);
        H.listen_fd = bound_socket(&H.port);
        ck_assert_int_eq(listen(H.listen_fd, 128), 0);
        ck_assert_int_ge(sd_event_add_io(H.event, &H.listen_source, H.listen_fd, EPOLLIN, on_srv_accept, NULL), 0);
}

static void teardown(void) {
        for (size_t i = 0; i < H.n_xfers; i++) {
                if (H.xfers[i].running)
                        upstream_cancel(H.up, H.xfers[i].easy);
                curl_easy_cleanup(H.xfers[i].easy);
                free(H.xfers[i].body);
        }
        upstream_free(H.up);
        while (H.conns)
                srv_close(H.conns);
        sd_event_source_disable_unref(H.listen_source);
        close(H.listen_fd);
        evloop_free(H.loop);
        sd_event_unref(H.event);
        curl_global_cleanup();
}

/* --- tests ------------------------------------------------------------------------------- */

START_TEST(test_transfer_completes_and_done_gets_the_easy_handle_back)
{
        struct xfer *x = xfer_new("/ok/one");
        char *priv = (char *) x;

        xfer_start(x);
        ck_assert_uint_eq(upstream_running(H.up), 1);
        RUN_UNTIL(H.event, x->n_done == 1);
        assert_ok_with_body(x, "/ok/one");
        ck_assert_uint_eq(upstream_running(H.up), 0);
        /* done comes after the handle left the multi handle: its private pointer is cleared. */
        ck_assert_int_eq(curl_easy_getinfo(x->easy, CURLINFO_PRIVATE, &priv), CURLE_OK);
        ck_assert_ptr_null(priv);
}
END_TEST

START_TEST(test_large_answer_arrives_whole)
{
        struct xfer *x = xfer_new("/big/3000000");

        xfer_run(x);
        ck_assert_int_eq(x->res, CURLE_OK);
        ck_assert_uint_eq(x->body_len, 3000000);
        ck_assert_ptr_null(memchr(x->body, 0, x->body_len));
}
END_TEST

START_TEST(test_many_concurrent_transfers_all_complete_with_their_own_answers)
{
        enum { N = 64 };
        char path[32];

        for (int i = 0; i < N; i++) {
                snprintf(path, sizeof path, "/ok/%d", i);
                xfer_start(xfer_new(path));
        }
        ck_assert_uint_eq(upstream_running(H.up), N);
        RUN_UNTIL(H.event, upstream_running(H.up) == 0);
        for (int i = 0; i < N; i++) {
                snprintf(path, sizeof path, "/ok/%d", i);
                ck_assert_uint_eq(H.xfers[i].n_done, 1);
                assert_ok_with_body(&H.xfers[i], path);
        }
        /* They ran side by side, each on a connection of its own, not one after another. */
        ck_assert_uint_gt(H.max_open, 1);
        ck_assert_uint_eq(H.requests, N);
}
END_TEST

/* Starts n transfers of path counted as its provider's (providers[0]: HTTPS, HTTP/2) sharing
 * connections, as upstream_configure routes them for such a provider. */
static void start_sharing(unsigned n, const char *path) {
        const struct upstream_route route = { .provider = 0, .multiplex = true };

        for (unsigned i = 0; i < n; i++) {
                struct xfer *x = xfer_new(path);

                x->running = true;
                ck_assert_int_eq(upstream_start(H.up, x->easy, &route, on_done, x), 0);
        }
}

START_TEST(test_a_provider_assumed_to_share_connections_that_does_not_gets_one_per_transfer)
{
        enum { N = 20 };

        /* Counted as sharing until seen not to, the 20 get a limit of a few connections; the test
         * server speaks HTTP/1.1, so the second ready while the first carries one shows it, and
         * the transfers the lower limit held must then go. The server never answers /silent:
         * no transfer ends to move curl on by itself. */
        start_sharing(N, "/silent");
        RUN_UNTIL(H.event, H.requests == N);
        ck_assert_uint_eq(H.max_open, N);
        ck_assert_uint_eq(upstream_running(H.up), N);
}
END_TEST

START_TEST(test_transfers_held_by_the_limit_are_woken_behind_one_waiting_for_another_host)
{
        struct xfer *first = xfer_new("/silent"), *second = xfer_new("/silent");
        char resolve[64];
        struct curl_slist *hosts;
        enum { N = 20 };

        /* Two transfers to another host asking for HTTP/2 and to wait for its first connection:
         * that one never gets an answer, so curl never learns whether it could share it and the
         * second waits at the head of curl's queue, ahead of those the limit holds. */
        snprintf(resolve, sizeof resolve, "other.test:%u:127.0.0.1", H.port);
        hosts = curl_slist_append(NULL, resolve);
        ck_assert_ptr_nonnull(hosts);
        for (struct xfer *x = first; x; x = x == first ? second : NULL) {
                snprintf(x->url, sizeof x->url, "http://other.test:%u/silent", H.port);
                curl_easy_setopt(x->easy, CURLOPT_URL, x->url);
                curl_easy_setopt(x->easy, CURLOPT_RESOLVE, hosts);
                curl_easy_setopt(x->easy, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_2_0);
                curl_easy_setopt(x->easy, CURLOPT_PIPEWAIT, 1L);
                xfer_start(x);
                RUN_UNTIL(H.event, H.requests == 1);
        }
        start_sharing(N, "/silent");
        RUN_UNTIL(H.event, H.requests == 1 + N);
        ck_assert_uint_eq(upstream_running(H.up), 2 + N);
        for (size_t i = 0; i < H.n_xfers; i++) {
                upstream_cancel(H.up, H.xfers[i].easy);
                H.xfers[i].running = false;
        }
        curl_slist_free_all(hosts);
}
END_TEST

START_TEST(test_idle_connection_is_reused_by_the_next_transfer)
{
        struct xfer *a = xfer_new("/ok/a"), *b = xfer_new("/ok/b");

        xfer_run(a);
        run_idle(H.event);
        xfer_run(b);
        assert_ok_with_body(a, "/ok/a");
        assert_ok_with_body(b, "/ok/b");
        ck_assert_uint_eq(H.accepted, 1);
        ck_assert_int_eq(connects_made(a), 1);
        ck_assert_int_eq(connects_made(b), 0);
}
END_TEST

/* With no connection idle a transfer skips curl's search for one (CURLOPT_FRESH_CONNECT); that
 * must not stop the next from reusing the connection it leaves idle. */
START_TEST(test_a_connection_opened_while_every_other_was_busy_is_reused_once_idle)
{
        struct xfer *busy = xfer_new("/silent"), *b = xfer_new("/ok/b"), *c = xfer_new("/ok/c");

        xfer_start(busy);
        RUN_UNTIL(H.event, H.requests == 1);
        xfer_run(b);
        run_idle(H.event);
        xfer_run(c);
        assert_ok_with_body(b, "/ok/b");
        assert_ok_with_body(c, "/ok/c");
        ck_assert_int_eq(connects_made(b), 1);
        ck_assert_int_eq(connects_made(c), 0);
        ck_assert_uint_eq(H.accepted, 2);
}
END_TEST

START_TEST(test_easy_handle_started_again_from_its_done_callback_runs_again)
{
        struct xfer *x = xfer_new("/ok/again");

        x->repeat = 3;
        xfer_start(x);
        RUN_UNTIL(H.event, x->n_done == 3);
        ck_assert_int_eq(x->res, CURLE_OK);
        ck_assert_str_eq(x->body, "/ok/again/ok/again/ok/again");
        ck_assert_uint_eq(H.requests, 3);
        ck_assert_uint_eq(H.accepted, 1);
        ck_assert_uint_eq(upstream_running(H.up), 0);
}
END_TEST

START_TEST(test_idle_connection_closed_by_the_upstream_is_replaced_not_reported)
{
        struct xfer *a = xfer_new("/ok/a"), *b = xfer_new("/ok/b");

        xfer_run(a);
        run_idle(H.event);
        /* Closed while curl keeps it idle in its cache: its socket wakes, and the loop must
         * neither fail nor spin on it. */
        ck_assert_uint_eq(H.open, 1);
        srv_close(H.conns);
        run_idle(H.event);
        xfer_run(b);
        assert_ok_with_body(a, "/ok/a");
        assert_ok_with_body(b, "/ok/b");
        ck_assert_uint_eq(H.accepted, 2);
}
END_TEST

START_TEST(test_connection_refused_is_reported_as_couldnt_connect)
{
        unsigned short port;
        int fd = bound_socket(&port);   /* bound, never listening: connecting is refused */
        struct xfer *x = xfer_new_on(port, "/ok/x");

        xfer_run(x);
        ck_assert_int_eq(x->res, CURLE_COULDNT_CONNECT);
        ck_assert_uint_eq(upstream_running(H.up), 0);
        close(fd);
}
END_TEST

START_TEST(test_done_callback_reads_curls_full_text_of_the_failure)
{
        unsigned short port;
        int fd = bound_socket(&port);
        struct xfer *x = xfer_new_on(port, "/ok/x");

        xfer_run(x);
        ck_assert_int_eq(x->res, CURLE_COULDNT_CONNECT);
        ck_assert_msg(strstr(x->error_text, "127.0.0.1") != NULL,
                      "the text names what failed, beyond curl's code: '%s'", x->error_text);
        ck_assert_str_eq(upstream_error_text(H.up), "");
        close(fd);
}
END_TEST

START_TEST(test_transport_failures_are_reported_once_per_interval_and_provider)
{
        ck_assert(upstream_report_due(H.up, &providers[0], 1000, 60000));
        ck_assert(!upstream_report_due(H.up, &providers[0], 30000, 60000));
        ck_assert_msg(upstream_report_due(H.up, &providers[1], 30000, 60000), "each provider has its own interval");
        ck_assert(upstream_report_due(H.up, &providers[0], 61000, 60000));
}
END_TEST

START_TEST(test_upstream_closing_mid_answer_is_reported_as_partial)
{
        struct xfer *x = xfer_new("/truncate");

        xfer_run(x);
        ck_assert_int_eq(x->res, CURLE_PARTIAL_FILE);
        ck_assert_str_eq(x->body, "partial");
}
END_TEST

START_TEST(test_silent_upstream_times_out_through_the_timer)
{
        struct xfer *x = xfer_new("/silent");
        uint64_t t0 = loop_now_usec();

        curl_easy_setopt(x->easy, CURLOPT_TIMEOUT_MS, 200L);
        xfer_run(x);
        ck_assert_int_eq(x->res, CURLE_OPERATION_TIMEDOUT);
        ck_assert_uint_ge(loop_now_usec() - t0, 200 * 1000);
        ck_assert_uint_eq(H.requests, 1);
}
END_TEST

START_TEST(test_write_callback_refusing_data_ends_the_transfer_with_write_error)
{
        struct xfer *x = xfer_new("/ok/refused"), *next = xfer_new("/ok/next");

        x->fail_in_write = true;
        xfer_run(x);
        ck_assert_int_eq(x->res, CURLE_WRITE_ERROR);
        ck_assert_uint_eq(upstream_running(H.up), 0);
        /* The multi handle carries on. */
        xfer_run(next);
        assert_ok_with_body(next, "/ok/next");
}
END_TEST

START_TEST(test_progress_callback_aborting_ends_the_transfer_as_aborted)
{
        struct xfer *x = xfer_new("/big/2000000");

        x->abort_in_progress = true;
        xfer_run(x);
        ck_assert_int_eq(x->res, CURLE_ABORTED_BY_CALLBACK);
        ck_assert_uint_lt(x->body_len, 2000000);
}
END_TEST

START_TEST(test_cancelled_transfer_never_calls_done_and_its_connection_is_dropped)
{
        struct xfer *x = xfer_new("/silent");

        cancel_after_request(x);
        RUN_UNTIL(H.event, H.peer_closes == 1);
        run_idle(H.event);
        ck_assert_uint_eq(x->n_done, 0);
}
END_TEST

/* Transfers reach curl from a queue (upstream_start): one cancelled while still in it is taken
 * out, never reaches the upstream, and does not hold up the one queued behind it. */
START_TEST(test_transfer_cancelled_before_curl_had_it_never_runs_and_the_next_does)
{
        struct xfer *a = xfer_new("/ok/a"), *b = xfer_new("/ok/b"), *c = xfer_new("/ok/c");

        xfer_start(a);
        xfer_start(b);
        xfer_start(c);
        upstream_cancel(H.up, b->easy);
        b->running = false;
        ck_assert_uint_eq(upstream_running(H.up), 2);
        RUN_UNTIL(H.event, a->n_done == 1 && c->n_done == 1);
        assert_ok_with_body(a, "/ok/a");
        assert_ok_with_body(c, "/ok/c");
        ck_assert_uint_eq(b->n_done, 0);
        ck_assert_uint_eq(H.requests, 2);
}
END_TEST

START_TEST(test_cancelled_easy_handle_can_be_started_again)
{
        struct xfer *x = xfer_new("/silent");

        cancel_after_request(x);
        upstream_cancel(H.up, x->easy);         /* a second cancel is harmless */
        ck_assert_uint_eq(upstream_running(H.up), 0);

        snprintf(x->url, sizeof x->url, "http://127.0.0.1:%u/ok/retry", H.port);
        curl_easy_setopt(x->easy, CURLOPT_URL, x->url);
        xfer_run(x);
        assert_ok_with_body(x, "/ok/retry");
}
END_TEST

START_TEST(test_paused_transfer_waits_and_completes_after_resume)
{
        struct xfer *x = xfer_new("/big/300000");

        x->pause_first = true;
        xfer_start(x);
        RUN_UNTIL(H.event, x->paused);
        run_idle(H.event);
        ck_assert_uint_eq(x->n_done, 0);
        ck_assert_uint_eq(x->body_len, 0);
        ck_assert_uint_eq(upstream_running(H.up), 1);

        upstream_resume(H.up, x->easy);
        RUN_UNTIL(H.event, x->n_done == 1);
        ck_assert_int_eq(x->res, CURLE_OK);
        ck_assert_uint_eq(x->body_len, 300000);
}
END_TEST

START_TEST(test_handle_kept_after_its_transfer_can_be_freed_after_the_upstream)
{
        struct xfer *x = xfer_new("/ok/kept");

        /* Like the proxy's spare handles: the handle outlives the upstream, and neither the
         * upstream's share (TLS sessions, DNS) nor anything else of it stays pinned by it. */
        upstream_configure(H.up, x->easy, &(struct config_provider) {
                .name = "plain", .base_url = "http://127.0.0.1", .http2 = true, .tls_verify = true,
        }, 0, false);
        xfer_run(x);
        assert_ok_with_body(x, "/ok/kept");
        upstream_free(H.up);
        H.up = NULL;
}
END_TEST

/* --- which failures blame no key (pure) ---------------------------------------------------- */

START_TEST(test_certificate_problems_are_certificate_failures)
{
        /* Unknown CA, wrong name and expired all arrive as CURLE_PEER_FAILED_VERIFICATION. */
        ck_assert_int_eq(upstream_failure_class(CURLE_PEER_FAILED_VERIFICATION), UPSTREAM_FAILURE_CERTIFICATE);
        ck_assert_int_eq(upstream_failure_class(CURLE_SSL_CACERT_BADFILE), UPSTREAM_FAILURE_CERTIFICATE);
        ck_assert_int_eq(upstream_failure_class(CURLE_SSL_PINNEDPUBKEYNOTMATCH), UPSTREAM_FAILURE_CERTIFICATE);
}
END_TEST

START_TEST(test_a_failed_handshake_is_a_tls_failure_that_may_mend)
{
        ck_assert_int_eq(upstream_failure_class(CURLE_SSL_CONNECT_ERROR), UPSTREAM_FAILURE_TLS);
}
END_TEST

START_TEST(test_unresolvable_names_are_dns_failures)
{
        ck_assert_int_eq(upstream_failure_class(CURLE_COULDNT_RESOLVE_HOST), UPSTREAM_FAILURE_DNS);
        ck_assert_int_eq(upstream_failure_class(CURLE_COULDNT_RESOLVE_PROXY), UPSTREAM_FAILURE_DNS);
}
END_TEST

START_TEST(test_refused_reset_and_timed_out_are_other_failures)
{
        ck_assert_int_eq(upstream_failure_class(CURLE_COULDNT_CONNECT), UPSTREAM_FAILURE_OTHER);
        ck_assert_int_eq(upstream_failure_class(CURLE_RECV_ERROR), UPSTREAM_FAILURE_OTHER);
        ck_assert_int_eq(upstream_failure_class(CURLE_OPERATION_TIMEDOUT), UPSTREAM_FAILURE_OTHER);
        ck_assert_int_eq(upstream_failure_class(CURLE_HTTP2), UPSTREAM_FAILURE_OTHER);
        ck_assert_int_eq(upstream_failure_class(CURLE_HTTP2_STREAM), UPSTREAM_FAILURE_STREAM);
}
END_TEST

START_TEST(test_success_is_no_failure)
{
        ck_assert_int_eq(upstream_failure_class(CURLE_OK), UPSTREAM_FAILURE_INVALID);
}
END_TEST

static Suite *upstream_suite(void) {
        Suite *s = suite_create("upstream");
        TCase *ok = tcase_create("transfers"), *bad = tcase_create("failures"),
              *ctl = tcase_create("control"), *cls = tcase_create("failure_class");

        tcase_add_checked_fixture(ok, setup, teardown);
        tcase_add_test(ok, test_transfer_completes_and_done_gets_the_easy_handle_back);
        tcase_add_test(ok, test_large_answer_arrives_whole);
        tcase_add_test(ok, test_many_concurrent_transfers_all_complete_with_their_own_answers);
        tcase_add_test(ok, test_a_provider_assumed_to_share_connections_that_does_not_gets_one_per_transfer);
        tcase_add_test(ok, test_transfers_held_by_the_limit_are_woken_behind_one_waiting_for_another_host);
        tcase_add_test(ok, test_idle_connection_is_reused_by_the_next_transfer);
        tcase_add_test(ok, test_a_connection_opened_while_every_other_was_busy_is_reused_once_idle);
        tcase_add_test(ok, test_transfer_cancelled_before_curl_had_it_never_runs_and_the_next_does);
        tcase_add_test(ok, test_easy_handle_started_again_from_its_done_callback_runs_again);
        tcase_add_test(ok, test_idle_connection_closed_by_the_upstream_is_replaced_not_reported);
        suite_add_tcase(s, ok);

        tcase_add_checked_fixture(bad, setup, teardown);
        tcase_add_test(bad, test_connection_refused_is_reported_as_couldnt_connect);
        tcase_add_test(bad, test_done_callback_reads_curls_full_text_of_the_failure);
        tcase_add_test(bad, test_transport_failures_are_reported_once_per_interval_and_provider);
        tcase_add_test(bad, test_upstream_closing_mid_answer_is_reported_as_partial);
        tcase_add_test(bad, test_silent_upstream_times_out_through_the_timer);
        tcase_add_test(bad, test_write_callback_refusing_data_ends_the_transfer_with_write_error);
        tcase_add_test(bad, test_progress_callback_aborting_ends_the_transfer_as_aborted);
        suite_add_tcase(s, bad);

        tcase_add_checked_fixture(ctl, setup, teardown);
        tcase_add_test(ctl, test_cancelled_transfer_never_calls_done_and_its_connection_is_dropped);
        tcase_add_test(ctl, test_cancelled_easy_handle_can_be_started_again);
        tcase_add_test(ctl, test_paused_transfer_waits_and_completes_after_resume);
        tcase_add_test(ctl, test_handle_kept_after_its_transfer_can_be_freed_after_the_upstream);
        suite_add_tcase(s, ctl);

        tcase_add_test(cls, test_certificate_problems_are_certificate_failures);
        tcase_add_test(cls, test_a_failed_handshake_is_a_tls_failure_that_may_mend);
        tcase_add_test(cls, test_unresolvable_names_are_dns_failures);
        tcase_add_test(cls, test_refused_reset_and_timed_out_are_other_failures);
        tcase_add_test(cls, test_success_is_no_failure);
        suite_add_tcase(s, cls);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(upstream_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
