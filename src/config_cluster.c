/* config_cluster.c — the cluster = { … } group of keypool.conf.
 *
 * Owns checking where Redis is (a UNIX socket or a redis:// URL), the password reference (followed
 * like a key's: env:, file:, cred:), the key prefix and this host's node name. An absent group
 * leaves config.cluster NULL: a single host, exactly as without clustering. Like the rest of the
 * loader it never logs and never quotes the password.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#include "config_internal.h"

#define CLUSTER_PREFIX_DEFAULT "keypool:"
#define CLUSTER_PREFIX_MAX 64
#define CLUSTER_NODE_MAX 63

static const char *const cluster_names[] = { "redis", "password", "prefix", "node", NULL };

void config_cluster_free(struct config_cluster *c) {
        if (!c)
                return;
        free(c->redis);
        free(c->redis_path);
        free(c->redis_host);
        loader_wipe_free(c->password);
        free(c->prefix);
        free(c->node);
        free(c);
}

/* "unix:/path" or "redis://host[:port][/db]"; NULL when fine, else what is wrong. */
static const char *parse_redis_address(struct config_cluster *c, const char *v, bool *oom) {
        if (strncmp(v, "unix:", 5) == 0) {
                const char *path = v + 5;

                if (path[0] != '/')
                        return "a UNIX socket must be an absolute path, e.g. unix:/run/redis/redis.sock";
                if (strlen(path) >= sizeof(((struct sockaddr_un *) NULL)->sun_path))
                        return "the UNIX socket path is longer than a socket address allows";
                c->redis_path = strdup(path);
                *oom = !c->redis_path;
                return NULL;
        }
        if (strncmp(v, "redis://", 8) == 0) {
                const char *host = v + 8, *end = host + strcspn(host, ":/");
                unsigned long port = 6379, db = 0;
                char *rest;

                if (end == host)
                        return "redis:// needs a host, e.g. redis://127.0.0.1:6379/0";
                if (*end == ':') {
                        port = strtoul(end + 1, &rest, 10);
                        if (rest == end + 1 || port == 0 || port > 65535)
                                return "the port must be 1 to 65535";
                        end = rest;
                } else
                        rest = (char *) end;
                if (*rest == '/' && rest[1]) {
                        const char *d = rest + 1;

                        db = strtoul(d, &rest, 10);
                        if (rest == d || db > 15)
                                return "the database must be a number from 0 to 15";
                } else if (*rest == '/')
                        rest++;
                if (*rest)
                        return "unexpected text after the address (redis://host:port/db)";
                c->redis_host = strndup(host, strcspn(host, ":/"));
                *oom = !c->redis_host;
                c->redis_port = (unsigned) port;
                c->redis_db = (unsigned) db;
                return NULL;
        }
        return "must be unix:/path/to/redis.sock or redis://host:port/db";
}

void loader_parse_cluster(struct loader *l, const config_setting_t *root) {
        const config_setting_t *g = config_setting_get_member(root, "cluster"), *s;
        struct config_cluster *c;
        const char *v, *problem;
        char host[HOST_NAME_MAX + 1];
        bool oom = false;

        if (!g)
                return;
        if (!config_setting_is_group(g)) {
                loader_setting_error(l, g, "cluster must be a group: cluster = { redis = \"unix:/run/redis/redis.sock\"; };");
                return;
        }
        for (int i = 0; i < config_setting_length(g); i++) {
                const config_setting_t *m = config_setting_get_elem(g, (unsigned) i);
                bool known = false;

                for (unsigned n = 0; cluster_names[n]; n++)
                        known |= strcmp(config_setting_name(m), cluster_names[n]) == 0;
                if (!known)
                        loader_setting_error(l, m, "unknown setting cluster.%s (known: redis, password, "
                                             "prefix, node)", config_setting_name(m));
        }
        c = calloc(1, sizeof *c);
        if (!c) {
                l->oom = true;
                return;
        }
        config_cluster_free(l->c->cluster);
        l->c->cluster = c;

        if (!loader_get_string(l, g, "redis", &s, &v)) {
                if (!config_setting_get_member(g, "redis"))
                        loader_setting_error(l, g, "cluster needs redis = \"unix:/path\" or \"redis://host:port/db\"");
        } else if (!(c->redis = strdup(v)))
                oom = true;
        else if ((problem = parse_redis_address(c, v, &oom)))
                loader_setting_error(l, s, "cluster.redis '%s': %s", v, problem);

        if (loader_get_string(l, g, "password", &s, &v))
                c->password = loader_resolve_key(l, "cluster password:", 0, v, loader_setting_file(l, s),
                                                 (unsigned) config_setting_source_line(s));

        v = CLUSTER_PREFIX_DEFAULT;
        if (loader_get_string(l, g, "prefix", &s, &v) &&
            (strlen(v) > CLUSTER_PREFIX_MAX || !loader_all_graphic(v)))
                loader_setting_error(l, s, "cluster.prefix must be 0 to %d printable characters without spaces",
                                     CLUSTER_PREFIX_MAX);
        if (!(c->prefix = strdup(v)))
                oom = true;

        if (loader_get_string(l, g, "node", &s, &v)) {
                if (!loader_valid_name(v))
                        loader_setting_error(l, s, "cluster.node '%s' " NAME_RULE, v);
        } else {
                /* The host name names the node unless told otherwise: it is what an operator
                 * reading /api/cluster expects, and it differs between hosts. */
                if (gethostname(host, sizeof host) < 0)
                        snprintf(host, sizeof host, "localhost");
                host[strcspn(host, ".")] = '\0';
                host[CLUSTER_NODE_MAX] = '\0';
                v = host;
        }
        if (!(c->node = strdup(v)))
                oom = true;
        if (oom)
                l->oom = true;
}
