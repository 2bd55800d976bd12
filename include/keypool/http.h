/* http.h — client connections: HTTP/1.1 requests in, responses out.
 *
 * Owns one accepted client socket: reading and parsing requests with http-parser (keep-alive,
 * pipelining one request at a time), refusing what cannot be forwarded as written (a bad target,
 * header fields outside RFC 9112), enforcing the header and body limits, the head deadline, the
 * minimum body rate, the worker's budget for buffered bodies and the idle timeout, and writing
 * responses — whole, or streamed with chunked encoding and back-pressure. It knows
 * nothing of keys or upstreams: a request is handed to the handler, which answers through the
 * http_conn_respond/stream calls, possibly much later, from any event callback.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <systemd/sd-event.h>

struct http_conn;

struct http_field {
        char *name;                     /* NUL-terminated */
        char *value;                    /* NUL-terminated, surrounding white space trimmed */
};

struct http_request {
        const char *method;             /* "GET", "POST", … */
        char *url;                      /* request target as sent, NUL-terminated */
        struct http_field *fields;
        size_t n_fields;
        char *body;                     /* NUL-terminated for convenience; body_len excludes it */
        size_t body_len;
        bool keep_alive;
        unsigned short major, minor;
};

struct http_header {
        const char *name;
        const char *value;
};

/* Who is on the other end, as the worker learned it at accept. */
struct http_peer {
        bool tcp;                       /* came in over the TCP listener */
        bool have_uid;                  /* UNIX socket: SO_PEERCRED gave uid */
        unsigned uid;
};

/* Every field applies as set: 0 is not "no limit" (a header_timeout of 0 makes every head late,
 * a body_budget of 0 refuses every body). */
struct http_limits {
        size_t max_header;              /* request line and headers together, bytes */
        size_t max_body;                /* request body, bytes */
        uint64_t timeout_usec;          /* idle client / stalled write */
        uint64_t header_timeout_usec;   /* from a request's first byte to its complete head; also
                                         * the window over which body_min_rate is measured */
        size_t body_min_rate;           /* bytes/s a request body must average per window */
        size_t body_budget;             /* request bodies one poller (worker) may buffer, bytes */
        uint64_t drain_idle_usec;       /* after http_conn_shutdown: how long a kept-alive
                                         * connection may stay quiet before it is closed */
};

struct http_handler {
        /* A complete request. The handler must eventually answer (respond or stream_end) or
         * abort the connection. r's body stays valid until then; its target and fields only
         * until on_request returns (their buffers are freed then: copy what is kept). */
        void (*on_request)(struct http_conn *c, struct http_request *r, void *userdata);
        /* The client went away while a request was active: drop every reference to c. */
        void (*on_abort)(struct http_conn *c, void *request_data);
        /* Buffered output fell below the low-water mark after stream_write reported pressure. */
        void (*on_drain)(struct http_conn *c, void *request_data);
        /* The connection is gone (freed right after this returns). */
        void (*on_closed)(struct http_conn *c, void *userdata);
};

/* One per event loop: every connection's socket in the evloop's epoll set (shared with the
 * upstream's sockets), and one deferred task for all connections' follow-up work, run after each
 * batch of ready sockets (see evloop.h). */
struct http_poller;
struct evloop;

int http_poller_new(struct evloop *loop, struct http_poller **ret);
/* Only once every connection made with it is gone (or the process is about to exit). */
void http_poller_free(struct http_poller *p);

/* Takes ownership of fd (non-blocking). */
int http_conn_new(struct http_poller *p, int fd, const struct http_limits *limits,
                  const struct http_handler *h, void *userdata, struct http_conn **ret);

void http_conn_set_peer(struct http_conn *c, const struct http_peer *peer);
const struct http_peer *http_conn_peer(const struct http_conn *c);

/* Data the handler attaches to the active request (passed to on_abort/on_drain). */
void http_conn_set_request_data(struct http_conn *c, void *request_data);

/* Whole response. Adds Content-Length, Connection, and the given headers. */
int http_conn_respond(struct http_conn *c, int status, const struct http_header *h, size_t n_h,
                      const char *body, size_t len);

/* keypool's own error in the OpenAI shape {"error":{"message","type","code"}}. */
int http_conn_respond_error(struct http_conn *c, int status, const char *type, const char *code,
                            const struct http_header *h, size_t n_h, const char *fmt, ...)
        __attribute__((format(printf, 7, 8)));

/* Streamed response: chunked for HTTP/1.1 clients, close-delimited for HTTP/1.0. */
int http_conn_stream_begin(struct http_conn *c, int status, const struct http_header *h, size_t n_h);
/* Returns 1 when the output buffer is above its high-water mark (pause the source and wait for
 * on_drain), 0 otherwise, negative on error. */
int http_conn_stream_write(struct http_conn *c, const void *data, size_t len);
int http_conn_stream_end(struct http_conn *c);
bool http_conn_stream_started(const struct http_conn *c);

/* Closes at once, without finishing any response (on_abort is not called). */
void http_conn_abort(struct http_conn *c);

/* Graceful stop without losing a request: the answer being written says Connection: close if
 * its head has not gone out, and the connection closes after it. A connection whose last head
 * said keep-alive serves one more request (answered with Connection: close) if it comes within
 * drain_idle, and closes when that passes with no byte waiting. A fresh connection's first
 * request is still served. */
void http_conn_shutdown(struct http_conn *c);

/* Is a request being served (from complete request to response flushed)? */
bool http_conn_busy(const struct http_conn *c);

/* Bytes the connection holds in buffers (request, read-ahead, output), as allocated: what it
 * costs beyond its own record. 0 between requests once the last answer is written. */
size_t http_conn_buffered_bytes(const struct http_conn *c);

/* Can target be sent upstream exactly as written? 0, or -EINVAL with *ret_problem saying why:
 * origin-form only, no control characters, spaces or '#', valid percent escapes, no '.' or '..'
 * segment in plain or percent-encoded form and no encoded '/' or '\\' in the path (libcurl and
 * upstreams would resolve them, and a caller could leave base_url with keypool's key). */
int http_target_check(const char *target, size_t len, const char **ret_problem);

/* The value of a request header (case-insensitive name), or NULL. */
const char *http_request_header(const struct http_request *r, const char *name);

const char *http_status_reason(int status);
