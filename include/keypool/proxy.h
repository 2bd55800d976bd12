/* proxy.h — serving POST /v1/… through a pool's keys.
 *
 * Owns a proxied request from the client's complete request to the last byte of the answer:
 * choosing the pool, taking a key from the shared table (or waiting, first come first served,
 * for one to recover), the upstream transfer, judging the answer (policy) and moving to the next
 * key when it says this key must rest or is dead, retrying transient failures with backoff,
 * relaying the answer (streamed as it arrives), and recording the outcome on the key. It also
 * probes disabled keys whose probe is due. The worker sees only an opaque proxy_context.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <systemd/sd-event.h>

#include "keypool/conf.h"
#include "keypool/http.h"
#include "keypool/jscan.h"
#include "keypool/keytable.h"
#include "keypool/upstream.h"
#include "keypool/verdict.h"

struct proxy_context;

/* What a worker lends its proxy; everything must outlive the proxy_context. */
struct proxy_params {
        const struct config *config;
        struct keytable *table;
        struct upstream *upstream;
        sd_event *event;
        unsigned slot;                  /* this worker's slot in the table */
        const int *wake_fds;            /* one eventfd per slot: wakes that slot's waiters */
        unsigned n_wake_fds;
};

/* Sets up queues, timers and the probe schedule on params->event. 0, or -errno. */
int proxy_new(const struct proxy_params *params, struct proxy_context **ret);
/* Frees p and what it keeps for reuse; requests still in flight must be gone. Returns NULL. */
struct proxy_context *proxy_free(struct proxy_context *p);

/* Requests being served, waiting ones included (a draining worker exits at 0). */
unsigned proxy_active(const struct proxy_context *p);

/* Serves one POST /v1/… request on c. Always answers, now or later. */
void proxy_handle(struct proxy_context *p, struct http_conn *c, const struct http_request *req);

/* Probes key (a table-wide row of the current bank, in pool) now, as an operator asked.
 * -EAGAIN when this worker serves an older configuration during a reload. */
int proxy_probe(struct proxy_context *p, unsigned key, unsigned pool);

/* Another worker freed a key (or one was enabled): try the waiting requests again. */
void proxy_wake(struct proxy_context *p);

/* http_handler hooks for connections whose active request is a proxied one. */
void proxy_on_abort(struct http_conn *c, void *request_data);
void proxy_on_drain(struct http_conn *c, void *request_data);

/* --- what an attempt's end means ----------------------------------------------------------
 * A pure function of the attempt's outcome, so that every case is pinned down by a unit test;
 * the proxy carries the decision out in one place. */

enum proxy_result {
        PROXY_RESULT_ANSWER = 1,        /* a complete non-success answer, kept whole to judge */
        PROXY_RESULT_STREAM,            /* a success, relayed as it arrived */
        PROXY_RESULT_HELD_ERROR,        /* an SSE stream whose first event was an error; held */
        PROXY_RESULT_NO_ANSWER,         /* the transfer failed (connect, reset, TLS, DNS, …) */
        PROXY_RESULT_TIMEOUT,           /* … or ran out of time (which timeout: timeout) */
        PROXY_RESULT_BAD_ANSWER,        /* the answer broke HTTP: closed mid-head, a body short of
                                         * its Content-Length, a status out of 100..599, headers
                                         * beyond the limit */
        _PROXY_RESULT_MAX,
};

/* Which of the pool's timeouts ended an attempt (PROXY_RESULT_TIMEOUT). */
enum proxy_timeout {
        PROXY_TIMEOUT_NONE = 0,
        PROXY_TIMEOUT_CONNECT,          /* no connection within connect_timeout */
        PROXY_TIMEOUT_FIRST_BYTE,       /* no answer head within first_byte_timeout */
        PROXY_TIMEOUT_IDLE,             /* a silence inside the body beyond idle_timeout */
        PROXY_TIMEOUT_REQUEST,          /* the whole request's request_timeout passed */
        _PROXY_TIMEOUT_MAX,
};

struct proxy_attempt_end {
        enum proxy_result result;
        enum verdict_class cls;         /* the verdict (TRANSIENT when there was no answer, NONE
                                         * when the failure blames no key) */
        enum upstream_failure failure;  /* NO_ANSWER: which transport failure; INVALID: none said */
        const char *failure_text;       /* … curl's full text of it (BAD_ANSWER: what was
                                         * wrong), or NULL */
        enum proxy_timeout timeout;     /* TIMEOUT: which one */
        int64_t time_left_ms;           /* until the request's request_timeout; <= 0: passed */
        int64_t retry_after_ms;         /* the verdict's retry hint, 0 when none */
        bool client_gone;
        bool bytes_sent;                /* the client has already seen bytes of this answer */
        bool auth_unconfirmed;          /* AUTH on a path the caller chose: the pool's own probe
                                         * has not confirmed that the key is refused */
        bool refused_before;            /* an earlier attempt of this request was refused so */
        bool other_keys;                /* the pool has another key to move to */
        unsigned attempts;              /* attempts made, this one included */
        unsigned transient_failures;    /* transient failures so far, this one included */
        uint32_t random;                /* any value: the backoff's jitter */
};

struct proxy_limits {
        unsigned max_attempts;          /* attempts per request, rotations and retries together */
        unsigned max_transient;         /* transient failures a request may retry after */
        unsigned backoff_initial_ms;
        unsigned backoff_max_ms;
};

enum proxy_next {
        PROXY_NEXT_ROTATE = 1,          /* another key, at once */
        PROXY_NEXT_RETRY,               /* again after delay_ms (another key when one is ready);
                                         * never when the delay would outlast request_timeout */
        PROXY_NEXT_STREAM_END,          /* the relayed answer ends (held bytes go first) */
        PROXY_NEXT_ANSWER,              /* the kept answer goes to the client as it came */
        PROXY_NEXT_CUT,                 /* bytes already went out: close the connection */
        PROXY_NEXT_FAIL,                /* keypool's own error answer: status, code, message */
        PROXY_NEXT_DROP,                /* nothing (more) to send: the client is gone */
        _PROXY_NEXT_MAX,
};

struct proxy_decision {
        enum proxy_next next;
        enum proxy_next otherwise;      /* RETRY: what to do when the retry cannot be scheduled */
        int64_t delay_ms;               /* RETRY */
        int status;                     /* FAIL (next or otherwise) */
        const char *code;
        const char *message;
        const char *detail;             /* FAIL: what follows the message (curl's text), or NULL */
        int64_t retry_after_s;          /* FAIL: a Retry-After for the client, 0 for none */
        bool confirm_auth;              /* probe the key: only a refusal of the pool's own
                                         * request disables it (whatever next is) */
        bool http1;                     /* RETRY: the next attempt goes over HTTP/1.1 */
};

void proxy_decide(const struct proxy_attempt_end *a, const struct proxy_limits *l,
                  struct proxy_decision *ret);

/* --- the request as it goes upstream (pure) ---------------------------------------------- */

/* The body with its top-level "model" (as jscan found it in body, or JSCAN_NONE) set to
 * model_id: the value replaced where it stands, or a member added first. Nothing else changes,
 * not even spacing. On success *ret is a new NUL-terminated text of *ret_len bytes; -ENOMEM. */
int proxy_rewrite_model(const char *body, size_t body_len, const struct jscan_value *model,
                        const char *model_id, char **ret, size_t *ret_len);

/* Does an attempt that curl ended with res still have its whole answer? Only for
 * CURLE_HTTP2_STREAM after an answer whose head arrived and whose Content-Length (expected, -1
 * when unknown) has arrived in full (got): an HTTP/2 server may answer and end its stream before
 * it has read the request's body, and libcurl 7.88 then fails the transfer when it goes on to
 * send the body, although it has handed over the whole answer. Pure. */
bool proxy_answer_stands(CURLcode res, bool head_arrived, int64_t expected, int64_t got);

/* Does a client header go upstream as it is? Not when it belongs to one connection, is one
 * keypool sets itself, could carry the client's own credentials, or is one of prov's headers. */
bool proxy_forwards_header(const struct config_provider *prov, const char *name);
