/* fuzz_http.c — the HTTP request front: request line, headers, chunked bodies, pipelining.
 *
 * One real http_conn over a socketpair(2) on a real sd-event loop, as check_http drives it: the
 * harness is the client. Input: a byte whose low bits choose how the handler answers (at once,
 * streamed, by aborting, or later, after the next piece of input arrived), a byte giving the size
 * of the pieces the rest is sent in (0: all at once), then the bytes the client sends, after
 * which it half-closes. The loop runs until it has nothing to do after every piece; a loop that
 * never goes idle is a finding (abort()), as is anything but an HTTP/1.x status line first in what
 * the client receives. The limits are small so that each of them is reached.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <systemd/sd-event.h>

#include "keypool/evloop.h"
#include "keypool/http.h"
#include "fuzz.h"

enum mode {
        MODE_AT_ONCE,           /* 200 with the target as body, from on_request */
        MODE_STREAM,            /* a streamed 200, begun and ended from on_request */
        MODE_ABORT,             /* on_request aborts the connection */
        MODE_LATER,             /* answered after the next piece of input */
};

static struct state {
        sd_event *event;
        struct evloop *loop;
        struct http_poller *poller;
        struct http_conn *conn;         /* NULL once on_closed ran */
        struct http_conn *held;         /* MODE_LATER: a request waiting for its answer */
        enum mode mode;
        int client;
        size_t received;
        char first[8];                  /* the first bytes the client received */
} S;

static const struct http_limits limits = {
        .max_header = 2048,
        .max_body = 4096,
        /* Long enough never to fire while one input runs: timing is not what this tests. */
        .timeout_usec = 3600 * 1000000ULL,
        .header_timeout_usec = 3600 * 1000000ULL,
        .body_min_rate = 1,
        .body_budget = 16384,
};

static void answer(struct http_conn *c, const struct http_request *r) {
        static const struct http_header h[] = { { "X-Fuzz", "1" } };

        (void) http_conn_respond(c, 200, h, 1, r ? r->url : "later", r ? strlen(r->url) : 5);
}

static void on_request(struct http_conn *c, struct http_request *r, void *userdata) {
        CHECK(c == S.conn);
        CHECK(r->method && r->url && r->body);
        CHECK(r->body[r->body_len] == 0);
        CHECK(r->body_len <= limits.max_body);
        for (size_t i = 0; i < r->n_fields; i++)
                CHECK(r->fields[i].name && r->fields[i].value);
        (void) http_request_header(r, "Content-Type");

        switch (S.mode) {
        case MODE_AT_ONCE:
                answer(c, r);
                break;
        case MODE_STREAM:
                if (http_conn_stream_begin(c, 200, NULL, 0) == 0 &&
                    http_conn_stream_write(c, r->url, strlen(r->url)) >= 0)
                        (void) http_conn_stream_end(c);
                break;
        case MODE_ABORT:
                http_conn_abort(c);
                break;
        case MODE_LATER:
                S.held = c;
                break;
        }
}

static void on_abort(struct http_conn *c, void *request_data) {
        if (S.held == c)
                S.held = NULL;
}

static void on_drain(struct http_conn *c, void *request_data) {
}

static void on_closed(struct http_conn *c, void *userdata) {
        CHECK(c == S.conn);
        S.conn = NULL;
        S.held = NULL;
}

static const struct http_handler handler = {
        .on_request = on_request,
        .on_abort = on_abort,
        .on_drain = on_drain,
        .on_closed = on_closed,
};

static void run_idle(void) {
        for (int i = 0; i < 100000; i++) {
                int r = sd_event_run(S.event, 0);

                CHECK(r >= 0);
                if (r == 0)
                        return;
        }
        fprintf(stderr, "the loop never went idle\n");
        abort();
}

/* Reads (and forgets) what the server sent, keeping its first bytes. */
static void drain_client(void) {
        char buf[16384];
        ssize_t n;

        while ((n = recv(S.client, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
                if (S.received < sizeof S.first) {
                        size_t k = sizeof S.first - S.received;

                        memcpy(S.first + S.received, buf, (size_t) n < k ? (size_t) n : k);
                }
                S.received += (size_t) n;
        }
}

/* Lets the server do all it can with what it has, answering a held request when its turn comes. */
static void settle(void) {
        run_idle();
        drain_client();
        if (S.held) {
                struct http_conn *c = S.held;

                S.held = NULL;
                answer(c, NULL);
                run_idle();
                drain_client();
        }
}

/* Sends all of data, letting the server read when the socket is full; false when it closed. */
static bool client_send(const uint8_t *data, size_t len) {
        while (len > 0) {
                ssize_t n = send(S.client, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);

                if (n < 0) {
                        if (errno != EAGAIN)
                                return false;
                        settle();
                        if (!S.conn)
                                return false;
                        continue;
                }
                data += n;
                len -= (size_t) n;
        }
        return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        int sv[2];
        size_t piece;

        if (size < 2)
                return 0;
        S = (struct state) { .mode = (enum mode) (data[0] & 3), .client = -1 };
        piece = data[1] ? data[1] : size;
        data += 2;
        size -= 2;

        CHECK(sd_event_new(&S.event) >= 0);
        CHECK(evloop_new(S.event, &S.loop) == 0);
        CHECK(http_poller_new(S.loop, &S.poller) == 0);
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
        CHECK(http_conn_new(S.poller, sv[0], &limits, &handler, NULL, &S.conn) == 0);
        http_conn_set_peer(S.conn, &(struct http_peer) { .tcp = data[-2] & 4 });
        S.client = sv[1];

        for (size_t off = 0; off < size && S.conn; off += piece) {
                size_t n = size - off < piece ? size - off : piece;

                if (!client_send(data + off, n))
                        break;
                settle();
        }
        if (S.conn) {
                shutdown(S.client, SHUT_WR);
                settle();
                settle();
        }
        if (S.received > 0)
                CHECK(S.received >= 7 ? memcmp(S.first, "HTTP/1.", 7) == 0 :
                      memcmp(S.first, "HTTP/1.", S.received) == 0);
        if (S.conn) {
                http_conn_abort(S.conn);
                run_idle();
        }
        CHECK(!S.conn);
        close(S.client);
        http_poller_free(S.poller);
        evloop_free(S.loop);
        sd_event_unref(S.event);
        return 0;
}
