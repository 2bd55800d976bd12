/* http.c — client connections: HTTP/1.1 requests in, responses out.
 *
 * Owns one accepted client socket from accept to close. Requests are parsed with http-parser,
 * one at a time: when a request is complete the parser is paused and any bytes the client sent
 * after it (pipelining) wait in `pending` until the response has been flushed. The socket's epoll
 * registration stays the same from request to request (input and hang-up, output only while
 * output waits): bytes that arrive while a request is served go to `pending` (up to PENDING_MAX,
 * then input is no longer watched), and a hang-up is noticed at once, so the upstream transfer
 * of a client that left can be cancelled. Streamed output is written once per loop iteration
 * (from the kick source), so an answer that arrives in one piece leaves in one write.
 *
 * The sockets live in the worker's one epoll set and the kicks in the poller's one list (see
 * http.h, evloop.h): a loop iteration handles a batch of ready sockets and then all of their
 * follow-up work.
 *
 * A connection is never freed from inside a call that may be on its own stack (the handler can
 * answer synchronously from on_request, or abort from a curl callback): closing marks it dead
 * and a deferred event source frees it on the next loop iteration.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <http_parser.h>
#include <jansson.h>

#include "keypool/evloop.h"
#include "keypool/http.h"

#define READ_CHUNK      (64 * 1024)
#define OUT_HIGH_WATER  (1024 * 1024)   /* stream_write reports pressure above this */
#define OUT_LOW_WATER   (256 * 1024)    /* on_drain fires below this */
#define PENDING_MAX     (64 * 1024)     /* bytes read ahead while a request is being served */

struct http_poller {
        sd_event *event;
        struct evloop *loop;            /* every connection's socket, and the kick below */
        struct ev_defer kick;           /* connections in kicks have work */
        struct http_conn *kicks;        /* singly linked through kick_next */
        struct http_conn **kicks_tail;
        size_t body_bytes;              /* request bodies buffered by every connection */
};

struct buf {
        char *data;
        size_t len;                     /* bytes held */
        size_t off;                     /* bytes already consumed (output: written) */
        size_t cap;
};

enum conn_phase {
        PHASE_READING = 1,              /* waiting for or receiving a request */
        PHASE_ACTIVE,                   /* the handler has the request */
        PHASE_FLUSHING,                 /* the response is complete, output still buffered */
        _PHASE_MAX,
};

struct http_conn {
        struct ev_watch watch;          /* first: the evloop hands this back */
        int fd;
        struct http_poller *poller;
        uint32_t events;                /* what fd is registered for */
        sd_event_source *timer;
        bool kick_due;                  /* in the poller's kick list: continue pipelining,
                                         * flush, or free when dead */
        struct http_conn *kick_next;
        const struct http_limits *limits;
        const struct http_handler *handler;
        void *userdata;
        void *request_data;
        struct http_peer peer;

        http_parser parser;
        enum conn_phase phase;
        bool dead;                      /* closed; freed by the kick source */
        bool close_after;               /* Connection: close, or graceful shutdown */
        bool said_close;                /* the last head written said Connection: close */
        bool draining;                  /* http_conn_shutdown was called */
        bool streaming;                 /* a streamed response has begun */
        bool chunked;                   /* … and uses chunked encoding */
        bool pressure;                  /* stream_write reported the high-water mark */
        bool in_message;                /* the parser has seen the start of a request */
        bool served;                    /* at least one response was completed */
        bool half_closed;               /* the peer shut down its sending side */
        bool last_was_value;            /* header parsing: the previous callback was a value */
        bool flush_due;                 /* streamed output waits for the kick source */
        int error_status;               /* a limit tripped while parsing: answer this and close */
        const char *error_message;      /* … and why, for a 400 */
        bool is_head;                   /* the active request is HEAD: answers carry no body */

        /* The request head as raw lines, scanned before the parser sees it: http-parser takes
         * obs-fold (a line starting with SP/HTAB) as part of the previous value. */
        bool scan_line_start;
        bool scan_done;
        unsigned scan_lines;

        /* A head must be complete by head_deadline_usec (set at its first byte); a body must
         * grow by body_min_rate × window in every window of header_timeout. */
        uint64_t head_deadline_usec;    /* 0: no head is on its way */
        uint64_t body_window_end_usec;  /* 0: no body is on its way */
        size_t body_window_bytes;
        size_t body_charged;            /* of the poller's body_bytes */

        uint64_t deadline_usec;         /* idle timeout; the timer may still be set earlier */
        uint64_t drain_deadline_usec;   /* draining: an idle keep-alive connection closes then */
        size_t header_bytes;
        struct http_request req;
        size_t fields_cap;
        struct buf fields_text;         /* every field's name and value, NUL-terminated */
        size_t (*field_offs)[2];        /* where each field's name and value start in it */
        struct buf url, body;
        struct buf field_name, field_value;
        struct buf pending;             /* bytes received after the current request */
        struct buf out;
};

static int conn_update_events(struct http_conn *c);
static void conn_close(struct http_conn *c);
static void kick_soon(struct http_conn *c);
static int conn_flush(struct http_conn *c);
static void arm_deadline(struct http_conn *c, uint64_t *deadline, uint64_t in_usec);
static void scan_reset(struct http_conn *c);
static void conn_read(struct http_conn *c);

/* --- buffers ----------------------------------------------------------------------------- */

static int buf_grow(struct buf *b, size_t extra) {
        size_t need, cap;
        char *p;

        if (extra > SIZE_MAX - b->len - 1)
                return -ENOMEM;
        need = b->len + extra + 1;
        if (need <= b->cap)
                return 0;
        /* Reclaim consumed space before growing. */
        if (b->off > 0) {
                memmove(b->data, b->data + b->off, b->len - b->off);
                b->len -= b->off;
                b->off = 0;
                need = b->len + extra + 1;
                if (need <= b->cap)
                        return 0;
        }
        cap = b->cap ? b->cap : 256;
        while (cap < need)
                cap *= 2;
        p = realloc(b->data, cap);
        if (!p)
                return -ENOMEM;
        b->data = p;
        b->cap = cap;
        return 0;
}

/* Room for extra more bytes and a NUL. Nearly every call finds it there already: that test is
 * made where the call is, and only growing costs a call. */
static inline int buf_reserve(struct buf *b, size_t extra) {
        if (extra < b->cap - b->len)
                return 0;
        return buf_grow(b, extra);
}

static int buf_append(struct buf *b, const void *data, size_t len) {
        int r = buf_reserve(b, len);

        if (r < 0)
                return r;
        memcpy(b->data + b->len, data, len);
        b->len += len;
        b->data[b->len] = 0;
        return 0;
}

static int buf_add_str(struct buf *b, const char *s) {
        return buf_append(b, s, strlen(s));
}

/* n in base 10 or 16, as printf's %zu / %zx would write it. */
static int buf_add_number(struct buf *b, size_t n, unsigned base) {
        char digits[24];
        size_t i = sizeof digits;

        do {
                digits[--i] = "0123456789abcdef"[n % base];
                n /= base;
        } while (n > 0);
        return buf_append(b, digits + i, sizeof digits - i);
}

static size_t buf_pending(const struct buf *b) {
        return b->len - b->off;
}

static void buf_reset(struct buf *b) {
        b->len = b->off = 0;
        if (b->data)
                b->data[0] = 0;
}

static void buf_free(struct buf *b) {
        free(b->data);
        *b = (struct buf) {};
}

/* --- request targets --------------------------------------------------------------------- */

static int hex_digit(char ch) {
        if (ch >= '0' && ch <= '9')
                return ch - '0';
        if (ch >= 'a' && ch <= 'f')
                return ch - 'a' + 10;
        if (ch >= 'A' && ch <= 'F')
                return ch - 'A' + 10;
        return -1;
}

/* Is seg[0..len) "." or ".." once %2e is read as '.'? */
static bool dot_segment(const char *seg, size_t len) {
        unsigned dots = 0;
        size_t i = 0;

        while (i < len) {
                if (seg[i] == '.')
                        i++;
                else if (len - i >= 3 && seg[i] == '%' && seg[i + 1] == '2' && (seg[i + 2] | 0x20) == 'e')
                        i += 3;
                else
                        return false;
                if (++dots > 2)
                        return false;
        }
        return dots > 0;
}

/* The bytes of a request target target_problem must look at; every other byte passes. */
static const bool target_special[256] = {
        [0x00 ... 0x20] = true, [0x7f] = true, ['#'] = true, ['?'] = true, ['\\'] = true, ['%'] = true,
};

static const char *target_problem(const char *target, size_t len) {
        size_t path_end = len;

        if (len == 0 || target[0] != '/')
                return "the request target must be a path starting with '/'";
        for (size_t i = 0; i < len; i++) {
                unsigned char ch = (unsigned char) target[i];
                bool in_path = i < path_end;

                if (!target_special[ch])
                        continue;
                if (ch <= 0x20 || ch == 0x7f)
                        return "the request target contains a space or a control character";
                if (ch == '#')
                        return "the request target contains a fragment ('#')";
                if (ch == '?' && in_path)
                        path_end = i;
                else if (ch == '\\' && in_path)
                        return "the request path contains a '\\'";
                else if (ch == '%') {
                        int hi = i + 2 < len ? hex_digit(target[i + 1]) : -1;
                        int lo = hi >= 0 ? hex_digit(target[i + 2]) : -1;
                        int v = hi * 16 + lo;

                        if (lo < 0)
                                return "the request target has a '%' not followed by two hex digits";
                        if (in_path && (v == '/' || v == '\\'))
                                return "the request path contains an encoded '/' or '\\'";
                        if (in_path && (v < 0x20 || v == 0x7f))
                                return "the request path contains an encoded control character";
                }
        }
        for (const char *seg = target + 1, *stop = target + path_end;;) {
                const char *slash = memchr(seg, '/', (size_t) (stop - seg));

                if (dot_segment(seg, (size_t) ((slash ? slash : stop) - seg)))
                        return "the request path contains a '.' or '..' segment";
                if (!slash)
                        return NULL;
                seg = slash + 1;
        }
}

int http_target_check(const char *target, size_t len, const char **ret_problem) {
        const char *problem = target_problem(target, len);

        if (!problem)
                return 0;
        if (ret_problem)
                *ret_problem = problem;
        return -EINVAL;
}

/* --- request parsing --------------------------------------------------------------------- */

/* A connection's body bytes leave the worker's budget. */
static void body_release(struct http_conn *c) {
        c->poller->body_bytes -= c->body_charged;
        c->body_charged = 0;
}

/* The head's buffers (target, fields) go as soon as the handler has had the request: it copies
 * what it keeps and reads only the body later, and a connection that waits on a long answer (a
 * stream) must not hold them. */
static void request_head_release(struct http_conn *c) {
        free(c->req.fields);
        free(c->field_offs);
        c->req.fields = NULL;
        c->field_offs = NULL;
        c->fields_cap = 0;
        c->req.n_fields = 0;
        c->req.url = (char *) "";
        buf_free(&c->fields_text);
        buf_free(&c->url);
        buf_free(&c->field_name);
        buf_free(&c->field_value);
}

static void request_reset(struct http_conn *c) {
        body_release(c);
        /* Between requests a connection holds no request buffer: an idle keep-alive connection
         * must not keep a large body's, nor a small one's. */
        buf_free(&c->body);
        c->head_deadline_usec = 0;
        c->body_window_end_usec = 0;
        c->error_message = NULL;
        c->req.n_fields = 0;
        buf_reset(&c->fields_text);
        buf_reset(&c->url);
        buf_reset(&c->body);
        buf_reset(&c->field_name);
        buf_reset(&c->field_value);
        c->header_bytes = 0;
        c->last_was_value = false;
        c->in_message = false;
}

static int count_header_bytes(struct http_conn *c, size_t len) {
        c->header_bytes += len;
        if (c->header_bytes > c->limits->max_header) {
                c->error_status = 431;
                return -1;
        }
        return 0;
}

/* Appends s[0..len) and its NUL to the fields' text, the buffer's own NUL after them; the
 * offset in ret_off, taken after the reserve (which may move what the buffer holds). */
static int fields_add(struct http_conn *c, const char *s, size_t len, size_t *ret_off) {
        struct buf *b = &c->fields_text;
        size_t off;

        if (len == SIZE_MAX || buf_reserve(b, len + 1) < 0)
                return -1;
        off = b->len;
        memcpy(b->data + off, s, len);
        b->data[off + len] = 0;
        b->data[off + len + 1] = 0;
        b->len += len + 1;
        *ret_off = off;
        return 0;
}

/* Fields live in one buffer that may move as it grows: their pointers are set from their offsets
 * once the header (and again once any trailer) is complete. */
static void fields_point(struct http_conn *c) {
        for (size_t i = 0; i < c->req.n_fields; i++) {
                c->req.fields[i].name = c->fields_text.data + c->field_offs[i][0];
                c->req.fields[i].value = c->fields_text.data + c->field_offs[i][1];
        }
}

/* RFC 9110 tchar: what a field name is made of. */
static const bool tchar[256] = {
        ['a' ... 'z'] = true, ['A' ... 'Z'] = true, ['0' ... '9'] = true,
        ['!'] = true, ['#'] = true, ['$'] = true, ['%'] = true, ['&'] = true, ['\''] = true, ['*'] = true,
        ['+'] = true, ['-'] = true, ['.'] = true, ['^'] = true, ['_'] = true, ['`'] = true, ['|'] = true,
        ['~'] = true,
};

static bool is_tchar(char ch) {
        return tchar[(unsigned char) ch];
}

static int bad_request(struct http_conn *c, const char *why) {
        c->error_status = 400;
        c->error_message = why;
        return -1;
}

static int finish_field(struct http_conn *c) {
        const char *v = c->field_value.data ? c->field_value.data : "";
        size_t vlen = c->field_value.len;

        if (c->field_name.len == 0)
                return 0;
        /* http-parser takes "Authorization : x" as a field named "Authorization ", which no
         * list of fields to drop would match: RFC 9112 says such a request is rejected. */
        for (size_t i = 0; i < c->field_name.len; i++)
                if (!is_tchar(c->field_name.data[i]))
                        return bad_request(c, "a header field name contains whitespace or a "
                                              "character outside RFC 9110's token");
        if (c->req.n_fields == c->fields_cap) {
                size_t cap = c->fields_cap ? c->fields_cap * 2 : 16;
                struct http_field *f = reallocarray(c->req.fields, cap, sizeof *f);
                size_t (*offs)[2];

                if (!f)
                        return -1;
                c->req.fields = f;
                offs = reallocarray(c->field_offs, cap, sizeof *offs);
                if (!offs)
                        return -1;
                c->field_offs = offs;
                c->fields_cap = cap;
        }
        /* The value without the blanks around it. */
        while (vlen > 0 && (*v == ' ' || *v == '\t')) {
                v++;
                vlen--;
        }
        while (vlen > 0 && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
                vlen--;
        if (fields_add(c, c->field_name.data, c->field_name.len, &c->field_offs[c->req.n_fields][0]) < 0 ||
            fields_add(c, v, vlen, &c->field_offs[c->req.n_fields][1]) < 0)
                return -1;
        c->req.n_fields++;
        buf_reset(&c->field_name);
        buf_reset(&c->field_value);
        return 0;
}

static int on_message_begin(http_parser *p) {
        struct http_conn *c = p->data;

        request_reset(c);
        c->in_message = true;
        c->drain_deadline_usec = 0;     /* a request is on its way: it is served */
        /* A head is due header_timeout after its first byte, however steadily it trickles. */
        arm_deadline(c, &c->head_deadline_usec, c->limits->header_timeout_usec);
        return 0;
}

static int on_url(http_parser *p, const char *at, size_t len) {
        struct http_conn *c = p->data;

        if (count_header_bytes(c, len) < 0)
                return -1;
        return buf_append(&c->url, at, len) < 0 ? -1 : 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
        struct http_conn *c = p->data;

        if (count_header_bytes(c, len) < 0)
                return -1;
        if (c->last_was_value) {
                if (finish_field(c) < 0)
                        return -1;
                c->last_was_value = false;
        }
        return buf_append(&c->field_name, at, len) < 0 ? -1 : 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
        struct http_conn *c = p->data;

        if (count_header_bytes(c, len) < 0)
                return -1;
        c->last_was_value = true;
        return buf_append(&c->field_value, at, len) < 0 ? -1 : 0;
}

static int on_headers_complete(http_parser *p) {
        struct http_conn *c = p->data;
        const char *expect;

        const char *problem = NULL;
        size_t hosts = 0;

        if (finish_field(c) < 0)
                return -1;
        fields_point(c);
        if (http_target_check(c->url.data ? c->url.data : "", c->url.len, &problem) < 0)
                return bad_request(c, problem);
        for (size_t i = 0; i < c->req.n_fields; i++)
                hosts += (c->req.fields[i].name[0] | 0x20) == 'h' && strcasecmp(c->req.fields[i].name, "Host") == 0;
        if (p->http_major == 1 && p->http_minor >= 1 && hosts != 1)
                return bad_request(c, hosts ? "more than one Host header field"
                                            : "an HTTP/1.1 request without a Host header field");
        if ((p->flags & F_CONTENTLENGTH) && p->content_length > c->limits->max_body) {
                c->error_status = 413;
                return -1;
        }
        /* A declared body is reserved in the worker's budget before a byte of it is read. */
        if (p->flags & F_CONTENTLENGTH) {
                if (c->poller->body_bytes > c->limits->body_budget ||
                    p->content_length > c->limits->body_budget - c->poller->body_bytes) {
                        c->error_status = 503;
                        return -1;
                }
                c->body_charged = p->content_length;
                c->poller->body_bytes += c->body_charged;
        }
        c->head_deadline_usec = 0;
        if ((p->flags & F_CHUNKED) || ((p->flags & F_CONTENTLENGTH) && p->content_length > 0)) {
                c->body_window_bytes = 0;
                arm_deadline(c, &c->body_window_end_usec, c->limits->header_timeout_usec);
        }
        /* Clients such as curl hold large bodies back until told to go on. */
        expect = http_request_header(&c->req, "Expect");
        if (expect && strcasecmp(expect, "100-continue") == 0 && p->http_major == 1 && p->http_minor >= 1)
                (void) buf_append(&c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
        return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
        struct http_conn *c = p->data;

        if (c->body.len + len > c->limits->max_body) {
                c->error_status = 413;
                return -1;
        }
        /* A chunked body is charged as it comes. */
        if (c->body.len + len > c->body_charged) {
                size_t more = c->body.len + len - c->body_charged;

                if (c->poller->body_bytes > c->limits->body_budget ||
                    more > c->limits->body_budget - c->poller->body_bytes) {
                        c->error_status = 503;
                        return -1;
                }
                c->body_charged += more;
                c->poller->body_bytes += more;
        }
        c->body_window_bytes += len;
        return buf_append(&c->body, at, len) < 0 ? -1 : 0;
}

static int on_message_complete(http_parser *p) {
        struct http_conn *c = p->data;

        /* Trailers (after a chunked body) are fields too, and the last one is not finished. */
        if (c->last_was_value) {
                if (finish_field(c) < 0)
                        return -1;
                c->last_was_value = false;
        }
        fields_point(c);
        c->req.method = http_method_str(p->method);
        c->req.url = c->url.data ? c->url.data : (char *) "";
        c->req.body = c->body.data ? c->body.data : (char *) "";
        c->req.body_len = c->body.len;
        c->req.keep_alive = http_should_keep_alive(p);
        c->req.major = p->http_major;
        c->req.minor = p->http_minor;
        c->is_head = p->method == HTTP_HEAD;
        c->phase = PHASE_ACTIVE;
        c->in_message = false;
        c->head_deadline_usec = 0;
        c->body_window_end_usec = 0;
        scan_reset(c);
        /* One request at a time: whatever follows waits until this one is answered. */
        http_parser_pause(p, 1);
        return 0;
}

static const http_parser_settings parser_settings = {
        .on_message_begin = on_message_begin,
        .on_url = on_url,
        .on_header_field = on_header_field,
        .on_header_value = on_header_value,
        .on_headers_complete = on_headers_complete,
        .on_body = on_body,
        .on_message_complete = on_message_complete,
};

const char *http_request_header(const struct http_request *r, const char *name) {
        /* Equal names have equal first bytes once ASCII case is folded (|0x20 folds more, which
         * only lets strcasecmp decide): most fields are passed over without a call. */
        unsigned char first = (unsigned char) name[0] | 0x20;

        for (size_t i = 0; i < r->n_fields; i++)
                if (((unsigned char) r->fields[i].name[0] | 0x20) == first &&
                    strcasecmp(r->fields[i].name, name) == 0)
                        return r->fields[i].value;
        return NULL;
}

/* --- responses --------------------------------------------------------------------------- */

const char *http_status_reason(int status) {
        switch (status) {
        case 100: return "Continue";
        case 200: return "OK";
        case 201: return "Created";
        case 202: return "Accepted";
        case 204: return "No Content";
        case 301: return "Moved Permanently";
        case 302: return "Found";
        case 304: return "Not Modified";
        case 400: return "Bad Request";
        case 401: return "Unauthorized";
        case 402: return "Payment Required";
        case 403: return "Forbidden";
        case 404: return "Not Found";
        case 405: return "Method Not Allowed";
        case 408: return "Request Timeout";
        case 409: return "Conflict";
        case 413: return "Content Too Large";
        case 415: return "Unsupported Media Type";
        case 422: return "Unprocessable Content";
        case 429: return "Too Many Requests";
        case 431: return "Request Header Fields Too Large";
        case 500: return "Internal Server Error";
        case 501: return "Not Implemented";
        case 502: return "Bad Gateway";
        case 503: return "Service Unavailable";
        case 504: return "Gateway Timeout";
        case 529: return "Site Overloaded";
        default:  return status < 300 ? "OK" : status < 400 ? "Redirect" : status < 500 ? "Client Error" : "Server Error";
        }
}

/* Measured first and copied into room reserved once: a head is on every answer, and printf's
 * formatting (or an append per piece, each checking for room) costs more than the copying. */
static char *put(char *p, const char *s, size_t len) {
        memcpy(p, s, len);
        return p + len;
}

static int write_head(struct http_conn *c, int status, const struct http_header *h, size_t n_h) {
        const char *reason = http_status_reason(status);
        size_t reason_len = strlen(reason), conn_len, len;
        const char *conn;
        char code[4], *p;
        int r;

        c->said_close = c->close_after || (c->half_closed && buf_pending(&c->pending) == 0);
        conn = c->said_close ? "Connection: close\r\n" : "Connection: keep-alive\r\n";
        /* A status is three digits (anything else is sent as 0, which no client accepts). */
        if (status < 100 || status > 999)
                status = 0;
        code[0] = (char) ('0' + status / 100);
        code[1] = (char) ('0' + status / 10 % 10);
        code[2] = (char) ('0' + status % 10);
        conn_len = strlen(conn);
        len = 9 + 3 + 1 + reason_len + 2 + conn_len;
        for (size_t i = 0; i < n_h; i++)
                len += strlen(h[i].name) + 2 + strlen(h[i].value) + 2;
        r = buf_reserve(&c->out, len);
        if (r < 0)
                return r;
        p = c->out.data + c->out.len;
        p = put(p, "HTTP/1.1 ", 9);
        p = put(p, status ? code : "0", status ? 3 : 1);
        p = put(p, " ", 1);
        p = put(p, reason, reason_len);
        p = put(p, "\r\n", 2);
        for (size_t i = 0; i < n_h; i++) {
                p = stpcpy(p, h[i].name);
                p = put(p, ": ", 2);
                p = stpcpy(p, h[i].value);
                p = put(p, "\r\n", 2);
        }
        p = put(p, conn, conn_len);
        c->out.len = (size_t) (p - c->out.data);
        c->out.data[c->out.len] = 0;
        return 0;
}

/* Streamed output goes out from the kick source, after everything this loop iteration added. */
static void flush_soon(struct http_conn *c) {
        if (c->flush_due)
                return;
        c->flush_due = true;
        kick_soon(c);
}

static void response_complete(struct http_conn *c) {
        c->served = true;
        c->phase = PHASE_FLUSHING;
        c->streaming = false;
        c->pressure = false;
        c->request_data = NULL;
        if (conn_flush(c) < 0)
                return;
        conn_update_events(c);
}

int http_conn_respond(struct http_conn *c, int status, const struct http_header *h, size_t n_h,
                      const char *body, size_t len) {
        int r;

        if (c->dead || c->phase != PHASE_ACTIVE || c->streaming)
                return -EINVAL;
        r = write_head(c, status, h, n_h);
        if (r >= 0)
                r = buf_append(&c->out, "Content-Length: ", 16);
        if (r >= 0)
                r = buf_add_number(&c->out, len, 10);
        if (r >= 0)
                r = buf_append(&c->out, "\r\n\r\n", 4);
        /* A HEAD answer says how long the body would be, and sends none. */
        if (r >= 0 && len > 0 && !c->is_head)
                r = buf_append(&c->out, body, len);
        if (r < 0) {
                conn_close(c);
                return r;
        }
        response_complete(c);
        return 0;
}

int http_conn_respond_error(struct http_conn *c, int status, const char *type, const char *code,
                            const struct http_header *h, size_t n_h, const char *fmt, ...) {
        struct http_header headers[8];
        char message[512];
        json_t *j;
        char *text;
        va_list ap;
        size_t n = 0;
        int r;

        va_start(ap, fmt);
        vsnprintf(message, sizeof message, fmt, ap);
        va_end(ap);
        /* Messages may quote what the client sent, cut anywhere: keep them plain ASCII so the
         * JSON encoder never refuses one (and the client always gets its answer). */
        for (char *m = message; *m; m++)
                if ((unsigned char) *m < 0x20 || (unsigned char) *m >= 0x7f)
                        *m = '?';

        j = json_pack("{s:{s:s, s:s, s:s}}", "error", "message", message, "type", type, "code", code);
        text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (!text) {
                conn_close(c);
                return -ENOMEM;
        }
        headers[n++] = (struct http_header) { "Content-Type", "application/json" };
        for (size_t i = 0; i < n_h && n < sizeof headers / sizeof headers[0]; i++)
                headers[n++] = h[i];
        r = http_conn_respond(c, status, headers, n, text, strlen(text));
        free(text);
        return r;
}

int http_conn_stream_begin(struct http_conn *c, int status, const struct http_header *h, size_t n_h) {
        int r;

        if (c->dead || c->phase != PHASE_ACTIVE || c->streaming)
                return -EINVAL;
        c->chunked = c->req.major > 1 || (c->req.major == 1 && c->req.minor >= 1);
        if (!c->chunked)
                c->close_after = true;          /* HTTP/1.0: the end of the body is the close */
        r = write_head(c, status, h, n_h);
        if (r >= 0)
                r = buf_add_str(&c->out, c->chunked ? "Transfer-Encoding: chunked\r\n\r\n" : "\r\n");
        if (r < 0) {
                conn_close(c);
                return r;
        }
        c->streaming = true;
        flush_soon(c);
        return 0;
}

int http_conn_stream_write(struct http_conn *c, const void *data, size_t len) {
        int r = 0;

        if (c->dead || !c->streaming)
                return -EPIPE;
        if (len == 0 || c->is_head)
                return 0;
        if (c->chunked) {
                r = buf_add_number(&c->out, len, 16);
                if (r >= 0)
                        r = buf_append(&c->out, "\r\n", 2);
        }
        if (r >= 0)
                r = buf_append(&c->out, data, len);
        if (r >= 0 && c->chunked)
                r = buf_append(&c->out, "\r\n", 2);
        if (r < 0) {
                conn_close(c);
                return r;
        }
        if (buf_pending(&c->out) <= OUT_HIGH_WATER) {
                flush_soon(c);
                return 0;
        }
        /* Much is waiting: write now, and push back if the client does not keep up. */
        r = conn_flush(c);
        if (r < 0)
                return r;
        if (buf_pending(&c->out) > OUT_HIGH_WATER) {
                c->pressure = true;
                return 1;
        }
        return 0;
}

int http_conn_stream_end(struct http_conn *c) {
        if (c->dead || !c->streaming)
                return -EPIPE;
        if (c->chunked && !c->is_head && buf_append(&c->out, "0\r\n\r\n", 5) < 0) {
                conn_close(c);
                return -ENOMEM;
        }
        response_complete(c);
        return 0;
}

bool http_conn_stream_started(const struct http_conn *c) {
        return c->streaming;
}

void http_conn_set_peer(struct http_conn *c, const struct http_peer *peer) {
        c->peer = *peer;
}

const struct http_peer *http_conn_peer(const struct http_conn *c) {
        return &c->peer;
}

void http_conn_set_request_data(struct http_conn *c, void *request_data) {
        c->request_data = request_data;
}

bool http_conn_busy(const struct http_conn *c) {
        return !c->dead && (c->phase != PHASE_READING || c->in_message);
}

size_t http_conn_buffered_bytes(const struct http_conn *c) {
        return c->fields_cap * (sizeof *c->req.fields + sizeof *c->field_offs) + c->fields_text.cap +
                c->url.cap + c->body.cap + c->field_name.cap + c->field_value.cap + c->pending.cap +
                c->out.cap;
}

/* --- the socket -------------------------------------------------------------------------- */

/* Moves the idle deadline. A timer already set (to an earlier time) stays: on_timeout sets it
 * again when the deadline has moved on, so a busy connection costs no timer updates. */
static void arm_timer(struct http_conn *c) {
        uint64_t now;
        int enabled = SD_EVENT_OFF;

        if (sd_event_now(c->poller->event, CLOCK_MONOTONIC, &now) < 0)
                return;
        c->deadline_usec = now + c->limits->timeout_usec;
        if (sd_event_source_get_enabled(c->timer, &enabled) >= 0 && enabled != SD_EVENT_OFF)
                return;
        if (sd_event_source_set_time(c->timer, c->deadline_usec) >= 0)
                sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
}

/* Sets *deadline to now + in_usec and brings the timer forward to it if needed: the timer is
 * never later than any deadline (on_timeout sets it again to the next one). */
static void arm_deadline(struct http_conn *c, uint64_t *deadline, uint64_t in_usec) {
        uint64_t now, at = 0;
        int enabled = SD_EVENT_OFF;

        if (sd_event_now(c->poller->event, CLOCK_MONOTONIC, &now) < 0)
                return;
        *deadline = now + in_usec;
        if (sd_event_source_get_enabled(c->timer, &enabled) >= 0 && enabled != SD_EVENT_OFF &&
            sd_event_source_get_time(c->timer, &at) >= 0 && at <= *deadline)
                return;
        if (sd_event_source_set_time(c->timer, *deadline) >= 0)
                sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
}

static uint64_t earliest(uint64_t a, uint64_t b) {
        return a == 0 ? b : b == 0 ? a : a < b ? a : b;
}

/* The first deadline of a connection waiting for (the rest of) a request, 0 for none. */
static uint64_t reading_deadline(const struct http_conn *c) {
        return earliest(earliest(c->head_deadline_usec, c->body_window_end_usec), c->drain_deadline_usec);
}

static int conn_update_events(struct http_conn *c) {
        /* Once the peer has half-closed, RDHUP would fire for ever (level-triggered). */
        uint32_t events = c->half_closed ? 0 : EPOLLRDHUP;
        int r;

        if (c->dead)
                return 0;
        /* Input is watched while a request is served too (read ahead into pending), so the
         * registration does not change twice per request. */
        if (!c->half_closed && (c->phase == PHASE_READING || buf_pending(&c->pending) < PENDING_MAX))
                events |= EPOLLIN;
        if (buf_pending(&c->out) > 0)
                events |= EPOLLOUT;
        /* The timeout guards a silent client and a client that stops reading; an upstream that
         * takes its time is the upstream timeout's business (on_timeout lets such a connection
         * be: the timer is not switched off and on around every request, which cost more). */
        if (c->phase == PHASE_READING || buf_pending(&c->out) > 0) {
                uint64_t at = 0;

                arm_timer(c);
                /* arm_timer leaves an enabled timer alone: it must not be past a head or body
                 * deadline set before it was last switched off. */
                if (sd_event_source_get_time(c->timer, &at) >= 0 &&
                    reading_deadline(c) != 0 && reading_deadline(c) < at &&
                    sd_event_source_set_time(c->timer, reading_deadline(c)) >= 0)
                        sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
        }
        if (c->phase == PHASE_FLUSHING && buf_pending(&c->out) == 0)
                kick_soon(c);
        if (events == c->events)
                return 0;
        r = evloop_mod(c->poller->loop, c->fd, events, &c->watch);
        if (r < 0)
                return r;
        c->events = events;
        return 0;
}

/* Writes what it can. Returns 0, or a negative errno after closing the connection. */
static int conn_flush(struct http_conn *c) {
        size_t before = buf_pending(&c->out);

        c->flush_due = false;
        while (buf_pending(&c->out) > 0) {
                ssize_t n = send(c->fd, c->out.data + c->out.off, buf_pending(&c->out),
                                 MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                break;
                        conn_close(c);
                        return -EPIPE;
                }
                c->out.off += (size_t) n;
        }
        /* All written: the buffer goes, so that a stream waiting for its next event (or a
         * connection waiting for its next request) holds none. */
        if (buf_pending(&c->out) == 0)
                buf_free(&c->out);
        if (buf_pending(&c->out) != before || buf_pending(&c->out) > 0)
                conn_update_events(c);
        if (c->pressure && buf_pending(&c->out) < OUT_LOW_WATER) {
                c->pressure = false;
                if (c->handler->on_drain && c->request_data)
                        c->handler->on_drain(c, c->request_data);
        }
        return 0;
}

static void answer_parse_error(struct http_conn *c, int status) {
        c->error_status = status;
        c->close_after = true;
        c->phase = PHASE_ACTIVE;
        c->is_head = false;
        if (status == 408)
                http_conn_respond_error(c, 408, "invalid_request_error", "request_timeout",
                                        NULL, 0, "the request did not arrive in time");
        else if (status == 503)
                http_conn_respond_error(c, 503, "keypool_error", "body_budget_exhausted",
                                        (const struct http_header[]) { { "Retry-After", "1" } }, 1,
                                        "this worker holds as many request bodies as it may; "
                                        "try again shortly");
        else if (status == 400 && c->error_message)
                http_conn_respond_error(c, 400, "invalid_request_error", "bad_request",
                                        NULL, 0, "%s", c->error_message);
        else if (status == 431)
                http_conn_respond_error(c, 431, "invalid_request_error", "headers_too_large",
                                        NULL, 0, "request headers exceed %zu bytes", c->limits->max_header);
        else if (status == 413)
                http_conn_respond_error(c, 413, "invalid_request_error", "body_too_large",
                                        NULL, 0, "request body exceeds %zu bytes", c->limits->max_body);
        else
                http_conn_respond_error(c, 400, "invalid_request_error", "bad_request",
                                        NULL, 0, "malformed HTTP request");
}

static void scan_reset(struct http_conn *c) {
        c->scan_line_start = true;
        c->scan_done = false;
        c->scan_lines = 0;
}

/* Looks at the raw lines of a request head for what http-parser would quietly accept: a field
 * line that starts with SP or HTAB (obs-fold, RFC 9112 §5.2), which it joins to the previous
 * value, so "X-A: a\r\n Authorization: …" would hide a field. Stops at the head's end. */
static int scan_head(struct http_conn *c, const char *data, size_t len) {
        const char *p = data, *end = data + len;

        while (p < end && !c->scan_done) {
                char ch;

                /* Inside a line only its end matters: memchr finds it a word at a time. */
                if (!c->scan_line_start) {
                        p = memchr(p, '\n', (size_t) (end - p));
                        if (!p)
                                return 0;
                }
                ch = *p++;
                if (ch == '\n') {
                        if (c->scan_line_start && c->scan_lines > 0)
                                c->scan_done = true;    /* the empty line ends the head */
                        else if (!c->scan_line_start || c->scan_lines > 0)
                                c->scan_lines++;
                        c->scan_line_start = true;
                        continue;
                }
                if (!c->scan_line_start || ch == '\r')
                        continue;
                if ((ch == ' ' || ch == '\t') && c->scan_lines > 0)
                        return bad_request(c, "a header field line starts with whitespace "
                                              "(obs-fold is not accepted)");
                c->scan_line_start = false;
        }
        return 0;
}

/* Feeds bytes to the parser. Stops at a complete request and keeps the rest in pending. */
static void conn_parse(struct http_conn *c, const char *data, size_t len) {
        size_t n;

        if (scan_head(c, data, len) < 0) {
                answer_parse_error(c, 400);
                return;
        }
        n = http_parser_execute(&c->parser, &parser_settings, data, len);
        if (HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED) {
                if (n < len && buf_append(&c->pending, data + n, len - n) < 0) {
                        conn_close(c);
                        return;
                }
                return;
        }
        if (HTTP_PARSER_ERRNO(&c->parser) != HPE_OK) {
                answer_parse_error(c, c->error_status ? c->error_status : 400);
                return;
        }
        /* The request line and headers must not grow without bound before the parser's own
         * limits trip: count what is buffered but not yet parsed. */
        if (c->in_message && c->header_bytes > c->limits->max_header) {
                answer_parse_error(c, 431);
                return;
        }
        /* "100 Continue" was queued by on_headers_complete: the client waits for it. */
        if (buf_pending(&c->out) > 0)
                conn_flush(c);
}

static void dispatch(struct http_conn *c) {
        if (!c->req.keep_alive)
                c->close_after = true;
        conn_update_events(c);
        c->handler->on_request(c, &c->req, c->userdata);
        request_head_release(c);
}

/* Continues after a response: close, or go on with a pipelined request. */
static void conn_next(struct http_conn *c) {
        struct buf rest;

        /* A close that the answer did not announce (the connection was asked to stop after its
         * head went out saying keep-alive) waits for the next request: the client may be
         * sending it already, and it is answered with Connection: close. */
        if ((c->close_after && (c->said_close || !c->draining)) ||
            (c->half_closed && buf_pending(&c->pending) == 0)) {
                conn_close(c);
                return;
        }
        request_reset(c);
        c->phase = PHASE_READING;
        http_parser_pause(&c->parser, 0);
        conn_update_events(c);
        if (buf_pending(&c->pending) == 0) {
                if (c->draining)
                        arm_deadline(c, &c->drain_deadline_usec, c->limits->drain_idle_usec);
                return;
        }
        rest = c->pending;
        c->pending = (struct buf) {};
        conn_parse(c, rest.data + rest.off, buf_pending(&rest));
        buf_free(&rest);
        if (!c->dead && c->phase == PHASE_ACTIVE && !c->streaming && c->error_status == 0)
                dispatch(c);
        else if (!c->dead && c->phase == PHASE_READING && c->half_closed)
                conn_close(c);          /* a request cut off by the half-close: none will follow */
}

static void conn_free(struct http_conn *c) {
        sd_event_source_disable_unref(c->timer);
        if (c->fd >= 0) {
                (void) evloop_del(c->poller->loop, c->fd);
                close(c->fd);
        }
        request_reset(c);
        free(c->req.fields);
        free(c->field_offs);
        buf_free(&c->fields_text);
        buf_free(&c->url);
        buf_free(&c->body);
        buf_free(&c->field_name);
        buf_free(&c->field_value);
        buf_free(&c->pending);
        buf_free(&c->out);
        free(c);
}

static void conn_close(struct http_conn *c) {
        void *request_data;

        if (c->dead)
                return;
        c->dead = true;
        request_data = c->request_data;
        c->request_data = NULL;
        sd_event_source_set_enabled(c->timer, SD_EVENT_OFF);
        (void) evloop_del(c->poller->loop, c->fd);
        close(c->fd);
        c->fd = -1;
        if (request_data && c->handler->on_abort)
                c->handler->on_abort(c, request_data);
        kick_soon(c);
}

void http_conn_abort(struct http_conn *c) {
        c->request_data = NULL;         /* the handler is the one aborting: don't call it back */
        /* A cut stream must look cut: what was already written for the client (the head, the
         * chunks so far) goes out first, as far as the socket takes it now, so the client sees
         * an answer that stops short instead of a connection closed with no answer at all. */
        if (!c->dead && buf_pending(&c->out) > 0)
                (void) conn_flush(c);
        if (!c->dead)
                conn_close(c);
}

void http_conn_shutdown(struct http_conn *c) {
        if (c->dead || c->draining)
                return;
        c->draining = true;
        c->close_after = true;
        /* An idle keep-alive connection goes once it has been quiet for drain_idle: its client
         * may be sending the next request right now, and closing under it would lose that
         * request (the client cannot tell "closed before reading" from "closed after"). One
         * accepted but not yet heard from is a client whose request is on its way: it is served
         * (with Connection: close), or dropped by the idle timeout. */
        if (!http_conn_busy(c) && c->served && buf_pending(&c->pending) == 0)
                arm_deadline(c, &c->drain_deadline_usec, c->limits->drain_idle_usec);
}

/* Is a request's first byte waiting in the socket? Looked at just before an idle close. */
static bool conn_input_waiting(struct http_conn *c) {
        char byte;
        ssize_t n;

        do
                n = recv(c->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        return n > 0;
}

static void on_kick(struct http_conn *c) {
        if (c->dead) {
                if (c->handler->on_closed)
                        c->handler->on_closed(c, c->userdata);
                conn_free(c);
                return;
        }
        if (c->flush_due && conn_flush(c) < 0)
                return;
        if (c->phase == PHASE_FLUSHING && buf_pending(&c->out) == 0)
                conn_next(c);
}

/* A client too slow to be worth a worker's memory and descriptor: told so if nothing is
 * being answered, then closed. */
static void too_slow(struct http_conn *c) {
        if (c->phase == PHASE_READING && buf_pending(&c->out) == 0) {
                answer_parse_error(c, 408);
                return;
        }
        conn_close(c);
}

static int on_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        struct http_conn *c = userdata;
        uint64_t now, next;

        if (sd_event_now(c->poller->event, CLOCK_MONOTONIC, &now) < 0)
                now = usec;
        /* The handler has the request and nothing waits to be written: not idle. Looked at again
         * a timeout later (the answer resets it when it comes). */
        if (c->phase == PHASE_ACTIVE && buf_pending(&c->out) == 0) {
                c->deadline_usec = now + c->limits->timeout_usec;
                if (sd_event_source_set_time(c->timer, c->deadline_usec) >= 0)
                        sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
                return 0;
        }
        if (c->phase == PHASE_READING && c->drain_deadline_usec && now >= c->drain_deadline_usec) {
                c->drain_deadline_usec = 0;
                /* Bytes already there are a request to serve, not a connection to close. */
                if (!c->in_message && !conn_input_waiting(c)) {
                        conn_close(c);
                        return 0;
                }
                conn_read(c);
                if (c->dead)
                        return 0;
        }
        if (c->phase == PHASE_READING && c->head_deadline_usec && now >= c->head_deadline_usec) {
                too_slow(c);
                return 0;
        }
        if (c->phase == PHASE_READING && c->body_window_end_usec && now >= c->body_window_end_usec) {
                uint64_t need = (uint64_t) c->limits->body_min_rate * c->limits->header_timeout_usec / 1000000;

                if (c->body_window_bytes < need) {
                        too_slow(c);
                        return 0;
                }
                c->body_window_bytes = 0;
                c->body_window_end_usec = now + c->limits->header_timeout_usec;
        }
        next = c->deadline_usec;
        if (c->phase == PHASE_READING)
                next = earliest(next, reading_deadline(c));
        if (now < next) {
                if (sd_event_source_set_time(c->timer, next) >= 0)
                        sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);
                return 0;
        }

        /* A silent client, or one that stopped reading its answer. */
        conn_close(c);
        return 0;
}

/* The peer stopped sending while a request of its is being served: a half-close (nc -N,
 * HTTP/1.0-style clients), and every request it sent before is still answered. Over a UNIX
 * socket a client that is gone shows as HUP instead. Over TCP a FIN looks the same whether the
 * client waits for its answer or has gone; one that has gone is found when the answer is
 * written (EPIPE, a reset), and until then its upstream call runs, bounded by its timeouts:
 * that is the price of never dropping a half-closed client's requests. */
static void peer_stopped_sending(struct http_conn *c) {
        /* Whatever it sent before is still answered (conn_next closes once pending is used). */
        c->half_closed = true;
        conn_update_events(c);
}

/* One recv: the byte count, 0 at end of input, or -1 when nothing is there now (or the
 * connection was closed on an error). */
static ssize_t conn_recv(struct http_conn *c, char *data, size_t size) {
        for (;;) {
                ssize_t n = recv(c->fd, data, size, MSG_DONTWAIT);

                if (n >= 0)
                        return n;
                if (errno == EINTR)
                        continue;
                if (errno != EAGAIN)
                        conn_close(c);
                return -1;
        }
}

/* Bytes that arrive while a request is served wait in pending for their turn. */
static void conn_read_ahead(struct http_conn *c) {
        char data[READ_CHUNK];

        while (!c->dead && !c->half_closed && buf_pending(&c->pending) < PENDING_MAX) {
                ssize_t n = conn_recv(c, data, sizeof data);

                if (n < 0)
                        return;
                if (n == 0) {
                        peer_stopped_sending(c);
                        return;
                }
                if (buf_append(&c->pending, data, (size_t) n) < 0) {
                        conn_close(c);
                        return;
                }
        }
        /* Full: stop watching input until this request is done. */
        conn_update_events(c);
}

static void conn_read(struct http_conn *c) {
        char data[READ_CHUNK];

        for (int rounds = 0; rounds < 16 && !c->dead && c->phase == PHASE_READING; rounds++) {
                ssize_t n = conn_recv(c, data, sizeof data);

                if (n < 0)
                        return;
                if (n == 0) {
                        /* EOF: a client that half-closes after a complete request is served;
                         * one that hangs up mid-request is simply gone. */
                        conn_close(c);
                        return;
                }
                arm_timer(c);
                conn_parse(c, data, (size_t) n);
                if (!c->dead && c->phase == PHASE_ACTIVE && c->error_status == 0 && !c->streaming) {
                        dispatch(c);
                        return;
                }
        }
}

static void on_io(struct ev_watch *w, uint32_t revents) {
        struct http_conn *c = (struct http_conn *) w;

        /* Closed earlier in this batch; the kick frees it. */
        if (c->dead)
                return;

        if (revents & EPOLLOUT) {
                if (conn_flush(c) < 0)
                        return;
        }
        if (c->phase == PHASE_READING && (revents & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                conn_read(c);
                return;
        }
        if (revents & (EPOLLHUP | EPOLLERR)) {
                /* The client hung up while its request was being served. */
                conn_close(c);
                return;
        }
        if (revents & EPOLLIN) {
                conn_read_ahead(c);
                return;
        }
        if ((revents & EPOLLRDHUP) && !c->half_closed)
                peer_stopped_sending(c);
}

int http_conn_new(struct http_poller *p, int fd, const struct http_limits *limits,
                  const struct http_handler *h, void *userdata, struct http_conn **ret) {
        struct http_conn *c;
        int r;

        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->watch.on_event = on_io;
        c->fd = -1;
        c->poller = p;
        c->limits = limits;
        c->handler = h;
        c->userdata = userdata;
        c->phase = PHASE_READING;
        http_parser_init(&c->parser, HTTP_REQUEST);
        c->parser.data = c;
        scan_reset(c);

        r = sd_event_add_time_relative(p->event, &c->timer, CLOCK_MONOTONIC, limits->timeout_usec,
                                       0, on_timeout, c);
        if (r < 0) {
                conn_free(c);           /* the caller still owns fd on failure */
                return r;
        }
        c->events = EPOLLIN | EPOLLRDHUP;
        r = evloop_add(p->loop, fd, c->events, &c->watch);
        if (r < 0) {
                conn_free(c);
                return r;
        }
        c->fd = fd;
        *ret = c;
        return 0;
}

/* --- the poller -------------------------------------------------------------------------- */

static void kick_soon(struct http_conn *c) {
        struct http_poller *p = c->poller;

        if (c->kick_due)
                return;
        c->kick_due = true;
        c->kick_next = NULL;
        *p->kicks_tail = c;
        p->kicks_tail = &c->kick_next;
        evloop_defer(p->loop, &p->kick);
}

/* Every connection kicked so far; those kicked meanwhile wait for the next round, so a
 * connection that keeps kicking itself cannot hold the loop. */
static void on_poller_kick(struct ev_defer *d) {
        struct http_poller *p = (struct http_poller *) ((char *) d - offsetof(struct http_poller, kick));
        struct http_conn *c = p->kicks;

        p->kicks = NULL;
        p->kicks_tail = &p->kicks;
        while (c) {
                struct http_conn *next = c->kick_next;

                c->kick_due = false;
                on_kick(c);             /* may free c */
                c = next;
        }
}

int http_poller_new(struct evloop *loop, struct http_poller **ret) {
        struct http_poller *p;

        p = calloc(1, sizeof *p);
        if (!p)
                return -ENOMEM;
        p->loop = loop;
        p->event = evloop_event(loop);
        p->kicks_tail = &p->kicks;
        p->kick.run = on_poller_kick;
        *ret = p;
        return 0;
}

void http_poller_free(struct http_poller *p) {
        if (!p)
                return;
        evloop_cancel(p->loop, &p->kick);
        free(p);
}
