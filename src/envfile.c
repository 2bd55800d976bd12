/* envfile.c — the deployments' env file (orche.env), read the way a shell would read it.
 *
 * Owns the parsing of NAME=value files. The files are written for `. orche.env` in a shell, so
 * the values here must be the ones a shell would see; where a line would mean something else to a
 * shell than an assignment (a command after the value, a pipe, a redirection), it is rejected
 * rather than guessed at. ${NAME} and ${NAME:-default} are expanded the way the dotenv loaders
 * that write these files expand them (and a shell would), from earlier lines and then the
 * environment. Values hold secrets: every buffer that held one is wiped before it is
 * freed.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/envfile.h"
#include "keypool/fileio.h"

/* Far beyond any real env file; stops a wrong path (a log) from eating memory. One byte under
 * 16 MiB: the largest file the reader has always taken. */
#define ENVFILE_MAX_SIZE (16u * 1024 * 1024 - 1)

struct buf {
        char *data;
        size_t len, cap;
};

struct parser {
        const char *p, *end;
        unsigned line;
        struct envfile file;
        size_t cap;
};

static void wipe_free(char *s, size_t len) {
        if (!s)
                return;
        explicit_bzero(s, len);
        free(s);
}

static void wipe_free_str(char *s) {
        if (s)
                wipe_free(s, strlen(s));
}

static int buf_putc(struct buf *b, char c) {
        if (b->len + 1 >= b->cap) {
                size_t cap = b->cap ? b->cap * 2 : 64;
                char *n = malloc(cap);

                if (!n)
                        return -ENOMEM;
                /* Not realloc: the old block may hold part of a secret and must be wiped. */
                if (b->data) {
                        memcpy(n, b->data, b->len);
                        wipe_free(b->data, b->cap);
                }
                b->data = n;
                b->cap = cap;
        }
        b->data[b->len++] = c;
        b->data[b->len] = '\0';
        return 0;
}

static bool is_blank(char c) {
        return c == ' ' || c == '\t';
}

static bool is_name_start(char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
}

static bool is_name_char(char c) {
        return is_name_start(c) || (c >= '0' && c <= '9');
}

/* Characters that end or redirect a simple command in a shell: unquoted, they would make the
 * line mean something other than an assignment. */
static bool is_shell_operator(char c) {
        return c && strchr(";&|<>()`", c);
}

static bool at_end(const struct parser *x) {
        return x->p >= x->end;
}

static void skip_blanks(struct parser *x) {
        while (!at_end(x) && is_blank(*x->p))
                x->p++;
}

static void skip_to_eol(struct parser *x) {
        while (!at_end(x) && *x->p != '\n')
                x->p++;
}

/* After a statement only blanks and a comment may follow on its line. */
static int finish_line(struct parser *x) {
        skip_blanks(x);
        if (at_end(x))
                return 0;
        if (*x->p == '#')
                skip_to_eol(x);
        else if (*x->p != '\n')
                return -EINVAL;
        return 0;
}

static size_t parse_name(struct parser *x) {
        const char *start = x->p;

        if (at_end(x) || !is_name_start(*x->p))
                return 0;
        while (!at_end(x) && is_name_char(*x->p))
                x->p++;
        return (size_t) (x->p - start);
}

/* The value a reference names: the file's own earlier assignment, else keypoold's environment, as
 * a shell sourcing the file would see it. NULL when neither has it. */
static const char *lookup(const struct parser *x, const char *name, size_t name_len) {
        char buf[256];

        for (size_t i = 0; i < x->file.n; i++) {
                const struct envfile_entry *e = &x->file.entries[i];

                if (strlen(e->name) == name_len && memcmp(e->name, name, name_len) == 0)
                        return e->value;
        }
        if (name_len >= sizeof(buf))
                return NULL;
        memcpy(buf, name, name_len);
        buf[name_len] = '\0';
        return getenv(buf);
}

/* ${NAME} or ${NAME:-default} at x->p (on the '$'), appended to v. The default is literal text up
 * to the first '}', as python-dotenv reads it; it applies when NAME is unset or empty, as in a
 * shell. -EINVAL for anything else between the braces, -ENOKEY when NAME is set nowhere and there
 * is no default: a key that silently became "" would only fail later, at the provider. */
static int parse_reference(struct parser *x, struct buf *v) {
        const char *name, *value, *def = NULL;
        size_t name_len, def_len = 0;
        int r;

        x->p += 2;
        name = x->p;
        name_len = parse_name(x);
        if (name_len == 0 || at_end(x))
                return -EINVAL;
        if (*x->p == ':' && x->end - x->p >= 2 && x->p[1] == '-') {
                x->p += 2;
                def = x->p;
                while (!at_end(x) && *x->p != '}') {
                        if (*x->p == '\n')
                                return -EINVAL;
                        x->p++;
                }
                def_len = (size_t) (x->p - def);
        }
        if (at_end(x) || *x->p != '}')
                return -EINVAL;
        x->p++;

        value = lookup(x, name, name_len);
        if (def && (!value || !*value)) {
                for (size_t i = 0; i < def_len; i++)
                        if ((r = buf_putc(v, def[i])) < 0)
                                return r;
                return 0;
        }
        if (!value)
                return -ENOKEY;
        for (; *value; value++)
                if ((r = buf_putc(v, *value)) < 0)
                        return r;
        return 0;
}

static bool at_reference(const struct parser *x) {
        return x->end - x->p >= 2 && x->p[0] == '$' && x->p[1] == '{';
}

static int parse_single_quoted(struct parser *x, struct buf *v) {
        int r;

        x->p++;
        for (;;) {
                if (at_end(x))
                        return -EINVAL;
                if (*x->p == '\'') {
                        x->p++;
                        return 0;
                }
                if (*x->p == '\n')
                        x->line++;
                r = buf_putc(v, *x->p++);
                if (r < 0)
                        return r;
        }
}

static int parse_double_quoted(struct parser *x, struct buf *v) {
        int r;

        x->p++;
        for (;;) {
                char c;

                if (at_end(x))
                        return -EINVAL;
                c = *x->p;
                if (c == '"') {
                        x->p++;
                        return 0;
                }
                if (c == '\\') {
                        char n;

                        if (x->p + 1 >= x->end)
                                return -EINVAL;
                        n = x->p[1];
                        x->p += 2;
                        if (n == '\n') {
                                x->line++;
                                continue;
                        }
                        if (n == 'n')
                                r = buf_putc(v, '\n');
                        else if (strchr("\"\\$`", n))
                                r = buf_putc(v, n);
                        else {
                                /* As in a shell: any other backslash stays. */
                                r = buf_putc(v, '\\');
                                if (r >= 0)
                                        r = buf_putc(v, n);
                        }
                        if (r < 0)
                                return r;
                        continue;
                }
                if (at_reference(x)) {
                        r = parse_reference(x, v);
                        if (r < 0)
                                return r;
                        continue;
                }
                if (c == '\n')
                        x->line++;
                r = buf_putc(v, c);
                if (r < 0)
                        return r;
                x->p++;
        }
}

/* A value is one shell word: unquoted, single- and double-quoted pieces glued together, ending at
 * unquoted whitespace or the end of the line. */
static int parse_value(struct parser *x, struct buf *v) {
        int r;

        /* An empty value still needs a string. */
        r = buf_putc(v, '\0');
        if (r < 0)
                return r;
        v->len = 0;

        while (!at_end(x)) {
                char c = *x->p;

                if (is_blank(c) || c == '\n')
                        break;
                if (c == '\'')
                        r = parse_single_quoted(x, v);
                else if (c == '"')
                        r = parse_double_quoted(x, v);
                else if (c == '\\') {
                        if (x->p + 1 >= x->end) {
                                x->p++;
                                r = buf_putc(v, '\\');
                        } else if (x->p[1] == '\n') {
                                x->p += 2;
                                x->line++;
                                r = 0;
                        } else {
                                r = buf_putc(v, x->p[1]);
                                x->p += 2;
                        }
                } else if (at_reference(x))
                        r = parse_reference(x, v);
                else if (is_shell_operator(c))
                        return -EINVAL;
                else {
                        r = buf_putc(v, c);
                        x->p++;
                }
                if (r < 0)
                        return r;
        }
        return 0;
}

static int store(struct parser *x, const char *name, size_t name_len, struct buf *v, unsigned line) {
        struct envfile_entry *e;

        /* A shell keeps only the last value; keeping the first position keeps the file's order. */
        for (size_t i = 0; i < x->file.n; i++) {
                e = &x->file.entries[i];
                if (strlen(e->name) == name_len && memcmp(e->name, name, name_len) == 0) {
                        wipe_free_str(e->value);
                        e->value = v->data;
                        e->line = line;
                        *v = (struct buf) {};
                        return 0;
                }
        }

        if (x->file.n == x->cap) {
                size_t cap = x->cap ? x->cap * 2 : 16;
                struct envfile_entry *n = realloc(x->file.entries, cap * sizeof(*n));

                if (!n)
                        return -ENOMEM;
                x->file.entries = n;
                x->cap = cap;
        }

        e = &x->file.entries[x->file.n];
        e->name = strndup(name, name_len);
        if (!e->name)
                return -ENOMEM;
        e->value = v->data;
        e->line = line;
        *v = (struct buf) {};
        x->file.n++;
        return 0;
}

/* "export A B" marks variables for export without assigning: nothing to record, but the names
 * must still be names. */
static int parse_export_only(struct parser *x) {
        for (;;) {
                skip_blanks(x);
                if (at_end(x) || *x->p == '\n' || *x->p == '#')
                        return finish_line(x);
                if (parse_name(x) == 0)
                        return -EINVAL;
                if (!at_end(x) && !is_blank(*x->p) && *x->p != '\n')
                        return -EINVAL;
        }
}

static int parse_statement(struct parser *x) {
        struct buf v = {};
        const char *name;
        size_t name_len;
        unsigned line = x->line;
        bool exported = false;
        int r;

        if ((size_t) (x->end - x->p) > 6 && memcmp(x->p, "export", 6) == 0 && is_blank(x->p[6])) {
                x->p += 6;
                skip_blanks(x);
                exported = true;
        }

        name = x->p;
        name_len = parse_name(x);
        if (name_len == 0)
                return -EINVAL;
        if (at_end(x) || *x->p != '=') {
                if (!exported)
                        return -EINVAL;
                x->p = name;
                return parse_export_only(x);
        }
        x->p++;

        r = parse_value(x, &v);
        if (r >= 0)
                r = finish_line(x);
        if (r >= 0)
                r = store(x, name, name_len, &v, line);
        if (v.data)
                wipe_free(v.data, v.cap);
        return r;
}

void envfile_free(struct envfile *e) {
        if (!e)
                return;
        for (size_t i = 0; i < e->n; i++) {
                free(e->entries[i].name);
                wipe_free_str(e->entries[i].value);
        }
        free(e->entries);
        *e = (struct envfile) {};
}

/* Shells accept CRLF files only by accident; editors on other systems write them, so CR before
 * LF (and a final CR) is dropped before parsing. A NUL can be in no shell value. */
static int normalize(const char *text, size_t len, char **ret, size_t *ret_len, unsigned *ret_line) {
        unsigned line = 1;
        size_t o = 0;
        char *s;

        s = malloc(len + 1);
        if (!s)
                return -ENOMEM;

        if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) {
                text += 3;
                len -= 3;
        }

        for (size_t i = 0; i < len; i++) {
                if (text[i] == '\0') {
                        wipe_free(s, len + 1);
                        *ret_line = line;
                        return -EINVAL;
                }
                if (text[i] == '\r' && (i + 1 == len || text[i + 1] == '\n'))
                        continue;
                if (text[i] == '\n')
                        line++;
                s[o++] = text[i];
        }
        s[o] = '\0';

        *ret = s;
        *ret_len = o;
        return 0;
}

int envfile_parse(const char *text, size_t len, struct envfile *ret, unsigned *ret_err_line) {
        struct parser x = { .line = 1 };
        unsigned err_line = 0;
        size_t n_len = 0;
        char *n = NULL;
        int r;

        if (!ret || (!text && len > 0))
                return -EINVAL;

        r = normalize(text ? text : "", len, &n, &n_len, &err_line);
        if (r < 0) {
                if (r == -EINVAL && ret_err_line)
                        *ret_err_line = err_line;
                return r;
        }

        x.p = n;
        x.end = n + n_len;

        while (!at_end(&x)) {
                skip_blanks(&x);
                if (at_end(&x))
                        break;
                if (*x.p == '\n') {
                        x.p++;
                        x.line++;
                        continue;
                }
                if (*x.p == '#') {
                        skip_to_eol(&x);
                        continue;
                }

                err_line = x.line;
                r = parse_statement(&x);
                if (r < 0) {
                        /* An unterminated quote is reported where it was opened. */
                        if ((r == -EINVAL || r == -ENOKEY) && ret_err_line)
                                *ret_err_line = at_end(&x) ? err_line : x.line;
                        envfile_free(&x.file);
                        wipe_free(n, n_len + 1);
                        return r;
                }
        }

        wipe_free(n, n_len + 1);
        *ret = x.file;
        return 0;
}

int envfile_load(const char *path, struct envfile *ret, unsigned *ret_err_line) {
        char *data;
        size_t len;
        int r;

        if (!path || !ret)
                return -EINVAL;

        r = fileio_read(path, ENVFILE_MAX_SIZE, &data, &len);
        if (r < 0)
                return r;
        r = envfile_parse(data, len, ret, ret_err_line);
        wipe_free(data, len + 1);
        return r;
}

const char *envfile_get(const struct envfile *e, const char *name) {
        if (!e || !name)
                return NULL;
        /* Assignments to one name are merged at parse time, so the first match is the last one. */
        for (size_t i = 0; i < e->n; i++)
                if (strcmp(e->entries[i].name, name) == 0)
                        return e->entries[i].value;
        return NULL;
}
