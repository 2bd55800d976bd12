/* conf.h — keypool.conf (libconfig) and the env file it may name.
 *
 * Owns the process-private view of the configuration, secrets included. Secrets live only here
 * (never in shared memory); the struct is built once by the coordinator and inherited by workers
 * through fork. Loading never logs: every problem is collected in a config_diag with the file and
 * line it concerns, so `keypoold --check-config` can print them all at once. A message never
 * contains a secret: keys are named by pool and position.
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>
#include <stddef.h>

#include "keypool/keyid.h"

#define CONFIG_DEFAULT_PATH "/etc/keypool/keypool.conf"
#define CONFIG_DEFAULT_SOCKET "/run/keypool/keypool.sock"

enum config_auth {
        CONFIG_AUTH_INVALID = 0,
        CONFIG_AUTH_BEARER,                     /* Authorization: Bearer <key> (default) */
        CONFIG_AUTH_X_API_KEY,                  /* x-api-key: <key> (Anthropic) */
        CONFIG_AUTH_X_GOOG_API_KEY,             /* x-goog-api-key: <key> (Gemini) */
        _CONFIG_AUTH_MAX,
};

enum config_cooldown_scope {
        CONFIG_SCOPE_INVALID = 0,
        CONFIG_SCOPE_KEY,                       /* a secret in several pools cools everywhere (default) */
        CONFIG_SCOPE_POOL,                      /* … only in the pool that saw the limit */
        _CONFIG_SCOPE_MAX,
};

struct config_key {
        char *secret;                           /* resolved secret (env:, file:, cred: followed) */
        char id[KEYID_ID_LEN + 1];
        char masked[KEYID_MASK_MAX + 1];
        unsigned max_concurrent;                /* the key's own limit, else its pool's; 0 = none */
        unsigned rpm;                           /* requests per minute, likewise; 0 = none */
};

struct config_provider {
        char *name;
        char *base_url;                         /* no trailing slash */
        enum config_auth auth;                  /* auth = "bearer" | "x-api-key" | "x-goog-api-key" */
        char **headers;                         /* static extra headers, "Name: value" */
        unsigned n_headers;
        char *probe_path;                       /* GET base_url + probe_path checks a key ("/models") */
        char *ca_file;                          /* PEM bundle trusted instead of the system's; NULL */
        char *ca_path;                          /* c_rehash'ed directory trusted as well; NULL */
        char *proxy;                            /* outbound proxy URL; NULL: https_proxy etc. apply */
        bool http2;                             /* offer HTTP/2 over TLS (true) */
        bool tls_verify;                        /* verify the upstream's certificate and name (true) */
};

struct config_pool {
        char *name;
        char *model;                            /* the upstream model id */
        unsigned provider;                      /* index into config.providers */
        struct config_key *keys;                /* keys[0] is the primary, the rest backups */
        unsigned n_keys;
        unsigned max_concurrent;                /* per key, across all workers; 0 = none */
        unsigned rpm;                           /* per key; 0 = none */
        /* The pool's timeouts, in s: the top-level settings unless the pool sets its own. */
        unsigned connect_timeout;               /* to connect upstream, per attempt */
        unsigned first_byte_timeout;            /* from an attempt's start to its answer's head */
        unsigned idle_timeout;                  /* longest silence inside an answer's body */
        unsigned request_timeout;               /* the whole request: attempts, backoffs, waits */
};

/* cluster = { … }: several hosts share key health and budgets through Redis (cluster.h). */
struct config_cluster {
        char *redis;                            /* as written: "unix:/run/redis/redis.sock" or
                                                 * "redis://host:6379/0" */
        char *redis_path;                       /* the UNIX socket, or NULL for host:port */
        char *redis_host;
        unsigned redis_port, redis_db;
        char *password;                         /* resolved (env:, file:, cred:), NULL: none */
        char *prefix;                           /* every Redis key starts with it ("keypool:") */
        char *node;                             /* this host's name in the cluster (hostname) */
};

struct config_retry {
        unsigned backoff_initial_ms;            /* first transient retry waits this long (1000) */
        unsigned backoff_max_ms;                /* cap on any backoff (10000) */
        unsigned max_attempts;                  /* upstream attempts per request in all (5) */
};

struct config {
        char *path;
        char *socket_path;
        unsigned socket_mode;                   /* default 0660 */
        unsigned workers;                       /* default: number of CPUs */
        unsigned recovery_time;                 /* s a rate-limited key rests without a hint (900) */
        unsigned client_timeout;                /* s a silent client connection is kept (60) */
        unsigned connect_timeout;               /* s to connect upstream (10) */
        unsigned upstream_timeout;              /* s one upstream attempt may take in all (600) */
        unsigned first_byte_timeout;            /* s an attempt may wait for the answer's head (300) */
        unsigned idle_timeout;                  /* s of silence allowed inside an answer's body (120) */
        unsigned request_timeout;               /* s a request may take in all, retries included (600) */
        unsigned max_connections;               /* client connections per worker (8192) */
        size_t max_body;                        /* request body limit in bytes (16 MiB) */
        size_t max_header;                      /* request header limit in bytes (16 KiB) */
        unsigned header_timeout;                /* s from a request's first byte to its whole head (10) */
        size_t body_min_rate;                   /* bytes/s a body must average per header_timeout (1024) */
        size_t body_budget;                     /* bytes of request bodies a worker buffers (64 MiB) */
        char *env_file;                         /* NULL when not set */
        unsigned max_wait;                      /* s a request may wait for a key to recover (30) */
        unsigned max_cooldown;                  /* s cap on any provider hint (86400) */
        unsigned probe_interval;                /* s between probes of a disabled quota key (3600) */
        bool probe_auth;                        /* probe auth-disabled keys too (false) */
        unsigned transient_threshold;           /* transient failures in a row that cool a key (3) */
        unsigned transient_cooldown;            /* s such a key cools (30) */
        enum config_cooldown_scope cooldown_scope;
        char **rate_limit_phrases;              /* NULL: the built-in list */
        unsigned n_rate_limit_phrases;
        struct config_retry retry;
        char *state_file;                       /* "" disables persistence (/var/lib/keypool/state.json) */
        unsigned state_interval;                /* s between state snapshots (60) */
        unsigned history_size;                  /* rotation history entries kept (1024) */
        char *socket_group;                     /* NULL: the daemon's own group */
        gid_t socket_gid;                       /* socket_group looked up, when it is set */
        char *http_listen;                      /* "127.0.0.1:8002", NULL: no TCP listener */
        char http_host[64];                     /* http_listen's address, without brackets */
        unsigned http_port;                     /* http_listen's port */
        bool http_allow_remote;                 /* allow a non-loopback http_listen (false) */
        char **client_tokens;                   /* SHA-256 hex digests of accepted bearer tokens */
        unsigned n_client_tokens;
        char **admin_tokens;                    /* … of tokens that may also use admin actions */
        unsigned n_admin_tokens;
        unsigned worker_timeout;                /* s a worker's heartbeat may age before it is replaced (10) */
        unsigned shutdown_timeout;              /* s a graceful stop may take before workers are killed (30) */

        struct config_cluster *cluster;         /* NULL: a single host */

        struct config_provider *providers;
        unsigned n_providers;
        struct config_pool *pools;
        unsigned n_pools;
        unsigned n_keys;                        /* over all pools */
};

/* One line per problem: "FILE:LINE: message" (or "FILE: message" when no line applies). */
struct config_diag {
        char **messages;
        size_t n;
};

/* Loads and validates path, following env_file and key references. On success writes *ret and
 * returns 0. On a configuration problem returns -EINVAL with every problem found in diag;
 * -ENOMEM on allocation failure. diag may be NULL. */
int config_load(const char *path, struct config **ret, struct config_diag *diag);

void config_free(struct config *c);

/* Overwrites every secret in c with zeros (in a process that must not hold them: a worker
 * forked with another generation's configuration). c stays valid to free. */
void config_wipe_secrets(struct config *c);
void config_diag_clear(struct config_diag *d);

/* Index of the pool whose name or model id equals s[0..len), or -1. Names win over model ids. */
int config_find_pool(const struct config *c, const char *s, size_t len);

/* The key at table row key of pool p, whose first row is first_key; NULL when key is not one of
 * the pool's rows. */
const struct config_key *config_pool_key(const struct config_pool *p, unsigned first_key, unsigned key);
