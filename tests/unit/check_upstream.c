/* check_upstream.c — which transport failures are the upstream's configuration, not a key's. */
#include <check.h>
#include <stdlib.h>

#include "keypool/upstream.h"

START_TEST(test_certificate_problems_are_certificate_failures)
{
        /* Unknown CA, wrong name and expired all arrive as CURLE_PEER_FAILED_VERIFICATION. */
        ck_assert_int_eq(upstream_failure_class(CURLE_PEER_FAILED_VERIFICATION), UPSTREAM_FAILURE_CERTIFICATE);
        ck_assert_int_eq(upstream_failure_class(CURLE_SSL_CACERT_BADFILE), UPSTREAM_FAILURE_CERTIFICATE);
        ck_assert_int_eq(upstream_failure_class(CURLE_SSL_PINNEDPUBKEYNOTMATCH), UPSTREAM_FAILURE_CERTIFICATE);
}
END_TEST

START_TEST(test_a_failed_handshake_is_a_tls_failure_that_may_mend)
{
        ck_assert_int_eq(upstream_failure_class(CURLE_SSL_CONNECT_ERROR), UPSTREAM_FAILURE_TLS);
}
END_TEST

START_TEST(test_unresolvable_names_are_dns_failures)
{
        ck_assert_int_eq(upstream_failure_class(CURLE_COULDNT_RESOLVE_HOST), UPSTREAM_FAILURE_DNS);
        ck_assert_int_eq(upstream_failure_class(CURLE_COULDNT_RESOLVE_PROXY), UPSTREAM_FAILURE_DNS);
}
END_TEST

START_TEST(test_refused_reset_and_timed_out_are_other_failures)
{
        ck_assert_int_eq(upstream_failure_class(CURLE_COULDNT_CONNECT), UPSTREAM_FAILURE_OTHER);
        ck_assert_int_eq(upstream_failure_class(CURLE_RECV_ERROR), UPSTREAM_FAILURE_OTHER);
        ck_assert_int_eq(upstream_failure_class(CURLE_OPERATION_TIMEDOUT), UPSTREAM_FAILURE_OTHER);
        ck_assert_int_eq(upstream_failure_class(CURLE_HTTP2), UPSTREAM_FAILURE_OTHER);
}
END_TEST

START_TEST(test_success_is_no_failure)
{
        ck_assert_int_eq(upstream_failure_class(CURLE_OK), UPSTREAM_FAILURE_INVALID);
}
END_TEST

static Suite *upstream_suite(void) {
        Suite *s = suite_create("upstream");
        TCase *tc = tcase_create("failure_class");

        tcase_add_test(tc, test_certificate_problems_are_certificate_failures);
        tcase_add_test(tc, test_a_failed_handshake_is_a_tls_failure_that_may_mend);
        tcase_add_test(tc, test_unresolvable_names_are_dns_failures);
        tcase_add_test(tc, test_refused_reset_and_timed_out_are_other_failures);
        tcase_add_test(tc, test_success_is_no_failure);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(upstream_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
