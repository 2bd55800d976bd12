/* cluster.c — the cluster process: one host's link to the others through Redis.
 *
 * Forked by the coordinator when keypool.conf has cluster = { … } and respawned like a worker.
 * Two connections to Redis, both hiredis async on this process's own sd-event loop
 * (cluster_redis.c): one for commands, one subscribed to the event channel. Every wake-up is
 * short, and nothing here holds a table lock across I/O; workers never wait on this process.
 *
 * Outbound: every 5 ms it looks at the history ring's head (one atomic load) and publishes this
 * node's new cooldowns, disables and enables with the event script: a hash per key id
 * (state, reason, until, at, node) in which a later rest or a newer event wins, and a PUBLISH.
 * The cursor lives in the table, so a respawned process resumes where the last one stopped, and
 * events seen while Redis was away go out when it returns.
 * Inbound: a message from another node is applied with keytable_cluster_apply (no history of its
 * own; the entry this adds names the node), so it is never published back.
 * Every second: a heartbeat script (a key with expiry per node plus a sorted set of nodes)
 * returns the live nodes and their reports; the usage script stores this node's counters per key
 * row and returns every node's, of which the others' are summed into the table.
 * Budgets: every 5 ms, each limited key row's rpm slice and concurrency slots are topped up or
 * given back with the lease script (EVALSHA, loaded at each connect, reloaded on NOSCRIPT; one
 * ask per key out at a time), as cluster_lease_plan decides from the row and its demand.
 * Redis away, slow (a heartbeat unanswered for 2 s) or answering errors or garbage: the link is
 * torn down, the table says degraded, leases are given up for the static share (limit ÷ the
 * live nodes last seen), and it
 * reconnects with backoff (100 ms doubling to 5 s). On return it reads back every key's hash.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <systemd/sd-event.h>

#include "keypool/clock.h"
#include "keypool/cluster.h"
#include "keypool/log.h"

#include "cluster_internal.h"

#define POLL_USEC               (5ULL * 1000)
#define BEAT_USEC               (1000ULL * 1000)
#define NODE_TTL_MS             5000            /* a node unheard of this long is gone */
#define SLOW_MS                 2000            /* a heartbeat unanswered this long: Redis is away */
#define BACKOFF_MIN_MS          100
#define BACKOFF_MAX_MS          5000
#define EVENTS_PER_POLL         64
#define KEY_HASH_TTL_MS         (7LL * 86400 * 1000)
#define LEASE_ACTIVE_MS         1000            /* used or waited for this recently: keep a slice */
#define LEASE_CONTENDED_MS      300             /* a refusal this recent makes holders give back */
#define LEASE_RETRY_MS          20              /* after a refusal, ask again no sooner */
#define LEASE_RETRY_MAX_MS      250

/* KEYS: the key's hash, the channel. ARGV: node, state, reason, until, at, message.
 * Cooling against cooling: the later until wins; a cooldown never replaces a disable; otherwise
 * the newer event wins. */
static const char event_script[] =
        "local cur = redis.call('HMGET', KEYS[1], 'state', 'until', 'at')\n"
        "local state, untl, at = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])\n"
        "if cur[3] then\n"
        "  local cstate, cuntil, cat = cur[1], tonumber(cur[2]) or 0, tonumber(cur[3]) or 0\n"
        "  if state == 'cooling' and cstate == 'cooling' and cuntil > at then\n"
        "    if untl <= cuntil then return 0 end\n"
        "  elseif state == 'cooling' and cstate == 'disabled' then return 0\n"
        "  elseif at < cat then return 0 end\n"
        "end\n"
        "redis.call('HSET', KEYS[1], 'state', state, 'reason', ARGV[3], 'until', ARGV[4], 'at', ARGV[5], 'node', ARGV[1])\n"
        "redis.call('PEXPIRE', KEYS[1], ARGV[7])\n"
        "redis.call('PUBLISH', KEYS[2], ARGV[6])\n"
        "return 1\n";

/* KEYS: the nodes' sorted set. ARGV: node, ttl, node key prefix, report. Redis's clock judges
 * liveness, so the hosts' clocks need not agree. Returns name, report, name, report, … */
static const char beat_script[] =
        "local t = redis.call('TIME')\n"
        "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
        "local ttl = tonumber(ARGV[2])\n"
        "redis.call('SET', ARGV[3] .. ARGV[1], ARGV[4], 'PX', ttl)\n"
        "redis.call('ZADD', KEYS[1], now, ARGV[1])\n"
        "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)\n"
        "local out = {}\n"
        "for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - ttl, '+inf')) do\n"
        "  local r = redis.call('GET', ARGV[3] .. n)\n"
        "  if r then out[#out + 1] = n; out[#out + 1] = r end\n"
        "end\n"
        "return out\n";

/* KEYS: the row's usage hash. ARGV: node, its counters, pool, position. Returns pool, position,
 * then the hash's fields and values. */
static const char usage_script[] =
        "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])\n"
        "redis.call('PEXPIRE', KEYS[1], ARGV[5])\n"
        "local out = { ARGV[3], ARGV[4] }\n"
        "for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = v end\n"
        "return out\n";

/* KEYS: the key's hash. ARGV: the id. Returns id, state, reason, until, at, node. */
static const char fetch_script[] =
        "local v = redis.call('HMGET', KEYS[1], 'state', 'reason', 'until', 'at', 'node')\n"
        "return { ARGV[1], v[1] or '', v[2] or '', v[3] or '0', v[4] or '0', v[5] or '' }\n";

struct cluster;

/* A limited key row under leases: what this process knows beyond the table's row. */
struct lease {
        struct cluster *c;
        unsigned key;                   /* table-wide row */
        unsigned pool;                  /* in the current bank */
        unsigned rpm, max_concurrent;   /* cluster-wide, as configured */
        char rate_key[256], slots_key[256];
        uint64_t requests;              /* the row's count at the last look */
        int64_t active_until_ms, next_ask_ms, contended_until_ms;
        unsigned held;                  /* slots Redis records for this node */
        int asked_tokens;               /* of the ask out: tokens asked (< 0: given back) */
        bool outstanding, raising;
        uint64_t gen;                   /* c->lease_gen when the ask went out */
};

struct cluster {
        const struct cluster_params *params;
        const struct config_cluster *cfg;
        sd_event *event;
        struct keytable *table;
        redisAsyncContext *cmd, *sub;
        bool cmd_ready, sub_ready;      /* AUTH/SELECT answered; SUBSCRIBE confirmed */
        bool up;                        /* both ready: the table says connected */
        bool ever_up;
        bool reported_down;             /* the degraded event was logged for this outage */
        int64_t beat_sent_ms;           /* a heartbeat is out since (monotonic), 0 none */
        unsigned backoff_ms;
        sd_event_source *poll, *beat, *retry, *teardown;
        unsigned live_nodes;            /* last seen; 0 never */
        unsigned shares_for;            /* the node count the shares were set for; 0 none */
        char channel[128];
        char *password;
        struct lease *leases;           /* every limited key row; n_leases of them */
        unsigned n_leases;
        bool leasing;                   /* the rows are under leases (link up) */
        uint64_t lease_gen;             /* bumped at each start and stop of leasing */
        char lease_sha[48];             /* the loaded script's SHA1; "" until loaded */
};

unsigned cluster_share(unsigned limit, unsigned nodes) {
        unsigned share;

        if (limit == 0 || nodes <= 1)
                return limit;
        share = limit / nodes;
        return share > 0 ? share : 1;
}

static const char *const state_words[_KEY_STATE_MAX] = {
        [KEY_READY] = "ready", [KEY_COOLING] = "cooling", [KEY_DISABLED] = "disabled",
};

static int state_from_word(const char *s, size_t len) {
        for (int i = KEY_READY; i < _KEY_STATE_MAX; i++)
                if (strlen(state_words[i]) == len && memcmp(state_words[i], s, len) == 0)
                        return i;
        return -1;
}

int cluster_event_format(const struct cluster_event *e, char *buf, size_t size) {
        int n;

        if (e->state <= KEY_STATE_INVALID || e->state >= _KEY_STATE_MAX)
                return -EINVAL;
        n = snprintf(buf, size, "%s\t%s\t%s\t%u\t%lld\t%lld", e->node, e->id, state_words[e->state],
                     (unsigned) e->reason, (long long) e->until_wall_ms, (long long) e->at_wall_ms);
        return n < 0 || (size_t) n >= size ? -ENOBUFS : n;
}

/* The next tab-separated field of [*p, end), copied into out; false when it does not fit. */
static bool next_field(const char **p, const char *end, char *out, size_t size) {
        const char *tab = memchr(*p, '\t', (size_t) (end - *p));
        size_t len = (size_t) ((tab ? tab : end) - *p);

        if (len >= size)
                return false;
        memcpy(out, *p, len);
        out[len] = '\0';
        *p = tab ? tab + 1 : end;
        return true;
}

static bool parse_i64(const char *s, int64_t *ret) {
        char *end;
        long long v;

        if (!*s)
                return false;
        errno = 0;
        v = strtoll(s, &end, 10);
        if (errno || *end)
                return false;
        *ret = v;
        return true;
}

int cluster_event_parse(const char *s, size_t len, struct cluster_event *ret) {
        const char *p = s, *end = s + len;
        char state[16], reason[8], until[24], at[24];
        struct cluster_event e = { 0 };
        int64_t r;
        int st;

        if (!s || memchr(s, '\0', len) || memchr(s, '\n', len))
                return -EBADMSG;
        if (!next_field(&p, end, e.node, sizeof e.node) || !next_field(&p, end, e.id, sizeof e.id) ||
            !next_field(&p, end, state, sizeof state) || !next_field(&p, end, reason, sizeof reason) ||
            !next_field(&p, end, until, sizeof until) || !next_field(&p, end, at, sizeof at) || p != end)
                return -EBADMSG;
        st = state_from_word(state, strlen(state));
        if (!e.node[0] || strlen(e.id) != KEYID_ID_LEN || st < 0 || !parse_i64(reason, &r) ||
            r < 0 || r >= _KEY_REASON_MAX || !parse_i64(until, &e.until_wall_ms) ||
            !parse_i64(at, &e.at_wall_ms))
                return -EBADMSG;
        e.state = (enum key_state) st;
        e.reason = (enum key_reason) r;
        if (e.state == KEY_DISABLED && e.reason == KEY_REASON_NONE)
                return -EBADMSG;
        *ret = e;
        return 0;
}

int cluster_event_from_history(const struct keytable_event *h, struct cluster_event *ret) {
        struct cluster_event e = { .reason = h->reason, .at_wall_ms = h->wall_ms };

        switch (h->kind) {
        case HISTORY_COOLDOWN:
                if (h->cooldown_ms <= 0)
                        return -ENOENT;
                e.state = KEY_COOLING;
                e.until_wall_ms = h->wall_ms + h->cooldown_ms;
                break;
        case HISTORY_DISABLE:
                if (h->reason == KEY_REASON_NONE)
                        return -ENOENT;
                e.state = KEY_DISABLED;
                break;
        case HISTORY_ENABLE:
                e.state = KEY_READY;
                e.reason = KEY_REASON_NONE;
                break;
        default:
                return -ENOENT;
        }
        if (strlen(h->key_from) != KEYID_ID_LEN)
                return -ENOENT;
        snprintf(e.node, sizeof e.node, "%s", h->node);
        memcpy(e.id, h->key_from, sizeof e.id);
        *ret = e;
        return 0;
}

/* --- the link ------------------------------------------------------------------------------- */

static void link_down(struct cluster *c, const char *why);
static void link_check(struct cluster *c);
static void leases_tick(struct cluster *c);

static void wake_workers(struct cluster *c) {
        for (unsigned i = 0; i < c->params->n_wake_fds; i++) {
                uint64_t one = 1;

                if (c->params->wake_fds[i] >= 0)
                        (void) !write(c->params->wake_fds[i], &one, sizeof one);
        }
}

/* Is r the reply a command of ours may have? A NULL reply is a command the teardown cut off. */
static bool reply_bad(struct cluster *c, const redisReply *r, int want) {
        char why[160];

        if (!r)
                return true;
        if (r->type == want)
                return false;
        if (r->type == REDIS_REPLY_ERROR)
                snprintf(why, sizeof why, "Redis answered with an error: %.100s", r->str ? r->str : "");
        else
                snprintf(why, sizeof why, "Redis answered with a reply of type %d where %d was expected",
                         r->type, want);
        link_down(c, why);
        return true;
}

static void apply_event(struct cluster *c, const struct cluster_event *e) {
        int64_t now = clock_mono_ms(), wall = clock_wall_ms(), until = 0;
        struct log_fields f = LOG_FIELDS_NONE;
        char pool[KEYTABLE_NAME_MAX + 1] = "";
        int n;

        if (strcmp(e->node, c->cfg->node) == 0)
                return;
        if (e->state == KEY_COOLING) {
                /* Wall time crosses hosts; each table counts in its own monotonic clock. */
                until = now + (e->until_wall_ms - wall);
                if (until <= now)
                        return;
        }
        n = keytable_cluster_apply(c->table, e->id, e->state, e->reason, until, now, pool);
        if (n <= 0)
                return;

        struct keytable_event h = {
                .wall_ms = wall,
                .kind = e->state == KEY_COOLING ? HISTORY_COOLDOWN
                      : e->state == KEY_DISABLED ? HISTORY_DISABLE : HISTORY_ENABLE,
                .reason = e->reason,
                .cooldown_ms = e->state == KEY_COOLING ? e->until_wall_ms - wall : 0,
        };
        snprintf(h.pool, sizeof h.pool, "%s", pool);
        snprintf(h.key_from, sizeof h.key_from, "%s", e->id);
        snprintf(h.node, sizeof h.node, "%s", e->node);
        keytable_history_add(c->table, &h);
        f.pool = pool;
        f.key = e->id;
        if (e->state == KEY_COOLING)
                f.retry_after_s = (h.cooldown_ms + 999) / 1000;
        log_event(LOG_INFO, "cluster", &f, "node %s: key %s (%u row%s here)", e->node,
                  e->state == KEY_COOLING ? "cooling" : e->state == KEY_DISABLED ? "disabled" : "enabled",
                  (unsigned) n, n == 1 ? "" : "s");
        if (e->state == KEY_READY)
                wake_workers(c);
}

static void on_message(redisAsyncContext *ac, void *reply, void *privdata) {
        struct cluster *c = privdata;
        redisReply *r = reply;
        struct cluster_event e;

        if (!r || ac != c->sub)
                return;
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 || r->element[0]->type != REDIS_REPLY_STRING) {
                reply_bad(c, r, REDIS_REPLY_ARRAY);
                return;
        }
        if (strcmp(r->element[0]->str, "subscribe") == 0) {
                c->sub_ready = true;
                link_check(c);
                return;
        }
        if (strcmp(r->element[0]->str, "message") != 0 || r->element[2]->type != REDIS_REPLY_STRING)
                return;
        if (cluster_event_parse(r->element[2]->str, r->element[2]->len, &e) < 0) {
                log_event(LOG_WARNING, "cluster", NULL, "ignoring a malformed message on %s", c->channel);
                return;
        }
        apply_event(c, &e);
}

/* --- outbound -------------------------------------------------------------------------------- */

static void on_published(redisAsyncContext *ac, void *reply, void *privdata) {
        struct cluster *c = privdata;

        if (ac == c->cmd)
                reply_bad(c, reply, REDIS_REPLY_INTEGER);
}

static void publish(struct cluster *c, const struct cluster_event *e) {
        char msg[256], key[256], state[16], reason[8], until[24], at[24], ttl[24];

        if (cluster_event_format(e, msg, sizeof msg) < 0)
                return;
        snprintf(key, sizeof key, "%skey:%s", c->cfg->prefix, e->id);
        snprintf(state, sizeof state, "%s", state_words[e->state]);
        snprintf(reason, sizeof reason, "%u", (unsigned) e->reason);
        snprintf(until, sizeof until, "%lld", (long long) e->until_wall_ms);
        snprintf(at, sizeof at, "%lld", (long long) e->at_wall_ms);
        snprintf(ttl, sizeof ttl, "%lld", (long long) KEY_HASH_TTL_MS);
        const char *argv[] = { "EVAL", event_script, "2", key, c->channel, c->cfg->node, state, reason,
                               until, at, msg, ttl };

        redisAsyncCommandArgv(c->cmd, on_published, c, (int) (sizeof argv / sizeof argv[0]), argv, NULL);
}

/* Publishes this node's events since the cursor. Not while the link is down: they wait in the
 * ring and go out, with the times they happened, when it is back. */
static void flush_events(struct cluster *c) {
        struct keytable_event ev[EVENTS_PER_POLL];
        uint64_t cursor = keytable_cluster_cursor(c->table), lost = 0;
        unsigned n;

        while (c->up && keytable_history_seq(c->table) > cursor) {
                n = keytable_history_since(c->table, cursor, ev, EVENTS_PER_POLL, &lost);
                if (lost)
                        log_event(LOG_WARNING, "cluster", NULL, "%llu events were overwritten in the history "
                                  "ring before they could be published", (unsigned long long) lost);
                cursor += lost;
                for (unsigned i = 0; i < n; i++) {
                        struct cluster_event e;

                        cursor = ev[i].seq;
                        if (strcmp(ev[i].node, c->cfg->node) == 0 && cluster_event_from_history(&ev[i], &e) == 0)
                                publish(c, &e);
                }
                if (n == 0)
                        cursor = keytable_history_seq(c->table);
                keytable_cluster_set_cursor(c->table, cursor);
        }
}

static int on_poll(sd_event_source *s, uint64_t usec, void *userdata) {
        struct cluster *c = userdata;

        flush_events(c);
        leases_tick(c);
        sd_event_source_set_time_relative(s, POLL_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

/* --- resynchronisation ------------------------------------------------------------------------ */

static void on_fetched(redisAsyncContext *ac, void *reply, void *privdata) {
        struct cluster *c = privdata;
        redisReply *r = reply;
        struct cluster_event e = { 0 };
        int64_t reason = 0;
        int st;

        if (ac != c->cmd || reply_bad(c, r, REDIS_REPLY_ARRAY))
                return;
        if (r->elements != 6) {
                link_down(c, "Redis answered a key fetch with the wrong number of fields");
                return;
        }
        for (unsigned i = 0; i < 6; i++)
                if (r->element[i]->type != REDIS_REPLY_STRING) {
                        link_down(c, "Redis answered a key fetch with a non-string field");
                        return;
                }
        if (!r->element[1]->len || !r->element[5]->len)
                return;                 /* no node ever said anything about this key */
        st = state_from_word(r->element[1]->str, r->element[1]->len);
        if (st < 0 || !parse_i64(r->element[2]->str, &reason) || reason < 0 || reason >= _KEY_REASON_MAX ||
            !parse_i64(r->element[3]->str, &e.until_wall_ms) || !parse_i64(r->element[4]->str, &e.at_wall_ms) ||
            r->element[0]->len != KEYID_ID_LEN || r->element[5]->len > KEYTABLE_NAME_MAX ||
            (st == KEY_DISABLED && reason == 0)) {
                log_event(LOG_WARNING, "cluster", NULL, "ignoring a malformed key hash in Redis");
                return;
        }
        memcpy(e.id, r->element[0]->str, KEYID_ID_LEN);
        memcpy(e.node, r->element[5]->str, r->element[5]->len);
        e.state = (enum key_state) st;
        e.reason = (enum key_reason) reason;
        apply_event(c, &e);
}

/* After (re)connecting: this node's events held back go out first, then every key's hash is
 * read back. Commands run in order on one connection, so what is read already includes them. */
static void resync(struct cluster *c) {
        const struct config *cfg = c->params->config;

        flush_events(c);
        for (unsigned p = 0; p < cfg->n_pools; p++)
                for (unsigned k = 0; k < cfg->pools[p].n_keys; k++) {
                        const char *id = cfg->pools[p].keys[k].id;
                        char key[256];

                        snprintf(key, sizeof key, "%skey:%s", c->cfg->prefix, id);
                        const char *argv[] = { "EVAL", fetch_script, "1", key, id };

                        redisAsyncCommandArgv(c->cmd, on_fetched, c, 5, argv, NULL);
                }
}

/* --- heartbeat, nodes, usage, shares ---------------------------------------------------------- */

static void apply_shares(struct cluster *c, unsigned nodes) {
        if (nodes == 0 || nodes == c->shares_for || c->leasing)
                return;
        for (unsigned i = 0; i < c->n_leases; i++)
                keytable_set_key_limits(c->table, c->leases[i].key,
                                        cluster_share(c->leases[i].max_concurrent, nodes),
                                        cluster_share(c->leases[i].rpm, nodes));
        if (c->shares_for)
                log_event(LOG_NOTICE, "cluster", NULL, "%u live node%s: each limited key's rpm and "
                          "max_concurrent here are now its 1/%u share", nodes, nodes == 1 ? "" : "s", nodes);
        c->shares_for = nodes;
}

/* --- leased budgets (cluster_lease.c decides) ------------------------------------------------ */

/* Every limited key row of the generation that serves, with its Redis keys. */
static int leases_build(struct cluster *c) {
        const struct config *cfg = c->params->config;
        unsigned n = 0;

        for (unsigned p = 0; p < cfg->n_pools; p++)
                for (unsigned k = 0; k < cfg->pools[p].n_keys; k++)
                        n += cfg->pools[p].keys[k].rpm || cfg->pools[p].keys[k].max_concurrent;
        if (n == 0)
                return 0;
        c->leases = calloc(n, sizeof *c->leases);
        if (!c->leases)
                return -ENOMEM;
        for (unsigned p = 0; p < cfg->n_pools && p < keytable_n_pools(c->table); p++) {
                struct keytable_pool_view info;

                if (keytable_pool_info(c->table, p, &info) < 0)
                        continue;
                for (unsigned k = 0; k < cfg->pools[p].n_keys && k < info.n_keys; k++) {
                        const struct config_key *key = &cfg->pools[p].keys[k];
                        struct lease *l = &c->leases[c->n_leases];

                        if (!key->rpm && !key->max_concurrent)
                                continue;
                        l->c = c;
                        l->key = info.first_key + k;
                        l->pool = p;
                        l->rpm = key->rpm;
                        l->max_concurrent = key->max_concurrent;
                        snprintf(l->rate_key, sizeof l->rate_key, "%srate:%s:%s", c->cfg->prefix,
                                 cfg->pools[p].name, key->id);
                        snprintf(l->slots_key, sizeof l->slots_key, "%sslots:%s:%s", c->cfg->prefix,
                                 cfg->pools[p].name, key->id);
                        c->n_leases++;
                }
        }
        return 0;
}

static void lease_load_script(struct cluster *c);

static void on_script_loaded(redisAsyncContext *ac, void *reply, void *privdata) {
        struct cluster *c = privdata;
        redisReply *r = reply;

        if (ac != c->cmd || reply_bad(c, r, REDIS_REPLY_STRING))
                return;
        if (r->len >= sizeof c->lease_sha) {
                link_down(c, "Redis answered SCRIPT LOAD with garbage");
                return;
        }
        memcpy(c->lease_sha, r->str, r->len);
        c->lease_sha[r->len] = '\0';
}

static void lease_load_script(struct cluster *c) {
        const char *argv[] = { "SCRIPT", "LOAD", cluster_lease_script };

        c->lease_sha[0] = '\0';
        redisAsyncCommandArgv(c->cmd, on_script_loaded, c, 3, argv, NULL);
}

/* Link up: the rows go under leases with nothing held; the first ticks lease what is needed.
 * Redis may still record slots of this node from before (a respawn, an outage): held starts at
 * the limit, so the first tick sets the record to what is really in flight. */
static void leases_start(struct cluster *c) {
        if (c->n_leases == 0)
                return;
        c->lease_gen++;
        for (unsigned i = 0; i < c->n_leases; i++) {
                struct lease *l = &c->leases[i];

                keytable_cluster_lease_mode(c->table, l->key, true, l->max_concurrent, l->rpm,
                                            clock_mono_ms());
                l->requests = 0;
                l->active_until_ms = l->next_ask_ms = l->contended_until_ms = 0;
                l->held = l->max_concurrent;
                l->outstanding = false;
        }
        c->leasing = true;
        c->shares_for = 0;
        lease_load_script(c);
}

/* Link down (or a fresh process): back to the static share of the nodes last seen. What was
 * leased is written off: Redis refills the tokens, and the slots go with this node's heartbeat. */
static void leases_stop(struct cluster *c) {
        unsigned nodes = c->live_nodes ? c->live_nodes : 1;

        c->lease_gen++;
        c->lease_sha[0] = '\0';
        for (unsigned i = 0; i < c->n_leases; i++) {
                struct lease *l = &c->leases[i];

                keytable_cluster_lease_mode(c->table, l->key, false, cluster_share(l->max_concurrent, nodes),
                                            cluster_share(l->rpm, nodes), 0);
                l->outstanding = false;
        }
        if (c->leasing && c->n_leases)
                log_event(LOG_NOTICE, "cluster", NULL, "leases given up: each limited key's rpm and "
                          "max_concurrent here are now its 1/%u share", nodes);
        c->leasing = false;
        c->shares_for = nodes;
        wake_workers(c);
}

static int64_t lease_retry_ms(const struct lease *l) {
        int64_t ms = l->rpm ? 60000 / l->rpm : LEASE_RETRY_MS;

        return ms < LEASE_RETRY_MS ? LEASE_RETRY_MS : ms > LEASE_RETRY_MAX_MS ? LEASE_RETRY_MAX_MS : ms;
}

static void on_leased(redisAsyncContext *ac, void *reply, void *privdata) {
        struct lease *l = privdata;
        struct cluster *c = l->c;
        redisReply *r = reply;
        int64_t now = clock_mono_ms();
        long long v[4];
        bool wake = false;

        l->outstanding = false;
        if (ac != c->cmd || !r || l->gen != c->lease_gen)
                return;
        if (r->type == REDIS_REPLY_ERROR && r->str && strncmp(r->str, "NOSCRIPT", 8) == 0) {
                /* Redis lost its scripts (a restart, SCRIPT FLUSH): load it again; what this ask
                 * gave back is written off. */
                lease_load_script(c);
                return;
        }
        if (reply_bad(c, r, REDIS_REPLY_ARRAY))
                return;
        if (r->elements != 4) {
                link_down(c, "Redis answered the lease script with garbage");
                return;
        }
        for (unsigned i = 0; i < 4; i++) {
                if (r->element[i]->type != REDIS_REPLY_INTEGER) {
                        link_down(c, "Redis answered the lease script with garbage");
                        return;
                }
                v[i] = r->element[i]->integer;
        }
        if (v[0] > 0 && l->asked_tokens > 0) {
                keytable_cluster_lease_add(c->table, l->key, (unsigned) (v[0] < l->asked_tokens ? v[0]
                                                                             : l->asked_tokens), now);
                wake = true;
        }
        if (l->asked_tokens > 0 && v[0] < l->asked_tokens)
                l->next_ask_ms = now + lease_retry_ms(l);
        if (v[1] >= 0)
                l->held = (unsigned) v[1];
        if (v[2])
                l->contended_until_ms = now + LEASE_CONTENDED_MS;
        if (l->raising && v[3] >= 0) {
                struct keytable_lease_view before;

                if (keytable_cluster_lease_read(c->table, l->key, &before) == 0 && (unsigned) v[3] != before.slots) {
                        wake |= (unsigned) v[3] > before.slots;
                        keytable_cluster_lease_slots(c->table, l->key, (unsigned) v[3], false, now);
                }
                if ((unsigned) v[3] <= before.slots)
                        l->next_ask_ms = now + LEASE_RETRY_MS;
        }
        if (wake)
                wake_workers(c);
}

/* One key's look at one tick: what the table says, what to do, and the ask to Redis. */
static void lease_tick_one(struct cluster *c, struct lease *l, bool waiting, int64_t now) {
        struct keytable_lease_view v;
        struct cluster_lease_plan plan;
        int tokens = 0, ask = -1;
        char s_rpm[16], s_tokens[16], s_conc[16], s_ask[16], s_floor[16], s_cms[16], node_prefix[160];

        if (l->outstanding || keytable_cluster_lease_read(c->table, l->key, &v) < 0 || !v.on)
                return;
        if (v.requests != l->requests || waiting)
                l->active_until_ms = now + LEASE_ACTIVE_MS;
        l->requests = v.requests;

        struct cluster_lease_input in = {
                .rpm = l->rpm, .max_concurrent = l->max_concurrent,
                .nodes = c->live_nodes ? c->live_nodes : 1,
                .in_flight = v.in_flight, .slots = v.slots, .left = v.left, .held = l->held,
                .ready = v.ready, .active = now < l->active_until_ms,
                .contended = now < l->contended_until_ms,
        };
        cluster_lease_plan(&in, &plan);
        if (plan.rpm_return > 0) {
                int taken = keytable_cluster_lease_take(c->table, l->key, plan.rpm_return, now);

                tokens = taken > 0 ? -taken : 0;
        } else if (plan.rpm_want > 0 && now >= l->next_ask_ms)
                tokens = (int) plan.rpm_want;
        if (plan.cap >= 0)
                keytable_cluster_lease_slots(c->table, l->key, (unsigned) plan.cap, false, now);
        if (plan.ask >= 0 && (!plan.raise || now >= l->next_ask_ms))
                ask = plan.ask;
        if (tokens == 0 && ask < 0)
                return;

        snprintf(s_rpm, sizeof s_rpm, "%u", l->rpm);
        snprintf(s_tokens, sizeof s_tokens, "%d", tokens);
        snprintf(s_conc, sizeof s_conc, "%u", l->max_concurrent);
        snprintf(s_ask, sizeof s_ask, "%d", ask);
        snprintf(s_floor, sizeof s_floor, "%u", v.in_flight);
        snprintf(s_cms, sizeof s_cms, "%d", LEASE_CONTENDED_MS);
        snprintf(node_prefix, sizeof node_prefix, "%snode:", c->cfg->prefix);
        const char *argv[] = { "EVALSHA", c->lease_sha, "2", l->rate_key, l->slots_key, c->cfg->node,
                               node_prefix, s_rpm, s_tokens, s_conc, s_ask, s_floor, s_cms };

        l->asked_tokens = tokens;
        l->raising = ask >= 0 && plan.raise;
        l->gen = c->lease_gen;
        if (redisAsyncCommandArgv(c->cmd, on_leased, l, (int) (sizeof argv / sizeof argv[0]), argv, NULL) == REDIS_OK)
                l->outstanding = true;
}

static void leases_tick(struct cluster *c) {
        int64_t now = clock_mono_ms();
        unsigned pool = UINT32_MAX;
        bool waiting = false;

        if (!c->up || !c->leasing || !c->lease_sha[0])
                return;
        for (unsigned i = 0; i < c->n_leases; i++) {
                struct lease *l = &c->leases[i];

                if (l->pool != pool) {
                        pool = l->pool;
                        waiting = keytable_cluster_pool_waiting(c->table, pool, now);
                }
                lease_tick_one(c, l, waiting, now);
        }
}

static bool parse_report(const char *s, struct keytable_node *n) {
        unsigned long long wall, req, tin, tout;
        unsigned ready, cooling, disabled, connected;

        if (sscanf(s, "%llu %llu %llu %llu %u %u %u %u", &wall, &req, &tin, &tout, &ready, &cooling,
                   &disabled, &connected) != 8)
                return false;
        n->seen_wall_ms = (int64_t) wall;
        n->requests = req;
        n->tokens_in = tin;
        n->tokens_out = tout;
        n->keys_ready = ready;
        n->keys_cooling = cooling;
        n->keys_disabled = disabled;
        n->connected = connected != 0;
        return true;
}

static void on_beat(redisAsyncContext *ac, void *reply, void *privdata) {
        struct cluster *c = privdata;
        redisReply *r = reply;
        struct keytable_node nodes[KEYTABLE_NODES_MAX];
        unsigned n = 0;
        bool self = false;

        if (ac != c->cmd || reply_bad(c, r, REDIS_REPLY_ARRAY))
                return;
        c->beat_sent_ms = 0;
        if (r->elements % 2) {
                link_down(c, "Redis answered the heartbeat with an odd list");
                return;
        }
        for (size_t i = 0; i + 1 < r->elements && n < KEYTABLE_NODES_MAX; i += 2) {
                const redisReply *name = r->element[i], *rep = r->element[i + 1];

                if (name->type != REDIS_REPLY_STRING || rep->type != REDIS_REPLY_STRING ||
                    name->len > KEYTABLE_NAME_MAX) {
                        link_down(c, "Redis answered the heartbeat with garbage");
                        return;
                }
                memset(&nodes[n], 0, sizeof nodes[n]);
                memcpy(nodes[n].name, name->str, name->len);
                if (!parse_report(rep->str, &nodes[n]))
                        continue;
                self |= strcmp(nodes[n].name, c->cfg->node) == 0;
                n++;
        }
        c->live_nodes = n + !self;
        keytable_cluster_set_nodes(c->table, nodes, n);
        keytable_cluster_set_link(c->table, true, c->live_nodes, clock_wall_ms());
        apply_shares(c, c->live_nodes);
}

static void on_usage(redisAsyncContext *ac, void *reply, void *privdata) {
        struct cluster *c = privdata;
        redisReply *r = reply;
        struct keytable_cluster_view *live;
        struct keytable_usage others = { 0 };
        int64_t pool, position;

        if (ac != c->cmd || reply_bad(c, r, REDIS_REPLY_ARRAY))
                return;
        if (r->elements < 2 || r->elements % 2 || r->element[0]->type != REDIS_REPLY_STRING ||
            r->element[1]->type != REDIS_REPLY_STRING || !parse_i64(r->element[0]->str, &pool) ||
            !parse_i64(r->element[1]->str, &position) || pool < 0 || position < 0) {
                link_down(c, "Redis answered the usage script with garbage");
                return;
        }
        live = malloc(sizeof *live);
        if (!live)
                return;
        keytable_cluster_read(c->table, live);
        for (size_t i = 2; i + 1 < r->elements; i += 2) {
                const redisReply *name = r->element[i], *val = r->element[i + 1];
                unsigned long long q[6];
                bool alive = false;

                if (name->type != REDIS_REPLY_STRING || val->type != REDIS_REPLY_STRING)
                        continue;
                if (strcmp(name->str, c->cfg->node) == 0)
                        continue;
                /* Counters of a node that is gone stop counting: "live nodes" is what is summed. */
                for (unsigned k = 0; k < live->n_nodes; k++)
                        alive |= strcmp(live->nodes[k].name, name->str) == 0;
                if (!alive || sscanf(val->str, "%llu %llu %llu %llu %llu %llu", &q[0], &q[1], &q[2], &q[3],
                                     &q[4], &q[5]) != 6)
                        continue;
                others.requests += q[0];
                others.successes += q[1];
                others.rate_limited += q[2];
                others.failures += q[3];
                others.tokens_in += q[4];
                others.tokens_out += q[5];
        }
        free(live);
        keytable_cluster_set_usage(c->table, (unsigned) pool, (unsigned) position, &others);
}

/* This node's report and every key row's counters. */
static void beat(struct cluster *c) {
        struct keytable_node me = { 0 };
        char report[256], ttl[24], nodes_key[160], node_prefix[160];
        unsigned pools = keytable_n_pools(c->table);
        int64_t now = clock_mono_ms();

        for (unsigned p = 0; p < pools; p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *kv = NULL;
                int nk = keytable_pool_read_alloc(c->table, p, now, &info, &kv);

                for (int k = 0; k < nk; k++) {
                        char key[256], val[160], ps[16], ks[16], ttl_usage[24];

                        me.requests += kv[k].requests;
                        me.tokens_in += kv[k].tokens_in;
                        me.tokens_out += kv[k].tokens_out;
                        me.keys_ready += kv[k].state == KEY_READY;
                        me.keys_cooling += kv[k].state == KEY_COOLING;
                        me.keys_disabled += kv[k].state == KEY_DISABLED;
                        snprintf(key, sizeof key, "%susage:%s:%s", c->cfg->prefix, info.name, kv[k].id);
                        snprintf(val, sizeof val, "%llu %llu %llu %llu %llu %llu",
                                 (unsigned long long) kv[k].requests, (unsigned long long) kv[k].successes,
                                 (unsigned long long) kv[k].rate_limited, (unsigned long long) kv[k].failures,
                                 (unsigned long long) kv[k].tokens_in, (unsigned long long) kv[k].tokens_out);
                        snprintf(ps, sizeof ps, "%u", p);
                        snprintf(ks, sizeof ks, "%d", k);
                        snprintf(ttl_usage, sizeof ttl_usage, "%lld", (long long) KEY_HASH_TTL_MS);
                        const char *argv[] = { "EVAL", usage_script, "1", key, c->cfg->node, val, ps, ks,
                                               ttl_usage };

                        redisAsyncCommandArgv(c->cmd, on_usage, c, 9, argv, NULL);
                }
                free(kv);
        }
        snprintf(report, sizeof report, "%lld %llu %llu %llu %u %u %u 1", (long long) clock_wall_ms(),
                 (unsigned long long) me.requests, (unsigned long long) me.tokens_in,
                 (unsigned long long) me.tokens_out, me.keys_ready, me.keys_cooling, me.keys_disabled);
        snprintf(ttl, sizeof ttl, "%d", NODE_TTL_MS);
        snprintf(nodes_key, sizeof nodes_key, "%snodes", c->cfg->prefix);
        snprintf(node_prefix, sizeof node_prefix, "%snode:", c->cfg->prefix);
        const char *argv[] = { "EVAL", beat_script, "1", nodes_key, c->cfg->node, ttl, node_prefix, report };

        redisAsyncCommandArgv(c->cmd, on_beat, c, 8, argv, NULL);
        c->beat_sent_ms = clock_mono_ms();
}

static int on_beat_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct cluster *c = userdata;

        if (c->up) {
                if (c->beat_sent_ms && clock_mono_ms() - c->beat_sent_ms > SLOW_MS)
                        link_down(c, "Redis did not answer the heartbeat within 2 s");
                else if (!c->beat_sent_ms)
                        beat(c);
        }
        sd_event_source_set_time_relative(s, BEAT_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

/* --- connecting -------------------------------------------------------------------------------- */

static void link_check(struct cluster *c) {
        if (c->up || !c->cmd_ready || !c->sub_ready)
                return;
        c->up = true;
        c->backoff_ms = 0;
        keytable_cluster_set_link(c->table, true, 0, clock_wall_ms());
        log_event(LOG_NOTICE, "cluster", NULL, "cluster: connected to Redis at %s as node %s%s",
                  c->cfg->redis, c->cfg->node, c->ever_up ? " (resynchronising)" : "");
        c->ever_up = true;
        c->reported_down = false;
        resync(c);
        beat(c);
        /* After the heartbeat, on the same connection: this node is live when the first lease
         * script runs, so no other node's script drops what it is granted. */
        leases_start(c);
}

static void on_ready_reply(redisAsyncContext *ac, void *reply, void *privdata) {
        struct cluster *c = privdata;

        if (ac != c->cmd || reply_bad(c, reply, REDIS_REPLY_STATUS))
                return;
        c->cmd_ready = true;
        link_check(c);
}

static void on_connect(const redisAsyncContext *ac, int status) {
        struct cluster *c = ac->data;

        if (status != REDIS_OK) {
                /* hiredis frees ac after this. */
                if (ac == c->cmd)
                        c->cmd = NULL;
                if (ac == c->sub)
                        c->sub = NULL;
                link_down(c, ac->errstr[0] ? ac->errstr : "cannot connect");
        }
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
        struct cluster *c = ac->data;

        if (ac != c->cmd && ac != c->sub)
                return;         /* ours, torn down on purpose */
        if (ac == c->cmd)
                c->cmd = NULL;
        if (ac == c->sub)
                c->sub = NULL;
        link_down(c, status == REDIS_OK ? "Redis closed the connection" :
                  ac->errstr[0] ? ac->errstr : "connection lost");
}

static redisAsyncContext *open_one(struct cluster *c) {
        redisAsyncContext *ac = c->cfg->redis_path ? redisAsyncConnectUnix(c->cfg->redis_path)
                                                   : redisAsyncConnect(c->cfg->redis_host, (int) c->cfg->redis_port);

        if (!ac)
                return NULL;
        if (ac->err || cluster_redis_attach(ac, c->event) < 0) {
                redisAsyncFree(ac);
                return NULL;
        }
        ac->data = c;
        redisAsyncSetConnectCallback(ac, on_connect);
        redisAsyncSetDisconnectCallback(ac, on_disconnect);
        if (c->password) {
                const char *argv[] = { "AUTH", c->password };

                redisAsyncCommandArgv(ac, NULL, NULL, 2, argv, NULL);
        }
        if (!c->cfg->redis_path && c->cfg->redis_db)
                redisAsyncCommand(ac, NULL, NULL, "SELECT %u", c->cfg->redis_db);
        return ac;
}

static void start_connect(struct cluster *c) {
        c->cmd_ready = c->sub_ready = false;
        c->cmd = open_one(c);
        c->sub = c->cmd ? open_one(c) : NULL;
        if (!c->cmd || !c->sub) {
                link_down(c, "cannot open a connection to Redis");
                return;
        }
        /* A PING after AUTH and SELECT: its PONG says both went through (their own errors show
         * as the connection closing, or as an error to the PING). */
        redisAsyncCommand(c->cmd, on_ready_reply, c, "PING");
        redisAsyncCommand(c->sub, on_message, c, "SUBSCRIBE %s", c->channel);
}

static int on_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        struct cluster *c = userdata;

        c->retry = sd_event_source_disable_unref(c->retry);
        start_connect(c);
        return 0;
}

/* Frees both connections outside hiredis's callbacks (which must not free their context) and
 * schedules the next attempt. */
static int on_teardown(sd_event_source *s, void *userdata) {
        struct cluster *c = userdata;
        redisAsyncContext *cmd = c->cmd, *sub = c->sub;

        c->teardown = sd_event_source_disable_unref(c->teardown);
        c->cmd = c->sub = NULL;
        if (cmd)
                redisAsyncFree(cmd);
        if (sub)
                redisAsyncFree(sub);
        c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : BACKOFF_MIN_MS;
        if (c->backoff_ms > BACKOFF_MAX_MS)
                c->backoff_ms = BACKOFF_MAX_MS;
        if (!c->retry && sd_event_add_time_relative(c->event, &c->retry, CLOCK_MONOTONIC,
                                                    (uint64_t) c->backoff_ms * 1000, 1000, on_retry, c) < 0)
                log_error("cluster: cannot schedule a reconnect");
        return 0;
}

static void link_down(struct cluster *c, const char *why) {
        if (c->up || !c->reported_down) {
                keytable_cluster_set_link(c->table, false, 0, clock_wall_ms());
                log_event(LOG_WARNING, "cluster", NULL, "cluster: degraded: %s; serving from this host's "
                          "table, retrying with backoff", why);
                c->reported_down = true;
        }
        c->up = false;
        c->cmd_ready = c->sub_ready = false;
        c->beat_sent_ms = 0;
        if (c->leasing)
                leases_stop(c);
        if (!c->teardown && sd_event_add_defer(c->event, &c->teardown, on_teardown, c) < 0)
                log_error("cluster: cannot schedule the teardown");
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

int cluster_run(const struct cluster_params *p) {
        struct cluster c = { .params = p, .cfg = p->config->cluster, .table = p->table };
        sigset_t mask;
        int r;

        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != p->coordinator_pid || !c.cfg)
                return 1;
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGQUIT);
        sigaddset(&mask, SIGHUP);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);
        snprintf(c.channel, sizeof c.channel, "%sevents", c.cfg->prefix);
        c.password = c.cfg->password;

        r = sd_event_new(&c.event);
        if (r >= 0)
                r = sd_event_add_signal(c.event, NULL, SIGTERM, on_signal, &c);
        if (r >= 0)
                r = sd_event_add_signal(c.event, NULL, SIGINT, on_signal, &c);
        if (r >= 0)
                r = sd_event_add_signal(c.event, NULL, SIGQUIT, on_signal, &c);
        if (r >= 0)
                r = sd_event_add_time_relative(c.event, &c.poll, CLOCK_MONOTONIC, POLL_USEC, 1000, on_poll, &c);
        if (r >= 0)
                r = sd_event_add_time_relative(c.event, &c.beat, CLOCK_MONOTONIC, BEAT_USEC, 10000,
                                               on_beat_timer, &c);
        if (r < 0) {
                log_error("cluster: cannot set up the event loop: %s", strerror(-r));
                sd_event_unref(c.event);
                return 1;
        }
        {
                struct keytable_cluster_view v;

                /* A respawn goes on with the nodes last seen (the table keeps them), and until
                 * any is seen this host counts alone: the limits stay as configured. */
                keytable_cluster_read(c.table, &v);
                c.live_nodes = v.live_nodes;
        }
        if (leases_build(&c) < 0) {
                log_error("cluster: out of memory for the leases");
                sd_event_unref(c.event);
                return 1;
        }
        /* A respawn finds the rows as the dead process left them, maybe under leases it can no
         * longer account for: the static share until the link is up. */
        leases_stop(&c);
        start_connect(&c);
        r = sd_event_loop(c.event);

        c.poll = sd_event_source_disable_unref(c.poll);
        c.beat = sd_event_source_disable_unref(c.beat);
        c.retry = sd_event_source_disable_unref(c.retry);
        c.teardown = sd_event_source_disable_unref(c.teardown);
        {
                redisAsyncContext *cmd = c.cmd, *sub = c.sub;

                c.cmd = c.sub = NULL;
                if (cmd)
                        redisAsyncFree(cmd);
                if (sub)
                        redisAsyncFree(sub);
        }
        sd_event_unref(c.event);
        free(c.leases);
        return r < 0 ? 1 : 0;
}
