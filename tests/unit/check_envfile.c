/* check_envfile.c — orche.env is read the way a shell would read it, or rejected with a line. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keypool/envfile.h"

static struct envfile parse_ok(const char *text) {
        struct envfile e = {};
        unsigned line = 0;
        int r = envfile_parse(text, strlen(text), &e, &line);

        ck_assert_msg(r == 0, "parse failed (%d) at line %u for:\n%s", r, line, text);
        return e;
}

static unsigned parse_error_line(const char *text) {
        struct envfile e = { .n = 12345 };
        unsigned line = 0;
        int r = envfile_parse(text, strlen(text), &e, &line);

        ck_assert_msg(r == -EINVAL, "expected a syntax error (got %d) for:\n%s", r, text);
        ck_assert_msg(e.n == 12345 && !e.entries, "ret was written on failure");
        return line;
}

static const struct envfile_entry *entry(const struct envfile *e, const char *name) {
        for (size_t i = 0; i < e->n; i++)
                if (strcmp(e->entries[i].name, name) == 0)
                        return &e->entries[i];
        ck_abort_msg("no entry %s", name);
        return NULL;
}

START_TEST(test_deployed_orche_env_lines_parse)
{
        struct envfile e = parse_ok(
                "# keys for GLM 4.5\n"
                "PROVIDER_GLM45_API_KEY=sk-or-v1-fake0001\n"
                "PROVIDER_GLM45_BACKUP_KEYS=\"sk-or-v1-fake0002,sk-or-v1-fake0003\"\n"
                "export PROVIDER_GLM45_MODEL='z-ai/glm-4.5'\n");

        ck_assert_uint_eq(e.n, 3);
        ck_assert_str_eq(envfile_get(&e, "PROVIDER_GLM45_API_KEY"), "sk-or-v1-fake0001");
        ck_assert_str_eq(envfile_get(&e, "PROVIDER_GLM45_BACKUP_KEYS"), "sk-or-v1-fake0002,sk-or-v1-fake0003");
        ck_assert_str_eq(envfile_get(&e, "PROVIDER_GLM45_MODEL"), "z-ai/glm-4.5");
        ck_assert_uint_eq(entry(&e, "PROVIDER_GLM45_API_KEY")->line, 2);
        ck_assert_uint_eq(entry(&e, "PROVIDER_GLM45_MODEL")->line, 4);
        ck_assert_str_eq(e.entries[0].name, "PROVIDER_GLM45_API_KEY");
        ck_assert_str_eq(e.entries[2].name, "PROVIDER_GLM45_MODEL");
        envfile_free(&e);
        ck_assert_uint_eq(e.n, 0);
        ck_assert_ptr_null(e.entries);
}
END_TEST

START_TEST(test_comments_and_blank_lines_are_skipped_and_lines_still_counted)
{
        struct envfile e = parse_ok("\n   \n# a comment\n\t# indented comment\n  A=1\n\n#B=2\nC=3");

        ck_assert_uint_eq(e.n, 2);
        ck_assert_uint_eq(entry(&e, "A")->line, 5);
        ck_assert_uint_eq(entry(&e, "C")->line, 8);
        ck_assert_ptr_null(envfile_get(&e, "B"));
        envfile_free(&e);
}
END_TEST

START_TEST(test_export_prefix_is_accepted_and_export_alone_assigns_nothing)
{
        struct envfile e = parse_ok("export A=1\nexport\t  B=two\nexport C D # mark only\nexport=x\n");

        ck_assert_uint_eq(e.n, 3);
        ck_assert_str_eq(envfile_get(&e, "A"), "1");
        ck_assert_str_eq(envfile_get(&e, "B"), "two");
        ck_assert_str_eq(envfile_get(&e, "export"), "x");
        ck_assert_ptr_null(envfile_get(&e, "C"));
        envfile_free(&e);
}
END_TEST

START_TEST(test_single_quotes_are_literal)
{
        struct envfile e = parse_ok("A='a \\n $HOME \"x\" # not a comment \\'\n");

        ck_assert_str_eq(envfile_get(&e, "A"), "a \\n $HOME \"x\" # not a comment \\");
        envfile_free(&e);
}
END_TEST

START_TEST(test_double_quotes_honour_the_documented_escapes)
{
        struct envfile e = parse_ok("A=\"q\\\" b\\\\ d\\$ t\\` n\\n other\\x\"\n"
                                    "B=\"# kept\" # dropped\n"
                                    "C=\"$HOME\"\n");

        ck_assert_str_eq(envfile_get(&e, "A"), "q\" b\\ d$ t` n\n other\\x");
        ck_assert_str_eq(envfile_get(&e, "B"), "# kept");
        ck_assert_str_eq(envfile_get(&e, "C"), "$HOME");
        envfile_free(&e);
}
END_TEST

START_TEST(test_double_quoted_value_may_span_lines_and_continue_them)
{
        struct envfile e = parse_ok("A=\"one\ntwo\"\nB=\"x\\\ny\"\nC=3\n");

        ck_assert_str_eq(envfile_get(&e, "A"), "one\ntwo");
        ck_assert_str_eq(envfile_get(&e, "B"), "xy");
        ck_assert_uint_eq(entry(&e, "B")->line, 3);
        ck_assert_uint_eq(entry(&e, "C")->line, 5);
        envfile_free(&e);
}
END_TEST

START_TEST(test_unquoted_values_drop_trailing_comments_and_honour_backslashes)
{
        struct envfile e = parse_ok("A=value # comment\nB=a#b\nC=x\\ y\\#z\nD=\nE= # empty\nF=$HOME\n"
                                    "G=long\\\nline\n");

        ck_assert_str_eq(envfile_get(&e, "A"), "value");
        ck_assert_str_eq(envfile_get(&e, "B"), "a#b");
        ck_assert_str_eq(envfile_get(&e, "C"), "x y#z");
        ck_assert_str_eq(envfile_get(&e, "D"), "");
        ck_assert_str_eq(envfile_get(&e, "E"), "");
        ck_assert_str_eq(envfile_get(&e, "F"), "$HOME");
        ck_assert_str_eq(envfile_get(&e, "G"), "longline");
        envfile_free(&e);
}
END_TEST

START_TEST(test_quoted_and_unquoted_pieces_join_into_one_word)
{
        struct envfile e = parse_ok("A=\"a b\"'c d'e\\ f\n");

        ck_assert_str_eq(envfile_get(&e, "A"), "a bc de f");
        envfile_free(&e);
}
END_TEST

START_TEST(test_crlf_line_ends_are_tolerated)
{
        struct envfile e = parse_ok("# windows\r\nA=1\r\nB=\"two\"\r\nexport C='three'  # c\r\nD=\"x\r\ny\"\r\nE=5\r");

        ck_assert_str_eq(envfile_get(&e, "A"), "1");
        ck_assert_str_eq(envfile_get(&e, "B"), "two");
        ck_assert_str_eq(envfile_get(&e, "C"), "three");
        ck_assert_str_eq(envfile_get(&e, "D"), "x\ny");
        ck_assert_str_eq(envfile_get(&e, "E"), "5");
        ck_assert_uint_eq(entry(&e, "E")->line, 7);
        envfile_free(&e);
}
END_TEST

START_TEST(test_a_later_assignment_replaces_an_earlier_one)
{
        struct envfile e = parse_ok("A=first\nB=b\nA=second\n");

        ck_assert_uint_eq(e.n, 2);
        ck_assert_str_eq(envfile_get(&e, "A"), "second");
        ck_assert_uint_eq(entry(&e, "A")->line, 3);
        ck_assert_str_eq(e.entries[0].name, "A");
        envfile_free(&e);
}
END_TEST

START_TEST(test_utf8_bom_is_ignored)
{
        struct envfile e = parse_ok("\xef\xbb\xbf" "A=1\n");

        ck_assert_str_eq(envfile_get(&e, "A"), "1");
        envfile_free(&e);
}
END_TEST

START_TEST(test_empty_text_gives_no_entries)
{
        struct envfile e = parse_ok("");

        ck_assert_uint_eq(e.n, 0);
        ck_assert_ptr_null(envfile_get(&e, "A"));
        envfile_free(&e);
        ck_assert_ptr_null(envfile_get(NULL, "A"));
}
END_TEST

START_TEST(test_unterminated_quote_is_reported_at_the_line_it_opens)
{
        ck_assert_uint_eq(parse_error_line("A=1\nB=2\nC=\"open\nD=4\nE=5\n"), 3);
        ck_assert_uint_eq(parse_error_line("A=1\r\nB='open\r\n"), 2);
        ck_assert_uint_eq(parse_error_line("A=\"ends in backslash\\"), 1);
}
END_TEST

START_TEST(test_lines_that_are_not_assignments_are_rejected_with_their_line)
{
        ck_assert_uint_eq(parse_error_line("# ok\nA=1\nJUSTANAME\n"), 3);
        ck_assert_uint_eq(parse_error_line("A=1\nB =2\n"), 2);
        ck_assert_uint_eq(parse_error_line("A=1\n\nB= value\n"), 3);
        ck_assert_uint_eq(parse_error_line("1A=x\n"), 1);
        ck_assert_uint_eq(parse_error_line("A-B=x\n"), 1);
        ck_assert_uint_eq(parse_error_line("A=x y\n"), 1);
        ck_assert_uint_eq(parse_error_line("A=1\nB=x;rm -rf /\n"), 2);
        ck_assert_uint_eq(parse_error_line("A=$(cat key)\n"), 1);
        ck_assert_uint_eq(parse_error_line("A=1\nexport 9X\n"), 2);
        ck_assert_uint_eq(parse_error_line("A=\"x\"trailing\"\n"), 1);
}
END_TEST

START_TEST(test_nul_byte_is_a_syntax_error)
{
        static const char text[] = "A=1\nB=x\0y\n";
        struct envfile e = {};
        unsigned line = 0;

        ck_assert_int_eq(envfile_parse(text, sizeof(text) - 1, &e, &line), -EINVAL);
        ck_assert_uint_eq(line, 2);
}
END_TEST

START_TEST(test_load_reads_a_file_and_reports_missing_ones)
{
        char dir[] = "/tmp/check_envfile.XXXXXX", path[256];
        struct envfile e = {};
        unsigned line = 0;
        FILE *f;

        ck_assert_ptr_nonnull(mkdtemp(dir));
        snprintf(path, sizeof(path), "%s/orche.env", dir);
        f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        fputs("export PROVIDER_X_API_KEY=\"sk-test-fake-1\"\nPROVIDER_X_MODEL=m\n", f);
        fclose(f);

        ck_assert_int_eq(envfile_load(path, &e, &line), 0);
        ck_assert_str_eq(envfile_get(&e, "PROVIDER_X_API_KEY"), "sk-test-fake-1");
        ck_assert_str_eq(envfile_get(&e, "PROVIDER_X_MODEL"), "m");
        envfile_free(&e);

        f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        fputs("A=1\nB='x\n", f);
        fclose(f);
        ck_assert_int_eq(envfile_load(path, &e, &line), -EINVAL);
        ck_assert_uint_eq(line, 2);

        ck_assert_int_eq(envfile_load(dir, &e, &line), -EISDIR);
        unlink(path);
        ck_assert_int_eq(envfile_load(path, &e, &line), -ENOENT);
        ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST


/* --- ${VAR} expansion, as python-dotenv and the shell do it ----------------------------------- */

static int parse_status(const char *text, unsigned *ret_line) {
        struct envfile e = { .n = 12345 };
        int r = envfile_parse(text, strlen(text), &e, ret_line);

        if (r == 0)
                envfile_free(&e);
        else
                ck_assert_msg(e.n == 12345 && !e.entries, "ret was written on failure");
        return r;
}

START_TEST(test_braced_references_expand_from_earlier_lines_in_unquoted_and_double_quoted_values)
{
        struct envfile e = parse_ok("BASE=https://openrouter.ai\n"
                                    "PROVIDER_X_BASE_URL=${BASE}/api/v1\n"
                                    "PROVIDER_Y_BASE_URL=\"${BASE}/api/v2 ${BASE}\"\n"
                                    "KEY=sk-test-fake-1\n"
                                    "PROVIDER_X_API_KEY=$KEY\n"
                                    "PROVIDER_Y_API_KEY=pre${KEY}post\n");

        ck_assert_str_eq(envfile_get(&e, "PROVIDER_X_BASE_URL"), "https://openrouter.ai/api/v1");
        ck_assert_str_eq(envfile_get(&e, "PROVIDER_Y_BASE_URL"),
                         "https://openrouter.ai/api/v2 https://openrouter.ai");
        ck_assert_str_eq(envfile_get(&e, "PROVIDER_X_API_KEY"), "$KEY");
        ck_assert_str_eq(envfile_get(&e, "PROVIDER_Y_API_KEY"), "presk-test-fake-1post");
        envfile_free(&e);
}
END_TEST

START_TEST(test_single_quoted_and_escaped_references_stay_literal)
{
        struct envfile e = parse_ok("A=1\nB='${A}'\nC=\"\\${A}\"\nD=\\${A}\n");

        ck_assert_str_eq(envfile_get(&e, "B"), "${A}");
        ck_assert_str_eq(envfile_get(&e, "C"), "${A}");
        ck_assert_str_eq(envfile_get(&e, "D"), "${A}");
        envfile_free(&e);
}
END_TEST

START_TEST(test_references_fall_back_to_the_environment_and_the_file_comes_first)
{
        struct envfile e;

        setenv("KEYPOOL_TEST_FROM_ENV", "from-env", 1);
        setenv("KEYPOOL_TEST_BOTH", "env-value", 1);
        e = parse_ok("A=${KEYPOOL_TEST_FROM_ENV}\nKEYPOOL_TEST_BOTH=file-value\nB=${KEYPOOL_TEST_BOTH}\n");
        ck_assert_str_eq(envfile_get(&e, "A"), "from-env");
        ck_assert_str_eq(envfile_get(&e, "B"), "file-value");
        envfile_free(&e);
        unsetenv("KEYPOOL_TEST_FROM_ENV");
        unsetenv("KEYPOOL_TEST_BOTH");
}
END_TEST

START_TEST(test_a_default_applies_when_the_variable_is_unset_or_empty)
{
        struct envfile e;

        unsetenv("KEYPOOL_TEST_UNSET");
        e = parse_ok("EMPTY=\nSET=x\n"
                     "A=${KEYPOOL_TEST_UNSET:-https://default/v1}\n"
                     "B=\"${EMPTY:-fallback value}\"\n"
                     "C=${SET:-unused}\n"
                     "D=${KEYPOOL_TEST_UNSET:-}\n"
                     "E=${KEYPOOL_TEST_UNSET:-a b}\n");
        ck_assert_str_eq(envfile_get(&e, "A"), "https://default/v1");
        ck_assert_str_eq(envfile_get(&e, "B"), "fallback value");
        ck_assert_str_eq(envfile_get(&e, "C"), "x");
        ck_assert_str_eq(envfile_get(&e, "D"), "");
        ck_assert_str_eq(envfile_get(&e, "E"), "a b");
        envfile_free(&e);
}
END_TEST

START_TEST(test_an_unresolved_reference_is_an_error_at_its_line)
{
        unsigned line = 0;

        unsetenv("KEYPOOL_TEST_UNSET");
        ck_assert_int_eq(parse_status("A=1\n\nB=${KEYPOOL_TEST_UNSET}\n", &line), -ENOKEY);
        ck_assert_uint_eq(line, 3);
        line = 0;
        ck_assert_int_eq(parse_status("A=\"x\ny ${KEYPOOL_TEST_UNSET}\"\n", &line), -ENOKEY);
        ck_assert_uint_eq(line, 2);
        /* Later lines do not count: the file reads top to bottom, as a shell reads it. */
        line = 0;
        ck_assert_int_eq(parse_status("A=${LATER_IN_THE_FILE}\nLATER_IN_THE_FILE=1\n", &line), -ENOKEY);
        ck_assert_uint_eq(line, 1);
}
END_TEST

START_TEST(test_a_malformed_reference_is_a_syntax_error_at_its_line)
{
        ck_assert_uint_eq(parse_error_line("A=1\nB=${A\n"), 2);
        ck_assert_uint_eq(parse_error_line("B=${}\n"), 1);
        ck_assert_uint_eq(parse_error_line("B=${1A}\n"), 1);
        ck_assert_uint_eq(parse_error_line("A=1\nB=${A:=x}\n"), 2);
        ck_assert_uint_eq(parse_error_line("A=1\nB=\"${A:-x\"\n"), 2);
}
END_TEST

static Suite *envfile_suite(void) {
        Suite *s = suite_create("envfile");
        TCase *tc = tcase_create("envfile");

        tcase_add_test(tc, test_deployed_orche_env_lines_parse);
        tcase_add_test(tc, test_comments_and_blank_lines_are_skipped_and_lines_still_counted);
        tcase_add_test(tc, test_export_prefix_is_accepted_and_export_alone_assigns_nothing);
        tcase_add_test(tc, test_single_quotes_are_literal);
        tcase_add_test(tc, test_double_quotes_honour_the_documented_escapes);
        tcase_add_test(tc, test_double_quoted_value_may_span_lines_and_continue_them);
        tcase_add_test(tc, test_unquoted_values_drop_trailing_comments_and_honour_backslashes);
        tcase_add_test(tc, test_quoted_and_unquoted_pieces_join_into_one_word);
        tcase_add_test(tc, test_crlf_line_ends_are_tolerated);
        tcase_add_test(tc, test_a_later_assignment_replaces_an_earlier_one);
        tcase_add_test(tc, test_utf8_bom_is_ignored);
        tcase_add_test(tc, test_empty_text_gives_no_entries);
        tcase_add_test(tc, test_unterminated_quote_is_reported_at_the_line_it_opens);
        tcase_add_test(tc, test_lines_that_are_not_assignments_are_rejected_with_their_line);
        tcase_add_test(tc, test_nul_byte_is_a_syntax_error);
        tcase_add_test(tc, test_load_reads_a_file_and_reports_missing_ones);
        tcase_add_test(tc, test_braced_references_expand_from_earlier_lines_in_unquoted_and_double_quoted_values);
        tcase_add_test(tc, test_single_quoted_and_escaped_references_stay_literal);
        tcase_add_test(tc, test_references_fall_back_to_the_environment_and_the_file_comes_first);
        tcase_add_test(tc, test_a_default_applies_when_the_variable_is_unset_or_empty);
        tcase_add_test(tc, test_an_unresolved_reference_is_an_error_at_its_line);
        tcase_add_test(tc, test_a_malformed_reference_is_a_syntax_error_at_its_line);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(envfile_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
