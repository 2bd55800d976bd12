/* ctl.c — keypoolctl's presentation: the daemon's JSON documents as aligned text tables.
 *
 * Owns how keypool looks to a person at a shell: column choice, alignment, durations, colour and
 * the wording of refusals. It is pure on purpose (a parsed document in, text out to a stream the
 * caller owns): the client's main does the talking to the daemon, and the unit tests pin the
 * text down without a daemon. Documents are read defensively, since a newer or older daemon may
 * lack a field: a missing value prints as "-", never as a crash.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* asprintf */
#endif
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/ctl.h"

#define COLOUR_RESET "\033[0m"

struct ctl_table {
        unsigned n_columns;
        unsigned n_rows;                /* header row included */
        unsigned allocated;
        char **cells;                   /* n_rows × n_columns, row-major */
        bool *right;                    /* per column */
        int state_column;               /* -1: none */
};

/* --- tables ------------------------------------------------------------------------------- */

int ctl_table_new(unsigned n_columns, const char *const *headers, struct ctl_table **ret) {
        struct ctl_table *t;
        int r;

        if (n_columns == 0)
                return -EINVAL;
        t = calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        t->n_columns = n_columns;
        t->state_column = -1;
        t->right = calloc(n_columns, sizeof(bool));
        if (!t->right) {
                free(t);
                return -ENOMEM;
        }
        r = ctl_table_add(t, headers);
        if (r < 0) {
                ctl_table_free(t);
                return r;
        }
        *ret = t;
        return 0;
}

void ctl_table_free(struct ctl_table *t) {
        if (!t)
                return;
        for (size_t i = 0; i < (size_t) t->n_rows * t->n_columns; i++)
                free(t->cells[i]);
        free(t->cells);
        free(t->right);
        free(t);
}

void ctl_table_align_right(struct ctl_table *t, unsigned column) {
        if (column < t->n_columns)
                t->right[column] = true;
}

void ctl_table_colour_states(struct ctl_table *t, unsigned column) {
        if (column < t->n_columns)
                t->state_column = (int) column;
}

int ctl_table_add(struct ctl_table *t, const char *const *cells) {
        char **row;

        if (t->n_rows == t->allocated) {
                unsigned n = t->allocated ? t->allocated * 2 : 8;
                char **grown = reallocarray(t->cells, (size_t) n * t->n_columns, sizeof(char *));

                if (!grown)
                        return -ENOMEM;
                t->cells = grown;
                t->allocated = n;
        }
        row = t->cells + (size_t) t->n_rows * t->n_columns;
        for (unsigned c = 0; c < t->n_columns; c++) {
                row[c] = strdup(cells[c] ? cells[c] : "-");
                if (!row[c]) {
                        while (c > 0)
                                free(row[--c]);
                        return -ENOMEM;
                }
        }
        t->n_rows++;
        return 0;
}

unsigned ctl_table_rows(const struct ctl_table *t) {
        return t->n_rows - 1;
}

/* Display width in code points: pool names may be UTF-8, and counting bytes would push every
 * later column of that row out of line. Continuation bytes (10xxxxxx) take no column. */
static size_t text_width(const char *s) {
        size_t w = 0;

        for (; *s; s++)
                if (((unsigned char) *s & 0xC0) != 0x80)
                        w++;
        return w;
}

static void pad(FILE *out, size_t n) {
        while (n-- > 0)
                fputc(' ', out);
}

int ctl_table_write(const struct ctl_table *t, FILE *out, bool colour) {
        size_t *width = calloc(t->n_columns, sizeof(size_t));

        if (!width)
                return -ENOMEM;
        for (unsigned r = 0; r < t->n_rows; r++)
                for (unsigned c = 0; c < t->n_columns; c++) {
                        size_t w = text_width(t->cells[(size_t) r * t->n_columns + c]);

                        if (w > width[c])
                                width[c] = w;
                }

        for (unsigned r = 0; r < t->n_rows; r++) {
                /* Blanks are owed rather than written, and paid only before the next visible
                 * text: a row whose last cells are empty then ends without trailing blanks. */
                size_t owed = 0;

                for (unsigned c = 0; c < t->n_columns; c++) {
                        const char *cell = t->cells[(size_t) r * t->n_columns + c];
                        size_t gap = width[c] - text_width(cell);
                        const char *hue = NULL;

                        if (colour && r > 0 && (int) c == t->state_column)
                                hue = ctl_state_colour(cell);
                        if (c > 0)
                                owed += 2;
                        if (t->right[c])
                                owed += gap;
                        if (*cell) {
                                pad(out, owed);
                                owed = 0;
                                /* The escape codes go around the text only, so padding stays
                                 * outside them and the columns line up either way. */
                                if (hue)
                                        fputs(hue, out);
                                fputs(cell, out);
                                if (hue)
                                        fputs(COLOUR_RESET, out);
                        }
                        if (!t->right[c])
                                owed += gap;
                }
                fputc('\n', out);
        }
        free(width);
        return ferror(out) ? -EIO : 0;
}

/* --- small pieces ------------------------------------------------------------------------- */

const char *ctl_state_colour(const char *state) {
        if (!state)
                return NULL;
        if (strcmp(state, "ready") == 0)
                return "\033[32m";
        if (strcmp(state, "cooling") == 0)
                return "\033[33m";
        if (strcmp(state, "disabled") == 0)
                return "\033[31m";
        return NULL;
}

bool ctl_want_colour(bool is_terminal, const char *no_color, const char *term) {
        if (!is_terminal)
                return false;
        if (no_color && *no_color)
                return false;
        return !(term && strcmp(term, "dumb") == 0);
}

void ctl_format_duration(int64_t seconds, char *buf, size_t size) {
        if (seconds <= 0)
                snprintf(buf, size, "0s");
        else if (seconds < 60)
                snprintf(buf, size, "%" PRId64 "s", seconds);
        else if (seconds < 3600)
                snprintf(buf, size, "%" PRId64 "m%02" PRId64 "s", seconds / 60, seconds % 60);
        else if (seconds < 86400)
                snprintf(buf, size, "%" PRId64 "h%02" PRId64 "m", seconds / 3600, seconds % 3600 / 60);
        else
                snprintf(buf, size, "%" PRId64 "d%02" PRId64 "h", seconds / 86400, seconds % 86400 / 3600);
}

char *ctl_url_escape(const char *s) {
        static const char hex[] = "0123456789ABCDEF";
        char *out = malloc(strlen(s) * 3 + 1), *o = out;

        if (!out)
                return NULL;
        for (const unsigned char *p = (const unsigned char *) s; *p; p++) {
                if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                    *p == '-' || *p == '.' || *p == '_' || *p == '~') {
                        *o++ = (char) *p;
                } else {
                        *o++ = '%';
                        *o++ = hex[*p >> 4];
                        *o++ = hex[*p & 15];
                }
        }
        *o = '\0';
        return out;
}

char *ctl_history_path(unsigned limit, const char *pool, const char *key) {
        char *epool = pool ? ctl_url_escape(pool) : NULL, *ekey = key ? ctl_url_escape(key) : NULL;
        char *path = NULL;
        size_t size = 0;
        FILE *f;
        char sep = '?';

        if ((pool && !epool) || (key && !ekey))
                goto finish;
        f = open_memstream(&path, &size);
        if (!f)
                goto finish;
        fputs("/api/history", f);
        if (limit > 0) {
                fprintf(f, "%climit=%u", sep, limit);
                sep = '&';
        }
        if (epool) {
                fprintf(f, "%cpool=%s", sep, epool);
                sep = '&';
        }
        if (ekey)
                fprintf(f, "%ckey=%s", sep, ekey);
        if (fclose(f) != 0) {
                free(path);
                path = NULL;
        }
finish:
        free(epool);
        free(ekey);
        return path;
}

char *ctl_error_text(long http_status, const char *body, size_t size) {
        json_t *doc = body && size ? json_loadb(body, size, 0, NULL) : NULL;
        json_t *err = json_object_get(doc, "error");
        const char *message = json_string_value(json_object_get(err, "message"));
        const char *code = json_string_value(json_object_get(err, "code"));
        char *line = NULL, *text = NULL;
        int r;

        if (!message && body && size) {
                /* Not keypool's own error shape (a proxy in between, an older daemon): its first
                 * line still says more than the bare status. */
                size_t n = 0;

                while (n < size && n < 200 && body[n] != '\n' && body[n] != '\r' && body[n] != '\0')
                        n++;
                line = strndup(body, n);
                if (!line)
                        goto finish;
                if (*line)
                        message = line;
        }
        if (message && code)
                r = asprintf(&text, "%s (%s, HTTP %ld)", message, code, http_status);
        else if (message)
                r = asprintf(&text, "%s (HTTP %ld)", message, http_status);
        else
                r = asprintf(&text, "the daemon answered HTTP %ld", http_status);
        if (r < 0)
                text = NULL;
finish:
        free(line);
        json_decref(doc);
        return text;
}

/* --- reading documents -------------------------------------------------------------------- */

/* A field as text for a table cell: strings as they are, integers in decimal, null and missing
 * as NULL (the table shows "-"). buf holds the digits. */
static const char *field(const json_t *obj, const char *name, char *buf, size_t size) {
        const json_t *v = json_object_get(obj, name);

        if (json_is_string(v))
                return json_string_value(v);
        if (json_is_integer(v)) {
                snprintf(buf, size, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
                return buf;
        }
        if (json_is_true(v))
                return "yes";
        if (json_is_false(v))
                return "no";
        return NULL;
}

static json_int_t number(const json_t *obj, const char *name) {
        return json_integer_value(json_object_get(obj, name));
}

/* A seconds field as a duration; NULL ("-") when absent or zero, which for a cooldown means
 * "not cooling" rather than "zero seconds left". */
static const char *duration_field(const json_t *obj, const char *name, char *buf, size_t size) {
        json_int_t s = number(obj, name);

        if (s <= 0)
                return NULL;
        ctl_format_duration(s, buf, size);
        return buf;
}

static int write_and_free(struct ctl_table *t, FILE *out, bool colour) {
        int r = ctl_table_write(t, out, colour);

        ctl_table_free(t);
        return r;
}

/* --- the documents ------------------------------------------------------------------------ */

enum {
        KEY_POOL, KEY_ID, KEY_MASKED, KEY_STATE, KEY_REASON, KEY_COOLDOWN, KEY_REQUESTS,
        KEY_SUCCESSES, KEY_RATE_LIMITED, KEY_FAILURES, KEY_IN_FLIGHT, KEY_LAST, _KEY_COLUMNS
};

int ctl_write_keys(FILE *out, const json_t *doc, bool colour) {
        static const char *const headers[_KEY_COLUMNS] = {
                "POOL", "KEY", "MASKED", "STATE", "REASON", "COOLDOWN", "REQUESTS", "OK",
                "LIMITED", "FAILED", "INFLIGHT", "LAST",
        };
        const json_t *pools = json_object_get(doc, "pools"), *pool;
        struct ctl_table *t;
        size_t i;
        int r;

        if (!json_is_array(pools))
                return -EINVAL;
        r = ctl_table_new(_KEY_COLUMNS, headers, &t);
        if (r < 0)
                return r;
        ctl_table_colour_states(t, KEY_STATE);
        for (unsigned c = KEY_REQUESTS; c <= KEY_IN_FLIGHT; c++)
                ctl_table_align_right(t, c);
        ctl_table_align_right(t, KEY_LAST);

        json_array_foreach(pools, i, pool) {
                const json_t *keys = json_object_get(pool, "keys"), *k;
                size_t j;

                json_array_foreach(keys, j, k) {
                        char b[_KEY_COLUMNS][32];
                        const char *row[_KEY_COLUMNS] = {
                                [KEY_POOL] = json_string_value(json_object_get(pool, "name")),
                                [KEY_ID] = field(k, "id", b[KEY_ID], sizeof(b[0])),
                                [KEY_MASKED] = field(k, "masked", b[KEY_MASKED], sizeof(b[0])),
                                [KEY_STATE] = field(k, "state", b[KEY_STATE], sizeof(b[0])),
                                [KEY_REASON] = field(k, "reason", b[KEY_REASON], sizeof(b[0])),
                                [KEY_COOLDOWN] = duration_field(k, "cooldown_remaining_s", b[KEY_COOLDOWN], sizeof(b[0])),
                                [KEY_REQUESTS] = field(k, "requests", b[KEY_REQUESTS], sizeof(b[0])),
                                [KEY_SUCCESSES] = field(k, "successes", b[KEY_SUCCESSES], sizeof(b[0])),
                                [KEY_RATE_LIMITED] = field(k, "rate_limited", b[KEY_RATE_LIMITED], sizeof(b[0])),
                                [KEY_FAILURES] = field(k, "failures", b[KEY_FAILURES], sizeof(b[0])),
                                [KEY_IN_FLIGHT] = field(k, "in_flight", b[KEY_IN_FLIGHT], sizeof(b[0])),
                                [KEY_LAST] = field(k, "last_status", b[KEY_LAST], sizeof(b[0])),
                        };

                        r = ctl_table_add(t, row);
                        if (r < 0) {
                                ctl_table_free(t);
                                return r;
                        }
                }
        }
        r = write_and_free(t, out, colour);
        if (r < 0)
                return r;

        json_array_foreach(pools, i, pool)
                if (json_is_true(json_object_get(pool, "account_limit_suspected")))
                        fprintf(out, "note: pool %s: every key was rate limited at once; the "
                                "provider account's own limit is suspected\n",
                                json_string_value(json_object_get(pool, "name")) ?: "?");
        return ferror(out) ? -EIO : 0;
}

static int write_workers(FILE *out, const json_t *workers) {
        static const char *const headers[] = {
                "SLOT", "PID", "GEN", "STAGE", "HEARTBEAT", "REQUESTS", "INFLIGHT", "WAITING",
        };
        struct ctl_table *t;
        const json_t *w;
        size_t i;
        int r;

        r = ctl_table_new(8, headers, &t);
        if (r < 0)
                return r;
        for (unsigned c = 0; c < 8; c++)
                if (c != 3)
                        ctl_table_align_right(t, c);
        json_array_foreach(workers, i, w) {
                char b[8][32];
                const json_t *age = json_object_get(w, "heartbeat_age_ms");
                const char *row[8] = {
                        field(w, "slot", b[0], sizeof(b[0])),
                        field(w, "pid", b[1], sizeof(b[0])),
                        field(w, "generation", b[2], sizeof(b[0])),
                        field(w, "stage", b[3], sizeof(b[0])),
                        NULL,
                        field(w, "requests", b[5], sizeof(b[0])),
                        field(w, "in_flight", b[6], sizeof(b[0])),
                        field(w, "waiting", b[7], sizeof(b[0])),
                };

                if (json_is_integer(age)) {
                        snprintf(b[4], sizeof(b[4]), "%" JSON_INTEGER_FORMAT "ms", json_integer_value(age));
                        row[4] = b[4];
                }
                r = ctl_table_add(t, row);
                if (r < 0) {
                        ctl_table_free(t);
                        return r;
                }
        }
        return write_and_free(t, out, false);
}

static int write_pools(FILE *out, const json_t *pools) {
        static const char *const headers[] = {
                "POOL", "MODEL", "KEYS", "READY", "COOLING", "DISABLED", "NOTE",
        };
        struct ctl_table *t;
        const json_t *p;
        size_t i;
        int r;

        r = ctl_table_new(7, headers, &t);
        if (r < 0)
                return r;
        for (unsigned c = 2; c <= 5; c++)
                ctl_table_align_right(t, c);
        json_array_foreach(pools, i, p) {
                char b[7][32];
                const char *row[7] = {
                        field(p, "name", b[0], sizeof(b[0])),
                        field(p, "model", b[1], sizeof(b[0])),
                        field(p, "keys", b[2], sizeof(b[0])),
                        field(p, "ready", b[3], sizeof(b[0])),
                        field(p, "cooling", b[4], sizeof(b[0])),
                        field(p, "disabled", b[5], sizeof(b[0])),
                        json_is_true(json_object_get(p, "account_limit_suspected"))
                                ? "account limit suspected" : "",
                };

                r = ctl_table_add(t, row);
                if (r < 0) {
                        ctl_table_free(t);
                        return r;
                }
        }
        return write_and_free(t, out, false);
}

/* "3 ready" with the state word coloured like the keys table does. */
static void write_count(FILE *out, json_int_t n, const char *state, bool colour) {
        const char *hue = colour && n > 0 ? ctl_state_colour(state) : NULL;

        fprintf(out, "%" JSON_INTEGER_FORMAT " %s%s%s", n, hue ?: "", state, hue ? COLOUR_RESET : "");
}

int ctl_write_status(FILE *out, const json_t *doc, bool colour) {
        const json_t *totals = json_object_get(doc, "totals");
        const json_t *workers = json_object_get(doc, "workers"), *pools = json_object_get(doc, "pools");
        char up[32];
        int r;

        if (!json_is_object(doc))
                return -EINVAL;
        ctl_format_duration(number(doc, "uptime_s"), up, sizeof(up));
        fprintf(out, "keypoold %s, pid %" JSON_INTEGER_FORMAT ", up %s, config generation %" JSON_INTEGER_FORMAT "\n",
                json_string_value(json_object_get(doc, "version")) ?: "?", number(doc, "pid"), up,
                number(doc, "generation"));
        fprintf(out, "requests %" JSON_INTEGER_FORMAT ", in flight %" JSON_INTEGER_FORMAT "\n",
                number(doc, "requests"), number(doc, "in_flight"));
        if (json_is_object(totals)) {
                fprintf(out, "keys %" JSON_INTEGER_FORMAT ": ", number(totals, "keys"));
                write_count(out, number(totals, "ready"), "ready", colour);
                fputs(", ", out);
                write_count(out, number(totals, "cooling"), "cooling", colour);
                fputs(", ", out);
                write_count(out, number(totals, "disabled"), "disabled", colour);
                fputc('\n', out);
                fprintf(out, "upstream: %" JSON_INTEGER_FORMAT " requests, %" JSON_INTEGER_FORMAT " ok, %"
                        JSON_INTEGER_FORMAT " rate limited, %" JSON_INTEGER_FORMAT " failed; tokens %"
                        JSON_INTEGER_FORMAT " in, %" JSON_INTEGER_FORMAT " out\n",
                        number(totals, "requests"), number(totals, "successes"),
                        number(totals, "rate_limited"), number(totals, "failures"),
                        number(totals, "tokens_in"), number(totals, "tokens_out"));
        } else {
                fprintf(out, "keys %" JSON_INTEGER_FORMAT "\n", number(doc, "keys"));
        }
        if (json_is_array(workers)) {
                fputc('\n', out);
                r = write_workers(out, workers);
                if (r < 0)
                        return r;
        }
        if (json_is_array(pools)) {
                fputc('\n', out);
                r = write_pools(out, pools);
                if (r < 0)
                        return r;
        }
        return ferror(out) ? -EIO : 0;
}

int ctl_write_check(FILE *out, const json_t *doc, bool colour) {
        const json_t *ok = json_object_get(doc, "ok"), *problems = json_object_get(doc, "problems"), *p;
        const char *hue = NULL;
        size_t i;

        if (!json_is_boolean(ok) || !json_is_array(problems))
                return -EINVAL;
        if (json_is_true(ok)) {
                if (colour)
                        hue = ctl_state_colour("ready");
                fprintf(out, "%sok%s: %lld pools, %lld keys, %lld in flight, %lld workers\n", hue ?: "",
                        hue ? COLOUR_RESET : "", (long long) number(doc, "pools"),
                        (long long) number(doc, "keys"), (long long) number(doc, "in_flight"),
                        (long long) number(doc, "workers"));
                return ferror(out) ? -EIO : 0;
        }
        json_array_foreach(problems, i, p)
                fprintf(out, "%s\n", json_string_value(p) ?: "?");
        if ((json_int_t) json_array_size(problems) < number(doc, "n_problems"))
                fprintf(out, "… and %lld more\n",
                        (long long) (number(doc, "n_problems") - (json_int_t) json_array_size(problems)));
        return ferror(out) ? -EIO : 0;
}

int ctl_write_health(FILE *out, const json_t *doc, bool colour) {
        static const char *const headers[] = { "POOL", "READY", "KEYS" };
        const char *status = json_string_value(json_object_get(doc, "status"));
        const json_t *pools = json_object_get(doc, "pools"), *p;
        const char *hue = NULL;
        struct ctl_table *t;
        size_t i;
        int r;

        if (!status)
                return -EINVAL;
        if (colour)
                hue = strcmp(status, "ok") == 0 ? ctl_state_colour("ready") : ctl_state_colour("disabled");
        fprintf(out, "%s%s%s\n", hue ?: "", status, hue ? COLOUR_RESET : "");
        if (!json_is_array(pools) || json_array_size(pools) == 0)
                return ferror(out) ? -EIO : 0;

        r = ctl_table_new(3, headers, &t);
        if (r < 0)
                return r;
        ctl_table_align_right(t, 1);
        ctl_table_align_right(t, 2);
        json_array_foreach(pools, i, p) {
                char b[3][32];
                const char *row[3] = {
                        field(p, "name", b[0], sizeof(b[0])),
                        field(p, "ready", b[1], sizeof(b[0])),
                        field(p, "keys", b[2], sizeof(b[0])),
                };

                r = ctl_table_add(t, row);
                if (r < 0) {
                        ctl_table_free(t);
                        return r;
                }
        }
        return write_and_free(t, out, false);
}

int ctl_write_history(FILE *out, const json_t *doc, bool colour) {
        static const char *const headers[] = {
                "TIME", "POOL", "EVENT", "KEY", "TO", "STATUS", "REASON", "COOLDOWN",
        };
        const json_t *events = json_object_get(doc, "events"), *e;
        struct ctl_table *t;
        size_t i;
        int r;

        if (!json_is_array(events))
                return -EINVAL;
        if (json_array_size(events) == 0) {
                fputs("no events\n", out);
                return ferror(out) ? -EIO : 0;
        }
        r = ctl_table_new(8, headers, &t);
        if (r < 0)
                return r;
        ctl_table_align_right(t, 5);
        ctl_table_align_right(t, 7);
        json_array_foreach(events, i, e) {
                char b[8][32];
                const char *row[8] = {
                        field(e, "time", b[0], sizeof(b[0])),
                        field(e, "pool", b[1], sizeof(b[0])),
                        field(e, "event", b[2], sizeof(b[0])),
                        field(e, "from", b[3], sizeof(b[0])),
                        field(e, "to", b[4], sizeof(b[0])),
                        field(e, "status", b[5], sizeof(b[0])),
                        field(e, "reason", b[6], sizeof(b[0])),
                        duration_field(e, "cooldown_s", b[7], sizeof(b[0])),
                };

                r = ctl_table_add(t, row);
                if (r < 0) {
                        ctl_table_free(t);
                        return r;
                }
        }
        return write_and_free(t, out, false);
}

int ctl_write_key_action(FILE *out, const json_t *doc, bool colour) {
        const json_t *k = json_object_get(doc, "key");
        const char *id = json_string_value(json_object_get(k, "id"));
        const char *state = json_string_value(json_object_get(k, "state"));
        const char *reason = json_string_value(json_object_get(k, "reason"));
        const char *masked = json_string_value(json_object_get(k, "masked"));
        const char *hue = colour ? ctl_state_colour(state) : NULL;

        if (!id || !state)
                return -EINVAL;
        fprintf(out, "%s", id);
        if (masked)
                fprintf(out, " (%s)", masked);
        fprintf(out, ": %s%s%s", hue ?: "", state, hue ? COLOUR_RESET : "");
        if (reason)
                fprintf(out, ", reason %s", reason);
        fputc('\n', out);
        return ferror(out) ? -EIO : 0;
}

int ctl_write_import(FILE *out, const json_t *doc, bool colour) {
        const json_t *imported = json_object_get(doc, "imported");

        if (!json_is_integer(imported))
                return -EINVAL;
        fprintf(out, "imported %" JSON_INTEGER_FORMAT ", ignored %" JSON_INTEGER_FORMAT "\n",
                json_integer_value(imported), number(doc, "ignored"));
        return ferror(out) ? -EIO : 0;
}

int ctl_state_summary(const json_t *doc, size_t *ret_keys, size_t *ret_events) {
        const char *format = json_string_value(json_object_get(doc, "format"));
        const json_t *keys = json_object_get(doc, "keys"), *history = json_object_get(doc, "history");

        if (!format || strcmp(format, "keypool-state") != 0 || !json_is_array(keys))
                return -EINVAL;
        if (history && !json_is_array(history))
                return -EINVAL;
        *ret_keys = json_array_size(keys);
        *ret_events = json_array_size(history);
        return 0;
}
