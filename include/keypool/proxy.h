/* proxy.h — serving POST /v1/… through a pool's keys.
 *
 * Owns a proxied request from the client's complete request to the last byte of the answer:
 * choosing the pool, taking a key from the shared table, the upstream transfer, judging the answer
 * (policy) and moving to the next key when the answer says this key must rest, relaying the
 * answer (streamed as it arrives when it is a success), and recording the outcome on the key.
 */
#pragma once

#include "keypool/config.h"
#include "keypool/http.h"
#include "keypool/keytable.h"
#include "keypool/policy.h"
#include "keypool/upstream.h"

struct proxy_context {
        const struct config *config;
        struct keytable *table;
        struct upstream *upstream;
        unsigned slot;                  /* this worker's slot in the table */
        struct policy_config policy;
        unsigned active;                /* requests being served */
        uint64_t next_request_id;
};

/* Serves one POST /v1/… request on c. Always answers, now or later. */
void proxy_handle(struct proxy_context *p, struct http_conn *c, const struct http_request *req);

/* http_handler hooks for connections whose active request is a proxied one. */
void proxy_on_abort(struct http_conn *c, void *request_data);
void proxy_on_drain(struct http_conn *c, void *request_data);
