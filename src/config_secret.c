/* config_secret.c — following a pool's key references.
 *
 * Owns turning what a pool's keys list says ("env:NAME", "file:PATH", "cred:NAME" or the key
 * itself) into the secret, and deciding whether a secret is usable at all. Problems go to the
 * loader's diagnostics naming the key by pool and position; the secret text is never quoted, and
 * a buffer that held one is wiped before it is freed.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* asprintf */
#endif

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <libconfig.h>

#include "keypool/conf.h"

#include "config_internal.h"

#define CONFIG_SECRET_MAX 4096          /* far above any provider's key; bounds file: reads */

/* Why a resolved secret cannot be used, or NULL when it can. Never quotes the secret. */
const char *loader_secret_problem(const char *s) {
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

/* Follows a key reference. Returns the secret (heap), or NULL with the problem reported at
 * file:line as "<who> key N: ...", who being "pool 'P'". */
char *loader_resolve_key(struct loader *l, const char *who, unsigned pos, const char *ref,
                         const char *file, unsigned line) {
        const char *problem;
        char *secret = NULL;

        if (strncmp(ref, "env:", 4) == 0) {
                const char *name = ref + 4, *v;

                if (!*name) {
                        loader_diag_add(l, file, line, "%s key %u: env: needs a variable name", who, pos);
                        return NULL;
                }
                v = getenv(name);
                if (!v) {
                        loader_diag_add(l, file, line, "%s key %u: environment variable %s is not set",
                                        who, pos, name);
                        return NULL;
                }
                problem = loader_secret_problem(v);
                if (problem) {
                        loader_diag_add(l, file, line, "%s key %u: environment variable %s %s",
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
                        loader_diag_add(l, file, line, "%s key %u: %.5s needs a %s", who, pos, ref,
                                        cred ? "credential name" : "path");
                        return NULL;
                }
                if (cred) {
                        const char *dir = getenv("CREDENTIALS_DIRECTORY");

                        if (strchr(name, '/') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
                                loader_diag_add(l, file, line, "%s key %u: credential name '%s' is not "
                                                "a plain file name", who, pos, name);
                                return NULL;
                        }
                        if (!dir || !*dir) {
                                loader_diag_add(l, file, line, "%s key %u: credential %s: "
                                                "CREDENTIALS_DIRECTORY is not set (LoadCredential= in the "
                                                "service unit provides it)", who, pos, name);
                                return NULL;
                        }
                        if (asprintf(&path, "%s/%s", dir, name) < 0)
                                path = NULL;
                        snprintf(label, sizeof(label), "credential %s", name);
                } else {
                        path = loader_resolve_path(l, name);
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
                        loader_diag_add(l, file, line, "%s key %u: %s: the first line is longer than "
                                        "%d bytes", who, pos, label, CONFIG_SECRET_MAX);
                        return NULL;
                }
                if (r == -EBADMSG) {
                        loader_diag_add(l, file, line, "%s key %u: %s: the first line contains a NUL byte",
                                        who, pos, label);
                        return NULL;
                }
                if (r < 0) {
                        loader_diag_add(l, file, line, "%s key %u: %s: %s", who, pos, label, strerror(-r));
                        return NULL;
                }
                problem = loader_secret_problem(secret);
                if (problem) {
                        loader_diag_add(l, file, line, "%s key %u: %s: the key %s", who, pos, label,
                                        *secret ? problem : "is empty (it must be on the first line)");
                        loader_wipe_free(secret);
                        return NULL;
                }
                return secret;

        } else {
                problem = loader_secret_problem(ref);
                if (problem) {
                        loader_diag_add(l, file, line, "%s key %u: the key %s", who, pos, problem);
                        return NULL;
                }
                secret = strdup(ref);
        }

        if (!secret)
                l->oom = true;
        return secret;
}
