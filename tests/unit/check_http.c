/* check_http.c — request targets: what can be forwarded exactly as written, and what cannot. */
#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/http.h"

struct target_case {
        const char *target;
        size_t len;                     /* 0: strlen(target) */
        bool ok;
};

static const struct target_case target_cases[] = {
        { "/v1/chat/completions", 0, true },
        { "/health", 0, true },
        { "/", 0, true },
        { "/v1/chat/completions?trace=1&x=y", 0, true },
        { "/v1/a%20b", 0, true },                       /* an encoded space is just a byte */
        { "/v1/...", 0, true },                         /* three dots are a name */
        { "/v1/.well-known/x", 0, true },
        { "/v1/a..b", 0, true },
        { "/v1/x?path=../..", 0, true },                /* the query is not a path */
        { "/v1/x?a=%2f", 0, true },
        { "/v1/\xff", 0, true },                        /* not ASCII, but libcurl sends it */

        { "", 0, false },
        { "v1/chat", 0, false },
        { "http://evil/v1/x", 0, false },
        { "*", 0, false },
        { "/v1/../../x", 0, false },
        { "/v1/..", 0, false },
        { "/..", 0, false },
        { "/v1/./x", 0, false },
        { "/v1/.", 0, false },
        { "/v1/.?x=1", 0, false },
        { "/v1/%2e%2e/x", 0, false },
        { "/v1/%2E%2e/x", 0, false },
        { "/v1/.%2E/x", 0, false },
        { "/v1/%2e/x", 0, false },
        { "/v1/a%2fb", 0, false },
        { "/v1/a%2Fb", 0, false },
        { "/v1/a%5cb", 0, false },
        { "/v1/a\\b", 0, false },
        { "/v1/a%00b", 0, false },
        { "/v1/a%0d%0ab", 0, false },
        { "/v1/a b", 0, false },
        { "/v1/a\tb", 0, false },
        { "/v1/a\x01", 0, false },
        { "/v1/a\x7f", 0, false },
        { "/v1/a\0b", 7, false },
        { "/v1/%zz", 0, false },
        { "/v1/%4", 0, false },
        { "/v1/%", 0, false },
        { "/v1/x?q=%g0", 0, false },
        { "/v1/x#frag", 0, false },
};

START_TEST(test_target_check_table)
{
        const struct target_case *t = &target_cases[_i];
        size_t len = t->len ? t->len : strlen(t->target);
        const char *problem = NULL;
        int r = http_target_check(t->target, len, &problem);

        if (t->ok) {
                ck_assert_msg(r == 0, "'%s' must be accepted, refused: %s", t->target, problem);
                ck_assert_ptr_null(problem);
        } else {
                ck_assert_msg(r == -EINVAL, "'%s' must be refused", t->target);
                ck_assert_msg(problem && *problem, "'%s' refused without a reason", t->target);
        }
}
END_TEST

START_TEST(test_target_check_leaves_the_problem_alone_when_fine)
{
        const char *problem = "untouched";

        ck_assert_int_eq(http_target_check("/v1/x", 5, &problem), 0);
        ck_assert_str_eq(problem, "untouched");
        ck_assert_int_eq(http_target_check("/v1/..", 6, NULL), -EINVAL);
}
END_TEST

/* Only the given length counts: the check is never fooled by what follows. */
START_TEST(test_target_check_reads_only_the_given_length)
{
        ck_assert_int_eq(http_target_check("/v1/x/..", 5, NULL), 0);
        ck_assert_int_eq(http_target_check("/v1/x%2", 6, NULL), -EINVAL);
}
END_TEST

static Suite *http_suite(void) {
        Suite *s = suite_create("http");
        TCase *tc = tcase_create("target");

        tcase_add_loop_test(tc, test_target_check_table, 0,
                            (int) (sizeof target_cases / sizeof target_cases[0]));
        tcase_add_test(tc, test_target_check_leaves_the_problem_alone_when_fine);
        tcase_add_test(tc, test_target_check_reads_only_the_given_length);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(http_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
