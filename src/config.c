/* config.c — keypool.conf (libconfig) and the env file it may name.
 *
 * Owns turning the operator's files into a validated struct config: reading keypool.conf with
 * libconfig, following env:, file: and cred: key references, merging the pools of the deployed
 * env file, and checking everything before the daemon relies on any of it. Loading never stops
 * at the first problem and never logs: every problem becomes one "FILE:LINE: message" line in
 * the caller's config_diag, so an operator fixes a file in one pass. Messages name keys by pool
 * and position, never by content: the secret text must not reach a log through an error.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* asprintf */
#endif

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <netinet/in.h>
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
#include "keypool/keyid.h"

#define CONFIG_NAME_MAX   63            /* pool and provider names; the key table's limit */
#define CONFIG_MODEL_MAX  127           /* the key table's limit */
#define CONFIG_SECRET_MAX 4096          /* far above any provider's key; bounds file: reads */
#define CONFIG_WORKERS_MAX 64           /* the key table's worker slots are sized from this */
#define CONFIG_TIMEOUT_MAX 86400        /* keeps every timeout in ms within a 32-bit int */
#define CONFIG_BACKOFF_MAX_MS 600000    /* ten minutes: longer is an outage, not a backoff */
#define CONFIG_ATTEMPTS_MAX 32
#define CONFIG_CONCURRENT_MAX 100000
#define CONFIG_RPM_MAX 1000000
#define CONFIG_PHRASES_MAX 64
#define CONFIG_PHRASE_LEN_MAX 128
#define CONFIG_PROBE_PATH_DEFAULT "/models"
#define CONFIG_STATE_FILE_DEFAULT "/var/lib/keypool/state.json"
#define CONFIG_STATE_PATH_MAX (PATH_MAX - 32) /* room for ".corrupt-<unix time>" and ".tmp" */
#define CONFIG_HISTORY_MIN 16
#define CONFIG_HISTORY_MAX 1048576
#define CONFIG_TOKENS_MAX 1024
#define CONFIG_DIGEST_HEX 64                  /* SHA-256 in hexadecimal */
#define CONFIG_GROUP_BUF_MAX (1024 * 1024)    /* getgr*_r buffer cap: a group that big is an attack */

#define NAME_RULE "must be 1 to 63 letters, digits, '_', '.' or '-'"

#define ENV_PREFIX         "PROVIDER_"
#define ENV_API_KEY        "_API_KEY"
#define ENV_BACKUP_KEYS    "_BACKUP_KEYS"
#define ENV_MODEL          "_MODEL"
#define ENV_BASE_URL       "_BASE_URL"
#define ENV_MAX_CONCURRENT "_MAX_CONCURRENT"
#define ENV_RPM            "_RPM"

/* A slot of the secret set: index + 1 of a stored key (0: empty) and its secret's hash. */
struct secret_slot {
        uint32_t key;
        uint32_t hash;
};

/* Where a pool or provider was defined, for "already defined at" messages. */
struct origin {
        const char *file;
        unsigned line;
};

struct loader {
        const char *path;                       /* as given, for messages */
        char *dir;                              /* the config's directory, for relative paths */
        struct config_diag *diag;
        unsigned n_errors;
        bool oom;

        struct config *c;
        size_t pools_cap, providers_cap;
        struct origin *pool_origin;             /* parallel to c->pools */
        struct origin *provider_origin;         /* parallel to c->providers */
        bool no_providers;                      /* reported once, not again by every pool */

        /* 1-based positions in the file of the current pool's stored keys: a key that failed to
         * resolve is not stored, and messages must still count it. */
        unsigned *key_pos;
        size_t key_pos_cap;
        size_t keys_cap;                        /* of the current pool's keys array */

        /* The current pool's stored secrets, by hash, so that a repeated key is found without
         * comparing every pair: a pool of 10,000 keys would otherwise cost 50 million strcmp
         * before the daemon is ready. Holds indices into the pool's keys, never the secrets. */
        struct secret_slot *secret_set;
        size_t secret_set_cap;                  /* a power of two, or 0 */

        /* The env file's entries sorted by name while its pools are read: each pool looks up
         * five variables, and scanning the file for each would make a file of many pools cost
         * pools × lines comparisons. */
        const struct envfile_entry **env_sorted;
        size_t n_env_sorted;

        /* Sort keys of the messages this load added, so they come out in file order. */
        size_t diag_first;
        unsigned long long *diag_order;
};

static const char *const top_level_names[] = {
        "socket", "socket_mode", "workers", "recovery_time", "client_timeout", "connect_timeout",
        "upstream_timeout", "max_connections", "max_body", "max_header", "providers", "pools",
        "env_file", "max_wait", "max_cooldown", "probe_interval", "probe_auth",
        "transient_threshold", "transient_cooldown", "cooldown_scope", "rate_limit_phrases",
        "retry", "worker_timeout", "shutdown_timeout", "state_file", "state_interval",
        "history_size", "socket_group", "http_listen", "http_allow_remote", "client_tokens", NULL,
};

static const char *const provider_names[] = {
        "name", "base_url", "auth", "headers", "probe_path", "ca_file", "ca_path", "proxy", "http2",
        "tls_verify", NULL,
};
static const char *const pool_names[] = {
        "name", "provider", "model", "keys", "max_concurrent", "rpm", NULL,
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

static void wipe_free(char *s) {
        if (!s)
                return;
        explicit_bzero(s, strlen(s));
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
static void diag_add(struct loader *l, const char *file, unsigned line, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        diag_vadd(l, file ? file : l->path, line, fmt, ap);
        va_end(ap);
}

static const char *setting_file(const struct loader *l, const config_setting_t *s) {
        const char *f = config_setting_source_file(s);

        return f ? f : l->path;
}

__attribute__((format(printf, 3, 4)))
static void setting_error(struct loader *l, const config_setting_t *s, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        diag_vadd(l, setting_file(l, s), config_setting_source_line(s), fmt, ap);
        va_end(ap);
}

static const char *type_name(int type) {
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
                        setting_error(l, m, "%sunknown setting '%s' (did you mean '%s'?)",
                                      what, name, best);
                else
                        setting_error(l, m, "%sunknown setting '%s'", what, name);
        }
}

/* --- small checks ----------------------------------------------------------------------------- */

static bool valid_name(const char *s) {
        size_t n = strlen(s);

        if (n == 0 || n > CONFIG_NAME_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!isalnum((unsigned char) s[i]) && !strchr("_.-", s[i]))
                        return false;
        return true;
}

/* Printable ASCII without spaces: what may go into a URL, a model id or an HTTP header. */
static bool all_graphic(const char *s) {
        for (; *s; s++)
                if ((unsigned char) *s <= 0x20 || (unsigned char) *s >= 0x7f)
                        return false;
        return true;
}

/* Why a resolved secret cannot be used, or NULL when it can. Never quotes the secret. */
static const char *secret_problem(const char *s) {
        size_t n = strlen(s);

        if (n == 0)
                return "is empty";
        if (n > CONFIG_SECRET_MAX)
                return "is longer than 4096 bytes";
        for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char) s[i];

                if (c <= 0x20 || c == 0x7f)
                        return "contains whitespace or control characters";
                if (c >= 0x80)
                        return "contains non-ASCII characters";
        }
        return NULL;
}

/* Checks a base URL and returns it without trailing slashes, or NULL with *ret_problem set. */
static char *normalize_url(const char *url, const char **ret_problem, bool *oom) {
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
        if (!all_graphic(url)) {
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
static char *resolve_path(struct loader *l, const char *p) {
        char *r = NULL;

        if (p[0] == '/' || strcmp(l->dir, ".") == 0)
                r = strdup(p);
        else if (asprintf(&r, "%s/%s", l->dir, p) < 0)
                r = NULL;
        if (!r)
                l->oom = true;
        return r;
}

/* Reads the first line of path, without its line end. 0, or -errno; -EFBIG when it is longer
 * than any secret may be. */
static int read_first_line(const char *path, char **ret) {
        char buf[CONFIG_SECRET_MAX + 2];
        size_t n = 0;
        struct stat st;
        FILE *f;
        int c, r = 0;

        f = fopen(path, "re");
        if (!f)
                return -errno;
        if (fstat(fileno(f), &st) < 0)
                r = -errno;
        else if (S_ISDIR(st.st_mode))
                r = -EISDIR;
        if (r < 0) {
                fclose(f);
                return r;
        }

        while ((c = getc(f)) != EOF && c != '\n') {
                if (n == sizeof(buf) - 1) {
                        r = -EFBIG;
                        break;
                }
                buf[n++] = (char) c;
        }
        if (r == 0 && ferror(f))
                r = -EIO;
        fclose(f);

        if (n > 0 && buf[n - 1] == '\r')
                n--;
        buf[n] = '\0';

        if (r == 0 && memchr(buf, '\0', n))
                r = -EBADMSG;           /* a NUL would silently cut the key short */
        if (r == 0) {
                *ret = strdup(buf);
                if (!*ret)
                        r = -ENOMEM;
        }
        explicit_bzero(buf, sizeof(buf));
        return r;
}

/* --- building the config ---------------------------------------------------------------------- */

static struct config_provider *provider_add(struct loader *l, const char *file, unsigned line) {
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

static int provider_find_name(const struct config *c, const char *name) {
        for (unsigned i = 0; i < c->n_providers; i++)
                if (c->providers[i].name && strcmp(c->providers[i].name, name) == 0)
                        return (int) i;
        return -1;
}

static int provider_find_url(const struct config *c, const char *url) {
        for (unsigned i = 0; i < c->n_providers; i++)
                if (c->providers[i].base_url && strcmp(c->providers[i].base_url, url) == 0)
                        return (int) i;
        return -1;
}

static struct config_pool *pool_add(struct loader *l, const char *file, unsigned line) {
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
        c->pools[c->n_pools] = (struct config_pool) {};
        return &c->pools[c->n_pools++];
}

static int pool_find_name(const struct config *c, unsigned n, const char *name) {
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
        uint32_t h = secret_hash(secret);
        unsigned dup;

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
                wipe_free(secret);
                return (int) l->key_pos[dup - 1];
        }

        if (secret_set_reserve(l, p) < 0) {
                wipe_free(secret);
                l->oom = true;
                return -1;
        }
        if (p->n_keys == l->keys_cap) {
                size_t cap = l->keys_cap ? l->keys_cap * 2 : 4;

                k = realloc(p->keys, cap * sizeof(*k));
                if (!k) {
                        wipe_free(secret);
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
                        wipe_free(secret);
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
                wipe_free(secret);
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
                setting_error(l, s, "%s%s must be an integer, not %s", what, name, type_name(type));
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
                setting_error(l, s, "%s%s must be at least %lld, not %lld (write integers above "
                              "2147483647 with an L suffix, e.g. 4294967296L)", what, name, min, v);
        else if (max == LLONG_MAX)
                setting_error(l, s, "%s%s must be at least %lld, not %lld", what, name, min, v);
        else
                setting_error(l, s, "%s%s must be between %lld and %lld, not %lld", what, name,
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

static bool get_bool(struct loader *l, const config_setting_t *root, const char *name, bool *ret) {
        const config_setting_t *s = config_setting_get_member(root, name);

        if (!s)
                return false;
        if (config_setting_type(s) != CONFIG_TYPE_BOOL) {
                setting_error(l, s, "%s must be true or false, not %s", name,
                              type_name(config_setting_type(s)));
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
                setting_error(l, s, "%s%s must be %s, not %s", what, name, list,
                              type_name(config_setting_type(s)));
        else if (quote)
                setting_error(l, s, "%s%s must be %s, not '%s'", what, name, list, v);
        else
                setting_error(l, s, "%s%s must be %s", what, name, list);
        return 0;
}

static bool get_string(struct loader *l, const config_setting_t *root, const char *name,
                       const config_setting_t **ret_setting, const char **ret) {
        const config_setting_t *s = config_setting_get_member(root, name);

        if (!s)
                return false;
        if (config_setting_type(s) != CONFIG_TYPE_STRING) {
                setting_error(l, s, "%s must be a string, not %s", name, type_name(config_setting_type(s)));
                return false;
        }
        *ret_setting = s;
        *ret = config_setting_get_string(s);
        return true;
}

static void parse_socket_mode(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s = config_setting_get_member(root, "socket_mode");
        unsigned long mode;

        if (!s)
                return;

        switch (config_setting_type(s)) {
        case CONFIG_TYPE_STRING: {
                const char *v = config_setting_get_string(s);
                char *end = NULL;

                errno = 0;
                mode = strtoul(v, &end, 8);
                if (!*v || errno != 0 || *end || mode > 0777 || v[0] == '-' || v[0] == '+' ||
                    isspace((unsigned char) v[0])) {
                        setting_error(l, s, "socket_mode '%s' is not an octal mode between 0000 "
                                      "and 0777", v);
                        return;
                }
                break;
        }
        case CONFIG_TYPE_INT:
        case CONFIG_TYPE_INT64: {
                long long v = config_setting_get_int64(s);

                /* libconfig has no octal literals: 0660 arrives as decimal 660. Read its digits
                 * as octal, the way chmod does; hexadecimal (0x1b0) is taken at its value. */
                if (config_setting_get_format(s) == CONFIG_FORMAT_HEX)
                        mode = v >= 0 && v <= 0777 ? (unsigned long) v : ULONG_MAX;
                else if (v < 0 || v > 777)
                        mode = ULONG_MAX;
                else {
                        mode = 0;
                        for (long long d = v, shift = 0; d > 0; d /= 10, shift += 3) {
                                if (d % 10 > 7) {
                                        mode = ULONG_MAX;
                                        break;
                                }
                                mode |= (unsigned long) (d % 10) << shift;
                        }
                }
                if (mode == ULONG_MAX) {
                        setting_error(l, s, "socket_mode %lld is not a mode between 0000 and 0777 "
                                      "(write it as an octal string, e.g. \"0660\")", v);
                        return;
                }
                break;
        }
        default:
                setting_error(l, s, "socket_mode must be an octal string such as \"0660\", not %s",
                              type_name(config_setting_type(s)));
                return;
        }

        l->c->socket_mode = (unsigned) mode;
}

static void parse_scalars(struct loader *l, const config_setting_t *root) {
        struct config *c = l->c;
        const config_setting_t *s;
        const char *v;
        long long n;

        if (get_string(l, root, "socket", &s, &v)) {
                if (!*v)
                        setting_error(l, s, "socket must not be empty");
                else if (strlen(v) >= sizeof(((struct sockaddr_un *) NULL)->sun_path))
                        setting_error(l, s, "socket path is longer than a UNIX socket address allows "
                                      "(%zu bytes)", sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1);
                else {
                        free(c->socket_path);
                        c->socket_path = strdup(v);
                        if (!c->socket_path)
                                l->oom = true;
                }
        }

        parse_socket_mode(l, root);

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
        if (get_integer(l, root, "max_connections", 1, 1048576, &n))
                c->max_connections = (unsigned) n;
        if (get_integer(l, root, "max_body", 1024, LLONG_MAX, &n))
                c->max_body = (size_t) n;
        if (get_integer(l, root, "max_header", 1024, 1048576, &n))
                c->max_header = (size_t) n;
        if (get_integer(l, root, "max_wait", 0, 3600, &n))
                c->max_wait = (unsigned) n;
        if (get_integer(l, root, "max_cooldown", 1, 604800, &n))
                c->max_cooldown = (unsigned) n;
        if (get_integer(l, root, "probe_interval", 1, 604800, &n))
                c->probe_interval = (unsigned) n;
        get_bool(l, root, "probe_auth", &c->probe_auth);
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

        if (get_string(l, root, "env_file", &s, &v)) {
                if (!*v)
                        setting_error(l, s, "env_file must not be empty (leave it out instead)");
                else
                        c->env_file = resolve_path(l, v);
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
                setting_error(l, g, "retry must be a group { backoff_initial_ms = 1000; "
                              "backoff_max_ms = 10000; max_attempts = 5; }, not %s",
                              type_name(config_setting_type(g)));
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
                setting_error(l, ms, "retry: backoff_max_ms (%u) must not be less than "
                              "backoff_initial_ms (%u)", r->backoff_max_ms, r->backoff_initial_ms);
        else
                setting_error(l, is, "retry: backoff_initial_ms (%u) is above backoff_max_ms "
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
                setting_error(l, s, "rate_limit_phrases must be a list of strings, [ \"rate limit\", "
                              "... ], not %s", type_name(config_setting_type(s)));
                return;
        }
        n = config_setting_length(s);
        /* An empty list would silently turn off the body check, and NULL already means "the
         * built-in list": make the operator say which one they want. */
        if (n == 0) {
                setting_error(l, s, "rate_limit_phrases is empty: leave it out to use the built-in "
                              "list");
                return;
        }
        if (n > CONFIG_PHRASES_MAX) {
                setting_error(l, s, "rate_limit_phrases has %d entries; at most %d are allowed",
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
                        setting_error(l, e, "rate_limit_phrases entry %d must be a string, not %s",
                                      i + 1, type_name(config_setting_type(e)));
                        continue;
                }
                v = config_setting_get_string(e);
                if (!*v) {
                        setting_error(l, e, "rate_limit_phrases entry %d is empty", i + 1);
                        continue;
                }
                if (strlen(v) > CONFIG_PHRASE_LEN_MAX) {
                        setting_error(l, e, "rate_limit_phrases entry %d is longer than %d characters",
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

/* --- state, socket group and the TCP listener -------------------------------------------------- */

static void parse_state_file(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s;
        const char *v, *last;
        struct stat st;
        char *path;

        if (!get_string(l, root, "state_file", &s, &v))
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
                setting_error(l, s, "state_file '%s' names a directory: it must name a file, e.g. "
                              "\"" CONFIG_STATE_FILE_DEFAULT "\"", v);
                return;
        }

        path = resolve_path(l, v);
        if (!path)
                return;
        if (strlen(path) > CONFIG_STATE_PATH_MAX) {
                setting_error(l, s, "state_file is longer than %d bytes", CONFIG_STATE_PATH_MAX);
                free(path);
                return;
        }
        /* A rename onto a directory fails at the first snapshot, an interval after start; say it
         * now. A path that cannot be examined yet (absent, not ours to stat) is the owner's
         * business when it writes. */
        if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
                setting_error(l, s, "state_file %s is a directory: it must name a file, e.g. "
                              "\"%s/state.json\"", path, path);
                free(path);
                return;
        }
        free(l->c->state_file);
        l->c->state_file = path;
}

/* Whether group s (a name, or a gid in digits) exists: 0 with *ret set, or -errno when the
 * group database could not answer. */
static int group_exists(const char *s, bool *ret) {
        long hint = sysconf(_SC_GETGR_R_SIZE_MAX);
        size_t size = hint > 0 ? (size_t) hint : 1024;
        bool numeric = *s != '\0';
        unsigned long long gid = 0;

        for (const char *p = s; *p; p++) {
                if (*p < '0' || *p > '9') {
                        numeric = false;
                        break;
                }
                if (gid <= UINT32_MAX)
                        gid = gid * 10 + (unsigned) (*p - '0');
        }
        /* (gid_t) -1 means "no change" to chown: no group can have it. */
        if (numeric && gid >= UINT32_MAX) {
                *ret = false;
                return 0;
        }

        for (;;) {
                struct group g, *found = NULL;
                char *buf = malloc(size);
                int r;

                if (!buf)
                        return -ENOMEM;
                if (numeric)
                        r = getgrgid_r((gid_t) gid, &g, buf, size, &found);
                else
                        r = getgrnam_r(s, &g, buf, size, &found);
                free(buf);

                if (r == ERANGE && size < CONFIG_GROUP_BUF_MAX) {
                        size *= 2;
                        continue;
                }
                /* The manual lists these as what some systems say for "no such group". */
                if (r == 0 || r == ENOENT || r == ESRCH || r == EBADF || r == EPERM) {
                        *ret = found != NULL;
                        return 0;
                }
                return -r;
        }
}

static void parse_socket_group(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s = config_setting_get_member(root, "socket_group");
        char digits[24];
        const char *v;
        bool exists = false;
        int r;

        if (!s)
                return;

        switch (config_setting_type(s)) {
        case CONFIG_TYPE_STRING:
                v = config_setting_get_string(s);
                break;
        case CONFIG_TYPE_INT:
        case CONFIG_TYPE_INT64: {
                long long gid = config_setting_get_int64(s);

                if (gid < 0 || gid >= UINT32_MAX) {
                        setting_error(l, s, "socket_group %lld is not a group id", gid);
                        return;
                }
                snprintf(digits, sizeof(digits), "%lld", gid);
                v = digits;
                break;
        }
        default:
                setting_error(l, s, "socket_group must be a group name or id, not %s",
                              type_name(config_setting_type(s)));
                return;
        }

        /* "" says what leaving it out says: the daemon's own group. */
        if (!*v)
                return;
        if (!all_graphic(v) || strlen(v) > 256) {
                setting_error(l, s, "socket_group must be a group name or id without whitespace or "
                              "control characters");
                return;
        }

        r = group_exists(v, &exists);
        if (r == -ENOMEM) {
                l->oom = true;
                return;
        }
        if (r < 0) {
                setting_error(l, s, "cannot look up group '%s': %s", v, strerror(-r));
                return;
        }
        if (!exists) {
                setting_error(l, s, "group '%s' does not exist", v);
                return;
        }
        l->c->socket_group = strdup(v);
        if (!l->c->socket_group)
                l->oom = true;
}

/* Why listen ("HOST:PORT") cannot be served, or NULL; *ret_loopback tells whether only this
 * host can reach it. */
static const char *listen_problem(const char *listen, bool *ret_loopback) {
        char host[INET6_ADDRSTRLEN + 1];
        const char *colon, *h, *p;
        size_t n;
        unsigned port = 0;

        if (listen[0] == '[') {
                const char *close = strchr(listen, ']');

                if (!close)
                        return "has no ']' after the IPv6 address";
                h = listen + 1;
                n = (size_t) (close - h);
                if (close[1] != ':')
                        return "must be HOST:PORT, e.g. \"127.0.0.1:8002\"";
                colon = close + 1;
        } else {
                colon = strrchr(listen, ':');
                if (!colon)
                        return "must be HOST:PORT, e.g. \"127.0.0.1:8002\"";
                if (memchr(listen, ':', (size_t) (colon - listen)))
                        return "has an IPv6 address without brackets: write \"[::1]:8002\"";
                h = listen;
                n = (size_t) (colon - listen);
        }

        for (p = colon + 1; *p >= '0' && *p <= '9'; p++)
                if (port <= 65535)
                        port = port * 10 + (unsigned) (*p - '0');
        if (p == colon + 1 || *p || port < 1 || port > 65535)
                return "must end in a port between 1 and 65535";

        if (n == 0 || n >= sizeof(host))
                return "must have an IPv4 address, an [IPv6] address or localhost before the port";
        memcpy(host, h, n);
        host[n] = '\0';

        if (listen[0] == '[') {
                struct in6_addr a6;

                if (inet_pton(AF_INET6, host, &a6) != 1)
                        return "has no valid IPv6 address in the brackets";
                /* ::ffff:127.0.0.1 is IPv4's loopback seen through an IPv6 socket. */
                *ret_loopback = IN6_IS_ADDR_LOOPBACK(&a6) ||
                                (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
        } else if (strcasecmp(host, "localhost") == 0)
                *ret_loopback = true;
        else {
                struct in_addr a4;

                /* inet_pton, not inet_aton: "127.1" or "0x7f.1" would pass there, and an
                 * operator should read the address the daemon binds. */
                if (inet_pton(AF_INET, host, &a4) != 1)
                        return "must have an IPv4 address, an [IPv6] address or localhost before "
                               "the port (host names other than localhost are not resolved)";
                *ret_loopback = (ntohl(a4.s_addr) >> 24) == 127;
        }
        return NULL;
}

static void parse_http_listen(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s, *allow = config_setting_get_member(root, "http_allow_remote");
        const char *v, *problem;
        bool loopback = false;

        get_bool(l, root, "http_allow_remote", &l->c->http_allow_remote);

        if (!get_string(l, root, "http_listen", &s, &v))
                return;
        if (!*v) {
                setting_error(l, s, "http_listen must not be empty (leave it out for no TCP listener)");
                return;
        }
        if (!all_graphic(v)) {
                setting_error(l, s, "http_listen must not contain whitespace or control characters");
                return;
        }
        problem = listen_problem(v, &loopback);
        if (problem) {
                setting_error(l, s, "http_listen '%s' %s", v, problem);
                return;
        }
        /* Anyone who reaches the port reads every key's state, and with a token steers them: off
         * this host only when the operator says so in as many words. A mistyped
         * http_allow_remote is reported on its own; a second message here would only repeat it. */
        if (!loopback && !l->c->http_allow_remote) {
                if (!allow || config_setting_type(allow) == CONFIG_TYPE_BOOL)
                        setting_error(l, s, "http_listen '%s' is not a loopback address: set "
                                      "http_allow_remote = true; to serve other hosts (and set "
                                      "client_tokens)", v);
                return;
        }
        l->c->http_listen = strdup(v);
        if (!l->c->http_listen)
                l->oom = true;
}

static int hex_value(char ch) {
        if (ch >= '0' && ch <= '9')
                return ch - '0';
        ch = (char) tolower((unsigned char) ch);
        if (ch >= 'a' && ch <= 'f')
                return ch - 'a' + 10;
        return -1;
}

/* Why token digest v is unusable, or NULL. Never quotes v: an operator who pastes the token
 * itself instead of its digest must not find it in the journal. */
static const char *digest_problem(const char *v) {
        size_t n = 0;

        while (v[n] && hex_value(v[n]) >= 0)
                n++;
        if (n == CONFIG_DIGEST_HEX && (v[n] == ' ' || v[n] == '\t'))
                return "has text after its 64 hexadecimal digits (copy the digest only, not "
                       "sha256sum's \"  -\")";
        if (n != CONFIG_DIGEST_HEX || v[n])
                return "must be the SHA-256 digest of a token: 64 hexadecimal digits "
                       "(printf %s \"$TOKEN\" | sha256sum)";
        return NULL;
}

static void parse_client_tokens(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s = config_setting_get_member(root, "client_tokens");
        struct config *c = l->c;
        int *pos, n;

        if (!s)
                return;
        if (config_setting_type(s) != CONFIG_TYPE_ARRAY && config_setting_type(s) != CONFIG_TYPE_LIST) {
                setting_error(l, s, "client_tokens must be a list of SHA-256 hex digests, "
                              "[ \"<64 hex digits>\", ... ], not %s", type_name(config_setting_type(s)));
                return;
        }
        n = config_setting_length(s);
        /* An empty list would read like "lock it down" and mean "no token needed". */
        if (n == 0) {
                setting_error(l, s, "client_tokens is empty: leave it out to serve TCP requests "
                              "without a token");
                return;
        }
        if (n > CONFIG_TOKENS_MAX) {
                setting_error(l, s, "client_tokens has %d entries; at most %d are allowed",
                              n, CONFIG_TOKENS_MAX);
                return;
        }
        c->client_tokens = calloc((size_t) n, sizeof(*c->client_tokens));
        /* 1-based positions in the file of the stored digests: messages count entries as written. */
        pos = calloc((size_t) n, sizeof(*pos));
        if (!c->client_tokens || !pos) {
                free(pos);
                l->oom = true;
                return;
        }
        for (int i = 0; i < n; i++) {
                const config_setting_t *e = config_setting_get_elem(s, (unsigned) i);
                const char *problem;
                unsigned j;
                char *d;

                if (config_setting_type(e) != CONFIG_TYPE_STRING) {
                        setting_error(l, e, "client_tokens entry %d must be a string, not %s",
                                      i + 1, type_name(config_setting_type(e)));
                        continue;
                }
                problem = digest_problem(config_setting_get_string(e));
                if (problem) {
                        setting_error(l, e, "client_tokens entry %d %s", i + 1, problem);
                        continue;
                }
                d = strdup(config_setting_get_string(e));
                if (!d) {
                        l->oom = true;
                        break;
                }
                /* Stored lowercase, so the listener compares with one memcmp against its own hex. */
                for (char *p = d; *p; p++)
                        *p = (char) tolower((unsigned char) *p);
                for (j = 0; j < c->n_client_tokens; j++)
                        if (strcmp(c->client_tokens[j], d) == 0)
                                break;
                if (j < c->n_client_tokens) {
                        setting_error(l, e, "client_tokens entry %d is the same digest as entry %d",
                                      i + 1, pos[j]);
                        wipe_free(d);
                        continue;
                }
                pos[c->n_client_tokens] = i + 1;
                c->client_tokens[c->n_client_tokens++] = d;
        }
        free(pos);
}

static void parse_api(struct loader *l, const config_setting_t *root) {
        struct config *c = l->c;
        long long n;

        parse_state_file(l, root);
        if (get_integer(l, root, "state_interval", 1, CONFIG_TIMEOUT_MAX, &n))
                c->state_interval = (unsigned) n;
        if (get_integer(l, root, "history_size", CONFIG_HISTORY_MIN, CONFIG_HISTORY_MAX, &n))
                c->history_size = (unsigned) n;
        parse_socket_group(l, root);
        parse_http_listen(l, root);
        parse_client_tokens(l, root);
}

/* --- providers -------------------------------------------------------------------------------- */

/* Reads a required string member of group g; reports a missing or mistyped one. */
static const char *member_string(struct loader *l, const config_setting_t *g, const char *what,
                                 const char *name, bool required, const config_setting_t **ret_setting) {
        const config_setting_t *m = config_setting_get_member(g, name);

        if (!m) {
                if (required)
                        setting_error(l, g, "%s has no %s", what, name);
                return NULL;
        }
        if (config_setting_type(m) != CONFIG_TYPE_STRING) {
                setting_error(l, m, "%s: %s must be a string, not %s", what, name,
                              type_name(config_setting_type(m)));
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
                setting_error(l, h, "%s: header %u must be a string \"Name: value\", not %s", what,
                              pos, type_name(config_setting_type(h)));
                return NULL;
        }
        v = config_setting_get_string(h);
        colon = strchr(v, ':');
        if (!colon) {
                setting_error(l, h, "%s: header %u has no ':' (write \"Name: value\")", what, pos);
                return NULL;
        }
        name_len = (size_t) (colon - v);
        if (name_len == 0) {
                setting_error(l, h, "%s: header %u has no name before ':'", what, pos);
                return NULL;
        }
        for (size_t i = 0; i < name_len; i++)
                if (!is_tchar(v[i])) {
                        describe_char(v[i], ch, sizeof(ch));
                        setting_error(l, h, "%s: header %u: the name contains %s, which a header "
                                      "name cannot", what, pos, ch);
                        return NULL;
                }
        for (size_t i = 0; reserved_headers[i].name; i++)
                if (strlen(reserved_headers[i].name) == name_len &&
                    strncasecmp(v, reserved_headers[i].name, name_len) == 0) {
                        setting_error(l, h, "%s: header %u: %s %s; it cannot be in headers", what,
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
                setting_error(l, h, "%s: header %u (%.*s) has no value", what, pos, (int) name_len, v);
                return NULL;
        }
        for (const char *x = a; x < z; x++) {
                unsigned char u = (unsigned char) *x;

                /* CR or LF would let the value start a header, or a request, of its own. */
                if ((u < 0x20 && u != '\t') || u == 0x7f) {
                        setting_error(l, h, "%s: header %u (%.*s): the value must not contain CR, LF "
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
                setting_error(l, s, "%s: headers must be a list of strings, [ \"Name: value\", ... ], "
                              "not %s", what, type_name(config_setting_type(s)));
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
        if (name && !valid_name(name)) {
                setting_error(l, *ret_ns, "%s: name '%s' " NAME_RULE, what, name);
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
                setting_error(l, s, "%s: %s must be an absolute path", what, name);
                return NULL;
        }
        if (stat(v, &st) < 0 || (directory ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) ||
            access(v, R_OK) < 0) {
                setting_error(l, s, "%s: %s '%s' is not a readable %s", what, name, v,
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
                if (!all_graphic(proxy) || !*proxy)
                        setting_error(l, s, "%s: proxy must be a URL such as \"http://proxy:3128\"", what);
                else if (!(p->proxy = strdup(proxy)))
                        l->oom = true;
        }
        /* Type errors carry the setting's line, which names the provider well enough. */
        get_bool(l, g, "http2", &p->http2);
        get_bool(l, g, "tls_verify", &p->tls_verify);
}

static void parse_provider(struct loader *l, const config_setting_t *g, unsigned index) {
        const config_setting_t *ns = NULL, *us = NULL;
        struct config_provider *p;
        char what[CONFIG_NAME_MAX + 32];
        const char *name, *url;

        snprintf(what, sizeof(what), "provider #%u", index + 1);
        if (config_setting_type(g) != CONFIG_TYPE_GROUP) {
                setting_error(l, g, "%s must be a group { name = \"...\"; base_url = \"https://...\"; }, "
                              "not %s", what, type_name(config_setting_type(g)));
                return;
        }

        name = group_name(l, g, "provider", provider_names, what, sizeof(what), &ns);

        p = provider_add(l, setting_file(l, g), config_setting_source_line(g));
        if (!p)
                return;

        if (name) {
                int dup = provider_find_name(l->c, name);

                if (dup >= 0)
                        setting_error(l, ns, "provider '%s' is already defined at %s:%u", name,
                                      l->provider_origin[dup].file, l->provider_origin[dup].line);
                else if (!(p->name = strdup(name)))
                        l->oom = true;
        }

        url = member_string(l, g, what, "base_url", true, &us);
        if (url) {
                const char *problem = NULL;

                p->base_url = normalize_url(url, &problem, &l->oom);
                if (!p->base_url && problem)
                        setting_error(l, us, "%s: base_url '%s' %s", what, url, problem);
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
                        setting_error(l, us, "%s: probe_path must start with '/', e.g. \"/models\"", what);
                else if (!all_graphic(url))
                        setting_error(l, us, "%s: probe_path must not contain whitespace or control "
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
                diag_add(l, l->path, 0, "no providers defined: add providers = ( { name = \"openrouter\"; "
                         "base_url = \"https://openrouter.ai/api/v1\"; } );");
                l->no_providers = true;
                return;
        }
        if (config_setting_type(s) != CONFIG_TYPE_LIST) {
                setting_error(l, s, "providers must be a list of groups, ( { name = \"...\"; "
                              "base_url = \"...\"; } ), not %s", type_name(config_setting_type(s)));
                l->no_providers = true;
                return;
        }
        n = config_setting_length(s);
        if (n == 0) {
                setting_error(l, s, "providers is empty: at least one provider is required");
                l->no_providers = true;
                return;
        }
        for (int i = 0; i < n; i++)
                parse_provider(l, config_setting_get_elem(s, (unsigned) i), (unsigned) i);
}

/* --- keys ------------------------------------------------------------------------------------- */

/* Follows a key reference. Returns the secret (heap), or NULL with the problem reported at
 * file:line as "<who> key N: ...", who being "pool 'P'". */
static char *resolve_key(struct loader *l, const char *who, unsigned pos, const char *ref,
                         const char *file, unsigned line) {
        const char *problem;
        char *secret = NULL;

        if (strncmp(ref, "env:", 4) == 0) {
                const char *name = ref + 4, *v;

                if (!*name) {
                        diag_add(l, file, line, "%s key %u: env: needs a variable name", who, pos);
                        return NULL;
                }
                v = getenv(name);
                if (!v) {
                        diag_add(l, file, line, "%s key %u: environment variable %s is not set",
                                 who, pos, name);
                        return NULL;
                }
                problem = secret_problem(v);
                if (problem) {
                        diag_add(l, file, line, "%s key %u: environment variable %s %s",
                                 who, pos, name, problem);
                        return NULL;
                }
                secret = strdup(v);

        } else if (strncmp(ref, "file:", 5) == 0 || strncmp(ref, "cred:", 5) == 0) {
                bool cred = ref[0] == 'c';
                const char *name = ref + 5;
                char *path = NULL;
                char label[PATH_MAX + 32];
                int r;

                if (!*name) {
                        diag_add(l, file, line, "%s key %u: %.5s needs a %s", who, pos, ref,
                                 cred ? "credential name" : "path");
                        return NULL;
                }
                if (cred) {
                        const char *dir = getenv("CREDENTIALS_DIRECTORY");

                        if (strchr(name, '/') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
                                diag_add(l, file, line, "%s key %u: credential name '%s' is not "
                                         "a plain file name", who, pos, name);
                                return NULL;
                        }
                        if (!dir || !*dir) {
                                diag_add(l, file, line, "%s key %u: credential %s: "
                                         "CREDENTIALS_DIRECTORY is not set (LoadCredential= in the "
                                         "service unit provides it)", who, pos, name);
                                return NULL;
                        }
                        if (asprintf(&path, "%s/%s", dir, name) < 0)
                                path = NULL;
                        snprintf(label, sizeof(label), "credential %s", name);
                } else {
                        path = resolve_path(l, name);
                        if (path)
                                snprintf(label, sizeof(label), "file %s", path);
                }
                if (!path) {
                        l->oom = true;
                        return NULL;
                }

                r = read_first_line(path, &secret);
                free(path);
                if (r == -ENOMEM) {
                        l->oom = true;
                        return NULL;
                }
                if (r == -EFBIG) {
                        diag_add(l, file, line, "%s key %u: %s: the first line is longer than "
                                 "%d bytes", who, pos, label, CONFIG_SECRET_MAX);
                        return NULL;
                }
                if (r == -EBADMSG) {
                        diag_add(l, file, line, "%s key %u: %s: the first line contains a NUL byte",
                                 who, pos, label);
                        return NULL;
                }
                if (r < 0) {
                        diag_add(l, file, line, "%s key %u: %s: %s", who, pos, label, strerror(-r));
                        return NULL;
                }
                problem = secret_problem(secret);
                if (problem) {
                        diag_add(l, file, line, "%s key %u: %s: the key %s", who, pos, label,
                                 *secret ? problem : "is empty (it must be on the first line)");
                        wipe_free(secret);
                        return NULL;
                }
                return secret;

        } else {
                problem = secret_problem(ref);
                if (problem) {
                        diag_add(l, file, line, "%s key %u: the key %s", who, pos, problem);
                        return NULL;
                }
                secret = strdup(ref);
        }

        if (!secret)
                l->oom = true;
        return secret;
}

/* Adds the secret to the pool, reporting a repeat of an earlier key. Returns the stored key, or
 * NULL when it was not stored. */
static struct config_key *add_key(struct loader *l, struct config_pool *p, const char *who, char *secret,
                                  unsigned pos, const char *file, unsigned line) {
        int dup = pool_add_key(l, p, secret, pos);

        if (dup > 0)
                diag_add(l, file, line, "%s key %u: the same key as key %d", who, pos, dup);
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

static void parse_pool(struct loader *l, const config_setting_t *g, unsigned index) {
        const config_setting_t *ns = NULL, *ms = NULL, *ps = NULL, *ks;
        struct config_pool *p;
        char what[CONFIG_NAME_MAX + 32];
        const char *name, *model, *provider;
        int n;

        snprintf(what, sizeof(what), "pool #%u", index + 1);
        if (config_setting_type(g) != CONFIG_TYPE_GROUP) {
                setting_error(l, g, "%s must be a group { name = \"...\"; model = \"...\"; "
                              "keys = [ ... ]; }, not %s", what, type_name(config_setting_type(g)));
                return;
        }

        name = group_name(l, g, "pool", pool_names, what, sizeof(what), &ns);

        p = pool_add(l, setting_file(l, g), config_setting_source_line(g));
        if (!p)
                return;

        if (name) {
                int dup = pool_find_name(l->c, l->c->n_pools - 1, name);

                if (dup >= 0)
                        setting_error(l, ns, "pool '%s' is already defined at %s:%u", name,
                                      l->pool_origin[dup].file, l->pool_origin[dup].line);
                else if (!(p->name = strdup(name))) {
                        l->oom = true;
                        return;
                }
        }

        model = member_string(l, g, what, "model", true, &ms);
        if (model) {
                if (!*model || strlen(model) > CONFIG_MODEL_MAX)
                        setting_error(l, ms, "%s: model must be 1 to %d characters", what,
                                      CONFIG_MODEL_MAX);
                else if (!all_graphic(model))
                        setting_error(l, ms, "%s: model must not contain whitespace or control "
                                      "characters", what);
                else if (!(p->model = strdup(model))) {
                        l->oom = true;
                        return;
                }
        }

        provider = member_string(l, g, what, "provider", false, &ps);
        if (provider) {
                int i = provider_find_name(l->c, provider);

                if (i < 0)
                        setting_error(l, ps, "%s: unknown provider '%s'", what, provider);
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
        }

        ks = config_setting_get_member(g, "keys");
        if (!ks) {
                setting_error(l, g, "%s has no keys", what);
                return;
        }
        if (config_setting_type(ks) != CONFIG_TYPE_ARRAY && config_setting_type(ks) != CONFIG_TYPE_LIST) {
                setting_error(l, ks, "%s: keys must be a list of strings, [ \"...\", \"env:NAME\", ... ], "
                              "or of key groups, ( { key = \"...\"; rpm = 60; }, ... ), not %s", what,
                              type_name(config_setting_type(ks)));
                return;
        }
        n = config_setting_length(ks);
        if (n == 0) {
                setting_error(l, ks, "%s: keys is empty: at least one key is required", what);
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
                        setting_error(l, k, "%s key %u must be a string or a group { key = \"...\"; }, "
                                      "not %s", what, pos, type_name(config_setting_type(k)));
                        continue;
                }
                secret = resolve_key(l, what, pos, config_setting_get_string(ref), setting_file(l, ref),
                                     config_setting_source_line(ref));
                if (!secret)
                        continue;
                key = add_key(l, p, what, secret, pos, setting_file(l, ref), config_setting_source_line(ref));
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
                setting_error(l, s, "pools must be a list of groups, ( { name = \"...\"; model = \"...\"; "
                              "keys = [ ... ]; } ), not %s", type_name(config_setting_type(s)));
                return;
        }
        n = config_setting_length(s);
        for (int i = 0; i < n && !l->oom; i++)
                parse_pool(l, config_setting_get_elem(s, (unsigned) i), (unsigned) i);
}

/* --- the env file ---------------------------------------------------------------------------- */

static int env_entry_compare(const void *a, const void *b) {
        const struct envfile_entry *const *x = a, *const *y = b;

        return strcmp((*x)->name, (*y)->name);
}

static int env_entry_find(const void *key, const void *elem) {
        const struct envfile_entry *const *x = elem;

        return strcmp(key, (*x)->name);
}

/* Names are unique in a parsed env file (a later assignment replaces an earlier one), so the
 * sorted index finds the same entry a scan would. */
static int env_index(struct loader *l, const struct envfile *e) {
        l->env_sorted = calloc(e->n + 1, sizeof(*l->env_sorted));
        if (!l->env_sorted)
                return -ENOMEM;
        for (size_t i = 0; i < e->n; i++)
                l->env_sorted[i] = &e->entries[i];
        l->n_env_sorted = e->n;
        qsort(l->env_sorted, e->n, sizeof(*l->env_sorted), env_entry_compare);
        return 0;
}

static const struct envfile_entry *env_entry(const struct loader *l, const char *fmt, const char *pool) {
        const struct envfile_entry *const *x;
        char var[512];

        snprintf(var, sizeof(var), fmt, pool);
        x = bsearch(var, l->env_sorted, l->n_env_sorted, sizeof(*l->env_sorted), env_entry_find);
        return x ? *x : NULL;
}

/* Picks the provider for an env-file pool from PROVIDER_<NAME>_BASE_URL, adding one when no
 * configured provider serves that URL. Returns its index, or -1 (reported). */
static int env_pool_provider(struct loader *l, const char *ef, const char *pool) {
        const struct envfile_entry *u = env_entry(l, ENV_PREFIX "%s" ENV_BASE_URL, pool);
        const char *problem = NULL;
        struct config_provider *p;
        char lower[CONFIG_NAME_MAX + 1];
        char *url;
        int i;

        if (!u)
                return l->no_providers ? -1 : 0;

        url = normalize_url(u->value, &problem, &l->oom);
        if (!url) {
                if (problem)
                        diag_add(l, ef, u->line, ENV_PREFIX "%s" ENV_BASE_URL " %s", pool, problem);
                return -1;
        }

        i = provider_find_url(l->c, url);
        if (i >= 0) {
                free(url);
                return i;
        }

        for (size_t j = 0; pool[j]; j++)
                lower[j] = (char) tolower((unsigned char) pool[j]);
        lower[strlen(pool)] = '\0';

        i = provider_find_name(l->c, lower);
        if (i >= 0) {
                diag_add(l, ef, u->line, "no provider has the base_url of " ENV_PREFIX "%s" ENV_BASE_URL
                         ", and the name '%s' for a new one is taken by the provider defined at %s:%u",
                         pool, lower, l->provider_origin[i].file, l->provider_origin[i].line);
                free(url);
                return -1;
        }

        p = provider_add(l, ef, u->line);
        if (!p) {
                free(url);
                return -1;
        }
        p->base_url = url;
        p->name = strdup(lower);
        if (!p->name) {
                l->oom = true;
                return -1;
        }
        return (int) (l->c->n_providers - 1);
}

/* Reads the variable fmt names for pool as a limit of 0..max into *ret; absent leaves *ret
 * alone. */
static void env_limit(struct loader *l, const char *ef, const char *fmt,
                      const char *pool, unsigned max, unsigned *ret) {
        const struct envfile_entry *x = env_entry(l, fmt, pool);
        unsigned long long v = 0;
        const char *s;

        if (!x)
                return;

        /* Digits only: strtoul would take " 5", "+5" and "-5" (as a huge number) in silence. */
        for (s = x->value; *s >= '0' && *s <= '9'; s++)
                if (v <= max)
                        v = v * 10 + (unsigned) (*s - '0');
        if (s == x->value || *s) {
                diag_add(l, ef, x->line, "pool '%s': %s must be an integer between 0 and %u",
                         pool, x->name, max);
                return;
        }
        if (v > max) {
                diag_add(l, ef, x->line, "pool '%s': %s must be between 0 and %u, not %s",
                         pool, x->name, max, x->value);
                return;
        }
        *ret = (unsigned) v;
}

static void env_pool(struct loader *l, const char *ef, const struct envfile_entry *api,
                     const char *name) {
        const struct envfile_entry *m, *b;
        const char *problem;
        struct config_pool *p;
        int dup, prov;
        unsigned pos = 1;
        char who[CONFIG_NAME_MAX + 16];
        char *secret;

        if (!valid_name(name)) {
                diag_add(l, ef, api->line, "%s: pool name '%s' " NAME_RULE, api->name, name);
                return;
        }

        dup = pool_find_name(l->c, l->c->n_pools, name);
        if (dup >= 0) {
                diag_add(l, ef, api->line, "pool '%s' is already defined at %s:%u", name,
                         l->pool_origin[dup].file, l->pool_origin[dup].line);
                return;
        }

        snprintf(who, sizeof(who), "pool '%.63s'", name);
        p = pool_add(l, ef, api->line);
        if (!p)
                return;
        p->name = strdup(name);
        if (!p->name) {
                l->oom = true;
                return;
        }

        m = env_entry(l, ENV_PREFIX "%s" ENV_MODEL, name);
        if (!m)
                diag_add(l, ef, api->line, "pool '%s': " ENV_PREFIX "%s" ENV_MODEL " is not set",
                         name, name);
        else if (!*m->value || strlen(m->value) > CONFIG_MODEL_MAX)
                diag_add(l, ef, m->line, "pool '%s': " ENV_PREFIX "%s" ENV_MODEL " must be 1 to %d "
                         "characters", name, name, CONFIG_MODEL_MAX);
        else if (!all_graphic(m->value))
                diag_add(l, ef, m->line, "pool '%s': " ENV_PREFIX "%s" ENV_MODEL " must not contain "
                         "whitespace or control characters", name, name);
        else if (!(p->model = strdup(m->value))) {
                l->oom = true;
                return;
        }

        prov = env_pool_provider(l, ef, name);
        if (prov >= 0)
                p->provider = (unsigned) prov;

        /* Before the keys, which take the pool's limits when they are added. */
        env_limit(l, ef, ENV_PREFIX "%s" ENV_MAX_CONCURRENT, name, CONFIG_CONCURRENT_MAX,
                  &p->max_concurrent);
        env_limit(l, ef, ENV_PREFIX "%s" ENV_RPM, name, CONFIG_RPM_MAX, &p->rpm);

        /* Values in the env file are taken as they are: no env:/file:/cred: references. */
        problem = secret_problem(api->value);
        if (problem)
                diag_add(l, ef, api->line, "pool '%s' key 1: %s %s", name, api->name, problem);
        else if (!(secret = strdup(api->value))) {
                l->oom = true;
                return;
        } else
                add_key(l, p, who, secret, pos, ef, api->line);
        pos++;

        b = env_entry(l, ENV_PREFIX "%s" ENV_BACKUP_KEYS, name);
        if (!b)
                return;
        for (const char *s = b->value; *s && !l->oom;) {
                const char *end = strchr(s, ','), *a = s, *z;

                if (!end)
                        end = s + strlen(s);
                z = end;
                while (a < z && (*a == ' ' || *a == '\t'))
                        a++;
                while (z > a && (z[-1] == ' ' || z[-1] == '\t'))
                        z--;
                if (z > a) {
                        secret = strndup(a, (size_t) (z - a));
                        if (!secret) {
                                l->oom = true;
                                return;
                        }
                        problem = secret_problem(secret);
                        if (problem) {
                                diag_add(l, ef, b->line, "pool '%s' key %u (in %s): the key %s",
                                         name, pos, b->name, problem);
                                wipe_free(secret);
                        } else
                                add_key(l, p, who, secret, pos, ef, b->line);
                        pos++;
                }
                s = *end ? end + 1 : end;
        }
}

static bool has_affixes(const char *s, const char *prefix, const char *suffix, size_t *ret_mid) {
        size_t n = strlen(s), np = strlen(prefix), ns = strlen(suffix);

        if (n < np + ns || strncmp(s, prefix, np) != 0 || strcmp(s + n - ns, suffix) != 0)
                return false;
        *ret_mid = n - np - ns;
        return true;
}

static void parse_env_file(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s = config_setting_get_member(root, "env_file");
        const char *ef = l->c->env_file;
        struct envfile e = {};
        unsigned err_line = 0;
        int r;

        if (!ef)
                return;

        r = envfile_load(ef, &e, &err_line);
        if (r == -ENOMEM) {
                l->oom = true;
                return;
        }
        if (r == -EINVAL && err_line > 0) {
                diag_add(l, ef, err_line, "syntax error (expected NAME=value, a comment or a blank line; "
                         "is a quote left open?)");
                return;
        }
        if (r < 0) {
                diag_add(l, s ? setting_file(l, s) : l->path, s ? config_setting_source_line(s) : 0,
                         "env_file %s: %s", ef, strerror(-r));
                return;
        }

        if (env_index(l, &e) < 0) {
                l->oom = true;
                envfile_free(&e);
                return;
        }
        for (size_t i = 0; i < e.n && !l->oom; i++) {
                const struct envfile_entry *x = &e.entries[i];
                size_t mid;
                char name[256];

                if (has_affixes(x->name, ENV_PREFIX, ENV_API_KEY, &mid)) {
                        if (mid == 0 || mid >= sizeof(name)) {
                                diag_add(l, ef, x->line, "%s does not name a pool", x->name);
                                continue;
                        }
                        memcpy(name, x->name + strlen(ENV_PREFIX), mid);
                        name[mid] = '\0';
                        env_pool(l, ef, x, name);

                } else if (has_affixes(x->name, ENV_PREFIX, ENV_BACKUP_KEYS, &mid) && mid > 0 &&
                           mid < sizeof(name)) {
                        /* Backups without a primary would be dropped without a word: a typo in
                         * the _API_KEY name must not cost a pool. */
                        memcpy(name, x->name + strlen(ENV_PREFIX), mid);
                        name[mid] = '\0';
                        if (!env_entry(l, ENV_PREFIX "%s" ENV_API_KEY, name))
                                diag_add(l, ef, x->line, "%s is set but " ENV_PREFIX "%s" ENV_API_KEY
                                         " is not", x->name, name);
                }
        }

        free(l->env_sorted);
        l->env_sorted = NULL;
        l->n_env_sorted = 0;
        envfile_free(&e);
}

/* --- entry points ---------------------------------------------------------------------------- */

static unsigned default_workers(void) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);

        if (n < 1)
                return 1;
        return n > CONFIG_WORKERS_MAX ? CONFIG_WORKERS_MAX : (unsigned) n;
}

static int read_config_file(struct loader *l, config_t *cf) {
        struct stat st;
        FILE *f;
        int r = 0;

        f = fopen(l->path, "re");
        if (!f) {
                r = -errno;
                diag_add(l, l->path, 0, "cannot open: %s", strerror(-r));
                return r;
        }
        if (fstat(fileno(f), &st) < 0)
                r = -errno;
        else if (S_ISDIR(st.st_mode))
                r = -EISDIR;
        if (r < 0) {
                diag_add(l, l->path, 0, "cannot read: %s", strerror(-r));
                fclose(f);
                return r;
        }

        /* Our own stream rather than config_read_file: an open failure keeps its errno. */
        if (!config_read(cf, f)) {
                if (config_error_type(cf) == CONFIG_ERR_FILE_IO) {
                        diag_add(l, l->path, 0, "cannot read: %s", config_error_text(cf));
                        r = -EIO;
                } else {
                        diag_add(l, config_error_file(cf) ? config_error_file(cf) : l->path,
                                 (unsigned) (config_error_line(cf) > 0 ? config_error_line(cf) : 0),
                                 "%s", config_error_text(cf));
                        r = -EINVAL;
                }
                fclose(f);
                return r;
        }
        fclose(f);
        return 0;
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
                .max_connections = 8192,
                .max_body = 16 * 1024 * 1024,
                .max_header = 16 * 1024,
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
        check_members(&l, root, "", top_level_names);
        parse_scalars(&l, root);
        parse_retry(&l, root);
        parse_phrases(&l, root);
        parse_api(&l, root);
        parse_providers(&l, root);
        if (!l.oom)
                parse_pools(&l, root);
        if (!l.oom)
                parse_env_file(&l, root);

        if (!l.oom && c->n_pools == 0) {
                if (c->env_file)
                        diag_add(&l, l.path, 0, "no pools defined: add pools = ( ... ) here or "
                                 "PROVIDER_<NAME>_API_KEY lines to %s", c->env_file);
                else
                        diag_add(&l, l.path, 0, "no pools defined: add pools = ( { name = \"...\"; "
                                 "model = \"...\"; keys = [ ... ]; } ) or env_file = \"orche.env\"");
        }

        r = l.oom ? -ENOMEM : l.n_errors > 0 ? -EINVAL : 0;

finish:
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
}

void config_free(struct config *c) {
        if (!c)
                return;

        for (unsigned i = 0; i < c->n_pools; i++) {
                struct config_pool *p = &c->pools[i];

                for (unsigned k = 0; k < p->n_keys; k++)
                        wipe_free(p->keys[k].secret);
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
                wipe_free(p->proxy);
        }
        free(c->providers);

        for (unsigned i = 0; i < c->n_rate_limit_phrases; i++)
                free(c->rate_limit_phrases[i]);
        free(c->rate_limit_phrases);

        for (unsigned i = 0; i < c->n_client_tokens; i++)
                wipe_free(c->client_tokens[i]);
        free(c->client_tokens);

        free(c->path);
        free(c->socket_path);
        free(c->env_file);
        free(c->state_file);
        free(c->socket_group);
        free(c->http_listen);
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
