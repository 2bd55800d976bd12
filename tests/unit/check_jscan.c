/* check_jscan.c — jscan accepts and refuses what jansson does, and finds what jansson finds.
 *
 * jansson is the reference: every document here goes through json_loadb(…, 0, …) as well and
 * the two must agree on accept/refuse and on the member found. Two kinds of document are left out
 * of the comparison, both on purpose and each pinned by its own test: those jansson refuses only
 * because a number overflows its int64 or double (jscan checks numbers for syntax only), and those
 * jansson accepts only because its lexer loses one raw NUL byte right after a number or
 * true/false/null (jscan refuses every raw NUL, as RFC 8259 does).
 */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "keypool/jscan.h"

#define N(a) (sizeof(a) / sizeof((a)[0]))

struct doc {
        const char *s;
        size_t len;
};

/* Literal text with its exact length, so embedded NULs count. */
#define D(lit) { lit, sizeof(lit) - 1 }

static unsigned compared, skipped_overflow, skipped_nul;

/* Does jansson refuse this text only for an overflowing number? */
static bool jansson_overflow(const json_error_t *e) {
        return json_error_code(e) == json_error_numeric_overflow;
}

/* Asserts jscan's member equals jansson's value for that name. */
static void assert_same_member(const char *s, size_t len, json_t *root, const char *name,
                               const struct jscan_value *v, const char *what) {
        json_t *want = json_object_get(root, name), *got;
        json_error_t e;

        if (!want) {
                ck_assert_msg(v->type == JSCAN_NONE, "%s: member '%s' absent in jansson, jscan found type %d",
                              what, name, v->type);
                return;
        }
        ck_assert_msg(v->type != JSCAN_NONE, "%s: member '%s' present in jansson, jscan found none", what, name);
        ck_assert_msg(v->text >= s && v->text + v->len <= s + len, "%s: member span outside the text", what);
        switch (json_typeof(want)) {
        case JSON_OBJECT:
                ck_assert_int_eq(v->type, JSCAN_OBJECT);
                break;
        case JSON_ARRAY:
                ck_assert_int_eq(v->type, JSCAN_ARRAY);
                break;
        case JSON_STRING:
                ck_assert_int_eq(v->type, JSCAN_STRING);
                break;
        case JSON_INTEGER:
        case JSON_REAL:
                ck_assert_int_eq(v->type, JSCAN_NUMBER);
                break;
        case JSON_TRUE:
                ck_assert_int_eq(v->type, JSCAN_TRUE);
                break;
        case JSON_FALSE:
                ck_assert_int_eq(v->type, JSCAN_FALSE);
                break;
        case JSON_NULL:
                ck_assert_int_eq(v->type, JSCAN_NULL);
                break;
        }
        got = json_loadb(v->text, v->len, JSON_DECODE_ANY, &e);
        ck_assert_msg(got && json_equal(got, want), "%s: member '%s' span '%.*s' is not jansson's value",
                      what, name, (int) v->len, v->text);
        json_decref(got);
}

static bool is_ws(char c) {
        return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Walks an object jscan accepted (the text trimmed of its white space) and its arrays, and holds
 * each step against jansson's tree: every name walked is one of jansson's, every array has
 * jansson's elements in jansson's order. */
static void assert_walk_matches(const char *s, size_t len, json_t *root, const char *what) {
        struct jscan_value top = { JSCAN_OBJECT, s, len }, name, value;
        struct jscan_iter it;
        size_t walked = 0;
        int r;

        while (top.len > 0 && is_ws(top.text[0]))
                top.text++, top.len--;
        while (top.len > 0 && is_ws(top.text[top.len - 1]))
                top.len--;
        ck_assert_int_eq(jscan_iter_init(&top, &it), 0);
        while ((r = jscan_next(&it, &name, &value)) > 0) {
                char key[4096];
                json_t *want;

                walked++;
                ck_assert_int_eq(name.type, JSCAN_STRING);
                if (jscan_string(&name, key, sizeof key, NULL) < 0)
                        continue;
                want = json_object_get(root, key);
                ck_assert_msg(want != NULL, "%s: walked a member '%s' jansson does not have", what, key);
                if (value.type == JSCAN_ARRAY) {
                        /* Held element by element against this very array as jansson reads it
                         * (a duplicate name's earlier array is not in jansson's tree). */
                        json_t *array = json_loadb(value.text, value.len, JSON_DECODE_ANY, NULL);
                        struct jscan_value el, no_name;
                        struct jscan_iter ai;
                        size_t i = 0;

                        ck_assert_msg(json_is_array(array), "%s: array span is not an array", what);
                        ck_assert_int_eq(jscan_iter_init(&value, &ai), 0);
                        while (jscan_next(&ai, &no_name, &el) > 0) {
                                json_t *got = json_loadb(el.text, el.len, JSON_DECODE_ANY, NULL);

                                ck_assert_int_eq(no_name.type, JSCAN_NONE);
                                ck_assert_msg(got && json_equal(got, json_array_get(array, i)),
                                              "%s: element %zu '%.*s' is not jansson's", what, i,
                                              (int) el.len, el.text);
                                json_decref(got);
                                i++;
                        }
                        ck_assert_uint_eq(i, json_array_size(array));
                        ck_assert_int_eq(jscan_next(&ai, NULL, NULL), 0);
                        json_decref(array);
                }
        }
        ck_assert_msg(r == 0, "%s: the walk failed with %d", what, r);
        ck_assert_uint_ge(walked, json_object_size(root));
}

/* jscan_document with jansson's number limits: refuses exactly what jansson refuses or reads as
 * something other than an object, overflowing numbers included; raw NUL bytes as ever aside. */
static void compare_document_with_jansson(const char *s, size_t len, json_t *root, const char *what) {
        bool accepted = root && json_is_object(root);
        int r = jscan_document(s, len, JSCAN_JANSSON_NUMBERS, NULL, 0, NULL);

        if (accepted && memchr(s, 0, len)) {
                ck_assert_int_eq(r, -EINVAL);
                return;
        }
        ck_assert_msg((r == 0) == accepted, "%s: jansson %s, jscan_document returned %d for '%.*s'",
                      what, accepted ? "accepts" : "refuses", r, (int) (len > 200 ? 200 : len), s);
        if (r == 0)
                assert_walk_matches(s, len, root, what);
}

/* Compares jscan with jansson on one text: accept/refuse, the member "model", and (when
 * accepted) every top-level name jansson saw. Returns whether it was compared at all. */
static bool compare_with_jansson(const char *s, size_t len, const char *what) {
        struct jscan_value v = { .type = _JSCAN_TYPE_MAX };
        json_error_t e;
        json_t *root = json_loadb(s, len, 0, &e), *value;
        bool accepted = root && json_is_object(root);
        const char *key;
        int r;

        compare_document_with_jansson(s, len, root, what);

        if (!root && jansson_overflow(&e)) {
                skipped_overflow++;
                return false;
        }
        r = jscan_object_member(s, len, "model", &v);
        if (accepted && memchr(s, 0, len)) {
                ck_assert_msg(r == -EINVAL, "%s: jscan accepted a raw NUL byte", what);
                skipped_nul++;
                json_decref(root);
                return false;
        }
        compared++;
        ck_assert_msg((r == 0) == accepted, "%s: jansson %s (%s), jscan returned %d for %zu bytes '%.*s'",
                      what, accepted ? "accepts" : "refuses", root ? "ok" : e.text, r, len,
                      (int) (len > 200 ? 200 : len), s);
        if (r < 0) {
                ck_assert_int_eq(r, -EINVAL);
                ck_assert_msg(v.type == _JSCAN_TYPE_MAX, "%s: ret written on failure", what);
        } else {
                assert_same_member(s, len, root, "model", &v, what);
                json_object_foreach(root, key, value) {
                        struct jscan_value m;

                        ck_assert_int_eq(jscan_object_member(s, len, key, &m), 0);
                        assert_same_member(s, len, root, key, &m, what);
                }
        }
        json_decref(root);
        return true;
}

/* ---- the corpus --------------------------------------------------------------------------- */

static const struct doc corpus[] = {
        /* plain */
        D("{}"), D(" \t\r\n{}\n "), D("{\"model\":\"gpt-4o\"}"),
        D("{\"model\":\"openai/gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"stream\":true}"),
        D("{ \"model\" : \"m\" , \"n\" : [ 1 , 2 , { } , [ ] ] }"),
        D("{\"model\":null}"), D("{\"model\":true}"), D("{\"model\":false}"), D("{\"model\":12}"),
        D("{\"model\":{\"a\":[1,{\"model\":\"inner\"}]}}"), D("{\"a\":{\"model\":\"nested only\"}}"),
        D("{\"model\":[]}"), D("{\"model\":{}}"), D("{\"model\":\"\"}"),
        /* not an object, or not only one */
        D(""), D(" "), D("[]"), D("[{\"model\":\"x\"}]"), D("\"model\""), D("12"), D("null"), D("true"),
        D("{}{}"), D("{} x"), D("{}]"), D("{}}"), D("{\"model\":\"x\"} ,"), D("{}\0"), D("\0{}"),
        D("{\"model\":\"x\"}\0junk"), D("\xef\xbb\xbf{}"),
        /* truncated */
        D("{"), D("{\""), D("{\"model"), D("{\"model\""), D("{\"model\":"), D("{\"model\":\"x"),
        D("{\"model\":\"x\""), D("{\"model\":\"x\","), D("{\"model\":[1,2"), D("{\"model\":tru"),
        D("{\"model\":nul"), D("{\"model\":fals"), D("{\"model\":1."), D("{\"model\":1e"), D("{\"model\":-"),
        D("{\"model\":\"\\"), D("{\"model\":\"\\u12"), D("{\"model\":\"\\ud83d"), D("{\"model\":\"\\ud83d\\u"),
        /* commas, colons, names */
        D("{\"model\":1,}"), D("{,}"), D("{,\"model\":1}"), D("{\"model\":[1,]}"), D("{\"model\":[,1]}"),
        D("{\"model\":[1,,2]}"), D("{\"model\" 1}"), D("{\"model\"::1}"), D("{\"model\"}"), D("{model:1}"),
        D("{1:1}"), D("{'model':1}"), D("{\"model\":1 \"a\":2}"), D("{\"a\":{\"b\"}}"), D("{\"a\":[\"b\":1]}"),
        D("{\"model\":undefined}"), D("{\"model\":True}"), D("{\"model\":nulll}"), D("{\"model\":truefalse}"),
        D("{\"model\":NaN}"), D("{\"model\":Infinity}"), D("{\"model\":/*c*/1}"),
        /* numbers */
        D("{\"model\":0}"), D("{\"model\":-0}"), D("{\"model\":-0.0e-0}"), D("{\"model\":01}"), D("{\"model\":-01}"),
        D("{\"model\":00}"), D("{\"model\":1.}"), D("{\"model\":.5}"), D("{\"model\":+1}"), D("{\"model\":1e+}"),
        D("{\"model\":1E5}"), D("{\"model\":1e-5}"), D("{\"model\":1.5E+10}"), D("{\"model\":1.e5}"),
        D("{\"model\":0x10}"), D("{\"model\":1_000}"), D("{\"model\":--1}"), D("{\"model\":- 1}"),
        D("{\"model\":1 2}"), D("{\"model\":9223372036854775807}"), D("{\"model\":-9223372036854775808}"),
        D("{\"model\":1e-400}"), D("{\"model\":1.7976931348623157e308}"), D("{\"model\":0e999999999999}"),
        D("{\"model\":[0,1,-1,0.5,-0.5e3]}"), D("{\"model\":1ee5}"), D("{\"model\":1e5.5}"), D("{\"model\":1.2.3}"),
        /* strings and escapes */
        D("{\"model\":\"a\\\"b\\\\c\\/d\\be\\ff\\ng\\rh\\ti\"}"), D("{\"model\":\"\\a\"}"), D("{\"model\":\"\\x41\"}"),
        D("{\"model\":\"\\'\"}"), D("{\"model\":\"\\U0041\"}"), D("{\"model\":\"\\u004\"}"),
        D("{\"model\":\"\\u004g\"}"), D("{\"model\":\"\\u0041\"}"), D("{\"model\":\"\\u00e9\\u20AC\"}"),
        D("{\"model\":\"\\ud83d\\ude00\"}"), D("{\"model\":\"\\uD83D\\uDE00\"}"), D("{\"model\":\"\\ud83d\"}"),
        D("{\"model\":\"\\ude00\"}"), D("{\"model\":\"\\ude00\\ud83d\"}"), D("{\"model\":\"\\ud83d\\ud83d\"}"),
        D("{\"model\":\"\\ud83d\\n\"}"), D("{\"model\":\"\\ud83dx\"}"), D("{\"model\":\"\\ud83d\\u0041\"}"),
        D("{\"model\":\"\\udbff\\udfff\"}"), D("{\"model\":\"\\ud800\\udc00\"}"), D("{\"model\":\"\\u0000\"}"),
        D("{\"model\":\"a\\u0000b\"}"), D("{\"mo\\u0000del\":1}"), D("{\"model\":\"\\u0001\\u001f\\u007f\"}"),
        D("{\"model\":\"tab\there\"}"), D("{\"model\":\"nl\nhere\"}"), D("{\"model\":\"\x1f\"}"),
        D("{\"model\":\"\x7f\"}"), D("{\"model\":\"a\0b\"}"), D("{\"model\":'x'}"),
        D("{\"model\":\"unterminated}"),
        /* UTF-8 */
        D("{\"model\":\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf\"}"),
        D("{\"model\":\"\xc3\"}"), D("{\"model\":\"\xc3\x28\"}"), D("{\"model\":\"\x80\"}"), D("{\"model\":\"\xbf\"}"),
        D("{\"model\":\"\xc0\xaf\"}"), D("{\"model\":\"\xc1\xbf\"}"), D("{\"model\":\"\xe0\x80\xaf\"}"),
        D("{\"model\":\"\xe0\x9f\xbf\"}"), D("{\"model\":\"\xe0\xa0\x80\"}"), D("{\"model\":\"\xf0\x80\x80\xaf\"}"),
        D("{\"model\":\"\xf0\x8f\xbf\xbf\"}"), D("{\"model\":\"\xf0\x90\x80\x80\"}"), D("{\"model\":\"\xed\x9f\xbf\"}"),
        D("{\"model\":\"\xed\xa0\x80\"}"), D("{\"model\":\"\xed\xbf\xbf\"}"), D("{\"model\":\"\xee\x80\x80\"}"),
        D("{\"model\":\"\xf4\x90\x80\x80\"}"), D("{\"model\":\"\xf5\x80\x80\x80\"}"), D("{\"model\":\"\xff\"}"),
        D("{\"model\":\"\xfe\"}"), D("{\"model\":\"\xe2\x82\"}"), D("{\"model\":\"\xe2\x82"), D("{\"model\":\"\xf0\x9f\x98\"}"),
        D("{\"model\":\"\xef\xbf\xbf\"}"), D("{\"model\":\"\xef\xbb\xbf\"}"), D("{\"model\":1\xc3\xa9}"),
        D("{\"caf\xc3\xa9\":1,\"model\":2}"), D("{\"\xc3\":1}"), D("{\"model\":\"x\"}\xc3\xa9"),
        D("{\"model\":\"x\"}\xff"),
        /* duplicates and escaped names */
        D("{\"model\":\"first\",\"model\":\"last\"}"), D("{\"model\":\"a\",\"x\":1,\"model\":{\"b\":2}}"),
        D("{\"mo\\u0064el\":\"escaped\"}"), D("{\"model\":\"plain\",\"mo\\u0064el\":\"escaped wins\"}"),
        D("{\"mo\\u0064el\":\"escaped\",\"model\":\"plain wins\"}"), D("{\"\\u006d\\u006f\\u0064\\u0065\\u006c\":1}"),
        D("{\"model\\u0000\":1}"), D("{\"model \":1}"), D("{\"Model\":1}"), D("{\"mod\":1,\"models\":2}"),
        D("{\"mo\\\"del\":1}"), D("{\"\":1}"), D("{\"\\ud83d\\ude00\":\"emoji name\"}"),
        /* white space jansson does not take */
        D("{\"model\":\v1}"), D("{\"model\":\f1}"), D("{\"model\":\xc2\xa0" "1}"), D("\v{}"),
};

START_TEST(test_corpus_accepts_and_refuses_like_jansson_and_finds_the_same_member) {
        compared = skipped_overflow = skipped_nul = 0;
        for (size_t i = 0; i < N(corpus); i++) {
                char what[32];

                snprintf(what, sizeof(what), "corpus[%zu]", i);
                compare_with_jansson(corpus[i].s, corpus[i].len, what);
        }
        ck_assert_uint_eq(skipped_overflow, 0);
        ck_assert_uint_eq(compared, N(corpus));
}
END_TEST

/* {"a": followed by `opens` containers around `inner`, then their closes and "}". */
static char *nested(unsigned opens, bool objects, const char *inner) {
        size_t n = 6 + (size_t) opens * 10 + strlen(inner) + 4;
        char *s = malloc(n), *p = s;

        ck_assert_ptr_nonnull(s);
        p += sprintf(p, "{\"a\":");
        for (unsigned i = 0; i < opens; i++)
                p += sprintf(p, "%s", objects ? "{\"b\":" : "[");
        p += sprintf(p, "%s", inner);
        for (unsigned i = 0; i < opens; i++)
                *p++ = objects ? '}' : ']';
        *p++ = '}';
        *p = 0;
        return s;
}

/* jscan_document_sub says what jscan_document and then jscan_members on the member say. */
static void assert_sub_agrees(const char *s, size_t len, unsigned flags, size_t sub, const char *what) {
        static const char *const names[] = { "model", "usage", "messages" };
        static const char *const sub_names[] = { "prompt_tokens", "completion_tokens", "x", "cost" };
        struct jscan_value top[3], top2[3], in[4], in2[4];
        int r = jscan_document(s, len, flags, names, 3, top);

        ck_assert_int_eq(jscan_document_sub(s, len, flags, names, 3, top2, sub, sub_names, 4, in2), r);
        if (r < 0)
                return;
        if (top[sub].type == JSCAN_OBJECT)
                ck_assert_int_eq(jscan_members(&top[sub], sub_names, 4, in), 0);
        else
                for (size_t j = 0; j < 4; j++)
                        in[j] = (struct jscan_value) { JSCAN_NONE, NULL, 0 };
        for (size_t i = 0; i < 3; i++)
                ck_assert_msg(top[i].type == top2[i].type && top[i].text == top2[i].text && top[i].len == top2[i].len,
                              "%s: member %zu differs", what, i);
        for (size_t j = 0; j < 4; j++)
                ck_assert_msg(in[j].type == in2[j].type && in[j].text == in2[j].text && in[j].len == in2[j].len,
                              "%s: member %zu of member %zu differs in '%.*s'", what, j, sub, (int) len, s);
}

START_TEST(test_document_sub_finds_what_members_of_the_member_would) {
        static const char *const cases[] = {
                "{\"usage\":{\"prompt_tokens\":24,\"completion_tokens\":8,\"total_tokens\":32}}",
                "{\"usage\":{\"prompt_tokens\":1},\"usage\":{\"completion_tokens\":2}}",
                "{\"usage\":{\"prompt_tokens\":1},\"usage\":null}",
                "{\"usage\":null,\"usage\":{\"x\":[1,{\"x\":2}],\"x\":{\"prompt_tokens\":3}}}",
                "{\"us\\u0061ge\":{\"pr\\u006fmpt_tokens\":5,\"cost\":\"\\u00e9\"}}",
                "{\"model\":{\"x\":\"y\",\"cost\":1.5e-05},\"usage\":[{\"prompt_tokens\":1}]}",
                "{\"usage\":{}}",
                "{\"usage\":{\"prompt_tokens\":1,\"x\":\"\\u0000\"}}",
                "{\"choices\":[1,2,{\"a\":[]}],\"usage\":{\"prompt_tokens\":1,\"bad\":[}}",
                "{\"usage\":{\"prompt_tokens\":1,\"total_tokens\":\"\xff\"}}",
                "{\"usage\":{\"prompt_tokens\":1 ,\"completion_tokens\" : 2 } , \"id\":\"z\"}",
        };

        for (size_t i = 0; i < N(cases); i++)
                for (size_t sub = 0; sub < 2; sub++) {
                        assert_sub_agrees(cases[i], strlen(cases[i]), 0, sub, cases[i]);
                        assert_sub_agrees(cases[i], strlen(cases[i]), JSCAN_SKIM_OTHERS, sub, cases[i]);
                        assert_sub_agrees(cases[i], strlen(cases[i]), JSCAN_JANSSON_NUMBERS, sub, cases[i]);
                }
}
END_TEST

START_TEST(test_document_sub_refuses_bad_arguments) {
        static const char s[] = "{\"usage\":{\"a\":1}}";
        const char *names[] = { "usage" }, *sub_names[] = { "a" }, *null_name[] = { NULL };
        struct jscan_value top, in;

        ck_assert_int_eq(jscan_document_sub(s, strlen(s), 0, names, 1, &top, 1, sub_names, 1, &in), -EINVAL);
        ck_assert_int_eq(jscan_document_sub(s, strlen(s), 0, names, 1, &top, 0, null_name, 1, &in), -EINVAL);
        ck_assert_int_eq(jscan_document_sub(s, strlen(s), 0, names, 1, &top, 0, sub_names, 1, NULL), -EINVAL);
        ck_assert_int_eq(jscan_document_sub(s, strlen(s), 0, names, 1, &top, 0, sub_names,
                                            JSCAN_MAX_NAMES + 1, &in), -EINVAL);
        ck_assert_int_eq(jscan_document_sub(s, strlen(s), 0, names, 1, &top, 0, sub_names, 1, &in), 0);
        ck_assert_int_eq(in.type, JSCAN_NUMBER);
        /* No names one level down: jscan_document itself. */
        ck_assert_int_eq(jscan_document_sub(s, strlen(s), 0, names, 1, &top, 5, NULL, 0, NULL), 0);
        ck_assert_int_eq(top.type, JSCAN_OBJECT);
}
END_TEST

START_TEST(test_depth_limit_is_janssons_2048) {
        static const struct {
                unsigned opens;
                bool objects;
                const char *inner;
                bool ok;
        } cases[] = {
                /* The top object is depth 1, its member value 2, so 2046 containers around the
                 * innermost value put it at 2048, the deepest jansson takes. */
                { 2046, false, "[]", true },
                { 2047, false, "[]", false },
                { 2046, false, "1", true },
                { 2047, false, "1", false },
                { 2046, true, "{}", true },
                { 2047, true, "{}", false },
                { 2046, true, "null", true },
                { 2047, true, "null", false },
                { 5000, false, "[]", false },
        };

        compared = skipped_overflow = skipped_nul = 0;
        for (size_t i = 0; i < N(cases); i++) {
                char *s = nested(cases[i].opens, cases[i].objects, cases[i].inner);
                struct jscan_value v, sub;
                json_t *root = json_loadb(s, strlen(s), 0, NULL);

                ck_assert_msg((root != NULL) == cases[i].ok, "jansson disagrees with the test on case %zu", i);
                ck_assert_int_eq(jscan_object_member(s, strlen(s), "a", &v), cases[i].ok ? 0 : -EINVAL);
                /* The object one level down, read by a pass of its own, counts depth the same. */
                ck_assert_int_eq(jscan_document_sub(s, strlen(s), 0, (const char *const[]) { "a" }, 1, &v, 0,
                                                    (const char *const[]) { "b" }, 1, &sub),
                                 cases[i].ok ? 0 : -EINVAL);
                compare_with_jansson(s, strlen(s), "depth");
                json_decref(root);
                free(s);
        }
        ck_assert_uint_eq(compared, N(cases));
}
END_TEST

START_TEST(test_long_strings_with_escapes_and_utf8_at_every_offset_match_jansson) {
        /* The word-at-a-time skip must not step over a quote, backslash, control byte or UTF-8
         * sequence whatever its position in the 8-byte word. */
        static const char *const specials[] = {
                "\\\"", "\\\\", "\\n", "\\u00e9", "\\ud83d\\ude00", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80",
                "\"", "\x01", "\xc3", "\xed\xa0\x80", "\\q", "\x7f", "\xff",
        };
        char s[256];

        for (size_t k = 0; k < N(specials); k++)
                for (int pad = 0; pad < 20; pad++) {
                        int n = snprintf(s, sizeof(s), "{\"model\":\"%.*s%s%s\",\"b\":\"%.*sx\"}", pad,
                                         "abcdefghijklmnopqrstuvwxyz", specials[k], "tail-of-the-string", pad,
                                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ");

                        compare_with_jansson(s, (size_t) n, specials[k]);
                }
}
END_TEST

START_TEST(test_strings_ending_at_every_distance_from_the_text_end_match_jansson) {
        /* The 16-byte look at a string runs only where 16 bytes remain, the 8-byte one where 8 do:
         * a special byte or the closing quote on either side of those edges, with the text in a
         * buffer of exactly its size (so a look past its end is an ASan error), reads the same. */
        static const char *const specials[] = {
                "", "\\\"", "\\n", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "\x01", "\x7f", "\x80",
                "\xc3", "\\u00", "\"",
        };

        for (size_t k = 0; k < N(specials); k++)
                for (int before = 0; before < 40; before++)
                        for (int after = 0; after < 20; after++) {
                                char tmp[128], *s;
                                int n = snprintf(tmp, sizeof(tmp), "{\"model\":\"%.*s%s%.*s\"}", before,
                                                 "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz",
                                                 specials[k], after, "ABCDEFGHIJKLMNOPQRSTUVWXYZ");

                                s = malloc((size_t) n);
                                ck_assert_ptr_nonnull(s);
                                memcpy(s, tmp, (size_t) n);
                                compare_with_jansson(s, (size_t) n, specials[k]);
                                /* Cut short: the closing quote or the brace never comes. */
                                for (int cut = 1; cut <= 3 && cut < n; cut++)
                                        compare_with_jansson(s, (size_t) (n - cut), specials[k]);
                                free(s);
                        }
}
END_TEST

/* ---- mutations ---------------------------------------------------------------------------- */

/* A longer or differently seeded run: -DJSCAN_MUTATIONS=5000000 -DJSCAN_SEED=… */
#ifndef JSCAN_MUTATIONS
#define JSCAN_MUTATIONS 60000
#endif
#ifndef JSCAN_SEED
#define JSCAN_SEED UINT64_C(0x6b657970006a7363)
#endif

static uint64_t rng_state;

static uint32_t rng(void) {
        /* xorshift64*: seeded, so a failure reproduces. */
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        return (uint32_t) ((rng_state * UINT64_C(2685821657736338717)) >> 32);
}

static const char *const seeds[] = {
        "{\"model\":\"openai/gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello in one "
        "word.\"}],\"max_tokens\":16,\"stream\":false,\"temperature\":0.7}",
        "{\"model\":\"claude-test\",\"max_tokens\":1024,\"messages\":[{\"role\":\"user\",\"content\":"
        "\"caf\xc3\xa9 \\u00e9 \\ud83d\\ude00 \xf0\x9f\x98\x80 \\\"q\\\" \\\\ \\n\"}],\"stop\":[\"\\n\\n\"]}",
        "{\"id\":\"gen-fake\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}],"
        "\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":3,\"total_tokens\":13,\"cost\":1.5e-05}}",
        "{\"mo\\u0064el\":[true,false,null,-0,0.5e+3,{\"a\":{}},[]],\"model\":{\"x\":\"y\"},\"e\":\"\"}",
};

static const unsigned char interesting[] = "{}[]\":,\\/ -+.0123456789eEu"
                                           "dDfabtrnlsx\x00\x01\x1f\x7f\x80\xbf\xc0\xc3\xe0\xed\xef\xf0\xf4\xf5\xff\t\n";

static size_t mutate(const char *seed, char *out, size_t size) {
        size_t len = strlen(seed);
        unsigned n = 1 + rng() % 3;

        memcpy(out, seed, len);
        for (unsigned m = 0; m < n; m++) {
                size_t at = len ? rng() % len : 0;
                unsigned char c = rng() % 4 ? interesting[rng() % (sizeof(interesting) - 1)] : (unsigned char) rng();

                switch (rng() % 6) {
                case 0:                                 /* delete a byte */
                        if (len > 0) {
                                memmove(out + at, out + at + 1, len - at - 1);
                                len--;
                        }
                        break;
                case 1:                                 /* insert a byte */
                        if (len + 1 < size) {
                                memmove(out + at + 1, out + at, len - at);
                                out[at] = (char) c;
                                len++;
                        }
                        break;
                case 2:                                 /* replace a byte */
                case 3:
                        if (len > 0)
                                out[at] = (char) c;
                        break;
                case 4:                                 /* truncate */
                        len = at;
                        break;
                case 5: {                               /* repeat a span */
                        size_t span = 1 + rng() % 12;

                        if (at + span <= len && len + span < size) {
                                memmove(out + at + span, out + at, len - at);
                                len += span;
                        }
                        break;
                }
                }
        }
        return len;
}

START_TEST(test_mutated_bodies_agree_with_jansson) {
        char buf[1024];
        unsigned accepted = 0, total = 0;

        rng_state = JSCAN_SEED;         /* fixed: a failure names its iteration */
        compared = skipped_overflow = skipped_nul = 0;
        for (unsigned i = 0; i < JSCAN_MUTATIONS; i++) {
                const char *seed = seeds[i % N(seeds)];
                size_t len = mutate(seed, buf, sizeof(buf));
                char what[48];
                struct jscan_value v;

                snprintf(what, sizeof(what), "mutation %u of seed %zu", i, (size_t) (i % N(seeds)));
                assert_sub_agrees(buf, len, i % 2 ? JSCAN_SKIM_OTHERS : 0, i / 2 % 2, what);
                if (compare_with_jansson(buf, len, what)) {
                        total++;
                        accepted += jscan_object_member(buf, len, "model", &v) == 0;
                }
        }
        /* Both sides of the line are exercised, and overflow skips stay rare. */
        ck_assert_uint_gt(accepted, total / 10);
        ck_assert_uint_lt(accepted, total - total / 10);
        ck_assert_uint_lt(skipped_overflow + skipped_nul, total / 100);
        fprintf(stderr, "jscan mutations: %u compared (%u accepted), left out: %u number overflow, %u NUL after a "
                "number or literal\n", total, accepted, skipped_overflow, skipped_nul);
}
END_TEST

START_TEST(test_overflowing_numbers_are_the_one_intended_difference) {
        static const char *const docs[] = {
                "{\"model\":\"m\",\"n\":9223372036854775808}",
                "{\"model\":\"m\",\"n\":-9223372036854775809}",
                "{\"model\":\"m\",\"n\":99999999999999999999999999}",
                "{\"model\":\"m\",\"n\":1e400}",
                "{\"model\":\"m\",\"n\":-1.8e308}",
        };

        for (size_t i = 0; i < N(docs); i++) {
                struct jscan_value v;
                json_error_t e;

                ck_assert_ptr_null(json_loadb(docs[i], strlen(docs[i]), 0, &e));
                ck_assert(jansson_overflow(&e));
                ck_assert_int_eq(jscan_object_member(docs[i], strlen(docs[i]), "model", &v), 0);
                ck_assert(jscan_string_eq(&v, "m"));
        }
}
END_TEST

START_TEST(test_raw_nul_after_a_number_or_literal_is_refused_though_jansson_loses_it) {
        static const struct doc docs[] = {
                D("{\"model\":\"m\",\"n\":1\0}"), D("{\"model\":\"m\",\"n\":true\0}"),
                D("{\"model\":\"m\",\"n\":[null\0]}"), D("{\"model\":\"m\",\"n\":-1.5e3\0,\"o\":2}"),
        };

        for (size_t i = 0; i < N(docs); i++) {
                struct jscan_value v;
                json_t *root = json_loadb(docs[i].s, docs[i].len, 0, NULL);

                ck_assert_ptr_nonnull(root);
                json_decref(root);
                ck_assert_int_eq(jscan_object_member(docs[i].s, docs[i].len, "model", &v), -EINVAL);
        }
}
END_TEST

/* ---- finding members ---------------------------------------------------------------------- */

START_TEST(test_last_duplicate_wins_and_escaped_names_match) {
        static const char s[] = "{\"model\":\"a\",\"mo\\u0064el\":\"b\",\"x\":{\"model\":\"c\"}}";
        struct jscan_value v;

        ck_assert_int_eq(jscan_object_member(s, sizeof(s) - 1, "model", &v), 0);
        ck_assert(jscan_string_eq(&v, "b"));
        ck_assert_uint_eq(v.len, 3);
        ck_assert_int_eq(memcmp(v.text, "\"b\"", 3), 0);
}
END_TEST

START_TEST(test_nested_member_of_that_name_is_not_a_top_level_one) {
        static const char s[] = "{\"messages\":[{\"model\":\"inner\"}],\"x\":{\"model\":1}}";
        struct jscan_value v = { .type = JSCAN_STRING };

        ck_assert_int_eq(jscan_object_member(s, sizeof(s) - 1, "model", &v), 0);
        ck_assert_int_eq(v.type, JSCAN_NONE);
        ck_assert_ptr_null(v.text);
        ck_assert_uint_eq(v.len, 0);
}
END_TEST

START_TEST(test_several_members_in_one_pass) {
        static const char s[] = " {\"stream\" : true, \"model\":\"gpt-test\", \"n\":[1, 2] , \"o\":{\"k\":null}} ";
        const char *const names[] = { "model", "stream", "missing", "n", "o" };
        struct jscan_value v[N(names)];

        ck_assert_int_eq(jscan_object_members(s, sizeof(s) - 1, names, N(names), v), 0);
        ck_assert(jscan_string_eq(&v[0], "gpt-test"));
        ck_assert_int_eq(v[1].type, JSCAN_TRUE);
        ck_assert_uint_eq(v[1].len, 4);
        ck_assert_int_eq(v[2].type, JSCAN_NONE);
        ck_assert_int_eq(v[3].type, JSCAN_ARRAY);
        ck_assert_uint_eq(v[3].len, 6);
        ck_assert_int_eq(v[4].type, JSCAN_OBJECT);
        ck_assert_uint_eq(v[4].len, 10);
}
END_TEST

START_TEST(test_skim_skips_unwanted_values_unchecked_and_still_finds_the_top_level_member) {
        /* Inside "choices" a comma is missing and a literal is misspelt: skimmed, not checked.
         * Brackets and quotes still count: the "usage" inside it (and in a string) is not the
         * top-level one. */
        static const char s[] = "{\"choices\":[{\"usage\":{\"a\":1} \"b\":tru, \"s\":\"]}{\"}],"
                                "\"id\":x1, \"usage\":{\"prompt_tokens\":3}}";
        const char *const names[] = { "usage" };
        struct jscan_value v = {};

        ck_assert_int_eq(jscan_document(s, sizeof(s) - 1, 0, names, 1, &v), -EINVAL);
        ck_assert_int_eq(jscan_document(s, sizeof(s) - 1, JSCAN_SKIM_OTHERS, names, 1, &v), 0);
        ck_assert_int_eq(v.type, JSCAN_OBJECT);
        ck_assert_str_eq(v.text, "{\"prompt_tokens\":3}}");
        ck_assert_uint_eq(v.len, 19);
}
END_TEST

START_TEST(test_skim_still_refuses_a_text_whose_brackets_or_strings_do_not_close) {
        static const char *const bad[] = {
                "{\"a\":[1,2",                /* a container that is cut off... */
                "{\"a\":[[1]",                /* ...or never closed */
                "{\"a\":\"open}",            /* a string that never ends */
                "{\"a\":]}",                  /* a closing bracket with nothing open */
                "{\"a\":\"\xff\"}",          /* not UTF-8 */
                "{\"usage\":{}",              /* the wanted member itself is still checked */
        };
        const char *const names[] = { "usage" };

        for (size_t i = 0; i < N(bad); i++) {
                struct jscan_value v = { .type = JSCAN_NULL };

                ck_assert_msg(jscan_document(bad[i], strlen(bad[i]), JSCAN_SKIM_OTHERS, names, 1, &v) == -EINVAL,
                              "skimmed '%s'", bad[i]);
                ck_assert_int_eq(v.type, JSCAN_NULL);
        }
}
END_TEST

START_TEST(test_refusals_leave_ret_alone_and_bad_arguments_are_einval) {
        const char *const names[JSCAN_MAX_NAMES + 1] = {};
        struct jscan_value v = { .type = JSCAN_NUMBER, .text = "7", .len = 1 }, out[2];

        ck_assert_int_eq(jscan_object_member("{\"model\":\"x\",}", 14, "model", &v), -EINVAL);
        ck_assert_int_eq(v.type, JSCAN_NUMBER);
        ck_assert_int_eq(jscan_object_member(NULL, 0, "model", &v), -EINVAL);
        ck_assert_int_eq(jscan_object_member("{}", 2, NULL, &v), -EINVAL);
        ck_assert_int_eq(jscan_object_members("{}", 2, names, N(names), out), -EINVAL);
        ck_assert_int_eq(jscan_object_members("{}", 2, NULL, 0, NULL), 0);
        ck_assert_int_eq(jscan_object_members("{", 1, NULL, 0, NULL), -EINVAL);
        ck_assert_int_eq(v.type, JSCAN_NUMBER);
}
END_TEST

START_TEST(test_member_reads_inside_a_found_object) {
        static const char s[] = "{\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":3,\"prompt_tokens\":11},"
                                "\"message\":[1]}";
        const char *const names[] = { "completion_tokens", "prompt_tokens" };
        struct jscan_value u, m, v[2], c = { .type = JSCAN_STRING, .text = "\"x\"", .len = 3 };
        uint64_t n;

        ck_assert_int_eq(jscan_object_member(s, sizeof(s) - 1, "usage", &u), 0);
        ck_assert_int_eq(u.type, JSCAN_OBJECT);
        ck_assert_int_eq(jscan_members(&u, names, 2, v), 0);
        ck_assert_int_eq(jscan_uint(&v[0], &n), 0);
        ck_assert_uint_eq(n, 3);
        ck_assert_int_eq(jscan_uint(&v[1], &n), 0);
        ck_assert_uint_eq(n, 11);
        ck_assert_int_eq(jscan_member(&u, "total_tokens", &m), 0);
        ck_assert_int_eq(m.type, JSCAN_NONE);

        ck_assert_int_eq(jscan_object_member(s, sizeof(s) - 1, "message", &m), 0);
        ck_assert_int_eq(jscan_member(&m, "x", &u), -EINVAL);
        ck_assert_int_eq(jscan_member(&c, "x", &u), -EINVAL);
        ck_assert_int_eq(jscan_member(NULL, "x", &u), -EINVAL);
}
END_TEST

/* ---- decoding ----------------------------------------------------------------------------- */

static struct jscan_value member(const char *s, const char *name) {
        struct jscan_value v;

        ck_assert_int_eq(jscan_object_member(s, strlen(s), name, &v), 0);
        return v;
}

START_TEST(test_string_decodes_escapes_and_surrogate_pairs) {
        struct jscan_value v = member("{\"s\":\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u00e9\\u20ac\\ud83d\\ude00"
                                      "\xf0\x9f\x98\x80z\"}", "s");
        static const char want[] = "a\"b\\c/d\b\f\n\r\t\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf0\x9f\x98\x80z";
        char buf[64];
        size_t len = 0;

        ck_assert_int_eq(jscan_string(&v, buf, sizeof(buf), &len), 0);
        ck_assert_uint_eq(len, sizeof(want) - 1);
        ck_assert_str_eq(buf, want);
        ck_assert(jscan_string_eq(&v, want));
        ck_assert(!jscan_string_eq(&v, "a\"b"));
        ck_assert_int_eq(jscan_string(&v, buf, sizeof(buf), NULL), 0);
}
END_TEST

START_TEST(test_string_too_long_is_enobufs_and_leaves_buf_untouched) {
        struct jscan_value v = member("{\"s\":\"gpt-4o\",\"e\":\"\\u00e9\\u00e9\"}", "s");
        struct jscan_value e = member("{\"s\":\"gpt-4o\",\"e\":\"\\u00e9\\u00e9\"}", "e");
        char buf[8];
        size_t len = 99;

        memset(buf, 'Z', sizeof(buf));
        ck_assert_int_eq(jscan_string(&v, buf, 6, &len), -ENOBUFS);
        ck_assert_uint_eq(len, 99);
        for (size_t i = 0; i < sizeof(buf); i++)
                ck_assert_int_eq(buf[i], 'Z');
        ck_assert_int_eq(jscan_string(&v, buf, 7, &len), 0);
        ck_assert_str_eq(buf, "gpt-4o");
        ck_assert_uint_eq(len, 6);
        /* 12 bytes of text, 4 decoded: fits in 5 though the raw text does not. */
        ck_assert_int_eq(jscan_string(&e, buf, 5, &len), 0);
        ck_assert_str_eq(buf, "\xc3\xa9\xc3\xa9");
        ck_assert_int_eq(jscan_string(&e, buf, 4, &len), -ENOBUFS);
        ck_assert_int_eq(jscan_string(&e, NULL, 0, &len), -ENOBUFS);
}
END_TEST

START_TEST(test_string_functions_refuse_other_types) {
        struct jscan_value n = member("{\"n\":12,\"o\":{\"a\":\"b\"}}", "n");
        struct jscan_value o = member("{\"n\":12,\"o\":{\"a\":\"b\"}}", "o");
        struct jscan_value none = member("{}", "x");
        char buf[16];

        ck_assert_int_eq(jscan_string(&n, buf, sizeof(buf), NULL), -EINVAL);
        ck_assert_int_eq(jscan_string(&o, buf, sizeof(buf), NULL), -EINVAL);
        ck_assert_int_eq(jscan_string(&none, buf, sizeof(buf), NULL), -EINVAL);
        ck_assert(!jscan_string_eq(&n, "12"));
        ck_assert(!jscan_string_eq(&none, ""));
        ck_assert(!jscan_string_eq(NULL, ""));
}
END_TEST

START_TEST(test_string_eq_is_exact) {
        struct jscan_value v = member("{\"a\":\"model\",\"b\":\"mo\\u0064el\",\"c\":\"\",\"d\":\"\\u00e9\"}", "a");
        struct jscan_value b = member("{\"a\":\"model\",\"b\":\"mo\\u0064el\",\"c\":\"\",\"d\":\"\\u00e9\"}", "b");
        struct jscan_value c = member("{\"a\":\"model\",\"b\":\"mo\\u0064el\",\"c\":\"\",\"d\":\"\\u00e9\"}", "c");
        struct jscan_value d = member("{\"a\":\"model\",\"b\":\"mo\\u0064el\",\"c\":\"\",\"d\":\"\\u00e9\"}", "d");

        ck_assert(jscan_string_eq(&v, "model"));
        ck_assert(!jscan_string_eq(&v, "models"));
        ck_assert(!jscan_string_eq(&v, "mode"));
        ck_assert(!jscan_string_eq(&v, "Model"));
        ck_assert(jscan_string_eq(&b, "model"));
        ck_assert(!jscan_string_eq(&b, "model2"));
        ck_assert(!jscan_string_eq(&b, "mod"));
        ck_assert(jscan_string_eq(&c, ""));
        ck_assert(!jscan_string_eq(&c, "x"));
        ck_assert(jscan_string_eq(&d, "\xc3\xa9"));
        ck_assert(!jscan_string_eq(&d, "\xc3"));
        ck_assert(!jscan_string_eq(&d, "\xc3\xa9x"));
}
END_TEST

/* ---- numbers ------------------------------------------------------------------------------ */

static int uint_of(const char *number, uint64_t *ret) {
        char s[128];

        snprintf(s, sizeof(s), "{\"n\":%s}", number);
        struct jscan_value v = member(s, "n");
        return jscan_uint(&v, ret);
}

START_TEST(test_uint_takes_plain_non_negative_integers_only) {
        static const char *const refused[] = { "12.0", "-1", "1e3", "1E3", "0.5", "\"12\"", "true", "null", "[1]",
                                               "-0.0", "{}" };
        uint64_t n = 777;

        ck_assert_int_eq(uint_of("12", &n), 0);
        ck_assert_uint_eq(n, 12);
        ck_assert_int_eq(uint_of("0", &n), 0);
        ck_assert_uint_eq(n, 0);
        ck_assert_int_eq(uint_of("-0", &n), 0);
        ck_assert_uint_eq(n, 0);
        ck_assert_int_eq(uint_of("18446744073709551615", &n), 0);
        ck_assert_uint_eq(n, UINT64_MAX);
        n = 777;
        ck_assert_int_eq(uint_of("18446744073709551616", &n), -ERANGE);
        ck_assert_int_eq(uint_of("99999999999999999999999999999", &n), -ERANGE);
        ck_assert_int_eq(uint_of("99999999999999999999999999999.5", &n), -EINVAL);
        for (size_t i = 0; i < N(refused); i++)
                ck_assert_msg(uint_of(refused[i], &n) == -EINVAL, "%s is not a count", refused[i]);
        ck_assert_uint_eq(n, 777);
}
END_TEST

static int double_of(const char *number, double *ret) {
        char s[2048];

        snprintf(s, sizeof(s), "{\"n\":%s}", number);
        struct jscan_value v = member(s, "n");
        return jscan_double(&v, ret);
}

START_TEST(test_double_rounds_like_strtod_and_refuses_overflow_like_jansson) {
        static const char *const numbers[] = {
                "0", "-0", "1", "-1", "0.5", "1.5e-05", "123456789012345678901234567890", "1e308",
                "1.7976931348623157e308", "1.7976931348623158e308", "4.9e-324", "2.4e-324", "1e-400",
                "0.000000000000000000000000000001", "2.2250738585072011e-308", "9007199254740993",
                "0.1", "3.14159265358979323846264338327950288419716939937510", "-0.0e-0", "0e99999999999999",
                "1e-99999999999999999999",
        };
        static const char *const overflowing[] = { "1e400", "-1e400", "1.7976931348623159e308", "1e99999999999999999999",
                                                   "179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497792" };
        double x, y = 42;

        for (size_t i = 0; i < N(numbers); i++) {
                ck_assert_msg(double_of(numbers[i], &x) == 0, "%s is a double", numbers[i]);
                ck_assert_msg(memcmp(&x, &(double) { strtod(numbers[i], NULL) }, sizeof(x)) == 0,
                              "%s read as %.17g, strtod says %.17g", numbers[i], x, strtod(numbers[i], NULL));
        }
        for (size_t i = 0; i < N(overflowing); i++) {
                json_error_t e;
                char s[2048];

                ck_assert_msg(double_of(overflowing[i], &y) == -ERANGE, "%.40s overflows", overflowing[i]);
                snprintf(s, sizeof(s), "{\"n\":%s}", overflowing[i]);
                ck_assert_ptr_null(json_loadb(s, strlen(s), 0, &e));
        }
        ck_assert(y == 42);
}
END_TEST

START_TEST(test_double_keeps_long_mantissas_exact_at_the_rounding_edge) {
        /* Halfway between DBL_MAX and the double below it (2^1024 - 3 * 2^970): exactly there
         * ties to even (down), any excess however far out rounds up to DBL_MAX, so a 1 at the
         * 1000th significant digit must survive the cut at 800. */
        static const char below[] = "17976931348623156083532587605810529851620700234165216626166117462586955326729232657453009928794654924675063149033587701752208710592698796290627760473556921329019091915239418047621712533496094635638726128664019802903779951418360298151175628372777140383052148396392393563313364280213909166945792787446407521894";
        /* DBL_MAX + half an ulp (2^1024 - 2^970): ties to even, which is up, out of range. */
        static const char above[] = "179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497792";
        char s[1200];
        double x;

        snprintf(s, sizeof(s), "%s4", below);
        ck_assert_int_eq(double_of(s, &x), 0);
        ck_assert(x == nextafter(1.7976931348623157e308, 0));
        snprintf(s, sizeof(s), "%s4.%0*d1", below, 690, 0);
        ck_assert_int_eq(double_of(s, &x), 0);
        ck_assert(x == 1.7976931348623157e308);
        snprintf(s, sizeof(s), "%s4.%0*d", below, 690, 0);
        ck_assert_int_eq(double_of(s, &x), 0);
        ck_assert(x == nextafter(1.7976931348623157e308, 0));

        ck_assert_int_eq(double_of(above, &x), -ERANGE);
        snprintf(s, sizeof(s), "%.*s1.%0*d", (int) strlen(above) - 1, above, 699, 0);
        ck_assert_int_eq(double_of(s, &x), 0);
        ck_assert(x == 1.7976931348623157e308);
}
END_TEST

/* ---- whole documents and walks ------------------------------------------------------------ */

START_TEST(test_document_with_jansson_numbers_refuses_what_jansson_refuses_at_the_int64_edges) {
        static const struct {
                const char *doc;
                int r;
        } cases[] = {
                { "{\"n\":9223372036854775807}", 0 },
                { "{\"n\":-9223372036854775808}", 0 },
                { "{\"n\":9223372036854775808}", -EINVAL },
                { "{\"n\":-9223372036854775809}", -EINVAL },
                { "{\"n\":[1,{\"m\":10000000000000000000}]}", -EINVAL },
                { "{\"n\":1.7976931348623157e308}", 0 },
                { "{\"n\":1e309}", -EINVAL },
                { "{\"n\":-1e-400}", 0 },
                { "{\"n\":-0}", 0 },
        };
        static const char *const names[] = { "n" };

        for (size_t i = 0; i < N(cases); i++) {
                struct jscan_value v = { .type = _JSCAN_TYPE_MAX };
                size_t len = strlen(cases[i].doc);
                json_t *root = json_loadb(cases[i].doc, len, 0, NULL);

                ck_assert_msg((root != NULL) == (cases[i].r == 0), "jansson disagrees with case %zu", i);
                json_decref(root);
                ck_assert_int_eq(jscan_document(cases[i].doc, len, JSCAN_JANSSON_NUMBERS, names, 1, &v),
                                 cases[i].r);
                if (cases[i].r == 0)
                        ck_assert_int_eq(v.type, JSCAN_NUMBER);
                else
                        ck_assert_int_eq(v.type, _JSCAN_TYPE_MAX);
                /* Without the flag, numbers are syntax only, as everywhere else. */
                ck_assert_int_eq(jscan_document(cases[i].doc, len, 0, names, 1, &v), 0);
        }
        ck_assert_int_eq(jscan_document("{}", 2, 0x80, NULL, 0, NULL), -EINVAL);
        ck_assert_int_eq(jscan_document("[]", 2, 0, NULL, 0, NULL), -EINVAL);
}
END_TEST

START_TEST(test_walk_yields_every_member_in_order_duplicates_included_then_zero) {
        static const char doc[] = "{ \"a\" : 1 , \"b\":[true,{\"x\":null}], \"a\":\"two\", \"c\\u0041\":{} }";
        static const char *const want_names[] = { "a", "b", "a", "cA" };
        static const char *const want_values[] = { "1", "[true,{\"x\":null}]", "\"two\"", "{}" };
        struct jscan_value top, name, value;
        struct jscan_iter it;
        size_t i = 0;

        ck_assert_int_eq(jscan_document(doc, strlen(doc), 0, NULL, 0, NULL), 0);
        top = (struct jscan_value) { JSCAN_OBJECT, doc, strlen(doc) };
        ck_assert_int_eq(jscan_iter_init(&top, &it), 0);
        while (jscan_next(&it, &name, &value) > 0) {
                ck_assert_uint_lt(i, N(want_names));
                ck_assert(jscan_string_eq(&name, want_names[i]));
                ck_assert_uint_eq(value.len, strlen(want_values[i]));
                ck_assert(memcmp(value.text, want_values[i], value.len) == 0);
                i++;
        }
        ck_assert_uint_eq(i, N(want_names));
        ck_assert_int_eq(jscan_next(&it, &name, &value), 0);
        ck_assert_int_eq(jscan_next(&it, NULL, NULL), 0);
}
END_TEST

START_TEST(test_walk_over_an_array_gives_elements_of_every_type_and_no_names) {
        static const char doc[] = "[ \"s\\n\", -1.5e3, {\"k\":[1]}, [], true, false, null ]";
        static const enum jscan_type want[] = { JSCAN_STRING, JSCAN_NUMBER, JSCAN_OBJECT, JSCAN_ARRAY,
                                                JSCAN_TRUE, JSCAN_FALSE, JSCAN_NULL };
        struct jscan_value arr = { JSCAN_ARRAY, doc, strlen(doc) }, name, value;
        struct jscan_iter it;
        size_t i = 0;

        ck_assert_int_eq(jscan_iter_init(&arr, &it), 0);
        while (jscan_next(&it, &name, &value) > 0) {
                ck_assert_uint_lt(i, N(want));
                ck_assert_int_eq(value.type, want[i]);
                ck_assert_int_eq(name.type, JSCAN_NONE);
                ck_assert_ptr_null(name.text);
                i++;
        }
        ck_assert_uint_eq(i, N(want));

        for (size_t k = 0; k < 2; k++) {
                static const char *const empty[] = { "[]", "[ \n ]" };

                arr = (struct jscan_value) { JSCAN_ARRAY, empty[k], strlen(empty[k]) };
                ck_assert_int_eq(jscan_iter_init(&arr, &it), 0);
                ck_assert_int_eq(jscan_next(&it, NULL, NULL), 0);
        }
}
END_TEST

START_TEST(test_walk_over_a_hand_made_broken_value_is_einval_and_stays_so_leaving_ret_alone) {
        static const struct {
                enum jscan_type type;
                const char *text;
                unsigned good;          /* elements before the break */
        } cases[] = {
                { JSCAN_ARRAY, "[1,]", 1 },
                { JSCAN_ARRAY, "[,1]", 0 },
                { JSCAN_ARRAY, "[1 2]", 1 },
                { JSCAN_ARRAY, "[1]]", 1 },
                { JSCAN_ARRAY, "[\"abc]", 0 },
                { JSCAN_ARRAY, "[{\"a\":1]", 0 },
                { JSCAN_ARRAY, "[01]", 1 },     /* "0", then no comma */
                { JSCAN_OBJECT, "{\"a\":1,}", 1 },
                { JSCAN_OBJECT, "{\"a\" 1}", 0 },
                { JSCAN_OBJECT, "{1:1}", 0 },
                { JSCAN_OBJECT, "{\"a\":}", 0 },
        };

        for (size_t i = 0; i < N(cases); i++) {
                struct jscan_value v = { cases[i].type, cases[i].text, strlen(cases[i].text) };
                struct jscan_value name, value;
                struct jscan_iter it;
                unsigned n = 0;
                int r;

                ck_assert_int_eq(jscan_iter_init(&v, &it), 0);
                while ((r = jscan_next(&it, &name, &value)) > 0)
                        n++;
                ck_assert_msg(r == -EINVAL && n == cases[i].good, "case %zu: %d after %u elements", i, r, n);
                value.type = _JSCAN_TYPE_MAX;
                ck_assert_int_eq(jscan_next(&it, &name, &value), -EINVAL);
                ck_assert_int_eq(value.type, _JSCAN_TYPE_MAX);
        }
}
END_TEST

START_TEST(test_iter_init_refuses_what_is_not_a_container) {
        struct jscan_value bad[] = {
                { JSCAN_STRING, "\"x\"", 3 },
                { JSCAN_OBJECT, "[]", 2 },
                { JSCAN_ARRAY, "{}", 2 },
                { JSCAN_ARRAY, "[", 1 },
                { JSCAN_ARRAY, NULL, 0 },
                { JSCAN_NONE, NULL, 0 },
        };
        struct jscan_iter it;

        for (size_t i = 0; i < N(bad); i++)
                ck_assert_int_eq(jscan_iter_init(&bad[i], &it), -EINVAL);
        ck_assert_int_eq(jscan_iter_init(NULL, &it), -EINVAL);
        ck_assert_int_eq(jscan_next(NULL, NULL, NULL), -EINVAL);
}
END_TEST

START_TEST(test_next_members_finds_fields_of_each_object_element_in_any_order) {
        static const char doc[] =
                "[{\"id\":\"a\",\"n\":1,\"extra\":{\"id\":\"inner\"}},"
                "{\"n\":2,\"id\":\"b\",\"id\":\"b2\"},"
                "\"not an object\","
                "{},"
                "{\"i\\u0064\":\"c\"}]";
        static const char *const names[] = { "id", "n" };
        static const char *const want_id[] = { "a", "b2", NULL, NULL, "c" };
        static const char *const want_n[] = { "1", "2", NULL, NULL, NULL };
        struct jscan_value arr = { JSCAN_ARRAY, doc, strlen(doc) }, f[2], value;
        struct jscan_iter it;
        size_t i = 0;
        int r;

        ck_assert_int_eq(jscan_iter_init(&arr, &it), 0);
        while ((r = jscan_next_members(&it, names, N(names), f, &value)) > 0) {
                ck_assert_uint_lt(i, N(want_id));
                ck_assert_int_eq(value.type, i == 2 ? JSCAN_STRING : JSCAN_OBJECT);
                if (want_id[i])
                        ck_assert(jscan_string_eq(&f[0], want_id[i]));
                else
                        ck_assert_int_eq(f[0].type, JSCAN_NONE);
                if (want_n[i])
                        ck_assert(f[1].len == 1 && f[1].text[0] == want_n[i][0]);
                else
                        ck_assert_int_eq(f[1].type, JSCAN_NONE);
                i++;
        }
        ck_assert_int_eq(r, 0);
        ck_assert_uint_eq(i, N(want_id));
}
END_TEST

START_TEST(test_next_members_on_a_broken_element_is_einval_and_leaves_ret_alone) {
        static const char doc[] = "[{\"id\":\"a\"},{\"id\":\"b\",}]";
        static const char *const names[] = { "id" };
        struct jscan_value arr = { JSCAN_ARRAY, doc, strlen(doc) }, f[1], value;
        struct jscan_iter it;

        ck_assert_int_eq(jscan_iter_init(&arr, &it), 0);
        ck_assert_int_eq(jscan_next_members(&it, names, 1, f, &value), 1);
        ck_assert(jscan_string_eq(&f[0], "a"));
        ck_assert_int_eq(jscan_next_members(&it, names, 1, f, &value), -EINVAL);
        ck_assert(jscan_string_eq(&f[0], "a"));
        ck_assert_int_eq(jscan_next_members(&it, names, JSCAN_MAX_NAMES + 1, f, &value), -EINVAL);
}
END_TEST

static Suite *jscan_suite(void) {
        Suite *s = suite_create("jscan");
        TCase *tc = tcase_create("core");

        tcase_set_timeout(tc, 120);
        tcase_add_test(tc, test_corpus_accepts_and_refuses_like_jansson_and_finds_the_same_member);
        tcase_add_test(tc, test_depth_limit_is_janssons_2048);
        tcase_add_test(tc, test_long_strings_with_escapes_and_utf8_at_every_offset_match_jansson);
        tcase_add_test(tc, test_strings_ending_at_every_distance_from_the_text_end_match_jansson);
        tcase_add_test(tc, test_document_sub_finds_what_members_of_the_member_would);
        tcase_add_test(tc, test_document_sub_refuses_bad_arguments);
        tcase_add_test(tc, test_mutated_bodies_agree_with_jansson);
        tcase_add_test(tc, test_overflowing_numbers_are_the_one_intended_difference);
        tcase_add_test(tc, test_raw_nul_after_a_number_or_literal_is_refused_though_jansson_loses_it);
        tcase_add_test(tc, test_last_duplicate_wins_and_escaped_names_match);
        tcase_add_test(tc, test_nested_member_of_that_name_is_not_a_top_level_one);
        tcase_add_test(tc, test_several_members_in_one_pass);
        tcase_add_test(tc, test_skim_skips_unwanted_values_unchecked_and_still_finds_the_top_level_member);
        tcase_add_test(tc, test_skim_still_refuses_a_text_whose_brackets_or_strings_do_not_close);
        tcase_add_test(tc, test_refusals_leave_ret_alone_and_bad_arguments_are_einval);
        tcase_add_test(tc, test_member_reads_inside_a_found_object);
        tcase_add_test(tc, test_string_decodes_escapes_and_surrogate_pairs);
        tcase_add_test(tc, test_string_too_long_is_enobufs_and_leaves_buf_untouched);
        tcase_add_test(tc, test_string_functions_refuse_other_types);
        tcase_add_test(tc, test_string_eq_is_exact);
        tcase_add_test(tc, test_uint_takes_plain_non_negative_integers_only);
        tcase_add_test(tc, test_double_rounds_like_strtod_and_refuses_overflow_like_jansson);
        tcase_add_test(tc, test_double_keeps_long_mantissas_exact_at_the_rounding_edge);
        tcase_add_test(tc, test_document_with_jansson_numbers_refuses_what_jansson_refuses_at_the_int64_edges);
        tcase_add_test(tc, test_walk_yields_every_member_in_order_duplicates_included_then_zero);
        tcase_add_test(tc, test_walk_over_an_array_gives_elements_of_every_type_and_no_names);
        tcase_add_test(tc, test_walk_over_a_hand_made_broken_value_is_einval_and_stays_so_leaving_ret_alone);
        tcase_add_test(tc, test_iter_init_refuses_what_is_not_a_container);
        tcase_add_test(tc, test_next_members_finds_fields_of_each_object_element_in_any_order);
        tcase_add_test(tc, test_next_members_on_a_broken_element_is_einval_and_leaves_ret_alone);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(jscan_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
