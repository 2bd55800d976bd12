/* check_keyid.c — key ids and masked forms: stable, secret-free, and exactly as documented. */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "keypool/keyid.h"

#define FAKE_KEY "sk-or-v1-f83a7efake000000000000000000000000000000000000000008a7"

static void expected_id(const char *secret, size_t len, char out[KEYID_ID_LEN + 1]) {
        unsigned char md[SHA256_DIGEST_LENGTH];

        SHA256((const unsigned char *) secret, len, md);
        snprintf(out, KEYID_ID_LEN + 1, "kp-%02x%02x%02x%02x%02x", md[0], md[1], md[2], md[3], md[4]);
}

START_TEST(test_id_is_kp_and_first_ten_hex_digits_of_sha256_known_vectors)
{
        char id[KEYID_ID_LEN + 1];

        /* SHA-256("abc") = ba7816bf8f01cfea…, SHA-256("") = e3b0c44298fc1c14… */
        ck_assert_int_eq(keyid_fingerprint("abc", 3, id), 0);
        ck_assert_str_eq(id, "kp-ba7816bf8f");
        ck_assert_int_eq(keyid_fingerprint("", 0, id), 0);
        ck_assert_str_eq(id, "kp-e3b0c44298");
}
END_TEST

START_TEST(test_id_matches_libcrypto_sha256_of_the_secret)
{
        char id[KEYID_ID_LEN + 1], want[KEYID_ID_LEN + 1];

        expected_id(FAKE_KEY, strlen(FAKE_KEY), want);
        ck_assert_int_eq(keyid_fingerprint(FAKE_KEY, strlen(FAKE_KEY), id), 0);
        ck_assert_str_eq(id, want);
        ck_assert_uint_eq(strlen(id), KEYID_ID_LEN);
        for (size_t i = 3; i < KEYID_ID_LEN; i++)
                ck_assert_msg(strchr("0123456789abcdef", id[i]), "id %s has a non-lowercase-hex digit", id);
}
END_TEST

START_TEST(test_id_is_stable_and_covers_only_the_given_length)
{
        char a[KEYID_ID_LEN + 1], b[KEYID_ID_LEN + 1], c[KEYID_ID_LEN + 1];

        ck_assert_int_eq(keyid_fingerprint(FAKE_KEY, strlen(FAKE_KEY), a), 0);
        ck_assert_int_eq(keyid_fingerprint(FAKE_KEY, strlen(FAKE_KEY), b), 0);
        ck_assert_str_eq(a, b);

        /* "abc" followed by junk, hashed over 3 bytes, is "abc". */
        ck_assert_int_eq(keyid_fingerprint("abcdef", 3, c), 0);
        ck_assert_str_eq(c, "kp-ba7816bf8f");
}
END_TEST

START_TEST(test_different_secrets_get_different_ids)
{
        char a[KEYID_ID_LEN + 1], b[KEYID_ID_LEN + 1];

        ck_assert_int_eq(keyid_fingerprint("sk-test-fake-1", 14, a), 0);
        ck_assert_int_eq(keyid_fingerprint("sk-test-fake-2", 14, b), 0);
        ck_assert_str_ne(a, b);
}
END_TEST

START_TEST(test_null_secret_with_a_length_is_rejected)
{
        char id[KEYID_ID_LEN + 1] = "untouched";

        ck_assert_int_eq(keyid_fingerprint(NULL, 5, id), -EINVAL);
        ck_assert_str_eq(id, "untouched");
        ck_assert_int_eq(keyid_fingerprint(NULL, 0, id), 0);
        ck_assert_str_eq(id, "kp-e3b0c44298");
}
END_TEST

START_TEST(test_long_key_is_masked_as_first_15_dots_and_last_3)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask(FAKE_KEY, strlen(FAKE_KEY), m);
        ck_assert_str_eq(m, "sk-or-v1-f83a7e...8a7");
        ck_assert_uint_eq(strlen(m), KEYID_MASK_MAX);
}
END_TEST

START_TEST(test_key_of_24_characters_already_shows_its_head)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask("abcdefghijklmnopqrstuvwx", 24, m);
        ck_assert_str_eq(m, "abcdefghijklmno...vwx");
        keyid_mask("abcdefghijklmnopqrstuvw", 23, m);
        ck_assert_str_eq(m, "...uvw");
}
END_TEST

START_TEST(test_short_key_shows_only_its_last_3)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask("test-key-1", 10, m);
        ck_assert_str_eq(m, "...y-1");
        keyid_mask("fake1234", 8, m);
        ck_assert_str_eq(m, "...234");
}
END_TEST

START_TEST(test_very_short_key_shows_nothing_of_itself)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask("fake123", 7, m);
        ck_assert_str_eq(m, "...");
        keyid_mask("ab", 2, m);
        ck_assert_str_eq(m, "...");
        keyid_mask("", 0, m);
        ck_assert_str_eq(m, "...");
        keyid_mask(NULL, 0, m);
        ck_assert_str_eq(m, "...");
}
END_TEST

START_TEST(test_mask_uses_only_the_given_length)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask(FAKE_KEY "TAIL", strlen(FAKE_KEY), m);
        ck_assert_str_eq(m, "sk-or-v1-f83a7e...8a7");
}
END_TEST

START_TEST(test_mask_shows_bytes_that_are_not_printable_ascii_as_question_marks)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask("fake-key\t\xc3\xa9", 11, m);
        ck_assert_str_eq(m, "...???");
}
END_TEST

START_TEST(test_mask_never_exceeds_its_buffer)
{
        char secret[101], m[KEYID_MASK_MAX + 2];

        memset(secret, 'f', sizeof(secret) - 1);
        secret[100] = '\0';
        for (size_t len = 0; len <= 100; len++) {
                m[KEYID_MASK_MAX + 1] = 'X';
                keyid_mask(secret, len, m);
                ck_assert_uint_le(strlen(m), KEYID_MASK_MAX);
                ck_assert_int_eq(m[KEYID_MASK_MAX + 1], 'X');
        }
}
END_TEST

START_TEST(test_sha256_hex_is_the_full_digest_in_lowercase) {
        char hex[65];

        ck_assert_int_eq(keyid_sha256_hex("abc", 3, hex), 0);
        ck_assert_str_eq(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        ck_assert_int_eq(keyid_sha256_hex("", 0, hex), 0);
        ck_assert_str_eq(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}
END_TEST

static Suite *keyid_suite(void) {
        Suite *s = suite_create("keyid");
        TCase *tc = tcase_create("keyid");

        tcase_add_test(tc, test_id_is_kp_and_first_ten_hex_digits_of_sha256_known_vectors);
        tcase_add_test(tc, test_sha256_hex_is_the_full_digest_in_lowercase);
        tcase_add_test(tc, test_id_matches_libcrypto_sha256_of_the_secret);
        tcase_add_test(tc, test_id_is_stable_and_covers_only_the_given_length);
        tcase_add_test(tc, test_different_secrets_get_different_ids);
        tcase_add_test(tc, test_null_secret_with_a_length_is_rejected);
        tcase_add_test(tc, test_long_key_is_masked_as_first_15_dots_and_last_3);
        tcase_add_test(tc, test_key_of_24_characters_already_shows_its_head);
        tcase_add_test(tc, test_short_key_shows_only_its_last_3);
        tcase_add_test(tc, test_very_short_key_shows_nothing_of_itself);
        tcase_add_test(tc, test_mask_uses_only_the_given_length);
        tcase_add_test(tc, test_mask_shows_bytes_that_are_not_printable_ascii_as_question_marks);
        tcase_add_test(tc, test_mask_never_exceeds_its_buffer);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(keyid_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
