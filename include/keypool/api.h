/* api.h — keypool's own endpoints: health, status and key status as JSON.
 *
 * Read-only views of the shared table and the configuration, built with jansson. Nothing here
 * ever sees a secret: the table holds none, and only pool names and models are read from the
 * configuration.
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

#include "keypool/config.h"
#include "keypool/http.h"
#include "keypool/keytable.h"

struct api_context {
        const struct config *config;
        struct keytable *table;
        pid_t coordinator_pid;
};

/* Answers req if it is one of keypool's own endpoints (GET /health, /status, /api/key-status)
 * and returns true; returns false for anything else, leaving the request unanswered. */
bool api_handle(const struct api_context *a, struct http_conn *c, const struct http_request *req);

/* The JSON documents themselves (for the endpoints and for tests): a malloc'ed string. */
char *api_health_json(const struct api_context *a, int64_t now_ms, bool *ret_healthy);
char *api_status_json(const struct api_context *a, int64_t now_ms);
char *api_key_status_json(const struct api_context *a, int64_t now_ms, const char *pool_filter);
