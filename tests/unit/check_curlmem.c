/* check_curlmem.c — which of libcurl's blocks curlmem leaves unwiped: its receive buffers, and
 * nothing curl could have built a request (and so a key) in; and how large an upload buffer (a
 * copy of the request, wiped) a request gets. */
#include <check.h>
#include <curl/curl.h>
#include <malloc.h>
#include <stdlib.h>

#include "keypool/curlmem.h"

static size_t usable(size_t size) {
        void *p = malloc(size);
        size_t n;

        ck_assert_ptr_nonnull(p);
        n = malloc_usable_size(p);
        free(p);
        return n;
}

START_TEST(test_receive_buffers_are_left_unwiped) {
        ck_assert_int_eq(curlmem_global_init(CURL_GLOBAL_DEFAULT), CURLE_OK);
        /* curl 7.88 allocates CURLOPT_BUFFERSIZE + 1 bytes for each transfer. */
        ck_assert(curlmem_unwiped_size(usable(CURLMEM_RECV_BUFFER + 1)));
        ck_assert(curlmem_unwiped_size(usable(CURLMEM_STREAM_RECV_BUFFER + 1)));
        /* Below curl's minimum, curl would allocate another size than the one learnt here. */
        ck_assert_int_gt(CURLMEM_STREAM_RECV_BUFFER, CURLMEM_CURL_MIN_BUFFER);
        curl_global_cleanup();
}
END_TEST

START_TEST(test_blocks_a_request_may_be_built_in_are_wiped) {
        ck_assert_int_eq(curlmem_global_init(CURL_GLOBAL_DEFAULT), CURLE_OK);
        /* curl's dynbufs (the request it writes out, with the key's header) double from 32 bytes
         * to their limit: none of those sizes may be taken for a receive buffer. */
        for (size_t n = 32; n <= 4 * 1024 * 1024; n *= 2)
                ck_assert_msg(!curlmem_unwiped_size(usable(n)), "a %zu-byte block is left unwiped", n);
        /* Nor the blocks around them, a header line's copy say. */
        ck_assert(!curlmem_unwiped_size(usable(64)));
        ck_assert(!curlmem_unwiped_size(usable(CURLMEM_RECV_BUFFER + 64)));
        curl_global_cleanup();
}
END_TEST

START_TEST(test_upload_buffers_are_wiped) {
        ck_assert_int_eq(curlmem_global_init(CURL_GLOBAL_DEFAULT), CURLE_OK);
        /* Over TLS with HTTP/1.1 it holds the request as curl writes it out, key included. */
        for (size_t body = 0; body <= 128 * 1024; body += 512) {
                long n = curlmem_upload_buffer(body);

                ck_assert_msg(!curlmem_unwiped_size(usable((size_t) n)),
                              "the %ld-byte upload buffer of a %zu-byte body is left unwiped", n, body);
        }
        curl_global_cleanup();
}
END_TEST

START_TEST(test_a_small_request_gets_curls_smallest_upload_buffer) {
        /* Not curl's default of 64 KiB: all of it would be wiped after every transfer. */
        ck_assert_int_eq(curlmem_upload_buffer(0), 16384);
        ck_assert_int_eq(curlmem_upload_buffer(300), 16384);
        ck_assert_int_eq(curlmem_upload_buffer(12 * 1024), 16384);
}
END_TEST

START_TEST(test_a_larger_request_gets_room_for_its_body_and_header_lines) {
        ck_assert_int_eq(curlmem_upload_buffer(20000), 20000 + 4096);
        ck_assert_int_gt(curlmem_upload_buffer(40000), 40000);
}
END_TEST

START_TEST(test_no_request_gets_more_than_curls_default_upload_buffer) {
        /* A bigger body goes out through it in pieces, as before. */
        ck_assert_int_eq(curlmem_upload_buffer(64 * 1024 - 4096), 65536);
        ck_assert_int_eq(curlmem_upload_buffer(200 * 1000), 65536);
        ck_assert_int_eq(curlmem_upload_buffer((size_t) -1), 65536);
}
END_TEST

static Suite *curlmem_suite(void) {
        Suite *s = suite_create("curlmem");
        TCase *tc = tcase_create("core");

        tcase_add_test(tc, test_receive_buffers_are_left_unwiped);
        tcase_add_test(tc, test_blocks_a_request_may_be_built_in_are_wiped);
        tcase_add_test(tc, test_upload_buffers_are_wiped);
        tcase_add_test(tc, test_a_small_request_gets_curls_smallest_upload_buffer);
        tcase_add_test(tc, test_a_larger_request_gets_room_for_its_body_and_header_lines);
        tcase_add_test(tc, test_no_request_gets_more_than_curls_default_upload_buffer);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(curlmem_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
