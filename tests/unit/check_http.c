/* check_http.c — client connections: requests in, answers out, limits and timeouts.
 *
 * Each test drives one real http_conn over a socketpair(2) from a real sd-event loop: the test is
 * the client on the other end. Waiting is always for a condition (RUN_UNTIL, bounded), or for the
 * loop to have nothing left to do (run_idle), never a sleep.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <jansson.h>
#include <systemd/sd-event.h>

#include "keypool/evloop.h"
#include "keypool/http.h"
#include "loop_wait.h"

#define MAX_SEEN        16

enum answer_mode {
        ANSWER_AT_ONCE = 1,     /* on_request answers 200 with the URL as body */
        ANSWER_LATER,           /* the test answers */
        ANSWER_ABORT,           /* on_request aborts the connection */
};

/* A request as the handler saw it, copied out. */
struct seen {
        char *method, *url, *body;
        size_t body_len;
        bool keep_alive;
        unsigned short major, minor;
        size_t n_fields;
        char **names, **values;
};

static struct harness {
        sd_event *event;
        struct evloop *loop;
        struct http_poller *poller;
        struct http_conn *conn;         /* NULL once on_closed ran */
        int client;
        sd_event_source *client_source;
        struct http_limits limits;
        enum answer_mode mode;
        struct seen seen[MAX_SEEN];
        size_t n_seen;
        int request_marker;             /* request data the handler attaches */
        size_t n_aborts, n_drains;
        void *aborted_data;
        bool closed;
        char *in;                       /* every byte the client received */
        size_t in_len, in_cap;
        bool client_eof;
} H;

/* --- the handler ------------------------------------------------------------------------- */

static char *copy(const char *s, size_t len) {
        char *p = malloc(len + 1);

        ck_assert_ptr_nonnull(p);
        memcpy(p, s, len);
        p[len] = 0;
        return p;
}

static void on_request(struct http_conn *c, struct http_request *r, void *userdata) {
        struct seen *s;
        char seq[16];

        ck_assert_ptr_eq(userdata, &H);
        ck_assert_uint_lt(H.n_seen, MAX_SEEN);
        s = &H.seen[H.n_seen++];
        s->method = copy(r->method, strlen(r->method));
        s->url = copy(r->url, strlen(r->url));
        s->body = copy(r->body, r->body_len);
        s->body_len = r->body_len;
        s->keep_alive = r->keep_alive;
        s->major = r->major;
        s->minor = r->minor;
        s->n_fields = r->n_fields;
        s->names = calloc(r->n_fields + 1, sizeof *s->names);
        s->values = calloc(r->n_fields + 1, sizeof *s->values);
        for (size_t i = 0; i < r->n_fields; i++) {
                s->names[i] = copy(r->fields[i].name, strlen(r->fields[i].name));
                s->values[i] = copy(r->fields[i].value, strlen(r->fields[i].value));
        }
        http_conn_set_request_data(c, &H.request_marker);

        switch (H.mode) {
        case ANSWER_AT_ONCE:
                snprintf(seq, sizeof seq, "%zu", H.n_seen);
                ck_assert_int_eq(http_conn_respond(c, 200, (const struct http_header[]) { { "X-Seq", seq } }, 1,
                                                   r->url, strlen(r->url)), 0);
                break;
        case ANSWER_ABORT:
                http_conn_abort(c);
                break;
        default:
                break;
        }
}

static void on_abort(struct http_conn *c, void *request_data) {
        H.n_aborts++;
        H.aborted_data = request_data;
}

static void on_drain(struct http_conn *c, void *request_data) {
        ck_assert_ptr_eq(request_data, &H.request_marker);
        H.n_drains++;
}

static void on_closed(struct http_conn *c, void *userdata) {
        ck_assert_ptr_eq(c, H.conn);
        H.closed = true;
        H.conn = NULL;
}

static const struct http_handler handler = {
        .on_request = on_request,
        .on_abort = on_abort,
        .on_drain = on_drain,
        .on_closed = on_closed,
};

/* A second client of the same poller, for what its connections share (the body budget): its
 * requests are held, never answered. */
static struct other {
        struct http_conn *conn;         /* NULL once on_closed ran */
        int client;
        size_t n_seen;
} O;

static void other_on_request(struct http_conn *c, struct http_request *r, void *userdata) {
        O.n_seen++;
}

static void other_on_closed(struct http_conn *c, void *userdata) {
        ck_assert_ptr_eq(c, O.conn);
        O.conn = NULL;
}

static const struct http_handler other_handler = {
        .on_request = other_on_request,
        .on_closed = other_on_closed,
};

/* --- the client end ---------------------------------------------------------------------- */

static int on_client_readable(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        for (;;) {
                ssize_t n;

                if (H.in_cap - H.in_len < 4096) {
                        H.in_cap = H.in_cap ? H.in_cap * 2 : 64 * 1024;
                        H.in = realloc(H.in, H.in_cap);
                        ck_assert_ptr_nonnull(H.in);
                }
                n = recv(fd, H.in + H.in_len, H.in_cap - H.in_len - 1, MSG_DONTWAIT);
                if (n > 0) {
                        H.in_len += (size_t) n;
                        H.in[H.in_len] = 0;
                        continue;
                }
                if (n == 0 || errno == ECONNRESET) {
                        H.client_eof = true;
                        sd_event_source_set_enabled(s, SD_EVENT_OFF);
                }
                return 0;
        }
}

static void client_reads(bool on) {
        if (!H.client_eof)
                ck_assert_int_ge(sd_event_source_set_enabled(H.client_source, on ? SD_EVENT_ON : SD_EVENT_OFF), 0);
}

static void client_send_bytes(const void *data, size_t len) {
        ck_assert_int_eq(send(H.client, data, len, MSG_NOSIGNAL), (ssize_t) len);
}

static void client_send(const char *s) {
        client_send_bytes(s, strlen(s));
}

/* The answer ANSWER_AT_ONCE gives for the n-th request. */
static char *expected_answer(size_t n, const char *url, bool close) {
        char *s;

        ck_assert_int_ge(asprintf(&s, "HTTP/1.1 200 OK\r\nX-Seq: %zu\r\nConnection: %s\r\nContent-Length: %zu\r\n\r\n%s",
                                  n, close ? "close" : "keep-alive", strlen(url), url), 0);
        return s;
}

static void assert_received(const char *want) {
        ck_assert_msg(H.in_len == strlen(want) && memcmp(H.in, want, H.in_len) == 0,
                      "client received\n%.*s\nwanted\n%s", (int) H.in_len, H.in ? H.in : "", want);
}

/* The JSON body of the one answer received; its status line must start with status_line. */
static json_t *received_error(const char *status_line) {
        const char *body;
        json_t *j;

        ck_assert_msg(H.in_len > 0 && strncmp(H.in, status_line, strlen(status_line)) == 0,
                      "wanted an answer starting \"%s\", got \"%.*s\"", status_line, (int) H.in_len, H.in ? H.in : "");
        ck_assert_ptr_nonnull(strstr(H.in, "Content-Type: application/json\r\n"));
        body = strstr(H.in, "\r\n\r\n");
        ck_assert_ptr_nonnull(body);
        j = json_loads(body + 4, 0, NULL);
        ck_assert_msg(j != NULL, "error body is not JSON: %s", body + 4);
        return j;
}

static const char *error_field(json_t *j, const char *name) {
        const char *s = json_string_value(json_object_get(json_object_get(j, "error"), name));

        ck_assert_msg(s != NULL, "error.%s missing", name);
        return s;
}

/* Sends a request that must be refused: answered with status_line and the error code, the
 * handler never seeing it, the connection closed. */
static void assert_refused(const char *request, const char *status_line, const char *code) {
        json_t *j;

        client_send(request);
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        ck_assert_uint_eq(H.n_seen, 0);
        j = received_error(status_line);
        ck_assert_str_eq(error_field(j, "code"), code);
        ck_assert_ptr_nonnull(strstr(H.in, "Connection: close\r\n"));
        json_decref(j);
}

/* Sends a request and waits until the handler holds it, for the test to answer. */
static void hold_request(const char *request) {
        H.mode = ANSWER_LATER;
        client_send(request);
        RUN_UNTIL(H.event, H.n_seen == 1);
}

/* Begins a streamed answer to a held request and writes more than the client's socket and the
 * high-water mark hold, with the client not reading: the write must report pressure. */
static void stream_past_high_water(void) {
        size_t len = 2 * 1024 * 1024;
        char *big = malloc(len);

        ck_assert_ptr_nonnull(big);
        memset(big, 'z', len);
        client_reads(false);
        ck_assert_int_eq(http_conn_stream_begin(H.conn, 200, NULL, 0), 0);
        ck_assert_int_eq(http_conn_stream_write(H.conn, big, len), 1);
        free(big);
}

/* Is the connection serving a request? It must still be open: a test that expects it open
 * and finds it closed (a limit it did not mean to trip) fails here, by name. */
static bool conn_busy(void) {
        ck_assert_msg(H.conn != NULL, "the connection was closed; the client received: %.*s",
                      (int) H.in_len, H.in ? H.in : "");
        return http_conn_busy(H.conn);
}

static const char *seen_header(const struct seen *s, const char *name) {
        for (size_t i = 0; i < s->n_fields; i++)
                if (strcasecmp(s->names[i], name) == 0)
                        return s->values[i];
        return NULL;
}

/* --- fixture ----------------------------------------------------------------------------- */

static void open_conn(bool tcp) {
        int sv[2], buf = 64 * 1024;

        ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
        /* Small buffers, so that back-pressure sets in at a size the test knows. */
        ck_assert_int_eq(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf), 0);
        ck_assert_int_eq(setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf), 0);
        ck_assert_int_eq(http_conn_new(H.poller, sv[0], &H.limits, &handler, &H, &H.conn), 0);
        http_conn_set_peer(H.conn, &(struct http_peer) { .tcp = tcp });
        H.client = sv[1];
        ck_assert_int_ge(sd_event_add_io(H.event, &H.client_source, H.client, EPOLLIN, on_client_readable, NULL), 0);
}

/* The second client, on its own socketpair: it sends, and reads only once it is closed. */
static void open_other(void) {
        int sv[2];

        ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
        ck_assert_int_eq(http_conn_new(H.poller, sv[0], &H.limits, &other_handler, NULL, &O.conn), 0);
        O.client = sv[1];
}

static void setup(void) {
        O = (struct other) { .client = -1 };
        H = (struct harness) {
                .client = -1,
                .mode = ANSWER_AT_ONCE,
                /* keypool's defaults where a test does not pin a limit down: nothing but the
                 * limit a test sets for itself may trip while it runs. */
                .limits = {
                        .max_header = 1024,
                        .max_body = 64,
                        .timeout_usec = 30 * 1000000ULL,
                        .header_timeout_usec = 10 * 1000000ULL,
                        .body_min_rate = 1024,
                        .body_budget = 64 * 1024 * 1024,
                },
        };
        ck_assert_int_ge(sd_event_new(&H.event), 0);
        ck_assert_int_eq(evloop_new(H.event, &H.loop), 0);
        ck_assert_int_eq(http_poller_new(H.loop, &H.poller), 0);
}

/* For tests that need other limits: set H.limits, then call this. */
static void start(void) {
        open_conn(false);
}

static void teardown(void) {
        if (O.conn)
                http_conn_abort(O.conn);
        if (H.conn)
                http_conn_abort(H.conn);
        run_idle(H.event);
        ck_assert_ptr_null(H.conn);
        ck_assert_ptr_null(O.conn);
        if (O.client >= 0)
                close(O.client);
        sd_event_source_disable_unref(H.client_source);
        if (H.client >= 0)
                close(H.client);
        http_poller_free(H.poller);
        evloop_free(H.loop);
        sd_event_unref(H.event);
        for (size_t i = 0; i < H.n_seen; i++) {
                struct seen *s = &H.seen[i];

                for (size_t f = 0; f < s->n_fields; f++) {
                        free(s->names[f]);
                        free(s->values[f]);
                }
                free(s->names);
                free(s->values);
                free(s->method);
                free(s->url);
                free(s->body);
        }
        free(H.in);
}

/* --- request parsing --------------------------------------------------------------------- */

START_TEST(test_request_line_reaches_the_handler_as_method_url_and_version)
{
        start();
        client_send("DELETE /v1/things/7?force=1 HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.n_seen == 1);
        ck_assert_str_eq(H.seen[0].method, "DELETE");
        ck_assert_str_eq(H.seen[0].url, "/v1/things/7?force=1");
        ck_assert_uint_eq(H.seen[0].major, 1);
        ck_assert_uint_eq(H.seen[0].minor, 1);
        ck_assert(H.seen[0].keep_alive);
        ck_assert_uint_eq(H.seen[0].body_len, 0);
}
END_TEST

START_TEST(test_header_values_are_trimmed_and_names_keep_their_spelling)
{
        start();
        client_send("GET / HTTP/1.1\r\nHost: x\r\nX-Padded:   spaced value \t \r\nx-lower: v\r\n\r\n");
        RUN_UNTIL(H.event, H.n_seen == 1);
        ck_assert_uint_eq(H.seen[0].n_fields, 3);
        ck_assert_str_eq(H.seen[0].names[1], "X-Padded");
        ck_assert_str_eq(H.seen[0].values[1], "spaced value");
        ck_assert_str_eq(H.seen[0].names[2], "x-lower");
        ck_assert_str_eq(seen_header(&H.seen[0], "X-LOWER"), "v");
}
END_TEST

/* The fields' text buffer grows and moves many times: every pointer must follow it. */
START_TEST(test_many_headers_all_reach_the_handler_intact)
{
        char req[4096];
        size_t n;

        H.limits.max_header = 8192;
        start();
        n = (size_t) snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\n");
        for (int i = 0; i < 40; i++)
                n += (size_t) snprintf(req + n, sizeof req - n, "X-H%d: value-%d\r\n", i, i * 7);
        snprintf(req + n, sizeof req - n, "\r\n");
        client_send(req);
        RUN_UNTIL(H.event, H.n_seen == 1);
        ck_assert_uint_eq(H.seen[0].n_fields, 41);
        ck_assert_str_eq(H.seen[0].names[0], "Host");
        for (int i = 0; i < 40; i++) {
                char name[16], value[32];

                snprintf(name, sizeof name, "X-H%d", i);
                snprintf(value, sizeof value, "value-%d", i * 7);
                ck_assert_str_eq(H.seen[0].names[i + 1], name);
                ck_assert_str_eq(H.seen[0].values[i + 1], value);
        }
}
END_TEST

START_TEST(test_request_header_looks_names_up_without_regard_to_case)
{
        struct http_field fields[] = {
                { (char *) "Content-Type", (char *) "application/json" },
                { (char *) "X-Keypool-Pool", (char *) "fast" },
        };
        struct http_request r = { .fields = fields, .n_fields = 2 };

        ck_assert_str_eq(http_request_header(&r, "x-keypool-pool"), "fast");
        ck_assert_str_eq(http_request_header(&r, "CONTENT-TYPE"), "application/json");
        ck_assert_ptr_null(http_request_header(&r, "Content"));
}
END_TEST

START_TEST(test_request_arriving_a_byte_at_a_time_is_parsed_whole)
{
        const char *req = "POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";

        start();
        for (const char *p = req; *p; p++) {
                client_send_bytes(p, 1);
                run_idle(H.event);
                ck_assert_uint_eq(H.n_seen, p[1] ? 0 : 1);
        }
        ck_assert_str_eq(H.seen[0].body, "hello");
        ck_assert_str_eq(seen_header(&H.seen[0], "Content-Length"), "5");
}
END_TEST

START_TEST(test_headers_over_the_limit_are_answered_431_and_the_connection_closed)
{
        char req[2048];

        H.limits.max_header = 256;
        start();
        snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: %0300d\r\n\r\n", 0);
        assert_refused(req, "HTTP/1.1 431 Request Header Fields Too Large\r\n", "headers_too_large");
}
END_TEST

START_TEST(test_headers_of_exactly_the_limit_are_accepted)
{
        /* Counted: the URL, names and values ("/", "Host", "x", "X-Fill", the value). */
        char req[512];

        H.limits.max_header = 256;
        start();
        snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\nX-Fill: %0*d\r\n\r\n", 256 - 1 - 4 - 1 - 6, 0);
        client_send(req);
        RUN_UNTIL(H.event, H.n_seen == 1 && H.in_len > 0);
        ck_assert_ptr_nonnull(strstr(H.in, "HTTP/1.1 200 OK\r\n"));
}
END_TEST

START_TEST(test_header_limit_counts_headers_sent_in_many_small_writes)
{
        json_t *j;

        H.limits.max_header = 256;
        start();
        client_send("GET / HTTP/1.1\r\nHost: x\r\n");
        for (int i = 0; i < 40 && !H.client_eof; i++) {
                client_send("X-Some-Header: some value\r\n");
                run_idle(H.event);
        }
        ck_assert(H.client_eof);
        ck_assert_uint_eq(H.n_seen, 0);
        j = received_error("HTTP/1.1 431 ");
        json_decref(j);
}
END_TEST

START_TEST(test_body_over_the_limit_by_content_length_is_answered_413_before_it_is_sent)
{
        start();        /* max_body 64 */
        assert_refused("POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\n\r\n",
                       "HTTP/1.1 413 Content Too Large\r\n", "body_too_large");
}
END_TEST

START_TEST(test_body_of_exactly_the_limit_is_accepted)
{
        char req[256], body[65];

        start();        /* max_body 64 */
        memset(body, 'b', 64);
        body[64] = 0;
        snprintf(req, sizeof req, "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n%s", body);
        client_send(req);
        RUN_UNTIL(H.event, H.n_seen == 1);
        ck_assert_uint_eq(H.seen[0].body_len, 64);
        ck_assert_str_eq(H.seen[0].body, body);
}
END_TEST

START_TEST(test_chunked_body_over_the_limit_is_answered_413)
{
        H.limits.max_body = 8;
        start();
        assert_refused("POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "HTTP/1.1 413 ", "body_too_large");
}
END_TEST

START_TEST(test_chunked_body_is_joined_and_its_trailer_fields_kept)
{
        start();
        client_send("POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum:  abc \r\nX-Last: z\r\n\r\n");
        RUN_UNTIL(H.event, H.n_seen == 1);
        ck_assert_uint_eq(H.seen[0].body_len, 11);
        ck_assert_str_eq(H.seen[0].body, "hello world");
        ck_assert_str_eq(seen_header(&H.seen[0], "Transfer-Encoding"), "chunked");
        ck_assert_str_eq(seen_header(&H.seen[0], "X-Checksum"), "abc");
        ck_assert_str_eq(seen_header(&H.seen[0], "X-Last"), "z");
}
END_TEST

START_TEST(test_malformed_request_is_answered_400_and_the_connection_closed)
{
        start();
        assert_refused("NOT AN HTTP REQUEST\r\n\r\n", "HTTP/1.1 400 Bad Request\r\n", "bad_request");
}
END_TEST

START_TEST(test_expect_100_continue_gets_the_interim_answer_before_the_body_is_sent)
{
        start();
        client_send("POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
        RUN_UNTIL(H.event, H.in_len >= 25);
        assert_received("HTTP/1.1 100 Continue\r\n\r\n");
        ck_assert_uint_eq(H.n_seen, 0);
        client_send("hello");
        RUN_UNTIL(H.event, H.n_seen == 1);
        ck_assert_str_eq(H.seen[0].body, "hello");
}
END_TEST

/* --- pipelining and keep-alive ----------------------------------------------------------- */

START_TEST(test_pipelined_requests_in_one_write_are_answered_in_order)
{
        char *a1 = expected_answer(1, "/1", false), *a2 = expected_answer(2, "/2", false),
             *a3 = expected_answer(3, "/3", false), *want;

        start();
        client_send("GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                    "POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                    "GET /3 HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_ge(asprintf(&want, "%s%s%s", a1, a2, a3), 0);
        RUN_UNTIL(H.event, H.in_len >= strlen(want));
        assert_received(want);
        ck_assert_uint_eq(H.n_seen, 3);
        ck_assert_str_eq(H.seen[1].body, "abc");
        ck_assert(!H.closed);
        free(a1);
        free(a2);
        free(a3);
        free(want);
}
END_TEST

START_TEST(test_pipelined_request_waits_until_the_answer_before_it_is_sent)
{
        start();
        H.mode = ANSWER_LATER;
        client_send("GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n");
        run_idle(H.event);
        ck_assert_uint_eq(H.n_seen, 1);
        ck_assert(conn_busy());

        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "one", 3), 0);
        RUN_UNTIL(H.event, H.n_seen == 2);
        ck_assert_str_eq(H.seen[1].url, "/second");
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "two", 3), 0);
        RUN_UNTIL(H.event, H.in_len > 0 && strstr(H.in, "two"));
        ck_assert_msg(strstr(H.in, "one") < strstr(H.in, "two"), "answers out of order: %s", H.in);
}
END_TEST

/* The connection that answered GET /a with a1 serves GET /b next: the client receives a1, then
 * the second answer, and nothing else. */
static void assert_serves_b_after(const char *a1) {
        char *a2 = expected_answer(2, "/b", false), *want;

        client_send("GET /b HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_ge(asprintf(&want, "%s%s", a1, a2), 0);
        RUN_UNTIL(H.event, H.in_len >= strlen(want));
        assert_received(want);
        free(a2);
        free(want);
}

/* An open request holds its body (the handler may read it until it answers: a retry sends it
 * again) and nothing of its head; an answered one holds nothing. */
START_TEST(test_a_request_head_is_released_once_handed_over_and_the_rest_once_answered)
{
        char request[2048], *p = request;

        H.limits.max_header = 2048;
        start();
        p += sprintf(p, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n");
        for (int i = 0; i < 20; i++)
                p += sprintf(p, "X-Field-%02d: %s\r\n", i, "a value of some length, to fill the head");
        sprintf(p, "\r\nabcdef");
        hold_request(request);
        ck_assert_uint_eq(H.seen[0].n_fields, 22);
        /* The body's buffer alone (its first size is 256 bytes). */
        ck_assert_uint_le(http_conn_buffered_bytes(H.conn), 256);

        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "ok", 2), 0);
        RUN_UNTIL(H.event, H.in_len > 0 && strstr(H.in, "\r\n\r\nok"));
        run_idle(H.event);
        ck_assert(!conn_busy());
        ck_assert_uint_eq(http_conn_buffered_bytes(H.conn), 0);
}
END_TEST

/* A large request's buffers are not kept for the small one that follows on the connection. */
START_TEST(test_a_large_requests_buffers_do_not_stay_for_the_next_small_one)
{
        size_t len = 32 * 1024, head_len;
        char head[128], *big;

        H.limits.max_body = len;
        start();
        head_len = (size_t) sprintf(head, "POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n", len);
        big = malloc(head_len + len);
        ck_assert_ptr_nonnull(big);
        memcpy(big, head, head_len);
        memset(big + head_len, 'b', len);
        H.mode = ANSWER_LATER;
        client_send_bytes(big, head_len + len);
        free(big);
        RUN_UNTIL(H.event, H.n_seen == 1);
        ck_assert_uint_eq(H.seen[0].body_len, len);
        ck_assert_uint_ge(http_conn_buffered_bytes(H.conn), len);
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "one", 3), 0);
        RUN_UNTIL(H.event, H.in_len > 0 && strstr(H.in, "one"));
        run_idle(H.event);
        ck_assert_uint_eq(http_conn_buffered_bytes(H.conn), 0);

        client_send("POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        RUN_UNTIL(H.event, H.n_seen == 2);
        ck_assert_str_eq(H.seen[1].body, "abc");
        ck_assert_uint_le(http_conn_buffered_bytes(H.conn), 256);
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "two", 3), 0);
        RUN_UNTIL(H.event, strstr(H.in, "two"));
}
END_TEST

START_TEST(test_keep_alive_connection_serves_a_later_request)
{
        char *a1 = expected_answer(1, "/a", false);

        start();
        client_send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.in_len >= strlen(a1));
        run_idle(H.event);
        ck_assert(!H.closed);
        ck_assert(!conn_busy());
        assert_serves_b_after(a1);
        free(a1);
}
END_TEST

START_TEST(test_connection_close_is_answered_and_later_pipelined_requests_dropped)
{
        char *a1 = expected_answer(1, "/only", true);

        start();
        client_send("GET /only HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        assert_received(a1);
        ck_assert_uint_eq(H.n_seen, 1);
        ck_assert(!H.seen[0].keep_alive);
        free(a1);
}
END_TEST

START_TEST(test_http10_request_is_answered_with_connection_close_and_closed)
{
        char *a1 = expected_answer(1, "/old", true);

        start();
        client_send("GET /old HTTP/1.0\r\n\r\n");
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        assert_received(a1);
        ck_assert_uint_eq(H.seen[0].major, 1);
        ck_assert_uint_eq(H.seen[0].minor, 0);
        ck_assert(!H.seen[0].keep_alive);
        free(a1);
}
END_TEST

START_TEST(test_http10_request_asking_for_keep_alive_stays_open)
{
        char *a1 = expected_answer(1, "/k", false), *a2 = expected_answer(2, "/l", true), *want;

        start();
        client_send("GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        RUN_UNTIL(H.event, H.in_len >= strlen(a1));
        run_idle(H.event);
        ck_assert(!H.closed);
        client_send("GET /l HTTP/1.0\r\n\r\n");
        RUN_UNTIL(H.event, H.client_eof);
        ck_assert_int_ge(asprintf(&want, "%s%s", a1, a2), 0);
        assert_received(want);
        free(a1);
        free(a2);
        free(want);
}
END_TEST

/* --- the client going away --------------------------------------------------------------- */

START_TEST(test_half_closed_unix_client_still_gets_its_answer)
{
        start();
        H.mode = ANSWER_LATER;
        client_send("POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi");
        ck_assert_int_eq(shutdown(H.client, SHUT_WR), 0);
        RUN_UNTIL(H.event, H.n_seen == 1);
        run_idle(H.event);
        ck_assert_uint_eq(H.n_aborts, 0);
        ck_assert(!H.closed);

        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "bye", 3), 0);
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        assert_received("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye");
        ck_assert_uint_eq(H.n_aborts, 0);
}
END_TEST

/* nc -N and HTTP/1.0-style clients send everything, then shut down their side: every request
 * they sent is still answered, even when the half-close is seen while the first is served. */
START_TEST(test_requests_pipelined_before_a_half_close_are_all_answered)
{
        start();
        H.mode = ANSWER_LATER;
        client_send("GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(shutdown(H.client, SHUT_WR), 0);
        RUN_UNTIL(H.event, H.n_seen == 1);
        run_idle(H.event);
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "one", 3), 0);
        RUN_UNTIL(H.event, H.n_seen == 2 || H.closed);
        ck_assert_msg(H.n_seen == 2, "the second request was dropped; the client received: %s", H.in ? H.in : "");
        ck_assert_str_eq(H.seen[1].url, "/2");
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "two", 3), 0);
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        assert_received("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\none"
                        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\ntwo");
        ck_assert_uint_eq(H.n_aborts, 0);
}
END_TEST

START_TEST(test_half_closed_tcp_client_still_gets_its_answer)
{
        open_conn(true);
        hold_request("GET /t HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(shutdown(H.client, SHUT_WR), 0);
        run_idle(H.event);
        ck_assert_uint_eq(H.n_aborts, 0);
        ck_assert(!H.closed);

        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "tcp", 3), 0);
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        assert_received("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\ntcp");
        ck_assert_uint_eq(H.n_aborts, 0);
}
END_TEST

START_TEST(test_client_leaving_while_its_request_is_served_aborts_the_request)
{
        start();
        hold_request("GET /gone HTTP/1.1\r\nHost: x\r\n\r\n");
        close(H.client);
        H.client = -1;
        sd_event_source_disable_unref(H.client_source);
        H.client_source = NULL;
        RUN_UNTIL(H.event, H.closed);
        ck_assert_uint_eq(H.n_aborts, 1);
        ck_assert_ptr_eq(H.aborted_data, &H.request_marker);
}
END_TEST

START_TEST(test_client_hanging_up_mid_request_closes_without_calling_the_handler)
{
        start();
        client_send("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf");
        run_idle(H.event);
        ck_assert(conn_busy());
        ck_assert_int_eq(shutdown(H.client, SHUT_WR), 0);
        RUN_UNTIL(H.event, H.closed);
        ck_assert_uint_eq(H.n_seen, 0);
        ck_assert_uint_eq(H.n_aborts, 0);
}
END_TEST

START_TEST(test_handler_aborting_closes_at_once_without_on_abort)
{
        start();
        H.mode = ANSWER_ABORT;
        client_send("GET /x HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        ck_assert_uint_eq(H.n_seen, 1);
        ck_assert_uint_eq(H.in_len, 0);
        ck_assert_uint_eq(H.n_aborts, 0);
}
END_TEST

/* --- answers ----------------------------------------------------------------------------- */

START_TEST(test_respond_writes_status_line_given_headers_connection_and_content_length)
{
        start();
        hold_request("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(http_conn_respond(H.conn, 404, (const struct http_header[]) {
                                                   { "Content-Type", "text/plain" }, { "X-Keypool-Key", "kp-0000000000" } },
                                           2, "nope", 4), 0);
        RUN_UNTIL(H.event, H.in_len >= 4 && strstr(H.in, "nope"));
        assert_received("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nX-Keypool-Key: kp-0000000000\r\n"
                        "Connection: keep-alive\r\nContent-Length: 4\r\n\r\nnope");
        /* Ready for the next request once the loop has run the connection's follow-up. */
        run_idle(H.event);
        ck_assert(!conn_busy());
}
END_TEST

START_TEST(test_respond_error_writes_the_openai_error_shape_in_plain_ascii)
{
        json_t *j;

        start();
        hold_request("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(http_conn_respond_error(H.conn, 503, "keypool_error", "no_key_available",
                                                 (const struct http_header[]) { { "Retry-After", "7" } }, 1,
                                                 "pool %s: \xc3\xa9\n%d", "fast", 3), 0);
        RUN_UNTIL(H.event, strstr(H.in ? H.in : "", "}}"));
        j = received_error("HTTP/1.1 503 Service Unavailable\r\n");
        ck_assert_ptr_nonnull(strstr(H.in, "Retry-After: 7\r\n"));
        ck_assert_str_eq(error_field(j, "message"), "pool fast: ???3");
        ck_assert_str_eq(error_field(j, "type"), "keypool_error");
        ck_assert_str_eq(error_field(j, "code"), "no_key_available");
        json_decref(j);
}
END_TEST

START_TEST(test_second_answer_to_one_request_is_refused)
{
        start();
        hold_request("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "a", 1), 0);
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "b", 1), -EINVAL);
        ck_assert_int_eq(http_conn_stream_begin(H.conn, 200, NULL, 0), -EINVAL);
}
END_TEST

START_TEST(test_stream_to_http11_client_is_chunked_and_ends_with_the_zero_chunk)
{
        const char *want = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";

        start();
        hold_request("POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        ck_assert(!http_conn_stream_started(H.conn));
        ck_assert_int_eq(http_conn_stream_begin(H.conn, 200, (const struct http_header[]) {
                                                        { "Content-Type", "text/event-stream" } }, 1), 0);
        ck_assert(http_conn_stream_started(H.conn));
        ck_assert_int_eq(http_conn_stream_write(H.conn, "hello", 5), 0);
        ck_assert_int_eq(http_conn_stream_write(H.conn, "", 0), 0);    /* no empty chunk: it would end the body */
        ck_assert_int_eq(http_conn_stream_write(H.conn, "abcdefghijklmnopqrstuvwxyz", 26), 0);
        ck_assert_int_eq(http_conn_stream_end(H.conn), 0);
        RUN_UNTIL(H.event, H.in_len >= strlen(want));
        assert_received(want);
        run_idle(H.event);
        ck_assert(!H.closed);
}
END_TEST

START_TEST(test_streamed_output_waits_for_the_loop_and_keeps_its_order)
{
        char c;

        start();
        hold_request("GET /s HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(http_conn_stream_begin(H.conn, 200, NULL, 0), 0);
        ck_assert_int_eq(http_conn_stream_write(H.conn, "a", 1), 0);
        ck_assert_int_eq(http_conn_stream_write(H.conn, "b", 1), 0);
        /* Nothing leaves before the loop runs the kick. */
        ck_assert_int_eq(recv(H.client, &c, 1, MSG_DONTWAIT | MSG_PEEK), -1);
        ck_assert_int_eq(errno, EAGAIN);
        RUN_UNTIL(H.event, H.in_len > 0 && strstr(H.in, "1\r\nb\r\n"));
        ck_assert_ptr_nonnull(strstr(H.in, "\r\n\r\n1\r\na\r\n1\r\nb\r\n"));
        ck_assert_int_eq(http_conn_stream_end(H.conn), 0);
        RUN_UNTIL(H.event, strstr(H.in, "0\r\n\r\n"));
}
END_TEST

/* A stream the handler cuts (the upstream failed after bytes reached the client) shows the
 * client what it was sent, then the close, never the close alone. */
START_TEST(test_an_aborted_stream_sends_what_it_had_written_before_the_close)
{
        start();
        hold_request("GET /s HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(http_conn_stream_begin(H.conn, 200, NULL, 0), 0);
        ck_assert_int_eq(http_conn_stream_write(H.conn, "data: 1\n\n", 9), 0);
        http_conn_abort(H.conn);
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        ck_assert_msg(strncmp(H.in, "HTTP/1.1 200 OK\r\n", 17) == 0, "no head before the close: '%s'", H.in);
        ck_assert_ptr_nonnull(strstr(H.in, "9\r\ndata: 1\n\n\r\n"));
        ck_assert_ptr_null(strstr(H.in, "0\r\n\r\n"));
        ck_assert_uint_eq(H.n_aborts, 0);
}
END_TEST

START_TEST(test_stream_to_http10_client_is_ended_by_closing)
{
        start();
        hold_request("GET /s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        ck_assert_int_eq(http_conn_stream_begin(H.conn, 200, NULL, 0), 0);
        ck_assert_int_eq(http_conn_stream_write(H.conn, "data: 1\n\n", 9), 0);
        ck_assert_int_eq(http_conn_stream_end(H.conn), 0);
        RUN_UNTIL(H.event, H.client_eof && H.closed);
        assert_received("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndata: 1\n\n");
}
END_TEST

START_TEST(test_stream_write_reports_pressure_and_on_drain_follows_when_the_client_reads)
{
        start();
        hold_request("GET /big HTTP/1.1\r\nHost: x\r\n\r\n");
        stream_past_high_water();
        run_idle(H.event);
        ck_assert_uint_eq(H.n_drains, 0);

        client_reads(true);
        RUN_UNTIL(H.event, H.n_drains == 1);
        ck_assert_int_eq(http_conn_stream_end(H.conn), 0);
        RUN_UNTIL(H.event, H.in_len >= 5 && memcmp(H.in + H.in_len - 5, "0\r\n\r\n", 5) == 0);
        ck_assert_ptr_nonnull(strstr(H.in, "\r\n\r\n200000\r\nzzz"));
}
END_TEST

/* --- timeouts and shutdown --------------------------------------------------------------- */

START_TEST(test_silent_client_is_closed_after_the_idle_timeout)
{
        uint64_t t0 = loop_now_usec();

        H.limits.timeout_usec = 100 * 1000;
        start();
        RUN_UNTIL(H.event, H.closed);
        ck_assert_uint_ge(loop_now_usec() - t0, H.limits.timeout_usec);
        RUN_UNTIL(H.event, H.client_eof);
        ck_assert_uint_eq(H.in_len, 0);
}
END_TEST

START_TEST(test_keep_alive_connection_is_closed_after_the_idle_timeout_following_an_answer)
{
        char *a1 = expected_answer(1, "/a", false);
        uint64_t t0;

        H.limits.timeout_usec = 100 * 1000;
        start();
        client_send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.in_len >= strlen(a1));
        t0 = loop_now_usec();
        RUN_UNTIL(H.event, H.closed);
        ck_assert_uint_ge(loop_now_usec() - t0, H.limits.timeout_usec / 2);
        assert_received(a1);
        free(a1);
}
END_TEST

START_TEST(test_slow_handler_is_not_timed_out_while_the_client_waits)
{
        uint64_t t0;

        H.limits.timeout_usec = 50 * 1000;
        start();
        hold_request("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
        /* Wait three timeouts on the loop itself. */
        t0 = loop_now_usec();
        while (loop_now_usec() - t0 < 3 * H.limits.timeout_usec)
                ck_assert_int_ge(sd_event_run(H.event, H.limits.timeout_usec), 0);
        ck_assert(!H.closed);
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "late", 4), 0);
        RUN_UNTIL(H.event, H.in_len > 0 && strstr(H.in, "late"));
}
END_TEST

START_TEST(test_client_that_stops_reading_is_closed_after_the_timeout_and_its_request_aborted)
{
        H.limits.timeout_usec = 100 * 1000;
        start();
        hold_request("GET /big HTTP/1.1\r\nHost: x\r\n\r\n");
        stream_past_high_water();
        RUN_UNTIL(H.event, H.closed);
        ck_assert_uint_eq(H.n_aborts, 1);
        ck_assert_ptr_eq(H.aborted_data, &H.request_marker);
}
END_TEST

START_TEST(test_shutdown_closes_an_idle_keep_alive_connection_once_drain_idle_passes)
{
        char *a1 = expected_answer(1, "/a", false);

        H.limits.drain_idle_usec = 100 * 1000;
        start();
        client_send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.in_len >= strlen(a1));
        run_idle(H.event);
        http_conn_shutdown(H.conn);
        RUN_UNTIL(H.event, H.closed && H.client_eof);
        assert_received(a1);
        free(a1);
}
END_TEST

START_TEST(test_shutdown_lets_the_request_being_served_finish_with_connection_close)
{
        start();
        hold_request("GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        http_conn_shutdown(H.conn);
        run_idle(H.event);
        ck_assert(!H.closed);
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "ok", 2), 0);
        RUN_UNTIL(H.event, H.closed && H.client_eof);
        assert_received("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok");
}
END_TEST

/* The client received first and then second, and nothing else; frees both. */
static void assert_received_two(char *first, char *second) {
        char *both;

        ck_assert_int_ge(asprintf(&both, "%s%s", first, second), 0);
        assert_received(both);
        free(both);
        free(first);
        free(second);
}

START_TEST(test_shutdown_serves_the_next_request_of_an_idle_keep_alive_connection_with_connection_close)
{
        char *a1 = expected_answer(1, "/a", false), *a2 = expected_answer(2, "/b", true);

        H.limits.drain_idle_usec = 10 * 1000000ULL;
        start();
        client_send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.in_len >= strlen(a1));
        http_conn_shutdown(H.conn);
        run_idle(H.event);
        ck_assert(!H.closed);
        client_send("GET /b HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.closed && H.client_eof);
        assert_received_two(a1, a2);
}
END_TEST

/* The close comes with the timer, but what the client sent before it is a request to serve. */
START_TEST(test_shutdown_serves_a_request_already_waiting_in_the_socket)
{
        char *a1 = expected_answer(1, "/a", false), *a2 = expected_answer(2, "/b", true);

        H.limits.drain_idle_usec = 0;
        start();
        client_send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.in_len >= strlen(a1));
        run_idle(H.event);
        client_send("GET /b HTTP/1.1\r\nHost: x\r\n\r\n");
        http_conn_shutdown(H.conn);
        RUN_UNTIL(H.event, H.closed && H.client_eof);
        assert_received_two(a1, a2);
}
END_TEST

/* A stream's head went out saying keep-alive before the shutdown: closing at its end would cut
 * the client's next request, so that request is answered (with Connection: close) first. */
START_TEST(test_shutdown_during_a_keep_alive_stream_answers_the_next_request_before_closing)
{
        char *a2 = expected_answer(2, "/b", true);

        H.limits.drain_idle_usec = 10 * 1000000ULL;
        start();
        hold_request("GET /s HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(http_conn_stream_begin(H.conn, 200, NULL, 0), 0);
        http_conn_shutdown(H.conn);
        ck_assert_int_eq(http_conn_stream_write(H.conn, "x", 1), 0);
        ck_assert_int_eq(http_conn_stream_end(H.conn), 0);
        run_idle(H.event);
        ck_assert(!H.closed);
        ck_assert_ptr_nonnull(memmem(H.in, H.in_len, "Connection: keep-alive\r\n", 24));
        H.mode = ANSWER_AT_ONCE;
        client_send("GET /b HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.closed && H.client_eof);
        ck_assert_uint_ge(H.in_len, strlen(a2));
        ck_assert_msg(memcmp(H.in + H.in_len - strlen(a2), a2, strlen(a2)) == 0,
                      "the last answer is not\n%s\ngot\n%.*s", a2, (int) H.in_len, H.in);
        free(a2);
}
END_TEST

START_TEST(test_shutdown_still_serves_a_fresh_connections_first_request)
{
        char *a1 = expected_answer(1, "/first", true);

        start();
        http_conn_shutdown(H.conn);
        run_idle(H.event);
        ck_assert(!H.closed);
        client_send("GET /first HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.closed && H.client_eof);
        assert_received(a1);
        free(a1);
}
END_TEST

/* --- what RFC 9112 refuses -------------------------------------------------------------- */

/* Sends a request that must be refused 400, for a reason that mentions names. */
static void assert_refused_400(const char *request, const char *names) {
        json_t *j;

        assert_refused(request, "HTTP/1.1 400 Bad Request\r\n", "bad_request");
        j = received_error("HTTP/1.1 400 ");
        ck_assert_msg(strstr(error_field(j, "message"), names), "the reason must mention \"%s\": %s",
                      names, error_field(j, "message"));
        json_decref(j);
}

START_TEST(test_http11_request_without_host_is_answered_400)
{
        start();
        assert_refused_400("GET /v1/models HTTP/1.1\r\nAccept: */*\r\n\r\n", "Host");
}
END_TEST

START_TEST(test_http11_request_with_two_host_fields_is_answered_400)
{
        start();
        assert_refused_400("GET /v1/models HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "Host");
}
END_TEST

/* "Authorization : x" would reach the handler as a field named "Authorization ", past any list
 * of fields to drop. */
START_TEST(test_whitespace_before_a_field_colon_is_answered_400)
{
        start();
        assert_refused_400("GET / HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer kp-test-not-a-key\r\n\r\n",
                           "field name");
}
END_TEST

/* http-parser would join the folded line to X-A's value, hiding the field it carries. */
START_TEST(test_obs_fold_line_is_answered_400)
{
        start();
        assert_refused_400("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Authorization: Bearer kp-test-not-a-key\r\n\r\n",
                           "obs-fold");
}
END_TEST

/* The raw head is scanned as it arrives: a fold at the start of a later write is found too. */
START_TEST(test_obs_fold_line_starting_a_later_write_is_answered_400)
{
        start();
        client_send("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n");
        run_idle(H.event);
        ck_assert(!H.closed);
        assert_refused_400("\tAuthorization: Bearer kp-test-not-a-key\r\n\r\n", "obs-fold");
}
END_TEST

START_TEST(test_target_that_cannot_be_forwarded_as_written_is_answered_400)
{
        start();
        assert_refused_400("POST /v1/%2e%2e/admin HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                           "'..' segment");
}
END_TEST

/* --- slow clients ------------------------------------------------------------------------ */

/* The answer to a client cut off for being slow: 408, then the close. */
static void assert_timed_out(uint64_t t0) {
        json_t *j;

        RUN_UNTIL(H.event, H.client_eof && H.closed);
        ck_assert_msg(loop_now_usec() - t0 >= H.limits.header_timeout_usec,
                      "cut off after %llu us, before header_timeout",
                      (unsigned long long) (loop_now_usec() - t0));
        ck_assert_uint_eq(H.n_seen, 0);
        j = received_error("HTTP/1.1 408 Request Timeout\r\n");
        ck_assert_str_eq(error_field(j, "code"), "request_timeout");
        ck_assert_ptr_nonnull(strstr(H.in, "Connection: close\r\n"));
        json_decref(j);
}

/* A header line every 10 ms keeps the idle timeout (30 s) away; the head is still due
 * header_timeout after its first byte. */
START_TEST(test_head_trickling_past_header_timeout_is_answered_408_and_closed)
{
        uint64_t t0, last;

        H.limits.header_timeout_usec = 200 * 1000;
        H.limits.max_header = 64 * 1024;
        start();
        t0 = last = loop_now_usec();
        client_send("GET / HTTP/1.1\r\nHost: x\r\n");
        while (!H.client_eof) {
                ck_assert_msg(loop_now_usec() - t0 < LOOP_WAIT_USEC, "the trickling head was never cut off");
                if (loop_now_usec() - last >= 10 * 1000) {
                        /* The server may already have closed: this send may fail. */
                        (void) send(H.client, "X-Trickle: 1\r\n", 14, MSG_NOSIGNAL);
                        last = loop_now_usec();
                }
                ck_assert_int_ge(sd_event_run(H.event, 10 * 1000), 0);
        }
        assert_timed_out(t0);
}
END_TEST

/* The deadline runs from a request's first byte, not from the connection or the last answer. */
START_TEST(test_keep_alive_connection_waiting_for_its_next_request_is_not_cut_by_header_timeout)
{
        char *a1 = expected_answer(1, "/a", false);
        uint64_t t0;

        H.limits.header_timeout_usec = 50 * 1000;
        start();
        client_send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.in_len >= strlen(a1));
        t0 = loop_now_usec();
        while (loop_now_usec() - t0 < 3 * H.limits.header_timeout_usec)
                ck_assert_int_ge(sd_event_run(H.event, H.limits.header_timeout_usec), 0);
        ck_assert(!H.closed);
        assert_serves_b_after(a1);
        free(a1);
}
END_TEST

/* 1024 bytes/s over a 200 ms window is 204 bytes: ten bytes, then silence, is too slow, long
 * before the idle timeout (30 s). */
START_TEST(test_body_below_body_min_rate_is_answered_408_and_closed)
{
        uint64_t t0;

        H.limits.header_timeout_usec = 200 * 1000;
        H.limits.body_min_rate = 1024;
        H.limits.max_body = 4096;
        start();
        t0 = loop_now_usec();
        client_send("POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n0123456789");
        assert_timed_out(t0);
}
END_TEST

/* --- the body budget --------------------------------------------------------------------- */

static void assert_refused_for_the_budget(const char *request) {
        assert_refused(request, "HTTP/1.1 503 Service Unavailable\r\n", "body_budget_exhausted");
        ck_assert_ptr_nonnull(strstr(H.in, "Retry-After: 1\r\n"));
}

/* Refused by its declared length, before a byte of the body is sent. */
START_TEST(test_declared_body_beyond_the_body_budget_is_answered_503_with_retry_after)
{
        H.limits.body_budget = 100;
        H.limits.max_body = 4096;
        start();
        assert_refused_for_the_budget("POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n");
}
END_TEST

START_TEST(test_chunked_body_growing_beyond_the_body_budget_is_answered_503_with_retry_after)
{
        H.limits.body_budget = 8;
        H.limits.max_body = 4096;
        start();
        assert_refused_for_the_budget("POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
}
END_TEST

/* One worker's budget: a body held by one connection counts against another's, and goes back
 * when its request is answered. */
START_TEST(test_body_budget_is_shared_by_the_connections_and_freed_by_the_answer)
{
        char answer[256];
        ssize_t n;

        H.limits.body_budget = 100;
        H.limits.max_body = 4096;
        start();
        hold_request("POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n"
                     "012345678901234567890123456789012345678901234567890123456789");

        open_other();
        ck_assert_int_eq(send(O.client, "POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n", 54,
                              MSG_NOSIGNAL), 54);
        RUN_UNTIL(H.event, O.conn == NULL);
        ck_assert_uint_eq(O.n_seen, 0);
        n = recv(O.client, answer, sizeof answer - 1, MSG_DONTWAIT);
        ck_assert_int_gt(n, 0);
        answer[n] = 0;
        ck_assert_msg(strncmp(answer, "HTTP/1.1 503 ", 13) == 0, "wanted a 503, got %s", answer);
        ck_assert_ptr_nonnull(strstr(answer, "Retry-After: 1\r\n"));

        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "ok", 2), 0);
        client_send("POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n"
                    "012345678901234567890123456789012345678901234567890123456789");
        RUN_UNTIL(H.event, H.n_seen == 2);
        ck_assert_uint_eq(H.seen[1].body_len, 60);
}
END_TEST

/* --- HEAD -------------------------------------------------------------------------------- */

/* The answer to HEAD carries the length its body would have, and no body: the pipelined request
 * after it is answered right after the head, byte for byte. */
START_TEST(test_head_answer_says_the_length_and_sends_no_body)
{
        char *a2 = expected_answer(2, "/next", false), *want;

        start();
        client_send("HEAD /abcd HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_ge(asprintf(&want, "HTTP/1.1 200 OK\r\nX-Seq: 1\r\nConnection: keep-alive\r\n"
                                          "Content-Length: 5\r\n\r\n%s", a2), 0);
        RUN_UNTIL(H.event, H.n_seen == 2 && H.in_len >= strlen(want));
        assert_received(want);
        ck_assert_str_eq(H.seen[0].method, "HEAD");
        free(a2);
        free(want);
}
END_TEST

START_TEST(test_streamed_answer_to_head_is_the_head_alone)
{
        const char *head = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n";

        start();
        hold_request("HEAD /s HTTP/1.1\r\nHost: x\r\n\r\n");
        ck_assert_int_eq(http_conn_stream_begin(H.conn, 200, NULL, 0), 0);
        ck_assert_int_eq(http_conn_stream_write(H.conn, "data: 1\n\n", 9), 0);
        ck_assert_int_eq(http_conn_stream_end(H.conn), 0);
        run_idle(H.event);
        assert_received(head);
        ck_assert(!H.closed);

        /* No stray chunk: the next answer follows the head directly. */
        client_send("GET /after HTTP/1.1\r\nHost: x\r\n\r\n");
        RUN_UNTIL(H.event, H.n_seen == 2);
        ck_assert_int_eq(http_conn_respond(H.conn, 200, NULL, 0, "ok", 2), 0);
        RUN_UNTIL(H.event, H.in_len > strlen(head) && strstr(H.in + strlen(head), "\r\n\r\nok"));
        ck_assert_msg(strncmp(H.in + strlen(head), "HTTP/1.1 200 OK\r\n", 17) == 0,
                      "after the HEAD answer came: %s", H.in + strlen(head));
}
END_TEST

/* --- pure helpers ------------------------------------------------------------------------ */

START_TEST(test_status_reason_names_known_codes_and_falls_back_by_class)
{
        ck_assert_str_eq(http_status_reason(200), "OK");
        ck_assert_str_eq(http_status_reason(413), "Content Too Large");
        ck_assert_str_eq(http_status_reason(431), "Request Header Fields Too Large");
        ck_assert_str_eq(http_status_reason(529), "Site Overloaded");
        ck_assert_str_eq(http_status_reason(299), "OK");
        ck_assert_str_eq(http_status_reason(399), "Redirect");
        ck_assert_str_eq(http_status_reason(499), "Client Error");
        ck_assert_str_eq(http_status_reason(599), "Server Error");
}
END_TEST

/* --- request targets: what can be forwarded exactly as written, and what cannot ---------- */

struct target_case {
        const char *target;
        size_t len;                     /* 0: strlen(target) */
        bool ok;
};

static const struct target_case target_cases[] = {
        { "/v1/chat/completions", 0, true },
        { "/health", 0, true },
        { "/", 0, true },
        { "/v1/chat/completions?trace=1&x=y", 0, true },
        { "/v1/a%20b", 0, true },                       /* an encoded space is just a byte */
        { "/v1/...", 0, true },                         /* three dots are a name */
        { "/v1/.well-known/x", 0, true },
        { "/v1/a..b", 0, true },
        { "/v1/x?path=../..", 0, true },                /* the query is not a path */
        { "/v1/x?a=%2f", 0, true },
        { "/v1/\xff", 0, true },                        /* not ASCII, but libcurl sends it */

        { "", 0, false },
        { "v1/chat", 0, false },
        { "http://evil/v1/x", 0, false },
        { "*", 0, false },
        { "/v1/../../x", 0, false },
        { "/v1/..", 0, false },
        { "/..", 0, false },
        { "/v1/./x", 0, false },
        { "/v1/.", 0, false },
        { "/v1/.?x=1", 0, false },
        { "/v1/%2e%2e/x", 0, false },
        { "/v1/%2E%2e/x", 0, false },
        { "/v1/.%2E/x", 0, false },
        { "/v1/%2e/x", 0, false },
        { "/v1/a%2fb", 0, false },
        { "/v1/a%2Fb", 0, false },
        { "/v1/a%5cb", 0, false },
        { "/v1/a\\b", 0, false },
        { "/v1/a%00b", 0, false },
        { "/v1/a%0d%0ab", 0, false },
        { "/v1/a b", 0, false },
        { "/v1/a\tb", 0, false },
        { "/v1/a\x01", 0, false },
        { "/v1/a\x7f", 0, false },
        { "/v1/a\0b", 7, false },
        { "/v1/%zz", 0, false },
        { "/v1/%4", 0, false },
        { "/v1/%", 0, false },
        { "/v1/x?q=%g0", 0, false },
        { "/v1/x#frag", 0, false },
};

START_TEST(test_target_check_table)
{
        const struct target_case *t = &target_cases[_i];
        size_t len = t->len ? t->len : strlen(t->target);
        const char *problem = NULL;
        int r = http_target_check(t->target, len, &problem);

        if (t->ok) {
                ck_assert_msg(r == 0, "'%s' must be accepted, refused: %s", t->target, problem);
                ck_assert_ptr_null(problem);
        } else {
                ck_assert_msg(r == -EINVAL, "'%s' must be refused", t->target);
                ck_assert_msg(problem && *problem, "'%s' refused without a reason", t->target);
        }
}
END_TEST

START_TEST(test_target_check_leaves_the_problem_alone_when_fine)
{
        const char *problem = "untouched";

        ck_assert_int_eq(http_target_check("/v1/x", 5, &problem), 0);
        ck_assert_str_eq(problem, "untouched");
        ck_assert_int_eq(http_target_check("/v1/..", 6, NULL), -EINVAL);
}
END_TEST

/* Only the given length counts: the check is never fooled by what follows. */
START_TEST(test_target_check_reads_only_the_given_length)
{
        ck_assert_int_eq(http_target_check("/v1/x/..", 5, NULL), 0);
        ck_assert_int_eq(http_target_check("/v1/x%2", 6, NULL), -EINVAL);
}
END_TEST

static Suite *http_suite(void) {
        Suite *s = suite_create("http");
        TCase *parse = tcase_create("parsing"), *pipe = tcase_create("keep-alive"),
              *gone = tcase_create("client gone"), *answer = tcase_create("answers"),
              *timing = tcase_create("timeouts"), *pure = tcase_create("pure"),
              *target = tcase_create("target"), *rfc = tcase_create("RFC 9112"),
              *slow = tcase_create("slow clients"), *budget = tcase_create("body budget"),
              *head = tcase_create("HEAD");

        tcase_add_checked_fixture(parse, setup, teardown);
        tcase_add_test(parse, test_request_line_reaches_the_handler_as_method_url_and_version);
        tcase_add_test(parse, test_header_values_are_trimmed_and_names_keep_their_spelling);
        tcase_add_test(parse, test_many_headers_all_reach_the_handler_intact);
        tcase_add_test(parse, test_request_arriving_a_byte_at_a_time_is_parsed_whole);
        tcase_add_test(parse, test_headers_over_the_limit_are_answered_431_and_the_connection_closed);
        tcase_add_test(parse, test_headers_of_exactly_the_limit_are_accepted);
        tcase_add_test(parse, test_header_limit_counts_headers_sent_in_many_small_writes);
        tcase_add_test(parse, test_body_over_the_limit_by_content_length_is_answered_413_before_it_is_sent);
        tcase_add_test(parse, test_body_of_exactly_the_limit_is_accepted);
        tcase_add_test(parse, test_chunked_body_over_the_limit_is_answered_413);
        tcase_add_test(parse, test_chunked_body_is_joined_and_its_trailer_fields_kept);
        tcase_add_test(parse, test_malformed_request_is_answered_400_and_the_connection_closed);
        tcase_add_test(parse, test_expect_100_continue_gets_the_interim_answer_before_the_body_is_sent);
        suite_add_tcase(s, parse);

        tcase_add_checked_fixture(pipe, setup, teardown);
        tcase_add_test(pipe, test_pipelined_requests_in_one_write_are_answered_in_order);
        tcase_add_test(pipe, test_pipelined_request_waits_until_the_answer_before_it_is_sent);
        tcase_add_test(pipe, test_a_request_head_is_released_once_handed_over_and_the_rest_once_answered);
        tcase_add_test(pipe, test_a_large_requests_buffers_do_not_stay_for_the_next_small_one);
        tcase_add_test(pipe, test_keep_alive_connection_serves_a_later_request);
        tcase_add_test(pipe, test_connection_close_is_answered_and_later_pipelined_requests_dropped);
        tcase_add_test(pipe, test_http10_request_is_answered_with_connection_close_and_closed);
        tcase_add_test(pipe, test_http10_request_asking_for_keep_alive_stays_open);
        suite_add_tcase(s, pipe);

        tcase_add_checked_fixture(gone, setup, teardown);
        tcase_add_test(gone, test_half_closed_unix_client_still_gets_its_answer);
        tcase_add_test(gone, test_requests_pipelined_before_a_half_close_are_all_answered);
        tcase_add_test(gone, test_half_closed_tcp_client_still_gets_its_answer);
        tcase_add_test(gone, test_client_leaving_while_its_request_is_served_aborts_the_request);
        tcase_add_test(gone, test_client_hanging_up_mid_request_closes_without_calling_the_handler);
        tcase_add_test(gone, test_handler_aborting_closes_at_once_without_on_abort);
        suite_add_tcase(s, gone);

        tcase_add_checked_fixture(answer, setup, teardown);
        tcase_add_test(answer, test_respond_writes_status_line_given_headers_connection_and_content_length);
        tcase_add_test(answer, test_respond_error_writes_the_openai_error_shape_in_plain_ascii);
        tcase_add_test(answer, test_second_answer_to_one_request_is_refused);
        tcase_add_test(answer, test_stream_to_http11_client_is_chunked_and_ends_with_the_zero_chunk);
        tcase_add_test(answer, test_streamed_output_waits_for_the_loop_and_keeps_its_order);
        tcase_add_test(answer, test_an_aborted_stream_sends_what_it_had_written_before_the_close);
        tcase_add_test(answer, test_stream_to_http10_client_is_ended_by_closing);
        tcase_add_test(answer, test_stream_write_reports_pressure_and_on_drain_follows_when_the_client_reads);
        suite_add_tcase(s, answer);

        tcase_add_checked_fixture(timing, setup, teardown);
        tcase_add_test(timing, test_silent_client_is_closed_after_the_idle_timeout);
        tcase_add_test(timing, test_keep_alive_connection_is_closed_after_the_idle_timeout_following_an_answer);
        tcase_add_test(timing, test_slow_handler_is_not_timed_out_while_the_client_waits);
        tcase_add_test(timing, test_client_that_stops_reading_is_closed_after_the_timeout_and_its_request_aborted);
        tcase_add_test(timing, test_shutdown_closes_an_idle_keep_alive_connection_once_drain_idle_passes);
        tcase_add_test(timing, test_shutdown_serves_the_next_request_of_an_idle_keep_alive_connection_with_connection_close);
        tcase_add_test(timing, test_shutdown_serves_a_request_already_waiting_in_the_socket);
        tcase_add_test(timing, test_shutdown_during_a_keep_alive_stream_answers_the_next_request_before_closing);
        tcase_add_test(timing, test_shutdown_lets_the_request_being_served_finish_with_connection_close);
        tcase_add_test(timing, test_shutdown_still_serves_a_fresh_connections_first_request);
        suite_add_tcase(s, timing);

        tcase_add_checked_fixture(rfc, setup, teardown);
        tcase_add_test(rfc, test_http11_request_without_host_is_answered_400);
        tcase_add_test(rfc, test_http11_request_with_two_host_fields_is_answered_400);
        tcase_add_test(rfc, test_whitespace_before_a_field_colon_is_answered_400);
        tcase_add_test(rfc, test_obs_fold_line_is_answered_400);
        tcase_add_test(rfc, test_obs_fold_line_starting_a_later_write_is_answered_400);
        tcase_add_test(rfc, test_target_that_cannot_be_forwarded_as_written_is_answered_400);
        suite_add_tcase(s, rfc);

        tcase_add_checked_fixture(slow, setup, teardown);
        tcase_add_test(slow, test_head_trickling_past_header_timeout_is_answered_408_and_closed);
        tcase_add_test(slow, test_keep_alive_connection_waiting_for_its_next_request_is_not_cut_by_header_timeout);
        tcase_add_test(slow, test_body_below_body_min_rate_is_answered_408_and_closed);
        suite_add_tcase(s, slow);

        tcase_add_checked_fixture(budget, setup, teardown);
        tcase_add_test(budget, test_declared_body_beyond_the_body_budget_is_answered_503_with_retry_after);
        tcase_add_test(budget, test_chunked_body_growing_beyond_the_body_budget_is_answered_503_with_retry_after);
        tcase_add_test(budget, test_body_budget_is_shared_by_the_connections_and_freed_by_the_answer);
        suite_add_tcase(s, budget);

        tcase_add_checked_fixture(head, setup, teardown);
        tcase_add_test(head, test_head_answer_says_the_length_and_sends_no_body);
        tcase_add_test(head, test_streamed_answer_to_head_is_the_head_alone);
        suite_add_tcase(s, head);

        tcase_add_test(pure, test_request_header_looks_names_up_without_regard_to_case);
        tcase_add_test(pure, test_status_reason_names_known_codes_and_falls_back_by_class);
        suite_add_tcase(s, pure);

        tcase_add_loop_test(target, test_target_check_table, 0,
                            (int) (sizeof target_cases / sizeof target_cases[0]));
        tcase_add_test(target, test_target_check_leaves_the_problem_alone_when_fine);
        tcase_add_test(target, test_target_check_reads_only_the_given_length);
        suite_add_tcase(s, target);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(http_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
