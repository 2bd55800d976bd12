/* persist.c — keypool's state outside the process: state files, export and import.
 *
 * Owns the state document ({"format":"keypool-state","version":1,…}) and the files it lives in.
 * The table keeps monotonic time, which means nothing to the next boot, so every time in the
 * document is wall-clock (RFC 3339, UTC), converted through the pair of clocks the caller passes
 * in: wall = now_wall + (mono - now_mono). Keys are named by pool and id only; nothing here ever
 * sees a secret or a masked form. Encoding and applying do no I/O; the file functions do nothing
 * else and never log.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* asprintf */
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "keypool/fileio.h"
#include "keypool/jscan.h"
#include "keypool/persist.h"
#include "keypool/timeutil.h"
#include "keypool/verdict.h"

#define PERSIST_FORMAT   "keypool-state"
#define PERSIST_VERSION  1
#define PERSIST_READ_MAX ((size_t) 64 << 20)

/* --- time ---------------------------------------------------------------------------------- */

static int64_t add_sat(int64_t a, int64_t b) {
        int64_t r;

        if (__builtin_add_overflow(a, b, &r))
                return b > 0 ? INT64_MAX : INT64_MIN;
        return r;
}

static int64_t sub_sat(int64_t a, int64_t b) {
        int64_t r;

        if (__builtin_sub_overflow(a, b, &r))
                return b < 0 ? INT64_MAX : INT64_MIN;
        return r;
}

/* The two clocks, each read once by the caller: converting with them keeps every time in one
 * document consistent with every other. */
static int64_t mono_to_wall(int64_t mono, int64_t now_mono, int64_t now_wall) {
        return add_sat(now_wall, sub_sat(mono, now_mono));
}

static int64_t wall_to_mono(int64_t wall, int64_t now_mono, int64_t now_wall) {
        return add_sat(now_mono, sub_sat(wall, now_wall));
}

/* Reads an RFC 3339 date-time ("2026-11-28T10:20:00Z", fractions and offsets allowed) as ms
 * since the epoch. Year 0000 is what a clamped time was saved as; a leap second is the last
 * moment of its minute as far as a deadline cares. */
static int parse_time(const char *s, int64_t *ret_ms) {
        struct timeutil_civil c;

        if (timeutil_parse_rfc3339(s, strlen(s), &c) < 0)
                return -EINVAL;
        if (c.second == 60)
                c.second = 59;
        *ret_ms = timeutil_civil_to_ms(&c);
        return 0;
}

/* --- names --------------------------------------------------------------------------------- */

static int state_from_name(const char *s, enum key_state *ret) {
        for (int i = KEY_STATE_INVALID + 1; i < _KEY_STATE_MAX; i++)
                if (strcmp(s, keytable_state_name(i)) == 0) {
                        *ret = i;
                        return 0;
                }
        return -EINVAL;
}

static int reason_from_name(const char *s, enum key_reason *ret) {
        for (int i = KEY_REASON_NONE + 1; i < _KEY_REASON_MAX; i++)
                if (keytable_reason_name(i) && strcmp(s, keytable_reason_name(i)) == 0) {
                        *ret = i;
                        return 0;
                }
        return -EINVAL;
}

static int class_from_name(const char *s, enum verdict_class *ret) {
        for (int i = VERDICT_NONE + 1; i < _VERDICT_MAX; i++)
                if (verdict_class_name(i) && strcmp(s, verdict_class_name(i)) == 0) {
                        *ret = i;
                        return 0;
                }
        return -EINVAL;
}

static int kind_from_name(const char *s, enum history_kind *ret) {
        for (int i = HISTORY_NONE + 1; i < _HISTORY_MAX; i++)
                if (keytable_history_kind_name(i) && strcmp(s, keytable_history_kind_name(i)) == 0) {
                        *ret = i;
                        return 0;
                }
        return -EINVAL;
}

/* --- export -------------------------------------------------------------------------------- */

static json_t *string_or_null(const char *s) {
        return s && s[0] ? json_string(s) : json_null();
}

static json_t *count(uint64_t v) {
        return json_integer(v > (uint64_t) LLONG_MAX ? LLONG_MAX : (json_int_t) v);
}

static json_t *time_json(int64_t wall_ms, bool with_ms) {
        char buf[TIMEUTIL_RFC3339_MAX];

        timeutil_format_rfc3339(wall_ms, with_ms, buf);
        return json_string(buf);
}

static json_t *key_to_json(const char *pool, const struct keytable_key_view *v, int64_t now_mono,
                           int64_t now_wall) {
        json_t *j = json_object(), *until = json_null(), *used = json_null();

        if (!j)
                return NULL;
        if (v->state == KEY_COOLING) {
                int64_t wall = mono_to_wall(v->cooldown_until_ms, now_mono, now_wall);

                /* Whole seconds, rounded up: a key rests a moment longer after a restart rather
                 * than spend a request on a 429. */
                until = time_json(timeutil_floor_div(wall, 1000) * 1000 + (wall % 1000 != 0) * 1000,
                                     false);
        }
        if (v->last_used_ms > 0)
                used = time_json(mono_to_wall(v->last_used_ms, now_mono, now_wall), false);

        if (json_object_set_new(j, "pool", json_string(pool)) < 0 ||
            json_object_set_new(j, "id", json_string(v->id)) < 0 ||
            json_object_set_new(j, "state", json_string(keytable_state_name(v->state))) < 0 ||
            json_object_set_new(j, "reason", string_or_null(keytable_reason_name(v->reason))) < 0 ||
            json_object_set_new(j, "cooldown_until", until) < 0 ||
            json_object_set_new(j, "requests", count(v->requests)) < 0 ||
            json_object_set_new(j, "successes", count(v->successes)) < 0 ||
            json_object_set_new(j, "rate_limited", count(v->rate_limited)) < 0 ||
            json_object_set_new(j, "failures", count(v->failures)) < 0 ||
            json_object_set_new(j, "consecutive_failures", count(v->consecutive_failures)) < 0 ||
            json_object_set_new(j, "tokens_in", count(v->tokens_in)) < 0 ||
            json_object_set_new(j, "tokens_out", count(v->tokens_out)) < 0 ||
            json_object_set_new(j, "last_status",
                                v->last_status > 0 ? json_integer(v->last_status) : json_null()) < 0 ||
            json_object_set_new(j, "last_class", string_or_null(verdict_class_name(v->last_class))) < 0 ||
            json_object_set_new(j, "last_used", used) < 0) {
                json_decref(j);
                return NULL;
        }
        return j;
}

static json_t *event_to_json(const struct keytable_event *e) {
        json_t *j = json_object();

        if (!j)
                return NULL;
        if (json_object_set_new(j, "time", time_json(e->wall_ms, true)) < 0 ||
            json_object_set_new(j, "pool", json_string(e->pool)) < 0 ||
            json_object_set_new(j, "event", string_or_null(keytable_history_kind_name(e->kind))) < 0 ||
            json_object_set_new(j, "from", string_or_null(e->key_from)) < 0 ||
            json_object_set_new(j, "to", string_or_null(e->key_to)) < 0 ||
            json_object_set_new(j, "status", e->status > 0 ? json_integer(e->status) : json_null()) < 0 ||
            json_object_set_new(j, "reason", string_or_null(keytable_reason_name(e->reason))) < 0 ||
            json_object_set_new(j, "cooldown_s",
                                e->cooldown_ms > 0 ? json_integer(e->cooldown_ms / 1000 +
                                                                  (e->cooldown_ms % 1000 != 0))
                                                   : json_null()) < 0) {
                json_decref(j);
                return NULL;
        }
        return j;
}

/* Appends one array element on a line of its own: a state file of many keys stays readable and
 * diffs line by line, and each element is still jansson's own encoding. */
static int dump_element(FILE *f, json_t *j, bool *first) {
        if (!j)
                return -ENOMEM;
        if (fputs(*first ? "\n" : ",\n", f) < 0 ||
            json_dumpf(j, f, JSON_COMPACT | JSON_PRESERVE_ORDER) < 0) {
                json_decref(j);
                return -EIO;
        }
        json_decref(j);
        *first = false;
        return 0;
}

static int export_keys(FILE *f, struct keytable *t, int64_t now_mono, int64_t now_wall) {
        unsigned n_pools = keytable_n_pools(t);
        bool first = true;

        for (unsigned p = 0; p < n_pools; p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys;
                int n, r = 0;

                n = keytable_pool_read_alloc(t, p, now_mono, &info, &keys);
                /* A reload took the pool away meanwhile: its keys are in some other pool. */
                if (n == -EINVAL)
                        continue;
                if (n < 0)
                        return n;
                for (int i = 0; i < n && r == 0; i++)
                        r = dump_element(f, key_to_json(info.name, &keys[i], now_mono, now_wall),
                                         &first);
                free(keys);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int export_history(FILE *f, struct keytable *t) {
        unsigned cap = keytable_history_capacity(t), n;
        struct keytable_event *events;
        bool first = true;
        int r = 0;

        if (cap == 0)
                return 0;
        events = calloc(cap, sizeof *events);
        if (!events)
                return -ENOMEM;
        n = keytable_history_read(t, events, cap);
        for (unsigned i = 0; i < n && r == 0; i++)
                r = dump_element(f, event_to_json(&events[i]), &first);
        free(events);
        return r;
}

char *persist_export(struct keytable *t, int64_t now_mono_ms, int64_t now_wall_ms) {
        char saved_at[TIMEUTIL_RFC3339_MAX], *buf = NULL;
        size_t size = 0;
        FILE *f;
        int r;

        if (!t)
                return NULL;
        f = open_memstream(&buf, &size);
        if (!f)
                return NULL;
        timeutil_format_rfc3339(now_wall_ms, false, saved_at);
        r = fprintf(f, "{\"format\":\"%s\",\"version\":%d,\"saved_at\":\"%s\",\n\"keys\":[",
                    PERSIST_FORMAT, PERSIST_VERSION, saved_at) < 0 ? -EIO : 0;
        if (r == 0)
                r = export_keys(f, t, now_mono_ms, now_wall_ms);
        if (r == 0)
                r = fputs("],\n\"history\":[", f) < 0 ? -EIO : 0;
        if (r == 0)
                r = export_history(f, t);
        if (r == 0)
                r = fputs("]}\n", f) < 0 ? -EIO : 0;
        if (fclose(f) != 0)
                r = -EIO;
        if (r < 0) {
                free(buf);
                return NULL;
        }
        return buf;
}

/* --- import -------------------------------------------------------------------------------- */

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...) {
        va_list ap;

        if (err && errlen > 0) {
                va_start(ap, fmt);
                vsnprintf(err, errlen, fmt, ap);
                va_end(ap);
        }
        return -EINVAL;
}

/* A document key: where it goes and what it says. Its strings are copied out of the text: a
 * fixed-size record per key, no allocation per key. */
struct doc_key {
        char pool[KEYTABLE_NAME_MAX + 1];       /* "": match by id alone */
        char id[KEYID_ID_LEN + 1];
        struct keytable_key_state st;
        const char *why;                /* why it is not valid, or NULL */
        bool valid;
        bool capped;                    /* its rest was cut to max_cooldown */
        bool applied;
};

/* A row of the table, as the current bank held it when the import began. */
struct table_row {
        char id[KEYID_ID_LEN + 1];
        char pool_name[KEYTABLE_NAME_MAX + 1];
        unsigned pool, position;
        uint32_t next;                  /* the next row in its bucket of the id index */
        bool exact;                     /* claimed by a document key naming its pool */
        bool taken;                     /* given a state by some document key */
};

#define NO_ROW UINT32_MAX

/* The rows by id: buckets of row indexes, chained through table_row.next. A key's rows are found
 * in a step or two where a sort of 10,000 rows and a binary search per key took milliseconds, at
 * start, before READY; the order of one id's rows never mattered, every one is handled alike. */
struct row_index {
        uint32_t *buckets;
        size_t mask;
};

/* FNV-1a: ids are fingerprints already, any mixing will do. */
static size_t id_hash(const char *id) {
        uint64_t h = UINT64_C(0xcbf29ce484222325);

        for (; *id; id++)
                h = (h ^ (unsigned char) *id) * UINT64_C(0x100000001b3);
        return (size_t) (h ^ h >> 32);
}

/* Names of the values this file reads (states, reasons, classes, kinds) are all shorter. */
#define NAME_BUF 32

static bool absent(const struct jscan_value *v) {
        return v->type == JSCAN_NONE || v->type == JSCAN_NULL;
}

/* A field that must be absent, null or a string, decoded into buf: *ret_set false when absent
 * or null. -ENOBUFS when the string does not fit, which callers read as "no name of ours" or "too
 * long" as the field requires; -EINVAL when it is not a string. */
static int opt_string(const struct jscan_value *v, char *buf, size_t size, bool *ret_set) {
        int r;

        if (absent(v)) {
                *ret_set = false;
                return 0;
        }
        r = jscan_string(v, buf, size, NULL);
        if (r < 0)
                return r;
        *ret_set = true;
        return 0;
}

/* A name field (state, reason, class, event): false when present and not a string, or a string
 * that is none of the names. */
static bool opt_name(const struct jscan_value *v, int (*from_name)(const char *, int *), int *ret) {
        char buf[NAME_BUF];
        bool set;

        if (opt_string(v, buf, sizeof buf, &set) < 0)
                return false;
        return !set || from_name(buf, ret) >= 0;
}

/* An RFC 3339 time field: false when present and not a string, or not a time. The text may be of
 * any length (a fraction has no limit), so a long one gets a buffer of its own. */
static bool opt_time(const struct jscan_value *v, bool *ret_set, int64_t *ret_ms) {
        char small[64], *buf = small;
        bool set;
        int r;

        r = opt_string(v, small, sizeof small, &set);
        if (r == -ENOBUFS) {
                buf = malloc(v->len);   /* decoding never lengthens; the quotes leave room */
                if (!buf)
                        return false;
                r = opt_string(v, buf, v->len, &set);
        }
        if (r == 0 && set)
                r = parse_time(buf, ret_ms);
        if (buf != small)
                free(buf);
        if (r < 0)
                return false;
        *ret_set = set;
        return true;
}

/* An integer in [0, max]: absent or null leaves *ret alone. jansson read counts as int64, and
 * refused the document for a larger integer; jscan_document refuses it the same way, so max
 * stays within INT64_MAX here too. */
static bool opt_uint(const struct jscan_value *v, uint64_t max, uint64_t *ret) {
        uint64_t x;

        if (absent(v))
                return true;
        if (jscan_uint(v, &x) < 0 || x > max || x > (uint64_t) INT64_MAX)
                return false;
        *ret = x;
        return true;
}

/* A number written as an integer, without fraction or exponent (what json_is_integer took), in
 * int64_t. -EINVAL for anything else, a real number included. */
static int int64_value(const struct jscan_value *v, int64_t *ret) {
        bool negative;
        uint64_t x;
        int r;

        if (v->type != JSCAN_NUMBER || v->len == 0)
                return -EINVAL;
        negative = v->text[0] == '-';
        r = jscan_uint(&(struct jscan_value) { JSCAN_NUMBER, v->text + negative, v->len - negative },
                       &x);
        if (r < 0)
                return r;
        if (x > (uint64_t) INT64_MAX + negative)
                return -ERANGE;
        *ret = negative ? (int64_t) (0 - x) : (int64_t) x;
        return 0;
}

/* The from_name functions with the signature opt_name takes. */
static int state_name(const char *s, int *ret) {
        enum key_state v;
        int r = state_from_name(s, &v);

        if (r >= 0)
                *ret = (int) v;
        return r;
}

static int reason_name(const char *s, int *ret) {
        enum key_reason v;
        int r = reason_from_name(s, &v);

        if (r >= 0)
                *ret = (int) v;
        return r;
}

static int class_name(const char *s, int *ret) {
        enum verdict_class v;
        int r = class_from_name(s, &v);

        if (r >= 0)
                *ret = (int) v;
        return r;
}

static int kind_name(const char *s, int *ret) {
        enum history_kind v;
        int r = kind_from_name(s, &v);

        if (r >= 0)
                *ret = (int) v;
        return r;
}

enum {
        K_POOL,
        K_ID,
        K_STATE,
        K_REASON,
        K_COOLDOWN_UNTIL,
        K_REQUESTS,
        K_SUCCESSES,
        K_RATE_LIMITED,
        K_FAILURES,
        K_CONSECUTIVE_FAILURES,
        K_TOKENS_IN,
        K_TOKENS_OUT,
        K_LAST_STATUS,
        K_LAST_CLASS,
        K_LAST_USED,
        _K_MAX,
};

static const char *const key_fields[_K_MAX] = {
        [K_POOL] = "pool",
        [K_ID] = "id",
        [K_STATE] = "state",
        [K_REASON] = "reason",
        [K_COOLDOWN_UNTIL] = "cooldown_until",
        [K_REQUESTS] = "requests",
        [K_SUCCESSES] = "successes",
        [K_RATE_LIMITED] = "rate_limited",
        [K_FAILURES] = "failures",
        [K_CONSECUTIVE_FAILURES] = "consecutive_failures",
        [K_TOKENS_IN] = "tokens_in",
        [K_TOKENS_OUT] = "tokens_out",
        [K_LAST_STATUS] = "last_status",
        [K_LAST_CLASS] = "last_class",
        [K_LAST_USED] = "last_used",
};

/* A count a JSON reader keeps exact: past 2^53 a double (what most readers hold a number in)
 * rounds, and the live counters never come near it. */
#define COUNT_MAX (UINT64_C(1) << 53)

/* One element of "keys". Any field of the wrong kind or outside what the live table can hold
 * makes the whole key unusable: it is ignored and counted, and *ret_why says which field and why
 * (a static string). The exception is "pool", which then only stops the key being matched by
 * pool. Members of other names are a later version's and ignored; of two members of one name the
 * last counts. A rest longer than max_cooldown_ms (when > 0) is cut to it, as a live one would
 * be, and ret->capped says so. */
static bool parse_key(const struct jscan_value *j, const struct jscan_value f[_K_MAX],
                      int64_t now_mono, int64_t now_wall, int64_t max_cooldown_ms,
                      struct doc_key *ret, const char **ret_why) {
        struct keytable_key_state st = { .reason = KEY_REASON_NONE, .last_class = VERDICT_NONE };
        const struct {
                unsigned field;
                uint64_t *value;
        } counts[] = {
                { K_REQUESTS,     &st.requests },
                { K_SUCCESSES,    &st.successes },
                { K_RATE_LIMITED, &st.rate_limited },
                { K_FAILURES,     &st.failures },
                { K_TOKENS_IN,    &st.tokens_in },
                { K_TOKENS_OUT,   &st.tokens_out },
        };
        int state = KEY_STATE_INVALID, reason = KEY_REASON_NONE, last_class = VERDICT_NONE;
        uint64_t consecutive = 0, status = 0;
        bool set, until_set = false, used_set = false;
        int64_t until = 0, used = 0;

        ret->valid = false;
        ret->applied = false;
        ret->capped = false;
        ret->id[0] = '\0';
        *ret_why = "is not an object with an \"id\"";
        if (j->type != JSCAN_OBJECT)
                return false;
        if (opt_string(&f[K_ID], ret->id, sizeof ret->id, &set) < 0 || !set || ret->id[0] == '\0') {
                ret->id[0] = '\0';
                return false;
        }
        /* A pool name longer than any pool can have matches no pool: as good as none. */
        if (opt_string(&f[K_POOL], ret->pool, sizeof ret->pool, &set) < 0 || !set)
                ret->pool[0] = '\0';
        *ret_why = "\"state\" is not ready, cooling or disabled";
        if (absent(&f[K_STATE]) || !opt_name(&f[K_STATE], state_name, &state))
                return false;
        *ret_why = "\"reason\" is not one of keypool's reasons";
        if (!opt_name(&f[K_REASON], reason_name, &reason))
                return false;
        *ret_why = "\"last_class\" is not one of keypool's classes";
        if (!opt_name(&f[K_LAST_CLASS], class_name, &last_class))
                return false;
        st.state = (enum key_state) state;
        st.reason = (enum key_reason) reason;
        st.last_class = (enum verdict_class) last_class;
        /* The deadline must be a string or null whatever the state, but is read only for a
         * cooling key. */
        *ret_why = "\"cooldown_until\" is not a time";
        if (!absent(&f[K_COOLDOWN_UNTIL]) && f[K_COOLDOWN_UNTIL].type != JSCAN_STRING)
                return false;
        *ret_why = "\"last_used\" is not a time";
        if (!opt_time(&f[K_LAST_USED], &used_set, &used))
                return false;
        for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
                if (!opt_uint(&f[counts[i].field], COUNT_MAX, counts[i].value)) {
                        static const char *const why[_K_MAX] = {
                                [K_REQUESTS] = "\"requests\" is not a whole number from 0 to 2^53",
                                [K_SUCCESSES] = "\"successes\" is not a whole number from 0 to 2^53",
                                [K_RATE_LIMITED] = "\"rate_limited\" is not a whole number from 0 to 2^53",
                                [K_FAILURES] = "\"failures\" is not a whole number from 0 to 2^53",
                                [K_TOKENS_IN] = "\"tokens_in\" is not a whole number from 0 to 2^53",
                                [K_TOKENS_OUT] = "\"tokens_out\" is not a whole number from 0 to 2^53",
                        };

                        *ret_why = why[counts[i].field];
                        return false;
                }
        *ret_why = "\"consecutive_failures\" is not a whole number from 0 to 4294967295";
        if (!opt_uint(&f[K_CONSECUTIVE_FAILURES], UINT_MAX, &consecutive))
                return false;
        *ret_why = "\"last_status\" is not an HTTP status (0 to 999)";
        if (!opt_uint(&f[K_LAST_STATUS], 999, &status))
                return false;
        st.consecutive_failures = (unsigned) consecutive;
        st.last_status = (int) status;
        if (used_set) {
                st.last_used_ms = wall_to_mono(used, now_mono, now_wall);
                /* Before this boot's clock began: kept as "never" rather than as a time the
                 * monotonic clock cannot say. A time ahead of now is a clock gone backwards. */
                if (st.last_used_ms <= 0)
                        st.last_used_ms = 0;
                else if (st.last_used_ms > now_mono)
                        st.last_used_ms = now_mono;
        }

        switch (st.state) {
        case KEY_READY:
                /* A ready key's reason is history, not state. */
                st.reason = KEY_REASON_NONE;
                break;
        case KEY_COOLING:
                *ret_why = "\"cooldown_until\" is not a time";
                if (!opt_time(&f[K_COOLDOWN_UNTIL], &until_set, &until) || !until_set)
                        return false;
                if (st.reason == KEY_REASON_NONE)
                        st.reason = KEY_REASON_RATE_LIMITED;
                st.cooldown_until_ms = wall_to_mono(until, now_mono, now_wall);
                /* Over while keypool was down: ready, a new run of failures begins. */
                if (st.cooldown_until_ms <= now_mono || st.cooldown_until_ms <= 0) {
                        st.state = KEY_READY;
                        st.reason = KEY_REASON_NONE;
                        st.cooldown_until_ms = 0;
                        st.consecutive_failures = 0;
                } else if (max_cooldown_ms > 0 && st.cooldown_until_ms - now_mono > max_cooldown_ms) {
                        /* No provider hint could have made a live rest this long: a hand-edited
                         * or foreign file must not park a key for a month. */
                        st.cooldown_until_ms = now_mono + max_cooldown_ms;
                        ret->capped = true;
                }
                break;
        case KEY_DISABLED:
                if (st.reason == KEY_REASON_NONE)
                        st.reason = KEY_REASON_OPERATOR;
                break;
        default:
                *ret_why = "\"state\" is not ready, cooling or disabled";
                return false;
        }
        *ret_why = NULL;
        ret->st = st;
        ret->valid = true;
        return true;
}

enum {
        E_TIME,
        E_EVENT,
        E_POOL,
        E_FROM,
        E_TO,
        E_REASON,
        E_STATUS,
        E_COOLDOWN_S,
        _E_MAX,
};

static const char *const event_fields[_E_MAX] = {
        [E_TIME] = "time",
        [E_EVENT] = "event",
        [E_POOL] = "pool",
        [E_FROM] = "from",
        [E_TO] = "to",
        [E_REASON] = "reason",
        [E_STATUS] = "status",
        [E_COOLDOWN_S] = "cooldown_s",
};

static bool parse_event(const struct jscan_value *j, const struct jscan_value f[_E_MAX],
                        struct keytable_event *ret) {
        struct keytable_event e = { .kind = HISTORY_NONE, .reason = KEY_REASON_NONE };
        int kind = HISTORY_NONE, reason = KEY_REASON_NONE;
        uint64_t status = 0;
        bool set;

        if (j->type != JSCAN_OBJECT)
                return false;
        if (!opt_time(&f[E_TIME], &set, &e.wall_ms) || !set)
                return false;
        if (absent(&f[E_EVENT]) || !opt_name(&f[E_EVENT], kind_name, &kind))
                return false;
        e.kind = (enum history_kind) kind;
        /* Too long for the record is too long for the table: such an event is skipped. */
        if (opt_string(&f[E_POOL], e.pool, sizeof e.pool, &set) < 0 ||
            opt_string(&f[E_FROM], e.key_from, sizeof e.key_from, &set) < 0 ||
            opt_string(&f[E_TO], e.key_to, sizeof e.key_to, &set) < 0)
                return false;
        if (!opt_name(&f[E_REASON], reason_name, &reason))
                return false;
        e.reason = (enum key_reason) reason;
        if (!opt_uint(&f[E_STATUS], 999, &status))
                return false;
        e.status = (int) status;
        if (!absent(&f[E_COOLDOWN_S])) {
                double s;

                if (jscan_double(&f[E_COOLDOWN_S], &s) < 0)
                        return false;
                /* Up to a year: anything longer is not a rest anybody gave. */
                if (!(s >= 0 && s <= 366.0 * 86400))
                        return false;
                e.cooldown_ms = (int64_t) (s * 1000 + 0.5);
        }
        *ret = e;
        return true;
}

/* The current bank's rows, and an index of them by id. */
static int read_rows(struct keytable *t, int64_t now_mono, struct table_row **ret_rows,
                     size_t *ret_n, struct row_index *ret_index) {
        unsigned n_pools = keytable_n_pools(t);
        struct table_row *rows = NULL;
        struct row_index index;
        size_t n = 0, size;

        for (unsigned p = 0; p < n_pools; p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *keys;
                struct table_row *grown;
                int k;

                k = keytable_pool_read_alloc(t, p, now_mono, &info, &keys);
                if (k == -EINVAL)
                        continue;
                if (k < 0) {
                        free(rows);
                        return k;
                }
                grown = realloc(rows, (n + (size_t) k + 1) * sizeof *rows);
                if (!grown) {
                        free(keys);
                        free(rows);
                        return -ENOMEM;
                }
                rows = grown;
                for (int i = 0; i < k; i++) {
                        struct table_row *r = &rows[n++];

                        *r = (struct table_row) { .pool = p, .position = keys[i].position };
                        memcpy(r->id, keys[i].id, sizeof r->id);
                        memcpy(r->pool_name, info.name, sizeof r->pool_name);
                }
                free(keys);
        }
        if (n >= NO_ROW) {
                free(rows);
                return -E2BIG;
        }
        /* At most half full. */
        for (size = 16; size < 2 * n; size *= 2)
                ;
        index = (struct row_index) { .buckets = malloc(size * sizeof *index.buckets), .mask = size - 1 };
        if (!index.buckets) {
                free(rows);
                return -ENOMEM;
        }
        memset(index.buckets, 0xff, size * sizeof *index.buckets);
        for (size_t i = 0; i < n; i++) {
                uint32_t *head = &index.buckets[id_hash(rows[i].id) & index.mask];

                rows[i].next = *head;
                *head = (uint32_t) i;
        }
        *ret_rows = rows;
        *ret_n = n;
        *ret_index = index;
        return 0;
}

/* Keys matched by pool and id first, so a key that is in several pools gets each pool's own
 * state; a document key whose pool is gone (renamed, or the key moved) then gives its state to
 * the rows of its id that no document key named exactly. */
static int apply_keys(struct keytable *t, struct doc_key *doc, size_t n_doc, struct table_row *rows,
                      const struct row_index *index, unsigned bank, int64_t now_mono) {
        for (int pass = 0; pass < 2; pass++)
                for (size_t i = 0; i < n_doc; i++) {
                        struct doc_key *d = &doc[i];
                        uint32_t r;

                        if (!d->valid || d->applied || (pass == 0 && !d->pool[0]))
                                continue;
                        r = index->buckets[id_hash(d->id) & index->mask];
                        for (; r != NO_ROW; r = rows[r].next) {
                                struct table_row *row = &rows[r];

                                if (strcmp(row->id, d->id) != 0)
                                        continue;
                                if (pass == 0 && strcmp(row->pool_name, d->pool) != 0)
                                        continue;
                                if (row->taken || (pass == 1 && row->exact))
                                        continue;
                                /* Positions are of the bank read: after a reload they name
                                 * other keys. */
                                if (keytable_bank_current(t) != bank)
                                        return -EAGAIN;
                                if (keytable_restore_key(t, row->pool, row->position, &d->st,
                                                         now_mono) < 0)
                                        continue;
                                row->taken = true;
                                row->exact = pass == 0;
                                d->applied = true;
                        }
                }
        return 0;
}

static int apply_history(struct keytable *t, const struct jscan_value *history,
                         unsigned *ret_events) {
        struct keytable_event probe, *events;
        size_t n = 0, kept = 0, start;
        unsigned cap = keytable_history_capacity(t), added = 0;
        struct jscan_value e, f[_E_MAX];
        struct jscan_iter it;

        *ret_events = 0;
        if (history->type != JSCAN_ARRAY || cap == 0)
                return 0;
        /* Only into an empty ring: importing the same document twice must not show every event
         * twice. */
        if (keytable_history_read(t, &probe, 1) > 0)
                return 0;
        if (jscan_iter_init(history, &it) < 0)
                return -EINVAL;
        while (jscan_next(&it, NULL, &e) > 0)
                n++;
        if (n == 0)
                return 0;
        events = calloc(n, sizeof *events);
        if (!events)
                return -ENOMEM;
        if (jscan_iter_init(history, &it) < 0) {
                free(events);
                return -EINVAL;
        }
        while (kept < n && jscan_next_members(&it, event_fields, _E_MAX, f, &e) > 0)
                if (parse_event(&e, f, &events[kept]))
                        kept++;
        /* The ring would overwrite the older ones anyway. */
        start = kept > cap ? kept - cap : 0;
        for (size_t i = start; i < kept; i++, added++)
                keytable_history_add(t, &events[i]);
        free(events);
        *ret_events = added;
        return 0;
}

/* Every element of "keys", read before anything is applied. */
static int parse_keys(const struct jscan_value *keys, int64_t now_mono, int64_t now_wall,
                      int64_t max_cooldown_ms, struct doc_key **ret_doc, size_t *ret_n) {
        struct doc_key *doc = NULL;
        size_t n = 0, size = 0;
        struct jscan_value k, f[_K_MAX];
        struct jscan_iter it;
        int r;

        if (keys->type == JSCAN_ARRAY) {
                if (jscan_iter_init(keys, &it) < 0)
                        return -EINVAL;
                /* Each key's fields are found in the step that steps over it: one scan per key. */
                while ((r = jscan_next_members(&it, key_fields, _K_MAX, f, &k)) > 0) {
                        if (n == size) {
                                /* Doubling, so 10,000 keys cost a dozen reallocations. */
                                size_t grown_size = size ? size * 2 : 64;
                                struct doc_key *grown = reallocarray(doc, grown_size, sizeof *doc);

                                if (!grown) {
                                        free(doc);
                                        return -ENOMEM;
                                }
                                doc = grown;
                                size = grown_size;
                        }
                        (void) parse_key(&k, f, now_mono, now_wall, max_cooldown_ms, &doc[n], &doc[n].why);
                        n++;
                }
                if (r < 0) {
                        free(doc);
                        return -EINVAL;
                }
        }
        *ret_doc = doc;
        *ret_n = n;
        return 0;
}

/* Why jansson refuses a text jscan_document refused, in jansson's own words: the error path
 * only, so the reasons read as they always have. */
static int refuse_unreadable(const char *json, size_t len, char *err, size_t errlen) {
        json_error_t je;
        json_t *root;
        bool object;

        root = json_loadb(json, len, 0, &je);
        if (!root) {
                /* jansson quotes the text near the error, and a document that is not ours may
                 * hold anything, a secret too: say where, not what. */
                char *near = strstr(je.text, " near ");

                if (near)
                        *near = '\0';
                return fail(err, errlen, "not JSON: %s (line %d, column %d)", je.text, je.line,
                            je.column);
        }
        object = json_is_object(root);
        json_decref(root);
        if (!object)
                return fail(err, errlen, "not a keypool state document (not a JSON object)");
        /* jansson's lexer drops a raw NUL byte right after a number or literal; jscan refuses
         * every raw NUL, as RFC 8259 does, and a state file never holds one. */
        return fail(err, errlen, "not JSON: a NUL byte in the text");
}

enum {
        D_FORMAT,
        D_VERSION,
        D_KEYS,
        D_HISTORY,
        _D_MAX,
};

static const char *const document_fields[_D_MAX] = {
        [D_FORMAT] = "format",
        [D_VERSION] = "version",
        [D_KEYS] = "keys",
        [D_HISTORY] = "history",
};

/* The first key that was refused, else the first that was cut, for the report: which element,
 * its id, and why. A refusal first: it lost the key its state, a cut only shortened a rest. */
static void report_problem(struct persist_report *report, const struct doc_key *doc, size_t n_doc,
                           int64_t max_cooldown_ms) {
        for (size_t i = 0; i < n_doc; i++) {
                const struct doc_key *d = &doc[i];

                if (!d->valid) {
                        /* The id is the document's text: shown only when it could be an id. */
                        bool shown = d->id[0] != '\0';

                        for (const char *c = d->id; *c; c++)
                                shown = shown && *c > ' ' && *c < 0x7f;
                        snprintf(report->problem, sizeof report->problem, "keys[%zu]%s%s: %s; key ignored",
                                 i, shown ? " " : "", shown ? d->id : "", d->why ? d->why : "unreadable");
                        return;
                }
        }
        for (size_t i = 0; i < n_doc; i++) {
                const struct doc_key *d = &doc[i];

                if (d->capped && d->applied) {
                        snprintf(report->problem, sizeof report->problem, "keys[%zu] %s: a rest longer "
                                 "than max_cooldown was cut to max_cooldown (%" PRId64 " s)", i, d->id,
                                 max_cooldown_ms / 1000);
                        return;
                }
        }
}

int persist_import(struct keytable *t, const char *json, size_t len, int64_t now_mono_ms,
                   int64_t now_wall_ms, int64_t max_cooldown_ms, struct persist_report *ret,
                   char *err, size_t errlen) {
        struct persist_report report = { 0 };
        struct jscan_value top[_D_MAX];
        struct table_row *rows = NULL;
        struct row_index index = { .buckets = NULL };
        struct doc_key *doc = NULL;
        size_t n_doc = 0, n_rows = 0;
        int64_t version;
        unsigned bank;
        int r;

        if (!t || (!json && len > 0))
                return fail(err, errlen, "no document");
        if (!json)
                json = "";

        /* One validating pass with jansson's number limits, so that exactly the documents
         * jansson refused are refused, and no tree: a state file of 10,000 keys is read at start,
         * before READY. */
        if (jscan_document(json, len, JSCAN_JANSSON_NUMBERS, document_fields, _D_MAX, top) < 0)
                return refuse_unreadable(json, len, err, errlen);
        if (!jscan_string_eq(&top[D_FORMAT], PERSIST_FORMAT))
                return fail(err, errlen, "not a keypool state document (format is not \"%s\")",
                            PERSIST_FORMAT);
        if (int64_value(&top[D_VERSION], &version) < 0)
                return fail(err, errlen, "no version number");
        if (version != PERSIST_VERSION)
                return fail(err, errlen, "version %" PRId64 " is not supported (only %d is)", version,
                            PERSIST_VERSION);
        if (!absent(&top[D_KEYS]) && top[D_KEYS].type != JSCAN_ARRAY)
                return fail(err, errlen, "\"keys\" is not an array");
        if (!absent(&top[D_HISTORY]) && top[D_HISTORY].type != JSCAN_ARRAY)
                return fail(err, errlen, "\"history\" is not an array");

        /* Everything is read before anything is applied: a document that fails for want of
         * memory changes nothing. */
        r = parse_keys(&top[D_KEYS], now_mono_ms, now_wall_ms, max_cooldown_ms, &doc, &n_doc);
        if (r < 0)
                return r;

        bank = keytable_bank_current(t);
        r = read_rows(t, now_mono_ms, &rows, &n_rows, &index);
        if (r < 0)
                goto out;
        r = apply_keys(t, doc, n_doc, rows, &index, bank, now_mono_ms);
        if (r < 0)
                goto out;
        for (size_t i = 0; i < n_doc; i++) {
                if (doc[i].applied)
                        report.imported++;
                else
                        report.ignored++;
                report.refused += !doc[i].valid;
                report.capped += doc[i].valid && doc[i].capped && doc[i].applied;
        }
        report_problem(&report, doc, n_doc, max_cooldown_ms);
        r = apply_history(t, &top[D_HISTORY], &report.events);
        if (r < 0)
                goto out;
        if (ret)
                *ret = report;
        r = 0;
out:
        free(index.buckets);
        free(rows);
        free(doc);
        return r;
}

/* --- files --------------------------------------------------------------------------------- */

static int write_all(int fd, const char *p, size_t n) {
        while (n > 0) {
                ssize_t k = write(fd, p, n);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += k;
                n -= (size_t) k;
        }
        return 0;
}

/* The directory a path is in, so its entry (the rename) can be made durable. */
static int fsync_parent(const char *path) {
        const char *slash = strrchr(path, '/');
        char *dir;
        int fd, r = 0;

        if (!slash)
                dir = strdup(".");
        else if (slash == path)
                dir = strdup("/");
        else
                dir = strndup(path, (size_t) (slash - path));
        if (!dir)
                return -ENOMEM;
        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        free(dir);
        if (fd < 0)
                return -errno;
        if (fsync(fd) < 0)
                r = -errno;
        (void) close(fd);
        return r;
}

/* Creates a temporary file next to path under a fresh random name, exclusively: nothing that is
 * already there, a file or a symlink someone planted at a name they could guess, is ever opened
 * and written through. Returns the descriptor and the name (malloc'ed). */
static int create_temporary(const char *path, char **ret_name) {
        for (int attempt = 0; attempt < 16; attempt++) {
                uint64_t rnd;
                char *name;
                int fd;

                if (getrandom(&rnd, sizeof rnd, 0) != (ssize_t) sizeof rnd)
                        return errno ? -errno : -EIO;
                if (asprintf(&name, "%s.tmp-%016" PRIx64, path, rnd) < 0)
                        return -ENOMEM;
                fd = open(name, O_CREAT | O_EXCL | O_NOFOLLOW | O_WRONLY | O_CLOEXEC | O_NOCTTY, 0600);
                if (fd >= 0) {
                        *ret_name = name;
                        return fd;
                }
                fd = -errno;
                free(name);
                if (fd != -EEXIST)
                        return fd;
        }
        return -EEXIST;
}

int persist_save(const char *path, const char *text) {
        char *tmp = NULL;
        int fd, r;

        if (!path || !path[0] || !text)
                return -EINVAL;
        fd = create_temporary(path, &tmp);
        if (fd < 0)
                return fd;
        /* The umask may have taken bits from 0600; it cannot have added any, but say it once. */
        r = fchmod(fd, 0600) < 0 ? -errno : 0;
        if (r == 0)
                r = write_all(fd, text, strlen(text));
        /* Without it a crash after the rename can leave an empty file under the real name. */
        if (r == 0 && fsync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r == 0)
                r = -errno;
        /* rename replaces a symlink at path itself, never the file it points to. */
        if (r == 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0) {
                (void) unlink(tmp);
                free(tmp);
                return r;
        }
        free(tmp);
        return fsync_parent(path);
}

int persist_read(const char *path, char **ret_text, size_t *ret_len) {
        if (!path || !ret_text)
                return -EINVAL;
        return fileio_read(path, PERSIST_READ_MAX, ret_text, ret_len);
}

int persist_move_aside(const char *path, int64_t now_wall_ms, char **ret_path) {
        char *aside;

        if (!path || !path[0])
                return -EINVAL;
        if (asprintf(&aside, "%s.corrupt-%" PRId64, path, timeutil_floor_div(now_wall_ms, 1000)) < 0)
                return -ENOMEM;
        if (rename(path, aside) < 0) {
                int r = -errno;

                free(aside);
                return r;
        }
        if (ret_path)
                *ret_path = aside;
        else
                free(aside);
        return 0;
}
