/* config_internal.h — what the parts of the config loader share; not a public header.
 *
 * config.c (parsing, diagnostics, building the struct config), config_secret.c (key references),
 * config_env.c (the env file's pools) and config_listen.c (socket and TCP listener settings) all
 * work on one struct loader. Every function here takes its problems to the loader's diagnostics
 * (loader_diag_add, loader_setting_error) and never logs; none of them quotes a secret.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libconfig.h>

#include "keypool/conf.h"
#include "keypool/envfile.h"

#define CONFIG_NAME_MAX   63            /* pool and provider names; the key table's limit */
#define CONFIG_MODEL_MAX  127           /* the key table's limit */
#define CONFIG_CONCURRENT_MAX 100000
#define CONFIG_RPM_MAX 1000000

#define NAME_RULE "must be 1 to 63 letters, digits, '_', '.' or '-'"

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

/* --- diagnostics (config.c) ------------------------------------------------------------------- */

void loader_wipe_free(char *s);
__attribute__((format(printf, 4, 5)))
void loader_diag_add(struct loader *l, const char *file, unsigned line, const char *fmt, ...);
const char *loader_setting_file(const struct loader *l, const config_setting_t *s);
__attribute__((format(printf, 3, 4)))
void loader_setting_error(struct loader *l, const config_setting_t *s, const char *fmt, ...);
const char *loader_type_name(int type);

/* --- small checks and getters (config.c) ------------------------------------------------------ */

bool loader_valid_name(const char *s);
bool loader_all_graphic(const char *s);
char *loader_normalize_url(const char *url, const char **ret_problem, bool *oom);
char *loader_resolve_path(struct loader *l, const char *p);
bool loader_get_bool(struct loader *l, const config_setting_t *root, const char *name, bool *ret);
bool loader_get_string(struct loader *l, const config_setting_t *root, const char *name,
                       const config_setting_t **ret_setting, const char **ret);

/* --- building the config (config.c) ----------------------------------------------------------- */

struct config_provider *loader_provider_add(struct loader *l, const char *file, unsigned line);
int loader_provider_find_name(const struct config *c, const char *name);
int loader_provider_find_url(const struct config *c, const char *url);
struct config_pool *loader_pool_add(struct loader *l, const char *file, unsigned line);
int loader_pool_find_name(const struct config *c, unsigned n, const char *name);
struct config_key *loader_add_key(struct loader *l, struct config_pool *p, const char *who, char *secret,
                                  unsigned pos, const char *file, unsigned line);

/* --- key references (config_secret.c) --------------------------------------------------------- */

const char *loader_secret_problem(const char *s);
/* Moves secret (heap, owned) into secret memory (keypool/secmem.h), wiping and freeing the
 * original: the copy a struct config keeps is left out of core dumps. NULL when out of memory
 * (the original is wiped and freed all the same). */
char *loader_secret_keep(char *secret);
char *loader_resolve_key(struct loader *l, const char *who, unsigned pos, const char *ref,
                         const char *file, unsigned line);

/* --- the env file (config_env.c) -------------------------------------------------------------- */

void loader_parse_env_file(struct loader *l, const config_setting_t *root);

/* --- listeners (config_listen.c) -------------------------------------------------------------- */

void loader_parse_socket_mode(struct loader *l, const config_setting_t *root);
void loader_parse_socket_group(struct loader *l, const config_setting_t *root);
void loader_parse_http_listen(struct loader *l, const config_setting_t *root);
void loader_parse_tokens(struct loader *l, const config_setting_t *root, const char *name,
                         const char *left_out, char ***list, unsigned *n_list);

/* --- the cluster group (config_cluster.c) ------------------------------------------------------ */

void loader_parse_cluster(struct loader *l, const config_setting_t *root);
void config_cluster_free(struct config_cluster *c);
