/* envfile.h — the deployments' env file (orche.env), read the way a shell would read it.
 *
 * Accepts NAME=value lines with comments (#), blank lines, an optional "export " prefix, single
 * quotes (literal), double quotes (with \" \\ \$ \` and \n escapes and line continuations), and
 * unquoted values (trailing comments after whitespace are dropped, backslash escapes the next
 * character). ${NAME} and ${NAME:-default} are expanded in unquoted and double-quoted values, as
 * python-dotenv and a shell do: NAME's value from an earlier line of the file, else from the
 * environment; the default (literal text up to '}') when NAME is unset or empty. Single-quoted
 * and backslash-escaped references stay literal, and so does $NAME without braces. A later
 * assignment to the same name replaces an earlier one, as in a shell.
 */
#pragma once

#include <stddef.h>

struct envfile_entry {
        char *name;
        char *value;
        unsigned line;          /* 1-based line of the assignment */
};

struct envfile {
        struct envfile_entry *entries;
        size_t n;
};

/* Parses text. On a syntax error returns -EINVAL, and -ENOKEY for a ${NAME} that is set neither
 * earlier in the file nor in the environment (and has no default); either way, if ret_err_line
 * is not NULL, the 1-based line number of the problem. ret is written only on success. -ENOMEM on
 * allocation failure. */
int envfile_parse(const char *text, size_t len, struct envfile *ret, unsigned *ret_err_line);

/* Reads and parses a file: -errno from open/read, else as envfile_parse. */
int envfile_load(const char *path, struct envfile *ret, unsigned *ret_err_line);

/* The value of the last assignment to name, or NULL. */
const char *envfile_get(const struct envfile *e, const char *name);

void envfile_free(struct envfile *e);
