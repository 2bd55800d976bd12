/* timeutil.h — civil dates, RFC 3339 and HTTP-dates, in UTC.
 *
 * Owns the calendar arithmetic (proleptic Gregorian, Howard Hinnant's days_from_civil) and the
 * two ways keypool reads and writes wall-clock times: RFC 3339 (the state file, the status API,
 * Anthropic's reset headers) and HTTP-dates (Retry-After). Every function is pure: milliseconds
 * since the Unix epoch in, text or numbers out; no time zone database, no TZ, no locale, no clock.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TIMEUTIL_MSEC_PER_DAY INT64_C(86400000)

/* The range RFC 3339's four-digit years can write: 0000-01-01T00:00:00.000Z and
 * 9999-12-31T23:59:59.999Z. */
#define TIMEUTIL_MS_MIN INT64_C(-62167219200000)
#define TIMEUTIL_MS_MAX INT64_C(253402300799999)

/* "2026-11-28T10:20:00.123Z" and its NUL, with room to spare. */
#define TIMEUTIL_RFC3339_MAX 32

/* A date and time of day as an RFC 3339 text wrote it, before its offset is applied. */
struct timeutil_civil {
        int year;                       /* 0..9999 */
        int month;                      /* 1..12 */
        int day;                        /* 1..the month's last */
        int hour, minute;               /* 0..23, 0..59 */
        int second;                     /* 0..60: 60 is a leap second */
        int msec;                       /* the first three digits of a fraction, 0..999 */
        int64_t offset_ms;              /* east of UTC: "-07:00" is -25200000 */
};

/* a / b rounded towards minus infinity; b > 0. */
int64_t timeutil_floor_div(int64_t a, int64_t b);

/* Days since 1970-01-01 of year-month-day, and back; month 1..12. */
int64_t timeutil_days_from_civil(int64_t year, int month, int day);
void timeutil_civil_from_days(int64_t days, int64_t *ret_year, int *ret_month, int *ret_day);

/* 0 = Sunday .. 6 = Saturday. */
int timeutil_weekday_from_days(int64_t days);

bool timeutil_leap_year(int64_t year);
int timeutil_days_in_month(int64_t year, int month);

/* Whether the fields name a real moment: a valid date of years 0..9999, hour 0..23, minute
 * 0..59, second 0..60. */
bool timeutil_civil_valid(int64_t year, int month, int day, int hour, int minute, int second);

/* Milliseconds since the epoch of c in UTC (its offset applied). A leap second counts as the
 * first second of the next minute. */
int64_t timeutil_civil_to_ms(const struct timeutil_civil *c);

/* Writes wall_ms as "2026-11-28T10:20:00Z", or with_ms "2026-11-28T10:20:00.123Z". A time
 * outside TIMEUTIL_MS_MIN..TIMEUTIL_MS_MAX is clamped to it: the text always parses back. */
void timeutil_format_rfc3339(int64_t wall_ms, bool with_ms, char buf[static TIMEUTIL_RFC3339_MAX]);

/* Reads exactly s[0..len) as an RFC 3339 date-time: "T", "t" or " " between date and time, any
 * number of fraction digits (milliseconds kept), "Z", "z" or "+hh:mm"/"-hh:mm". 0, or -EINVAL;
 * ret is written only on success. */
int timeutil_parse_rfc3339(const char *s, size_t len, struct timeutil_civil *ret);

/* Reads exactly s[0..len) as an HTTP-date (RFC 9110 §5.6.7), in any of its three forms:
 *   IMF-fixdate  Sun, 06 Nov 1994 08:49:37 GMT
 *   RFC 850      Sunday, 06-Nov-94 08:49:37 GMT
 *   asctime      Sun Nov  6 08:49:37 1994
 * as ms since the epoch. now_ms places an RFC 850 two-digit year: one more than 50 years ahead
 * is the most recent past year with those digits. Years 0001..9999. 0, or -EINVAL. */
int timeutil_parse_http_date(const char *s, size_t len, int64_t now_ms, int64_t *ret_ms);
