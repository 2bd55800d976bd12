/* jscan.h — reading one or two members out of a JSON object without building a tree.
 *
 * The hot path needs a request's "model" and an answer's usage counts, not a parsed document.
 * jscan validates the whole text in one pass (accepting and refusing exactly what jansson's
 * json_loadb(…, 0, …) accepts and refuses for an object, except that numbers are only checked for
 * syntax, any size being fine, and that a raw NUL byte is always refused, where jansson lets one
 * through right after a number or literal) and hands back the raw text span of the members asked for. Nothing is
 * allocated, nothing is copied, and values are decoded only when the caller asks.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JSCAN_MAX_DEPTH 2048    /* as jansson's JSON_PARSER_MAX_DEPTH: the top object is depth 1 */
#define JSCAN_MAX_NAMES 16      /* members one call can look for */

enum jscan_type {
        JSCAN_NONE = 0,         /* no such member */
        JSCAN_OBJECT,
        JSCAN_ARRAY,
        JSCAN_STRING,
        JSCAN_NUMBER,
        JSCAN_TRUE,
        JSCAN_FALSE,
        JSCAN_NULL,
        _JSCAN_TYPE_MAX,
};

/* A value's raw text inside the scanned buffer (strings include their quotes). Only meaningful
 * while that buffer lives; text is NULL and len 0 for JSCAN_NONE. */
struct jscan_value {
        enum jscan_type type;
        const char *text;
        size_t len;
};

/* s[0..len) must be exactly one JSON object, white space around it allowed, valid the way
 * json_loadb(…, 0, …) wants it: UTF-8 checked, no NUL (raw or \u0000), no lone surrogates, depth
 * at most JSCAN_MAX_DEPTH. Finds the last top-level member whose decoded name equals name
 * (jansson keeps the last duplicate too). Returns 0 and writes ret (JSCAN_NONE when absent), or
 * -EINVAL when the text is not a valid JSON object (ret untouched). */
int jscan_object_member(const char *s, size_t len, const char *name, struct jscan_value *ret);

/* The same for up to JSCAN_MAX_NAMES names in the one pass: ret[i] is the member names[i]. */
int jscan_object_members(const char *s, size_t len, const char *const *names, size_t n_names,
                         struct jscan_value *ret);

/* What jscan_document can check beyond the rules every function here applies. */
#define JSCAN_JANSSON_NUMBERS 0x1u      /* refuse every number jansson refuses: an integer (no
                                         * fraction, no exponent) outside int64_t, a real whose
                                         * magnitude overflows a double */

#define JSCAN_SKIM_OTHERS 0x2u          /* the values of top-level members not asked for are only
                                         * skipped (to their end, brackets matched, strings whole),
                                         * not validated: for reading figures out of a text taken
                                         * as it is, where a full check costs more than the read */

/* jscan_object_members with flags: a whole document validated in the one pass, with jansson's
 * number limits on request, so that the text is refused exactly when json_loadb(…, 0, …) refuses
 * it or reads something other than an object (a raw NUL byte aside, as above). n_names may be 0:
 * validation alone. -EINVAL for unknown flags too. */
int jscan_document(const char *s, size_t len, unsigned flags, const char *const *names,
                   size_t n_names, struct jscan_value *ret);

/* jscan_document, and in the same pass the members sub_names[j] of the object that is member
 * names[sub] (its last one, as in ret[sub]): sub_ret[j], JSCAN_NONE when absent, and all
 * JSCAN_NONE when ret[sub] is not an object. What jscan_members on ret[sub] would find, without
 * the second scan: for a figure one level down, an answer's usage counts. Up to JSCAN_MAX_NAMES
 * sub_names; -EINVAL when sub is not below n_names. */
int jscan_document_sub(const char *s, size_t len, unsigned flags, const char *const *names,
                       size_t n_names, struct jscan_value *ret, size_t sub,
                       const char *const *sub_names, size_t n_sub, struct jscan_value *sub_ret);

/* Members of an object value jscan returned (so already valid). -EINVAL when obj is not an
 * object; ret->type JSCAN_NONE when the member is absent. */
int jscan_member(const struct jscan_value *obj, const char *name, struct jscan_value *ret);
int jscan_members(const struct jscan_value *obj, const char *const *names, size_t n_names,
                  struct jscan_value *ret);

/* A string value decoded (escapes and surrogate pairs to UTF-8) into buf, NUL-terminated, and its
 * decoded length (without the NUL) in ret_len (may be NULL). -ENOBUFS when the text and its NUL
 * do not fit in size bytes: buf is then left untouched. -EINVAL when v is not a string. The
 * decoded text never contains NUL (jscan refuses \u0000). */
int jscan_string(const struct jscan_value *v, char *buf, size_t size, size_t *ret_len);

/* True when v is a string whose decoded text is exactly s. No buffer needed. */
bool jscan_string_eq(const struct jscan_value *v, const char *s);

/* A non-negative integer written without fraction or exponent: 12 → 12 (and -0 → 0, the
 * integer jansson reads); 12.0, 1e3, -1 or "12" → -EINVAL; -ERANGE past UINT64_MAX. */
int jscan_uint(const struct jscan_value *v, uint64_t *ret);

/* Any number as a double, correctly rounded. -ERANGE when its magnitude overflows a double
 * (jansson refuses such a document: "real number overflow"); underflow gives 0 or a subnormal.
 * -EINVAL when v is not a number. */
int jscan_double(const struct jscan_value *v, double *ret);

/* Walking the elements of an array value or the members of an object value jscan returned, in
 * the order of the text, duplicates included (jscan_member keeps the last one; a walk sees them
 * all). Nothing is allocated; the iterator is only meaningful while the text lives. */
struct jscan_iter {
        const char *pos;        /* where the next element, or the comma before it, begins */
        const char *end;        /* the container's closing bracket */
        bool object;
        int state;
};

/* -EINVAL when v is not an object or array value. */
int jscan_iter_init(const struct jscan_value *v, struct jscan_iter *ret);

/* The next element: returns 1 and writes ret_value and ret_name (a member's name as a
 * JSCAN_STRING value, quotes included, for jscan_string/jscan_string_eq; JSCAN_NONE in an
 * array); either may be NULL. Returns 0 after the last one (and again on every later call), or
 * -EINVAL when the text turns out not to be valid JSON (a hand-made value; again on every later
 * call), leaving both untouched. Each element is validated as it is stepped over. */
int jscan_next(struct jscan_iter *it, struct jscan_value *ret_name, struct jscan_value *ret_value);

/* jscan_next for a walk over objects, the elements of "keys" say: when the next element is an
 * object, ret_members[i] is its member names[i] (JSCAN_NONE when absent; the last one of a
 * duplicated name), found in the same step that validates it, so no second scan of the element
 * as with jscan_members. For an element that is not an object every ret_members[i] is JSCAN_NONE
 * (ret_value says what it is). Up to JSCAN_MAX_NAMES names, distinct (a name given twice is
 * found at one of its places), fastest in the order the members are usually written in; returns
 * as jscan_next, and writes
 * ret_members and ret_value (may be NULL) only when it returns 1. */
int jscan_next_members(struct jscan_iter *it, const char *const *names, size_t n_names,
                       struct jscan_value *ret_members, struct jscan_value *ret_value);
