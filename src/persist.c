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
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "keypool/persist.h"
#include "keypool/verdict.h"

#define PERSIST_FORMAT   "keypool-state"
#define PERSIST_VERSION  1
#define PERSIST_READ_MAX ((size_t) 64 << 20)

/* --- time ---------------------------------------------------------------------------------- */

static int64_t floor_div(int64_t a, int64_t b) {
        int64_t q = a / b;

        return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

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

/* Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm): plain
 * arithmetic, so no timegm, no TZ, no locale. */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
        int64_t era, yoe, doy, doe;

        y -= m <= 2;
        era = floor_div(y, 400);
        yoe = y - era * 400;
        doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
        doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *ret_y, unsigned *ret_m, unsigned *ret_d) {
        int64_t era, doe, yoe, y, doy, mp;

        z += 719468;
        era = floor_div(z, 146097);
        doe = z - era * 146097;
        yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
        y = yoe + era * 400;
        doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        mp = (5 * doy + 2) / 153;
        *ret_d = (unsigned) (doy - (153 * mp + 2) / 5 + 1);
        *ret_m = (unsigned) (mp < 10 ? mp + 3 : mp - 9);
        *ret_y = y + (*ret_m <= 2);
}

/* The range RFC 3339 can write: years 0000 to 9999. */
#define WALL_MIN_MS (days_from_civil(0, 1, 1) * 86400000)
#define WALL_MAX_MS (days_from_civil(10000, 1, 1) * 86400000 - 1)

#define TIME_MAX 32

/* "2026-11-28T10:20:00Z", or with_ms "2026-11-28T10:20:00.123Z". Out-of-range times are clamped
 * to the years RFC 3339 can write. */
static void format_time(int64_t wall_ms, bool with_ms, char buf[TIME_MAX]) {
        int64_t days, ms_of_day, y;
        unsigned m, d, hh, mm, ss, ms;

        if (wall_ms < WALL_MIN_MS)
                wall_ms = WALL_MIN_MS;
        if (wall_ms > WALL_MAX_MS)
                wall_ms = WALL_MAX_MS;
        days = floor_div(wall_ms, 86400000);
        ms_of_day = wall_ms - days * 86400000;
        civil_from_days(days, &y, &m, &d);
        hh = (unsigned) (ms_of_day / 3600000);
        mm = (unsigned) (ms_of_day / 60000 % 60);
        ss = (unsigned) (ms_of_day / 1000 % 60);
        ms = (unsigned) (ms_of_day % 1000);
        if (with_ms)
                snprintf(buf, TIME_MAX, "%04" PRId64 "-%02u-%02uT%02u:%02u:%02u.%03uZ", y, m, d, hh,
                         mm, ss, ms);
        else
                snprintf(buf, TIME_MAX, "%04" PRId64 "-%02u-%02uT%02u:%02u:%02uZ", y, m, d, hh, mm,
                         ss);
}

static bool digits(const char *s, unsigned n, unsigned *ret) {
        unsigned v = 0;

        for (unsigned i = 0; i < n; i++) {
                if (s[i] < '0' || s[i] > '9')
                        return false;
                v = v * 10 + (unsigned) (s[i] - '0');
        }
        *ret = v;
        return true;
}

static bool leap_year(unsigned y) {
        return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

/* Reads an RFC 3339 date-time ("2026-11-28T10:20:00Z", fractions and offsets allowed) as ms
 * since the epoch. */
static int parse_time(const char *s, int64_t *ret_ms) {
        static const unsigned month_days[12] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
        unsigned y, mo, d, h, mi, sec, ms = 0, oh, om;
        int64_t offset_ms = 0, t;
        const char *p;

        if (strlen(s) < 20 || !digits(s, 4, &y) || s[4] != '-' || !digits(s + 5, 2, &mo) ||
            s[7] != '-' || !digits(s + 8, 2, &d) || (s[10] != 'T' && s[10] != 't' && s[10] != ' ') ||
            !digits(s + 11, 2, &h) || s[13] != ':' || !digits(s + 14, 2, &mi) || s[16] != ':' ||
            !digits(s + 17, 2, &sec))
                return -EINVAL;
        if (mo < 1 || mo > 12 || d < 1 ||
            d > month_days[mo - 1] + (mo == 2 && leap_year(y)) || h > 23 || mi > 59 || sec > 60)
                return -EINVAL;
        /* A leap second is the last moment of its minute as far as a deadline cares. */
        if (sec == 60)
                sec = 59;
        p = s + 19;
        if (*p == '.') {
                unsigned n = 0;

                for (p++; *p >= '0' && *p <= '9'; p++, n++)
                        if (n < 3)
                                ms = ms * 10 + (unsigned) (*p - '0');
                if (n == 0)
                        return -EINVAL;
                for (; n < 3; n++)
                        ms *= 10;
        }
        if (*p == 'Z' || *p == 'z') {
                p++;
        } else if (*p == '+' || *p == '-') {
                if (!digits(p + 1, 2, &oh) || p[3] != ':' || !digits(p + 4, 2, &om) || oh > 23 ||
                    om > 59)
                        return -EINVAL;
                offset_ms = ((int64_t) oh * 60 + om) * 60000 * (*p == '-' ? -1 : 1);
                p += 6;
        } else
                return -EINVAL;
        if (*p != '\0')
                return -EINVAL;

        t = days_from_civil(y, mo, d) * 86400000 +
            ((int64_t) h * 3600 + (int64_t) mi * 60 + sec) * 1000 + ms;
        *ret_ms = t - offset_ms;
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
        char buf[TIME_MAX];

        format_time(wall_ms, with_ms, buf);
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
                until = time_json(floor_div(wall, 1000) * 1000 + (wall % 1000 != 0) * 1000,
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
        char saved_at[TIME_MAX], *buf = NULL;
        size_t size = 0;
        FILE *f;
        int r;

        if (!t)
                return NULL;
        f = open_memstream(&buf, &size);
        if (!f)
                return NULL;
        format_time(now_wall_ms, false, saved_at);
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

/* A document key: where it goes and what it says. */
struct doc_key {
        const char *pool;               /* NULL: match by id alone */
        const char *id;
        struct keytable_key_state st;
        bool valid;
        bool applied;
};

/* A row of the table, as the current bank held it when the import began. */
struct table_row {
        char id[KEYID_ID_LEN + 1];
        char pool_name[KEYTABLE_NAME_MAX + 1];
        unsigned pool, position;
        bool exact;                     /* claimed by a document key naming its pool */
        bool taken;                     /* given a state by some document key */
};

/* A field that must be absent, null or a string; ret is NULL unless it is a string. */
static bool opt_string(json_t *obj, const char *name, const char **ret) {
        json_t *v = json_object_get(obj, name);

        *ret = NULL;
        if (!v || json_is_null(v))
                return true;
        if (!json_is_string(v))
                return false;
        *ret = json_string_value(v);
        return true;
}

/* A count: absent (0) or a non-negative integer. */
static bool opt_count(json_t *obj, const char *name, uint64_t *ret) {
        json_t *v = json_object_get(obj, name);

        *ret = 0;
        if (!v || json_is_null(v))
                return true;
        if (!json_is_integer(v) || json_integer_value(v) < 0)
                return false;
        *ret = (uint64_t) json_integer_value(v);
        return true;
}

static bool parse_key(json_t *j, int64_t now_mono, int64_t now_wall, struct doc_key *ret) {
        const char *state, *reason, *until, *last_class, *last_used;
        struct keytable_key_state st = { .reason = KEY_REASON_NONE, .last_class = VERDICT_NONE };
        uint64_t consecutive;
        json_t *status;
        int64_t wall;

        *ret = (struct doc_key) { .valid = false };
        if (!json_is_object(j))
                return false;
        if (!opt_string(j, "id", &ret->id) || !ret->id || ret->id[0] == '\0' ||
            strlen(ret->id) > KEYID_ID_LEN)
                return false;
        if (!opt_string(j, "pool", &ret->pool) || (ret->pool && ret->pool[0] == '\0'))
                ret->pool = NULL;
        if (!opt_string(j, "state", &state) || !state || state_from_name(state, &st.state) < 0)
                return false;
        if (!opt_string(j, "reason", &reason) || (reason && reason_from_name(reason, &st.reason) < 0))
                return false;
        if (!opt_string(j, "cooldown_until", &until) || !opt_string(j, "last_class", &last_class) ||
            !opt_string(j, "last_used", &last_used))
                return false;
        if (!opt_count(j, "requests", &st.requests) || !opt_count(j, "successes", &st.successes) ||
            !opt_count(j, "rate_limited", &st.rate_limited) ||
            !opt_count(j, "failures", &st.failures) || !opt_count(j, "tokens_in", &st.tokens_in) ||
            !opt_count(j, "tokens_out", &st.tokens_out) ||
            !opt_count(j, "consecutive_failures", &consecutive) || consecutive > UINT_MAX)
                return false;
        st.consecutive_failures = (unsigned) consecutive;
        status = json_object_get(j, "last_status");
        if (status && !json_is_null(status)) {
                if (!json_is_integer(status) || json_integer_value(status) < 0 ||
                    json_integer_value(status) > 999)
                        return false;
                st.last_status = (int) json_integer_value(status);
        }
        if (last_class && class_from_name(last_class, &st.last_class) < 0)
                return false;
        if (last_used) {
                if (parse_time(last_used, &wall) < 0)
                        return false;
                st.last_used_ms = wall_to_mono(wall, now_mono, now_wall);
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
                if (!until || parse_time(until, &wall) < 0)
                        return false;
                if (st.reason == KEY_REASON_NONE)
                        st.reason = KEY_REASON_RATE_LIMITED;
                st.cooldown_until_ms = wall_to_mono(wall, now_mono, now_wall);
                /* Over while keypool was down: ready, a new run of failures begins. */
                if (st.cooldown_until_ms <= now_mono || st.cooldown_until_ms <= 0) {
                        st.state = KEY_READY;
                        st.reason = KEY_REASON_NONE;
                        st.cooldown_until_ms = 0;
                        st.consecutive_failures = 0;
                }
                break;
        case KEY_DISABLED:
                if (st.reason == KEY_REASON_NONE)
                        st.reason = KEY_REASON_OPERATOR;
                break;
        default:
                return false;
        }
        ret->st = st;
        ret->valid = true;
        return true;
}

static bool parse_event(json_t *j, struct keytable_event *ret) {
        const char *when, *pool, *kind, *from, *to, *reason;
        struct keytable_event e = { .kind = HISTORY_NONE, .reason = KEY_REASON_NONE };
        json_t *status, *cooldown;

        if (!json_is_object(j))
                return false;
        if (!opt_string(j, "time", &when) || !when || parse_time(when, &e.wall_ms) < 0)
                return false;
        if (!opt_string(j, "event", &kind) || !kind || kind_from_name(kind, &e.kind) < 0)
                return false;
        if (!opt_string(j, "pool", &pool) || (pool && strlen(pool) > KEYTABLE_NAME_MAX))
                return false;
        if (!opt_string(j, "from", &from) || (from && strlen(from) > KEYID_ID_LEN) ||
            !opt_string(j, "to", &to) || (to && strlen(to) > KEYID_ID_LEN))
                return false;
        if (!opt_string(j, "reason", &reason) || (reason && reason_from_name(reason, &e.reason) < 0))
                return false;
        status = json_object_get(j, "status");
        if (status && !json_is_null(status)) {
                if (!json_is_integer(status) || json_integer_value(status) < 0 ||
                    json_integer_value(status) > 999)
                        return false;
                e.status = (int) json_integer_value(status);
        }
        cooldown = json_object_get(j, "cooldown_s");
        if (cooldown && !json_is_null(cooldown)) {
                double s;

                if (!json_is_number(cooldown))
                        return false;
                s = json_number_value(cooldown);
                /* Up to a year: anything longer is not a rest anybody gave. */
                if (!(s >= 0 && s <= 366.0 * 86400))
                        return false;
                e.cooldown_ms = (int64_t) (s * 1000 + 0.5);
        }
        if (pool)
                strcpy(e.pool, pool);
        if (from)
                strcpy(e.key_from, from);
        if (to)
                strcpy(e.key_to, to);
        *ret = e;
        return true;
}

static int row_compare(const void *a, const void *b) {
        const struct table_row *x = a, *y = b;

        return strcmp(x->id, y->id);
}

/* The current bank's rows, sorted by id. */
static int read_rows(struct keytable *t, int64_t now_mono, struct table_row **ret_rows,
                     size_t *ret_n) {
        unsigned n_pools = keytable_n_pools(t);
        struct table_row *rows = NULL;
        size_t n = 0;

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
        if (n > 0)
                qsort(rows, n, sizeof *rows, row_compare);
        *ret_rows = rows;
        *ret_n = n;
        return 0;
}

/* The first of the rows with id, and how many there are. */
static size_t rows_with_id(const struct table_row *rows, size_t n, const char *id, size_t *ret_first) {
        size_t lo = 0, hi = n, end;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (strcmp(rows[mid].id, id) < 0)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        for (end = lo; end < n && strcmp(rows[end].id, id) == 0; end++)
                ;
        *ret_first = lo;
        return end - lo;
}

/* Keys matched by pool and id first, so a key that is in several pools gets each pool's own
 * state; a document key whose pool is gone (renamed, or the key moved) then gives its state to
 * the rows of its id that no document key named exactly. */
static int apply_keys(struct keytable *t, struct doc_key *doc, size_t n_doc, struct table_row *rows,
                      size_t n_rows, unsigned bank, int64_t now_mono) {
        for (int pass = 0; pass < 2; pass++)
                for (size_t i = 0; i < n_doc; i++) {
                        struct doc_key *d = &doc[i];
                        size_t first, n;

                        if (!d->valid || d->applied || (pass == 0 && !d->pool))
                                continue;
                        n = rows_with_id(rows, n_rows, d->id, &first);
                        for (size_t r = first; r < first + n; r++) {
                                struct table_row *row = &rows[r];

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

static int apply_history(struct keytable *t, json_t *history, unsigned *ret_events) {
        struct keytable_event probe, *events;
        size_t n = json_array_size(history), kept = 0, start;
        unsigned cap = keytable_history_capacity(t), added = 0;

        *ret_events = 0;
        /* Only into an empty ring: importing the same document twice must not show every event
         * twice. */
        if (n == 0 || cap == 0 || keytable_history_read(t, &probe, 1) > 0)
                return 0;
        events = calloc(n, sizeof *events);
        if (!events)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++)
                if (parse_event(json_array_get(history, i), &events[kept]))
                        kept++;
        /* The ring would overwrite the older ones anyway. */
        start = kept > cap ? kept - cap : 0;
        for (size_t i = start; i < kept; i++, added++)
                keytable_history_add(t, &events[i]);
        free(events);
        *ret_events = added;
        return 0;
}

int persist_import(struct keytable *t, const char *json, size_t len, int64_t now_mono_ms,
                   int64_t now_wall_ms, struct persist_report *ret, char *err, size_t errlen) {
        struct persist_report report = { 0 };
        json_t *root, *format, *version, *keys, *history;
        struct table_row *rows = NULL;
        struct doc_key *doc = NULL;
        size_t n_doc, n_rows = 0;
        json_error_t je;
        unsigned bank;
        int r;

        if (!t || (!json && len > 0))
                return fail(err, errlen, "no document");

        root = json_loadb(json ? json : "", len, 0, &je);
        if (!root) {
                /* jansson quotes the text near the error, and a document that is not ours may
                 * hold anything, a secret too: say where, not what. */
                char *near = strstr(je.text, " near ");

                if (near)
                        *near = '\0';
                return fail(err, errlen, "not JSON: %s (line %d, column %d)", je.text, je.line,
                            je.column);
        }
        if (!json_is_object(root)) {
                r = fail(err, errlen, "not a keypool state document (not a JSON object)");
                goto out;
        }
        format = json_object_get(root, "format");
        if (!json_is_string(format) || strcmp(json_string_value(format), PERSIST_FORMAT) != 0) {
                r = fail(err, errlen, "not a keypool state document (format is not \"%s\")",
                         PERSIST_FORMAT);
                goto out;
        }
        version = json_object_get(root, "version");
        if (!json_is_integer(version)) {
                r = fail(err, errlen, "no version number");
                goto out;
        }
        if (json_integer_value(version) != PERSIST_VERSION) {
                r = fail(err, errlen, "version %" JSON_INTEGER_FORMAT " is not supported (only %d is)",
                         json_integer_value(version), PERSIST_VERSION);
                goto out;
        }
        keys = json_object_get(root, "keys");
        if (keys && !json_is_null(keys) && !json_is_array(keys)) {
                r = fail(err, errlen, "\"keys\" is not an array");
                goto out;
        }
        history = json_object_get(root, "history");
        if (history && !json_is_null(history) && !json_is_array(history)) {
                r = fail(err, errlen, "\"history\" is not an array");
                goto out;
        }

        /* Everything is read before anything is applied: a document that fails for want of
         * memory changes nothing. */
        n_doc = json_array_size(keys);
        doc = calloc(n_doc + 1, sizeof *doc);
        if (!doc) {
                r = -ENOMEM;
                goto out;
        }
        for (size_t i = 0; i < n_doc; i++)
                (void) parse_key(json_array_get(keys, i), now_mono_ms, now_wall_ms, &doc[i]);

        bank = keytable_bank_current(t);
        r = read_rows(t, now_mono_ms, &rows, &n_rows);
        if (r < 0)
                goto out;
        r = apply_keys(t, doc, n_doc, rows, n_rows, bank, now_mono_ms);
        if (r < 0)
                goto out;
        for (size_t i = 0; i < n_doc; i++) {
                if (doc[i].applied)
                        report.imported++;
                else
                        report.ignored++;
        }
        r = apply_history(t, history, &report.events);
        if (r < 0)
                goto out;
        if (ret)
                *ret = report;
        r = 0;
out:
        free(rows);
        free(doc);
        json_decref(root);
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

int persist_save(const char *path, const char *text) {
        char *tmp;
        int fd, r;

        if (!path || !path[0] || !text)
                return -EINVAL;
        if (asprintf(&tmp, "%s.tmp", path) < 0)
                return -ENOMEM;
        fd = open(tmp, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
        if (fd < 0) {
                r = -errno;
                free(tmp);
                return r;
        }
        /* A leftover temporary file may have been made with another mode. */
        r = fchmod(fd, 0600) < 0 ? -errno : 0;
        if (r == 0)
                r = write_all(fd, text, strlen(text));
        /* Without it a crash after the rename can leave an empty file under the real name. */
        if (r == 0 && fsync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r == 0)
                r = -errno;
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
        size_t len = 0, size;
        struct stat st;
        char *buf;
        int fd, r;

        if (!path || !ret_text)
                return -EINVAL;
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0) {
                r = -errno;
                goto fail_fd;
        }
        if (!S_ISREG(st.st_mode)) {
                r = -EINVAL;
                goto fail_fd;
        }
        if ((uint64_t) st.st_size > PERSIST_READ_MAX) {
                r = -EFBIG;
                goto fail_fd;
        }
        /* Sized from fstat, but the file may grow meanwhile: read to the end, up to the limit. */
        size = (size_t) st.st_size + 1;
        buf = malloc(size);
        if (!buf) {
                r = -ENOMEM;
                goto fail_fd;
        }
        for (;;) {
                ssize_t k;

                if (len + 1 >= size) {
                        char *grown;

                        /* Full at the limit and not at the end: one byte too many. */
                        if (size >= PERSIST_READ_MAX + 2) {
                                free(buf);
                                r = -EFBIG;
                                goto fail_fd;
                        }
                        size = size * 2 > PERSIST_READ_MAX + 2 ? PERSIST_READ_MAX + 2 : size * 2;
                        grown = realloc(buf, size);
                        if (!grown) {
                                free(buf);
                                r = -ENOMEM;
                                goto fail_fd;
                        }
                        buf = grown;
                }
                k = read(fd, buf + len, size - len - 1);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        r = -errno;
                        free(buf);
                        goto fail_fd;
                }
                if (k == 0)
                        break;
                len += (size_t) k;
        }
        (void) close(fd);
        if (len > PERSIST_READ_MAX) {
                free(buf);
                return -EFBIG;
        }
        /* NUL-terminated for callers that want a string; len does not count it. */
        buf[len] = '\0';
        *ret_text = buf;
        if (ret_len)
                *ret_len = len;
        return 0;

fail_fd:
        (void) close(fd);
        return r;
}

int persist_move_aside(const char *path, int64_t now_wall_ms, char **ret_path) {
        char *aside;

        if (!path || !path[0])
                return -EINVAL;
        if (asprintf(&aside, "%s.corrupt-%" PRId64, path, floor_div(now_wall_ms, 1000)) < 0)
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
