/* proxy.h — serving POST /v1/… through a pool's keys.
 *
 * Owns a proxied request from the client's complete request to the last byte of the answer:
 * choosing the pool, taking a key from the shared table (or waiting, first come first served,
 * for one to recover), the upstream transfer, judging the answer (policy) and moving to the next
 * key when it says this key must rest or is dead, retrying transient failures with backoff,
 * relaying the answer (streamed as it arrives), and recording the outcome on the key. It also
 * probes disabled keys whose probe is due.
 */
#pragma once

#include <systemd/sd-event.h>

#include "keypool/conf.h"
#include "keypool/http.h"
#include "keypool/keytable.h"
#include "keypool/policy.h"
#include "keypool/upstream.h"

struct proxy_request;
struct proxy_queue;

#define PROXY_SPARE_HANDLES 32
#define PROXY_CONFIRMS 64               /* keys with a recent confirmation probe remembered */
#define PROXY_CONFIRM_PERIOD_MS 10000   /* … and how long one stands for its key */

struct scrub;

/* A probe started to confirm a caller's 401/403 on a key (see proxy.c suspect_auth). */
struct proxy_confirm {
        unsigned key;
        int64_t at_ms;                  /* 0: none */
};

struct proxy_context {
        const struct config *config;
        struct keytable *table;
        struct upstream *upstream;
        sd_event *event;
        unsigned slot;                  /* this worker's slot in the table */
        const int *wake_fds;            /* one eventfd per slot: wakes that slot's waiters */
        unsigned n_wake_fds;
        struct policy_config policy;
        unsigned active;                /* requests being served (waiting ones included) */
        unsigned waiting;               /* requests queued for a key */
        uint64_t next_request_id;
        struct proxy_queue *queues;     /* one per pool */
        sd_event_source *kick;          /* deferred: serve the queues */
        sd_event_source *probe_timer;
        unsigned probes;                /* probes in flight */
        CURL *spare[PROXY_SPARE_HANDLES]; /* finished transfers' handles, set up for the next */
        unsigned n_spare;
        struct proxy_request *spare_requests; /* finished requests' records, for the next */
        unsigned n_spare_requests;
        struct scrub *scrub;            /* hides the configured secrets in upstream text */
        struct proxy_confirm confirms[PROXY_CONFIRMS];
};

/* Sets up queues, timers and the probe schedule for a worker's event loop. */
int proxy_init(struct proxy_context *p);
void proxy_done(struct proxy_context *p);

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
