/* check_scrub.c — no configured secret, and nothing shaped like a credential, survives scrubbing. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/scrub.h"

/* Obviously fake keys in the shapes pattern-only redaction missed: letters and dots, letters
 * only, 40 lowercase letters. */
#define DOTTED   "fake.letters.and.dots.only.key"
#define LETTERS  "FakeKeyMadeOfLettersOnlyNoDigits"
#define LOWER40  "fakeabcdefghijklmnopqrstuvwxyzabcdefghij"

static struct scrub *scrubber(const char *const *secrets, size_t n) {
        struct scrub *s;

        ck_assert_int_eq(scrub_new(&s), 0);
        for (size_t i = 0; i < n; i++)
                ck_assert_int_eq(scrub_add(s, secrets[i], strlen(secrets[i])), 0);
        ck_assert_int_eq(scrub_seal(s), 0);
        return s;
}

/* Scrubs a copy of text with fn and returns it NUL-terminated (the caller frees). */
static char *scrubbed(size_t (*fn)(const struct scrub *, char *, size_t), const struct scrub *s,
                      const char *text) {
        size_t len = strlen(text);
        char *buf = malloc(len + 1);

        ck_assert_ptr_nonnull(buf);
        memcpy(buf, text, len);
        len = fn(s, buf, len);
        ck_assert_uint_le(len, strlen(text));
        buf[len] = 0;
        return buf;
}

START_TEST(test_configured_secrets_of_any_alphabet_are_hidden_where_an_upstream_echoes_them) {
        static const char *const secrets[] = { DOTTED, LETTERS, LOWER40 };
        struct scrub *s = scrubber(secrets, 3);
        char *out;

        out = scrubbed(scrub_secrets, s,
                       "{\"error\":{\"message\":\"bad header Authorization: Bearer " DOTTED "\"}}");
        ck_assert_str_eq(out, "{\"error\":{\"message\":\"bad header Authorization: Bearer [redacted]\"}}");
        free(out);
        out = scrubbed(scrub_secrets, s, LETTERS "|" LOWER40 "x" DOTTED);
        ck_assert_str_eq(out, "[redacted]|[redacted]x[redacted]");
        free(out);
        scrub_free(s);
}
END_TEST

START_TEST(test_scrub_secrets_leaves_other_text_alone) {
        static const char *const secrets[] = { LOWER40 };
        struct scrub *s = scrubber(secrets, 1);
        static const char text[] = "{\"error\":{\"message\":\"model sk-or-v1-looking-thing not found\"}}";
        char *out = scrubbed(scrub_secrets, s, text);

        ck_assert_str_eq(out, text);
        free(out);
        out = scrubbed(scrub_secrets, NULL, text);
        ck_assert_str_eq(out, text);
        free(out);
        scrub_free(s);
}
END_TEST

START_TEST(test_many_secrets_sharing_a_prefix_are_each_found) {
        char secrets[300][64];
        const char *ptrs[300];
        struct scrub *s;
        char *out;

        for (int i = 0; i < 300; i++) {
                snprintf(secrets[i], sizeof secrets[i], "sk-or-v1-fake-%040d", i * 7919);
                ptrs[i] = secrets[i];
        }
        s = scrubber(ptrs, 300);
        for (int i = 0; i < 300; i += 37) {
                char text[128];

                snprintf(text, sizeof text, "key=%.63s;", secrets[i]);
                out = scrubbed(scrub_secrets, s, text);
                ck_assert_msg(strcmp(out, "key=[redacted];") == 0, "secret %d: %s", i, out);
                free(out);
        }
        scrub_free(s);
}
END_TEST

START_TEST(test_short_secrets_and_overlapping_ones_are_hidden_without_growing_the_text) {
        static const char *const secrets[] = { "f4k3", "f4k3f4k3zz", "abc" };
        struct scrub *s = scrubber(secrets, 3);
        char *out = scrubbed(scrub_secrets, s, "x f4k3 y f4k3f4k3zz abc");

        /* "abc" is below SCRUB_MIN_SECRET: an ordinary word, not looked for. */
        ck_assert_str_eq(out, "x **** y [redacted] abc");
        free(out);
        scrub_free(s);
}
END_TEST

struct shape_case {
        const char *in, *want;
};

/* scrub_text with no configured secret: what the shapes alone hide. */
static void check_shapes(const struct shape_case *cases, size_t n) {
        for (size_t i = 0; i < n; i++) {
                char *out = scrubbed(scrub_text, NULL, cases[i].in);

                ck_assert_msg(strcmp(out, cases[i].want) == 0, "%s -> %s, want %s", cases[i].in, out,
                              cases[i].want);
                free(out);
        }
}

START_TEST(test_bearer_and_auth_header_values_are_hidden_whatever_their_shape) {
        static const struct shape_case cases[] = {
                { "got Bearer abc.def", "got Bearer *******" },
                { "Authorization: Bearer zzzzzzzzzzzzzz", "Authorization: Bearer [redacted]" },
                { "{\"authorization\":\"Bearer onlyletters\"}", "{\"authorization\":\"Bearer [redacted]\"}" },
                { "x-api-key: some.fake.key rejected", "x-api-key: [redacted] rejected" },
                { "X-Goog-Api-Key=fakefake&x=1", "X-Goog-Api-Key=[redacted]" },
                { "the authorization header is missing", "the authorization header is missing" },
        };

        check_shapes(cases, sizeof cases / sizeof cases[0]);
}
END_TEST

START_TEST(test_provider_key_families_are_hidden_whatever_their_alphabet_or_length) {
        static const struct shape_case cases[] = {
                { "key sk-abc is bad", "key ****** is bad" },
                { "key sk-or-v1-xy.z is bad", "key [redacted] is bad" },
                { "sk-ant-api03-aa", "[redacted]" },
                { "AIzaFAKE", "********" },
                { "(gsk_onlyletters)", "([redacted])" },
                { "a task-force of 3", "a task-force of 3" },
                { "token abcdefghij0123456789abcdefXYZ end", "token [redacted] end" },
                { "word " LOWER40 " end", "word [redacted] end" },
                { "model claude-sonnet not found", "model claude-sonnet not found" },
        };

        check_shapes(cases, sizeof cases / sizeof cases[0]);
}
END_TEST

START_TEST(test_a_secret_at_the_very_end_or_start_of_the_text_is_found) {
        static const char *const secrets[] = { LETTERS };
        struct scrub *s = scrubber(secrets, 1);
        char *out = scrubbed(scrub_secrets, s, LETTERS);

        ck_assert_str_eq(out, "[redacted]");
        free(out);
        out = scrubbed(scrub_secrets, s, "FakeKeyMadeOfLettersOnlyNoDigit");    /* one short */
        ck_assert_str_eq(out, "FakeKeyMadeOfLettersOnlyNoDigit");
        free(out);
        scrub_free(s);
}
END_TEST

static Suite *scrub_suite(void) {
        Suite *s = suite_create("scrub");
        TCase *tc = tcase_create("core");

        tcase_add_test(tc, test_configured_secrets_of_any_alphabet_are_hidden_where_an_upstream_echoes_them);
        tcase_add_test(tc, test_scrub_secrets_leaves_other_text_alone);
        tcase_add_test(tc, test_many_secrets_sharing_a_prefix_are_each_found);
        tcase_add_test(tc, test_short_secrets_and_overlapping_ones_are_hidden_without_growing_the_text);
        tcase_add_test(tc, test_bearer_and_auth_header_values_are_hidden_whatever_their_shape);
        tcase_add_test(tc, test_provider_key_families_are_hidden_whatever_their_alphabet_or_length);
        tcase_add_test(tc, test_a_secret_at_the_very_end_or_start_of_the_text_is_found);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(scrub_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
