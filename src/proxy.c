/* proxy.c — serving POST /v1/… through a pool's keys.
 *
 * Owns the worker's proxy_context (per-pool wait queues, spare request records and curl
 * handles, the probe schedule) and every struct proxy_request, which lives from the client's
 * complete request until the answer is complete or the client is gone. A request is always in
 * exactly one step:
 *
 *   NEW       routed (or between attempts), about to try for a key
 *   WAITING   queued on its pool for a key (first come, first served), with a deadline
 *   RUNNING   an upstream attempt with a lease on one key and a curl handle
 *   BACKOFF   between a transient failure and the next attempt
 *   DONE      finished, owning nothing
 *
 * Invariants: only set_step() changes the step, and it releases what the new step does not own
 * (queue link, timer, lease, curl handle); proxy_decide() alone says what an attempt's end
 * means; request_finish() alone answers the client at the end and recycles the record. Each
 * attempt's lease is returned with the attempt's outcome before anything else happens, so the
 * shared table always knows what is in flight.
 *
 * Answers are sorted as soon as their headers arrive (answer.c): a success is relayed as it
 * arrives — except that the first event of an SSE stream is held until it is complete, because
 * providers report errors as an event after "200 OK", and until the client has seen a byte such
 * an error can still be retried with another key. Anything else is buffered to be judged.
 *
 * curl forbids removing a transfer from inside its own callbacks, and a client can vanish from
 * inside one (a failed write): such an abort is only marked there, the callback fails the
 * transfer, and the done callback finishes the request.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <unistd.h>

#include "keypool/answer.h"
#include "keypool/clock.h"
#include "keypool/curlmem.h"
#include "keypool/jscan.h"
#include "keypool/log.h"
#include "keypool/policy.h"
#include "keypool/proxy.h"
#include "keypool/scrub.h"
#include "keypool/secmem.h"

#define AUTH_LINE_MAX           4200            /* "Authorization: Bearer " and a secret */
#define AUTH_PREFIX_SIZE        sizeof "Authorization: Bearer "  /* the longest, and a NUL */
#define SPARE_MIN               64              /* finished records and handles kept at least */
#define SPARE_TRIM_USEC         (10ULL * 1000000) /* … and more, up to the peak of this long */
#define MAX_WAIT_CAP_S          3600
#define PROBE_PERIOD_USEC       (2ULL * 1000000)
#define TRANSPORT_REPORT_MS     (60 * 1000)     /* a provider's TLS/DNS failure is logged this often */
#define CONFIRMS                64              /* keys with a recent confirmation probe remembered */
#define CONFIRM_PERIOD_MS       10000           /* … and how long one stands for its key */

enum step {
        STEP_NEW = 1,
        STEP_WAITING,
        STEP_RUNNING,
        STEP_BACKOFF,
        STEP_DONE,
        _STEP_MAX,
};

/* A probe started to confirm a caller's 401/403 on a key (see confirm_refusal). */
struct confirm {
        unsigned key;
        int64_t at_ms;                  /* 0: none */
};

struct proxy_context {
        struct proxy_params w;          /* what the worker lent */
        struct policy_config policy;
        unsigned active;                /* requests being served (waiting ones included) */
        unsigned waiting;               /* requests queued for a key */
        uint64_t next_request_id;
        struct proxy_queue *queues;     /* one per pool */
        sd_event_source *kick;          /* deferred: serve the queues */
        sd_event_source *probe_timer;
        unsigned probes;                /* probes in flight */
        CURL **spare;                   /* finished transfers' handles, set up for the next */
        unsigned n_spare, spare_cap;
        struct proxy_request *spare_requests; /* finished requests' records, for the next */
        unsigned n_spare_requests;
        unsigned peak_active;           /* the most requests served at once since the last trim */
        sd_event_source *trim_timer;    /* spares beyond that peak are freed */
        struct scrub *scrub;            /* hides the configured secrets in upstream text */
        struct confirm confirms[CONFIRMS];
};

struct proxy_queue {
        struct proxy_context *ctx;
        unsigned pool;
        struct proxy_request *head, *tail;
        sd_event_source *timer;         /* the earliest time a key of the pool may recover */
        size_t auth_size;               /* room for the auth line of the pool's longest key */
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
        bool stream;                    /* the body asks for a stream ("stream": true) */
        bool http1;                     /* the next attempt goes over HTTP/1.1 (decision.http1) */
        struct curl_slist *headers;     /* every request header, in one block built once: the
                                         * auth line's node first (its text is auth) */
        size_t headers_size;            /* bytes allocated for the block */
        char *auth;                     /* auth_size bytes, the current key's line; wiped
                                         * when an attempt ends */
        size_t auth_size;
        char request_id[32];            /* "<slot>-<n>": 10 + 1 + 20 digits and a NUL */
        int64_t deadline_ms;            /* waiting for a key ends here (never after end_ms) */
        int64_t end_ms;                 /* request_timeout: the whole request ends here */
        unsigned connect_ms;            /* the pool's timeouts, as the caller may have shortened */
        unsigned first_byte_ms;
        unsigned idle_ms;

        struct proxy_request *queue_next, *queue_prev;
        uint64_t ticket;                /* its place among every worker's waiters, 0 never waited */
        sd_event_source *timer;         /* the waiting deadline, the backoff, or (RUNNING) the
                                         * attempt's watchdog: first byte, idle, request_timeout.
                                         * One source for the record's life (see step_timer_arm),
                                         * off outside those steps */

        CURL *easy;
        struct keytable_lease lease;
        bool leased;
        unsigned attempts;
        unsigned transient_failures;
        unsigned last_key;              /* the key of the previous attempt, avoided next time */
        unsigned rotated_from;          /* the key a rotation left, until the next key is known */
        int rotated_status;
        int64_t attempt_started_ms;
        int64_t head_ms;                /* when the answer's head was complete; 0: not yet */
        int64_t last_byte_ms;           /* when the last body bytes arrived */
        enum proxy_timeout timed_out;   /* the watchdog ended the attempt */
        const char *bad_answer;         /* what broke HTTP in the answer, or NULL */
        const char *transport_error;    /* curl's word for an attempt that got no answer */

        struct answer answer;           /* the current attempt's */
        bool in_curl;                   /* inside a curl callback */
        bool aborted;                   /* the client went away */
        bool retry_from_stream;         /* the held first event was an error: judge it in on_done */
        bool auth_suspected;            /* a key already refused this request's path (401/403) */
        bool pressure;                  /* the client's output buffer is full */
        bool paused;                    /* the transfer is paused on pressure */
        struct proxy_request *next_spare;
};

static void attempt(struct proxy_request *pr);
static void serve_queue(struct proxy_context *p, unsigned pool);
static void release(struct proxy_request *pr, const struct verdict *v);

/* --- small helpers ------------------------------------------------------------------------ */

/* Headers that belong to one connection, that keypool sets itself, or that would carry the
 * client's own credentials upstream. */
static bool is_dropped_request_header(const char *name) {
#define IS(s) (strcasecmp(name, s) == 0)
        /* Every client header passes here twice per request: its first letter picks the few
         * names it could be. */
        switch (name[0] | 0x20) {
        case 'a':
                return IS("Authorization") || IS("Accept-Encoding");
        case 'c':
                return IS("Connection") || IS("Content-Length");
        case 'e':
                return IS("Expect");
        case 'h':
                return IS("Host");
        case 'k':
                return IS("Keep-Alive");
        case 'p':
                return IS("Proxy-Authorization") || IS("Proxy-Connection");
        case 't':
                return IS("TE") || IS("Trailer") || IS("Transfer-Encoding");
        case 'u':
                return IS("Upgrade");
        case 'x':
                return strncasecmp(name, "X-Keypool-", 10) == 0 || IS("x-api-key") || IS("x-goog-api-key");
        default:
                return false;
        }
#undef IS
}

static const char *key_id(const struct proxy_request *pr, unsigned key) {
        const struct config_key *k = config_pool_key(pr->cpool, pr->first_key, key);

        return k ? k->id : "?";
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
        keytable_history_add(pr->ctx->w.table, &ev);
}

/* A rotation is one event once the key that takes over is known (KEYTABLE_NO_KEY: none could). */
static void note_rotation(struct proxy_request *pr, unsigned to) {
        if (pr->rotated_from == KEYTABLE_NO_KEY)
                return;
        history(pr, HISTORY_ROTATE, pr->rotated_from, to, pr->rotated_status, KEY_REASON_NONE, 0);
        keytable_count_rotation(pr->ctx->w.table, pr->ctx->w.slot, pr->pool);
        pr->rotated_from = KEYTABLE_NO_KEY;
}

/* curl keeps its own copy of every header line, the key's included: wipe before freeing. */
/* The key leaves the request's memory as soon as an attempt no longer needs it. */
static void wipe_auth(struct proxy_request *pr) {
        if (pr->auth && pr->auth[0])
                explicit_bzero(pr->auth, strnlen(pr->auth, pr->auth_size - 1) + 1);
}

static void free_headers(struct curl_slist *l) {
        for (struct curl_slist *i = l; i; i = i->next)
                explicit_bzero(i->data, strlen(i->data));
        curl_slist_free_all(l);
}

/* The header that carries the key, in the provider's style. Keys never go in a URL. */
/* n in decimal at p (room for 20 digits needed); returns the end. printf's formatting cost more
 * than the rest of writing these per-request strings. */
static char *put_decimal(char *p, uint64_t n) {
        char digits[20];
        size_t i = sizeof digits;

        do {
                digits[--i] = (char) ('0' + n % 10);
                n /= 10;
        } while (n > 0);
        memcpy(p, digits + i, sizeof digits - i);
        return p + (sizeof digits - i);
}

static void auth_line(const struct config_provider *prov, const char *secret, char *buf, size_t size) {
        const char *name = prov->auth == CONFIG_AUTH_X_API_KEY ? "x-api-key: " :
                           prov->auth == CONFIG_AUTH_X_GOOG_API_KEY ? "x-goog-api-key: " :
                           "Authorization: Bearer ";
        size_t n = strlen(name), len = strlen(secret);

        /* As snprintf would: cut to the buffer (config_load bounds a secret well below it). */
        if (n + len >= size)
                len = size > n ? size - n - 1 : 0;
        if (n >= size)
                n = size - 1;
        memcpy(buf, name, n);
        memcpy(buf + n, secret, len);
        buf[n + len] = 0;
}

/* Tells every worker with waiting requests (this one included) that a key may be free. */
static void wake_waiters(struct proxy_context *p) {
        unsigned slots[256], n;
        uint64_t one = 1;

        n = keytable_slots_with_waiters(p->w.table, slots, sizeof slots / sizeof slots[0]);
        for (unsigned i = 0; i < n; i++) {
                if (slots[i] == p->w.slot) {
                        sd_event_source_set_enabled(p->kick, SD_EVENT_ONESHOT);
                        continue;
                }
                if (slots[i] < p->w.n_wake_fds && p->w.wake_fds[slots[i]] >= 0)
                        (void) !write(p->w.wake_fds[slots[i]], &one, sizeof one);
        }
}

static void log_change(const struct proxy_request *pr, const struct keytable_change *c,
                       const struct verdict *v) {
        struct log_fields f = fields(pr, c->key);

        f.status = pr->answer.status;
        if (c->account_limit_suspected)
                log_event(LOG_WARNING, "cooldown", &f,
                          "every key of pool %s was rate limited within a second: an account- or "
                          "IP-wide limit is suspected; keys keep cooling for their hints", pr->cpool->name);
        if (!c->changed)
                return;
        if (c->to == KEY_COOLING)
                history(pr, HISTORY_COOLDOWN, c->key, KEYTABLE_NO_KEY, pr->answer.status, c->reason,
                        c->until_ms - clock_mono_ms());
        else if (c->to == KEY_DISABLED)
                history(pr, HISTORY_DISABLE, c->key, KEYTABLE_NO_KEY, pr->answer.status, c->reason, 0);
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
                          keytable_reason_name(c->reason), pr->answer.status);
        } else if (c->to == KEY_READY && c->from == KEY_COOLING) {
                log_event(LOG_INFO, "recover", &f, "key is ready again");
        }
}

/* --- the request's life ------------------------------------------------------------------ */

static void queue_unlink(struct proxy_request *pr) {
        struct proxy_context *p = pr->ctx;
        struct proxy_queue *q = &p->queues[pr->pool];

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
        keytable_slot_set_waiters(p->w.table, p->w.slot, p->waiting);
        keytable_slot_set_wait_head(p->w.table, p->w.slot, pr->pool, q->head ? q->head->ticket : 0);
}

/* The request's one transition. What the new step does not own is let go of here: the queue
 * link belongs to WAITING, the timer to WAITING or BACKOFF (each step arms its own after this),
 * the lease and the curl handle to RUNNING. A lease still held here had no outcome (the client
 * left, or the transfer never started); a handle still held is a transfer cancelled. */
static int on_wait_deadline(sd_event_source *s, uint64_t usec, void *userdata);
static int on_backoff_done(sd_event_source *s, uint64_t usec, void *userdata);
static int on_watchdog(sd_event_source *s, uint64_t usec, void *userdata);

/* A step's timer is whatever that step waits for. */
static int on_step_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_request *pr = userdata;

        switch (pr->step) {
        case STEP_WAITING:
                return on_wait_deadline(s, usec, userdata);
        case STEP_BACKOFF:
                return on_backoff_done(s, usec, userdata);
        case STEP_RUNNING:
                return on_watchdog(s, usec, userdata);
        default:
                return 0;
        }
}

/* Arms the record's timer for at_usec (CLOCK_MONOTONIC). The source is made once and kept with
 * the record, spares included: making and freeing one per step cost more than the rest of the
 * request's timer work. 0 or -errno. */
static int step_timer_arm(struct proxy_request *pr, uint64_t at_usec) {
        int r;

        if (!pr->timer)
                return sd_event_add_time(pr->ctx->w.event, &pr->timer, CLOCK_MONOTONIC, at_usec, 1000,
                                         on_step_timer, pr);
        r = sd_event_source_set_time(pr->timer, at_usec);
        if (r >= 0)
                r = sd_event_source_set_enabled(pr->timer, SD_EVENT_ONESHOT);
        return r;
}

static void step_timer_off(struct proxy_request *pr) {
        if (pr->timer)
                (void) sd_event_source_set_enabled(pr->timer, SD_EVENT_OFF);
}

static void set_step(struct proxy_request *pr, enum step step) {
        if (pr->step == STEP_WAITING)
                queue_unlink(pr);
        step_timer_off(pr);
        if (step != STEP_RUNNING) {
                if (pr->easy) {
                        upstream_cancel(pr->ctx->w.upstream, pr->easy);
                        curl_easy_cleanup(pr->easy);
                        pr->easy = NULL;
                }
                release(pr, NULL);
        }
        pr->step = step;
}

/* Spares: finished requests' records and transfers' handles are kept for the next requests, as
 * many as were served at once at the peak of the last SPARE_TRIM_USEC (at least SPARE_MIN). A
 * steady load at any concurrency then allocates neither per request (a new handle costs curl's
 * buffers and every option set again, a new record a mapping for its secrets), and what a burst
 * left behind is freed once it has passed. */
static unsigned spare_limit(const struct proxy_context *p) {
        return p->peak_active > SPARE_MIN ? p->peak_active : SPARE_MIN;
}

static void request_free(struct proxy_request *pr) {
        sd_event_source_disable_unref(pr->timer);
        (void) secmem_free(pr->headers);
        answer_free(&pr->answer);
        free(pr);
}

static void spares_trim(struct proxy_context *p, unsigned limit) {
        while (p->n_spare_requests > limit) {
                struct proxy_request *pr = p->spare_requests;

                p->spare_requests = pr->next_spare;
                p->n_spare_requests--;
                request_free(pr);
        }
        while (p->n_spare > limit)
                curl_easy_cleanup(p->spare[--p->n_spare]);
}

static int on_trim_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_context *p = userdata;

        spares_trim(p, spare_limit(p));
        p->peak_active = p->active;
        sd_event_source_set_time_relative(s, SPARE_TRIM_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

/* A zeroed request record: a finished one with its buffers, or a new one. */
static struct proxy_request *request_get(struct proxy_context *p) {
        struct proxy_request *pr = p->spare_requests;
        struct curl_slist *headers;
        sd_event_source *timer;
        char *text, *body;
        size_t text_cap, body_cap, headers_size;

        if (!pr)
                return calloc(1, sizeof *pr);
        p->spare_requests = pr->next_spare;
        p->n_spare_requests--;
        text = pr->answer.text;
        text_cap = pr->answer.text_cap;
        body = pr->answer.body;
        body_cap = pr->answer.body_cap;
        headers = pr->headers;
        headers_size = pr->headers_size;
        timer = pr->timer;
        *pr = (struct proxy_request) {
                .answer = { .text = text, .text_cap = text_cap, .body = body, .body_cap = body_cap },
                .headers = headers, .headers_size = headers_size, .timer = timer,
        };
        return pr;
}

static void request_put(struct proxy_request *pr) {
        struct proxy_context *p = pr->ctx;

        if (p->n_spare_requests < spare_limit(p)) {
                pr->next_spare = p->spare_requests;
                p->spare_requests = pr;
                p->n_spare_requests++;
                return;
        }
        request_free(pr);
}

static void release(struct proxy_request *pr, const struct verdict *v) {
        struct keytable_outcome o = { .cls = v ? v->cls : VERDICT_NONE, .status = pr->answer.status,
                                      .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_change change = {};
        char error[KEYTABLE_ERROR_MAX + 1] = "";

        if (!pr->leased)
                return;
        if (v && (v->cls == VERDICT_RATE_LIMITED || v->cls == VERDICT_OK))
                o.rest_ms = v->rest_ms;
        o.unconfirmed = v && v->unconfirmed;
        /* What went wrong, in a few words and without any credential the provider echoed. */
        if (v && v->cls != VERDICT_OK && v->cls != VERDICT_NONE) {
                if (pr->transport_error)
                        snprintf(error, sizeof error, "%s", pr->transport_error);
                else
                        answer_error_summary(&pr->answer, pr->ctx->scrub, error, sizeof error);
                if (error[0])
                        o.error = error;
        }
        o.tokens_in = pr->answer.tokens_in;
        o.tokens_out = pr->answer.tokens_out;
        /* Without a name that carries figures there are none to read (policy_read_figures). */
        if (pr->answer.n_headers > 0 && pr->answer.figure_names) {
                struct answer_header ah[ANSWER_MAX_HEADERS];
                struct upstream_answer a;

                answer_view(&pr->answer, ah, &a);
                policy_read_figures(&a, clock_wall_ms(), &o.figures);
        }
        keytable_release(pr->ctx->w.table, &pr->lease, &o, clock_mono_ms(), &change);
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
        if (size >= 11)         /* an unsigned: 10 digits at most */
                *put_decimal(attempts, pr->attempts) = 0;
        h[0] = (struct http_header) { "X-Keypool-Pool", pr->cpool->name };
        h[1] = (struct http_header) { "X-Keypool-Key", key_id(pr, pr->lease.key) };
        h[2] = (struct http_header) { "X-Keypool-Attempts", attempts };
        return 3;
}

/* The upstream's end-to-end headers plus keypool's; the strings point into pr and names. */
static size_t answer_headers(struct proxy_request *pr, struct http_header *h, size_t max,
                             char *names, size_t names_size, char *attempts, size_t attempts_size) {
        size_t n = answer_client_headers(&pr->answer, h, max - 3, names, names_size);

        return n + keypool_headers(pr, h + n, attempts, attempts_size);
}

static void respond_buffered(struct proxy_request *pr) {
        struct http_header h[ANSWER_MAX_HEADERS + 3];
        char names[8192], attempts[16];
        struct http_conn *c;
        size_t n;

        n = answer_headers(pr, h, sizeof h / sizeof h[0], names, sizeof names, attempts, sizeof attempts);
        c = detach(pr);
        if (!c)
                return;
        /* Providers echo what they were sent, the key included: the caller gets none of it. */
        answer_scrub_unsent(&pr->answer, pr->ctx->scrub);
        http_conn_respond(c, pr->answer.status, h, n, pr->answer.body ? pr->answer.body : "", pr->answer.body_len);
}

static int begin_stream(struct proxy_request *pr) {
        struct http_header h[ANSWER_MAX_HEADERS + 3];
        char names[8192], attempts[16];
        size_t n;

        n = answer_headers(pr, h, sizeof h / sizeof h[0], names, sizeof names, attempts, sizeof attempts);
        return http_conn_stream_begin(pr->conn, pr->answer.status, h, n);
}

/* keypool's own error for this request. */
static void respond_error(struct proxy_request *pr, const struct proxy_decision *d) {
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
        if (d->retry_after_s > 0) {
                snprintf(retry, sizeof retry, "%lld", (long long) d->retry_after_s);
                h[n++] = (struct http_header) { "Retry-After", retry };
        }
        c = detach(pr);
        if (c)
                http_conn_respond_error(c, d->status, "keypool_error", d->code, h, n, "%s%s%s", d->message,
                                        d->detail ? ": " : "", d->detail ? d->detail : "");
}

static int relay(struct proxy_request *pr, const char *data, size_t len);

/* A relayed answer ends: what is still held goes out first; a success that never started a
 * stream (an empty body) is answered whole. */
static void end_stream(struct proxy_request *pr) {
        if (pr->conn && !http_conn_stream_started(pr->conn) && pr->answer.held > 0) {
                /* Nothing of it was sent yet (an error event held at the stream's start): the
                 * caller gets it without the secrets a provider may have echoed. */
                answer_scrub_unsent(&pr->answer, pr->ctx->scrub);
                relay(pr, NULL, 0);
        }
        if (pr->conn && http_conn_stream_started(pr->conn))
                http_conn_stream_end(detach(pr));
        else
                respond_buffered(pr);
}

/* Ends the request: set_step lets go of what it still holds, the client gets the ending d
 * names, and the record is recycled. The only place a request record is given up. */
static void request_finish(struct proxy_request *pr, const struct proxy_decision *d) {
        set_step(pr, STEP_DONE);
        switch (d->next) {
        case PROXY_NEXT_STREAM_END:
                end_stream(pr);
                break;
        case PROXY_NEXT_ANSWER:
                respond_buffered(pr);
                break;
        case PROXY_NEXT_CUT:
                http_conn_abort(detach(pr));
                break;
        case PROXY_NEXT_FAIL:
                respond_error(pr, d);
                break;
        default:
                detach(pr);
                break;
        }
        wipe_auth(pr);
        answer_reset(&pr->answer);
        if (pr->own_body)
                free(pr->body);
        pr->ctx->active--;
        request_put(pr);
}

static void fail(struct proxy_request *pr, int status, const char *code, int64_t retry_after_s,
                 const char *message) {
        request_finish(pr, &(struct proxy_decision) {
                .next = PROXY_NEXT_FAIL, .status = status, .code = code, .message = message,
                .retry_after_s = retry_after_s,
        });
}

static void drop(struct proxy_request *pr) {
        request_finish(pr, &(struct proxy_decision) { .next = PROXY_NEXT_DROP });
}

/* request_timeout passed while no attempt was running (waiting for a key). */
static void request_timed_out(struct proxy_request *pr) {
        struct proxy_attempt_end a = { .result = PROXY_RESULT_TIMEOUT, .timeout = PROXY_TIMEOUT_REQUEST,
                                       .attempts = pr->attempts, .client_gone = !pr->conn };
        const struct proxy_limits l = { .max_attempts = pr->attempts };
        struct proxy_decision d;

        proxy_decide(&a, &l, &d);
        request_finish(pr, &d);
}

/* --- curl callbacks ---------------------------------------------------------------------- */

/* The attempt's watchdog (on_watchdog) wakes at the earliest of: the head's deadline while it
 * has not come, the idle deadline once it has, and the request's end. */
static int64_t watchdog_due(const struct proxy_request *pr, int64_t now) {
        int64_t due = pr->head_ms ? (pr->paused ? now : pr->last_byte_ms) + pr->idle_ms
                                  : pr->attempt_started_ms + pr->first_byte_ms;

        return due < pr->end_ms ? due : pr->end_ms;
}

static void watchdog_set(struct proxy_request *pr) {
        if (pr->step == STEP_RUNNING)
                (void) step_timer_arm(pr, (uint64_t) watchdog_due(pr, clock_mono_ms()) * 1000);
}

static size_t on_answer_header(char *data, size_t size, size_t nmemb, void *userdata) {
        struct proxy_request *pr = userdata;
        size_t len = size * nmemb;
        int r;

        if (pr->aborted)
                return 0;
        r = answer_add_header_line(&pr->answer, data, len);
        if (r == -EPROTO)
                pr->bad_answer = "a status outside 100..599";
        else if (r == -E2BIG)
                pr->bad_answer = "more answer headers than keypool accepts";
        if (r < 0)
                return 0;
        if (!pr->head_ms && pr->answer.mode != ANSWER_HEADERS) {
                pr->head_ms = pr->last_byte_ms = clock_mono_ms();
                watchdog_set(pr);
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
        if (r >= 0 && pr->answer.held > 0 && !pr->aborted) {
                r = http_conn_stream_write(pr->conn, pr->answer.body + pr->answer.body_len - pr->answer.held, pr->answer.held);
                pr->answer.held = 0;
                answer_release_relayed(&pr->answer);
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
        pr->last_byte_ms = clock_mono_ms();

        if (pr->answer.mode == ANSWER_BUFFER) {
                if (pr->answer.body_len + len <= ANSWER_MAX_BUFFERED)
                        return answer_append(&pr->answer, data, len) < 0 ? 0 : len;
                /* Too large to be an error worth judging: relay what we have and the rest. */
                pr->answer.mode = ANSWER_STREAM;
                pr->answer.held = pr->answer.body_len;
        }

        if (pr->pressure) {
                pr->paused = true;
                return CURL_WRITEFUNC_PAUSE;
        }

        if (pr->answer.holding) {
                size_t end;

                if (answer_append(&pr->answer, data, len) < 0)
                        return 0;
                pr->answer.held += len;
                end = answer_scan_events(&pr->answer, data, len);
                if (!end && pr->answer.held < ANSWER_MAX_SSE_EVENT)
                        return len;             /* the first event is not complete yet */
                pr->answer.holding = false;
                if (pr->answer.stream_error_status) {
                        /* The stream opened with an error: nothing reached the client, so it
                         * is judged and retried like any error answer. */
                        pr->retry_from_stream = true;
                        return 0;
                }
                r = relay(pr, NULL, 0);
        } else {
                if (pr->answer.sse)
                        answer_scan_events(&pr->answer, data, len);
                else if (pr->answer.body_len + len <= ANSWER_MAX_USAGE_COPY)
                        answer_append(&pr->answer, data, len);
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
 * set: a finished transfer's handle is kept (see spare_limit) rather than rebuilt.
 * Handles come back from on_done, whatever the transfer's result (curl resets a handle's
 * transfer state when the next one starts); a cancelled one (client gone) is freed instead. */
static CURL *easy_get(struct proxy_context *p) {
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
        curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
        curl_easy_setopt(easy, CURLOPT_TCP_NODELAY, 1L);
        /* Keys travel in headers only; a redirect could carry them to another host. */
        curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
        return easy;
}

static bool spare_room(struct proxy_context *p) {
        CURL **a;
        unsigned cap;

        if (p->n_spare >= spare_limit(p))
                return false;
        if (p->n_spare < p->spare_cap)
                return true;
        cap = p->spare_cap ? p->spare_cap * 2 : SPARE_MIN;
        a = reallocarray(p->spare, cap, sizeof *a);
        if (!a)
                return false;
        p->spare = a;
        p->spare_cap = cap;
        return true;
}

static void easy_put(struct proxy_context *p, CURL *easy) {
        if (spare_room(p)) {
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
        answer_classify(&pr->answer, &pr->ctx->policy, clock_wall_ms(), ret);
}

static int on_backoff_done(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_request *pr = userdata;

        set_step(pr, STEP_NEW);
        attempt(pr);
        return 0;
}

static bool retry_allowed(const struct proxy_attempt_end *a, const struct proxy_limits *l) {
        return a->transient_failures < l->max_transient && a->attempts < l->max_attempts &&
               a->time_left_ms > 0;
}

/* A transient failure before the client saw a byte is retried after a backoff (on another key
 * when one is ready) while attempts remain; the provider's retry hint may lengthen the wait, up
 * to the cap. */
static void decide_retry(const struct proxy_attempt_end *a, const struct proxy_limits *l,
                         enum proxy_next otherwise, struct proxy_decision *d) {
        if (!retry_allowed(a, l)) {
                d->next = otherwise;
                return;
        }
        d->next = PROXY_NEXT_RETRY;
        d->otherwise = otherwise;
        /* An HTTP/2 server may answer and end its stream before it has read the request's body
         * (nginx's fixed answers, a provider's early refusal); libcurl 7.88 may then fail the
         * transfer before it has handed over any of the answer ("Stream error in the HTTP/2
         * framing layer"), when it goes on to send the body. Nothing is wrong upstream and
         * nothing with the key: the request goes again at once, over HTTP/1.1, where the race
         * does not exist. */
        if (a->result == PROXY_RESULT_NO_ANSWER && a->failure == UPSTREAM_FAILURE_STREAM) {
                d->delay_ms = 0;
                d->http1 = true;
                return;
        }
        d->delay_ms = policy_backoff_ms(a->transient_failures - 1, l->backoff_initial_ms, l->backoff_max_ms,
                                        a->random);
        if (a->retry_after_ms > d->delay_ms)
                d->delay_ms = a->retry_after_ms < (int64_t) l->backoff_max_ms ? a->retry_after_ms
                                                                               : l->backoff_max_ms;
        /* A retry that could only start once request_timeout has passed would be a wait for
         * nothing: the caller gets this attempt's outcome now. */
        if (d->delay_ms >= a->time_left_ms)
                d->next = otherwise;
}

/* keypool's answer to a transfer that got no answer. A TLS or DNS failure names itself (with
 * curl's words after the message): the operator's fix is in the configuration or the network. */
static void decide_transport_failure(const struct proxy_attempt_end *a, struct proxy_decision *d) {
        d->status = 502;
        if (a->result == PROXY_RESULT_TIMEOUT) {
                d->status = 504;
                d->code = "upstream_timeout";
                switch (a->timeout) {
                case PROXY_TIMEOUT_CONNECT:
                        d->message = "the upstream could not be connected to in time (connect_timeout)";
                        break;
                case PROXY_TIMEOUT_FIRST_BYTE:
                        d->message = "the upstream did not begin its answer in time (first_byte_timeout)";
                        break;
                case PROXY_TIMEOUT_IDLE:
                        d->message = "the upstream fell silent inside its answer (idle_timeout)";
                        break;
                case PROXY_TIMEOUT_REQUEST:
                        d->code = "request_timeout";
                        d->message = "the request did not complete within its time (request_timeout)";
                        break;
                default:
                        d->message = "the upstream did not answer in time";
                        break;
                }
                return;
        }
        if (a->result == PROXY_RESULT_BAD_ANSWER) {
                d->code = "upstream_bad_answer";
                d->message = "the upstream's answer was broken";
                d->detail = a->failure_text && a->failure_text[0] ? a->failure_text : NULL;
                return;
        }
        switch (a->failure) {
        case UPSTREAM_FAILURE_CERTIFICATE:
                d->code = "upstream_tls_failure";
                d->message = "TLS failure: the upstream's certificate could not be verified";
                break;
        case UPSTREAM_FAILURE_TLS:
                d->code = "upstream_tls_failure";
                d->message = "TLS failure: no secure connection to the upstream could be set up";
                break;
        case UPSTREAM_FAILURE_DNS:
                d->code = "upstream_dns_failure";
                d->message = "DNS failure: the upstream's name (or its proxy's) does not resolve";
                break;
        case UPSTREAM_FAILURE_STREAM:
                d->code = "upstream_unreachable";
                d->message = "the upstream closed the HTTP/2 stream before the request was sent";
                break;
        default:
                d->code = "upstream_unreachable";
                d->message = "the upstream could not be reached or closed the connection";
                return;
        }
        d->detail = a->failure_text && a->failure_text[0] ? a->failure_text : NULL;
}

/* Another key, at once: within max_attempts (rotations and retries together) and the time. */
static bool may_rotate(const struct proxy_attempt_end *a, const struct proxy_limits *l) {
        return a->attempts < l->max_attempts && a->time_left_ms > 0;
}

void proxy_decide(const struct proxy_attempt_end *a, const struct proxy_limits *l,
                  struct proxy_decision *ret) {
        struct proxy_decision d = {};
        enum proxy_next end;

        /* A refusal of the caller's path says nothing certain about the key (it may only lack
         * the scope for that endpoint): the pool's own probe of a known path decides, whether or
         * not the caller is still there. */
        d.confirm_auth = a->cls == VERDICT_AUTH && a->auth_unconfirmed;
        if (a->client_gone) {
                d.next = PROXY_NEXT_DROP;
        } else if (a->result == PROXY_RESULT_NO_ANSWER || a->result == PROXY_RESULT_TIMEOUT ||
                   a->result == PROXY_RESULT_BAD_ANSWER) {
                decide_transport_failure(a, &d);
                /* Bytes have reached the client: the only honest end is a cut. A certificate
                 * problem is the configuration's and does not mend by retrying, and nothing is
                 * retried once the request's own time is up. */
                if (a->bytes_sent)
                        d.next = PROXY_NEXT_CUT;
                else if (a->result == PROXY_RESULT_NO_ANSWER && a->failure == UPSTREAM_FAILURE_CERTIFICATE)
                        d.next = PROXY_NEXT_FAIL;
                else if (a->result == PROXY_RESULT_TIMEOUT && a->timeout == PROXY_TIMEOUT_REQUEST)
                        d.next = PROXY_NEXT_FAIL;
                else
                        decide_retry(a, l, PROXY_NEXT_FAIL, &d);
        } else if (a->result == PROXY_RESULT_STREAM) {
                /* A success: whatever error event the stream carried is only recorded. */
                d.next = PROXY_NEXT_STREAM_END;
        } else {
                /* A held first event goes to the client as the upstream sent it. */
                end = a->result == PROXY_RESULT_HELD_ERROR ? PROXY_NEXT_STREAM_END : PROXY_NEXT_ANSWER;
                switch (a->cls) {
                case VERDICT_AUTH:
                        /* An unconfirmed refusal moves the request once, and only when the pool
                         * has another key; a second refusal goes back to the caller, as the path
                         * is then the likely cause. */
                        if (a->auth_unconfirmed && (a->refused_before || !a->other_keys)) {
                                d.next = end;
                                break;
                        }
                        d.next = may_rotate(a, l) ? PROXY_NEXT_ROTATE : end;
                        break;
                case VERDICT_RATE_LIMITED:
                case VERDICT_QUOTA:
                        d.next = may_rotate(a, l) ? PROXY_NEXT_ROTATE : end;
                        break;
                case VERDICT_TRANSIENT:
                        decide_retry(a, l, end, &d);
                        break;
                default:
                        d.next = end;
                        break;
                }
        }
        *ret = d;
}

/* The key must rest or is dead: the request moves to the next key at once. */
static void rotate(struct proxy_request *pr, enum verdict_class cls) {
        struct log_fields f = fields(pr, pr->lease.key);

        f.status = pr->answer.stream_error_status ? pr->answer.stream_error_status : pr->answer.status;
        pr->rotated_from = pr->lease.key;
        pr->rotated_status = f.status;
        log_event(LOG_NOTICE, "rotate", &f, "answer %d (%s): moving the request to the next key",
                  f.status, verdict_class_name(cls));
        answer_reset(&pr->answer);
        set_step(pr, STEP_NEW);
        attempt(pr);
}

/* Waits delay_ms before the next attempt. 0, or -errno when no timer could be armed. */
static int backoff(struct proxy_request *pr, int64_t delay_ms, bool no_answer) {
        struct log_fields f = fields(pr, pr->last_key);
        int r;

        set_step(pr, STEP_BACKOFF);
        r = step_timer_arm(pr, (uint64_t) (clock_mono_ms() + delay_ms) * 1000);
        if (r < 0)
                return r;
        f.status = no_answer ? 0 : pr->answer.status;
        log_event(LOG_INFO, "retry", &f, "transient failure (%s): retry %u in %lld ms",
                  f.status ? "upstream error status" : "no answer", pr->transient_failures,
                  (long long) delay_ms);
        answer_reset(&pr->answer);
        return 0;
}

static int start_probe(struct proxy_context *p, unsigned key, unsigned pool, bool confirm);

static bool blames_no_key(enum upstream_failure failure) {
        return failure == UPSTREAM_FAILURE_CERTIFICATE || failure == UPSTREAM_FAILURE_TLS ||
               failure == UPSTREAM_FAILURE_DNS;
}

/* A transfer that got no answer, in the log. A TLS or DNS failure meets every request to its
 * provider alike: curl's full text is logged at most once per interval and provider, however
 * many requests meet it, and names no key. */
static void report_transport_failure(struct proxy_request *pr, const struct proxy_attempt_end *a, CURLcode res) {
        struct log_fields f;

        if (!blames_no_key(a->failure)) {
                f = fields(pr, pr->lease.key);
                /* libcurl's HTTP/2 race (decide_retry) is retried at once and hurts nobody: not
                 * worth a warning each time it happens under load. */
                log_event(a->failure == UPSTREAM_FAILURE_STREAM ? LOG_INFO : LOG_WARNING, "upstream_error", &f,
                          "upstream %s: %s", pr->provider->name, curl_easy_strerror(res));
                return;
        }
        if (!upstream_report_due(pr->ctx->w.upstream, pr->provider, clock_mono_ms(), TRANSPORT_REPORT_MS))
                return;
        f = fields(pr, KEYTABLE_NO_KEY);
        log_event(LOG_ERR, "upstream_error", &f, "%s failure reaching upstream %s: %s (no key is blamed; "
                  "reported once a minute)", a->failure == UPSTREAM_FAILURE_DNS ? "DNS" : "TLS",
                  pr->provider->name, a->failure_text);
}

/* The attempt's key refused the caller's path (d->confirm_auth): the refusal was counted, the
 * key keeps its state, and the pool's own probe of a known path is asked to decide
 * (probe_confirmed). One confirmation per key in flight or recently made: a caller repeating a
 * refused path must not turn each request into a second upstream request. */
static void confirm_refusal(struct proxy_request *pr, const struct proxy_decision *d) {
        struct proxy_context *p = pr->ctx;
        unsigned key = pr->lease.key;
        struct confirm *c = &p->confirms[key % CONFIRMS];
        int64_t now = clock_mono_ms();
        struct log_fields f = fields(pr, key);

        pr->auth_suspected = true;
        if (c->at_ms == 0 || c->key != key || now - c->at_ms >= CONFIRM_PERIOD_MS) {
                if (start_probe(p, key, pr->pool, true) >= 0)
                        *c = (struct confirm) { .key = key, .at_ms = now };
        }
        f.status = pr->answer.stream_error_status ? pr->answer.stream_error_status : pr->answer.status;
        log_event(LOG_NOTICE, "refused", &f, "answer %d on the caller's path: the key stays as it is "
                  "until its probe confirms%s", f.status,
                  d->next == PROXY_NEXT_ROTATE ? "" : "; the answer goes to the caller");
}

/* Which timeout a transfer curl ended as timed out met: the watchdog's, else curl's own
 * (connect_timeout, or the time left to the request, or upstream_timeout as a last bound). */
static enum proxy_timeout timeout_kind(const struct proxy_request *pr, CURL *easy, int64_t now) {
        curl_off_t connected = 0;

        if (pr->timed_out)
                return pr->timed_out;
        if (now >= pr->end_ms)
                return PROXY_TIMEOUT_REQUEST;
        if (!pr->head_ms && easy && curl_easy_getinfo(easy, CURLINFO_CONNECT_TIME_T, &connected) == CURLE_OK &&
            connected == 0)
                return PROXY_TIMEOUT_CONNECT;
        return pr->head_ms ? PROXY_TIMEOUT_IDLE : PROXY_TIMEOUT_FIRST_BYTE;
}

/* A transfer curl called complete that HTTP says is not: the head never ended (the upstream
 * closed mid-head), or the body fell short of its Content-Length. Either would otherwise be
 * relayed as a success, empty or truncated. NULL when the answer is whole. */
static const char *incomplete_answer(const struct proxy_request *pr, CURL *easy) {
        curl_off_t expected = -1, got = 0;

        if (pr->answer.mode == ANSWER_HEADERS)
                return "the upstream closed the connection before its answer's head ended";
        if (easy && curl_easy_getinfo(easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &expected) == CURLE_OK &&
            expected >= 0 && curl_easy_getinfo(easy, CURLINFO_SIZE_DOWNLOAD_T, &got) == CURLE_OK && got < expected)
                return "the upstream closed the connection before the end of its answer's body";
        return NULL;
}

static void attempt_ended(struct proxy_request *pr, CURL *easy, CURLcode res);

bool proxy_answer_stands(CURLcode res, bool head_arrived, int64_t expected, int64_t got) {
        return res == CURLE_HTTP2_STREAM && head_arrived && expected >= 0 && got == expected;
}

/* See proxy_answer_stands. */
static bool whole_answer_despite(const struct proxy_request *pr, CURL *easy, CURLcode res) {
        curl_off_t expected = -1, got = -1;

        if (res != CURLE_HTTP2_STREAM || !easy ||
            curl_easy_getinfo(easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &expected) != CURLE_OK ||
            curl_easy_getinfo(easy, CURLINFO_SIZE_DOWNLOAD_T, &got) != CURLE_OK)
                return false;
        return proxy_answer_stands(res, pr->answer.mode != ANSWER_HEADERS, expected, got);
}

/* An answer that broke HTTP, in the log, on the key that served it. */
static void report_bad_answer(struct proxy_request *pr, const struct proxy_attempt_end *a) {
        struct log_fields f = fields(pr, pr->last_key);

        f.status = pr->answer.status;
        log_event(LOG_WARNING, "upstream_error", &f, "upstream %s: broken answer: %s", pr->provider->name,
                  a->failure_text);
}

static void on_done(CURL *easy, CURLcode res, void *userdata) {
        struct proxy_request *pr = userdata;

        /* The client left inside a callback: the attempt's outcome is not the key's doing. */
        if (pr->aborted) {
                drop(pr);
                return;
        }
        attempt_ended(pr, easy, res);
}

/* The attempt's watchdog: the answer's head must come within first_byte_timeout, the body may
 * fall silent for idle_timeout at most (a transfer paused because the client reads slowly is
 * not silent), and nothing outlives request_timeout. curl has no timeout of its own for the
 * first two, and its low-speed limit would also count the wait for the head. */
static int on_watchdog(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_request *pr = userdata;
        int64_t now = clock_mono_ms();
        CURL *easy = pr->easy;

        if (now >= pr->end_ms)
                pr->timed_out = PROXY_TIMEOUT_REQUEST;
        else if (!pr->head_ms && now >= pr->attempt_started_ms + pr->first_byte_ms)
                pr->timed_out = PROXY_TIMEOUT_FIRST_BYTE;
        else if (pr->head_ms && !pr->paused && now >= pr->last_byte_ms + pr->idle_ms)
                pr->timed_out = PROXY_TIMEOUT_IDLE;
        if (!pr->timed_out) {
                watchdog_set(pr);
                return 0;
        }
        /* Outside curl's callbacks: the transfer can be taken out here, and its handle (cut
         * mid-transfer) is not kept for reuse. */
        upstream_cancel(pr->ctx->w.upstream, easy);
        pr->easy = NULL;
        attempt_ended(pr, easy, CURLE_OPERATION_TIMEDOUT);
        curl_easy_cleanup(easy);
        return 0;
}

/* Arms the attempt's watchdog at its first due time. */
static int watchdog_start(struct proxy_request *pr) {
        return step_timer_arm(pr, (uint64_t) watchdog_due(pr, pr->attempt_started_ms) * 1000);
}

/* One attempt's end, whoever saw it (curl, or the watchdog): judged, recorded on the key, and
 * carried out as proxy_decide says. easy is the attempt's handle, still readable. */
static void attempt_ended(struct proxy_request *pr, CURL *easy, CURLcode res) {
        const struct config_retry *rc = &pr->ctx->w.config->retry;
        const struct proxy_limits limits = {
                .max_attempts = rc->max_attempts, .max_transient = rc->max_attempts,
                .backoff_initial_ms = rc->backoff_initial_ms, .backoff_max_ms = rc->backoff_max_ms,
        };
        struct proxy_attempt_end a = {};
        struct proxy_decision d;
        struct verdict v = {};
        int64_t now = clock_mono_ms();
        const char *incomplete;
        bool no_answer;

        if (whole_answer_despite(pr, easy, res))
                res = CURLE_OK;
        no_answer = res != CURLE_OK && !pr->retry_from_stream;
        incomplete = res == CURLE_OK ? incomplete_answer(pr, easy)
                   : res == CURLE_PARTIAL_FILE && !pr->timed_out
                   ? "the upstream closed the connection before the end of its answer's body" : NULL;

        keytable_observe_latency(pr->ctx->w.table, pr->ctx->w.slot, pr->pool, now - pr->attempt_started_ms);
        a.bytes_sent = pr->conn && http_conn_stream_started(pr->conn);
        a.time_left_ms = pr->end_ms - now;
        if (pr->easy) {
                easy_put(pr->ctx, pr->easy);
                pr->easy = NULL;
        }
        /* The watchdog's timer belongs to the attempt. */
        step_timer_off(pr);
        wipe_auth(pr);
        pr->paused = pr->pressure = false;

        if (pr->bad_answer || incomplete) {
                /* A transient failure of the upstream's, like a reset connection. */
                a.result = PROXY_RESULT_BAD_ANSWER;
                a.failure = UPSTREAM_FAILURE_OTHER;
                a.failure_text = pr->bad_answer ? pr->bad_answer : incomplete;
                v.cls = VERDICT_TRANSIENT;
                pr->transport_error = a.failure_text;
                no_answer = true;
        } else if (no_answer) {
                a.result = res == CURLE_OPERATION_TIMEDOUT ? PROXY_RESULT_TIMEOUT : PROXY_RESULT_NO_ANSWER;
                a.failure = upstream_failure_class(res);
                a.failure_text = pr->timed_out ? "" : upstream_error_text(pr->ctx->w.upstream);
                if (!a.failure_text[0])
                        a.failure_text = curl_easy_strerror(res);
                if (a.result == PROXY_RESULT_TIMEOUT)
                        a.timeout = timeout_kind(pr, easy, now);
                /* A TLS or DNS failure is the upstream's configuration (or the network's), never
                 * a key's: the lease goes back unjudged. So is the request's own time running out,
                 * and a silence after the client already had bytes: the key answered, and the
                 * cut stream is the caller's to retry. And so is libcurl failing an HTTP/2
                 * stream the server closed (decide_retry). */
                v.cls = blames_no_key(a.failure) || a.failure == UPSTREAM_FAILURE_STREAM ||
                        a.timeout == PROXY_TIMEOUT_REQUEST ||
                        (a.timeout == PROXY_TIMEOUT_IDLE && a.bytes_sent) ? VERDICT_NONE : VERDICT_TRANSIENT;
                pr->transport_error = curl_easy_strerror(res);
        } else {
                a.result = pr->retry_from_stream ? PROXY_RESULT_HELD_ERROR
                         : pr->answer.mode == ANSWER_STREAM ? PROXY_RESULT_STREAM : PROXY_RESULT_ANSWER;
                judge(pr, &v);
                /* Every proxied path is the caller's choice: a refusal of it is counted on the
                 * key but disables nothing until the pool's own probe confirms it. */
                v.unconfirmed = v.cls == VERDICT_AUTH;
                /* A success: count the tokens it reported. */
                if (a.result == PROXY_RESULT_STREAM && !pr->answer.stream_error_status)
                        answer_count_usage(&pr->answer);
        }
        release(pr, &v);
        pr->transport_error = NULL;
        if (a.result == PROXY_RESULT_BAD_ANSWER)
                report_bad_answer(pr, &a);
        else if (no_answer)
                report_transport_failure(pr, &a, res);
        if (no_answer || (v.cls == VERDICT_TRANSIENT && a.result != PROXY_RESULT_STREAM)) {
                pr->transient_failures++;
                /* Only a retry needs randomness: no syscall on the way of a success. */
                (void) !getrandom(&a.random, sizeof a.random, GRND_NONBLOCK);
        }
        a.cls = v.cls;
        a.retry_after_ms = v.retry_after_ms;
        a.client_gone = !pr->conn;
        a.attempts = pr->attempts;
        a.transient_failures = pr->transient_failures;
        a.auth_unconfirmed = v.unconfirmed;
        a.refused_before = pr->auth_suspected;
        a.other_keys = pr->cpool->n_keys > 1;

        proxy_decide(&a, &limits, &d);
        if (d.confirm_auth)
                confirm_refusal(pr, &d);
        switch (d.next) {
        case PROXY_NEXT_ROTATE:
                rotate(pr, v.cls);
                break;
        case PROXY_NEXT_RETRY:
                pr->http1 |= d.http1;
                if (backoff(pr, d.delay_ms, no_answer) < 0) {
                        d.next = d.otherwise;
                        request_finish(pr, &d);
                }
                break;
        default:
                request_finish(pr, &d);
                break;
        }
}

static void enqueue(struct proxy_request *pr) {
        struct proxy_context *p = pr->ctx;
        struct proxy_queue *q = &p->queues[pr->pool];

        set_step(pr, STEP_WAITING);
        /* Tickets only grow, so the queue stays in ticket order and its head is its oldest. */
        pr->ticket = keytable_wait_ticket(p->w.table, p->w.slot, pr->pool);
        pr->queue_next = NULL;
        pr->queue_prev = q->tail;
        if (q->tail)
                q->tail->queue_next = pr;
        else
                q->head = pr;
        q->tail = pr;
        p->waiting++;
        keytable_slot_set_waiters(p->w.table, p->w.slot, p->waiting);
        keytable_slot_set_wait_head(p->w.table, p->w.slot, pr->pool, q->head->ticket);
}


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
                if (step_timer_arm(pr, (uint64_t) pr->deadline_ms * 1000) < 0) {
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
        struct upstream_route route;
        const char *secret;
        int64_t left;
        int r;

        *ret_wait = (struct keytable_wait) {};
        left = pr->end_ms - clock_mono_ms();
        if (left <= 0) {
                request_timed_out(pr);
                return 1;
        }
        r = keytable_acquire_waiter(p->w.table, p->w.slot, pr->pool, clock_mono_ms(), pr->last_key,
                                    pr->ticket, &pr->lease, ret_wait, &change);
        if (change.changed)
                log_change(pr, &change, NULL);
        if (r == -EAGAIN)
                return 0;
        if (r < 0) {
                fail(pr, 503, "worker_busy", 1, "this worker has too many requests in flight");
                return 1;
        }

        /* It has a key: out of the queue, and its waiting deadline no longer applies. */
        set_step(pr, STEP_RUNNING);
        pr->leased = true;
        pr->attempts++;
        pr->attempt_started_ms = clock_mono_ms();
        pr->head_ms = pr->last_byte_ms = 0;
        pr->timed_out = PROXY_TIMEOUT_NONE;
        pr->bad_answer = NULL;
        note_rotation(pr, pr->lease.key);
        secret = config_pool_key(pr->cpool, pr->first_key, pr->lease.key)->secret;

        auth_line(prov, secret, pr->auth, pr->auth_size);

        pr->easy = easy_get(p);
        if (!pr->easy) {
                fail(pr, 500, "internal_error", 0, "out of memory");
                return 1;
        }
        curl_easy_setopt(pr->easy, CURLOPT_URL, pr->url);
        curl_easy_setopt(pr->easy, CURLOPT_POSTFIELDS, pr->body);
        curl_easy_setopt(pr->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) pr->body_len);
        curl_easy_setopt(pr->easy, CURLOPT_HTTPHEADER, pr->headers);
        curl_easy_setopt(pr->easy, CURLOPT_HEADERDATA, pr);
        curl_easy_setopt(pr->easy, CURLOPT_WRITEDATA, pr);
        /* curl bounds the connection and, as a backstop to the watchdog, the whole attempt:
         * never past the request's end, nor upstream_timeout. */
        curl_easy_setopt(pr->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) (pr->connect_ms < left ? pr->connect_ms : left));
        if (left > (int64_t) p->w.config->upstream_timeout * 1000)
                left = (int64_t) p->w.config->upstream_timeout * 1000;
        curl_easy_setopt(pr->easy, CURLOPT_TIMEOUT_MS, (long) left);
        /* A stream holds curl's receive buffer for as long as it lasts (see curlmem.h). */
        curl_easy_setopt(pr->easy, CURLOPT_BUFFERSIZE,
                         (long) (pr->stream ? CURLMEM_STREAM_RECV_BUFFER : CURLMEM_RECV_BUFFER));
        /* Over TLS curl copies the request into an upload buffer it frees (wiped) after every
         * transfer: as large as the request, not curl's 64 KiB (see curlmem.h). */
        curl_easy_setopt(pr->easy, CURLOPT_UPLOAD_BUFFERSIZE, curlmem_upload_buffer(pr->body_len));
        route = upstream_configure(p->w.upstream, pr->easy, prov, pr->body_len, pr->http1);

        if (watchdog_start(pr) < 0) {
                fail(pr, 500, "internal_error", 0, "cannot time the upstream transfer");
                return 1;
        }
        r = upstream_start(p->w.upstream, pr->easy, &route, on_done, pr);
        if (r < 0)
                fail(pr, 500, "internal_error", 0, "could not start the upstream transfer");
        return 1;
}

static void attempt(struct proxy_request *pr) {
        struct keytable_wait w;

        /* proxy_decide never asks for an attempt beyond the limit: this only guards it. */
        if (pr->attempts >= pr->ctx->w.config->retry.max_attempts) {
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

        set_step(pr, STEP_NEW);
        if (now >= pr->end_ms) {
                request_timed_out(pr);
                return 0;
        }
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
        for (unsigned i = 0; i < p->w.config->n_pools; i++)
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
        bool confirm;                   /* confirms a caller's 401/403 rather than a disable */
};

static size_t discard(char *data, size_t size, size_t nmemb, void *userdata) {
        return size * nmemb;
}

/* The answer to the probe a caller's 401/403 asked for (confirm_refusal): only now, with the
 * pool's own request to a known path refused too, is the key disabled for auth. */
static void probe_confirmed(struct proxy_context *p, unsigned key, const struct config_pool *cp, CURLcode res,
                            long status, const struct log_fields *f) {
        struct keytable_change change = {};
        struct keytable_event ev = {
                .wall_ms = clock_wall_ms(), .kind = HISTORY_DISABLE, .status = (int) status,
                .reason = KEY_REASON_AUTH,
        };

        if (res != CURLE_OK || (status != 401 && status != 403)) {
                log_event(LOG_INFO, "probe", f, "the key refused on a caller's path %s: it stays in service",
                          res == CURLE_OK && status >= 200 && status < 300 ? "works on the probe path"
                                                                          : "gave the probe no verdict");
                return;
        }
        if (keytable_disable(p->w.table, key, KEY_REASON_AUTH, clock_mono_ms(), &change) < 0 || !change.changed)
                return;
        snprintf(ev.pool, sizeof ev.pool, "%s", cp->name);
        if (f->key)
                snprintf(ev.key_from, sizeof ev.key_from, "%s", f->key);
        keytable_history_add(p->w.table, &ev);
        log_event(LOG_ERR, "disable", f, "key disabled: auth (status %ld, confirmed by a probe)", status);
}

static void on_probe_done(CURL *easy, CURLcode res, void *userdata) {
        struct probe *pb = userdata;
        struct proxy_context *p = pb->ctx;
        const struct config_pool *cp = &p->w.config->pools[pb->pool];
        const struct config_key *k;
        struct keytable_pool_view info;
        struct log_fields f = LOG_FIELDS_NONE;
        long status = 0;

        curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
        f.pool = cp->name;
        /* The probe was started on this worker's own bank (start_probe checks): a reload since
         * then does not move the key's row. */
        if (keytable_slot_pool_info(p->w.table, p->w.slot, pb->pool, &info) >= 0 &&
            (k = config_pool_key(cp, info.first_key, pb->key)))
                f.key = k->id;
        f.status = (int) status;
        if (pb->confirm)
                probe_confirmed(p, pb->key, cp, res, status, &f);
        else if (res == CURLE_OK && status >= 200 && status < 300) {
                struct keytable_change change = {};

                keytable_enable(p->w.table, pb->key, clock_mono_ms(), &change);
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
static int start_probe(struct proxy_context *p, unsigned key, unsigned pool, bool confirm) {
        const struct config_pool *cp;
        const struct config_provider *prov;
        const struct config_key *k;
        struct keytable_pool_view info;
        struct probe *pb;
        struct upstream_route route;
        char *auth;                     /* secret memory: a core dump never shows it */
        const char *secret;

        if (keytable_slot_bank(p->w.table, p->w.slot) != keytable_bank_current(p->w.table))
                return -EAGAIN;
        if (pool >= p->w.config->n_pools)
                return -EINVAL;
        cp = &p->w.config->pools[pool];
        prov = &p->w.config->providers[cp->provider];
        if (keytable_slot_pool_info(p->w.table, p->w.slot, pool, &info) < 0 ||
            !(k = config_pool_key(cp, info.first_key, key)))
                return -EINVAL;
        secret = k->secret;
        pb = calloc(1, sizeof *pb);
        if (!pb)
                return -ENOMEM;
        pb->ctx = p;
        pb->key = key;
        pb->pool = pool;
        pb->confirm = confirm;
        auth = secmem_alloc(AUTH_LINE_MAX);
        if (auth) {
                auth_line(prov, secret, auth, AUTH_LINE_MAX);
                pb->headers = curl_slist_append(NULL, auth);
                (void) secmem_free(auth);               /* wipes */
        }
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
        curl_easy_setopt(pb->easy, CURLOPT_CONNECTTIMEOUT, (long) p->w.config->connect_timeout);
        curl_easy_setopt(pb->easy, CURLOPT_TIMEOUT, 30L);
        curl_easy_setopt(pb->easy, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(pb->easy, CURLOPT_PROTOCOLS_STR, "http,https");
        route = upstream_configure(p->w.upstream, pb->easy, prov, 0, false);
        if (upstream_start(p->w.upstream, pb->easy, &route, on_probe_done, pb) < 0)
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
        return start_probe(p, key, pool, false);
}

static int on_probe_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct proxy_context *p = userdata;
        unsigned key, pool;

        /* Probes concern the current configuration: a draining generation leaves them to the new
         * one. A handful per tick: probes are rare by design. */
        for (int i = 0; i < 8 && keytable_slot_bank(p->w.table, p->w.slot) == keytable_bank_current(p->w.table) &&
                        keytable_probe_claim(p->w.table, clock_mono_ms(), &key, &pool) == 0; i++)
                start_probe(p, key, pool, false);
        sd_event_source_set_time_relative(s, PROBE_PERIOD_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

/* --- entry points ------------------------------------------------------------------------ */

void proxy_on_abort(struct http_conn *c, void *request_data) {
        struct proxy_request *pr = request_data;

        pr->aborted = true;
        pr->conn = NULL;
        /* Inside a curl callback or on_done's own relay: whoever is on the stack finishes. */
        if (pr->in_curl)
                return;
        /* Waiting, backing off, or running (the transfer is cancelled): nothing more will
         * happen for it. */
        drop(pr);
}

void proxy_on_drain(struct http_conn *c, void *request_data) {
        struct proxy_request *pr = request_data;

        pr->pressure = false;
        if (pr->paused && !pr->in_curl && pr->easy) {
                pr->paused = false;
                upstream_resume(pr->ctx->w.upstream, pr->easy);
                /* Resuming delivers buffered data at once; if the client vanished meanwhile, curl
                 * stops watching the transfer's socket: end it here. */
                if (pr->aborted)
                        drop(pr);
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

int proxy_rewrite_model(const char *body, size_t body_len, const struct jscan_value *model,
                        const char *model_id, char **ret, size_t *ret_len) {
        size_t qlen = json_quote(model_id, NULL), start, end, ins, extra = 0, len;
        bool comma = false;
        char *text;

        if (model->type != JSCAN_NONE) {
                start = (size_t) (model->text - body);
                end = start + model->len;
                ins = 0;
        } else {
                /* Validated as an object: the first non-blank byte is its brace. */
                start = end = strspn(body, " \t\r\n") + 1;
                comma = body[start + strspn(body + start, " \t\r\n")] != '}';
                ins = strlen("\"model\":");
                extra = comma;
        }
        len = body_len - (end - start) + ins + qlen + extra;
        text = malloc(len + 1);
        if (!text)
                return -ENOMEM;
        memcpy(text, body, start);
        memcpy(text + start, "\"model\":", ins);
        json_quote(model_id, text + start + ins);
        if (comma)
                text[start + ins + qlen] = ',';
        memcpy(text + start + ins + qlen + extra, body + end, body_len - end);
        text[len] = 0;
        *ret = text;
        *ret_len = len;
        return 0;
}

/* The pool the request names: its X-Keypool-Pool field (header, NULL when it has none) wins over
 * the body's model. On success the body may have been rewritten (a pool name given as model
 * becomes the pool's model id). Returns 0, or answers the client and returns -1.
 *
 * The body is read once, by jscan: validated as a JSON object and its "model" found, with no
 * tree built and nothing allocated unless the model must be rewritten. */
static int route(struct proxy_request *pr, struct http_conn *c, const struct http_request *req,
                 const char *header) {
        const struct config *cfg = pr->ctx->w.config;
        static const char *const members[] = { "model", "stream" };
        struct keytable_pool_view info;
        struct jscan_value found[2], model;
        char model_buf[1024];
        const char *model_name = NULL;
        size_t model_len = 0;
        int pool = -1, r;

        if (jscan_object_members(req->body, req->body_len, members, 2, found) < 0) {
                http_conn_respond_error(c, 400, "invalid_request_error", "invalid_json", NULL, 0,
                                        "the request body must be a JSON object");
                return -1;
        }
        model = found[0];
        pr->stream = found[1].type == JSCAN_TRUE;
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
        if (keytable_slot_pool_info(pr->ctx->w.table, pr->ctx->w.slot, pr->pool, &info) < 0) {
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0,
                                        "the key table does not know pool %s", pr->cpool->name);
                return -1;
        }
        pr->first_key = info.first_key;

        /* The upstream knows models, not pool names: rewrite only when the client used a name
         * (or named no model at all). */
        if (!model_name || (strcmp(model_name, pr->cpool->model) != 0 && !header &&
                            strcmp(model_name, pr->cpool->name) == 0)) {
                if (proxy_rewrite_model(req->body, req->body_len, &model, pr->cpool->model, &pr->body,
                                        &pr->body_len) < 0) {
                        http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0,
                                                "out of memory");
                        return -1;
                }
                pr->own_body = true;
        } else {
                pr->body = req->body;
                pr->body_len = req->body_len;
        }
        return 0;
}

bool proxy_forwards_header(const struct config_provider *prov, const char *name) {
        if (is_dropped_request_header(name))
                return false;
        /* The provider's configured headers win over the client's. */
        for (unsigned k = 0; k < prov->n_headers; k++)
                if (answer_header_is(prov->headers[k], name))
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
        size_t auth_size = pr->ctx->queues[pr->pool].auth_size;
        size_t n = 1 + prov->n_headers + 2, text = auth_size + sizeof content_type + sizeof expect;
        bool has_content_type = false;
        uint64_t forwarded = 0;
        struct curl_slist *nodes;
        char *t;
        size_t k = 0;

        for (unsigned i = 0; i < prov->n_headers; i++)
                text += strlen(prov->headers[i]) + 1;
        text += strlen(prov->base_url) + 1 + strlen(rest) + 1;
        /* Which fields go is decided once (the first 64; any beyond are asked again below). */
        for (size_t i = 0; i < req->n_fields; i++)
                if (proxy_forwards_header(prov, req->fields[i].name)) {
                        if (i < 64)
                                forwarded |= UINT64_C(1) << i;
                        n++;
                        text += strlen(req->fields[i].name) + 2 + strlen(req->fields[i].value) + 1;
                }
        /* A recycled record's block is used again when it is large enough. */
        if (pr->headers_size < n * sizeof *nodes + text) {
                (void) secmem_free(pr->headers);
                pr->headers = NULL;
                pr->headers_size = 0;
                /* It holds the auth line: kept out of core dumps. */
                nodes = secmem_alloc(n * sizeof *nodes + text);
                if (!nodes)
                        return -ENOMEM;
                pr->headers_size = n * sizeof *nodes + text;
        } else
                nodes = pr->headers;
        t = (char *) (nodes + n);

        pr->auth = t;
        pr->auth_size = auth_size;
        pr->auth[0] = 0;
        nodes[k++].data = t;
        t += auth_size;
        for (unsigned i = 0; i < prov->n_headers; i++) {
                nodes[k++].data = strcpy(t, prov->headers[i]);
                t += strlen(t) + 1;
        }
        for (size_t i = 0; i < req->n_fields; i++) {
                const struct http_field *f = &req->fields[i];

                if (i < 64 ? !(forwarded & UINT64_C(1) << i) : !proxy_forwards_header(prov, f->name))
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

/* A timeout of the pool's (s) as the caller's header may shorten it (decimal seconds above 0;
 * anything else, or a longer value, leaves the pool's): in ms. */
/* keypool's own request fields, NULL when absent. */
struct own_fields {
        const char *pool, *connect_timeout, *first_byte_timeout, *idle_timeout, *timeout, *max_wait;
};

/* Each is looked up only when some field could be one: most requests carry none, and one look
 * at their fields' first letters says so. */
static void own_fields_read(const struct http_request *req, struct own_fields *ret) {
        *ret = (struct own_fields) {};
        for (size_t i = 0; i < req->n_fields; i++)
                if ((req->fields[i].name[0] | 0x20) == 'x') {
                        *ret = (struct own_fields) {
                                .pool = http_request_header(req, "X-Keypool-Pool"),
                                .connect_timeout = http_request_header(req, "X-Keypool-Connect-Timeout"),
                                .first_byte_timeout = http_request_header(req, "X-Keypool-First-Byte-Timeout"),
                                .idle_timeout = http_request_header(req, "X-Keypool-Idle-Timeout"),
                                .timeout = http_request_header(req, "X-Keypool-Timeout"),
                                .max_wait = http_request_header(req, "X-Keypool-Max-Wait"),
                        };
                        return;
                }
}

/* The pool's timeout, or the shorter one the request's field h asks for. */
static unsigned shortened_ms(const char *h, unsigned pool_s) {
        char *end;
        double s;

        if (h) {
                s = strtod(h, &end);
                if (end != h && *end == 0 && s > 0 && s < pool_s)
                        return s * 1000 >= 1 ? (unsigned) (s * 1000) : 1;
        }
        return pool_s * 1000;
}

/* How long this request may wait for a key: X-Keypool-Max-Wait, else max_wait. */
static int64_t max_wait_ms(const struct proxy_context *p, const char *h) {
        char *end;
        double s;

        if (h) {
                s = strtod(h, &end);
                if (end != h && *end == 0 && s >= 0 && s <= MAX_WAIT_CAP_S)
                        return (int64_t) (s * 1000);
        }
        return (int64_t) p->w.config->max_wait * 1000;
}

void proxy_handle(struct proxy_context *p, struct http_conn *c, const struct http_request *req) {
        struct own_fields own;
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
        if (p->active > p->peak_active)
                p->peak_active = p->active;
        set_step(pr, STEP_NEW);
        pr->answer.mode = ANSWER_HEADERS;
        pr->last_key = KEYTABLE_NO_KEY;
        pr->rotated_from = KEYTABLE_NO_KEY;
        pr->lease.key = KEYTABLE_NO_KEY;
        {
                char *e = put_decimal(pr->request_id, p->w.slot);

                *e++ = '-';
                *put_decimal(e, ++p->next_request_id) = 0;
        }

        /* Until the request is attached to c, failures answer c themselves. */
        own_fields_read(req, &own);
        if (route(pr, c, req, own.pool) < 0) {
                drop(pr);
                return;
        }
        if (build_request_headers(pr, req) < 0) {
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0, "out of memory");
                drop(pr);
                return;
        }
        pr->connect_ms = shortened_ms(own.connect_timeout, pr->cpool->connect_timeout);
        pr->first_byte_ms = shortened_ms(own.first_byte_timeout, pr->cpool->first_byte_timeout);
        pr->idle_ms = shortened_ms(own.idle_timeout, pr->cpool->idle_timeout);
        pr->end_ms = clock_mono_ms() + shortened_ms(own.timeout, pr->cpool->request_timeout);
        pr->deadline_ms = clock_mono_ms() + max_wait_ms(p, own.max_wait);
        /* Waiting for a key is part of the request's time. */
        if (pr->deadline_ms > pr->end_ms)
                pr->deadline_ms = pr->end_ms;
        pr->conn = c;
        http_conn_set_request_data(c, pr);
        attempt(pr);
}

/* Room for the auth line of a pool's longest key. Every open request holds its header block
 * (in secmem, a power-of-two slot) for as long as it lasts: sized for the largest secret any key
 * could have (4 KiB), the block of a stream took an 8 KiB slot where its keys need tens of
 * bytes. */
static size_t auth_size(const struct config_pool *pool) {
        size_t longest = 0;

        for (unsigned k = 0; k < pool->n_keys; k++) {
                size_t n = pool->keys[k].secret ? strlen(pool->keys[k].secret) : 0;

                if (n > longest)
                        longest = n;
        }
        return AUTH_PREFIX_SIZE + longest;
}

int proxy_new(const struct proxy_params *params, struct proxy_context **ret) {
        const struct config *cfg = params->config;
        struct proxy_context *p;
        int r;

        p = calloc(1, sizeof *p);
        if (!p)
                return -ENOMEM;
        *p = (struct proxy_context) {
                .w = *params,
                .policy = {
                        .recovery_ms = (int64_t) cfg->recovery_time * 1000,
                        .max_cooldown_ms = (int64_t) cfg->max_cooldown * 1000,
                        .phrases = (const char *const *) cfg->rate_limit_phrases,
                        .n_phrases = cfg->n_rate_limit_phrases,
                },
        };
        p->queues = calloc(cfg->n_pools ? cfg->n_pools : 1, sizeof *p->queues);
        if (!p->queues) {
                r = -ENOMEM;
                goto fail;
        }
        for (unsigned i = 0; i < cfg->n_pools; i++) {
                p->queues[i].ctx = p;
                p->queues[i].pool = i;
                p->queues[i].auth_size = auth_size(&cfg->pools[i]);
                r = sd_event_add_time(p->w.event, &p->queues[i].timer, CLOCK_MONOTONIC, 0, 1000, on_queue_timer,
                                      &p->queues[i]);
                if (r < 0)
                        goto fail;
                sd_event_source_set_enabled(p->queues[i].timer, SD_EVENT_OFF);
        }
        r = sd_event_add_defer(p->w.event, &p->kick, on_kick, p);
        if (r < 0)
                goto fail;
        sd_event_source_set_enabled(p->kick, SD_EVENT_OFF);
        r = scrub_from_config(cfg, &p->scrub);
        if (r < 0)
                goto fail;
        r = sd_event_add_time_relative(p->w.event, &p->probe_timer, CLOCK_MONOTONIC, PROBE_PERIOD_USEC, 0,
                                       on_probe_timer, p);
        if (r < 0)
                goto fail;
        r = sd_event_add_time_relative(p->w.event, &p->trim_timer, CLOCK_MONOTONIC, SPARE_TRIM_USEC,
                                       1000000, on_trim_timer, p);
        if (r < 0)
                goto fail;
        *ret = p;
        return 0;
fail:
        proxy_free(p);
        return r;
}

unsigned proxy_active(const struct proxy_context *p) {
        return p->active;
}

struct proxy_context *proxy_free(struct proxy_context *p) {
        if (!p)
                return NULL;
        if (p->queues)
                for (unsigned i = 0; i < p->w.config->n_pools; i++)
                        sd_event_source_disable_unref(p->queues[i].timer);
        free(p->queues);
        spares_trim(p, 0);
        free(p->spare);
        sd_event_source_disable_unref(p->kick);
        sd_event_source_disable_unref(p->probe_timer);
        sd_event_source_disable_unref(p->trim_timer);
        scrub_free(p->scrub);
        free(p);
        return NULL;
}
