/* config_listen.c — the settings of the daemon's listeners.
 *
 * Owns checking socket_mode, socket_group, http_listen, http_allow_remote client_tokens and admin_tokens and
 * filling the matching struct config fields. A TCP listener off the loopback needs the operator's
 * explicit http_allow_remote; token digests are stored lowercase and never quoted in a message,
 * so a pasted token does not reach the journal.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include <libconfig.h>

#include "keypool/conf.h"

#include "config_internal.h"

#define CONFIG_TOKENS_MAX 1024
#define CONFIG_DIGEST_HEX 64                  /* SHA-256 in hexadecimal */
#define CONFIG_GROUP_BUF_MAX (1024 * 1024)    /* getgr*_r buffer cap: a group that big is an attack */

void loader_parse_socket_mode(struct loader *l, const config_setting_t *root) {
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
                        loader_setting_error(l, s, "socket_mode '%s' is not an octal mode between 0000 "
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
                        loader_setting_error(l, s, "socket_mode %lld is not a mode between 0000 and 0777 "
                                             "(write it as an octal string, e.g. \"0660\")", v);
                        return;
                }
                break;
        }
        default:
                loader_setting_error(l, s, "socket_mode must be an octal string such as \"0660\", not %s",
                                     loader_type_name(config_setting_type(s)));
                return;
        }

        l->c->socket_mode = (unsigned) mode;
}

/* Whether group s (a name, or a gid in digits) exists: 0 with *ret set (and *ret_gid when it
 * does), or -errno when the group database could not answer. */
static int group_lookup(const char *s, bool *ret, gid_t *ret_gid) {
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
                        if (found)
                                *ret_gid = numeric ? (gid_t) gid : g.gr_gid;
                        return 0;
                }
                return -r;
        }
}

void loader_parse_socket_group(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s = config_setting_get_member(root, "socket_group");
        char digits[24];
        const char *v;
        bool exists = false;
        gid_t found_gid = 0;
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
                        loader_setting_error(l, s, "socket_group %lld is not a group id", gid);
                        return;
                }
                snprintf(digits, sizeof(digits), "%lld", gid);
                v = digits;
                break;
        }
        default:
                loader_setting_error(l, s, "socket_group must be a group name or id, not %s",
                                     loader_type_name(config_setting_type(s)));
                return;
        }

        /* "" says what leaving it out says: the daemon's own group. */
        if (!*v)
                return;
        if (!loader_all_graphic(v) || strlen(v) > 256) {
                loader_setting_error(l, s, "socket_group must be a group name or id without whitespace or "
                                     "control characters");
                return;
        }

        r = group_lookup(v, &exists, &found_gid);
        if (r == -ENOMEM) {
                l->oom = true;
                return;
        }
        if (r < 0) {
                loader_setting_error(l, s, "cannot look up group '%s': %s", v, strerror(-r));
                return;
        }
        if (!exists) {
                loader_setting_error(l, s, "group '%s' does not exist", v);
                return;
        }
        l->c->socket_group = strdup(v);
        if (!l->c->socket_group)
                l->oom = true;
        l->c->socket_gid = found_gid;
}

/* Why listen ("HOST:PORT") cannot be served, or NULL; then *ret_loopback tells whether only this
 * host can reach it, and ret_host (INET6_ADDRSTRLEN + 1 bytes) and *ret_port what to bind. */
static const char *listen_problem(const char *listen, bool *ret_loopback, char *ret_host,
                                  unsigned *ret_port) {
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
        memcpy(ret_host, host, n + 1);
        *ret_port = port;
        return NULL;
}

void loader_parse_http_listen(struct loader *l, const config_setting_t *root) {
        const config_setting_t *s, *allow = config_setting_get_member(root, "http_allow_remote");
        char host[INET6_ADDRSTRLEN + 1];
        const char *v, *problem;
        bool loopback = false;
        unsigned port = 0;

        loader_get_bool(l, root, "http_allow_remote", &l->c->http_allow_remote);

        if (!loader_get_string(l, root, "http_listen", &s, &v))
                return;
        if (!*v) {
                loader_setting_error(l, s, "http_listen must not be empty (leave it out for no TCP listener)");
                return;
        }
        if (!loader_all_graphic(v)) {
                loader_setting_error(l, s, "http_listen must not contain whitespace or control characters");
                return;
        }
        problem = listen_problem(v, &loopback, host, &port);
        if (problem) {
                loader_setting_error(l, s, "http_listen '%s' %s", v, problem);
                return;
        }
        /* Anyone who reaches the port reads every key's state, and with a token steers them: off
         * this host only when the operator says so in as many words. A mistyped
         * http_allow_remote is reported on its own; a second message here would only repeat it. */
        if (!loopback && !l->c->http_allow_remote) {
                if (!allow || config_setting_type(allow) == CONFIG_TYPE_BOOL)
                        loader_setting_error(l, s, "http_listen '%s' is not a loopback address: set "
                                             "http_allow_remote = true; to serve other hosts (and set "
                                             "client_tokens)", v);
                return;
        }
        l->c->http_listen = strdup(v);
        if (!l->c->http_listen)
                l->oom = true;
        _Static_assert(sizeof(l->c->http_host) > INET6_ADDRSTRLEN, "http_host holds any address");
        memcpy(l->c->http_host, host, sizeof(host));
        l->c->http_port = port;
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

/* client_tokens or admin_tokens (name): a list of token digests into *list, *n_list.
 * left_out says what leaving the setting out means. */
void loader_parse_tokens(struct loader *l, const config_setting_t *root, const char *name,
                         const char *left_out, char ***list, unsigned *n_list) {
        const config_setting_t *s = config_setting_get_member(root, name);
        int *pos, n;

        if (!s)
                return;
        if (config_setting_type(s) != CONFIG_TYPE_ARRAY && config_setting_type(s) != CONFIG_TYPE_LIST) {
                loader_setting_error(l, s, "%s must be a list of SHA-256 hex digests, "
                                     "[ \"<64 hex digits>\", ... ], not %s", name,
                                     loader_type_name(config_setting_type(s)));
                return;
        }
        n = config_setting_length(s);
        /* An empty list would read like "lock it down" and mean "no token needed". */
        if (n == 0) {
                loader_setting_error(l, s, "%s is empty: leave it out to %s", name, left_out);
                return;
        }
        if (n > CONFIG_TOKENS_MAX) {
                loader_setting_error(l, s, "%s has %d entries; at most %d are allowed",
                                     name, n, CONFIG_TOKENS_MAX);
                return;
        }
        *list = calloc((size_t) n, sizeof(**list));
        /* 1-based positions in the file of the stored digests: messages count entries as written. */
        pos = calloc((size_t) n, sizeof(*pos));
        if (!*list || !pos) {
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
                        loader_setting_error(l, e, "%s entry %d must be a string, not %s",
                                             name, i + 1, loader_type_name(config_setting_type(e)));
                        continue;
                }
                problem = digest_problem(config_setting_get_string(e));
                if (problem) {
                        loader_setting_error(l, e, "%s entry %d %s", name, i + 1, problem);
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
                for (j = 0; j < *n_list; j++)
                        if (strcmp((*list)[j], d) == 0)
                                break;
                if (j < *n_list) {
                        loader_setting_error(l, e, "%s entry %d is the same digest as entry %d",
                                             name, i + 1, pos[j]);
                        loader_wipe_free(d);
                        continue;
                }
                pos[*n_list] = i + 1;
                (*list)[(*n_list)++] = d;
        }
        free(pos);
}
