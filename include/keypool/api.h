/* api.h — keypool's own endpoints: health, status, key status, history, metrics, admin.
 *
 * Read-only views of the shared table built with jansson (Prometheus text for /metrics), and the
 * operator's actions on keys and state. Nothing here ever sees a secret: the table holds none,
 * and only pool names and models are read from the configuration.
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

#include "keypool/conf.h"
#include "keypool/http.h"
#include "keypool/keytable.h"

struct proxy_context;

struct api_context {
        const struct config *config;
        struct keytable *table;
        struct proxy_context *proxy;    /* for operator probes; may be NULL */
        pid_t coordinator_pid;
};

/* Answers req if it is one of keypool's own endpoints and returns true; returns false for
 * anything else, leaving the request unanswered. admin: may this caller use admin actions? */
bool api_handle(const struct api_context *a, struct http_conn *c, const struct http_request *req, bool admin);

/* The documents themselves (for the endpoints and for tests): malloc'ed strings, NULL on failure. */
/* GET /api/cluster: this node, whether it talks to Redis, and the live nodes with what each last
 * reported. {"enabled": false, "state": "off", …} on a single host. */
char *api_cluster_json(const struct api_context *a);
char *api_health_json(const struct api_context *a, int64_t now_ms, bool *ret_healthy);
char *api_status_json(const struct api_context *a, int64_t now_ms);
/* NULL with *ret_unknown set when pool_filter names no pool. */
char *api_key_status_json(const struct api_context *a, int64_t now_ms, const char *pool_filter, bool *ret_unknown);
char *api_history_json(const struct api_context *a, unsigned limit, const char *pool, const char *key);
char *api_metrics_text(const struct api_context *a, int64_t now_ms);
/* The table's consistency check (keytable_check) as JSON: "ok", "problems", and the counts. */
char *api_check_json(const struct api_context *a);
