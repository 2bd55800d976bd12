/* config.c — keypool.conf (libconfig) and the env file it may name.
 *
 * Owns turning the operator's files into a validated struct config: reading keypool.conf with
 * libconfig, checking every setting, building providers and pools, and the diagnostics every part
 * of the loader reports through. Loading never stops at the first problem and never logs: every
 * problem becomes one "FILE:LINE: message" line in the caller's config_diag, sorted into file
 * order, so an operator fixes a file in one pass. Messages name keys by pool and position, never
 * by content: the secret text must not reach a log through an error.
 *
 * The rest of the loader lives beside it and shares struct loader through config_internal.h:
 * config_secret.c follows env:, file: and cred: key references, config_env.c merges the pools of
 * the env file, config_listen.c checks the socket and TCP listener settings.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* asprintf */
#endif

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <libconfig.h>

#include "keypool/conf.h"
#include "keypool/envfile.h"
#include "keypool/fileio.h"
#include "keypool/keyid.h"
#include "keypool/secmem.h"

#include "config_internal.h"

#define CONFIG_WORKERS_MAX 64           /* the key table's worker slots are sized from this */
#define CONFIG_TIMEOUT_MAX 86400        /* keeps every timeout in ms within a 32-bit int */
#define CONFIG_BACKOFF_MAX_MS 600000    /* ten minutes: longer is an outage, not a backoff */
#define CONFIG_ATTEMPTS_MAX 32
#define CONFIG_PHRASES_MAX 64
#define CONFIG_PHRASE_LEN_MAX 128
#define CONFIG_PROBE_PATH_DEFAULT "/models"
#define CONFIG_STATE_FILE_DEFAULT "/var/lib/keypool/state.json"
#define CONFIG_STATE_PATH_MAX (PATH_MAX - 32) /* room for ".corrupt-<unix time>", ".tmp-<16 hex>" */
#define CONFIG_HISTORY_MIN 16
#define CONFIG_HISTORY_MAX 1048576
#define CONFIG_FILE_MAX (16u << 20)     /* far beyond any keypool.conf, even with 10,000 keys */
#define CONFIG_STRING_MAX 4096          /* names, URLs, paths, headers, tokens */

static const char *const top_level_names[] = {
        "socket", "socket_mode", "workers", "recovery_time", "client_timeout", "connect_timeout",
        "upstream_timeout", "max_connections", "max_body", "max_header", "providers", "pools",
        "env_file", "max_wait", "max_cooldown", "probe_interval", "probe_auth",
        "transient_threshold", "transient_cooldown", "cooldown_scope", "rate_limit_phrases",
        "retry", "worker_timeout", "shutdown_timeout", "state_file", "state_interval",
        "history_size", "socket_group", "http_listen", "http_allow_remote", "client_tokens",
        "admin_tokens", "header_timeout", "body_min_rate", "body_budget", "first_byte_timeout",
        "idle_timeout", "request_timeout", "cluster", NULL,
};

static const char *const provider_names[] = {
        "name", "base_url", "auth", "headers", "probe_path", "ca_file", "ca_path", "proxy", "http2",
        "tls_verify", NULL,
};
static const char *const pool_names[] = {
        "name", "provider", "model", "keys", "max_concurrent", "rpm", "connect_timeout",
        "first_byte_timeout", "idle_timeout", "request_timeout", NULL,
};
static const char *const key_group_names[] = { "key", "max_concurrent", "rpm", NULL };
static const char *const retry_names[] = {
        "backoff_initial_ms", "backoff_max_ms", "max_attempts", NULL,
};

/* A string setting's spellings and the enum values they stand for; ends with { NULL, 0 }. */
struct choice {
        const char *name;
        int value;
};

static const struct choice auth_choices[] = {
        { "bearer",         CONFIG_AUTH_BEARER },
        { "x-api-key",      CONFIG_AUTH_X_API_KEY },
        { "x-goog-api-key", CONFIG_AUTH_X_GOOG_API_KEY },
        { NULL, 0 },
};

static const struct choice scope_choices[] = {
        { "key",  CONFIG_SCOPE_KEY },
        { "pool", CONFIG_SCOPE_POOL },
        { NULL, 0 },
};

/* keypool writes these itself (the key's header, and what libcurl derives from the request), so
 * a static copy would either send a second credential or contradict the request on the wire. */
static const struct {
        const char *name;
        const char *why;
} reserved_headers[] = {
        { "Authorization",     "carries the key, which keypool puts where auth says" },
        { "x-api-key",         "carries the key, which keypool puts where auth says" },
        { "x-goog-api-key",    "carries the key, which keypool puts where auth says" },
        { "Host",              "is set by keypool from base_url" },
        { "Content-Length",    "is set by keypool for each request" },
        { "Transfer-Encoding", "is set by keypool for each request" },
        { "Connection",        "is set by keypool for each request" },
        { NULL, NULL },
};

/* --- diagnostics ------------------------------------------------------------------------------ */

void loader_wipe_free(char *s) {
        if (!s)
                return;
        explicit_bzero(s, strlen(s));
        if (!secmem_free(s))
                free(s);
}

static void diag_push(struct loader *l, char *msg, const char *file, unsigned line) {
        size_t i = l->diag->n - l->diag_first;
        unsigned long long *o;
        char **m;

        o = realloc(l->diag_order, (i + 1) * sizeof(*o));
        if (!o) {
                free(msg);
                l->oom = true;
                return;
        }
        l->diag_order = o;
        m = realloc(l->diag->messages, (l->diag->n + 1) * sizeof(*m));
        if (!m) {
                free(msg);
                l->oom = true;
                return;
        }
        /* The config file before anything it leads to; within a file by line; file-wide
         * problems ("no pools") last. */
        o[i] = (unsigned long long) (strcmp(file, l->path) != 0) << 32 | (line > 0 ? line : UINT_MAX);
        m[l->diag->n++] = msg;
        l->diag->messages = m;
}

/* Checks run setting by setting, not line by line; the operator reads the file top to bottom. */
static void diag_sort(struct loader *l) {
        size_t n;

        if (!l->diag || !l->diag_order)
                return;
        n = l->diag->n - l->diag_first;
        for (size_t i = 1; i < n; i++) {
                unsigned long long key = l->diag_order[i];
                char *msg = l->diag->messages[l->diag_first + i];
                size_t j = i;

                for (; j > 0 && l->diag_order[j - 1] > key; j--) {
                        l->diag_order[j] = l->diag_order[j - 1];
                        l->diag->messages[l->diag_first + j] = l->diag->messages[l->diag_first + j - 1];
                }
                l->diag_order[j] = key;
                l->diag->messages[l->diag_first + j] = msg;
        }
}

__attribute__((format(printf, 4, 0)))
static void diag_vadd(struct loader *l, const char *file, unsigned line, const char *fmt, va_list ap) {
        char *msg = NULL, *full = NULL;
        int r;

        l->n_errors++;
        if (!l->diag)
                return;

        if (vasprintf(&msg, fmt, ap) < 0) {
                l->oom = true;
                return;
        }
        if (line > 0)
                r = asprintf(&full, "%s:%u: %s", file, line, msg);
        else
                r = asprintf(&full, "%s: %s", file, msg);
        free(msg);
        if (r < 0) {
                l->oom = true;
                return;
        }
        diag_push(l, full, file, line);
}

__attribute__((format(printf, 4, 5)))
void loader_diag_add(struct loader *l, const char *file, unsigned line, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        diag_vadd(l, file ? file : l->path, line, fmt, ap);
        va_end(ap);
}

const char *loader_setting_file(const struct loader *l, const config_setting_t *s) {
        const char *f = config_setting_source_file(s);

        return f ? f : l->path;
}

__attribute__((format(printf, 3, 4)))
void loader_setting_error(struct loader *l, const config_setting_t *s, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        diag_vadd(l, loader_setting_file(l, s), config_setting_source_line(s), fmt, ap);
        va_end(ap);
}

const char *loader_type_name(int type) {
        switch (type) {
        case CONFIG_TYPE_GROUP:  return "a group";
        case CONFIG_TYPE_INT:
        case CONFIG_TYPE_INT64:  return "an integer";
        case CONFIG_TYPE_FLOAT:  return "a float";
        case CONFIG_TYPE_STRING: return "a string";
        case CONFIG_TYPE_BOOL:   return "a boolean";
        case CONFIG_TYPE_ARRAY:  return "an array";
        case CONFIG_TYPE_LIST:   return "a list";
        default:                 return "nothing";
        }
}

/* Edit distance, for "did you mean": a typo must not pass silently, and should be easy to fix. */
static unsigned edit_distance(const char *a, const char *b) {
        unsigned prev[33], cur[33];
        size_t la = strlen(a), lb = strlen(b);

        if (la > 32 || lb > 32)
                return UINT_MAX;
        for (size_t j = 0; j <= lb; j++)
                prev[j] = (unsigned) j;
        for (size_t i = 1; i <= la; i++) {
                cur[0] = (unsigned) i;
                for (size_t j = 1; j <= lb; j++) {
                        unsigned del = prev[j] + 1, ins = cur[j - 1] + 1;
                        unsigned sub = prev[j - 1] + (tolower((unsigned char) a[i - 1]) !=
                                                      tolower((unsigned char) b[j - 1]));
                        unsigned m = del < ins ? del : ins;

                        cur[j] = m < sub ? m : sub;
                }
                memcpy(prev, cur, sizeof(cur));
        }
        return prev[lb];
}

static bool name_in(const char *name, const char *const *names) {
        for (size_t i = 0; names[i]; i++)
                if (strcmp(name, names[i]) == 0)
                        return true;
        return false;
}

/* Reports every member of group s whose name is not in names. what prefixes the message. */
static void check_members(struct loader *l, const config_setting_t *s, const char *what,
                          const char *const *names) {
        int n = config_setting_length(s);

        for (int i = 0; i < n; i++) {
                const config_setting_t *m = config_setting_get_elem(s, (unsigned) i);
                const char *name = config_setting_name(m);
                const char *best = NULL;
                unsigned best_d = 3;

                if (!name || name_in(name, names))
                        continue;
                for (size_t j = 0; names[j]; j++) {
                        unsigned d = edit_distance(name, names[j]);

                        if (d < best_d) {
                                best_d = d;
                                best = names[j];
                        }
                }
                if (best)
                        loader_setting_error(l, m, "%sunknown setting '%s' (did you mean '%s'?)",
                                             what, name, best);
                else
                        loader_setting_error(l, m, "%sunknown setting '%s'", what, name);
        }
}

/* --- small checks ----------------------------------------------------------------------------- */

bool loader_valid_name(const char *s) {
        size_t n = strlen(s);

        if (n == 0 || n > CONFIG_NAME_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!isalnum((unsigned char) s[i]) && !strchr("_.-", s[i]))
                        return false;
        return true;
}

/* Printable ASCII without spaces: what may go into a URL, a model id or an HTTP header. */
bool loader_all_graphic(const char *s) {
        for (; *s; s++)
                if ((unsigned char) *s <= 0x20 || (unsigned char) *s >= 0x7f)
                        return false;
        return true;
}

/* Checks a base URL and returns it without trailing slashes, or NULL with *ret_problem set. */
char *loader_normalize_url(const char *url, const char **ret_problem, bool *oom) {
        size_t scheme, n;
        char *r;

        if (strncasecmp(url, "https://", 8) == 0)
                scheme = 8;
        else if (strncasecmp(url, "http://", 7) == 0)
                scheme = 7;
        else {
                *ret_problem = "must start with http:// or https://";
                return NULL;
        }
        if (!loader_all_graphic(url)) {
                *ret_problem = "must not contain whitespace or control characters";
                return NULL;
        }
        n = strlen(url);
        while (n > scheme && url[n - 1] == '/')
                n--;
        if (n == scheme || url[scheme] == '/') {
                *ret_problem = "has no host";
                return NULL;
        }
        r = strndup(url, n);
        if (!r)
                *oom = true;
        return r;
}

static char *dir_of(const char *path) {
        const char *slash = strrchr(path, '/');

        if (!slash)
                return strdup(".");
        if (slash == path)
                return strdup("/");
        return strndup(path, (size_t) (slash - path));
}

/* Relative paths in the config mean "next to the config", whatever the daemon's cwd is. */
char *loader_resolve_path(struct loader *l, const char *p) {
        char *r = NULL;

        if (p[0] == '/' || strcmp(l->dir, ".") == 0)
                r = strdup(p);
        else if (asprintf(&r, "%s/%s", l->dir, p) < 0)
                r = NULL;
        if (!r)
                l->oom = true;
        return r;
}

/* --- building the config ---------------------------------------------------------------------- */

struct config_provider *loader_provider_add(struct loader *l, const char *file, unsigned line) {
        struct config *c = l->c;

        if (c->n_providers == l->providers_cap) {
                size_t cap = l->providers_cap ? l->providers_cap * 2 : 4;
                struct config_provider *p = realloc(c->providers, cap * sizeof(*p));
                struct origin *o;

                if (!p) {
                        l->oom = true;
                        return NULL;
                }
                c->providers = p;
                o = realloc(l->provider_origin, cap * sizeof(*o));
                if (!o) {
                        l->oom = true;
                        return NULL;
                }
                l->provider_origin = o;
                l->providers_cap = cap;
        }
        l->provider_origin[c->n_providers] = (struct origin) { file, line };
        /* The defaults suit OpenAI-compatible APIs, which is what an env file's BASE_URL names. */
        c->providers[c->n_providers] = (struct config_provider) {
                .auth = CONFIG_AUTH_BEARER,
                .probe_path = strdup(CONFIG_PROBE_PATH_DEFAULT),
                .http2 = true,
                .tls_verify = true,
        };
        if (!c->providers[c->n_providers].probe_path) {
                l->oom = true;
                return NULL;
        }
        return &c->providers[c->n_providers++];
}

int loader_provider_find_name(const struct config *c, const char *name) {
        for (unsigned i = 0; i < c->n_providers; i++)
                if (c->providers[i].name && strcmp(c->providers[i].name, name) == 0)
                        return (int) i;
        return -1;
}

int loader_provider_find_url(const struct config *c, const char *url) {
        for (unsigned i = 0; i < c->n_providers; i++)
                if (c->providers[i].base_url && strcmp(c->providers[i].base_url, url) == 0)
                        return (int) i;
        return -1;
}

struct config_pool *loader_pool_add(struct loader *l, const char *file, unsigned line) {
        struct config *c = l->c;

        if (c->n_pools == l->pools_cap) {
                size_t cap = l->pools_cap ? l->pools_cap * 2 : 8;
                struct config_pool *p = realloc(c->pools, cap * sizeof(*p));
                struct origin *o;

                if (!p) {
                        l->oom = true;
                        return NULL;
                }
                c->pools = p;
                o = realloc(l->pool_origin, cap * sizeof(*o));
                if (!o) {
                        l->oom = true;
                        return NULL;
                }
                l->pool_origin = o;
                l->pools_cap = cap;
        }
        l->pool_origin[c->n_pools] = (struct origin) { file, line };
        /* The top-level settings were read before any pool: they are every pool's defaults. */
        c->pools[c->n_pools] = (struct config_pool) {
                .connect_timeout = c->connect_timeout, .first_byte_timeout = c->first_byte_timeout,
                .idle_timeout = c->idle_timeout, .request_timeout = c->request_timeout,
        };
        return &c->pools[c->n_pools++];
}

int loader_pool_find_name(const struct config *c, unsigned n, const char *name) {
        for (unsigned i = 0; i < n; i++)
                if (c->pools[i].name && strcmp(c->pools[i].name, name) == 0)
                        return (int) i;
        return -1;
}

/* FNV-1a: the set only needs an even spread, and the hash never leaves this process. */
static uint32_t secret_hash(const char *s) {
        uint32_t h = 2166136261u;

        for (; *s; s++)
                h = (h ^ (unsigned char) *s) * 16777619u;
        return h;
}

static void secret_set_free(struct loader *l) {
        free(l->secret_set);
        l->secret_set = NULL;
        l->secret_set_cap = 0;
}

/* Puts key index i of p (hash h) in the set; the set has room. */
static void secret_set_put(struct secret_slot *set, size_t cap, uint32_t h, unsigned i) {
        size_t j = h & (cap - 1);

        while (set[j].key)
                j = (j + 1) & (cap - 1);
        set[j] = (struct secret_slot) { .key = i + 1, .hash = h };
}

/* Keeps the set at most half full, counting the key about to be stored. */
static int secret_set_reserve(struct loader *l, const struct config_pool *p) {
        struct secret_slot *set;
        size_t cap;

        if ((size_t) p->n_keys + 1 <= l->secret_set_cap / 2)
                return 0;
        cap = l->secret_set_cap ? l->secret_set_cap * 2 : 16;
        set = calloc(cap, sizeof(*set));
        if (!set)
                return -ENOMEM;
        for (size_t j = 0; j < l->secret_set_cap; j++)
                if (l->secret_set[j].key)
                        secret_set_put(set, cap, l->secret_set[j].hash, l->secret_set[j].key - 1);
        free(l->secret_set);
        l->secret_set = set;
        l->secret_set_cap = cap;
        return 0;
}

/* Index + 1 of p's stored key with this secret, or 0. */
static unsigned secret_set_find(const struct loader *l, const struct config_pool *p, const char *secret,
                                uint32_t h) {
        size_t cap = l->secret_set_cap;

        if (cap == 0)
                return 0;
        for (size_t j = h & (cap - 1); l->secret_set[j].key; j = (j + 1) & (cap - 1)) {
                const struct secret_slot *e = &l->secret_set[j];

                if (e->hash == h && strcmp(p->keys[e->key - 1].secret, secret) == 0)
                        return e->key;
        }
        return 0;
}

/* Takes ownership of secret. Returns 0, or the 1-based position of an earlier key with the same
 * secret (the key is then not stored), or -1 on allocation failure. */
static int pool_add_key(struct loader *l, struct config_pool *p, char *secret, unsigned pos) {
        struct config_key *k;
        uint32_t h;
        unsigned dup;

        secret = loader_secret_keep(secret);
        if (!secret) {
                l->oom = true;
                return -1;
        }
        h = secret_hash(secret);

        /* Keys are only ever added to the newest pool: a pool without stored keys is a new one
         * (or one whose keys all failed), and the previous pool's set and capacity are stale. A
         * secret may repeat across pools (cooldown_scope = "key" relies on it), so the set is
         * per pool. */
        if (p->n_keys == 0) {
                secret_set_free(l);
                l->keys_cap = 0;
        }

        dup = secret_set_find(l, p, secret, h);
        if (dup > 0) {
                loader_wipe_free(secret);
                return (int) l->key_pos[dup - 1];
        }

        if (secret_set_reserve(l, p) < 0) {
                loader_wipe_free(secret);
                l->oom = true;
                return -1;
        }
        if (p->n_keys == l->keys_cap) {
                size_t cap = l->keys_cap ? l->keys_cap * 2 : 4;

                k = realloc(p->keys, cap * sizeof(*k));
                if (!k) {
                        loader_wipe_free(secret);
                        l->oom = true;
                        return -1;
                }
                p->keys = k;
                l->keys_cap = cap;
        }
        if (p->n_keys == l->key_pos_cap) {
                size_t cap = l->key_pos_cap ? l->key_pos_cap * 2 : 16;
                unsigned *kp = realloc(l->key_pos, cap * sizeof(*kp));

                if (!kp) {
                        loader_wipe_free(secret);
                        l->oom = true;
                        return -1;
                }
                l->key_pos = kp;
                l->key_pos_cap = cap;
        }

        k = &p->keys[p->n_keys];
        /* The pool's limits; a key group's own replace them once the key is stored. */
        *k = (struct config_key) {
                .secret = secret,
                .max_concurrent = p->max_concurrent,
                .rpm = p->rpm,
        };
        if (keyid_fingerprint(secret, strlen(secret), k->id) < 0) {
                /* Only a broken libcrypto gets here; the key cannot be named, so it cannot serve. */
                loader_wipe_free(secret);
                l->oom = true;
                return -1;
        }
        keyid_mask(secret, strlen(secret), k->masked);
        secret_set_put(l->secret_set, l->secret_set_cap, h, p->n_keys);
        l->key_pos[p->n_keys] = pos;
        p->n_keys++;
        l->c->n_keys++;
        return 0;
}

/* --- top-level settings ----------------------------------------------------------------------- */

/* Reads integer member name of group g into *ret (and its setting into *ret_setting, if not
 * NULL). Returns false when absent or wrong (the latter reported, prefixed by what: "" at the
 * top level, "retry: ", "pool 'P': " in a group). */
static bool get_integer_in(struct loader *l, const config_setting_t *g, const char *what,
                           const char *name, long long min, long long max,
                           const config_setting_t **ret_setting, long long *ret) {
        const config_setting_t *s = config_setting_get_member(g, name);
        int type;
        long long v;

        if (!s)
                return false;
        type = config_setting_type(s);
        if (type != CONFIG_TYPE_INT && type != CONFIG_TYPE_INT64) {
                loader_setting_error(l, s, "%s%s must be an integer, not %s", what, name,
                                     loader_type_name(type));
                return false;
        }
        v = config_setting_get_int64(s);
        if (v >= min && v <= max) {
                if (ret_setting)
                        *ret_setting = s;
                *ret = v;
                return true;
        }
        /* libconfig wraps integers past INT_MAX unless they carry an L suffix. */
        if (v < 0 && type == CONFIG_TYPE_INT && max > INT_MAX)
                loader_setting_error(l, s, "%s%s must be at least %lld, not %lld (write integers above "
                                     "2147483647 with an L suffix, e.g. 4294967296L)", what, name, min, v);
        else if (max == LLONG_MAX)
                loader_setting_error(l, s, "%s%s must be at least %lld, not %lld", what, name, min, v);
        else
                loader_setting_error(l, s, "%s%s must be between %lld and %lld, not %lld", what, name,
                                     min, max, v);
        return false;
}

static bool get_integer(struct loader *l, const config_setting_t *root, const char *name,
                        long long min, long long max, long long *ret) {
        return get_integer_in(l, root, "", name, min, max, NULL, ret);
}

/* As get_integer_in, for a limit of 0..max that fits an unsigned. */
static bool get_limit(struct loader *l, const config_setting_t *g, const char *what,
                      const char *name, unsigned max, unsigned *ret) {
        long long n;

        if (!get_integer_in(l, g, what, name, 0, max, NULL, &n))
                return false;
        *ret = (unsigned) n;
        return true;
}

bool loader_get_bool(struct loader *l, const config_setting_t *root, const char *name, bool *ret) {
        const config_setting_t *s = config_setting_get_member(root, name);

        if (!s)
                return false;
        if (config_setting_type(s) != CONFIG_TYPE_BOOL) {
                loader_setting_error(l, s, "%s must be true or false, not %s", name,
                                     loader_type_name(config_setting_type(s)));
                return false;
        }
        *ret = config_setting_get_bool(s) != 0;
        return true;
}

/* Reads string member name of group g as one of choices. Returns its value, or 0 when absent or
 * wrong (the latter reported). quote: may the message repeat the wrong value? Not for settings
 * next to keys, where a pasted secret would land in the log. */
static int get_choice(struct loader *l, const config_setting_t *g, const char *what,
                      const char *name, const struct choice *choices, bool quote) {
        const config_setting_t *s = config_setting_get_member(g, name);
        char list[128] = "";
        const char *v;
        size_t n = 0;

        if (!s)
                return 0;
        if (config_setting_type(s) == CONFIG_TYPE_STRING) {
                v = config_setting_get_string(s);
                for (size_t i = 0; choices[i].name; i++)
                        if (strcmp(v, choices[i].name) == 0)
                                return choices[i].value;
        } else
                v = NULL;

        for (size_t i = 0; choices[i].name; i++) {
                const char *sep = i == 0 ? "" : choices[i + 1].name ? ", " : " or ";
                int r = snprintf(list + n, sizeof(list) - n, "%s\"%s\"", sep, choices[i].name);

                if (r > 0 && (size_t) r < sizeof(list) - n)
                        n += (size_t) r;
        }
        if (!v)
                loader_setting_error(l, s, "%s%s must be %s, not %s", what, name, list,
                                     loader_type_name(config_setting_type(s)));
        else if (quote)
                loader_setting_error(l, s, "%s%s must be %s, not '%s'", what, name, list, v);
        else
                loader_setting_error(l, s, "%s%s must be %s", what, name, list);
        return 0;
}

bool loader_get_string(struct loader *l, const config_setting_t *root, const char *name,
                       const config_setting_t **ret_setting, const char **ret) {
        const config_setting_t *s = config_setting_get_member(root, name);

        if (!s)
                return false;
        if (config_setting_type(s) != CONFIG_TYPE_STRING) {
                loader_setting_error(l, s, "%s must be a string, not %s", name,
                                     loader_type_name(config_setting_type(s)));
                return false;
        }
        *ret_setting = s;
        *ret = config_setting_get_string(s);
        return true;
}

static void parse_scalars(struct loader *l, const config_setting_t *root) {
        struct config *c = l->c;
        const config_setting_t *s;
        const char *v;
        long long n;

        if (loader_get_string(l, root, "socket", &s, &v)) {
                if (!*v)
                        loader_setting_error(l, s, "socket must not be empty");
                else if (strlen(v) >= sizeof(((struct sockaddr_un *) NULL)->sun_path))
                        loader_setting_error(l, s, "socket path is longer than a UNIX socket address "
                                             "allows (%zu bytes)",
                                             sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1);
                else {
                        free(c->socket_path);
                        c->socket_path = strdup(v);
                        if (!c->socket_path)
                                l->oom = true;
                }
        }

        loader_parse_socket_mode(l, root);

        if (get_integer(l, root, "workers", 1, CONFIG_WORKERS_MAX, &n))
                c->workers = (unsigned) n;
        if (get_integer(l, root, "recovery_time", 1, 604800, &n))
                c->recovery_time = (unsigned) n;
        if (get_integer(l, root, "client_timeout", 1, CONFIG_TIMEOUT_MAX, &n))
                c->client_timeout = (unsigned) n;
        if (get_integer(l, root, "connect_timeout", 1, CONFIG_TIMEOUT_MAX, &n))
                c->connect_timeout = (unsigned) n;
        if (get_integer(l, root, "upstream_timeout", 1, CONFIG_TIMEOUT_MAX, &n))
                c->upstream_timeout = (unsigned) n;
        if (get_integer(l, root, "first_byte_timeout", 1, CONFIG_TIMEOUT_MAX, &n))
                c->first_byte_timeout = (unsigned) n;
        if (get_integer(l, root, "idle_timeout", 1, CONFIG_TIMEOUT_MAX, &n))
                c->idle_timeout = (unsigned) n;
        if (get_integer(l, root, "request_timeout", 1, CONFIG_TIMEOUT_MAX, &n))
                c->request_timeout = (unsigned) n;
        if (get_integer(l, root, "max_connections", 1, 1048576, &n))
                c->max_connections = (unsigned) n;
        if (get_integer(l, root, "max_body", 1024, LLONG_MAX, &n))
                c->max_body = (size_t) n;
        if (get_integer(l, root, "max_header", 1024, 1048576, &n))
                c->max_header = (size_t) n;
        if (get_integer(l, root, "header_timeout", 1, CONFIG_TIMEOUT_MAX, &n))
                c->header_timeout = (unsigned) n;
        if (get_integer(l, root, "body_min_rate", 0, 1073741824, &n))
                c->body_min_rate = (size_t) n;
        if (get_integer(l, root, "body_budget", 65536, LLONG_MAX, &n))
                c->body_budget = (size_t) n;
        if (get_integer(l, root, "max_wait", 0, 3600, &n))
                c->max_wait = (unsigned) n;
        if (get_integer(l, root, "max_cooldown", 1, 604800, &n))
                c->max_cooldown = (unsigned) n;
        if (get_integer(l, root, "probe_interval", 1, 604800, &n))
                c->probe_interval = (unsigned) n;
        loader_get_bool(l, root, "probe_auth", &c->probe_auth);
        if (get_integer(l, root, "transient_threshold", 0, 1000, &n))
                c->transient_threshold = (unsigned) n;
        if (get_integer(l, root, "transient_cooldown", 1, CONFIG_TIMEOUT_MAX, &n))
                c->transient_cooldown = (unsigned) n;
        if (get_integer(l, root, "worker_timeout", 2, 3600, &n))
                c->worker_timeout = (unsigned) n;
        if (get_integer(l, root, "shutdown_timeout", 1, 3600, &n))
                c->shutdown_timeout = (unsigned) n;
        {
                int scope = get_choice(l, root, "", "cooldown_scope", scope_choices, true);

                if (scope)
                        c->cooldown_scope = (enum config_cooldown_scope) scope;
        }

        if (loader_get_string(l, root, "env_file", &s, &v)) {
                if (!*v)
                        loader_setting_error(l, s, "env_file must not be empty (leave it out instead)");
                else
                        c->env_file = loader_resolve_path(l, v);
        }
}

static void parse_retry(struct loader *l, const config_setting_t *root) {
        const config_setting_t *g = config_setting_get_member(root, "retry");
        const config_setting_t *is = NULL, *ms = NULL;
        struct config_retry *r = &l->c->retry;
        bool bad = false;
        long long n;

        if (!g)
                return;
        if (config_setting_type(g) != CONFIG_TYPE_GROUP) {
                loader_setting_error(l, g, "retry must be a group { backoff_initial_ms = 1000; "
                                     "backoff_max_ms = 10000; max_attempts = 5; }, not %s",
                                     loader_type_name(config_setting_type(g)));
                return;
        }
        check_members(l, g, "retry: ", retry_names);

        if (get_integer_in(l, g, "retry: ", "backoff_initial_ms", 1, CONFIG_BACKOFF_MAX_MS, &is, &n))
                r->backoff_initial_ms = (unsigned) n;
        else if (config_setting_get_member(g, "backoff_initial_ms"))
                bad = true;
        if (get_integer_in(l, g, "retry: ", "backoff_max_ms", 1, CONFIG_BACKOFF_MAX_MS, &ms, &n))
                r->backoff_max_ms = (unsigned) n;
        else if (config_setting_get_member(g, "backoff_max_ms"))
                bad = true;
        if (get_integer_in(l, g, "retry: ", "max_attempts", 1, CONFIG_ATTEMPTS_MAX, NULL, &n))
                r->max_attempts = (unsigned) n;

        /* A cap below the first step would make every backoff the cap: surely not what was meant.
         * Blame the value the operator wrote, not a default they never saw. */
        if (bad || r->backoff_max_ms >= r->backoff_initial_ms)
                return;
        if (ms)
                loader_setting_error(l, ms, "retry: backoff_max_ms (%u) must not be less than "
                                     "backoff_initial_ms (%u)", r->backoff_max_ms, r->backoff_initial_ms);
        else
                loader_setting_error(l, is, "retry: backoff_initial_ms (%u) is above backoff_max_ms "
                                     "(%u by default): raise backoff_max_ms as well",
                                     r->backoff_initial_ms, r->backoff_max_ms);
}

static void parse_phrases(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s = config_setting_get_member(root, "rate_limit_phrases");
        struct config *c = l->c;
        int n;

        if (!s)
                return;
        if (config_setting_type(s) != CONFIG_TYPE_ARRAY && config_setting_type(s) != CONFIG_TYPE_LIST) {
                loader_setting_error(l, s, "rate_limit_phrases must be a list of strings, [ \"rate limit\", "
                                     "... ], not %s", loader_type_name(config_setting_type(s)));
                return;
        }
        n = config_setting_length(s);
        /* An empty list would silently turn off the body check, and NULL already means "the
         * built-in list": make the operator say which one they want. */
        if (n == 0) {
                loader_setting_error(l, s, "rate_limit_phrases is empty: leave it out to use the built-in "
                                     "list");
                return;
        }
        if (n > CONFIG_PHRASES_MAX) {
                loader_setting_error(l, s, "rate_limit_phrases has %d entries; at most %d are allowed",
                                     n, CONFIG_PHRASES_MAX);
                return;
        }
        c->rate_limit_phrases = calloc((size_t) n, sizeof(*c->rate_limit_phrases));
        if (!c->rate_limit_phrases) {
                l->oom = true;
                return;
        }
        for (int i = 0; i < n; i++) {
                const config_setting_t *e = config_setting_get_elem(s, (unsigned) i);
                const char *v;

                if (config_setting_type(e) != CONFIG_TYPE_STRING) {
                        loader_setting_error(l, e, "rate_limit_phrases entry %d must be a string, not %s",
                                             i + 1, loader_type_name(config_setting_type(e)));
                        continue;
                }
                v = config_setting_get_string(e);
                if (!*v) {
                        loader_setting_error(l, e, "rate_limit_phrases entry %d is empty", i + 1);
                        continue;
                }
                if (strlen(v) > CONFIG_PHRASE_LEN_MAX) {
                        loader_setting_error(l, e, "rate_limit_phrases entry %d is longer than %d characters",
                                             i + 1, CONFIG_PHRASE_LEN_MAX);
                        continue;
                }
                /* Stored in order; a load with a bad entry fails as a whole, so gaps never reach
                 * a caller. */
                c->rate_limit_phrases[c->n_rate_limit_phrases] = strdup(v);
                if (!c->rate_limit_phrases[c->n_rate_limit_phrases]) {
                        l->oom = true;
                        return;
                }
                c->n_rate_limit_phrases++;
        }
}

/* --- state and the status API ---------------------------------------------------------------- */

static void parse_state_file(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s;
        const char *v, *last;
        struct stat st;
        char *path;

        if (!loader_get_string(l, root, "state_file", &s, &v))
                return;

        /* "" is the documented way to turn persistence off: keep it, the owner checks for it. */
        if (!*v) {
                free(l->c->state_file);
                l->c->state_file = strdup("");
                if (!l->c->state_file)
                        l->oom = true;
                return;
        }

        last = strrchr(v, '/');
        last = last ? last + 1 : v;
        if (!*last || strcmp(last, ".") == 0 || strcmp(last, "..") == 0) {
                loader_setting_error(l, s, "state_file '%s' names a directory: it must name a file, e.g. "
                                     "\"" CONFIG_STATE_FILE_DEFAULT "\"", v);
                return;
        }

        path = loader_resolve_path(l, v);
        if (!path)
                return;
        if (strlen(path) > CONFIG_STATE_PATH_MAX) {
                loader_setting_error(l, s, "state_file is longer than %d bytes", CONFIG_STATE_PATH_MAX);
                free(path);
                return;
        }
        /* A rename onto a directory fails at the first snapshot, an interval after start; say it
         * now. A path that cannot be examined yet (absent, not ours to stat) is the owner's
         * business when it writes. */
        if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
                loader_setting_error(l, s, "state_file %s is a directory: it must name a file, e.g. "
                                     "\"%s/state.json\"", path, path);
                free(path);
                return;
        }
        free(l->c->state_file);
        l->c->state_file = path;
}

static void parse_api(struct loader *l, const config_setting_t *root) {
        struct config *c = l->c;
        long long n;

        parse_state_file(l, root);
        if (get_integer(l, root, "state_interval", 1, CONFIG_TIMEOUT_MAX, &n))
                c->state_interval = (unsigned) n;
        if (get_integer(l, root, "history_size", CONFIG_HISTORY_MIN, CONFIG_HISTORY_MAX, &n))
                c->history_size = (unsigned) n;
        loader_parse_socket_group(l, root);
        loader_parse_http_listen(l, root);
        loader_parse_tokens(l, root, "client_tokens", "serve TCP requests without a token",
                            &l->c->client_tokens, &l->c->n_client_tokens);
        loader_parse_tokens(l, root, "admin_tokens", "allow no admin actions over TCP",
                            &l->c->admin_tokens, &l->c->n_admin_tokens);
}

/* --- providers -------------------------------------------------------------------------------- */

/* Reads a required string member of group g; reports a missing or mistyped one. */
static const char *member_string(struct loader *l, const config_setting_t *g, const char *what,
                                 const char *name, bool required, const config_setting_t **ret_setting) {
        const config_setting_t *m = config_setting_get_member(g, name);

        if (!m) {
                if (required)
                        loader_setting_error(l, g, "%s has no %s", what, name);
                return NULL;
        }
        if (config_setting_type(m) != CONFIG_TYPE_STRING) {
                loader_setting_error(l, m, "%s: %s must be a string, not %s", what, name,
                                     loader_type_name(config_setting_type(m)));
                return NULL;
        }
        if (ret_setting)
                *ret_setting = m;
        return config_setting_get_string(m);
}

static bool is_tchar(char ch) {
        return isalnum((unsigned char) ch) || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

/* Names one character for a message without printing it raw: it may be a control byte. */
static void describe_char(char ch, char *buf, size_t size) {
        unsigned char u = (unsigned char) ch;

        if (u == ' ')
                snprintf(buf, size, "a space");
        else if (u > 0x20 && u < 0x7f)
                snprintf(buf, size, "'%c'", ch);
        else
                snprintf(buf, size, "byte 0x%02x", u);
}

/* Checks one "Name: value" and returns it as "Name: value" with the value's surrounding blanks
 * dropped, or NULL (reported). The value is never quoted: operators paste tokens into headers,
 * and a rejected one must not end up in the log. */
static char *parse_header(struct loader *l, const config_setting_t *h, const char *what, unsigned pos) {
        const char *v, *colon, *a, *z;
        char ch[16];
        char *r = NULL;
        size_t name_len;

        if (config_setting_type(h) != CONFIG_TYPE_STRING) {
                loader_setting_error(l, h, "%s: header %u must be a string \"Name: value\", not %s", what,
                                     pos, loader_type_name(config_setting_type(h)));
                return NULL;
        }
        v = config_setting_get_string(h);
        colon = strchr(v, ':');
        if (!colon) {
                loader_setting_error(l, h, "%s: header %u has no ':' (write \"Name: value\")", what, pos);
                return NULL;
        }
        name_len = (size_t) (colon - v);
        if (name_len == 0) {
                loader_setting_error(l, h, "%s: header %u has no name before ':'", what, pos);
                return NULL;
        }
        for (size_t i = 0; i < name_len; i++)
                if (!is_tchar(v[i])) {
                        describe_char(v[i], ch, sizeof(ch));
                        loader_setting_error(l, h, "%s: header %u: the name contains %s, which a header "
                                             "name cannot", what, pos, ch);
                        return NULL;
                }
        for (size_t i = 0; reserved_headers[i].name; i++)
                if (strlen(reserved_headers[i].name) == name_len &&
                    strncasecmp(v, reserved_headers[i].name, name_len) == 0) {
                        loader_setting_error(l, h, "%s: header %u: %s %s; it cannot be in headers", what,
                                             pos, reserved_headers[i].name, reserved_headers[i].why);
                        return NULL;
                }

        a = colon + 1;
        while (*a == ' ' || *a == '\t')
                a++;
        z = a + strlen(a);
        while (z > a && (z[-1] == ' ' || z[-1] == '\t'))
                z--;
        /* libcurl reads "Name:" with nothing after it as "remove this header". */
        if (z == a) {
                loader_setting_error(l, h, "%s: header %u (%.*s) has no value", what, pos, (int) name_len, v);
                return NULL;
        }
        for (const char *x = a; x < z; x++) {
                unsigned char u = (unsigned char) *x;

                /* CR or LF would let the value start a header, or a request, of its own. */
                if ((u < 0x20 && u != '\t') || u == 0x7f) {
                        loader_setting_error(l, h, "%s: header %u (%.*s): the value must not contain CR, LF "
                                             "or other control characters", what, pos, (int) name_len, v);
                        return NULL;
                }
        }

        if (asprintf(&r, "%.*s: %.*s", (int) name_len, v, (int) (z - a), a) < 0) {
                l->oom = true;
                return NULL;
        }
        return r;
}

static void parse_headers(struct loader *l, const config_setting_t *g, const char *what,
                          struct config_provider *p) {
        const config_setting_t *s = config_setting_get_member(g, "headers");
        int n;

        if (!s)
                return;
        if (config_setting_type(s) != CONFIG_TYPE_ARRAY && config_setting_type(s) != CONFIG_TYPE_LIST) {
                loader_setting_error(l, s, "%s: headers must be a list of strings, [ \"Name: value\", ... ], "
                                     "not %s", what, loader_type_name(config_setting_type(s)));
                return;
        }
        n = config_setting_length(s);
        if (n == 0)
                return;
        p->headers = calloc((size_t) n, sizeof(*p->headers));
        if (!p->headers) {
                l->oom = true;
                return;
        }
        for (int i = 0; i < n && !l->oom; i++) {
                char *h = parse_header(l, config_setting_get_elem(s, (unsigned) i), what, (unsigned) i + 1);

                if (h)
                        p->headers[p->n_headers++] = h;
        }
}

/* A provider's or pool's name: read and checked, then used in `what` ("pool 'GLM45'") for every
 * later message about the group, whose members are checked against names. NULL when missing or
 * invalid (reported). */
static const char *group_name(struct loader *l, const config_setting_t *g, const char *kind,
                              const char *const *names, char *what, size_t what_size,
                              const config_setting_t **ret_ns) {
        char prefix[CONFIG_NAME_MAX + 40];
        const char *name;

        name = member_string(l, g, what, "name", true, ret_ns);
        if (name && !loader_valid_name(name)) {
                loader_setting_error(l, *ret_ns, "%s: name '%s' " NAME_RULE, what, name);
                name = NULL;
        }
        if (name)
                snprintf(what, what_size, "%s '%s'", kind, name);
        snprintf(prefix, sizeof(prefix), "%s: ", what);
        check_members(l, g, prefix, names);
        return name;
}

/* A file or directory setting of a provider: a readable absolute path, or the setting is wrong
 * (found now rather than as a TLS failure on the first request). */
static char *provider_path(struct loader *l, const config_setting_t *g, const char *what, const char *name,
                           bool directory) {
        const config_setting_t *s = NULL;
        const char *v = member_string(l, g, what, name, false, &s);
        struct stat st;
        char *copy;

        if (!v)
                return NULL;
        if (v[0] != '/') {
                loader_setting_error(l, s, "%s: %s must be an absolute path", what, name);
                return NULL;
        }
        if (stat(v, &st) < 0 || (directory ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) ||
            access(v, R_OK) < 0) {
                loader_setting_error(l, s, "%s: %s '%s' is not a readable %s", what, name, v,
                                     directory ? "directory" : "file");
                return NULL;
        }
        copy = strdup(v);
        if (!copy)
                l->oom = true;
        return copy;
}

/* How the provider is reached: trust (ca_file, ca_path, tls_verify), egress (proxy), http2. */
static void parse_provider_transport(struct loader *l, const config_setting_t *g, const char *what,
                                     struct config_provider *p) {
        const config_setting_t *s = NULL;
        const char *proxy;

        p->ca_file = provider_path(l, g, what, "ca_file", false);
        p->ca_path = provider_path(l, g, what, "ca_path", true);
        proxy = member_string(l, g, what, "proxy", false, &s);
        if (proxy) {
                /* Not quoted: a proxy URL may carry a password. */
                if (!loader_all_graphic(proxy) || !*proxy)
                        loader_setting_error(l, s, "%s: proxy must be a URL such as \"http://proxy:3128\"", what);
                else if (!(p->proxy = strdup(proxy)))
                        l->oom = true;
        }
        /* Type errors carry the setting's line, which names the provider well enough. */
        loader_get_bool(l, g, "http2", &p->http2);
        loader_get_bool(l, g, "tls_verify", &p->tls_verify);
}

static void parse_provider(struct loader *l, const config_setting_t *g, unsigned index) {
        const config_setting_t *ns = NULL, *us = NULL;
        struct config_provider *p;
        char what[CONFIG_NAME_MAX + 32];
        const char *name, *url;

        snprintf(what, sizeof(what), "provider #%u", index + 1);
        if (config_setting_type(g) != CONFIG_TYPE_GROUP) {
                loader_setting_error(l, g, "%s must be a group { name = \"...\"; "
                                     "base_url = \"https://...\"; }, not %s", what,
                                     loader_type_name(config_setting_type(g)));
                return;
        }

        name = group_name(l, g, "provider", provider_names, what, sizeof(what), &ns);

        p = loader_provider_add(l, loader_setting_file(l, g), config_setting_source_line(g));
        if (!p)
                return;

        if (name) {
                int dup = loader_provider_find_name(l->c, name);

                if (dup >= 0)
                        loader_setting_error(l, ns, "provider '%s' is already defined at %s:%u", name,
                                             l->provider_origin[dup].file, l->provider_origin[dup].line);
                else if (!(p->name = strdup(name)))
                        l->oom = true;
        }

        url = member_string(l, g, what, "base_url", true, &us);
        if (url) {
                const char *problem = NULL;

                p->base_url = loader_normalize_url(url, &problem, &l->oom);
                if (!p->base_url && problem)
                        loader_setting_error(l, us, "%s: base_url '%s' %s", what, url, problem);
        }

        {
                char prefix[sizeof(what) + 2];
                int auth;

                snprintf(prefix, sizeof(prefix), "%s: ", what);
                /* Not quoted: "Bearer sk-..." pasted here is an easy mistake. */
                auth = get_choice(l, g, prefix, "auth", auth_choices, false);
                if (auth)
                        p->auth = (enum config_auth) auth;
        }

        parse_headers(l, g, what, p);

        url = member_string(l, g, what, "probe_path", false, &us);
        if (url) {
                /* Not quoted either: a probe path may carry a query with a key in it. */
                if (url[0] != '/')
                        loader_setting_error(l, us, "%s: probe_path must start with '/', e.g. "
                                             "\"/models\"", what);
                else if (!loader_all_graphic(url))
                        loader_setting_error(l, us, "%s: probe_path must not contain whitespace or control "
                                             "characters", what);
                else {
                        free(p->probe_path);
                        p->probe_path = strdup(url);
                        if (!p->probe_path)
                                l->oom = true;
                }
        }

        parse_provider_transport(l, g, what, p);
}

static void parse_providers(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s = config_setting_get_member(root, "providers");
        int n;

        if (!s) {
                loader_diag_add(l, l->path, 0, "no providers defined: add providers = ( { name = "
                                "\"openrouter\"; base_url = \"https://openrouter.ai/api/v1\"; } );");
                l->no_providers = true;
                return;
        }
        if (config_setting_type(s) != CONFIG_TYPE_LIST) {
                loader_setting_error(l, s, "providers must be a list of groups, ( { name = \"...\"; "
                                     "base_url = \"...\"; } ), not %s",
                                     loader_type_name(config_setting_type(s)));
                l->no_providers = true;
                return;
        }
        n = config_setting_length(s);
        if (n == 0) {
                loader_setting_error(l, s, "providers is empty: at least one provider is required");
                l->no_providers = true;
                return;
        }
        for (int i = 0; i < n; i++)
                parse_provider(l, config_setting_get_elem(s, (unsigned) i), (unsigned) i);
}

/* --- keys ------------------------------------------------------------------------------------- */

/* Adds the secret to the pool, reporting a repeat of an earlier key. Returns the stored key, or
 * NULL when it was not stored. */
struct config_key *loader_add_key(struct loader *l, struct config_pool *p, const char *who, char *secret,
                                  unsigned pos, const char *file, unsigned line) {
        int dup = pool_add_key(l, p, secret, pos);

        if (dup > 0)
                loader_diag_add(l, file, line, "%s key %u: the same key as key %d", who, pos, dup);
        return dup == 0 ? &p->keys[p->n_keys - 1] : NULL;
}

/* A key's own limits, from a key group; unset ones leave the pool's. */
struct key_limits {
        bool has_max_concurrent, has_rpm;
        unsigned max_concurrent, rpm;
};

/* Reads a key group { key = "..."; max_concurrent = N; rpm = N; }. Returns its key setting, or
 * NULL (reported) when there is no usable one; *ret_limits is written either way, so that every
 * problem in the group is reported in one pass. */
static const config_setting_t *parse_key_group(struct loader *l, const config_setting_t *g,
                                               const char *who, unsigned pos,
                                               struct key_limits *ret_limits) {
        const config_setting_t *ks = NULL;
        struct key_limits lim = {};
        char what[CONFIG_NAME_MAX + 48], prefix[sizeof(what) + 2];

        snprintf(what, sizeof(what), "%s key %u", who, pos);
        snprintf(prefix, sizeof(prefix), "%s: ", what);
        check_members(l, g, prefix, key_group_names);

        lim.has_max_concurrent = get_limit(l, g, prefix, "max_concurrent", CONFIG_CONCURRENT_MAX,
                                           &lim.max_concurrent);
        lim.has_rpm = get_limit(l, g, prefix, "rpm", CONFIG_RPM_MAX, &lim.rpm);
        *ret_limits = lim;

        if (!member_string(l, g, what, "key", true, &ks))
                return NULL;
        return ks;
}

/* --- pools ------------------------------------------------------------------------------------ */

/* A pool's own timeouts, each overriding the top-level setting of the same name. */
static void parse_pool_timeouts(struct loader *l, const config_setting_t *g, const char *prefix,
                                struct config_pool *p) {
        const struct {
                const char *name;
                unsigned *value;
        } timeouts[] = {
                { "connect_timeout",    &p->connect_timeout },
                { "first_byte_timeout", &p->first_byte_timeout },
                { "idle_timeout",       &p->idle_timeout },
                { "request_timeout",    &p->request_timeout },
        };
        long long n;

        for (size_t i = 0; i < sizeof(timeouts) / sizeof(timeouts[0]); i++)
                if (get_integer_in(l, g, prefix, timeouts[i].name, 1, CONFIG_TIMEOUT_MAX, NULL, &n))
                        *timeouts[i].value = (unsigned) n;
}

static void parse_pool(struct loader *l, const config_setting_t *g, unsigned index) {
        const config_setting_t *ns = NULL, *ms = NULL, *ps = NULL, *ks;
        struct config_pool *p;
        char what[CONFIG_NAME_MAX + 32];
        const char *name, *model, *provider;
        int n;

        snprintf(what, sizeof(what), "pool #%u", index + 1);
        if (config_setting_type(g) != CONFIG_TYPE_GROUP) {
                loader_setting_error(l, g, "%s must be a group { name = \"...\"; model = \"...\"; "
                                     "keys = [ ... ]; }, not %s", what,
                                     loader_type_name(config_setting_type(g)));
                return;
        }

        name = group_name(l, g, "pool", pool_names, what, sizeof(what), &ns);

        p = loader_pool_add(l, loader_setting_file(l, g), config_setting_source_line(g));
        if (!p)
                return;

        if (name) {
                int dup = loader_pool_find_name(l->c, l->c->n_pools - 1, name);

                if (dup >= 0)
                        loader_setting_error(l, ns, "pool '%s' is already defined at %s:%u", name,
                                             l->pool_origin[dup].file, l->pool_origin[dup].line);
                else if (!(p->name = strdup(name))) {
                        l->oom = true;
                        return;
                }
        }

        model = member_string(l, g, what, "model", true, &ms);
        if (model) {
                if (!*model || strlen(model) > CONFIG_MODEL_MAX)
                        loader_setting_error(l, ms, "%s: model must be 1 to %d characters", what,
                                             CONFIG_MODEL_MAX);
                else if (!loader_all_graphic(model))
                        loader_setting_error(l, ms, "%s: model must not contain whitespace or control "
                                             "characters", what);
                else if (!(p->model = strdup(model))) {
                        l->oom = true;
                        return;
                }
        }

        provider = member_string(l, g, what, "provider", false, &ps);
        if (provider) {
                int i = loader_provider_find_name(l->c, provider);

                if (i < 0)
                        loader_setting_error(l, ps, "%s: unknown provider '%s'", what, provider);
                else
                        p->provider = (unsigned) i;
        }
        /* Without provider the pool takes the first: p->provider is already 0. */

        /* Before the keys: each key starts from the pool's limits. */
        {
                char prefix[sizeof(what) + 2];

                snprintf(prefix, sizeof(prefix), "%s: ", what);
                get_limit(l, g, prefix, "max_concurrent", CONFIG_CONCURRENT_MAX, &p->max_concurrent);
                get_limit(l, g, prefix, "rpm", CONFIG_RPM_MAX, &p->rpm);
                parse_pool_timeouts(l, g, prefix, p);
        }

        ks = config_setting_get_member(g, "keys");
        if (!ks) {
                loader_setting_error(l, g, "%s has no keys", what);
                return;
        }
        if (config_setting_type(ks) != CONFIG_TYPE_ARRAY && config_setting_type(ks) != CONFIG_TYPE_LIST) {
                loader_setting_error(l, ks, "%s: keys must be a list of strings, [ \"...\", "
                                     "\"env:NAME\", ... ], or of key groups, ( { key = \"...\"; rpm = 60; }, "
                                     "... ), not %s", what,
                                     loader_type_name(config_setting_type(ks)));
                return;
        }
        n = config_setting_length(ks);
        if (n == 0) {
                loader_setting_error(l, ks, "%s: keys is empty: at least one key is required", what);
                return;
        }
        for (int i = 0; i < n && !l->oom; i++) {
                const config_setting_t *k = config_setting_get_elem(ks, (unsigned) i), *ref = k;
                unsigned pos = (unsigned) i + 1;
                struct key_limits lim = {};
                struct config_key *key;
                char *secret;

                if (config_setting_type(k) == CONFIG_TYPE_GROUP) {
                        ref = parse_key_group(l, k, what, pos, &lim);
                        if (!ref)
                                continue;
                } else if (config_setting_type(k) != CONFIG_TYPE_STRING) {
                        loader_setting_error(l, k, "%s key %u must be a string or a group { key = \"...\"; }, "
                                             "not %s", what, pos, loader_type_name(config_setting_type(k)));
                        continue;
                }
                secret = loader_resolve_key(l, what, pos, config_setting_get_string(ref),
                                            loader_setting_file(l, ref),
                                            config_setting_source_line(ref));
                if (!secret)
                        continue;
                key = loader_add_key(l, p, what, secret, pos, loader_setting_file(l, ref),
                                     config_setting_source_line(ref));
                if (key && lim.has_max_concurrent)
                        key->max_concurrent = lim.max_concurrent;
                if (key && lim.has_rpm)
                        key->rpm = lim.rpm;
        }
}

static void parse_pools(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s = config_setting_get_member(root, "pools");
        int n;

        /* No pools here is fine as long as the env file brings some; checked at the end. */
        if (!s)
                return;
        if (config_setting_type(s) != CONFIG_TYPE_LIST) {
                loader_setting_error(l, s, "pools must be a list of groups, ( { name = \"...\"; "
                                     "model = \"...\"; keys = [ ... ]; } ), not %s",
                                     loader_type_name(config_setting_type(s)));
                return;
        }
        n = config_setting_length(s);
        for (int i = 0; i < n && !l->oom; i++)
                parse_pool(l, config_setting_get_elem(s, (unsigned) i), (unsigned) i);
}

/* --- entry points ---------------------------------------------------------------------------- */

static unsigned default_workers(void) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);

        if (n < 1)
                return 1;
        return n > CONFIG_WORKERS_MAX ? CONFIG_WORKERS_MAX : (unsigned) n;
}

/* Reads keypool.conf through fileio, like every other file an operator names: a FIFO or a device
 * in its place is an error at once, never a wait, and a wrong path to a huge file costs no more
 * than CONFIG_FILE_MAX. libconfig then parses the text in memory; @include still opens its
 * files itself, relative to the include directory. */
static int read_config_file(struct loader *l, config_t *cf) {
        const char *text;
        char *data = NULL;
        size_t len = 0;
        const char *nul;
        int r;

        r = fileio_read(l->path, CONFIG_FILE_MAX, &data, &len);
        if (r == -EBADFD || r == -EISDIR) {
                loader_diag_add(l, l->path, 0, "not a regular file (%s)", fileio_kind(l->path));
                return r;
        }
        if (r == -EFBIG) {
                loader_diag_add(l, l->path, 0, "is larger than %u bytes: not a keypool.conf",
                                CONFIG_FILE_MAX);
                return r;
        }
        if (r < 0) {
                loader_diag_add(l, l->path, 0, "cannot open: %s", strerror(-r));
                return r;
        }

        /* Editors on other systems write one; it is no setting, and skipping it keeps lines. */
        text = data;
        if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) {
                text += 3;
                len -= 3;
        }
        /* libconfig reads a string up to its NUL: whatever followed would be dropped unseen. */
        nul = memchr(text, '\0', len);
        if (nul) {
                unsigned line = 1;

                for (const char *p = text; p < nul; p++)
                        line += *p == '\n';
                loader_diag_add(l, l->path, line, "contains a NUL byte (is this a binary file?)");
                r = -EINVAL;
        } else if (!config_read_string(cf, text)) {
                loader_diag_add(l, config_error_file(cf) ? config_error_file(cf) : l->path,
                                (unsigned) (config_error_line(cf) > 0 ? config_error_line(cf) : 0),
                                "%s", config_error_text(cf));
                r = -EINVAL;
        }
        /* The text holds every literal key. */
        explicit_bzero(data, len + (size_t) (text - data));
        free(data);
        return r;
}

/* Wipes every string of the parsed tree: libconfig frees its nodes as they are, and a key
 * written literally in keypool.conf would stay in the freed heap, which every worker inherits
 * and a core dump shows. The strings are libconfig's own heap copies, writable behind the const. */
static void wipe_strings(config_setting_t *s) {
        if (config_setting_type(s) == CONFIG_TYPE_STRING) {
                char *v = (char *) config_setting_get_string(s);

                if (v)
                        explicit_bzero(v, strlen(v));
                return;
        }
        for (int i = 0, n = config_setting_length(s); i < n; i++)
                wipe_strings(config_setting_get_elem(s, (unsigned) i));
}

/* Where a setting is, for messages: "state_file", "providers[0].base_url". */
static void setting_path(const config_setting_t *s, char *buf, size_t size) {
        const config_setting_t *parent = config_setting_parent(s);
        const char *name = config_setting_name(s);
        size_t n;

        buf[0] = '\0';
        if (parent && config_setting_parent(parent))
                setting_path(parent, buf, size);
        n = strlen(buf);
        if (name)
                snprintf(buf + n, size - n, "%s%s", n > 0 ? "." : "", name);
        else
                snprintf(buf + n, size - n, "[%d]", config_setting_index(s));
}

/* No string in keypool.conf (a name, a URL, a path, a header, a token) needs more than
 * CONFIG_STRING_MAX bytes; one that long is a paste gone wrong, and saying so once with its length
 * beats the confusing message each check would give it. Keys have their own limit and message,
 * which names them by position, so their lists are left to it. */
static void check_string_lengths(struct loader *l, const config_setting_t *s) {
        int type = config_setting_type(s);

        if (type == CONFIG_TYPE_STRING) {
                size_t n = strlen(config_setting_get_string(s));
                char where[256];

                if (n <= CONFIG_STRING_MAX)
                        return;
                setting_path(s, where, sizeof(where));
                loader_setting_error(l, s, "%s is %zu bytes; at most %u", where, n, CONFIG_STRING_MAX);
                return;
        }
        if (type != CONFIG_TYPE_GROUP && type != CONFIG_TYPE_LIST && type != CONFIG_TYPE_ARRAY)
                return;
        if (config_setting_name(s) && strcmp(config_setting_name(s), "keys") == 0)
                return;
        for (int i = 0; i < config_setting_length(s); i++)
                check_string_lengths(l, config_setting_get_elem(s, (unsigned) i));
}

int config_load(const char *path, struct config **ret, struct config_diag *diag) {
        struct loader l = { .path = path, .diag = diag, .diag_first = diag ? diag->n : 0 };
        const config_setting_t *root;
        struct config *c;
        config_t cf;
        int r;

        if (!path || !ret)
                return -EINVAL;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        l.c = c;
        *c = (struct config) {
                .socket_mode = 0660,
                .workers = default_workers(),
                .recovery_time = 900,
                .client_timeout = 60,
                .connect_timeout = 10,
                .upstream_timeout = 600,
                .first_byte_timeout = 300,
                .idle_timeout = 120,
                .request_timeout = 600,
                .max_connections = 8192,
                .max_body = 16 * 1024 * 1024,
                .max_header = 16 * 1024,
                .header_timeout = 10,
                .body_min_rate = 1024,
                .body_budget = 64 * 1024 * 1024,
                .max_wait = 30,
                .max_cooldown = 86400,
                .probe_interval = 3600,
                .transient_threshold = 3,
                .transient_cooldown = 30,
                .worker_timeout = 10,
                .shutdown_timeout = 30,
                .state_interval = 60,
                .history_size = 1024,
                .cooldown_scope = CONFIG_SCOPE_KEY,
                .retry = {
                        .backoff_initial_ms = 1000,
                        .backoff_max_ms = 10000,
                        .max_attempts = 5,
                },
        };
        c->path = strdup(path);
        c->socket_path = strdup(CONFIG_DEFAULT_SOCKET);
        c->state_file = strdup(CONFIG_STATE_FILE_DEFAULT);
        l.dir = dir_of(path);
        if (!c->path || !c->socket_path || !c->state_file || !l.dir) {
                free(l.dir);
                config_free(c);
                return -ENOMEM;
        }

        config_init(&cf);
        /* @include "x" means next to the config, like every other relative path in it. */
        config_set_include_dir(&cf, l.dir);

        r = read_config_file(&l, &cf);
        if (r < 0)
                goto finish;

        root = config_root_setting(&cf);
        check_string_lengths(&l, root);
        check_members(&l, root, "", top_level_names);
        parse_scalars(&l, root);
        parse_retry(&l, root);
        parse_phrases(&l, root);
        parse_api(&l, root);
        loader_parse_cluster(&l, root);
        parse_providers(&l, root);
        if (!l.oom)
                parse_pools(&l, root);
        if (!l.oom)
                loader_parse_env_file(&l, root);

        if (!l.oom && c->n_pools == 0) {
                if (c->env_file)
                        loader_diag_add(&l, l.path, 0, "no pools defined: add pools = ( ... ) here or "
                                        "PROVIDER_<NAME>_API_KEY lines to %s", c->env_file);
                else
                        loader_diag_add(&l, l.path, 0, "no pools defined: add pools = ( { name = \"...\"; "
                                        "model = \"...\"; keys = [ ... ]; } ) or env_file = \"orche.env\"");
        }

        r = l.oom ? -ENOMEM : l.n_errors > 0 ? -EINVAL : 0;

finish:
        if (config_root_setting(&cf))
                wipe_strings(config_root_setting(&cf));
        config_destroy(&cf);
        free(l.dir);
        free(l.pool_origin);
        free(l.provider_origin);
        free(l.key_pos);
        secret_set_free(&l);
        diag_sort(&l);
        free(l.diag_order);
        if (r < 0) {
                config_free(c);
                return r;
        }
        *ret = c;
        return 0;
}

void config_wipe_secrets(struct config *c) {
        if (!c)
                return;
        for (unsigned p = 0; p < c->n_pools; p++)
                for (unsigned k = 0; k < c->pools[p].n_keys; k++)
                        if (c->pools[p].keys[k].secret)
                                explicit_bzero(c->pools[p].keys[k].secret, strlen(c->pools[p].keys[k].secret));
        /* A proxy URL may carry a password. */
        for (unsigned i = 0; i < c->n_providers; i++)
                if (c->providers[i].proxy)
                        explicit_bzero(c->providers[i].proxy, strlen(c->providers[i].proxy));
        if (c->cluster && c->cluster->password)
                explicit_bzero(c->cluster->password, strlen(c->cluster->password));
}

void config_free(struct config *c) {
        if (!c)
                return;

        for (unsigned i = 0; i < c->n_pools; i++) {
                struct config_pool *p = &c->pools[i];

                for (unsigned k = 0; k < p->n_keys; k++)
                        loader_wipe_free(p->keys[k].secret);
                free(p->keys);
                free(p->name);
                free(p->model);
        }
        free(c->pools);

        for (unsigned i = 0; i < c->n_providers; i++) {
                struct config_provider *p = &c->providers[i];

                free(p->name);
                free(p->base_url);
                for (unsigned h = 0; h < p->n_headers; h++)
                        free(p->headers[h]);
                free(p->headers);
                free(p->probe_path);
                free(p->ca_file);
                free(p->ca_path);
                loader_wipe_free(p->proxy);
        }
        free(c->providers);

        for (unsigned i = 0; i < c->n_rate_limit_phrases; i++)
                free(c->rate_limit_phrases[i]);
        free(c->rate_limit_phrases);

        for (unsigned i = 0; i < c->n_client_tokens; i++)
                loader_wipe_free(c->client_tokens[i]);
        free(c->client_tokens);
        for (unsigned i = 0; i < c->n_admin_tokens; i++)
                loader_wipe_free(c->admin_tokens[i]);
        free(c->admin_tokens);

        free(c->path);
        free(c->socket_path);
        free(c->env_file);
        free(c->state_file);
        free(c->socket_group);
        free(c->http_listen);
        config_cluster_free(c->cluster);
        free(c);
}

void config_diag_clear(struct config_diag *d) {
        if (!d)
                return;
        for (size_t i = 0; i < d->n; i++)
                free(d->messages[i]);
        free(d->messages);
        *d = (struct config_diag) {};
}

int config_find_pool(const struct config *c, const char *s, size_t len) {
        if (!c || (!s && len > 0))
                return -1;

        for (unsigned i = 0; i < c->n_pools; i++)
                if (c->pools[i].name && strlen(c->pools[i].name) == len &&
                    memcmp(c->pools[i].name, s, len) == 0)
                        return (int) i;
        for (unsigned i = 0; i < c->n_pools; i++)
                if (c->pools[i].model && strlen(c->pools[i].model) == len &&
                    memcmp(c->pools[i].model, s, len) == 0)
                        return (int) i;
        return -1;
}

const struct config_key *config_pool_key(const struct config_pool *p, unsigned first_key, unsigned key) {
        if (!p || key < first_key || key - first_key >= p->n_keys)
                return NULL;
        return &p->keys[key - first_key];
}
