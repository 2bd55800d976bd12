/* fuzz_jscan.c — jscan against jansson, differentially.
 *
 * jscan promises to accept and refuse exactly what json_loadb(…, 0, …) does for an object (with
 * JSCAN_JANSSON_NUMBERS; a raw NUL byte always refused) and to find the same members: any
 * disagreement, on validity, a member's presence, type, string text or number, is an abort().
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "keypool/jscan.h"
#include "fuzz.h"

/* The names keypool looks for, and a few that fuzzed documents are likely to hold. */
static const char *const names[] = {
        "model", "usage", "error", "stream", "a", "", "prompt_tokens", "message", "\xc3\xa9",
};
#define N_NAMES (sizeof names / sizeof names[0])

static enum jscan_type type_of(const json_t *j) {
        switch (json_typeof(j)) {
        case JSON_OBJECT:       return JSCAN_OBJECT;
        case JSON_ARRAY:        return JSCAN_ARRAY;
        case JSON_STRING:       return JSCAN_STRING;
        case JSON_INTEGER:
        case JSON_REAL:         return JSCAN_NUMBER;
        case JSON_TRUE:         return JSCAN_TRUE;
        case JSON_FALSE:        return JSCAN_FALSE;
        case JSON_NULL:         return JSCAN_NULL;
        }
        return JSCAN_NONE;
}

/* One member found by both: same type, same decoded string, same number. */
static void compare_value(const struct jscan_value *v, const json_t *j) {
        CHECK(v->type == type_of(j));
        if (v->type == JSCAN_STRING) {
                size_t want = json_string_length(j), got;
                char *buf = malloc(want + 1);

                CHECK(buf);
                CHECK(jscan_string(v, buf, want + 1, &got) == 0);
                CHECK(got == want && memcmp(buf, json_string_value(j), want) == 0);
                CHECK(jscan_string_eq(v, json_string_value(j)));
                if (want > 0)
                        CHECK(jscan_string(v, buf, want, NULL) == -ENOBUFS);
                free(buf);
        } else if (v->type == JSCAN_NUMBER) {
                double d;
                uint64_t u;

                CHECK(jscan_double(v, &d) == 0);
                CHECK(d == json_number_value(j) || (d != d && json_number_value(j) != json_number_value(j)));
                if (json_is_integer(j) && json_integer_value(j) >= 0) {
                        CHECK(jscan_uint(v, &u) == 0);
                        CHECK(u == (uint64_t) json_integer_value(j));
                } else if (json_is_real(j)) {
                        CHECK(jscan_uint(v, &u) == -EINVAL);
                }
        } else if (v->type == JSCAN_OBJECT) {
                /* A walk sees every member jansson kept (duplicates too: at least as many). */
                struct jscan_iter it;
                struct jscan_value name, value;
                size_t n = 0;
                int r;

                CHECK(jscan_iter_init(v, &it) == 0);
                while ((r = jscan_next(&it, &name, &value)) == 1) {
                        char buf[256];

                        n++;
                        if (jscan_string(&name, buf, sizeof buf, NULL) == 0)
                                CHECK(json_object_get(j, buf) != NULL);
                }
                CHECK(r == 0);
                CHECK(n >= json_object_size(j));
        } else if (v->type == JSCAN_ARRAY) {
                struct jscan_iter it;
                struct jscan_value value;
                size_t n = 0;
                int r;

                CHECK(jscan_iter_init(v, &it) == 0);
                while ((r = jscan_next(&it, NULL, &value)) == 1) {
                        CHECK(n < json_array_size(j));
                        CHECK(value.type == type_of(json_array_get(j, n)));
                        n++;
                }
                CHECK(r == 0);
                CHECK(n == json_array_size(j));
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const char *s = (const char *) data;
        struct jscan_value got[N_NAMES], loose[N_NAMES], skimmed[N_NAMES];
        json_error_t err;
        json_t *doc;
        bool has_nul = memchr(s, 0, size) != NULL;
        bool j_ok, s_ok, loose_ok, skim_ok;

        doc = json_loadb(s, size, 0, &err);
        j_ok = doc && json_is_object(doc);
        s_ok = jscan_document(s, size, JSCAN_JANSSON_NUMBERS, names, N_NAMES, got) == 0;
        loose_ok = jscan_object_members(s, size, names, N_NAMES, loose) == 0;
        /* Skimming checks less, never more, and finds the same members when all is valid. */
        skim_ok = jscan_document(s, size, JSCAN_SKIM_OTHERS, names, N_NAMES, skimmed) == 0;
        if (loose_ok) {
                CHECK(skim_ok);
                for (size_t i = 0; i < N_NAMES; i++)
                        CHECK(skimmed[i].type == loose[i].type && skimmed[i].text == loose[i].text &&
                              skimmed[i].len == loose[i].len);
        }

        /* Members one level down, found in the same pass, are what a second look at the
         * member finds; the document is refused exactly when it is without them. */
        for (size_t sub = 0; sub < 2; sub++) {
                static const char *const sub_names[] = { "prompt_tokens", "a", "", "usage" };
                struct jscan_value top[N_NAMES], in[4], again[4];
                unsigned flags = sub ? JSCAN_SKIM_OTHERS : 0;
                bool ok = jscan_document_sub(s, size, flags, names, N_NAMES, top, sub, sub_names, 4, in) == 0;

                CHECK(ok == (sub ? skim_ok : loose_ok));
                if (!ok)
                        continue;
                if (top[sub].type == JSCAN_OBJECT)
                        CHECK(jscan_members(&top[sub], sub_names, 4, again) == 0);
                else
                        for (size_t j = 0; j < 4; j++)
                                again[j] = (struct jscan_value) { JSCAN_NONE, NULL, 0 };
                for (size_t j = 0; j < 4; j++)
                        CHECK(in[j].type == again[j].type && in[j].text == again[j].text && in[j].len == again[j].len);
        }

        if (has_nul) {
                /* jansson lets a raw NUL through after a number or literal; jscan never does. */
                CHECK(!s_ok && !loose_ok);
                goto out;
        }
        CHECK(j_ok == s_ok);
        /* Without jansson's number limits jscan refuses no more than jansson. */
        if (j_ok)
                CHECK(loose_ok);
        if (s_ok)
                CHECK(loose_ok);
        if (!s_ok)
                goto out;

        for (size_t i = 0; i < N_NAMES; i++) {
                json_t *m = json_object_get(doc, names[i]);

                CHECK((got[i].type != JSCAN_NONE) == (m != NULL));
                CHECK(got[i].type == loose[i].type && got[i].text == loose[i].text &&
                      got[i].len == loose[i].len);
                if (m)
                        compare_value(&got[i], m);
        }

        /* The single-name call and the member lookup on the whole object agree with the batch. */
        {
                struct jscan_value one, whole = { .type = JSCAN_OBJECT }, via;
                const char *p = s, *end = s + size;

                CHECK(jscan_object_member(s, size, names[0], &one) == 0);
                CHECK(one.type == got[0].type && one.text == got[0].text);
                while (p < end && *p != '{')
                        p++;
                while (end > p && end[-1] != '}')
                        end--;
                whole.text = p;
                whole.len = (size_t) (end - p);
                CHECK(jscan_member(&whole, names[0], &via) == 0);
                CHECK(via.type == got[0].type && via.text == got[0].text);
                compare_value(&whole, doc);
        }
out:
        json_decref(doc);
        return 0;
}
