/* api.c — keypool's own endpoints: health, status and key status as JSON.
 *
 * Every document is built from snapshots copied out of the shared table under each pool's lock,
 * so a reader never holds a lock while formatting or writing.
 */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "keypool/api.h"
#include "keypool/clock.h"

static json_t *json_nullable_string(const char *s) {
        return s ? json_string(s) : json_null();
}

static char *dump(json_t *j) {
        char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;

        json_decref(j);
        return s;
}

static int64_t ceil_seconds(int64_t ms) {
        return ms <= 0 ? 0 : (ms + 999) / 1000;
}

static json_t *key_json(const struct keytable_key_view *k, int64_t now_ms) {
        json_t *j = json_object();

        json_object_set_new(j, "id", json_string(k->id));
        json_object_set_new(j, "masked", json_string(k->masked));
        json_object_set_new(j, "state", json_string(keytable_state_name(k->state)));
        json_object_set_new(j, "reason", json_nullable_string(
                                    k->state == KEY_READY ? NULL : keytable_reason_name(k->reason)));
        json_object_set_new(j, "cooldown_remaining_s", json_integer(
                                    k->state == KEY_COOLING ? ceil_seconds(k->cooldown_until_ms - now_ms) : 0));
        json_object_set_new(j, "requests", json_integer((json_int_t) k->requests));
        json_object_set_new(j, "successes", json_integer((json_int_t) k->successes));
        json_object_set_new(j, "rate_limited", json_integer((json_int_t) k->rate_limited));
        json_object_set_new(j, "failures", json_integer((json_int_t) k->failures));
        json_object_set_new(j, "last_status", k->last_status ? json_integer(k->last_status) : json_null());
        json_object_set_new(j, "last_class", json_nullable_string(verdict_class_name(k->last_class)));
        json_object_set_new(j, "in_flight", json_integer(k->in_flight));
        json_object_set_new(j, "consecutive_failures", json_integer(k->consecutive_failures));
        json_object_set_new(j, "last_used_s_ago", k->last_used_ms
                            ? json_integer(ceil_seconds(now_ms - k->last_used_ms)) : json_null());
        json_object_set_new(j, "tokens_in", json_integer((json_int_t) k->tokens_in));
        json_object_set_new(j, "tokens_out", json_integer((json_int_t) k->tokens_out));
        json_object_set_new(j, "max_concurrent", json_integer(k->max_concurrent));
        json_object_set_new(j, "rpm", json_integer(k->rpm));
        return j;
}

/* Copies one pool's keys; returns NULL on failure. */
static struct keytable_key_view *snapshot(const struct api_context *a, unsigned pool, int64_t now_ms,
                                          struct keytable_pool_view *ret_info) {
        struct keytable_key_view *keys = NULL;

        return keytable_pool_read_alloc(a->table, pool, now_ms, ret_info, &keys) < 0 ? NULL : keys;
}

char *api_key_status_json(const struct api_context *a, int64_t now_ms, const char *pool_filter) {
        json_t *root = json_object(), *pools = json_array();

        json_object_set_new(root, "pools", pools);
        for (unsigned p = 0; p < keytable_n_pools(a->table); p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys;
                json_t *pj, *kj;

                keys = snapshot(a, p, now_ms, &info);
                if (!keys) {
                        json_decref(root);
                        return NULL;
                }
                if (pool_filter && strcmp(pool_filter, info.name) != 0) {
                        free(keys);
                        continue;
                }
                pj = json_object();
                kj = json_array();
                json_object_set_new(pj, "name", json_string(info.name));
                json_object_set_new(pj, "model", json_string(info.model));
                /* Every key limited at once: more keys of the same account add nothing. */
                json_object_set_new(pj, "account_limit_suspected",
                                    json_boolean(info.account_limit_until_ms > now_ms));
                for (unsigned i = 0; i < info.n_keys; i++)
                        json_array_append_new(kj, key_json(&keys[i], now_ms));
                json_object_set_new(pj, "keys", kj);
                json_array_append_new(pools, pj);
                free(keys);
        }
        return dump(root);
}

char *api_health_json(const struct api_context *a, int64_t now_ms, bool *ret_healthy) {
        json_t *root = json_object(), *pools = json_array();
        bool healthy = true;

        for (unsigned p = 0; p < keytable_n_pools(a->table); p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys;
                unsigned ready = 0;
                json_t *pj;

                keys = snapshot(a, p, now_ms, &info);
                if (!keys) {
                        json_decref(root);
                        json_decref(pools);
                        return NULL;
                }
                for (unsigned i = 0; i < info.n_keys; i++)
                        ready += keys[i].state == KEY_READY;
                free(keys);
                if (ready == 0)
                        healthy = false;
                pj = json_object();
                json_object_set_new(pj, "name", json_string(info.name));
                json_object_set_new(pj, "ready", json_integer(ready));
                json_object_set_new(pj, "keys", json_integer(info.n_keys));
                json_array_append_new(pools, pj);
        }
        json_object_set_new(root, "status", json_string(healthy ? "ok" : "degraded"));
        json_object_set_new(root, "pools", pools);
        *ret_healthy = healthy;
        return dump(root);
}

char *api_status_json(const struct api_context *a, int64_t now_ms) {
        struct keytable_worker_view views[256];
        json_t *root = json_object(), *workers = json_array();
        uint64_t requests = 0;
        unsigned n;

        n = keytable_workers(a->table, views, sizeof views / sizeof views[0]);
        for (unsigned i = 0; i < n; i++) {
                json_t *w = json_object();

                json_object_set_new(w, "pid", json_integer(views[i].pid));
                json_object_set_new(w, "slot", json_integer(views[i].slot));
                json_object_set_new(w, "generation", json_integer(views[i].generation));
                json_object_set_new(w, "stage", json_string(keytable_stage_name(views[i].stage)));
                json_object_set_new(w, "heartbeat_age_ms", json_integer(now_ms - views[i].heartbeat_ms));
                json_object_set_new(w, "requests", json_integer((json_int_t) views[i].requests));
                json_object_set_new(w, "in_flight", json_integer(views[i].in_flight));
                json_array_append_new(workers, w);
                requests += views[i].requests;
        }
        json_object_set_new(root, "version", json_string(PACKAGE_VERSION));
        json_object_set_new(root, "uptime_s", json_integer((now_ms - keytable_created_ms(a->table)) / 1000));
        json_object_set_new(root, "pid", json_integer(a->coordinator_pid));
        json_object_set_new(root, "workers", workers);
        json_object_set_new(root, "requests", json_integer((json_int_t) requests));
        json_object_set_new(root, "pools", json_integer(keytable_n_pools(a->table)));
        json_object_set_new(root, "keys", json_integer(keytable_n_keys(a->table)));
        json_object_set_new(root, "repairs", json_integer((json_int_t) keytable_repairs(a->table)));
        return dump(root);
}

static void respond_json(struct http_conn *c, int status, char *json) {
        static const struct http_header h[] = { { "Content-Type", "application/json" } };

        if (!json) {
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0,
                                        "out of memory");
                return;
        }
        http_conn_respond(c, status, h, 1, json, strlen(json));
        free(json);
}

/* Splits "/path?query" into the path length and an optional pool=NAME value. */
static size_t path_len(const char *url) {
        const char *q = strchr(url, '?');

        return q ? (size_t) (q - url) : strlen(url);
}

static bool path_is(const char *url, const char *path) {
        size_t n = path_len(url);

        return n == strlen(path) && strncmp(url, path, n) == 0;
}

static char *query_param(const char *url, const char *name) {
        const char *q = strchr(url, '?');
        size_t nlen = strlen(name);

        while (q && *q) {
                q++;
                if (strncmp(q, name, nlen) == 0 && q[nlen] == '=') {
                        const char *v = q + nlen + 1;
                        return strndup(v, strcspn(v, "&"));
                }
                q = strchr(q, '&');
        }
        return NULL;
}

bool api_handle(const struct api_context *a, struct http_conn *c, const struct http_request *req) {
        int64_t now = clock_mono_ms();
        bool get = strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0;

        if (path_is(req->url, "/health")) {
                bool healthy = false;
                char *json;

                if (!get)
                        goto not_allowed;
                json = api_health_json(a, now, &healthy);
                respond_json(c, healthy ? 200 : 503, json);
                return true;
        }
        if (path_is(req->url, "/status")) {
                if (!get)
                        goto not_allowed;
                respond_json(c, 200, api_status_json(a, now));
                return true;
        }
        if (path_is(req->url, "/api/key-status")) {
                char *pool;

                if (!get)
                        goto not_allowed;
                pool = query_param(req->url, "pool");
                respond_json(c, 200, api_key_status_json(a, now, pool));
                free(pool);
                return true;
        }
        return false;

not_allowed:
        http_conn_respond_error(c, 405, "invalid_request_error", "method_not_allowed",
                                (const struct http_header[]) { { "Allow", "GET" } }, 1,
                                "%s is not allowed on %.*s", req->method, (int) path_len(req->url), req->url);
        return true;
}
