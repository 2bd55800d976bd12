/* config_secret.c — following a pool's key references.
 *
 * Owns turning what a pool's keys list says ("env:NAME", "file:PATH", "cred:NAME" or the key
 * itself) into the secret, and deciding whether a secret is usable at all. Problems go to the
 * loader's diagnostics naming the key by pool and position; the secret text is never quoted, and
 * a buffer that held one is wiped before it is freed. The copy a configuration keeps lives in
 * secret memory (secmem.c: MADV_DONTDUMP), so a core dump of any keypool process leaves it out.
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

#include <libconfig.h>

#include "keypool/conf.h"
#include "keypool/fileio.h"
#include "keypool/secmem.h"

#include "config_internal.h"

#define CONFIG_SECRET_MAX 4096          /* far above any provider's key */
#define CONFIG_KEY_FILE_MAX 65536       /* bounds file: and cred: reads: a key file holds one key */

char *loader_secret_keep(char *secret) {
        char *kept;

        if (!secret)
                return NULL;
        kept = secmem_strndup(secret, strlen(secret));
        explicit_bzero(secret, strlen(secret));
        free(secret);
        return kept;
}

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

/* Reads the first line of path, without its line end. 0, or -errno: -EMSGSIZE when the line is
 * longer than any secret may be, -EFBIG when the file is larger than a key file can sensibly be,
 * -EBADMSG when the line holds a NUL (it would silently cut the key short). What follows the
 * first line is ignored, as it always was. */
static int read_first_line(const char *path, char **ret) {
        char *data, *nl;
        size_t len, n;
        int r;

        r = fileio_read(path, CONFIG_KEY_FILE_MAX, &data, &len);
        if (r < 0)
                return r;
        nl = memchr(data, '\n', len);
        n = nl ? (size_t) (nl - data) : len;
        /* One byte over the limit still reaches secret_problem, which says how long a key may be. */
        if (n > CONFIG_SECRET_MAX + 1)
                r = -EMSGSIZE;
        else {
                if (n > 0 && data[n - 1] == '\r')
                        n--;
                if (memchr(data, '\0', n))
                        r = -EBADMSG;
                else if (!(*ret = strndup(data, n)))
                        r = -ENOMEM;
        }
        explicit_bzero(data, len);
        free(data);
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
                if (r == -EBADFD || r == -EISDIR) {
                        loader_diag_add(l, file, line, "%s key %u: %s: not a regular file (%s)", who, pos,
                                        label, fileio_kind(path));
                        free(path);
                        return NULL;
                }
                free(path);
                if (r == -ENOMEM) {
                        l->oom = true;
                        return NULL;
                }
                if (r == -EMSGSIZE) {
                        loader_diag_add(l, file, line, "%s key %u: %s: the first line is longer than "
                                        "%d bytes", who, pos, label, CONFIG_SECRET_MAX);
                        return NULL;
                }
                if (r == -EFBIG) {
                        loader_diag_add(l, file, line, "%s key %u: %s: larger than %d bytes (a key "
                                        "file holds one key)", who, pos, label, CONFIG_KEY_FILE_MAX);
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
