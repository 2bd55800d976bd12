/* check_ctl.c — keypoolctl's presentation: tables, durations, colour, refusals, documents. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/ctl.h"

#define KEY_A "kp-0123456789"
#define KEY_B "kp-abcdefabcd"

/* Two keys in one pool: one cooling after a 429, one ready. */
static const char *const KEY_STATUS =
        "{\"pools\":[{\"name\":\"GLM45\",\"model\":\"z-ai/glm-4.5\",\"account_limit_suspected\":false,\"keys\":["
        "{\"id\":\"" KEY_A "\",\"masked\":\"sk-or-v1-fake-0...001\",\"state\":\"cooling\","
        "\"reason\":\"rate_limited\",\"cooldown_remaining_s\":250,\"requests\":12,\"successes\":11,"
        "\"rate_limited\":1,\"failures\":0,\"in_flight\":0,\"last_status\":429},"
        "{\"id\":\"" KEY_B "\",\"masked\":\"sk-or-v1-fake-0...002\",\"state\":\"ready\","
        "\"reason\":null,\"cooldown_remaining_s\":0,\"requests\":1234,\"successes\":1234,"
        "\"rate_limited\":0,\"failures\":0,\"in_flight\":2,\"last_status\":null}]}]}";

static json_t *parse(const char *text) {
        json_error_t e;
        json_t *doc = json_loads(text, 0, &e);

        ck_assert_msg(doc, "test document does not parse: %s", e.text);
        return doc;
}

/* What writer prints for the document text; ret_r gets its return value. */
static char *render(ctl_writer writer, const char *text, bool colour, int *ret_r) {
        json_t *doc = parse(text);
        char *out = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&out, &size);
        int r;

        ck_assert_ptr_nonnull(f);
        r = writer(f, doc, colour);
        ck_assert_int_eq(fclose(f), 0);
        json_decref(doc);
        if (ret_r)
                *ret_r = r;
        else
                ck_assert_msg(r == 0, "writer failed: %d", r);
        return out;
}

/* The n-th line (0-based) of text, malloc'ed. */
static char *line(const char *text, unsigned n) {
        const char *p = text, *end;

        for (unsigned i = 0; i < n; i++) {
                p = strchr(p, '\n');
                ck_assert_msg(p, "fewer than %u lines in:\n%s", n + 1, text);
                p++;
        }
        end = strchrnul(p, '\n');
        return strndup(p, (size_t) (end - p));
}

/* The column at which word starts in a line. */
static long column_of(const char *l, const char *word) {
        const char *p = strstr(l, word);

        ck_assert_msg(p, "'%s' is not in '%s'", word, l);
        return p - l;
}

START_TEST(test_keys_table_has_a_row_per_key_with_its_state_reason_and_counters) {
        char *out = render(ctl_write_keys, KEY_STATUS, false, NULL);
        char *header = line(out, 0), *a = line(out, 1), *b = line(out, 2);

        ck_assert_str_eq(header, "POOL   KEY            MASKED                 STATE    REASON        COOLDOWN"
                                 "  REQUESTS    OK  LIMITED  FAILED  INFLIGHT  LAST");
        ck_assert_str_eq(a, "GLM45  " KEY_A "  sk-or-v1-fake-0...001  cooling  rate_limited  4m10s   "
                            "        12    11        1       0         0   429");
        ck_assert_str_eq(b, "GLM45  " KEY_B "  sk-or-v1-fake-0...002  ready    -             -       "
                            "      1234  1234        0       0         2     -");
        free(header);
        free(a);
        free(b);
        free(out);
}
END_TEST

START_TEST(test_table_columns_line_up_under_their_headers) {
        char *out = render(ctl_write_keys, KEY_STATUS, false, NULL);
        char *header = line(out, 0), *a = line(out, 1);

        ck_assert_int_eq(column_of(header, "STATE"), column_of(a, "cooling"));
        ck_assert_int_eq(column_of(header, "REASON"), column_of(a, "rate_limited"));
        /* Numbers are right-aligned: they end where their header ends. */
        ck_assert_int_eq(column_of(header, "LAST") + 4, column_of(a, "429") + 3);
        free(header);
        free(a);
        free(out);
}
END_TEST

START_TEST(test_table_lines_have_no_trailing_blanks) {
        char *out = render(ctl_write_keys, KEY_STATUS, false, NULL);

        ck_assert_ptr_null(strstr(out, " \n"));
        free(out);
        /* Not even when the last column is empty in some rows. */
        out = render(ctl_write_status,
                     "{\"pools\":[{\"name\":\"a\",\"account_limit_suspected\":false},"
                     "{\"name\":\"b\",\"account_limit_suspected\":true}]}", false, NULL);
        ck_assert_ptr_nonnull(strstr(out, "account limit suspected\n"));
        ck_assert_msg(!strstr(out, " \n"), "trailing blanks in:\n%s", out);
        free(out);
}
END_TEST

START_TEST(test_state_is_coloured_only_when_asked) {
        char *plain = render(ctl_write_keys, KEY_STATUS, false, NULL);
        char *coloured = render(ctl_write_keys, KEY_STATUS, true, NULL);

        ck_assert_ptr_null(strchr(plain, '\033'));
        ck_assert_ptr_nonnull(strstr(coloured, "\033[33mcooling\033[0m"));
        ck_assert_ptr_nonnull(strstr(coloured, "\033[32mready\033[0m"));
        /* The padding stays outside the escape codes, so the next column still lines up. */
        ck_assert_ptr_nonnull(strstr(coloured, "\033[32mready\033[0m    -"));
        free(plain);
        free(coloured);
}
END_TEST

START_TEST(test_disabled_is_red_and_the_header_is_never_coloured) {
        char *out = render(ctl_write_keys,
                           "{\"pools\":[{\"name\":\"P\",\"keys\":[{\"id\":\"" KEY_A "\",\"state\":\"disabled\","
                           "\"reason\":\"operator\"}]}]}", true, NULL);
        char *header = line(out, 0);

        ck_assert_ptr_nonnull(strstr(out, "\033[31mdisabled\033[0m"));
        ck_assert_ptr_null(strchr(header, '\033'));
        free(header);
        free(out);
}
END_TEST

START_TEST(test_utf8_pool_names_align_by_characters_not_bytes) {
        static const char *const headers[] = { "POOL", "N" };
        struct ctl_table *t;
        char *out = NULL, *l1, *l2;
        size_t size;
        FILE *f;

        ck_assert_int_eq(ctl_table_new(2, headers, &t), 0);
        ck_assert_int_eq(ctl_table_add(t, (const char *[]) { "Zürich", "1" }), 0);
        ck_assert_int_eq(ctl_table_add(t, (const char *[]) { "Berlin", "2" }), 0);
        ck_assert_uint_eq(ctl_table_rows(t), 2);
        f = open_memstream(&out, &size);
        ck_assert_int_eq(ctl_table_write(t, f, false), 0);
        fclose(f);
        ctl_table_free(t);
        l1 = line(out, 1);
        l2 = line(out, 2);
        ck_assert_str_eq(l1, "Zürich  1");
        ck_assert_str_eq(l2, "Berlin  2");
        free(l1);
        free(l2);
        free(out);
}
END_TEST

START_TEST(test_account_limit_suspected_gets_a_note) {
        char *out = render(ctl_write_keys,
                           "{\"pools\":[{\"name\":\"GLM45\",\"account_limit_suspected\":true,\"keys\":[]}]}",
                           false, NULL);

        ck_assert_ptr_nonnull(strstr(out, "note: pool GLM45:"));
        ck_assert_ptr_nonnull(strstr(out, "account's own limit is suspected"));
        free(out);
}
END_TEST

START_TEST(test_durations_read_like_a_person_would_say_them) {
        static const struct { int64_t s; const char *text; } cases[] = {
                { -5, "0s" }, { 0, "0s" }, { 1, "1s" }, { 59, "59s" }, { 60, "1m00s" },
                { 250, "4m10s" }, { 3599, "59m59s" }, { 3600, "1h00m" }, { 7500, "2h05m" },
                { 86400, "1d00h" }, { 273600, "3d04h" },
        };
        char buf[32];

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                ctl_format_duration(cases[i].s, buf, sizeof(buf));
                ck_assert_msg(strcmp(buf, cases[i].text) == 0, "%lld s printed as '%s', expected '%s'",
                              (long long) cases[i].s, buf, cases[i].text);
        }
}
END_TEST

START_TEST(test_colour_only_on_a_terminal_without_no_color) {
        ck_assert(ctl_want_colour(true, NULL, "xterm-256color"));
        ck_assert(ctl_want_colour(true, "", NULL));
        ck_assert(!ctl_want_colour(false, NULL, "xterm"));
        ck_assert(!ctl_want_colour(true, "1", "xterm"));
        ck_assert(!ctl_want_colour(true, NULL, "dumb"));
}
END_TEST

START_TEST(test_url_escape_keeps_unreserved_characters_and_escapes_the_rest) {
        char *e = ctl_url_escape("GLM 4.5/a&b=c~_-");

        ck_assert_str_eq(e, "GLM%204.5%2Fa%26b%3Dc~_-");
        free(e);
}
END_TEST

START_TEST(test_history_path_carries_only_the_filters_given) {
        char *p;

        p = ctl_history_path(0, NULL, NULL);
        ck_assert_str_eq(p, "/api/history");
        free(p);
        p = ctl_history_path(5, NULL, NULL);
        ck_assert_str_eq(p, "/api/history?limit=5");
        free(p);
        p = ctl_history_path(0, "my pool", KEY_A);
        ck_assert_str_eq(p, "/api/history?pool=my%20pool&key=" KEY_A);
        free(p);
        p = ctl_history_path(20, "GLM45", KEY_A);
        ck_assert_str_eq(p, "/api/history?limit=20&pool=GLM45&key=" KEY_A);
        free(p);
}
END_TEST

START_TEST(test_refusal_quotes_the_daemons_message_and_code) {
        const char *body = "{\"error\":{\"message\":\"admin actions are for the socket's owner\","
                           "\"type\":\"keypool_error\",\"code\":\"forbidden\"}}";
        char *t = ctl_error_text(403, body, strlen(body));

        ck_assert_str_eq(t, "admin actions are for the socket's owner (forbidden, HTTP 403)");
        free(t);
}
END_TEST

START_TEST(test_refusal_of_a_foreign_body_shows_its_first_line) {
        const char *body = "Bad Gateway\nmore detail";
        char *t = ctl_error_text(502, body, strlen(body));

        ck_assert_str_eq(t, "Bad Gateway (HTTP 502)");
        free(t);
        t = ctl_error_text(500, NULL, 0);
        ck_assert_str_eq(t, "the daemon answered HTTP 500");
        free(t);
}
END_TEST

START_TEST(test_history_lists_events_oldest_first_with_the_keys_involved) {
        char *out = render(ctl_write_history,
                           "{\"events\":[{\"time\":\"2026-11-28T10:20:00.123Z\",\"pool\":\"GLM45\",\"event\":\"rotate\","
                           "\"from\":\"" KEY_A "\",\"to\":\"" KEY_B "\",\"status\":429,\"reason\":\"rate_limited\","
                           "\"cooldown_s\":30},{\"time\":\"2026-11-28T10:21:00.000Z\",\"pool\":\"GLM45\","
                           "\"event\":\"disable\",\"from\":\"" KEY_B "\",\"to\":null,\"status\":null,"
                           "\"reason\":\"operator\",\"cooldown_s\":null}]}", false, NULL);
        char *header = line(out, 0), *first = line(out, 1), *second = line(out, 2);

        ck_assert_str_eq(header, "TIME                      POOL   EVENT    KEY            TO             STATUS"
                                 "  REASON        COOLDOWN");
        ck_assert_str_eq(first, "2026-11-28T10:20:00.123Z  GLM45  rotate   " KEY_A "  " KEY_B "     429"
                                "  rate_limited       30s");
        ck_assert_str_eq(second, "2026-11-28T10:21:00.000Z  GLM45  disable  " KEY_B "  -                   -"
                                 "  operator             -");
        free(header);
        free(first);
        free(second);
        free(out);
}
END_TEST

START_TEST(test_empty_history_says_so) {
        char *out = render(ctl_write_history, "{\"events\":[]}", false, NULL);

        ck_assert_str_eq(out, "no events\n");
        free(out);
}
END_TEST

START_TEST(test_status_shows_the_daemon_totals_workers_and_pools) {
        char *out = render(ctl_write_status,
                           "{\"version\":\"0.1.0\",\"uptime_s\":3720,\"pid\":100,\"generation\":2,"
                           "\"workers\":[{\"pid\":101,\"slot\":0,\"generation\":2,\"stage\":\"serving\","
                           "\"heartbeat_age_ms\":120,\"requests\":7,\"in_flight\":1,\"waiting\":0}],"
                           "\"requests\":7,\"in_flight\":1,\"keys\":3,"
                           "\"totals\":{\"keys\":3,\"ready\":1,\"cooling\":1,\"disabled\":1,\"requests\":9,"
                           "\"successes\":7,\"rate_limited\":1,\"failures\":1,\"tokens_in\":50,\"tokens_out\":25},"
                           "\"pools\":[{\"name\":\"GLM45\",\"model\":\"z-ai/glm-4.5\",\"keys\":3,\"ready\":1,"
                           "\"cooling\":1,\"disabled\":1,\"account_limit_suspected\":true}]}", false, NULL);

        ck_assert_ptr_nonnull(strstr(out, "keypoold 0.1.0, pid 100, up 1h02m, config generation 2\n"));
        ck_assert_ptr_nonnull(strstr(out, "keys 3: 1 ready, 1 cooling, 1 disabled\n"));
        ck_assert_ptr_nonnull(strstr(out, "9 requests, 7 ok, 1 rate limited, 1 failed; tokens 50 in, 25 out"));
        ck_assert_ptr_nonnull(strstr(out, "serving"));
        ck_assert_ptr_nonnull(strstr(out, "120ms"));
        ck_assert_ptr_nonnull(strstr(out, "GLM45  z-ai/glm-4.5"));
        ck_assert_ptr_nonnull(strstr(out, "account limit suspected"));
        free(out);
}
END_TEST

START_TEST(test_health_says_degraded_and_lists_ready_keys_per_pool) {
        char *out = render(ctl_write_health,
                           "{\"status\":\"degraded\",\"pools\":[{\"name\":\"GLM45\",\"ready\":0,\"keys\":2}]}",
                           false, NULL);

        ck_assert_str_eq(out, "degraded\nPOOL   READY  KEYS\nGLM45      0     2\n");
        free(out);
}
END_TEST

START_TEST(test_key_action_says_what_the_key_is_now) {
        char *out = render(ctl_write_key_action,
                           "{\"key\":{\"id\":\"" KEY_A "\",\"masked\":\"sk-or-v1-fake-0...001\","
                           "\"state\":\"disabled\",\"reason\":\"operator\"}}", false, NULL);

        ck_assert_str_eq(out, KEY_A " (sk-or-v1-fake-0...001): disabled, reason operator\n");
        free(out);
        out = render(ctl_write_key_action,
                     "{\"key\":{\"id\":\"" KEY_A "\",\"state\":\"ready\",\"reason\":null}}", false, NULL);
        ck_assert_str_eq(out, KEY_A ": ready\n");
        free(out);
}
END_TEST

START_TEST(test_import_prints_the_counts) {
        char *out = render(ctl_write_import, "{\"imported\":3,\"ignored\":1}", false, NULL);

        ck_assert_str_eq(out, "imported 3, ignored 1\n");
        free(out);
}
END_TEST

START_TEST(test_writers_refuse_documents_of_another_shape) {
        int r;

        free(render(ctl_write_keys, "{\"events\":[]}", false, &r));
        ck_assert_int_eq(r, -EINVAL);
        free(render(ctl_write_history, "{\"pools\":[]}", false, &r));
        ck_assert_int_eq(r, -EINVAL);
        free(render(ctl_write_health, "[]", false, &r));
        ck_assert_int_eq(r, -EINVAL);
        free(render(ctl_write_key_action, "{\"probing\":true}", false, &r));
        ck_assert_int_eq(r, -EINVAL);
        free(render(ctl_write_import, "{}", false, &r));
        ck_assert_int_eq(r, -EINVAL);
}
END_TEST

START_TEST(test_state_summary_counts_keys_and_events_and_refuses_foreign_documents) {
        json_t *doc = parse("{\"format\":\"keypool-state\",\"version\":1,\"keys\":[{},{}],\"history\":[{}]}");
        size_t keys = 99, events = 99;

        ck_assert_int_eq(ctl_state_summary(doc, &keys, &events), 0);
        ck_assert_uint_eq(keys, 2);
        ck_assert_uint_eq(events, 1);
        json_decref(doc);

        doc = parse("{\"format\":\"something-else\",\"keys\":[]}");
        ck_assert_int_eq(ctl_state_summary(doc, &keys, &events), -EINVAL);
        json_decref(doc);
        doc = parse("{\"format\":\"keypool-state\",\"keys\":{}}");
        ck_assert_int_eq(ctl_state_summary(doc, &keys, &events), -EINVAL);
        json_decref(doc);
}
END_TEST

static Suite *ctl_suite(void) {
        Suite *s = suite_create("ctl");
        TCase *tc = tcase_create("ctl");

        tcase_add_test(tc, test_keys_table_has_a_row_per_key_with_its_state_reason_and_counters);
        tcase_add_test(tc, test_table_columns_line_up_under_their_headers);
        tcase_add_test(tc, test_table_lines_have_no_trailing_blanks);
        tcase_add_test(tc, test_state_is_coloured_only_when_asked);
        tcase_add_test(tc, test_disabled_is_red_and_the_header_is_never_coloured);
        tcase_add_test(tc, test_utf8_pool_names_align_by_characters_not_bytes);
        tcase_add_test(tc, test_account_limit_suspected_gets_a_note);
        tcase_add_test(tc, test_durations_read_like_a_person_would_say_them);
        tcase_add_test(tc, test_colour_only_on_a_terminal_without_no_color);
        tcase_add_test(tc, test_url_escape_keeps_unreserved_characters_and_escapes_the_rest);
        tcase_add_test(tc, test_history_path_carries_only_the_filters_given);
        tcase_add_test(tc, test_refusal_quotes_the_daemons_message_and_code);
        tcase_add_test(tc, test_refusal_of_a_foreign_body_shows_its_first_line);
        tcase_add_test(tc, test_history_lists_events_oldest_first_with_the_keys_involved);
        tcase_add_test(tc, test_empty_history_says_so);
        tcase_add_test(tc, test_status_shows_the_daemon_totals_workers_and_pools);
        tcase_add_test(tc, test_health_says_degraded_and_lists_ready_keys_per_pool);
        tcase_add_test(tc, test_key_action_says_what_the_key_is_now);
        tcase_add_test(tc, test_import_prints_the_counts);
        tcase_add_test(tc, test_writers_refuse_documents_of_another_shape);
        tcase_add_test(tc, test_state_summary_counts_keys_and_events_and_refuses_foreign_documents);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(ctl_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
