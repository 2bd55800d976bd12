/* config_env.c — the pools of the env file keypool.conf names.
 *
 * Owns merging PROVIDER_<NAME>_API_KEY, _BACKUP_KEYS, _MODEL, _BASE_URL, _MAX_CONCURRENT and _RPM
 * into pools and providers beside those of keypool.conf. A pool defined in both places is an
 * error, never a silent override; values are taken as they are (no env:/file:/cred: references),
 * and a bad one is reported at its line in the env file without quoting a key.
 */
#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libconfig.h>

#include "keypool/conf.h"
#include "keypool/envfile.h"
#include "keypool/fileio.h"

#include "config_internal.h"

#define ENV_PREFIX         "PROVIDER_"
#define ENV_API_KEY        "_API_KEY"
#define ENV_BACKUP_KEYS    "_BACKUP_KEYS"
#define ENV_MODEL          "_MODEL"
#define ENV_BASE_URL       "_BASE_URL"
#define ENV_MAX_CONCURRENT "_MAX_CONCURRENT"
#define ENV_RPM            "_RPM"

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

        url = loader_normalize_url(u->value, &problem, &l->oom);
        if (!url) {
                if (problem)
                        loader_diag_add(l, ef, u->line, ENV_PREFIX "%s" ENV_BASE_URL " %s", pool, problem);
                return -1;
        }

        i = loader_provider_find_url(l->c, url);
        if (i >= 0) {
                free(url);
                return i;
        }

        for (size_t j = 0; pool[j]; j++)
                lower[j] = (char) tolower((unsigned char) pool[j]);
        lower[strlen(pool)] = '\0';

        i = loader_provider_find_name(l->c, lower);
        if (i >= 0) {
                loader_diag_add(l, ef, u->line, "no provider has the base_url of " ENV_PREFIX "%s" ENV_BASE_URL
                                ", and the name '%s' for a new one is taken by the provider defined at %s:%u",
                                pool, lower, l->provider_origin[i].file, l->provider_origin[i].line);
                free(url);
                return -1;
        }

        p = loader_provider_add(l, ef, u->line);
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
                loader_diag_add(l, ef, x->line, "pool '%s': %s must be an integer between 0 and %u",
                                pool, x->name, max);
                return;
        }
        if (v > max) {
                loader_diag_add(l, ef, x->line, "pool '%s': %s must be between 0 and %u, not %s",
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

        if (!loader_valid_name(name)) {
                loader_diag_add(l, ef, api->line, "%s: pool name '%s' " NAME_RULE, api->name, name);
                return;
        }

        dup = loader_pool_find_name(l->c, l->c->n_pools, name);
        if (dup >= 0) {
                loader_diag_add(l, ef, api->line, "pool '%s' is already defined at %s:%u", name,
                                l->pool_origin[dup].file, l->pool_origin[dup].line);
                return;
        }

        snprintf(who, sizeof(who), "pool '%.63s'", name);
        p = loader_pool_add(l, ef, api->line);
        if (!p)
                return;
        p->name = strdup(name);
        if (!p->name) {
                l->oom = true;
                return;
        }

        m = env_entry(l, ENV_PREFIX "%s" ENV_MODEL, name);
        if (!m)
                loader_diag_add(l, ef, api->line, "pool '%s': " ENV_PREFIX "%s" ENV_MODEL " is not set",
                                name, name);
        else if (!*m->value || strlen(m->value) > CONFIG_MODEL_MAX)
                loader_diag_add(l, ef, m->line, "pool '%s': " ENV_PREFIX "%s" ENV_MODEL " must be 1 to %d "
                                "characters", name, name, CONFIG_MODEL_MAX);
        else if (!loader_all_graphic(m->value))
                loader_diag_add(l, ef, m->line, "pool '%s': " ENV_PREFIX "%s" ENV_MODEL " must not contain "
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
        problem = loader_secret_problem(api->value);
        if (problem)
                loader_diag_add(l, ef, api->line, "pool '%s' key 1: %s %s", name, api->name, problem);
        else if (!(secret = strdup(api->value))) {
                l->oom = true;
                return;
        } else
                loader_add_key(l, p, who, secret, pos, ef, api->line);
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
                        problem = loader_secret_problem(secret);
                        if (problem) {
                                loader_diag_add(l, ef, b->line, "pool '%s' key %u (in %s): the key %s",
                                                name, pos, b->name, problem);
                                loader_wipe_free(secret);
                        } else
                                loader_add_key(l, p, who, secret, pos, ef, b->line);
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

void loader_parse_env_file(struct loader *l, const config_setting_t *root) {
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
                loader_diag_add(l, ef, err_line, "syntax error (expected NAME=value, a comment or a blank "
                                "line; is a quote left open?)");
                return;
        }
        if (r == -ENOKEY && err_line > 0) {
                loader_diag_add(l, ef, err_line, "a ${NAME} reference names a variable set neither on an "
                                "earlier line nor in keypoold's environment (${NAME:-default} gives a "
                                "fallback)");
                return;
        }
        if (r == -EBADFD || r == -EISDIR) {
                loader_diag_add(l, s ? loader_setting_file(l, s) : l->path,
                                s ? config_setting_source_line(s) : 0, "env_file %s: not a regular file (%s)",
                                ef, fileio_kind(ef));
                return;
        }
        if (r < 0) {
                loader_diag_add(l, s ? loader_setting_file(l, s) : l->path,
                                s ? config_setting_source_line(s) : 0, "env_file %s: %s", ef, strerror(-r));
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
                                loader_diag_add(l, ef, x->line, "%s does not name a pool", x->name);
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
                                loader_diag_add(l, ef, x->line, "%s is set but " ENV_PREFIX "%s" ENV_API_KEY
                                                " is not", x->name, name);
                }
        }

        free(l->env_sorted);
        l->env_sorted = NULL;
        l->n_env_sorted = 0;
        envfile_free(&e);
}
