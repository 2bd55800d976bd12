/* check_curlmem.c — which of libcurl's blocks curlmem leaves unwiped: its receive buffers, and
 * nothing curl could have built a request (and so a key) in. */
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

static Suite *curlmem_suite(void) {
        Suite *s = suite_create("curlmem");
        TCase *tc = tcase_create("core");

        tcase_add_test(tc, test_receive_buffers_are_left_unwiped);
        tcase_add_test(tc, test_blocks_a_request_may_be_built_in_are_wiped);
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
