/* timeutil.c — civil dates, RFC 3339 and HTTP-dates, in UTC.
 *
 * Owns every conversion between milliseconds since the epoch and calendar dates or their text:
 * the state file, the status API and the policy's reset and Retry-After headers all read and
 * write times through here, so they cannot disagree about a leap year or a date's range. Pure
 * arithmetic (no timegm, gmtime, strftime, TZ or locale: a header value must mean the same on
 * every host), and every parser reads exactly the bytes it is given, never up to a NUL.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "keypool/timeutil.h"

#define MSEC_PER_SEC    INT64_C(1000)
#define MSEC_PER_MINUTE (60 * MSEC_PER_SEC)
#define MSEC_PER_HOUR   (60 * MSEC_PER_MINUTE)

/* --- calendar --------------------------------------------------------------------------------- */

int64_t timeutil_floor_div(int64_t a, int64_t b) {
        int64_t q = a / b;

        return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

int64_t timeutil_days_from_civil(int64_t y, int m, int d) {
        int64_t era, yoe, doy, doe;

        y -= m <= 2;
        era = timeutil_floor_div(y, 400);
        yoe = y - era * 400;
        doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
        doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        return era * 146097 + doe - 719468;
}

void timeutil_civil_from_days(int64_t z, int64_t *ret_y, int *ret_m, int *ret_d) {
        int64_t era, doe, yoe, y, doy, mp;
        int m;

        z += 719468;
        era = timeutil_floor_div(z, 146097);
        doe = z - era * 146097;
        yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
        y = yoe + era * 400;
        doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        mp = (5 * doy + 2) / 153;
        m = (int) (mp < 10 ? mp + 3 : mp - 9);

        *ret_d = (int) (doy - (153 * mp + 2) / 5 + 1);
        *ret_m = m;
        *ret_y = y + (m <= 2);
}

/* 1970-01-01 was a Thursday. */
int timeutil_weekday_from_days(int64_t z) {
        int64_t r = (z + 4) % 7;

        return (int) (r < 0 ? r + 7 : r);
}

bool timeutil_leap_year(int64_t y) {
        return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

int timeutil_days_in_month(int64_t y, int m) {
        static const int dim[12] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };

        return m == 2 && timeutil_leap_year(y) ? 29 : dim[m - 1];
}

bool timeutil_civil_valid(int64_t y, int mon, int d, int h, int mi, int sec) {
        return y >= 0 && y <= 9999 && mon >= 1 && mon <= 12 && d >= 1 &&
               d <= timeutil_days_in_month(y, mon) && h >= 0 && h <= 23 && mi >= 0 && mi <= 59 &&
               sec >= 0 && sec <= 60;
}

static int64_t civil_ms(int64_t y, int mon, int d, int h, int mi, int sec) {
        return (timeutil_days_from_civil(y, mon, d) * 86400 + h * 3600 + mi * 60 + sec) * MSEC_PER_SEC;
}

int64_t timeutil_civil_to_ms(const struct timeutil_civil *c) {
        return civil_ms(c->year, c->month, c->day, c->hour, c->minute, c->second) + c->msec -
               c->offset_ms;
}

/* --- RFC 3339 --------------------------------------------------------------------------------- */

void timeutil_format_rfc3339(int64_t wall_ms, bool with_ms, char buf[static TIMEUTIL_RFC3339_MAX]) {
        int64_t days, ms_of_day, y;
        int m, d;

        if (wall_ms < TIMEUTIL_MS_MIN)
                wall_ms = TIMEUTIL_MS_MIN;
        if (wall_ms > TIMEUTIL_MS_MAX)
                wall_ms = TIMEUTIL_MS_MAX;
        days = timeutil_floor_div(wall_ms, TIMEUTIL_MSEC_PER_DAY);
        ms_of_day = wall_ms - days * TIMEUTIL_MSEC_PER_DAY;
        timeutil_civil_from_days(days, &y, &m, &d);
        snprintf(buf, TIMEUTIL_RFC3339_MAX, "%04" PRId64 "-%02d-%02dT%02d:%02d:%02d", y, m, d,
                 (int) (ms_of_day / MSEC_PER_HOUR), (int) (ms_of_day / MSEC_PER_MINUTE % 60),
                 (int) (ms_of_day / MSEC_PER_SEC % 60));
        if (with_ms)
                snprintf(buf + 19, TIMEUTIL_RFC3339_MAX - 19, ".%03dZ", (int) (ms_of_day % 1000));
        else
                snprintf(buf + 19, TIMEUTIL_RFC3339_MAX - 19, "Z");
}

static bool is_digit(char c) {
        return c >= '0' && c <= '9';
}

static bool is_alpha(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* Reads min..max digits at *pos, and no more follow. */
static int read_digits(const char *s, size_t len, size_t *pos, int min, int max, int *ret) {
        size_t i = *pos;
        int v = 0, n = 0;

        while (i < len && is_digit(s[i]) && n < max) {
                v = v * 10 + (s[i] - '0');
                n++;
                i++;
        }
        if (n < min || (i < len && is_digit(s[i])))
                return -EINVAL;
        *pos = i;
        *ret = v;
        return 0;
}

static bool eat(const char *s, size_t len, size_t *pos, char c) {
        if (*pos < len && s[*pos] == c) {
                (*pos)++;
                return true;
        }
        return false;
}

/* "hh:mm:ss", two digits each. */
static int read_time_of_day(const char *s, size_t len, size_t *pos, int *h, int *mi, int *sec) {
        if (read_digits(s, len, pos, 2, 2, h) < 0 || !eat(s, len, pos, ':') ||
            read_digits(s, len, pos, 2, 2, mi) < 0 || !eat(s, len, pos, ':') ||
            read_digits(s, len, pos, 2, 2, sec) < 0)
                return -EINVAL;
        return 0;
}

int timeutil_parse_rfc3339(const char *s, size_t len, struct timeutil_civil *ret) {
        struct timeutil_civil c = {};
        size_t pos = 0;

        if (!s || !ret)
                return -EINVAL;
        if (read_digits(s, len, &pos, 4, 4, &c.year) < 0 || !eat(s, len, &pos, '-') ||
            read_digits(s, len, &pos, 2, 2, &c.month) < 0 || !eat(s, len, &pos, '-') ||
            read_digits(s, len, &pos, 2, 2, &c.day) < 0)
                return -EINVAL;
        if (!(eat(s, len, &pos, 'T') || eat(s, len, &pos, 't') || eat(s, len, &pos, ' ')))
                return -EINVAL;
        if (read_time_of_day(s, len, &pos, &c.hour, &c.minute, &c.second) < 0)
                return -EINVAL;
        if (eat(s, len, &pos, '.')) {
                int n = 0;

                for (; pos < len && is_digit(s[pos]); pos++, n++)
                        if (n < 3)
                                c.msec = c.msec * 10 + (s[pos] - '0');
                if (n == 0)
                        return -EINVAL;
                for (; n < 3; n++)
                        c.msec *= 10;
        }
        if (eat(s, len, &pos, 'Z') || eat(s, len, &pos, 'z'))
                c.offset_ms = 0;
        else if (pos < len && (s[pos] == '+' || s[pos] == '-')) {
                int sign = s[pos] == '-' ? -1 : 1, oh, om;

                pos++;
                if (read_digits(s, len, &pos, 2, 2, &oh) < 0 || !eat(s, len, &pos, ':') ||
                    read_digits(s, len, &pos, 2, 2, &om) < 0 || oh > 23 || om > 59)
                        return -EINVAL;
                c.offset_ms = sign * (oh * MSEC_PER_HOUR + om * MSEC_PER_MINUTE);
        } else
                return -EINVAL;
        if (pos != len || !timeutil_civil_valid(c.year, c.month, c.day, c.hour, c.minute, c.second))
                return -EINVAL;
        *ret = c;
        return 0;
}

/* --- HTTP-dates ------------------------------------------------------------------------------- */

/* ASCII only, so a header means the same whatever the locale; s holds letters only (read_word),
 * where setting 0x20 is lowercasing. */
static bool word_is(const char *s, size_t len, const char *name) {
        if (strlen(name) != len)
                return false;
        for (size_t i = 0; i < len; i++)
                if ((s[i] | 0x20) != (name[i] | 0x20))
                        return false;
        return true;
}

static int month_from_name(const char *s, size_t len) {
        static const char *const names[12] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                               "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };

        for (int i = 0; i < 12; i++)
                if (word_is(s, len, names[i]))
                        return i + 1;
        return -1;
}

static bool is_weekday_name(const char *s, size_t len) {
        static const char *const names[] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat",
                                             "Sunday", "Monday", "Tuesday", "Wednesday",
                                             "Thursday", "Friday", "Saturday" };

        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
                if (word_is(s, len, names[i]))
                        return true;
        return false;
}

static int read_word(const char *s, size_t len, size_t *pos, const char **ret, size_t *ret_len) {
        size_t i = *pos;

        while (i < len && is_alpha(s[i]))
                i++;
        if (i == *pos)
                return -EINVAL;
        *ret = s + *pos;
        *ret_len = i - *pos;
        *pos = i;
        return 0;
}

static size_t skip_blanks(const char *s, size_t len, size_t pos) {
        while (pos < len && (s[pos] == ' ' || s[pos] == '\t'))
                pos++;
        return pos;
}

int timeutil_parse_http_date(const char *s, size_t len, int64_t now_ms, int64_t *ret_ms) {
        const char *w;
        size_t pos = 0, wl;
        int64_t year;
        int mon, day, y, h, mi, sec;

        if (!s || !ret_ms)
                return -EINVAL;
        if (read_word(s, len, &pos, &w, &wl) < 0 || !is_weekday_name(w, wl))
                return -EINVAL;

        if (eat(s, len, &pos, ',')) {
                pos = skip_blanks(s, len, pos);
                if (read_digits(s, len, &pos, 1, 2, &day) < 0)
                        return -EINVAL;
                if (eat(s, len, &pos, ' ')) {
                        if (read_word(s, len, &pos, &w, &wl) < 0 || !eat(s, len, &pos, ' ') ||
                            read_digits(s, len, &pos, 4, 4, &y) < 0)
                                return -EINVAL;
                        year = y;
                } else if (eat(s, len, &pos, '-')) {
                        int64_t cur_year;
                        int cm, cd;

                        if (read_word(s, len, &pos, &w, &wl) < 0 || !eat(s, len, &pos, '-') ||
                            read_digits(s, len, &pos, 2, 2, &y) < 0)
                                return -EINVAL;
                        if (now_ms < 0 || now_ms > TIMEUTIL_MS_MAX)
                                return -EINVAL;
                        timeutil_civil_from_days(timeutil_floor_div(now_ms, TIMEUTIL_MSEC_PER_DAY),
                                                 &cur_year, &cm, &cd);
                        year = cur_year - cur_year % 100 + y;
                        if (year > cur_year + 50)
                                year -= 100;
                } else
                        return -EINVAL;
                mon = month_from_name(w, wl);
                if (!eat(s, len, &pos, ' ') || read_time_of_day(s, len, &pos, &h, &mi, &sec) < 0 ||
                    !eat(s, len, &pos, ' ') || read_word(s, len, &pos, &w, &wl) < 0 ||
                    !(word_is(w, wl, "GMT") || word_is(w, wl, "UTC")))
                        return -EINVAL;
        } else if (eat(s, len, &pos, ' ')) {
                if (read_word(s, len, &pos, &w, &wl) < 0)
                        return -EINVAL;
                mon = month_from_name(w, wl);
                pos = skip_blanks(s, len, pos);
                if (read_digits(s, len, &pos, 1, 2, &day) < 0 || !eat(s, len, &pos, ' ') ||
                    read_time_of_day(s, len, &pos, &h, &mi, &sec) < 0 || !eat(s, len, &pos, ' ') ||
                    read_digits(s, len, &pos, 4, 4, &y) < 0)
                        return -EINVAL;
                year = y;
        } else
                return -EINVAL;

        /* Year 0 is no year an HTTP server means. */
        if (pos != len || year < 1 || !timeutil_civil_valid(year, mon, day, h, mi, sec))
                return -EINVAL;
        *ret_ms = civil_ms(year, mon, day, h, mi, sec);
        return 0;
}
