/* check_fileio.c — a file is read whole up to its bound, or refused with an errno. */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keypool/fileio.h"

static char dir[] = "/tmp/check_fileio.XXXXXX";
static char path[256];

static void setup(void) {
        strcpy(dir, "/tmp/check_fileio.XXXXXX");
        ck_assert_ptr_nonnull(mkdtemp(dir));
        snprintf(path, sizeof(path), "%s/file", dir);
}

static void teardown(void) {
        unlink(path);
        rmdir(dir);
}

static void write_file(const char *data, size_t len) {
        FILE *f = fopen(path, "w");

        ck_assert_ptr_nonnull(f);
        ck_assert_uint_eq(fwrite(data, 1, len, f), len);
        ck_assert_int_eq(fclose(f), 0);
}

START_TEST(test_a_file_is_read_whole_and_nul_terminated)
{
        char *data = NULL;
        size_t len = 0;

        write_file("PROVIDER_X_API_KEY=sk-test-fake-1\n", 34);
        ck_assert_int_eq(fileio_read(path, 1024, &data, &len), 0);
        ck_assert_uint_eq(len, 34);
        ck_assert_str_eq(data, "PROVIDER_X_API_KEY=sk-test-fake-1\n");
        free(data);
}
END_TEST

START_TEST(test_embedded_nul_bytes_are_kept_and_counted)
{
        char *data = NULL;
        size_t len = 0;

        write_file("a\0b", 3);
        ck_assert_int_eq(fileio_read(path, 16, &data, &len), 0);
        ck_assert_uint_eq(len, 3);
        ck_assert_mem_eq(data, "a\0b", 4);
        free(data);
}
END_TEST

START_TEST(test_an_empty_file_reads_as_an_empty_string)
{
        char *data = NULL;
        size_t len = 99;

        write_file("", 0);
        ck_assert_int_eq(fileio_read(path, 16, &data, &len), 0);
        ck_assert_uint_eq(len, 0);
        ck_assert_str_eq(data, "");
        free(data);
}
END_TEST

START_TEST(test_a_file_of_exactly_max_bytes_is_read_and_one_more_is_efbig)
{
        char big[5000], *data = (char *) 1;
        size_t len = 0;

        memset(big, 'k', sizeof(big));
        write_file(big, sizeof(big));
        ck_assert_int_eq(fileio_read(path, sizeof(big), &data, &len), 0);
        ck_assert_uint_eq(len, sizeof(big));
        ck_assert_int_eq(memcmp(data, big, sizeof(big)), 0);
        free(data);

        data = (char *) 1;
        len = 7;
        ck_assert_int_eq(fileio_read(path, sizeof(big) - 1, &data, &len), -EFBIG);
        ck_assert_msg(data == (char *) 1 && len == 7, "out-parameters written on failure");
        ck_assert_int_eq(fileio_read(path, 0, &data, &len), -EFBIG);
}
END_TEST

START_TEST(test_the_length_is_optional)
{
        char *data = NULL;

        write_file("x", 1);
        ck_assert_int_eq(fileio_read(path, 1, &data, NULL), 0);
        ck_assert_str_eq(data, "x");
        free(data);
}
END_TEST

START_TEST(test_a_directory_is_eisdir)
{
        char *data = NULL;

        ck_assert_int_eq(fileio_read(dir, 1024, &data, NULL), -EISDIR);
        ck_assert_ptr_null(data);
}
END_TEST

START_TEST(test_a_device_is_refused_as_not_a_regular_file)
{
        char *data = NULL;

        ck_assert_int_eq(fileio_read("/dev/null", 1024, &data, NULL), -EBADFD);
        ck_assert_ptr_null(data);
}
END_TEST

/* Opening a FIFO for reading waits for a writer: a key file replaced by one froze the coordinator
 * on reload. Without a writer this would block for ever (and time the test out). */
START_TEST(test_a_fifo_is_refused_at_once_without_waiting_for_a_writer)
{
        char *data = NULL;

        ck_assert_int_eq(mkfifo(path, 0600), 0);
        ck_assert_int_eq(fileio_read(path, 1024, &data, NULL), -EBADFD);
        ck_assert_ptr_null(data);
        ck_assert_str_eq(fileio_kind(path), "a FIFO");
}
END_TEST

START_TEST(test_the_kind_of_a_refused_file_is_named)
{
        ck_assert_str_eq(fileio_kind("/dev/null"), "a character device");
        ck_assert_str_eq(fileio_kind(dir), "a directory");
        write_file("x", 1);
        ck_assert_str_eq(fileio_kind(path), "a regular file");
        unlink(path);
        ck_assert_str_eq(fileio_kind(path), "missing");
}
END_TEST

START_TEST(test_a_missing_or_unreadable_file_gives_the_errno_of_open)
{
        char *data = NULL;

        ck_assert_int_eq(fileio_read(path, 1024, &data, NULL), -ENOENT);
        write_file("x", 1);
        ck_assert_int_eq(chmod(path, 0), 0);
        /* root reads anything: the check means something only for other users. */
        if (geteuid() != 0)
                ck_assert_int_eq(fileio_read(path, 1024, &data, NULL), -EACCES);
        ck_assert_ptr_null(data);
}
END_TEST

START_TEST(test_bad_arguments_are_einval)
{
        char *data = NULL;

        ck_assert_int_eq(fileio_read(NULL, 16, &data, NULL), -EINVAL);
        ck_assert_int_eq(fileio_read(path, 16, NULL, NULL), -EINVAL);
        ck_assert_int_eq(fileio_read(path, (size_t) -1, &data, NULL), -EINVAL);
}
END_TEST

static Suite *fileio_suite(void) {
        Suite *s = suite_create("fileio");
        TCase *tc = tcase_create("fileio");

        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_a_file_is_read_whole_and_nul_terminated);
        tcase_add_test(tc, test_embedded_nul_bytes_are_kept_and_counted);
        tcase_add_test(tc, test_an_empty_file_reads_as_an_empty_string);
        tcase_add_test(tc, test_a_file_of_exactly_max_bytes_is_read_and_one_more_is_efbig);
        tcase_add_test(tc, test_the_length_is_optional);
        tcase_add_test(tc, test_a_directory_is_eisdir);
        tcase_add_test(tc, test_a_device_is_refused_as_not_a_regular_file);
        tcase_add_test(tc, test_a_fifo_is_refused_at_once_without_waiting_for_a_writer);
        tcase_add_test(tc, test_the_kind_of_a_refused_file_is_named);
        tcase_add_test(tc, test_a_missing_or_unreadable_file_gives_the_errno_of_open);
        tcase_add_test(tc, test_bad_arguments_are_einval);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(fileio_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
