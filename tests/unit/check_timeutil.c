/* check_timeutil.c — calendar arithmetic, RFC 3339 and HTTP-dates, pinned by known dates. */
#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/timeutil.h"

/* Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example. */
#define EXAMPLE_MS INT64_C(784111777000)
/* 2026-12-07T00:00:00Z, a "now" for two-digit years. */
#define NOW_MS INT64_C(1796601600000)

static int64_t rfc3339_ms(const char *s) {
        struct timeutil_civil c;
        int r = timeutil_parse_rfc3339(s, strlen(s), &c);

        ck_assert_msg(r == 0, "\"%s\" did not parse (%d)", s, r);
        return timeutil_civil_to_ms(&c);
}

static void rfc3339_bad(const char *s) {
        struct timeutil_civil c = { .year = 4242 };

        ck_assert_msg(timeutil_parse_rfc3339(s, strlen(s), &c) == -EINVAL, "\"%s\" parsed", s);
        ck_assert_msg(c.year == 4242, "ret written on failure for \"%s\"", s);
}

static int64_t http_ms(const char *s) {
        int64_t ms = 0;
        int r = timeutil_parse_http_date(s, strlen(s), NOW_MS, &ms);

        ck_assert_msg(r == 0, "\"%s\" did not parse (%d)", s, r);
        return ms;
}

static void http_bad(const char *s) {
        int64_t ms = 42;

        ck_assert_msg(timeutil_parse_http_date(s, strlen(s), NOW_MS, &ms) == -EINVAL, "\"%s\" parsed", s);
        ck_assert_msg(ms == 42, "ret written on failure for \"%s\"", s);
}

START_TEST(test_known_dates_have_their_day_numbers)
{
        ck_assert_int_eq(timeutil_days_from_civil(1970, 1, 1), 0);
        ck_assert_int_eq(timeutil_days_from_civil(1969, 12, 31), -1);
        ck_assert_int_eq(timeutil_days_from_civil(2000, 3, 1), 11017);
        ck_assert_int_eq(timeutil_days_from_civil(0, 1, 1), -719528);
        ck_assert_int_eq(timeutil_days_from_civil(10000, 1, 1) * TIMEUTIL_MSEC_PER_DAY - 1, TIMEUTIL_MS_MAX);
        ck_assert_int_eq(timeutil_days_from_civil(0, 1, 1) * TIMEUTIL_MSEC_PER_DAY, TIMEUTIL_MS_MIN);
}
END_TEST

START_TEST(test_every_day_from_year_0_to_9999_round_trips)
{
        int64_t first = timeutil_days_from_civil(0, 1, 1), last = timeutil_days_from_civil(9999, 12, 31);
        int64_t y = 0;
        int m = 1, d = 1;

        for (int64_t z = first; z <= last; z++) {
                int64_t ry;
                int rm, rd;

                timeutil_civil_from_days(z, &ry, &rm, &rd);
                ck_assert_msg(ry == y && rm == m && rd == d, "day %lld is %lld-%d-%d, expected %lld-%d-%d",
                              (long long) z, (long long) ry, rm, rd, (long long) y, m, d);
                ck_assert_int_eq(timeutil_days_from_civil(ry, rm, rd), z);
                if (++d > timeutil_days_in_month(y, m)) {
                        d = 1;
                        if (++m > 12) {
                                m = 1;
                                y++;
                        }
                }
        }
}
END_TEST

START_TEST(test_leap_years_follow_the_gregorian_rule)
{
        ck_assert(timeutil_leap_year(2024));
        ck_assert(!timeutil_leap_year(2023));
        ck_assert(!timeutil_leap_year(1900));
        ck_assert(timeutil_leap_year(2000));
        ck_assert(timeutil_leap_year(0));
        ck_assert_int_eq(timeutil_days_in_month(2024, 2), 29);
        ck_assert_int_eq(timeutil_days_in_month(2100, 2), 28);
        ck_assert_int_eq(timeutil_days_in_month(2026, 4), 30);
        ck_assert_int_eq(timeutil_days_in_month(2026, 12), 31);
        ck_assert(timeutil_civil_valid(2024, 2, 29, 0, 0, 0));
        ck_assert(!timeutil_civil_valid(2026, 2, 29, 0, 0, 0));
        ck_assert(!timeutil_civil_valid(10000, 1, 1, 0, 0, 0));
}
END_TEST

START_TEST(test_weekdays_are_right_on_both_sides_of_the_epoch)
{
        ck_assert_int_eq(timeutil_weekday_from_days(0), 4);                                 /* Thursday */
        ck_assert_int_eq(timeutil_weekday_from_days(timeutil_days_from_civil(1994, 11, 6)), 0);
        ck_assert_int_eq(timeutil_weekday_from_days(timeutil_days_from_civil(1969, 12, 28)), 0);
        ck_assert_int_eq(timeutil_weekday_from_days(timeutil_days_from_civil(1900, 1, 1)), 1);
        ck_assert_int_eq(timeutil_weekday_from_days(timeutil_days_from_civil(2026, 12, 7)), 1);
        for (int64_t z = -30; z < 30; z++)
                ck_assert_int_eq((timeutil_weekday_from_days(z) + 1) % 7, timeutil_weekday_from_days(z + 1));
}
END_TEST

START_TEST(test_floor_div_rounds_towards_minus_infinity)
{
        ck_assert_int_eq(timeutil_floor_div(7, 2), 3);
        ck_assert_int_eq(timeutil_floor_div(-7, 2), -4);
        ck_assert_int_eq(timeutil_floor_div(-8, 2), -4);
        ck_assert_int_eq(timeutil_floor_div(-1, 1000), -1);
}
END_TEST

START_TEST(test_format_writes_utc_with_or_without_milliseconds)
{
        char buf[TIMEUTIL_RFC3339_MAX];

        timeutil_format_rfc3339(0, false, buf);
        ck_assert_str_eq(buf, "1970-01-01T00:00:00Z");
        timeutil_format_rfc3339(EXAMPLE_MS + 5, true, buf);
        ck_assert_str_eq(buf, "1994-11-06T08:49:37.005Z");
        timeutil_format_rfc3339(-1, true, buf);
        ck_assert_str_eq(buf, "1969-12-31T23:59:59.999Z");
        timeutil_format_rfc3339(timeutil_days_from_civil(2024, 2, 29) * TIMEUTIL_MSEC_PER_DAY, false, buf);
        ck_assert_str_eq(buf, "2024-02-29T00:00:00Z");
}
END_TEST

START_TEST(test_format_clamps_to_the_years_rfc3339_can_write)
{
        char buf[TIMEUTIL_RFC3339_MAX];

        timeutil_format_rfc3339(INT64_MIN, true, buf);
        ck_assert_str_eq(buf, "0000-01-01T00:00:00.000Z");
        timeutil_format_rfc3339(INT64_MAX, true, buf);
        ck_assert_str_eq(buf, "9999-12-31T23:59:59.999Z");
        timeutil_format_rfc3339(TIMEUTIL_MS_MAX + 1, false, buf);
        ck_assert_str_eq(buf, "9999-12-31T23:59:59Z");
}
END_TEST

START_TEST(test_formatted_times_parse_back_to_themselves)
{
        static const int64_t times[] = {
                TIMEUTIL_MS_MIN, -86400001, -1, 0, 1, 951782400000 /* 2000-02-29 */, EXAMPLE_MS + 999,
                NOW_MS, TIMEUTIL_MS_MAX,
        };
        char buf[TIMEUTIL_RFC3339_MAX];

        for (size_t i = 0; i < sizeof(times) / sizeof(times[0]); i++) {
                timeutil_format_rfc3339(times[i], true, buf);
                ck_assert_int_eq(rfc3339_ms(buf), times[i]);
                timeutil_format_rfc3339(times[i], false, buf);
                ck_assert_int_eq(rfc3339_ms(buf), timeutil_floor_div(times[i], 1000) * 1000);
        }
}
END_TEST

START_TEST(test_rfc3339_reads_fractions_offsets_and_the_spellings_allowed)
{
        struct timeutil_civil c;

        ck_assert_int_eq(rfc3339_ms("1994-11-06T08:49:37Z"), EXAMPLE_MS);
        ck_assert_int_eq(rfc3339_ms("1994-11-06t08:49:37z"), EXAMPLE_MS);
        ck_assert_int_eq(rfc3339_ms("1994-11-06 08:49:37Z"), EXAMPLE_MS);
        ck_assert_int_eq(rfc3339_ms("1994-11-06T08:49:37.2Z"), EXAMPLE_MS + 200);
        ck_assert_int_eq(rfc3339_ms("1994-11-06T08:49:37.250Z"), EXAMPLE_MS + 250);
        ck_assert_int_eq(rfc3339_ms("1994-11-06T08:49:37.123999Z"), EXAMPLE_MS + 123);
        ck_assert_int_eq(rfc3339_ms("1994-11-06T01:49:37-07:00"), EXAMPLE_MS);
        ck_assert_int_eq(rfc3339_ms("1994-11-06T14:19:37+05:30"), EXAMPLE_MS);
        ck_assert_int_eq(rfc3339_ms("0000-01-01T00:00:00Z"), TIMEUTIL_MS_MIN);

        ck_assert_int_eq(timeutil_parse_rfc3339("2026-08-21T05:40:59-07:00", 25, &c), 0);
        ck_assert_int_eq(c.year, 2026);
        ck_assert_int_eq(c.month, 8);
        ck_assert_int_eq(c.day, 21);
        ck_assert_int_eq(c.hour, 5);
        ck_assert_int_eq(c.minute, 40);
        ck_assert_int_eq(c.second, 59);
        ck_assert_int_eq(c.msec, 0);
        ck_assert_int_eq(c.offset_ms, -7 * 3600000);
}
END_TEST

START_TEST(test_rfc3339_leap_days_and_leap_seconds)
{
        struct timeutil_civil c;

        ck_assert_int_eq(rfc3339_ms("2024-02-29T00:00:00Z"), 1709164800000);
        rfc3339_bad("2023-02-29T00:00:00Z");
        rfc3339_bad("1900-02-29T00:00:00Z");
        ck_assert_int_eq(rfc3339_ms("2000-02-29T00:00:00Z"), 951782400000);
        /* A leap second is the first second of the next minute; the caller may say otherwise. */
        ck_assert_int_eq(timeutil_parse_rfc3339("2016-12-31T23:59:60Z", 20, &c), 0);
        ck_assert_int_eq(c.second, 60);
        ck_assert_int_eq(timeutil_civil_to_ms(&c), rfc3339_ms("2017-01-01T00:00:00Z"));
}
END_TEST

START_TEST(test_rfc3339_rejects_what_is_not_a_date_time)
{
        static const char *const bad[] = {
                "", "2026", "2026-11-28", "2026-11-28T10:20:00", "2026-11-28T10:20Z",
                "26-11-28T10:20:00Z", "02026-11-28T10:20:00Z", "2026-1-28T10:20:00Z",
                "2026-11-28X10:20:00Z", "2026-00-28T10:20:00Z", "2026-13-28T10:20:00Z",
                "2026-11-00T10:20:00Z", "2026-11-31T10:20:00Z", "2026-11-28T24:00:00Z",
                "2026-11-28T10:60:00Z", "2026-11-28T10:20:61Z", "2026-11-28T10:20:00.Z",
                "2026-11-28T10:20:00+24:00", "2026-11-28T10:20:00+07:60", "2026-11-28T10:20:00+0700",
                "2026-11-28T10:20:00ZZ", "2026-11-28T10:20:00Z ", " 2026-11-28T10:20:00Z",
                "-026-11-28T10:20:00Z", "2026-11-28T10:20:00UTC",
        };

        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
                rfc3339_bad(bad[i]);
}
END_TEST

START_TEST(test_rfc3339_reads_only_the_bytes_it_is_given)
{
        struct timeutil_civil c;

        /* A header value is not NUL-terminated: what follows it is not part of it. */
        ck_assert_int_eq(timeutil_parse_rfc3339("1994-11-06T08:49:37Zjunk", 20, &c), 0);
        ck_assert_int_eq(timeutil_civil_to_ms(&c), EXAMPLE_MS);
        ck_assert_int_eq(timeutil_parse_rfc3339("1994-11-06T08:49:37Z", 19, &c), -EINVAL);
        ck_assert_int_eq(timeutil_parse_rfc3339("1994-11-06T08:49:37\0Z", 21, &c), -EINVAL);
        ck_assert_int_eq(timeutil_parse_rfc3339(NULL, 0, &c), -EINVAL);
}
END_TEST

START_TEST(test_http_date_reads_its_three_forms_alike)
{
        ck_assert_int_eq(http_ms("Sun, 06 Nov 1994 08:49:37 GMT"), EXAMPLE_MS);
        ck_assert_int_eq(http_ms("Sunday, 06-Nov-94 08:49:37 GMT"), EXAMPLE_MS);
        ck_assert_int_eq(http_ms("Sun Nov  6 08:49:37 1994"), EXAMPLE_MS);
        ck_assert_int_eq(http_ms("Sun Nov 16 08:49:37 1994"), EXAMPLE_MS + 10 * TIMEUTIL_MSEC_PER_DAY);
}
END_TEST

START_TEST(test_http_date_names_are_case_insensitive_and_utc_is_gmt)
{
        ck_assert_int_eq(http_ms("sun, 06 nov 1994 08:49:37 gmt"), EXAMPLE_MS);
        ck_assert_int_eq(http_ms("SUN, 06 NOV 1994 08:49:37 UTC"), EXAMPLE_MS);
        ck_assert_int_eq(http_ms("Sun, 6 Nov 1994 08:49:37 GMT"), EXAMPLE_MS);
}
END_TEST

START_TEST(test_http_date_two_digit_years_are_at_most_50_years_ahead)
{
        int64_t ms;

        /* Now is 2026: 77 would be 2077, more than 50 years ahead, so it is 1977; 76 is 2076,
         * exactly 50 years ahead. */
        ck_assert_int_eq(http_ms("Saturday, 01-Jan-77 00:00:00 GMT"),
                         timeutil_days_from_civil(1977, 1, 1) * TIMEUTIL_MSEC_PER_DAY);
        ck_assert_int_eq(http_ms("Wednesday, 01-Jan-76 00:00:00 GMT"),
                         timeutil_days_from_civil(2076, 1, 1) * TIMEUTIL_MSEC_PER_DAY);
        ck_assert_int_eq(http_ms("Friday, 01-Jan-27 00:00:00 GMT"),
                         timeutil_days_from_civil(2027, 1, 1) * TIMEUTIL_MSEC_PER_DAY);
        /* Without a sane clock there is no century to place it in. */
        ck_assert_int_eq(timeutil_parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", 30, -1, &ms), -EINVAL);
        ck_assert_int_eq(timeutil_parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", 30,
                                                  TIMEUTIL_MS_MAX + 1, &ms), -EINVAL);
}
END_TEST

START_TEST(test_http_date_rejects_what_is_not_one)
{
        static const char *const bad[] = {
                "", "Sun", "Sux, 06 Nov 1994 08:49:37 GMT", "Sun, 06 Nox 1994 08:49:37 GMT",
                "Sun, 06 Nov 1994 08:49:37 PST", "Sun, 06 Nov 1994 08:49:37", "Sun, 06 Nov 1994 08:49 GMT",
                "Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Nov 0000 08:49:37 GMT",
                "Sun, 06 Nov 94 08:49:37 GMT",
                "Sun, 006 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 25:49:37 GMT",
                "Sun, 06 Nov 1994 08:49:37 GMT ", "Sun, 06 Nov 1994 08:49:37 GMTX",
                "Sunday, 06-Nov-1994 08:49:37 GMT", "Sun Nov  6 08:49:37 94", "Sun Nov  6 08:49:37 1994 GMT",
                "2026-11-28T10:20:00Z", "120",
        };

        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
                http_bad(bad[i]);
}
END_TEST

static Suite *timeutil_suite(void) {
        Suite *s = suite_create("timeutil");
        TCase *tc = tcase_create("timeutil");

        tcase_add_test(tc, test_known_dates_have_their_day_numbers);
        tcase_add_test(tc, test_every_day_from_year_0_to_9999_round_trips);
        tcase_add_test(tc, test_leap_years_follow_the_gregorian_rule);
        tcase_add_test(tc, test_weekdays_are_right_on_both_sides_of_the_epoch);
        tcase_add_test(tc, test_floor_div_rounds_towards_minus_infinity);
        tcase_add_test(tc, test_format_writes_utc_with_or_without_milliseconds);
        tcase_add_test(tc, test_format_clamps_to_the_years_rfc3339_can_write);
        tcase_add_test(tc, test_formatted_times_parse_back_to_themselves);
        tcase_add_test(tc, test_rfc3339_reads_fractions_offsets_and_the_spellings_allowed);
        tcase_add_test(tc, test_rfc3339_leap_days_and_leap_seconds);
        tcase_add_test(tc, test_rfc3339_rejects_what_is_not_a_date_time);
        tcase_add_test(tc, test_rfc3339_reads_only_the_bytes_it_is_given);
        tcase_add_test(tc, test_http_date_reads_its_three_forms_alike);
        tcase_add_test(tc, test_http_date_names_are_case_insensitive_and_utc_is_gmt);
        tcase_add_test(tc, test_http_date_two_digit_years_are_at_most_50_years_ahead);
        tcase_add_test(tc, test_http_date_rejects_what_is_not_one);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(timeutil_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
