/* api.c — keypool's own endpoints: health, status, key status, history, metrics, admin.
 *
 * Every document is built from copies taken out of the shared table under each pool's lock (or
 * the header lock for history), so a reader never holds a lock while formatting or writing.
 * Monotonic times from the table become wall-clock RFC 3339 only here, at the edge.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "keypool/api.h"
#include "keypool/clock.h"
#include "keypool/log.h"
#include "keypool/persist.h"
#include "keypool/proxy.h"
#include "keypool/timeutil.h"

#define HISTORY_DEFAULT_LIMIT 100

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

/* A monotonic table time as wall-clock RFC 3339. */
static json_t *json_mono_time(int64_t mono_ms, int64_t now_mono, int64_t now_wall) {
        char buf[TIMEUTIL_RFC3339_MAX];

        timeutil_format_rfc3339(now_wall + (mono_ms - now_mono), false, buf);
        return json_string(buf);
}

static const char *reason_text(enum key_state state, enum key_reason r) {
        if (state == KEY_READY)
                return NULL;
        switch (r) {
        case KEY_REASON_RATE_LIMITED: return "the provider rate limited this key; it rests until the time it gave";
        case KEY_REASON_AUTH:         return "the provider rejected this key (401/403); an operator must enable it";
        case KEY_REASON_QUOTA:        return "the key's credits or quota are exhausted; it is probed until it works again";
        case KEY_REASON_TRANSIENT:    return "the upstream failed with this key several times in a row; it rests briefly";
        case KEY_REASON_OPERATOR:     return "disabled by an operator";
        default:                      return NULL;
        }
}

static json_t *figure(int64_t v) {
        return v >= 0 ? json_integer(v) : json_null();
}

static json_t *figure_reset(int64_t reset_ms, int64_t seen_mono, int64_t now_mono, int64_t now_wall) {
        return reset_ms >= 0 && seen_mono > 0 ? json_mono_time(seen_mono + reset_ms, now_mono, now_wall) : json_null();
}

static json_t *key_json(const struct keytable_key_view *k, int64_t now, int64_t now_wall) {
        bool cooling = k->state == KEY_COOLING;
        json_t *j = json_object(), *limits = json_object();

        json_object_set_new(j, "id", json_string(k->id));
        json_object_set_new(j, "masked", json_string(k->masked));
        json_object_set_new(j, "state", json_string(keytable_state_name(k->state)));
        json_object_set_new(j, "reason", json_nullable_string(
                                    k->state == KEY_READY ? NULL : keytable_reason_name(k->reason)));
        json_object_set_new(j, "reason_text", json_nullable_string(reason_text(k->state, k->reason)));
        json_object_set_new(j, "cooldown_remaining_s", json_integer(cooling ? ceil_seconds(k->cooldown_until_ms - now) : 0));
        /* Rounded up, like the state file: a key is never said to be ready before it is. */
        json_object_set_new(j, "cooldown_until", cooling ? json_mono_time(k->cooldown_until_ms + 999, now, now_wall) : json_null());
        json_object_set_new(j, "requests", json_integer((json_int_t) k->requests));
        json_object_set_new(j, "successes", json_integer((json_int_t) k->successes));
        json_object_set_new(j, "rate_limited", json_integer((json_int_t) k->rate_limited));
        json_object_set_new(j, "failures", json_integer((json_int_t) k->failures));
        json_object_set_new(j, "consecutive_failures", json_integer(k->consecutive_failures));
        json_object_set_new(j, "last_used", k->last_used_ms ? json_mono_time(k->last_used_ms, now, now_wall) : json_null());
        json_object_set_new(j, "last_used_s_ago", k->last_used_ms ? json_integer((now - k->last_used_ms) / 1000) : json_null());
        json_object_set_new(j, "last_status", k->last_status ? json_integer(k->last_status) : json_null());
        json_object_set_new(j, "last_class", json_nullable_string(verdict_class_name(k->last_class)));
        json_object_set_new(j, "last_error", k->last_error[0] ? json_string(k->last_error) : json_null());
        json_object_set_new(j, "tokens_in", json_integer((json_int_t) k->tokens_in));
        json_object_set_new(j, "tokens_out", json_integer((json_int_t) k->tokens_out));
        json_object_set_new(j, "in_flight", json_integer(k->in_flight));
        json_object_set_new(j, "max_concurrent", json_integer(k->max_concurrent));
        json_object_set_new(j, "rpm", json_integer(k->rpm));
        json_object_set_new(limits, "remaining_requests", figure(k->figures.remaining_requests));
        json_object_set_new(limits, "remaining_tokens", figure(k->figures.remaining_tokens));
        json_object_set_new(limits, "reset_requests", figure_reset(k->figures.reset_requests_ms, k->figures_ms, now, now_wall));
        json_object_set_new(limits, "reset_tokens", figure_reset(k->figures.reset_tokens_ms, k->figures_ms, now, now_wall));
        json_object_set_new(j, "limits", limits);
        return j;
}

/* Copies one pool's keys; returns NULL on failure. */
static struct keytable_key_view *snapshot(const struct api_context *a, unsigned pool, int64_t now_ms,
                                          struct keytable_pool_view *ret_info) {
        struct keytable_key_view *keys = NULL;

        return keytable_pool_read_alloc(a->table, pool, now_ms, ret_info, &keys) < 0 ? NULL : keys;
}

/* scope=cluster: a row's counters are this node's plus the other nodes' (as the cluster process
 * last summed them); health stays this node's own view. */
static void add_cluster_usage(const struct api_context *a, unsigned key, json_t *kj) {
        static const char *const names[] = { "requests", "successes", "rate_limited", "failures",
                                             "tokens_in", "tokens_out" };
        struct keytable_usage u;
        uint64_t add[6];

        if (keytable_cluster_usage(a->table, key, &u) < 0)
                return;
        add[0] = u.requests, add[1] = u.successes, add[2] = u.rate_limited;
        add[3] = u.failures, add[4] = u.tokens_in, add[5] = u.tokens_out;
        for (size_t i = 0; i < 6; i++) {
                json_int_t mine = json_integer_value(json_object_get(kj, names[i]));

                json_object_set_new(kj, names[i], json_integer(mine + (json_int_t) add[i]));
        }
}

static char *key_status_json(const struct api_context *a, int64_t now_ms, const char *pool_filter,
                             bool cluster, bool *ret_unknown);

char *api_key_status_json(const struct api_context *a, int64_t now_ms, const char *pool_filter, bool *ret_unknown) {
        return key_status_json(a, now_ms, pool_filter, false, ret_unknown);
}

static char *key_status_json(const struct api_context *a, int64_t now_ms, const char *pool_filter,
                             bool cluster, bool *ret_unknown) {
        json_t *root = json_object(), *pools = json_array();
        int64_t now_wall = clock_wall_ms();
        bool found = false;

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
                found = true;
                pj = json_object();
                kj = json_array();
                json_object_set_new(pj, "name", json_string(info.name));
                json_object_set_new(pj, "model", json_string(info.model));
                /* Every key limited at once: more keys of the same account add nothing. */
                json_object_set_new(pj, "account_limit_suspected", json_boolean(info.account_limit_until_ms > now_ms));
                for (unsigned i = 0; i < info.n_keys; i++) {
                        json_t *k = key_json(&keys[i], now_ms, now_wall);

                        if (cluster)
                                add_cluster_usage(a, info.first_key + i, k);
                        json_array_append_new(kj, k);
                }
                json_object_set_new(pj, "keys", kj);
                json_array_append_new(pools, pj);
                free(keys);
        }
        if (pool_filter && !found) {
                if (ret_unknown)
                        *ret_unknown = true;
                json_decref(root);
                return NULL;
        }
        return dump(root);
}

/* "cluster": "ok" | "degraded" and the node, when clustering is on. */
static void cluster_state(const struct api_context *a, json_t *root) {
        struct keytable_cluster_view v;

        keytable_cluster_read(a->table, &v);
        if (!v.enabled)
                return;
        json_object_set_new(root, "cluster", json_string(v.connected ? "ok" : "degraded"));
        json_object_set_new(root, "node", json_string(v.node));
        json_object_set_new(root, "live_nodes", json_integer(v.live_nodes));
}

char *api_cluster_json(const struct api_context *a) {
        struct keytable_cluster_view *v = malloc(sizeof *v);
        int64_t now_wall = clock_wall_ms();
        json_t *root, *nodes;

        if (!v)
                return NULL;
        keytable_cluster_read(a->table, v);
        root = json_object();
        nodes = json_array();
        json_object_set_new(root, "enabled", json_boolean(v->enabled));
        json_object_set_new(root, "node", v->enabled ? json_string(v->node) : json_null());
        json_object_set_new(root, "state", json_string(!v->enabled ? "off" : v->connected ? "ok" : "degraded"));
        json_object_set_new(root, "live_nodes", json_integer(v->enabled ? v->live_nodes : 1));
        for (unsigned i = 0; i < v->n_nodes; i++) {
                const struct keytable_node *n = &v->nodes[i];
                char when[TIMEUTIL_RFC3339_MAX];
                json_t *nj = json_object();

                timeutil_format_rfc3339(n->seen_wall_ms, true, when);
                json_object_set_new(nj, "name", json_string(n->name));
                json_object_set_new(nj, "self", json_boolean(strcmp(n->name, v->node) == 0));
                json_object_set_new(nj, "last_seen", json_string(when));
                json_object_set_new(nj, "last_seen_ms_ago", json_integer(now_wall - n->seen_wall_ms));
                json_object_set_new(nj, "requests", json_integer((json_int_t) n->requests));
                json_object_set_new(nj, "tokens_in", json_integer((json_int_t) n->tokens_in));
                json_object_set_new(nj, "tokens_out", json_integer((json_int_t) n->tokens_out));
                json_object_set_new(nj, "keys_ready", json_integer(n->keys_ready));
                json_object_set_new(nj, "keys_cooling", json_integer(n->keys_cooling));
                json_object_set_new(nj, "keys_disabled", json_integer(n->keys_disabled));
                json_array_append_new(nodes, nj);
        }
        json_object_set_new(root, "nodes", nodes);
        free(v);
        return dump(root);
}

char *api_health_json(const struct api_context *a, int64_t now_ms, bool *ret_healthy) {
        json_t *root = json_object(), *pools = json_array();
        bool healthy = true;

        json_object_set_new(root, "pools", pools);
        for (unsigned p = 0; p < keytable_n_pools(a->table); p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys;
                unsigned ready = 0;
                json_t *pj;

                keys = snapshot(a, p, now_ms, &info);
                if (!keys) {
                        json_decref(root);
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
        /* A host without Redis still serves from its own table: degraded there is not unhealthy. */
        cluster_state(a, root);
        *ret_healthy = healthy;
        return dump(root);
}

char *api_status_json(const struct api_context *a, int64_t now_ms) {
        struct keytable_worker_view views[256];
        json_t *root = json_object(), *workers = json_array(), *pools = json_array(), *totals = json_object();
        uint64_t requests = 0, t_req = 0, t_ok = 0, t_rl = 0, t_fail = 0, t_in = 0, t_out = 0;
        unsigned n, in_flight = 0, keys_total = 0, ready_total = 0, cooling_total = 0, disabled_total = 0;

        n = keytable_workers(a->table, views, sizeof views / sizeof views[0]);
        for (unsigned i = 0; i < n; i++) {
                json_t *w;

                /* A slot claimed for a worker still being forked has no process yet. */
                if (views[i].pid <= 0)
                        continue;
                w = json_object();

                json_object_set_new(w, "pid", json_integer(views[i].pid));
                json_object_set_new(w, "slot", json_integer(views[i].slot));
                json_object_set_new(w, "generation", json_integer(views[i].generation));
                json_object_set_new(w, "stage", json_string(keytable_stage_name(views[i].stage)));
                json_object_set_new(w, "heartbeat_age_ms", json_integer(now_ms - views[i].heartbeat_ms));
                json_object_set_new(w, "requests", json_integer((json_int_t) views[i].requests));
                json_object_set_new(w, "in_flight", json_integer(views[i].in_flight));
                json_object_set_new(w, "waiting", json_integer(views[i].waiters));
                json_array_append_new(workers, w);
                requests += views[i].requests;
                in_flight += views[i].in_flight;
        }
        for (unsigned p = 0; p < keytable_n_pools(a->table); p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys = snapshot(a, p, now_ms, &info);
                unsigned ready = 0, cooling = 0, disabled = 0;
                json_t *pj;

                if (!keys)
                        continue;
                for (unsigned i = 0; i < info.n_keys; i++) {
                        ready += keys[i].state == KEY_READY;
                        cooling += keys[i].state == KEY_COOLING;
                        disabled += keys[i].state == KEY_DISABLED;
                        t_req += keys[i].requests;
                        t_ok += keys[i].successes;
                        t_rl += keys[i].rate_limited;
                        t_fail += keys[i].failures;
                        t_in += keys[i].tokens_in;
                        t_out += keys[i].tokens_out;
                }
                free(keys);
                keys_total += info.n_keys;
                ready_total += ready;
                cooling_total += cooling;
                disabled_total += disabled;
                pj = json_object();
                json_object_set_new(pj, "name", json_string(info.name));
                json_object_set_new(pj, "model", json_string(info.model));
                json_object_set_new(pj, "keys", json_integer(info.n_keys));
                json_object_set_new(pj, "ready", json_integer(ready));
                json_object_set_new(pj, "cooling", json_integer(cooling));
                json_object_set_new(pj, "disabled", json_integer(disabled));
                json_object_set_new(pj, "account_limit_suspected", json_boolean(info.account_limit_until_ms > now_ms));
                json_array_append_new(pools, pj);
        }
        json_object_set_new(totals, "keys", json_integer(keys_total));
        json_object_set_new(totals, "ready", json_integer(ready_total));
        json_object_set_new(totals, "cooling", json_integer(cooling_total));
        json_object_set_new(totals, "disabled", json_integer(disabled_total));
        json_object_set_new(totals, "requests", json_integer((json_int_t) t_req));
        json_object_set_new(totals, "successes", json_integer((json_int_t) t_ok));
        json_object_set_new(totals, "rate_limited", json_integer((json_int_t) t_rl));
        json_object_set_new(totals, "failures", json_integer((json_int_t) t_fail));
        json_object_set_new(totals, "tokens_in", json_integer((json_int_t) t_in));
        json_object_set_new(totals, "tokens_out", json_integer((json_int_t) t_out));

        json_object_set_new(root, "version", json_string(PACKAGE_VERSION));
        json_object_set_new(root, "uptime_s", json_integer((now_ms - keytable_created_ms(a->table)) / 1000));
        json_object_set_new(root, "pid", json_integer(a->coordinator_pid));
        json_object_set_new(root, "generation", json_integer(keytable_config_generation(a->table)));
        json_object_set_new(root, "workers", workers);
        json_object_set_new(root, "requests", json_integer((json_int_t) requests));
        json_object_set_new(root, "in_flight", json_integer(in_flight));
        json_object_set_new(root, "keys", json_integer(keys_total));
        json_object_set_new(root, "totals", totals);
        json_object_set_new(root, "pools", pools);
        json_object_set_new(root, "repairs", json_integer((json_int_t) keytable_repairs(a->table)));
        cluster_state(a, root);
        return dump(root);
}

char *api_history_json(const struct api_context *a, unsigned limit, const char *pool, const char *key) {
        unsigned cap = keytable_history_capacity(a->table), n;
        struct keytable_event *ev = calloc(cap ? cap : 1, sizeof *ev);
        json_t *root = json_object(), *events = json_array();
        unsigned first = 0, matched = 0;

        if (!ev) {
                json_decref(root);
                json_decref(events);
                return NULL;
        }
        n = keytable_history_read(a->table, ev, cap);
        /* Filter, then keep the most recent `limit`, oldest first. */
        for (unsigned i = n; i-- > 0; ) {
                if ((pool && strcmp(ev[i].pool, pool) != 0) ||
                    (key && strcmp(ev[i].key_from, key) != 0 && strcmp(ev[i].key_to, key) != 0))
                        continue;
                if (++matched > limit)
                        break;
                first = i;
        }
        for (unsigned i = matched ? first : n; i < n; i++) {
                char when[TIMEUTIL_RFC3339_MAX];
                json_t *e;

                if ((pool && strcmp(ev[i].pool, pool) != 0) ||
                    (key && strcmp(ev[i].key_from, key) != 0 && strcmp(ev[i].key_to, key) != 0))
                        continue;
                e = json_object();
                timeutil_format_rfc3339(ev[i].wall_ms, true, when);
                json_object_set_new(e, "time", json_string(when));
                json_object_set_new(e, "pool", json_string(ev[i].pool));
                json_object_set_new(e, "event", json_string(keytable_history_kind_name(ev[i].kind)));
                json_object_set_new(e, "from", ev[i].key_from[0] ? json_string(ev[i].key_from) : json_null());
                json_object_set_new(e, "to", ev[i].key_to[0] ? json_string(ev[i].key_to) : json_null());
                json_object_set_new(e, "status", ev[i].status ? json_integer(ev[i].status) : json_null());
                json_object_set_new(e, "reason", json_nullable_string(keytable_reason_name(ev[i].reason)));
                json_object_set_new(e, "cooldown_s", ev[i].cooldown_ms > 0 ? json_integer(ceil_seconds(ev[i].cooldown_ms)) : json_null());
                json_object_set_new(e, "node", ev[i].node[0] ? json_string(ev[i].node) : json_null());
                json_array_append_new(events, e);
        }
        free(ev);
        json_object_set_new(root, "events", events);
        return dump(root);
}

/* --- metrics ------------------------------------------------------------------------------- */

static void family(FILE *f, const char *name, const char *type, const char *help) {
        fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* What /metrics reads once: every pool's view and its keys' views. */
struct metrics_input {
        unsigned n_pools;
        struct keytable_pool_view *infos;
        struct keytable_key_view **keys;
};

static void metrics_keys(FILE *f, const struct metrics_input *in, int64_t now_ms) {
        static const char *const classes[] = { "ok", "rate_limited", "quota", "auth", "transient", "caller" };
        static const enum verdict_class class_ids[] = { VERDICT_OK, VERDICT_RATE_LIMITED, VERDICT_QUOTA,
                                                        VERDICT_AUTH, VERDICT_TRANSIENT, VERDICT_CALLER };
        static const enum key_state states[] = { KEY_READY, KEY_COOLING, KEY_DISABLED };

        family(f, "keypool_requests_total", "counter", "Upstream attempts by pool, key and the class of their answer.");
        for (unsigned p = 0; p < in->n_pools; p++)
                for (unsigned i = 0; in->keys[p] && i < in->infos[p].n_keys; i++)
                        for (unsigned c = 0; c < sizeof classes / sizeof classes[0]; c++)
                                fprintf(f, "keypool_requests_total{pool=\"%s\",key=\"%s\",class=\"%s\"} %llu\n",
                                        in->infos[p].name, in->keys[p][i].id, classes[c],
                                        (unsigned long long) in->keys[p][i].by_class[class_ids[c]]);

        family(f, "keypool_key_state", "gauge", "1 for the state each key is in, 0 for the others.");
        for (unsigned p = 0; p < in->n_pools; p++)
                for (unsigned i = 0; in->keys[p] && i < in->infos[p].n_keys; i++)
                        for (unsigned s = 0; s < sizeof states / sizeof states[0]; s++)
                                fprintf(f, "keypool_key_state{pool=\"%s\",key=\"%s\",state=\"%s\"} %d\n",
                                        in->infos[p].name, in->keys[p][i].id, keytable_state_name(states[s]),
                                        in->keys[p][i].state == states[s]);

        family(f, "keypool_key_cooldown_seconds", "gauge", "Seconds until a cooling key is ready again.");
        for (unsigned p = 0; p < in->n_pools; p++)
                for (unsigned i = 0; in->keys[p] && i < in->infos[p].n_keys; i++) {
                        const struct keytable_key_view *k = &in->keys[p][i];

                        fprintf(f, "keypool_key_cooldown_seconds{pool=\"%s\",key=\"%s\"} %.3f\n",
                                in->infos[p].name, k->id,
                                k->state == KEY_COOLING ? (double) (k->cooldown_until_ms - now_ms) / 1000.0 : 0.0);
                }
}

static void metrics_pools(FILE *f, const struct metrics_input *in) {
        family(f, "keypool_rotations_total", "counter", "Requests moved from one key to another.");
        for (unsigned p = 0; p < in->n_pools; p++)
                fprintf(f, "keypool_rotations_total{pool=\"%s\"} %llu\n", in->infos[p].name,
                        (unsigned long long) in->infos[p].rotations);

        family(f, "keypool_upstream_latency_seconds", "histogram", "Time of upstream attempts, by pool.");
        for (unsigned p = 0; p < in->n_pools; p++) {
                const struct keytable_pool_view *pv = &in->infos[p];
                uint64_t cumulative = 0;

                for (unsigned b = 0; b + 1 < KEYTABLE_LATENCY_BUCKETS; b++) {
                        cumulative += pv->latency_buckets[b];
                        fprintf(f, "keypool_upstream_latency_seconds_bucket{pool=\"%s\",le=\"%g\"} %llu\n",
                                pv->name, (double) keytable_latency_bounds_ms[b] / 1000.0,
                                (unsigned long long) cumulative);
                }
                fprintf(f, "keypool_upstream_latency_seconds_bucket{pool=\"%s\",le=\"+Inf\"} %llu\n",
                        pv->name, (unsigned long long) pv->latency_count);
                fprintf(f, "keypool_upstream_latency_seconds_sum{pool=\"%s\"} %.3f\n", pv->name,
                        (double) pv->latency_sum_ms / 1000.0);
                fprintf(f, "keypool_upstream_latency_seconds_count{pool=\"%s\"} %llu\n", pv->name,
                        (unsigned long long) pv->latency_count);
        }
}

static void metrics_loop_lag(FILE *f, const struct api_context *a) {
        struct keytable_lag lag;
        uint64_t cumulative = 0;

        keytable_loop_lag(a->table, &lag);
        family(f, "keypool_loop_lag_seconds", "histogram",
               "Time one step of a worker's event loop took, over all workers: what any other ready event waited.");
        for (unsigned b = 0; b + 1 < KEYTABLE_LAG_BUCKETS; b++) {
                cumulative += lag.buckets[b];
                fprintf(f, "keypool_loop_lag_seconds_bucket{le=\"%g\"} %llu\n",
                        (double) keytable_lag_bounds_usec[b] / 1e6, (unsigned long long) cumulative);
        }
        fprintf(f, "keypool_loop_lag_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long) lag.count);
        fprintf(f, "keypool_loop_lag_seconds_sum %.6f\n", (double) lag.sum_usec / 1e6);
        fprintf(f, "keypool_loop_lag_seconds_count %llu\n", (unsigned long long) lag.count);
}

static void metrics_usage(FILE *f, const struct metrics_input *in) {
        family(f, "keypool_tokens_total", "counter", "Tokens the provider reported, by pool, key and direction.");
        for (unsigned p = 0; p < in->n_pools; p++)
                for (unsigned i = 0; in->keys[p] && i < in->infos[p].n_keys; i++) {
                        fprintf(f, "keypool_tokens_total{pool=\"%s\",key=\"%s\",direction=\"in\"} %llu\n",
                                in->infos[p].name, in->keys[p][i].id, (unsigned long long) in->keys[p][i].tokens_in);
                        fprintf(f, "keypool_tokens_total{pool=\"%s\",key=\"%s\",direction=\"out\"} %llu\n",
                                in->infos[p].name, in->keys[p][i].id, (unsigned long long) in->keys[p][i].tokens_out);
                }

        family(f, "keypool_provider_remaining_requests", "gauge", "Requests the provider last said a key has left.");
        for (unsigned p = 0; p < in->n_pools; p++)
                for (unsigned i = 0; in->keys[p] && i < in->infos[p].n_keys; i++)
                        if (in->keys[p][i].figures.remaining_requests >= 0)
                                fprintf(f, "keypool_provider_remaining_requests{pool=\"%s\",key=\"%s\"} %lld\n",
                                        in->infos[p].name, in->keys[p][i].id,
                                        (long long) in->keys[p][i].figures.remaining_requests);
        family(f, "keypool_provider_remaining_tokens", "gauge", "Tokens the provider last said a key has left.");
        for (unsigned p = 0; p < in->n_pools; p++)
                for (unsigned i = 0; in->keys[p] && i < in->infos[p].n_keys; i++)
                        if (in->keys[p][i].figures.remaining_tokens >= 0)
                                fprintf(f, "keypool_provider_remaining_tokens{pool=\"%s\",key=\"%s\"} %lld\n",
                                        in->infos[p].name, in->keys[p][i].id,
                                        (long long) in->keys[p][i].figures.remaining_tokens);
}

static void metrics_workers(FILE *f, const struct api_context *a) {
        struct keytable_worker_view views[256];
        unsigned n_workers, in_flight = 0;

        n_workers = keytable_workers(a->table, views, sizeof views / sizeof views[0]);
        for (unsigned i = 0; i < n_workers; i++)
                in_flight += views[i].in_flight;
        family(f, "keypool_workers", "gauge", "Worker processes alive.");
        fprintf(f, "keypool_workers %u\n", n_workers);
        family(f, "keypool_in_flight_requests", "gauge", "Upstream requests in flight.");
        fprintf(f, "keypool_in_flight_requests %u\n", in_flight);
}

char *api_metrics_text(const struct api_context *a, int64_t now_ms) {
        struct metrics_input in = { .n_pools = keytable_n_pools(a->table) };
        char *text = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&text, &size);

        in.infos = calloc(in.n_pools ? in.n_pools : 1, sizeof *in.infos);
        in.keys = calloc(in.n_pools ? in.n_pools : 1, sizeof *in.keys);
        if (f && in.infos && in.keys) {
                for (unsigned p = 0; p < in.n_pools; p++)
                        in.keys[p] = snapshot(a, p, now_ms, &in.infos[p]);
                family(f, "keypool_up", "gauge", "1 while keypoold serves.");
                fprintf(f, "keypool_up 1\n");
                metrics_keys(f, &in, now_ms);
                metrics_pools(f, &in);
                metrics_loop_lag(f, a);
                metrics_usage(f, &in);
                metrics_workers(f, a);
                for (unsigned p = 0; p < in.n_pools; p++)
                        free(in.keys[p]);
        }
        free(in.keys);
        free(in.infos);
        if (!f || fclose(f) != 0 || !in.infos || !in.keys) {
                free(text);
                return NULL;
        }
        return text;
}

/* --- admin --------------------------------------------------------------------------------- */

/* Applies action to every row of the current bank holding key id. Returns how many, and one of
 * them (after the action) in ret_view. */
static unsigned for_each_row(const struct api_context *a, const char *id, const char *action, int64_t now,
                             struct keytable_key_view *ret_view, char *ret_pool, size_t pool_size) {
        unsigned hits = 0;

        for (unsigned p = 0; p < keytable_n_pools(a->table); p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys = snapshot(a, p, now, &info);

                for (unsigned i = 0; keys && i < info.n_keys; i++) {
                        struct keytable_change change = {};
                        struct keytable_event ev = { .wall_ms = clock_wall_ms() };
                        struct log_fields f = LOG_FIELDS_NONE;
                        unsigned key = info.first_key + keys[i].position;

                        if (strcmp(keys[i].id, id) != 0)
                                continue;
                        hits++;
                        f.pool = info.name;
                        f.key = keys[i].id;
                        snprintf(ev.pool, sizeof ev.pool, "%s", info.name);
                        snprintf(ev.key_from, sizeof ev.key_from, "%s", keys[i].id);
                        if (strcmp(action, "disable") == 0) {
                                keytable_disable(a->table, key, KEY_REASON_OPERATOR, now, &change);
                                ev.kind = HISTORY_DISABLE;
                                ev.reason = KEY_REASON_OPERATOR;
                                log_event(LOG_NOTICE, "disable", &f, "key disabled by an operator");
                        } else if (strcmp(action, "enable") == 0) {
                                keytable_enable(a->table, key, now, &change);
                                ev.kind = HISTORY_ENABLE;
                                log_event(LOG_NOTICE, "enable", &f, "key enabled by an operator");
                        } else {
                                ev.kind = HISTORY_PROBE;
                                if (!a->proxy || proxy_probe(a->proxy, key, p) < 0)
                                        log_event(LOG_WARNING, "probe", &f, "cannot probe now (a reload is "
                                                  "under way?): the key keeps its state");
                                log_event(LOG_NOTICE, "probe", &f, "probe requested by an operator");
                        }
                        keytable_history_add(a->table, &ev);
                        snprintf(ret_pool, pool_size, "%s", info.name);
                }
                free(keys);
        }
        /* Read back one row as it is now. */
        for (unsigned p = 0; hits && p < keytable_n_pools(a->table); p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys = snapshot(a, p, now, &info);

                for (unsigned i = 0; keys && i < info.n_keys; i++)
                        if (strcmp(keys[i].id, id) == 0 && strcmp(info.name, ret_pool) == 0)
                                *ret_view = keys[i];
                free(keys);
        }
        return hits;
}

static void respond_json(struct http_conn *c, int status, char *json) {
        static const struct http_header h[] = { { "Content-Type", "application/json" } };

        if (!json) {
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0, "out of memory");
                return;
        }
        http_conn_respond(c, status, h, 1, json, strlen(json));
        free(json);
}

static void key_action(const struct api_context *a, struct http_conn *c, const char *id, const char *action) {
        struct keytable_key_view view = {};
        char pool[KEYTABLE_NAME_MAX + 1] = "";
        int64_t now = clock_mono_ms();
        json_t *root;

        if (for_each_row(a, id, action, now, &view, pool, sizeof pool) == 0) {
                http_conn_respond_error(c, 404, "invalid_request_error", "unknown_key", NULL, 0,
                                        "no key has the id '%.20s'", id);
                return;
        }
        root = json_object();
        if (strcmp(action, "probe") == 0) {
                json_object_set_new(root, "probing", json_true());
                json_object_set_new(root, "key", json_string(id));
                respond_json(c, 202, dump(root));
                return;
        }
        json_object_set_new(root, "pool", json_string(pool));
        json_object_set_new(root, "key", key_json(&view, now, clock_wall_ms()));
        respond_json(c, 200, dump(root));
}

static void state_import(const struct api_context *a, struct http_conn *c, const struct http_request *req) {
        struct persist_report report = {};
        char err[256] = "";
        json_t *root;

        if (persist_import(a->table, req->body, req->body_len, clock_mono_ms(), clock_wall_ms(),
                           (int64_t) a->config->max_cooldown * 1000, &report, err, sizeof err) < 0) {
                http_conn_respond_error(c, 400, "invalid_request_error", "invalid_state", NULL, 0,
                                        "not a keypool state document: %s", err);
                return;
        }
        log_event(LOG_NOTICE, NULL, NULL, "state imported by an operator: %u keys, %u ignored, %u events%s%s",
                  report.imported, report.ignored, report.events, report.problem[0] ? "; first problem: " : "",
                  report.problem);
        root = json_object();
        json_object_set_new(root, "imported", json_integer(report.imported));
        json_object_set_new(root, "ignored", json_integer(report.ignored));
        json_object_set_new(root, "refused", json_integer(report.refused));
        json_object_set_new(root, "capped", json_integer(report.capped));
        json_object_set_new(root, "events", json_integer(report.events));
        if (report.problem[0])
                json_object_set_new(root, "problem", json_string(report.problem));
        respond_json(c, 200, dump(root));
}

/* --- routing ------------------------------------------------------------------------------- */

static size_t path_len(const char *url) {
        const char *q = strchr(url, '?');

        return q ? (size_t) (q - url) : strlen(url);
}

/* Is url's path (its first n bytes, as path_len says) exactly path[0..len)? */
static bool path_is(const char *url, size_t n, const char *path, size_t len) {
        return n == len && memcmp(url, path, n) == 0;
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

static void not_allowed(struct http_conn *c, const struct http_request *req, const char *allow) {
        http_conn_respond_error(c, 405, "invalid_request_error", "method_not_allowed",
                                (const struct http_header[]) { { "Allow", allow } }, 1,
                                "%s is not allowed on %.*s", req->method, (int) path_len(req->url), req->url);
}

static bool forbidden(struct http_conn *c, bool admin) {
        if (admin)
                return false;
        http_conn_respond_error(c, 403, "permission_error", "forbidden", NULL, 0,
                                "admin actions are for root and the daemon's own user "
                                "(over TCP: a token listed in admin_tokens)");
        return true;
}

/* POST /api/keys/{id}/{disable|enable|probe} */
static bool key_route(const struct api_context *a, struct http_conn *c, const struct http_request *req, bool admin,
                      size_t n) {
        static const char prefix[] = "/api/keys/";
        const char *rest, *slash;
        char id[32], action[16];

        if (n <= sizeof prefix - 1 || strncmp(req->url, prefix, sizeof prefix - 1) != 0)
                return false;
        rest = req->url + sizeof prefix - 1;
        slash = memchr(rest, '/', n - (sizeof prefix - 1));
        if (!slash || (size_t) (slash - rest) >= sizeof id || (size_t) (req->url + n - slash - 1) >= sizeof action)
                return false;
        snprintf(id, sizeof id, "%.*s", (int) (slash - rest), rest);
        snprintf(action, sizeof action, "%.*s", (int) (req->url + n - slash - 1), slash + 1);
        if (strcmp(action, "disable") != 0 && strcmp(action, "enable") != 0 && strcmp(action, "probe") != 0)
                return false;
        if (strcmp(req->method, "POST") != 0)
                not_allowed(c, req, "POST");
        else if (!forbidden(c, admin))
                key_action(a, c, id, action);
        return true;
}

/* --- the routes ------------------------------------------------------------------------- */

static void serve_health(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                         int64_t now) {
        bool healthy = false;
        char *json = api_health_json(a, now, &healthy);

        (void) req;
        respond_json(c, healthy ? 200 : 503, json);
}

static void serve_status(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                         int64_t now) {
        (void) req;
        respond_json(c, 200, api_status_json(a, now));
}

static void serve_key_status(const struct api_context *a, struct http_conn *c,
                             const struct http_request *req, int64_t now) {
        char *pool = query_param(req->url, "pool"), *scope = query_param(req->url, "scope");
        bool unknown = false, cluster = scope && strcmp(scope, "cluster") == 0;
        char *json = NULL;

        if (scope && !cluster && strcmp(scope, "node") != 0) {
                http_conn_respond_error(c, 400, "invalid_request_error", "bad_scope", NULL, 0,
                                        "scope must be node or cluster");
                free(pool);
                free(scope);
                return;
        }
        free(scope);
        json = key_status_json(a, now, pool, cluster, &unknown);
        if (unknown)
                http_conn_respond_error(c, 404, "invalid_request_error", "unknown_pool", NULL, 0,
                                        "no pool is named '%.64s'", pool);
        else
                respond_json(c, 200, json);
        free(pool);
}

/* ?limit= as a count of events, at most what the ring holds; false when it is not a count. */
static bool history_limit(const struct api_context *a, const char *text, unsigned *ret) {
        char *end;
        unsigned long v;

        if (!text)
                return true;
        v = strtoul(text, &end, 10);
        /* strtoul takes "-1" as a huge number: digits only. */
        if (end == text || *end || v == 0 || text[0] < '0' || text[0] > '9')
                return false;
        *ret = v > keytable_history_capacity(a->table) ? keytable_history_capacity(a->table) : (unsigned) v;
        return true;
}

static void serve_history(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                          int64_t now) {
        char *limit_s = query_param(req->url, "limit"), *pool = query_param(req->url, "pool"),
             *key = query_param(req->url, "key");
        unsigned limit = HISTORY_DEFAULT_LIMIT;

        (void) now;
        if (history_limit(a, limit_s, &limit))
                respond_json(c, 200, api_history_json(a, limit, pool, key));
        else
                http_conn_respond_error(c, 400, "invalid_request_error", "bad_limit", NULL, 0,
                                        "limit must be a positive number");
        free(limit_s);
        free(pool);
        free(key);
}

static void serve_metrics(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                          int64_t now) {
        static const struct http_header h[] = { { "Content-Type", "text/plain; version=0.0.4; charset=utf-8" } };
        char *text = api_metrics_text(a, now);

        (void) req;
        if (!text)
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0, "out of memory");
        else
                http_conn_respond(c, 200, h, 1, text, strlen(text));
        free(text);
}

static void serve_cluster(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                          int64_t now) {
        (void) req;
        (void) now;
        respond_json(c, 200, api_cluster_json(a));
}

static void serve_export(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                         int64_t now) {
        (void) req;
        respond_json(c, 200, persist_export(a->table, now, clock_wall_ms()));
}

static void serve_import(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                         int64_t now) {
        (void) now;
        state_import(a, c, req);
}

/* The table's consistency check: {"ok": …, "problems": […], and what was looked at}. The answer
 * is 200 either way: a problem found is the check's result, not the request's failure. */
char *api_check_json(const struct api_context *a) {
        struct keytable_check_report *r = malloc(sizeof *r);
        json_t *root, *problems, *states;
        char *text;

        if (!r || keytable_check(a->table, r) < 0) {
                free(r);
                return NULL;
        }
        root = json_object();
        problems = json_array();
        states = json_object();
        for (unsigned i = 0; i < r->n_problems && i < KEYTABLE_CHECK_PROBLEMS_MAX; i++)
                json_array_append_new(problems, json_string(r->problems[i]));
        for (unsigned s = KEY_READY; s < _KEY_STATE_MAX; s++)
                json_object_set_new(states, keytable_state_name(s), json_integer(r->by_state[s]));
        json_object_set_new(root, "ok", json_boolean(r->n_problems == 0));
        json_object_set_new(root, "n_problems", json_integer(r->n_problems));
        json_object_set_new(root, "problems", problems);
        json_object_set_new(root, "pools", json_integer(r->pools));
        json_object_set_new(root, "keys", json_integer(r->keys));
        json_object_set_new(root, "keys_by_state", states);
        json_object_set_new(root, "in_flight", json_integer(r->in_flight));
        json_object_set_new(root, "leases", json_integer(r->leases));
        json_object_set_new(root, "workers", json_integer(r->workers));
        free(r);
        text = json_dumps(root, JSON_COMPACT);
        json_decref(root);
        return text;
}

static void serve_check(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                        int64_t now) {
        (void) req;
        (void) now;
        respond_json(c, 200, api_check_json(a));
}

#define ROUTE_PATH(s) s, sizeof(s) - 1

static const struct api_route {
        const char *path;
        size_t path_len;
        bool post;                      /* POST only; else GET (and HEAD) */
        bool admin;                     /* root or the socket's owner, or an admin token */
        void (*serve)(const struct api_context *a, struct http_conn *c, const struct http_request *req,
                      int64_t now);
} routes[] = {
        { ROUTE_PATH("/health"), false, false, serve_health },
        { ROUTE_PATH("/status"), false, false, serve_status },
        { ROUTE_PATH("/api/key-status"), false, false, serve_key_status },
        { ROUTE_PATH("/api/history"), false, false, serve_history },
        { ROUTE_PATH("/api/cluster"), false, false, serve_cluster },
        { ROUTE_PATH("/metrics"), false, false, serve_metrics },
        { ROUTE_PATH("/api/state/export"), true, true, serve_export },
        { ROUTE_PATH("/api/state/import"), true, true, serve_import },
        { ROUTE_PATH("/api/check"), false, true, serve_check },
};

bool api_handle(const struct api_context *a, struct http_conn *c, const struct http_request *req, bool admin) {
        /* Every proxied request passes here first: its path is measured once. */
        size_t n = path_len(req->url);

        for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
                const struct api_route *r = &routes[i];
                bool method_ok;

                if (!path_is(req->url, n, r->path, r->path_len))
                        continue;
                method_ok = r->post ? strcmp(req->method, "POST") == 0 :
                            strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0;
                if (!method_ok)
                        not_allowed(c, req, r->post ? "POST" : "GET");
                else if (!r->admin || !forbidden(c, admin))
                        r->serve(a, c, req, clock_mono_ms());
                return true;
        }
        return key_route(a, c, req, admin, n);
}
