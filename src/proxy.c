/* proxy.c — serving POST /v1/… through a pool's keys.
 *
 * One struct proxy_request lives from the client's complete request until the answer is
 * complete or the client is gone. It is always in exactly one of these steps:
 *
 *   WAITING   queued on its pool for a key (first come, first served), with a deadline
 *   RUNNING   an upstream attempt with a lease on one key
 *   BACKOFF   between a transient failure and the next attempt
 *
 * Each attempt's lease is returned with the attempt's outcome before anything else happens, so
 * the shared table always knows what is in flight.
 *
 * Answers are sorted as soon as their headers arrive: a success is relayed as it arrives (streams
 * chunk by chunk) — except that the first event of an SSE stream is held until it is complete,
 * because providers report errors as an event after "200 OK", and until the client has seen a
 * byte such an error can still be retried with another key. Anything else is buffered (error
 * bodies are small) so that policy can judge it.
 *
 * curl forbids removing a transfer from inside its own callbacks, and a client can vanish from
 * inside one (a failed write): such an abort is only marked there, the callback fails the
 * transfer, and the done callback cleans up.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <unistd.h>

#include "keypool/clock.h"
#include "keypool/jscan.h"
#include "keypool/log.h"
#include "keypool/proxy.h"

#define MAX_ATTEMPTS            32              /* rotations and retries together */
#define MAX_BUFFERED_ERROR      (1024 * 1024)   /* larger error bodies are relayed unjudged */
#define MAX_USAGE_COPY          (1024 * 1024)   /* success bodies kept this far to count tokens */
#define MAX_SSE_EVENT           (64 * 1024)     /* an SSE event longer than this is not inspected */
#define MAX_ANSWER_HEADERS      128
#define AUTH_LINE_MAX           4200            /* "Authorization: Bearer " and a secret */
#define SPARE_REQUESTS          64              /* finished request records kept for new ones */
#define SPARE_BUFFER_MAX        (64 * 1024)     /* … with answer buffers no larger than this */
#define MAX_WAIT_CAP_S          3600
#define PROBE_PERIOD_USEC       (2ULL * 1000000)
#define TRANSPORT_REPORT_MS     (60 * 1000)     /* a provider's TLS/DNS failure is logged this often */

enum step {
        STEP_NEW = 1,
        STEP_WAITING,
        STEP_RUNNING,
        STEP_BACKOFF,
        _STEP_MAX,
};

enum answer_mode {
        MODE_HEADERS = 1,       /* status and headers still arriving */
        MODE_STREAM,            /* a success: relay as it comes */
        MODE_BUFFER,            /* an error: keep it to judge it */
        _MODE_MAX,
};

struct proxy_queue {
        struct proxy_context *ctx;
        unsigned pool;
        struct proxy_request *head, *tail;
        sd_event_source *timer;         /* the earliest time a key of the pool may recover */
};

struct proxy_request {
        struct proxy_context *ctx;
        struct http_conn *conn;         /* NULL once the client is gone */
        enum step step;
        unsigned pool;
        const struct config_pool *cpool;
        const struct config_provider *provider;
        unsigned first_key;             /* the pool's first row in the table */
        char *url;                      /* upstream URL, in the headers block */
        char *body;                     /* forwarded body: the client's, or rewritten */
        size_t body_len;
        bool own_body;
        struct curl_slist *headers;     /* every request header, in one block built once: the
                                         * auth line's node first (its text is auth) */
        size_t headers_size;            /* bytes allocated for the block */
        char *auth;                     /* AUTH_LINE_MAX bytes, the current key's line; wiped
                                         * when an attempt ends */
        char request_id[24];
        int64_t deadline_ms;            /* waiting for a key ends here */

        struct proxy_request *queue_next, *queue_prev;
        sd_event_source *timer;         /* the waiting deadline, or the backoff */

        CURL *easy;
        struct keytable_lease lease;
        bool leased;
        unsigned attempts;
        unsigned transient_failures;
        unsigned last_key;              /* the key of the previous attempt, avoided next time */
        unsigned rotated_from;          /* the key a rotation left, until the next key is known */
        int rotated_status;
        int64_t attempt_started_ms;
        const char *transport_error;    /* curl's word for an attempt that got no answer */

        /* the current attempt's answer */
        enum answer_mode mode;
        int status;
        size_t answer_header_off[MAX_ANSWER_HEADERS]; /* each line's start in answer_text */
        size_t n_answer_headers;
        char *answer_text;              /* the answer's header lines, NUL-terminated, one buffer */
        size_t answer_text_len, answer_text_cap;
        char *answer_body;              /* MODE_BUFFER: the body; MODE_STREAM: a copy for usage */
        size_t answer_len, answer_cap;
        bool sse;                       /* text/event-stream */
        bool holding;                   /* the first SSE event is not yet complete */
        size_t held;                    /* bytes of answer_body not yet sent to the client */
        char *event;                    /* the SSE event being received */
        size_t event_len, event_cap;
        bool event_overflow;
        int stream_error_status;        /* an SSE error event seen inside the stream */
        char *stream_error;             /* … its payload */
        uint64_t tokens_in, tokens_out;
        bool in_curl;                   /* inside a curl callback */
        bool aborted;                   /* the client went away */
        bool retry_from_stream;         /* the held first event was an error: judge it in on_done */
        bool pressure;                  /* the client's output buffer is full */
        bool paused;                    /* the transfer is paused on pressure */
        struct proxy_request *next_spare;
};

static void attempt(struct proxy_request *pr);
static void serve_queue(struct proxy_context *p, unsigned pool);

/* --- small helpers ------------------------------------------------------------------------ */

static int buf_add(char **buf, size_t *len, size_t *cap, const void *data, size_t n) {
        if (*len + n + 1 > *cap) {
                size_t c = *cap ? *cap : 4096;
                char *p;

                while (c < *len + n + 1)
                        c *= 2;
                p = realloc(*buf, c);
                if (!p)
                        return -ENOMEM;
                *buf = p;
                *cap = c;
        }
        memcpy(*buf + *len, data, n);
        *len += n;
        (*buf)[*len] = 0;
        return 0;
}

static bool header_is(const char *line, const char *name) {
        size_t n = strlen(name);

        return strncasecmp(line, name, n) == 0 && line[n] == ':';
}

/* Headers that belong to one connection, that keypool sets itself, or that would carry the
 * client's own credentials upstream. */
static bool is_dropped_request_header(const char *name) {
        static const char *const dropped[] = {
                "Connection", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "TE",
                "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Expect",
                "Authorization", "Accept-Encoding", "x-api-key", "x-goog-api-key",
        };

        if (strncasecmp(name, "X-Keypool-", 10) == 0)
                return true;
        /* Every client header passes here twice per request: a first letter settles most. */
        for (size_t i = 0; i < sizeof dropped / sizeof dropped[0]; i++)
                if ((name[0] | 0x20) == (dropped[i][0] | 0x20) && strcasecmp(name, dropped[i]) == 0)
                        return true;
        return false;
}

static bool is_dropped_answer_header(const char *name, size_t len) {
        static const char *const dropped[] = {
                "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade",
                "Content-Length", "Trailer", "TE",
        };

        if (len >= 10 && strncasecmp(name, "X-Keypool-", 10) == 0)
                return true;
        for (size_t i = 0; i < sizeof dropped / sizeof dropped[0]; i++)
                if (strlen(dropped[i]) == len && strncasecmp(name, dropped[i], len) == 0)
                        return true;
        return false;
}

static const char *key_id(const struct proxy_request *pr, unsigned key) {
        if (key < pr->first_key || key - pr->first_key >= pr->cpool->n_keys)
                return "?";
        return pr->cpool->keys[key - pr->first_key].id;
}

static struct log_fields fields(const struct proxy_request *pr, unsigned key) {
        struct log_fields f = LOG_FIELDS_NONE;

        f.pool = pr->cpool->name;
        f.key = key == KEYTABLE_NO_KEY ? NULL : key_id(pr, key);
        f.request_id = pr->request_id;
        return f;
}

static void history(const struct proxy_request *pr, enum history_kind kind, unsigned from, unsigned to,
                    int status, enum key_reason reason, int64_t cooldown_ms) {
        struct keytable_event ev = {
                .wall_ms = clock_wall_ms(), .kind = kind, .status = status, .reason = reason,
                .cooldown_ms = cooldown_ms,
        };

        snprintf(ev.pool, sizeof ev.pool, "%s", pr->cpool->name);
        if (from != KEYTABLE_NO_KEY)
                snprintf(ev.key_from, sizeof ev.key_from, "%s", key_id(pr, from));
        if (to != KEYTABLE_NO_KEY)
                snprintf(ev.key_to, sizeof ev.key_to, "%s", key_id(pr, to));
        keytable_history_add(pr->ctx->table, &ev);
}

/* A rotation is one event once the key that takes over is known (KEYTABLE_NO_KEY: none could). */
static void note_rotation(struct proxy_request *pr, unsigned to) {
        if (pr->rotated_from == KEYTABLE_NO_KEY)
                return;
        history(pr, HISTORY_ROTATE, pr->rotated_from, to, pr->rotated_status, KEY_REASON_NONE, 0);
        keytable_count_rotation(pr->ctx->table, pr->ctx->slot, pr->pool);
        pr->rotated_from = KEYTABLE_NO_KEY;
}

/* curl keeps its own copy of every header line, the key's included: wipe before freeing. */
/* The key leaves the request's memory as soon as an attempt no longer needs it. */
static void wipe_auth(struct proxy_request *pr) {
        if (pr->auth && pr->auth[0])
                explicit_bzero(pr->auth, strnlen(pr->auth, AUTH_LINE_MAX - 1) + 1);
}

static void free_headers(struct curl_slist *l) {
        for (struct curl_slist *i = l; i; i = i->next)
                explicit_bzero(i->data, strlen(i->data));
        curl_slist_free_all(l);
}

/* The header that carries the key, in the provider's style. Keys never go in a URL. */
static void auth_line(const struct config_provider *prov, const char *secret, char *buf, size_t size) {
        switch (prov->auth) {
        case CONFIG_AUTH_X_API_KEY:
                snprintf(buf, size, "x-api-key: %s", secret);
                break;
        case CONFIG_AUTH_X_GOOG_API_KEY:
                snprintf(buf, size, "x-goog-api-key: %s", secret);
                break;
        default:
                snprintf(buf, size, "Authorization: Bearer %s", secret);
                break;
        }
}

/* Tells every worker with waiting requests (this one included) that a key may be free. */
static void wake_waiters(struct proxy_context *p) {
        unsigned slots[256], n;
        uint64_t one = 1;

        n = keytable_slots_with_waiters(p->table, slots, sizeof slots / sizeof slots[0]);
        for (unsigned i = 0; i < n; i++) {
                if (slots[i] == p->slot) {
                        sd_event_source_set_enabled(p->kick, SD_EVENT_ONESHOT);
                        continue;
                }
                if (slots[i] < p->n_wake_fds && p->wake_fds[slots[i]] >= 0)
                        (void) !write(p->wake_fds[slots[i]], &one, sizeof one);
        }
}

static void log_change(const struct proxy_request *pr, const struct keytable_change *c,
                       const struct verdict *v) {
        struct log_fields f = fields(pr, c->key);

        f.status = pr->status;
        if (c->account_limit_suspected)
                log_event(LOG_WARNING, "cooldown", &f,
                          "every key of pool %s was rate limited within a second: an account- or "
                          "IP-wide limit is suspected; keys keep cooling for their hints", pr->cpool->name);
        if (!c->changed)
                return;
        if (c->to == KEY_COOLING)
                history(pr, HISTORY_COOLDOWN, c->key, KEYTABLE_NO_KEY, pr->status, c->reason,
                        c->until_ms - clock_mono_ms());
        else if (c->to == KEY_DISABLED)
                history(pr, HISTORY_DISABLE, c->key, KEYTABLE_NO_KEY, pr->status, c->reason, 0);
        else if (c->to == KEY_READY && c->from == KEY_COOLING)
                history(pr, HISTORY_RECOVER, c->key, KEYTABLE_NO_KEY, 0, KEY_REASON_NONE, 0);
        if (c->to == KEY_COOLING) {
                f.retry_after_s = (c->until_ms - clock_mono_ms() + 999) / 1000;
                if (f.retry_after_s < 0)
                        f.retry_after_s = 0;
                log_event(LOG_WARNING, "cooldown", &f, "key %s: resting %llds%s%s",
                          keytable_reason_name(c->reason), (long long) f.retry_after_s,
                          c->reason == KEY_REASON_TRANSIENT ? " after transient failures in a row"
                          : v && v->hinted ? " as the provider asked" : " (no hint: recovery_time)",
                          c->twins_cooled ? " (also in the other pools holding it)" : "");
        } else if (c->to == KEY_DISABLED) {
                log_event(LOG_ERR, "disable", &f, "key disabled: %s (status %d)",
                          keytable_reason_name(c->reason), pr->status);
        } else if (c->to == KEY_READY && c->from == KEY_COOLING) {
                log_event(LOG_INFO, "recover", &f, "key is ready again");
        }
}

/* --- the request's life ------------------------------------------------------------------ */

/* One of the answer's header lines. */
static const char *answer_line(const struct proxy_request *pr, size_t i) {
        return pr->answer_text + pr->answer_header_off[i];
}

/* Empties a buffer, keeping its memory unless it grew large. */
static void buffer_clear(char **buf, size_t *len, size_t *cap) {
        if (*cap > SPARE_BUFFER_MAX) {
                free(*buf);
                *buf = NULL;
                *cap = 0;
        }
        *len = 0;
}

static void answer_reset(struct proxy_request *pr) {
        pr->n_answer_headers = 0;
        buffer_clear(&pr->answer_text, &pr->answer_text_len, &pr->answer_text_cap);
        buffer_clear(&pr->answer_body, &pr->answer_len, &pr->answer_cap);
        free(pr->event);
        pr->event = NULL;
        pr->event_len = pr->event_cap = 0;
        pr->event_overflow = false;
        free(pr->stream_error);
        pr->stream_error = NULL;
        pr->stream_error_status = 0;
        pr->status = 0;
        pr->mode = MODE_HEADERS;
        pr->sse = pr->holding = pr->retry_from_stream = false;
        pr->held = 0;
        pr->tokens_in = pr->tokens_out = 0;
}

static void queue_remove(struct proxy_request *pr) {
        struct proxy_context *p = pr->ctx;
        struct proxy_queue *q = &p->queues[pr->pool];

        if (pr->step != STEP_WAITING)
                return;
        if (pr->queue_prev)
                pr->queue_prev->queue_next = pr->queue_next;
        else
                q->head = pr->queue_next;
        if (pr->queue_next)
                pr->queue_next->queue_prev = pr->queue_prev;
        else
                q->tail = pr->queue_prev;
        pr->queue_next = pr->queue_prev = NULL;
        p->waiting--;
        keytable_slot_set_waiters(p->table, p->slot, p->waiting);
        pr->step = STEP_NEW;
}

/* A zeroed request record: a finished one with its answer buffers, or a new one. */
static struct proxy_request *request_get(struct proxy_context *p) {
        struct proxy_request *pr = p->spare_requests;
        struct curl_slist *headers;
        char *text, *body;
        size_t text_cap, body_cap, headers_size;

        if (!pr)
                return calloc(1, sizeof *pr);
        p->spare_requests = pr->next_spare;
        p->n_spare_requests--;
        text = pr->answer_text;
        text_cap = pr->answer_text_cap;
        body = pr->answer_body;
        body_cap = pr->answer_cap;
        headers = pr->headers;
        headers_size = pr->headers_size;
        *pr = (struct proxy_request) {
                .answer_text = text, .answer_text_cap = text_cap,
                .answer_body = body, .answer_cap = body_cap,
                .headers = headers, .headers_size = headers_size,
        };
        return pr;
}

static void request_put(struct proxy_request *pr) {
        struct proxy_context *p = pr->ctx;

        if (p->n_spare_requests < SPARE_REQUESTS) {
                pr->next_spare = p->spare_requests;
                p->spare_requests = pr;
                p->n_spare_requests++;
                return;
        }
        free(pr->headers);
        free(pr->answer_text);
        free(pr->answer_body);
        free(pr);
}

static void request_free(struct proxy_request *pr) {
        queue_remove(pr);
        sd_event_source_disable_unref(pr->timer);
        if (pr->easy)
                curl_easy_cleanup(pr->easy);
        wipe_auth(pr);
        answer_reset(pr);
        if (pr->own_body)
                free(pr->body);
        pr->ctx->active--;
        request_put(pr);
}

/* The current answer's status and headers as policy reads them (pointing into pr; no body). */
static void answer_view(const struct proxy_request *pr, struct answer_header *ah, struct upstream_answer *ret) {
        *ret = (struct upstream_answer) { .status = pr->status, .headers = ah };
        for (size_t i = 0; i < pr->n_answer_headers; i++) {
                const char *line = answer_line(pr, i), *colon = strchr(line, ':');
                const char *value;

                if (!colon)
                        continue;
                value = colon + 1 + strspn(colon + 1, " \t");
                ah[ret->n_headers++] = (struct answer_header) {
                        .name = line, .name_len = (size_t) (colon - line),
                        .value = value, .value_len = strlen(value),
                };
        }
}

static void release(struct proxy_request *pr, const struct verdict *v) {
        struct keytable_outcome o = { .cls = v ? v->cls : VERDICT_NONE, .status = pr->status,
                                      .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_change change = {};
        char error[KEYTABLE_ERROR_MAX + 1] = "";

        if (!pr->leased)
                return;
        if (v && (v->cls == VERDICT_RATE_LIMITED || v->cls == VERDICT_OK))
                o.rest_ms = v->rest_ms;
        /* What went wrong, in a few words and without any credential the provider echoed. */
        if (v && v->cls != VERDICT_OK && v->cls != VERDICT_NONE) {
                if (pr->transport_error)
                        snprintf(error, sizeof error, "%s", pr->transport_error);
                else if (pr->stream_error)
                        policy_error_summary(pr->stream_error, strlen(pr->stream_error), error, sizeof error);
                else
                        policy_error_summary(pr->answer_body, pr->answer_len, error, sizeof error);
                if (error[0])
                        o.error = error;
        }
        o.tokens_in = pr->tokens_in;
        o.tokens_out = pr->tokens_out;
        if (pr->n_answer_headers > 0) {
                struct answer_header ah[MAX_ANSWER_HEADERS];
                struct upstream_answer a;

                answer_view(pr, ah, &a);
                policy_read_figures(&a, clock_wall_ms(), &o.figures);
        }
        keytable_release(pr->ctx->table, &pr->lease, &o, clock_mono_ms(), &change);
        pr->leased = false;
        pr->last_key = pr->lease.key;
        log_change(pr, &change, v);
        if (change.freed_capacity)
                wake_waiters(pr->ctx);
}

/* Hands the client's connection back to http. */
static struct http_conn *detach(struct proxy_request *pr) {
        struct http_conn *c = pr->conn;

        if (c)
                http_conn_set_request_data(c, NULL);
        pr->conn = NULL;
        return c;
}

/* Answer headers keypool adds to every proxied answer. */
static size_t keypool_headers(struct proxy_request *pr, struct http_header *h, char *attempts, size_t size) {
        snprintf(attempts, size, "%u", pr->attempts);
        h[0] = (struct http_header) { "X-Keypool-Pool", pr->cpool->name };
        h[1] = (struct http_header) { "X-Keypool-Key", key_id(pr, pr->lease.key) };
        h[2] = (struct http_header) { "X-Keypool-Attempts", attempts };
        return 3;
}

/* The upstream's end-to-end headers plus keypool's; the strings point into pr and names. */
static size_t answer_headers(struct proxy_request *pr, struct http_header *h, size_t max,
                             char *names, size_t names_size, char *attempts, size_t attempts_size) {
        size_t n = 0, used = 0;

        for (size_t i = 0; i < pr->n_answer_headers && n + 3 < max; i++) {
                const char *line = answer_line(pr, i);
                const char *colon = strchr(line, ':');
                size_t len;

                if (!colon || colon == line)
                        continue;
                len = (size_t) (colon - line);
                if (is_dropped_answer_header(line, len) || used + len + 1 > names_size)
                        continue;
                memcpy(names + used, line, len);
                names[used + len] = 0;
                h[n].name = names + used;
                used += len + 1;
                h[n].value = colon + 1 + strspn(colon + 1, " \t");
                n++;
        }
        return n + keypool_headers(pr, h + n, attempts, attempts_size);
}

static void respond_buffered(struct proxy_request *pr) {
        struct http_header h[MAX_ANSWER_HEADERS + 3];
        char names[8192], attempts[16];
        struct http_conn *c;
        size_t n;

        n = answer_headers(pr, h, sizeof h / sizeof h[0], names, sizeof names, attempts, sizeof attempts);
        c = detach(pr);
        if (c)
                http_conn_respond(c, pr->status, h, n, pr->answer_body ? pr->answer_body : "", pr->answer_len);
}

static int begin_stream(struct proxy_request *pr) {
        struct http_header h[MAX_ANSWER_HEADERS + 3];
        char names[8192], attempts[16];
        size_t n;

        n = answer_headers(pr, h, sizeof h / sizeof h[0], names, sizeof names, attempts, sizeof attempts);
        return http_conn_stream_begin(pr->conn, pr->status, h, n);
}

/* keypool's own error for this request, then the request is done. */
static void fail(struct proxy_request *pr, int status, const char *code, int64_t retry_after_s,
                 const char *message) {
        struct http_header h[4];
        char retry[24], attempts[16];
        size_t n = 0;
        struct http_conn *c;

        note_rotation(pr, KEYTABLE_NO_KEY);
        /* Once an attempt was made the answer says with which key and how many, like any other
         * proxied answer. */
        if (pr->attempts > 0)
                n = keypool_headers(pr, h, attempts, sizeof attempts);
        else
                h[n++] = (struct http_header) { "X-Keypool-Pool", pr->cpool->name };
        if (retry_after_s > 0) {
                snprintf(retry, sizeof retry, "%lld", (long long) retry_after_s);
                h[n++] = (struct http_header) { "Retry-After", retry };
        }
        c = detach(pr);
        if (c)
                http_conn_respond_error(c, status, "keypool_error", code, h, n, "%s", message);
        request_free(pr);
}

/* --- streams ------------------------------------------------------------------------------ */

/* One complete SSE event of a relayed stream: count its usage, note an error in it. */
static void inspect_event(struct proxy_request *pr, const char *ev, size_t len) {
        const char *data;
        size_t data_len;
        uint64_t in, out;
        int status;

        if (policy_sse_error(ev, len, &status, &data, &data_len) == 1) {
                if (!pr->stream_error_status) {
                        pr->stream_error_status = status;
                        pr->stream_error = strndup(data, data_len);
                }
                return;
        }
        if (memmem(ev, len, "sage", 4)) {
                const char *d = memmem(ev, len, "data:", 5);

                if (d && policy_usage(d + 5, len - (size_t) (d + 5 - ev), &in, &out) == 0) {
                        /* Providers repeat running totals; the last figures are the request's. */
                        pr->tokens_in = in > pr->tokens_in ? in : pr->tokens_in;
                        pr->tokens_out = out > pr->tokens_out ? out : pr->tokens_out;
                }
        }
}

/* Splits streamed bytes into SSE events. Returns the number of bytes that end the first complete
 * event seen in this call (0 when none ended here). */
static size_t scan_events(struct proxy_request *pr, const char *data, size_t len) {
        size_t first_end = 0;

        for (size_t i = 0; i < len; i++) {
                char ch = data[i];

                if (!pr->event_overflow) {
                        if (pr->event_len + 1 >= MAX_SSE_EVENT)
                                pr->event_overflow = true;
                        else if (buf_add(&pr->event, &pr->event_len, &pr->event_cap, &ch, 1) < 0)
                                pr->event_overflow = true;
                }
                if (ch != '\n')
                        continue;
                /* A blank line ends the event: "\n\n" or "\n\r\n". */
                if (pr->event_len >= 2 && (pr->event[pr->event_len - 2] == '\n' ||
                    (pr->event_len >= 3 && pr->event[pr->event_len - 2] == '\r' && pr->event[pr->event_len - 3] == '\n'))) {
                        if (!pr->event_overflow)
                                inspect_event(pr, pr->event, pr->event_len);
                        pr->event_len = 0;
                        pr->event_overflow = false;
                        if (!first_end)
                                first_end = i + 1;
                }
        }
        return first_end;
}

/* --- curl callbacks ---------------------------------------------------------------------- */

static size_t on_answer_header(char *data, size_t size, size_t nmemb, void *userdata) {
        struct proxy_request *pr = userdata;
        size_t len = size * nmemb, trimmed = len;

        if (pr->aborted)
                return 0;
        while (trimmed > 0 && (data[trimmed - 1] == '\n' || data[trimmed - 1] == '\r'))
                trimmed--;

        if (trimmed >= 5 && strncmp(data, "HTTP/", 5) == 0) {
                /* A status line starts a new answer (after 100 Continue, say). */
                const char *sp = memchr(data, ' ', trimmed);

                answer_reset(pr);
                pr->status = sp ? atoi(sp + 1) : 0;
                return len;
        }
        if (trimmed == 0) {
                /* End of headers: decide how the body is handled. Informational answers are
                 * followed by the real one. */
                if (pr->status >= 100 && pr->status < 200)
                        return len;
                pr->mode = pr->status >= 200 && pr->status < 300 ? MODE_STREAM : MODE_BUFFER;
                for (size_t i = 0; i < pr->n_answer_headers; i++)
                        if (header_is(answer_line(pr, i), "Content-Type") &&
                            strcasestr(answer_line(pr, i), "text/event-stream"))
                                pr->sse = true;
                pr->holding = pr->mode == MODE_STREAM && pr->sse;
                return len;
        }
        if (pr->n_answer_headers < MAX_ANSWER_HEADERS) {
                size_t off = pr->answer_text_len;

                /* buf_add ends the text with a NUL, kept as the line's end. */
                if (buf_add(&pr->answer_text, &pr->answer_text_len, &pr->answer_text_cap, data, trimmed) < 0)
                        return 0;
                pr->answer_text_len++;
                pr->answer_header_off[pr->n_answer_headers++] = off;
        }
        return len;
}

/* Sends what is held and then data to the client. Returns 0, 1 on back-pressure, < 0 when the
 * client is gone. */
static int relay(struct proxy_request *pr, const char *data, size_t len) {
        int r = 0;

        pr->in_curl = true;
        if (!http_conn_stream_started(pr->conn))
                r = begin_stream(pr);
        if (r >= 0 && pr->held > 0 && !pr->aborted) {
                r = http_conn_stream_write(pr->conn, pr->answer_body + pr->answer_len - pr->held, pr->held);
                pr->held = 0;
        }
        if (r >= 0 && len > 0 && !pr->aborted)
                r = http_conn_stream_write(pr->conn, data, len);
        pr->in_curl = false;
        if (pr->aborted)
                return -EPIPE;
        return r;
}

static size_t on_answer_body(char *data, size_t size, size_t nmemb, void *userdata) {
        struct proxy_request *pr = userdata;
        size_t len = size * nmemb;
        int r;

        if (pr->aborted)
                return 0;

        if (pr->mode == MODE_BUFFER) {
                if (pr->answer_len + len <= MAX_BUFFERED_ERROR)
                        return buf_add(&pr->answer_body, &pr->answer_len, &pr->answer_cap, data, len) < 0 ? 0 : len;
                /* Too large to be an error worth judging: relay what we have and the rest. */
                pr->mode = MODE_STREAM;
                pr->held = pr->answer_len;
        }

        if (pr->pressure) {
                pr->paused = true;
                return CURL_WRITEFUNC_PAUSE;
        }

        if (pr->holding) {
                size_t end;

                if (buf_add(&pr->answer_body, &pr->answer_len, &pr->answer_cap, data, len) < 0)
                        return 0;
                pr->held += len;
                end = scan_events(pr, data, len);
                if (!end && pr->held < MAX_SSE_EVENT)
                        return len;             /* the first event is not complete yet */
                pr->holding = false;
                if (pr->stream_error_status) {
                        /* The stream opened with an error: nothing reached the client, so it
                         * is judged and retried like any error answer. */
                        pr->retry_from_stream = true;
                        return 0;
                }
                r = relay(pr, NULL, 0);
        } else {
                if (pr->sse)
                        scan_events(pr, data, len);
                else if (pr->answer_len + len <= MAX_USAGE_COPY)
                        buf_add(&pr->answer_body, &pr->answer_len, &pr->answer_cap, data, len);
                r = relay(pr, data, len);
        }
        if (r < 0)
                return 0;
        if (r == 1)
                pr->pressure = true;
        return len;
}

/* --- attempts ---------------------------------------------------------------------------- */

/* A handle for a proxied transfer with everything that does not change between requests already
 * set: a finished transfer's handle is kept (up to PROXY_SPARE_HANDLES) rather than rebuilt.
 * Handles come back from on_done, whatever the transfer's result (curl resets a handle's
 * transfer state when the next one starts); a cancelled one (client gone) is freed instead. */
static CURL *easy_get(struct proxy_context *p) {
        const struct config *cfg = p->config;
        CURL *easy;

        if (p->n_spare > 0)
                return p->spare[--p->n_spare];
        easy = curl_easy_init();
        if (!easy)
                return NULL;
        curl_easy_setopt(easy, CURLOPT_POST, 1L);
        curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, on_answer_header);
        curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, on_answer_body);
        curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT, (long) cfg->connect_timeout);
        curl_easy_setopt(easy, CURLOPT_TIMEOUT, (long) cfg->upstream_timeout);
        curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
        curl_easy_setopt(easy, CURLOPT_TCP_NODELAY, 1L);
        /* Keys travel in headers only; a redirect could carry them to another host. */
        curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
        return easy;
}

static void easy_put(struct proxy_context *p, CURL *easy) {
        if (p->n_spare < PROXY_SPARE_HANDLES) {
                /* Nothing of the request stays reachable from it: the header list (with the
                 * key) is freed next, and the body may be. */
                curl_easy_setopt(easy, CURLOPT_HTTPHEADER, NULL);
                curl_easy_setopt(easy, CURLOPT_POSTFIELDS, NULL);
                curl_easy_setopt(easy, CURLOPT_HEADERDATA, NULL);
                curl_easy_setopt(easy, CURLOPT_WRITEDATA, NULL);
                p->spare[p->n_spare++] = easy;
                return;
        }
        curl_easy_cleanup(easy);
}

static void judge(struct proxy_request *pr, struct verdict *ret) {
        struct answer_header ah[MAX_ANSWER_HEADERS];
        struct upstream_answer a;

        answer_view(pr, ah, &a);
        if (pr->stream_error_status) {
                a.status = pr->stream_error_status;
                a.body = pr->stream_error;
                a.body_len = pr->stream_error ? strlen(pr->stream_error) : 0;
        } else {
                a.body = pr->answer_body;
                a.body_len = pr->answer_len;
        }
        policy_classify(&a, &pr->ctx->policy, clock_wall_ms(), ret);
}

static int on_backoff_done(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_request *pr = userdata;

        pr->timer = sd_event_source_disable_unref(pr->timer);
        pr->step = STEP_NEW;
        attempt(pr);
        return 0;
}

/* A transient failure before the client saw a byte: retry after a backoff, on another key
 * when one is ready, while attempts remain. Returns false when no retry is left. */
static bool schedule_retry(struct proxy_request *pr, const struct verdict *v) {
        const struct config_retry *rc = &pr->ctx->config->retry;
        uint32_t random = 0;
        int64_t delay;

        if (pr->transient_failures >= rc->max_attempts || pr->attempts >= MAX_ATTEMPTS)
                return false;
        (void) !getrandom(&random, sizeof random, GRND_NONBLOCK);
        delay = policy_backoff_ms(pr->transient_failures - 1, rc->backoff_initial_ms, rc->backoff_max_ms, random);
        if (v && v->retry_after_ms > delay)
                delay = v->retry_after_ms < (int64_t) rc->backoff_max_ms ? v->retry_after_ms : rc->backoff_max_ms;
        if (sd_event_add_time_relative(pr->ctx->event, &pr->timer, CLOCK_MONOTONIC, (uint64_t) delay * 1000, 1000,
                                       on_backoff_done, pr) < 0)
                return false;
        pr->step = STEP_BACKOFF;
        {
                struct log_fields f = fields(pr, pr->last_key);

                f.status = pr->status;
                log_event(LOG_INFO, "retry", &f, "transient failure (%s): retry %u in %lld ms",
                          pr->status ? "upstream error status" : "no answer", pr->transient_failures,
                          (long long) delay);
        }
        return true;
}

/* A TLS or DNS failure is the upstream's configuration (or the network's), never a key's: the
 * lease goes back unjudged. A certificate problem does not mend by retrying, so the caller gets
 * 502 naming it at once; other TLS and DNS failures are retried like any transient failure.
 * curl's full text goes to the log at most once per interval and provider, however many
 * requests meet it. Returns false when res is some other failure. */
static bool end_unblamed(struct proxy_request *pr, CURLcode res, bool started) {
        enum upstream_failure kind = upstream_failure_class(res);
        const char *text = upstream_error_text(pr->ctx->upstream);
        struct log_fields f = fields(pr, KEYTABLE_NO_KEY);
        char msg[320];

        if (kind != UPSTREAM_FAILURE_CERTIFICATE && kind != UPSTREAM_FAILURE_TLS && kind != UPSTREAM_FAILURE_DNS)
                return false;
        if (!text[0])
                text = curl_easy_strerror(res);
        snprintf(msg, sizeof msg, "%s failure reaching upstream %s: %s",
                 kind == UPSTREAM_FAILURE_DNS ? "DNS" : "TLS", pr->provider->name, text);
        release(pr, NULL);
        if (upstream_report_due(pr->ctx->upstream, pr->provider, clock_mono_ms(), TRANSPORT_REPORT_MS))
                log_event(LOG_ERR, "upstream_error", &f, "%s (no key is blamed; reported once a minute)", msg);
        if (started) {
                http_conn_abort(detach(pr));
                request_free(pr);
                return true;
        }
        answer_reset(pr);
        if (kind != UPSTREAM_FAILURE_CERTIFICATE) {
                pr->transient_failures++;
                if (schedule_retry(pr, NULL))
                        return true;
        }
        fail(pr, 502, kind == UPSTREAM_FAILURE_DNS ? "upstream_dns_failure" : "upstream_tls_failure", 0, msg);
        return true;
}

static void on_done(CURL *easy, CURLcode res, void *userdata) {
        struct proxy_request *pr = userdata;
        struct verdict v = {};
        bool started;

        if (pr->aborted) {
                release(pr, NULL);
                request_free(pr);
                return;
        }
        keytable_observe_latency(pr->ctx->table, pr->ctx->slot, pr->pool, clock_mono_ms() - pr->attempt_started_ms);
        started = pr->conn && http_conn_stream_started(pr->conn);
        easy_put(pr->ctx, pr->easy);
        pr->easy = NULL;
        wipe_auth(pr);
        pr->paused = pr->pressure = false;

        if (res != CURLE_OK && !pr->retry_from_stream && end_unblamed(pr, res, started))
                return;
        if (res != CURLE_OK && !pr->retry_from_stream) {
                bool timeout = res == CURLE_OPERATION_TIMEDOUT;
                struct log_fields f = fields(pr, pr->lease.key);

                v.cls = VERDICT_TRANSIENT;
                pr->transport_error = curl_easy_strerror(res);
                release(pr, &v);
                pr->transport_error = NULL;
                log_event(LOG_WARNING, "upstream_error", &f, "upstream %s: %s", pr->provider->name,
                          curl_easy_strerror(res));
                if (started) {
                        /* Bytes have reached the client: the only honest end is a cut. */
                        http_conn_abort(detach(pr));
                        request_free(pr);
                        return;
                }
                pr->transient_failures++;
                answer_reset(pr);
                if (schedule_retry(pr, &v))
                        return;
                fail(pr, timeout ? 504 : 502, timeout ? "upstream_timeout" : "upstream_unreachable", 0,
                     timeout ? "the upstream did not answer in time"
                             : "the upstream could not be reached or closed the connection");
                return;
        }

        if (pr->mode == MODE_STREAM && !pr->retry_from_stream) {
                /* A success: judge the key by any error event the stream carried, and count
                 * the tokens the answer reported. */
                if (pr->stream_error_status)
                        judge(pr, &v);
                else {
                        uint64_t in, out;

                        judge(pr, &v);
                        if (!pr->sse && pr->answer_len > 0 &&
                            policy_usage(pr->answer_body, pr->answer_len, &in, &out) == 0) {
                                pr->tokens_in = in;
                                pr->tokens_out = out;
                        }
                }
                if (!pr->conn) {
                        release(pr, &v);
                        request_free(pr);
                        return;
                }
                if (!started && pr->held > 0)
                        relay(pr, NULL, 0);
                if (pr->conn && http_conn_stream_started(pr->conn)) {
                        release(pr, &v);
                        http_conn_stream_end(detach(pr));
                } else {
                        release(pr, &v);
                        respond_buffered(pr);   /* a success with an empty body */
                }
                request_free(pr);
                return;
        }

        judge(pr, &v);
        switch (v.cls) {
        case VERDICT_RATE_LIMITED:
        case VERDICT_AUTH:
        case VERDICT_QUOTA: {
                struct log_fields f = fields(pr, pr->lease.key);

                f.status = pr->stream_error_status ? pr->stream_error_status : pr->status;
                release(pr, &v);
                if (pr->attempts < MAX_ATTEMPTS) {
                        pr->rotated_from = pr->lease.key;
                        pr->rotated_status = f.status;
                        log_event(LOG_NOTICE, "rotate", &f, "answer %d (%s): moving the request to the next key",
                                  f.status, verdict_class_name(v.cls));
                        answer_reset(pr);
                        attempt(pr);
                        return;
                }
                break;
        }
        case VERDICT_TRANSIENT:
                release(pr, &v);
                pr->transient_failures++;
                if (schedule_retry(pr, &v)) {
                        answer_reset(pr);
                        return;
                }
                break;
        default:
                release(pr, &v);
                break;
        }
        if (pr->retry_from_stream) {
                /* The held stream goes to the client as the upstream sent it. */
                pr->mode = MODE_STREAM;
                relay(pr, NULL, 0);
                if (pr->conn)
                        http_conn_stream_end(detach(pr));
                request_free(pr);
                return;
        }
        respond_buffered(pr);
        request_free(pr);
}

static void enqueue(struct proxy_request *pr) {
        struct proxy_context *p = pr->ctx;
        struct proxy_queue *q = &p->queues[pr->pool];

        pr->step = STEP_WAITING;
        pr->queue_next = NULL;
        pr->queue_prev = q->tail;
        if (q->tail)
                q->tail->queue_next = pr;
        else
                q->head = pr;
        q->tail = pr;
        p->waiting++;
        keytable_slot_set_waiters(p->table, p->slot, p->waiting);
}

static int on_wait_deadline(sd_event_source *s, uint64_t usec, void *userdata);

static void arm_queue_timer(struct proxy_context *p, unsigned pool, int64_t at_ms) {
        struct proxy_queue *q = &p->queues[pool];
        uint64_t usec = (uint64_t) at_ms * 1000;

        if (sd_event_source_set_time(q->timer, usec) >= 0)
                sd_event_source_set_enabled(q->timer, SD_EVENT_ONESHOT);
}

/* No key can serve now. Wait for one if it may come before the deadline, else answer 503. */
static void wait_or_fail(struct proxy_request *pr, const struct keytable_wait *w, int64_t now) {
        int64_t retry_s = w->retry_at_ms > 0 ? (w->retry_at_ms - now + 999) / 1000 : 0;
        char msg[256];

        if ((w->retry_at_ms > 0 && w->retry_at_ms <= pr->deadline_ms) || (w->busy && now < pr->deadline_ms)) {
                enqueue(pr);
                if (sd_event_add_time(pr->ctx->event, &pr->timer, CLOCK_MONOTONIC,
                                      (uint64_t) pr->deadline_ms * 1000, 1000, on_wait_deadline, pr) < 0) {
                        fail(pr, 500, "internal_error", 0, "cannot wait for a key");
                        return;
                }
                if (w->retry_at_ms > 0)
                        arm_queue_timer(pr->ctx, pr->pool, w->retry_at_ms);
                /* A key freed by another worker between our failed acquire and the waiter count
                 * becoming visible woke nobody: look once more. */
                sd_event_source_set_enabled(pr->ctx->kick, SD_EVENT_ONESHOT);
                return;
        }
        if (w->retry_at_ms > 0)
                snprintf(msg, sizeof msg, "no key of pool '%s' is ready: the next one recovers in %llds",
                         pr->cpool->name, (long long) retry_s);
        else if (w->busy)
                snprintf(msg, sizeof msg, "every key of pool '%s' is at its concurrency limit", pr->cpool->name);
        else
                snprintf(msg, sizeof msg, "no key of pool '%s' is ready: every key is disabled", pr->cpool->name);
        fail(pr, 503, "no_key_available", w->retry_at_ms > 0 ? retry_s : w->busy ? 1 : 0, msg);
}

/* Takes a key and starts the transfer. Returns 1 when started (or answered), 0 when the request
 * must wait (wait filled in). */
static int try_start(struct proxy_request *pr, struct keytable_wait *ret_wait) {
        struct proxy_context *p = pr->ctx;
        const struct config_provider *prov = pr->provider;
        struct keytable_change change = {};
        const char *secret;
        int r;

        *ret_wait = (struct keytable_wait) {};
        r = keytable_acquire(p->table, p->slot, pr->pool, clock_mono_ms(), pr->last_key,
                             &pr->lease, ret_wait, &change);
        if (change.changed)
                log_change(pr, &change, NULL);
        if (r == -EAGAIN)
                return 0;
        if (r < 0) {
                fail(pr, 503, "worker_busy", 1, "this worker has too many requests in flight");
                return 1;
        }

        /* It has a key: out of the queue, and its waiting deadline no longer applies. */
        queue_remove(pr);
        pr->timer = sd_event_source_disable_unref(pr->timer);
        pr->leased = true;
        pr->attempts++;
        pr->step = STEP_RUNNING;
        pr->attempt_started_ms = clock_mono_ms();
        note_rotation(pr, pr->lease.key);
        secret = pr->cpool->keys[pr->lease.key - pr->first_key].secret;

        auth_line(prov, secret, pr->auth, AUTH_LINE_MAX);

        pr->easy = easy_get(p);
        if (!pr->easy) {
                release(pr, NULL);
                fail(pr, 500, "internal_error", 0, "out of memory");
                return 1;
        }
        curl_easy_setopt(pr->easy, CURLOPT_URL, pr->url);
        curl_easy_setopt(pr->easy, CURLOPT_POSTFIELDS, pr->body);
        curl_easy_setopt(pr->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) pr->body_len);
        curl_easy_setopt(pr->easy, CURLOPT_HTTPHEADER, pr->headers);
        curl_easy_setopt(pr->easy, CURLOPT_HEADERDATA, pr);
        curl_easy_setopt(pr->easy, CURLOPT_WRITEDATA, pr);
        upstream_configure(p->upstream, pr->easy, prov);

        r = upstream_start(p->upstream, pr->easy, on_done, pr);
        if (r < 0) {
                release(pr, NULL);
                fail(pr, 500, "internal_error", 0, "could not start the upstream transfer");
        }
        return 1;
}

static void attempt(struct proxy_request *pr) {
        struct keytable_wait w;

        if (pr->attempts >= MAX_ATTEMPTS) {
                fail(pr, 503, "no_key_available", 0, "too many attempts for one request");
                return;
        }
        /* Requests already waiting for this pool come first. (wait_or_fail may free pr.) */
        if (pr->ctx->queues[pr->pool].head && pr->step != STEP_WAITING) {
                struct proxy_context *p = pr->ctx;

                w = (struct keytable_wait) { .busy = true };
                sd_event_source_set_enabled(p->kick, SD_EVENT_ONESHOT);
                wait_or_fail(pr, &w, clock_mono_ms());
                return;
        }
        if (try_start(pr, &w) == 0)
                wait_or_fail(pr, &w, clock_mono_ms());
}

/* --- waiting ------------------------------------------------------------------------------ */

static int on_wait_deadline(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_request *pr = userdata;
        struct keytable_wait w = {};
        int64_t now = clock_mono_ms();

        pr->timer = sd_event_source_disable_unref(pr->timer);
        queue_remove(pr);
        /* One last look, then the honest answer. */
        if (try_start(pr, &w) == 1)
                return 0;
        pr->deadline_ms = now;
        wait_or_fail(pr, &w, now);
        return 0;
}

/* Serves the pool's waiting requests in arrival order while keys can be had. */
static void serve_queue(struct proxy_context *p, unsigned pool) {
        struct proxy_queue *q = &p->queues[pool];

        while (q->head) {
                struct keytable_wait w = {};

                /* try_start takes the head out of the queue when it gets a key (or fails it). */
                if (try_start(q->head, &w) == 0) {
                        if (w.retry_at_ms > 0)
                                arm_queue_timer(p, pool, w.retry_at_ms);
                        return;
                }
        }
}

static int on_queue_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_queue *q = userdata;

        serve_queue(q->ctx, q->pool);
        return 0;
}

static int on_kick(sd_event_source *s, void *userdata) {
        proxy_wake(userdata);
        return 0;
}

void proxy_wake(struct proxy_context *p) {
        for (unsigned i = 0; i < p->config->n_pools; i++)
                if (p->queues[i].head)
                        serve_queue(p, i);
}

/* --- probes -------------------------------------------------------------------------------- */

struct probe {
        struct proxy_context *ctx;
        unsigned key, pool;
        CURL *easy;
        struct curl_slist *headers;
        char *url;
};

static size_t discard(char *data, size_t size, size_t nmemb, void *userdata) {
        return size * nmemb;
}

static void on_probe_done(CURL *easy, CURLcode res, void *userdata) {
        struct probe *pb = userdata;
        struct proxy_context *p = pb->ctx;
        const struct config_pool *cp = &p->config->pools[pb->pool];
        struct keytable_pool_view info;
        struct log_fields f = LOG_FIELDS_NONE;
        long status = 0;

        curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
        f.pool = cp->name;
        /* The probe was started on this worker's own bank (start_probe checks): a reload since
         * then does not move the key's row. */
        if (keytable_slot_pool_info(p->table, p->slot, pb->pool, &info) >= 0 && pb->key >= info.first_key &&
            pb->key - info.first_key < cp->n_keys)
                f.key = cp->keys[pb->key - info.first_key].id;
        f.status = (int) status;
        if (res == CURLE_OK && status >= 200 && status < 300) {
                struct keytable_change change = {};

                keytable_enable(p->table, pb->key, clock_mono_ms(), &change);
                log_event(LOG_NOTICE, "probe", &f, "probe succeeded");
                if (change.changed) {
                        log_event(LOG_NOTICE, "enable", &f, "key enabled again after a successful probe");
                        wake_waiters(p);
                }
        } else {
                log_event(LOG_INFO, "probe", &f, "probe failed (%s): the key stays disabled",
                          res == CURLE_OK ? "error status" : curl_easy_strerror(res));
        }
        curl_easy_cleanup(easy);
        free_headers(pb->headers);
        free(pb->url);
        free(pb);
        p->probes--;
}

/* Probes key (table-wide) of pool (relative to this worker's bank). -EAGAIN when this worker's
 * configuration is not the current one (a reload is under way): the new generation probes. */
static int start_probe(struct proxy_context *p, unsigned key, unsigned pool) {
        const struct config_pool *cp;
        const struct config_provider *prov;
        struct keytable_pool_view info;
        struct probe *pb;
        char auth[AUTH_LINE_MAX];
        const char *secret;

        if (keytable_slot_bank(p->table, p->slot) != keytable_bank_current(p->table))
                return -EAGAIN;
        if (pool >= p->config->n_pools)
                return -EINVAL;
        cp = &p->config->pools[pool];
        prov = &p->config->providers[cp->provider];
        if (keytable_slot_pool_info(p->table, p->slot, pool, &info) < 0 || key < info.first_key ||
            key - info.first_key >= cp->n_keys)
                return -EINVAL;
        secret = cp->keys[key - info.first_key].secret;
        pb = calloc(1, sizeof *pb);
        if (!pb)
                return -ENOMEM;
        pb->ctx = p;
        pb->key = key;
        pb->pool = pool;
        auth_line(prov, secret, auth, sizeof auth);
        pb->headers = curl_slist_append(NULL, auth);
        explicit_bzero(auth, strlen(auth) + 1);         /* what snprintf wrote */
        for (unsigned i = 0; pb->headers && i < prov->n_headers; i++)
                pb->headers = curl_slist_append(pb->headers, prov->headers[i]);
        pb->easy = curl_easy_init();
        if (!pb->headers || !pb->easy ||
            asprintf(&pb->url, "%s%s", prov->base_url, prov->probe_path ? prov->probe_path : "/models") < 0) {
                pb->url = NULL;
                goto fail;
        }
        curl_easy_setopt(pb->easy, CURLOPT_URL, pb->url);
        curl_easy_setopt(pb->easy, CURLOPT_HTTPHEADER, pb->headers);
        curl_easy_setopt(pb->easy, CURLOPT_WRITEFUNCTION, discard);
        curl_easy_setopt(pb->easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(pb->easy, CURLOPT_CONNECTTIMEOUT, (long) p->config->connect_timeout);
        curl_easy_setopt(pb->easy, CURLOPT_TIMEOUT, 30L);
        curl_easy_setopt(pb->easy, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(pb->easy, CURLOPT_PROTOCOLS_STR, "http,https");
        upstream_configure(p->upstream, pb->easy, prov);
        if (upstream_start(p->upstream, pb->easy, on_probe_done, pb) < 0)
                goto fail;
        p->probes++;
        return 0;
fail:
        if (pb->easy)
                curl_easy_cleanup(pb->easy);
        free_headers(pb->headers);
        free(pb->url);
        free(pb);
        return -ENOMEM;
}

int proxy_probe(struct proxy_context *p, unsigned key, unsigned pool) {
        return start_probe(p, key, pool);
}

static int on_probe_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_context *p = userdata;
        unsigned key, pool;

        /* Probes concern the current configuration: a draining generation leaves them to the new
         * one. A handful per tick: probes are rare by design. */
        for (int i = 0; i < 8 && keytable_slot_bank(p->table, p->slot) == keytable_bank_current(p->table) &&
                        keytable_probe_claim(p->table, clock_mono_ms(), &key, &pool) == 0; i++)
                start_probe(p, key, pool);
        sd_event_source_set_time_relative(s, PROBE_PERIOD_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

/* --- entry points ------------------------------------------------------------------------ */

void proxy_on_abort(struct http_conn *c, void *request_data) {
        struct proxy_request *pr = request_data;

        pr->aborted = true;
        pr->conn = NULL;
        /* Inside a curl callback or on_done's own relay: whoever is on the stack frees. */
        if (pr->in_curl)
                return;
        if (pr->step == STEP_RUNNING && pr->easy)
                upstream_cancel(pr->ctx->upstream, pr->easy);
        /* Waiting, backing off, or a cancelled transfer: nothing more will happen for it. */
        release(pr, NULL);
        request_free(pr);
}

void proxy_on_drain(struct http_conn *c, void *request_data) {
        struct proxy_request *pr = request_data;

        pr->pressure = false;
        if (pr->paused && !pr->in_curl && pr->easy) {
                pr->paused = false;
                upstream_resume(pr->ctx->upstream, pr->easy);
                /* Resuming delivers buffered data at once; if the client vanished meanwhile, curl
                 * stops watching the transfer's socket: end it here. */
                if (pr->aborted) {
                        upstream_cancel(pr->ctx->upstream, pr->easy);
                        release(pr, NULL);
                        request_free(pr);
                }
        }
}

/* The length of s as a JSON string, quotes included, and the text itself when buf is given. */
static size_t json_quote(const char *s, char *buf) {
        size_t n = 0;

        for (const unsigned char *p = (const unsigned char *) s; ; p++) {
                char esc[8];
                size_t k;

                if (p == (const unsigned char *) s) {
                        if (buf)
                                buf[n] = '"';
                        n++;
                }
                if (*p == 0)
                        break;
                if (*p == '"' || *p == '\\') {
                        esc[0] = '\\';
                        esc[1] = (char) *p;
                        k = 2;
                } else if (*p < 0x20) {
                        snprintf(esc, sizeof esc, "\\u%04x", *p);
                        k = 6;
                } else {
                        esc[0] = (char) *p;
                        k = 1;
                }
                if (buf)
                        memcpy(buf + n, esc, k);
                n += k;
        }
        if (buf)
                buf[n] = '"';
        return n + 1;
}

/* The body with its top-level "model" set to the pool's model id: the value replaced where
 * it stands (model, the member jansson would keep), or a member added first. Nothing else
 * changes, not even spacing. 0, or -ENOMEM. */
static int rewrite_model(struct proxy_request *pr, const struct http_request *req,
                         const struct jscan_value *model) {
        size_t qlen = json_quote(pr->cpool->model, NULL), start, end, ins, extra = 0;
        bool comma = false;
        char *text;

        if (model->type != JSCAN_NONE) {
                start = (size_t) (model->text - req->body);
                end = start + model->len;
                ins = 0;
        } else {
                /* Validated as an object: the first non-blank byte is its brace. */
                start = end = strspn(req->body, " \t\r\n") + 1;
                comma = req->body[start + strspn(req->body + start, " \t\r\n")] != '}';
                ins = strlen("\"model\":");
                extra = comma;
        }
        text = malloc(req->body_len - (end - start) + ins + qlen + extra + 1);
        if (!text)
                return -ENOMEM;
        memcpy(text, req->body, start);
        memcpy(text + start, "\"model\":", ins);
        json_quote(pr->cpool->model, text + start + ins);
        if (comma)
                text[start + ins + qlen] = ',';
        memcpy(text + start + ins + qlen + extra, req->body + end, req->body_len - end);
        pr->body_len = req->body_len - (end - start) + ins + qlen + extra;
        text[pr->body_len] = 0;
        pr->body = text;
        pr->own_body = true;
        return 0;
}

/* The pool the request names: X-Keypool-Pool wins over the body's model. On success the body
 * may have been rewritten (a pool name given as model becomes the pool's model id). Returns 0,
 * or answers the client and returns -1.
 *
 * The body is read once, by jscan: validated as a JSON object and its "model" found, with no
 * tree built and nothing allocated unless the model must be rewritten. */
static int route(struct proxy_request *pr, struct http_conn *c, const struct http_request *req) {
        const struct config *cfg = pr->ctx->config;
        const char *header = http_request_header(req, "X-Keypool-Pool");
        struct keytable_pool_view info;
        struct jscan_value model;
        char model_buf[1024];
        const char *model_name = NULL;
        size_t model_len = 0;
        int pool = -1, r;

        if (jscan_object_member(req->body, req->body_len, "model", &model) < 0) {
                http_conn_respond_error(c, 400, "invalid_request_error", "invalid_json", NULL, 0,
                                        "the request body must be a JSON object");
                return -1;
        }
        if (model.type == JSCAN_STRING) {
                r = jscan_string(&model, model_buf, sizeof model_buf, &model_len);
                if (r == -ENOBUFS) {
                        /* Longer than any pool name or model id can be: quoted as written. */
                        model_len = model.len - 2 < sizeof model_buf - 1 ? model.len - 2 : sizeof model_buf - 1;
                        memcpy(model_buf, model.text + 1, model_len);
                        model_buf[model_len] = 0;
                        model_len = SIZE_MAX;
                }
                model_name = model_buf;
        }

        if (header) {
                pool = config_find_pool(cfg, header, strlen(header));
                if (pool < 0) {
                        http_conn_respond_error(c, 404, "invalid_request_error", "unknown_pool", NULL, 0,
                                                "no pool is named '%.100s'", header);
                        return -1;
                }
        } else if (model_name) {
                if (model_len != SIZE_MAX)
                        pool = config_find_pool(cfg, model_name, model_len);
                if (pool < 0) {
                        http_conn_respond_error(c, 404, "invalid_request_error", "model_not_found", NULL, 0,
                                                "no pool serves the model '%.100s'", model_name);
                        return -1;
                }
        } else {
                http_conn_respond_error(c, 400, "invalid_request_error", "missing_model", NULL, 0,
                                        "the request names no model (set \"model\" or X-Keypool-Pool)");
                return -1;
        }

        pr->pool = (unsigned) pool;
        pr->cpool = &cfg->pools[pool];
        pr->provider = &cfg->providers[pr->cpool->provider];
        /* This worker's generation may be draining on the previous bank after a reload. */
        if (keytable_slot_pool_info(pr->ctx->table, pr->ctx->slot, pr->pool, &info) < 0) {
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0,
                                        "the key table does not know pool %s", pr->cpool->name);
                return -1;
        }
        pr->first_key = info.first_key;

        /* The upstream knows models, not pool names: rewrite only when the client used a name
         * (or named no model at all). */
        if (!model_name || (strcmp(model_name, pr->cpool->model) != 0 && !header &&
                            strcmp(model_name, pr->cpool->name) == 0)) {
                if (rewrite_model(pr, req, &model) < 0) {
                        http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0,
                                                "out of memory");
                        return -1;
                }
        } else {
                pr->body = req->body;
                pr->body_len = req->body_len;
        }
        return 0;
}

/* A client header that goes upstream as it is. */
static bool forwarded(const struct config_provider *prov, const struct http_field *f) {
        if (is_dropped_request_header(f->name))
                return false;
        /* The provider's configured headers win over the client's. */
        for (unsigned k = 0; k < prov->n_headers; k++)
                if (header_is(prov->headers[k], f->name))
                        return false;
        return true;
}

/* Every request header an attempt sends, built once per request as one block that curl reads
 * as its list (CURLOPT_HTTPHEADER only reads it): the auth line's node (its text filled in per
 * attempt), the provider's headers, the client's, a Content-Type when the client gave none, and
 * "Expect:" (curl would add "Expect: 100-continue" to large bodies on its own: a round trip the
 * client never asked for). */
static int build_request_headers(struct proxy_request *pr, const struct http_request *req) {
        static const char content_type[] = "Content-Type: application/json", expect[] = "Expect:";
        const struct config_provider *prov = pr->provider;
        const char *rest = req->url + strlen("/v1/");
        size_t n = 1 + prov->n_headers + 2, text = AUTH_LINE_MAX + sizeof content_type + sizeof expect;
        bool has_content_type = false;
        struct curl_slist *nodes;
        char *t;
        size_t k = 0;

        for (unsigned i = 0; i < prov->n_headers; i++)
                text += strlen(prov->headers[i]) + 1;
        text += strlen(prov->base_url) + 1 + strlen(rest) + 1;
        for (size_t i = 0; i < req->n_fields; i++)
                if (forwarded(prov, &req->fields[i])) {
                        n++;
                        text += strlen(req->fields[i].name) + 2 + strlen(req->fields[i].value) + 1;
                }
        /* A recycled record's block is used again when it is large enough. */
        if (pr->headers_size < n * sizeof *nodes + text) {
                free(pr->headers);
                pr->headers = NULL;
                pr->headers_size = 0;
                nodes = malloc(n * sizeof *nodes + text);
                if (!nodes)
                        return -ENOMEM;
                pr->headers_size = n * sizeof *nodes + text;
        } else
                nodes = pr->headers;
        t = (char *) (nodes + n);

        pr->auth = t;
        pr->auth[0] = 0;
        nodes[k++].data = t;
        t += AUTH_LINE_MAX;
        for (unsigned i = 0; i < prov->n_headers; i++) {
                nodes[k++].data = strcpy(t, prov->headers[i]);
                t += strlen(t) + 1;
        }
        for (size_t i = 0; i < req->n_fields; i++) {
                const struct http_field *f = &req->fields[i];

                if (!forwarded(prov, f))
                        continue;
                if (strcasecmp(f->name, "Content-Type") == 0)
                        has_content_type = true;
                /* curl drops "Name:" with an empty value unless it is written "Name;". */
                nodes[k++].data = t;
                t = stpcpy(t, f->name);
                t = f->value[0] ? stpcpy(stpcpy(t, ": "), f->value) : stpcpy(t, ";");
                t++;
        }
        /* Without it curl would label the body a form. */
        if (!has_content_type) {
                nodes[k++].data = strcpy(t, content_type);
                t += sizeof content_type;
        }
        nodes[k++].data = strcpy(t, expect);
        t += sizeof expect;
        /* The upstream URL: the provider's base and the client's path after /v1/. */
        pr->url = t;
        stpcpy(stpcpy(stpcpy(t, prov->base_url), "/"), rest);
        for (size_t i = 0; i < k; i++)
                nodes[i].next = i + 1 < k ? &nodes[i + 1] : NULL;
        pr->headers = nodes;
        return 0;
}

/* How long this request may wait for a key: X-Keypool-Max-Wait, else max_wait. */
static int64_t max_wait_ms(const struct proxy_context *p, const struct http_request *req) {
        const char *h = http_request_header(req, "X-Keypool-Max-Wait");
        char *end;
        double s;

        if (h) {
                s = strtod(h, &end);
                if (end != h && *end == 0 && s >= 0 && s <= MAX_WAIT_CAP_S)
                        return (int64_t) (s * 1000);
        }
        return (int64_t) p->config->max_wait * 1000;
}

void proxy_handle(struct proxy_context *p, struct http_conn *c, const struct http_request *req) {
        struct proxy_request *pr;

        if (strcmp(req->method, "POST") != 0) {
                http_conn_respond_error(c, 405, "invalid_request_error", "method_not_allowed",
                                        (const struct http_header[]) { { "Allow", "POST" } }, 1,
                                        "only POST is proxied");
                return;
        }
        pr = request_get(p);
        if (!pr) {
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0, "out of memory");
                return;
        }
        pr->ctx = p;
        p->active++;
        pr->step = STEP_NEW;
        pr->mode = MODE_HEADERS;
        pr->last_key = KEYTABLE_NO_KEY;
        pr->rotated_from = KEYTABLE_NO_KEY;
        pr->lease.key = KEYTABLE_NO_KEY;
        snprintf(pr->request_id, sizeof pr->request_id, "%u-%llu", p->slot,
                 (unsigned long long) ++p->next_request_id);

        if (route(pr, c, req) < 0) {
                request_free(pr);
                return;
        }
        if (build_request_headers(pr, req) < 0) {
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0, "out of memory");
                request_free(pr);
                return;
        }
        pr->deadline_ms = clock_mono_ms() + max_wait_ms(p, req);
        pr->conn = c;
        http_conn_set_request_data(c, pr);
        attempt(pr);
}

int proxy_init(struct proxy_context *p) {
        int r;

        p->queues = calloc(p->config->n_pools ? p->config->n_pools : 1, sizeof *p->queues);
        if (!p->queues)
                return -ENOMEM;
        for (unsigned i = 0; i < p->config->n_pools; i++) {
                p->queues[i].ctx = p;
                p->queues[i].pool = i;
                r = sd_event_add_time(p->event, &p->queues[i].timer, CLOCK_MONOTONIC, 0, 1000, on_queue_timer,
                                      &p->queues[i]);
                if (r < 0)
                        return r;
                sd_event_source_set_enabled(p->queues[i].timer, SD_EVENT_OFF);
        }
        r = sd_event_add_defer(p->event, &p->kick, on_kick, p);
        if (r < 0)
                return r;
        sd_event_source_set_enabled(p->kick, SD_EVENT_OFF);
        return sd_event_add_time_relative(p->event, &p->probe_timer, CLOCK_MONOTONIC, PROBE_PERIOD_USEC, 0,
                                          on_probe_timer, p);
}

void proxy_done(struct proxy_context *p) {
        if (p->queues)
                for (unsigned i = 0; i < p->config->n_pools; i++)
                        sd_event_source_disable_unref(p->queues[i].timer);
        free(p->queues);
        p->queues = NULL;
        while (p->n_spare > 0)
                curl_easy_cleanup(p->spare[--p->n_spare]);
        while (p->spare_requests) {
                struct proxy_request *pr = p->spare_requests;

                p->spare_requests = pr->next_spare;
                free(pr->headers);
                free(pr->answer_text);
                free(pr->answer_body);
                free(pr);
        }
        p->n_spare_requests = 0;
        p->kick = sd_event_source_disable_unref(p->kick);
        p->probe_timer = sd_event_source_disable_unref(p->probe_timer);
}
