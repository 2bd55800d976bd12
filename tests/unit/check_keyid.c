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

static void id_of(const char *secret, char out[KEYID_ID_LEN + 1]) {
        ck_assert_int_eq(keyid_fingerprint(secret, strlen(secret), out), 0);
}

START_TEST(test_long_key_shows_its_provider_prefix_and_last_4)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask(FAKE_KEY, strlen(FAKE_KEY), m);
        ck_assert_str_eq(m, "sk-or-v1-...08a7");
}
END_TEST

START_TEST(test_key_of_24_characters_shows_only_its_id)
{
        char m[KEYID_MASK_MAX + 1], id[KEYID_ID_LEN + 1];

        /* The old form showed 18 of these 24 characters: the 6 left are found from the id in
         * seconds. */
        id_of("abcdefghijklmnopqrstuvwx", id);
        keyid_mask("abcdefghijklmnopqrstuvwx", 24, m);
        ck_assert_str_eq(m, id);
}
END_TEST

START_TEST(test_mask_always_hides_three_quarters_and_24_characters_after_the_prefix)
{
        char secret[121], m[KEYID_MASK_MAX + 1];

        for (size_t len = 0; len <= 120; len++) {
                for (size_t i = 0; i < len; i++)
                        secret[i] = (char) ('a' + (i * 7) % 26);
                secret[len] = 0;
                keyid_mask(secret, len, m);
                if (strncmp(m, "kp-", 3) == 0)
                        continue;       /* only the id */
                ck_assert_msg(strncmp(m, "...", 3) == 0, "len %zu: %s", len, m);
                size_t shown = strlen(m) - 3;

                ck_assert_msg(shown <= 4 && shown * 4 <= len && len - shown >= 24, "len %zu shows %zu", len, shown);
        }
}
END_TEST

START_TEST(test_short_keys_show_only_their_id)
{
        static const char *const keys[] = { "test-key-1", "fake1234", "sk-or-v1-fake-short-0123456789",
                                            "AIzaFAKEFAKEFAKEFAKEFAKEFAKE" };
        char m[KEYID_MASK_MAX + 1], id[KEYID_ID_LEN + 1];

        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
                id_of(keys[i], id);
                keyid_mask(keys[i], strlen(keys[i]), m);
                ck_assert_str_eq(m, id);
        }
        keyid_mask(NULL, 0, m);
        id_of("", id);
        ck_assert_str_eq(m, id);
}
END_TEST

START_TEST(test_letters_only_and_dotted_keys_are_masked_like_any_other)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask("fakeabcdefghijklmnopqrstuvwxyzabcdefghij", 40, m);
        ck_assert_str_eq(m, "...ghij");
        keyid_mask("fake.letters.and.dots.only.key", 30, m);
        ck_assert_str_eq(m, "....key");
}
END_TEST

START_TEST(test_mask_uses_only_the_given_length)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask(FAKE_KEY "TAIL", strlen(FAKE_KEY), m);
        ck_assert_str_eq(m, "sk-or-v1-...08a7");
}
END_TEST

START_TEST(test_mask_shows_bytes_that_are_not_printable_ascii_as_question_marks)
{
        char m[KEYID_MASK_MAX + 1];

        keyid_mask("fake-key-fake-key-fake-key-fake-key\t\xc3\xa9", 38, m);
        ck_assert_str_eq(m, "...y???");
}
END_TEST

START_TEST(test_mask_never_exceeds_its_buffer)
{
        char secret[101], m[KEYID_MASK_MAX + 2];

        memcpy(secret, "sk-ant-api03-", 13);
        memset(secret + 13, 'f', sizeof(secret) - 14);
        secret[100] = '\0';
        for (size_t len = 0; len <= 100; len++) {
                m[KEYID_MASK_MAX + 1] = 'X';
                keyid_mask(secret, len, m);
                ck_assert_uint_le(strlen(m), KEYID_MASK_MAX);
                ck_assert_int_eq(m[KEYID_MASK_MAX + 1], 'X');
        }
}
END_TEST

START_TEST(test_weak_keys_are_named_and_strong_ones_are_not)
{
        ck_assert_ptr_nonnull(keyid_weak("sk-or-v1-short", 14));
        ck_assert_ptr_nonnull(keyid_weak("sk-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 35));
        ck_assert_ptr_nonnull(keyid_weak("12345678901234567890123", 23));
        ck_assert_ptr_nonnull(keyid_weak(NULL, 0));
        ck_assert_ptr_null(keyid_weak(FAKE_KEY, strlen(FAKE_KEY)));
        ck_assert_ptr_null(keyid_weak("fakeabcdefghijklmnopqrstuvwxyzabcdefghij", 40));
}
END_TEST

START_TEST(test_provider_prefixes_are_recognised)
{
        ck_assert_uint_eq(keyid_prefix_len("sk-or-v1-abc", 12), 9);
        ck_assert_uint_eq(keyid_prefix_len("sk-ant-api03-abc", 16), 13);
        ck_assert_uint_eq(keyid_prefix_len("sk-abc", 6), 3);
        ck_assert_uint_eq(keyid_prefix_len("AIzaXYZ", 7), 4);
        ck_assert_uint_eq(keyid_prefix_len("gsk_x", 5), 4);
        ck_assert_uint_eq(keyid_prefix_len("sk", 2), 0);
        ck_assert_uint_eq(keyid_prefix_len("task-force", 10), 0);
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
        tcase_add_test(tc, test_long_key_shows_its_provider_prefix_and_last_4);
        tcase_add_test(tc, test_key_of_24_characters_shows_only_its_id);
        tcase_add_test(tc, test_mask_always_hides_three_quarters_and_24_characters_after_the_prefix);
        tcase_add_test(tc, test_short_keys_show_only_their_id);
        tcase_add_test(tc, test_letters_only_and_dotted_keys_are_masked_like_any_other);
        tcase_add_test(tc, test_mask_uses_only_the_given_length);
        tcase_add_test(tc, test_mask_shows_bytes_that_are_not_printable_ascii_as_question_marks);
        tcase_add_test(tc, test_mask_never_exceeds_its_buffer);
        tcase_add_test(tc, test_weak_keys_are_named_and_strong_ones_are_not);
        tcase_add_test(tc, test_provider_prefixes_are_recognised);
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
