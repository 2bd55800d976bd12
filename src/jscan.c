/* jscan.c — validating a JSON object and finding members in it, in one pass, without a tree.
 *
 * Owns the daemon's hot-path JSON reading: every proxied request's body (for its "model") and
 * every answer's usage. The rules are jansson's (json_loadb with no flags), byte for byte, so a
 * body jscan accepts is one jansson would have accepted and the other way round: the proxy must
 * not forward what it could not read, nor refuse what it used to serve. Two differences are
 * intended: numbers are checked for syntax only (jansson also refuses integers beyond int64 and
 * reals beyond a double), and every raw NUL byte is refused (jansson's lexer loses one that comes
 * right after a number or true/false/null, and accepts the text). Nothing here allocates, and
 * nothing recurses but the one pass jscan_document_sub makes of its member's object; nesting is a
 * bit stack of JSCAN_MAX_DEPTH bits on the C stack.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "keypool/jscan.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* What a byte inside a string's quotes asks the scanner to do. Lead bytes of UTF-8 sequences say
 * how long the sequence is; everything RFC 3629 forbids outright (continuation bytes out of place,
 * C0/C1 which can only start overlong forms, F5..FF beyond U+10FFFF) is BAD at once. */
enum {
        C_PLAIN = 0,
        C_QUOTE,
        C_ESCAPE,
        C_BAD,
        C_UTF8_2,
        C_UTF8_3,
        C_UTF8_4,
};

static const unsigned char string_class[256] = {
        [0x00 ... 0x1f] = C_BAD,        /* control characters must be escaped */
        ['"'] = C_QUOTE,
        ['\\'] = C_ESCAPE,
        [0x80 ... 0xc1] = C_BAD,
        [0xc2 ... 0xdf] = C_UTF8_2,
        [0xe0 ... 0xef] = C_UTF8_3,
        [0xf0 ... 0xf4] = C_UTF8_4,
        [0xf5 ... 0xff] = C_BAD,
};

#define ONES  UINT64_C(0x0101010101010101)
#define HIGHS UINT64_C(0x8080808080808080)

/* The high bit of every byte of w that needs a look: below 0x20, '"', '\\' or non-ASCII. A
 * borrow only spreads upwards from a byte that needs a look, so the lowest bit set is exact: on a
 * little-endian machine it is the first such byte in memory, and plain ASCII text — almost all of a
 * request — is skipped a word at a time. */
static inline uint64_t word_needs_look(uint64_t w) {
        uint64_t q = w ^ (ONES * '"'), b = w ^ (ONES * '\\');

        return (((w - ONES * 0x20) & ~w) | ((q - ONES) & ~q) | ((b - ONES) & ~b) | w) & HIGHS;
}

static inline bool is_digit(unsigned char c) {
        return (unsigned) (c - '0') < 10;
}

static inline int hex_digit(unsigned char c) {
        if ((unsigned) (c - '0') < 10)
                return c - '0';
        c |= 0x20;
        if ((unsigned) (c - 'a') < 6)
                return c - 'a' + 10;
        return -1;
}

/* The code unit of the four hex digits at p, or -1. */
static int hex4(const unsigned char *p, const unsigned char *end) {
        int v = 0;

        if (end - p < 4)
                return -1;
        for (int i = 0; i < 4; i++) {
                int d = hex_digit(p[i]);

                if (d < 0)
                        return -1;
                v = v << 4 | d;
        }
        return v;
}

static inline bool is_ws(unsigned char c) {
        return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

static inline const unsigned char *skip_ws(const unsigned char *p, const unsigned char *end) {
        /* Most tokens follow the previous one directly: one compare says so. */
        while (p < end && *p <= ' ' && is_ws(*p))
                p++;
        return p;
}

/* The escape at *pp (which points at the backslash) as a code point, moving *pp past it: one
 * \uXXXX, or two for a surrogate pair. -1 for anything jansson refuses: an unknown escape, a bad
 * hex digit, \u0000, a lone or reversed surrogate. */
static int32_t read_escape(const unsigned char **pp, const unsigned char *end) {
        const unsigned char *p = *pp;
        int32_t cp, lo;

        if (end - p < 2)
                return -1;
        switch (p[1]) {
        case '"':
        case '\\':
        case '/':
                cp = p[1];
                break;
        case 'b':
                cp = '\b';
                break;
        case 'f':
                cp = '\f';
                break;
        case 'n':
                cp = '\n';
                break;
        case 'r':
                cp = '\r';
                break;
        case 't':
                cp = '\t';
                break;
        case 'u':
                cp = hex4(p + 2, end);
                if (cp <= 0)
                        return -1;
                p += 6;
                if (cp >= 0xdc00 && cp <= 0xdfff)
                        return -1;
                if (cp >= 0xd800 && cp <= 0xdbff) {
                        if (end - p < 2 || p[0] != '\\' || p[1] != 'u')
                                return -1;
                        lo = hex4(p + 2, end);
                        if (lo < 0xdc00 || lo > 0xdfff)
                                return -1;
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                        p += 6;
                }
                *pp = p;
                return cp;
        default:
                return -1;
        }
        *pp = p + 2;
        return cp;
}

#ifdef __SSE2__
/* word_needs_look for the 16 bytes at p, one bit a byte: a signed compare below 0x20 takes in
 * the control characters and every non-ASCII byte at once. */
static inline unsigned block_needs_look(const unsigned char *p) {
        __m128i v = _mm_loadu_si128((const __m128i *) (const void *) p);
        __m128i m = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('"')),
                                              _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))),
                                 _mm_cmplt_epi8(v, _mm_set1_epi8(0x20)));

        return (unsigned) _mm_movemask_epi8(m);
}
#endif

/* scan_string past its first look: everything but a plain string that ends soon. */
static __attribute__((noinline)) int scan_string_rest(const unsigned char **pp, const unsigned char *end,
                                                      bool *escaped) {
        const unsigned char *p = *pp;

        for (;;) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#ifdef __SSE2__
                while (end - p >= 16) {
                        unsigned look = block_needs_look(p);

                        if (look) {
                                p += __builtin_ctz(look);
                                goto special;
                        }
                        p += 16;
                }
#endif
                while (end - p >= 8) {
                        uint64_t w, look;

                        memcpy(&w, p, sizeof(w));
                        look = word_needs_look(w);
                        if (look) {
                                p += __builtin_ctzll(look) / 8;
                                goto special;
                        }
                        p += 8;
                }
#endif
                while (p < end && string_class[*p] == C_PLAIN)
                        p++;
                if (p >= end)
                        return -EINVAL;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        special:
#endif
                switch (string_class[*p]) {
                case C_QUOTE:
                        *pp = p + 1;
                        return 0;
                case C_ESCAPE:
                        *escaped = true;
                        if (read_escape(&p, end) < 0)
                                return -EINVAL;
                        break;
                case C_UTF8_2:
                        if (end - p < 2 || (p[1] & 0xc0) != 0x80)
                                return -EINVAL;
                        p += 2;
                        break;
                case C_UTF8_3:
                        if (end - p < 3 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 ||
                            (p[0] == 0xe0 && p[1] < 0xa0) ||    /* overlong */
                            (p[0] == 0xed && p[1] >= 0xa0))     /* UTF-16 surrogate */
                                return -EINVAL;
                        p += 3;
                        break;
                case C_UTF8_4:
                        if (end - p < 4 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 ||
                            (p[3] & 0xc0) != 0x80 ||
                            (p[0] == 0xf0 && p[1] < 0x90) ||    /* overlong */
                            (p[0] == 0xf4 && p[1] >= 0x90))     /* beyond U+10FFFF */
                                return -EINVAL;
                        p += 4;
                        break;
                default:
                        return -EINVAL;
                }
        }
}

/* Validates a string body from *pp (just past the opening quote) to its closing quote and moves
 * *pp past that quote. Sets *escaped when the body holds a backslash, so names without one can be
 * compared with memcmp. Most strings of a request or an answer are short and plain: one look at
 * 16 bytes finds their closing quote, here, without a call. */
static inline int scan_string(const unsigned char **pp, const unsigned char *end, bool *escaped) {
#ifdef __SSE2__
        const unsigned char *p = *pp;

        while (end - p >= 16) {
                unsigned look = block_needs_look(p);

                if (look) {
                        p += __builtin_ctz(look);
                        if (*p == '"') {
                                *pp = p + 1;
                                return 0;
                        }
                        break;
                }
                p += 16;
        }
        /* Every byte before p is plain: the rest goes on from there. */
        *pp = p;
#endif
        return scan_string_rest(pp, end, escaped);
}

static int scan_number(const unsigned char **pp, const unsigned char *end) {
        const unsigned char *p = *pp;

        if (*p == '-')
                p++;
        if (p >= end)
                return -EINVAL;
        if (*p == '0')
                p++;        /* a digit after it is caught by the caller: it expects , ] } */
        else if (is_digit(*p))
                while (p < end && is_digit(*p))
                        p++;
        else
                return -EINVAL;
        if (p < end && *p == '.') {
                p++;
                if (p >= end || !is_digit(*p))
                        return -EINVAL;
                while (p < end && is_digit(*p))
                        p++;
        }
        if (p < end && (*p | 0x20) == 'e') {
                p++;
                if (p < end && (*p == '+' || *p == '-'))
                        p++;
                if (p >= end || !is_digit(*p))
                        return -EINVAL;
                while (p < end && is_digit(*p))
                        p++;
        }
        *pp = p;
        return 0;
}

static enum jscan_type type_of(unsigned char c) {
        switch (c) {
        case '{':
                return JSCAN_OBJECT;
        case '[':
                return JSCAN_ARRAY;
        case '"':
                return JSCAN_STRING;
        case 't':
                return JSCAN_TRUE;
        case 'f':
                return JSCAN_FALSE;
        case 'n':
                return JSCAN_NULL;
        default:
                return JSCAN_NUMBER;
        }
}

static size_t put_utf8(int32_t cp, char *out) {
        if (cp < 0x80) {
                out[0] = (char) cp;
                return 1;
        }
        if (cp < 0x800) {
                out[0] = (char) (0xc0 | cp >> 6);
                out[1] = (char) (0x80 | (cp & 0x3f));
                return 2;
        }
        if (cp < 0x10000) {
                out[0] = (char) (0xe0 | cp >> 12);
                out[1] = (char) (0x80 | (cp >> 6 & 0x3f));
                out[2] = (char) (0x80 | (cp & 0x3f));
                return 3;
        }
        out[0] = (char) (0xf0 | cp >> 18);
        out[1] = (char) (0x80 | (cp >> 12 & 0x3f));
        out[2] = (char) (0x80 | (cp >> 6 & 0x3f));
        out[3] = (char) (0x80 | (cp & 0x3f));
        return 4;
}

/* Compares an escaped string body with s, decoding as it goes. The body is known valid. */
static bool body_eq(const unsigned char *p, const unsigned char *end, const char *s) {
        const unsigned char *q = (const unsigned char *) s;

        while (p < end) {
                char u[4];
                int32_t cp;
                size_t n;

                if (*p != '\\') {
                        if (*q != *p)
                                return false;
                        p++, q++;
                        continue;
                }
                cp = read_escape(&p, end);
                if (cp < 0)
                        return false;
                n = put_utf8(cp, u);
                /* s ends in NUL and u never holds one, so a short s fails before running out. */
                for (size_t i = 0; i < n; i++, q++)
                        if (*q != (unsigned char) u[i])
                                return false;
        }
        return *q == 0;
}

struct wanted {
        const char *const *names;
        size_t lens[JSCAN_MAX_NAMES];
        size_t n;
        bool in_order;          /* names distinct, and members likely in their order */
        /* Members wanted one level down, in the object that is member sub_of: found[n + j] is
         * sub's name j. NULL for none. */
        const struct wanted *sub;
        size_t sub_of;
};

static inline bool name_is(const struct wanted *w, size_t i, const unsigned char *name, size_t len,
                           bool escaped) {
        if (escaped)
                return body_eq(name, name + len, w->names[i]);
        return len == w->lens[i] && (len == 0 || (name[0] == (unsigned char) w->names[i][0] &&
                                                  memcmp(name, w->names[i], len) == 0));
}

/* *hint is where the search begins when w->in_order: a document its own program wrote has the
 * members in the order asked for, so the one after the last match is nearly always the next. */
static int match_name(const struct wanted *w, const unsigned char *name, size_t len, bool escaped,
                      size_t *hint) {
        if (w->in_order && *hint < w->n && name_is(w, *hint, name, len, escaped))
                return (int) (*hint)++;
        for (size_t i = 0; i < w->n; i++)
                if (name_is(w, i, name, len, escaped)) {
                        *hint = i + 1;
                        return (int) i;
                }
        return -1;
}

#define IS_OBJECT(stack, level) ((stack)[((level) - 1) / 64] >> (((level) - 1) % 64) & 1)
/* A word of the stack is written whole when its first level is pushed, so the stack needs no
 * clearing first: most values never leave its first word. */
#define PUSH(stack, level, obj)                                                                        \
        do {                                                                                           \
                unsigned _bit = ((level) - 1) % 64;                                                    \
                uint64_t *_word = &(stack)[((level) - 1) / 64];                                        \
                uint64_t _kept = _bit == 0 ? 0 : *_word & ((UINT64_C(1) << _bit) - 1);                 \
                *_word = _kept | (uint64_t) !!(obj) << _bit;                                           \
        } while (0)

/* Does the number [p, end) (valid syntax) stay within what jansson reads? An integer (no fraction,
 * no exponent) must fit an int64_t; anything else must not overflow a double. */
static bool number_fits_jansson(const unsigned char *p, const unsigned char *end) {
        const unsigned char *digits = p + (*p == '-');
        size_t n = (size_t) (end - digits);
        double x;

        for (const unsigned char *q = digits; q < end; q++)
                if (*q == '.' || (*q | 0x20) == 'e')
                        return jscan_double(&(struct jscan_value) { JSCAN_NUMBER, (const char *) p,
                                                                    (size_t) (end - p) },
                                            &x) == 0;
        /* No leading zeros in JSON: the digit count says most of it. */
        if (n != 19)
                return n < 19;
        return memcmp(digits, *p == '-' ? "9223372036854775808" : "9223372036854775807", 19) <= 0;
}

/* A string, number or literal at *pp, moving *pp past it. */
static inline __attribute__((always_inline)) int scan_scalar(const unsigned char **pp,
                                                             const unsigned char *end, unsigned flags) {
        const unsigned char *p = *pp, *start = p;
        bool escaped;

        switch (*p) {
        case '"':
                p++;
                if (scan_string(&p, end, &escaped) < 0)
                        return -EINVAL;
                break;
        case 't':
        case 'f':
        case 'n': {
                const char *word = *p == 't' ? "true" : *p == 'f' ? "false" : "null";
                size_t n = strlen(word);

                if ((size_t) (end - p) < n || memcmp(p, word, n) != 0)
                        return -EINVAL;
                p += n;
                break;
        }
        case '-':
        case '0' ... '9':
                if (scan_number(&p, end) < 0)
                        return -EINVAL;
                if ((flags & JSCAN_JANSSON_NUMBERS) && !number_fits_jansson(start, p))
                        return -EINVAL;
                break;
        default:
                return -EINVAL;
        }
        *pp = p;
        return 0;
}

/* Skips one value at *pp without validating what is inside it: a string to its closing quote (its
 * escapes and UTF-8 still checked, as they are cheap to check on the way), a container to its
 * matching bracket, a scalar to what ends it. For JSCAN_SKIM_OTHERS: the members a reader does
 * not want, in a text it takes as it is. */
static int skim_value(const unsigned char **pp, const unsigned char *end) {
        const unsigned char *p = *pp;
        size_t depth = 0;
        bool escaped;

        do {
                if (p == end)
                        return -EINVAL;
                switch (*p) {
                case '"':
                        p++;
                        if (scan_string(&p, end, &escaped) < 0)
                                return -EINVAL;
                        continue;
                case '{':
                case '[':
                        depth++;
                        break;
                case '}':
                case ']':
                        if (depth == 0)
                                return -EINVAL;
                        depth--;
                        break;
                default:
                        if (depth == 0) {
                                while (p < end && *p != ',' && *p != '}' && *p != ']' && !is_ws(*p))
                                        p++;
                                *pp = p;
                                return 0;
                        }
                }
                p++;
        } while (depth > 0);
        *pp = p;
        return 0;
}

/* The one pass over one value at *pp (no white space before it): validates it, moves *pp just
 * past it, and when it is an object notes the last member of each wanted name in found[]. A
 * state machine over "expect a member name", "expect a value" and "a value ended" with the open
 * containers' kinds in a bit stack; `level` counts open containers, so the value being read sits
 * at depth level + 1 counting the value itself as depth 1, which may be at most max_depth. */
static int scan_container(const unsigned char **pp, const unsigned char *end, unsigned flags,
                          const struct wanted *w, struct jscan_value *found, unsigned max_depth) {
        const unsigned char *p = *pp, *name, *value = NULL;
        uint64_t objects[JSCAN_MAX_DEPTH / 64];         /* PUSH starts each word afresh */
        unsigned level = 0;
        size_t hint = 0;
        int member = -1, sub_member = w->sub ? (int) w->sub_of : -2;   /* -2: matches no member */
        bool escaped;

        goto expect_value;

expect_name:
        if (p == end || *p != '"')
                return -EINVAL;
        name = ++p;
        escaped = false;
        if (scan_string(&p, end, &escaped) < 0)
                return -EINVAL;
        if (level == 1)
                member = match_name(w, name, (size_t) (p - 1 - name), escaped, &hint);
        p = skip_ws(p, end);
        if (p == end || *p != ':')
                return -EINVAL;
        p = skip_ws(p + 1, end);
        if (level == 1 && member < 0 && (flags & JSCAN_SKIM_OTHERS)) {
                if (skim_value(&p, end) < 0)
                        return -EINVAL;
                goto after_value;
        }

expect_value:
        if (p == end || level >= max_depth)
                return -EINVAL;
        if (level == 1) {
                value = p;
                if (member == sub_member) {
                        /* Only the last member of that name counts, whatever came before. Its
                         * object is read by a pass of its own, as a document of one level less
                         * depth, and fully checked, whatever flags say of the others. */
                        for (size_t j = 0; j < w->sub->n; j++)
                                found[w->n + j] = (struct jscan_value) { JSCAN_NONE, NULL, 0 };
                        if (*p == '{') {
                                if (scan_container(&p, end, flags & ~JSCAN_SKIM_OTHERS, w->sub, found + w->n,
                                                   max_depth - 1) < 0)
                                        return -EINVAL;
                                goto after_value;
                        }
                }
        }
        if (*p == '{' || *p == '[') {
                bool obj = *p == '{';

                level++;
                PUSH(objects, level, obj);
                p = skip_ws(p + 1, end);
                if (p < end && *p == (obj ? '}' : ']')) {
                        p++;
                        level--;
                        goto after_value;
                }
                if (obj)
                        goto expect_name;
                goto expect_value;
        }
        if (scan_scalar(&p, end, flags) < 0)
                return -EINVAL;

after_value:
        /* A value ended inside the container at `level` (0: it was the outermost value). */
        if (level == 1 && member >= 0) {
                found[member] = (struct jscan_value) {
                        .type = type_of(*value),
                        .text = (const char *) value,
                        .len = (size_t) (p - value),
                };
                member = -1;
        }
        if (level == 0) {
                *pp = p;
                return 0;
        }
        p = skip_ws(p, end);
        if (p == end)
                return -EINVAL;
        if (*p == ',') {
                p = skip_ws(p + 1, end);
                if (IS_OBJECT(objects, level))
                        goto expect_name;
                goto expect_value;
        }
        if (*p != (IS_OBJECT(objects, level) ? '}' : ']'))
                return -EINVAL;
        p++;
        level--;
        goto after_value;
}

static const struct wanted no_names = { .n = 0 };

/* One value of any kind at *pp: scalars (most values) without the container machinery. */
static int scan_value(const unsigned char **pp, const unsigned char *end) {
        if (*pp == end)
                return -EINVAL;
        if (**pp == '{' || **pp == '[')
                return scan_container(pp, end, 0, &no_names, NULL, JSCAN_MAX_DEPTH);
        return scan_scalar(pp, end, 0);
}

/* s[0..len) as a JSON object with white space around it. */
static int scan_object(const char *s, size_t len, unsigned flags, const struct wanted *w,
                       struct jscan_value *found) {
        const unsigned char *p = (const unsigned char *) s, *end = p + len;

        p = skip_ws(p, end);
        if (p == end || *p != '{')
                return -EINVAL;
        if (scan_container(&p, end, flags, w, found, JSCAN_MAX_DEPTH) < 0)
                return -EINVAL;
        return skip_ws(p, end) == end ? 0 : -EINVAL;
}

/* Notes names[0..n) in w, with nothing wanted one level down. -EINVAL for a NULL name. */
static int wanted_init(struct wanted *w, const char *const *names, size_t n, bool in_order) {
        /* lens[] is not zeroed: it is read only as far as n. */
        w->names = names;
        w->n = n;
        w->in_order = in_order;
        w->sub = NULL;
        w->sub_of = 0;
        for (size_t i = 0; i < n; i++) {
                if (!names[i])
                        return -EINVAL;
                w->lens[i] = strlen(names[i]);
        }
        return 0;
}

/* ret[i] is names[i]; with n_sub > 0, sub_ret[j] is sub_names[j] inside member names[sub]. */
static int find_members(const char *s, size_t len, unsigned flags, const char *const *names,
                        size_t n_names, struct jscan_value *ret, size_t sub, const char *const *sub_names,
                        size_t n_sub, struct jscan_value *sub_ret) {
        struct jscan_value found[2 * JSCAN_MAX_NAMES];
        struct wanted w, sw;
        int r;

        if (!s || n_names > JSCAN_MAX_NAMES || (n_names > 0 && (!names || !ret)) ||
            (flags & ~(JSCAN_JANSSON_NUMBERS | JSCAN_SKIM_OTHERS)) || n_sub > JSCAN_MAX_NAMES ||
            (n_sub > 0 && (sub >= n_names || !sub_names || !sub_ret)))
                return -EINVAL;
        if (wanted_init(&w, names, n_names, false) < 0)
                return -EINVAL;
        if (n_sub > 0) {
                if (wanted_init(&sw, sub_names, n_sub, false) < 0)
                        return -EINVAL;
                w.sub = &sw;
                w.sub_of = sub;
        }
        for (size_t i = 0; i < n_names + n_sub; i++)
                found[i] = (struct jscan_value) { JSCAN_NONE, NULL, 0 };
        r = scan_object(s, len, flags, &w, found);
        if (r < 0)
                return r;
        if (n_names > 0)
                memcpy(ret, found, n_names * sizeof(*ret));
        if (n_sub > 0)
                memcpy(sub_ret, found + n_names, n_sub * sizeof(*sub_ret));
        return 0;
}

int jscan_object_members(const char *s, size_t len, const char *const *names, size_t n_names,
                         struct jscan_value *ret) {
        return find_members(s, len, 0, names, n_names, ret, 0, NULL, 0, NULL);
}

int jscan_object_member(const char *s, size_t len, const char *name, struct jscan_value *ret) {
        return find_members(s, len, 0, &name, 1, ret, 0, NULL, 0, NULL);
}

int jscan_document(const char *s, size_t len, unsigned flags, const char *const *names,
                   size_t n_names, struct jscan_value *ret) {
        return find_members(s, len, flags, names, n_names, ret, 0, NULL, 0, NULL);
}

int jscan_document_sub(const char *s, size_t len, unsigned flags, const char *const *names,
                       size_t n_names, struct jscan_value *ret, size_t sub,
                       const char *const *sub_names, size_t n_sub, struct jscan_value *sub_ret) {
        return find_members(s, len, flags, names, n_names, ret, sub, sub_names, n_sub, sub_ret);
}

/* An object jscan returned is valid already; scanning it again costs little next to the document
 * it came from (usage objects are a few dozen bytes) and keeps a hand-made jscan_value honest. */
int jscan_members(const struct jscan_value *obj, const char *const *names, size_t n_names,
                  struct jscan_value *ret) {
        if (!obj || obj->type != JSCAN_OBJECT)
                return -EINVAL;
        return find_members(obj->text, obj->len, 0, names, n_names, ret, 0, NULL, 0, NULL);
}

int jscan_member(const struct jscan_value *obj, const char *name, struct jscan_value *ret) {
        return jscan_members(obj, &name, 1, ret);
}

enum {
        ITER_FIRST = 0,         /* nothing returned yet: no comma before the next element */
        ITER_MORE,
        ITER_END,
        ITER_BROKEN,
};

int jscan_iter_init(const struct jscan_value *v, struct jscan_iter *ret) {
        bool obj;

        if (!v || (v->type != JSCAN_OBJECT && v->type != JSCAN_ARRAY) || !v->text || v->len < 2 ||
            !ret)
                return -EINVAL;
        obj = v->type == JSCAN_OBJECT;
        if (v->text[0] != (obj ? '{' : '[') || v->text[v->len - 1] != (obj ? '}' : ']'))
                return -EINVAL;
        *ret = (struct jscan_iter) {
                .pos = v->text + 1,
                .end = v->text + v->len - 1,
                .object = obj,
                .state = ITER_FIRST,
        };
        return 0;
}

/* Each element is validated as it is stepped over, so a hand-made value cannot lead the iterator
 * astray, and the container's closing bracket bounds every look: nothing past it is read. When w
 * asks for members, an object element's are noted in found[] in that same step. */
static int next(struct jscan_iter *it, const struct wanted *w, struct jscan_value *found,
                struct jscan_value *ret_name, struct jscan_value *ret_value) {
        const unsigned char *p, *end, *name = NULL, *value;
        size_t name_len = 0;

        if (it->state == ITER_END)
                return 0;
        p = (const unsigned char *) it->pos;
        end = (const unsigned char *) it->end;
        p = skip_ws(p, end);
        if (p == end) {
                it->state = ITER_END;
                return 0;
        }
        if (it->state == ITER_MORE) {
                if (*p != ',')
                        goto broken;
                p = skip_ws(p + 1, end);
        }
        if (it->object) {
                bool escaped = false;

                if (p == end || *p != '"')
                        goto broken;
                name = p++;
                if (scan_string(&p, end, &escaped) < 0)
                        goto broken;
                name_len = (size_t) (p - name);
                p = skip_ws(p, end);
                if (p == end || *p != ':')
                        goto broken;
                p = skip_ws(p + 1, end);
        }
        value = p;
        if (w->n > 0 && p < end && *p == '{') {
                if (scan_container(&p, end, 0, w, found, JSCAN_MAX_DEPTH) < 0)
                        goto broken;
        } else if (scan_value(&p, end) < 0)
                goto broken;

        it->pos = (const char *) p;
        it->state = ITER_MORE;
        if (ret_name)
                *ret_name = name ? (struct jscan_value) { JSCAN_STRING, (const char *) name, name_len }
                                 : (struct jscan_value) { JSCAN_NONE, NULL, 0 };
        if (ret_value)
                *ret_value = (struct jscan_value) {
                        .type = type_of(*value),
                        .text = (const char *) value,
                        .len = (size_t) (p - value),
                };
        return 1;

broken:
        it->state = ITER_BROKEN;
        return -EINVAL;
}

int jscan_next(struct jscan_iter *it, struct jscan_value *ret_name, struct jscan_value *ret_value) {
        if (!it || it->state == ITER_BROKEN || !it->pos || !it->end)
                return -EINVAL;
        return next(it, &no_names, NULL, ret_name, ret_value);
}

int jscan_next_members(struct jscan_iter *it, const char *const *names, size_t n_names,
                       struct jscan_value *ret_members, struct jscan_value *ret_value) {
        struct jscan_value found[JSCAN_MAX_NAMES];
        struct wanted w;
        int r;

        if (!it || it->state == ITER_BROKEN || !it->pos || !it->end || n_names > JSCAN_MAX_NAMES ||
            (n_names > 0 && (!names || !ret_members)))
                return -EINVAL;
        if (wanted_init(&w, names, n_names, true) < 0)
                return -EINVAL;
        for (size_t i = 0; i < n_names; i++)
                found[i] = (struct jscan_value) { JSCAN_NONE, NULL, 0 };
        r = next(it, &w, found, NULL, ret_value);
        if (r > 0 && n_names > 0)
                memcpy(ret_members, found, n_names * sizeof(*ret_members));
        return r;
}

static bool is_string(const struct jscan_value *v) {
        return v && v->type == JSCAN_STRING && v->text && v->len >= 2 && v->text[0] == '"' &&
               v->text[v->len - 1] == '"';
}

/* Decodes the body [p, end) into out (NULL: only count). Returns the decoded length or -EINVAL. */
static ssize_t decode(const unsigned char *p, const unsigned char *end, char *out) {
        size_t n = 0;

        while (p < end) {
                const unsigned char *bs = memchr(p, '\\', (size_t) (end - p));
                size_t run = (size_t) ((bs ? bs : end) - p);
                char u[4];
                int32_t cp;
                size_t k;

                if (out)
                        memcpy(out + n, p, run);
                n += run;
                p += run;
                if (!bs)
                        break;
                cp = read_escape(&p, end);
                if (cp < 0)
                        return -EINVAL;
                k = put_utf8(cp, u);
                if (out)
                        memcpy(out + n, u, k);
                n += k;
        }
        return (ssize_t) n;
}

int jscan_string(const struct jscan_value *v, char *buf, size_t size, size_t *ret_len) {
        const unsigned char *body, *end;
        ssize_t n;

        if (!is_string(v) || (!buf && size > 0))
                return -EINVAL;
        body = (const unsigned char *) v->text + 1;
        end = (const unsigned char *) v->text + v->len - 1;
        /* Decoding never lengthens (an escape is at least as long as the UTF-8 it stands for), so
         * a body shorter than the buffer fits; only otherwise count first, to leave buf alone. */
        if ((size_t) (end - body) >= size) {
                n = decode(body, end, NULL);
                if (n < 0)
                        return -EINVAL;
                if ((size_t) n >= size)
                        return -ENOBUFS;
        }
        n = decode(body, end, buf);
        if (n < 0)
                return -EINVAL;
        buf[n] = 0;
        if (ret_len)
                *ret_len = (size_t) n;
        return 0;
}

bool jscan_string_eq(const struct jscan_value *v, const char *s) {
        const unsigned char *body, *end;
        size_t len;

        if (!is_string(v) || !s)
                return false;
        body = (const unsigned char *) v->text + 1;
        end = (const unsigned char *) v->text + v->len - 1;
        len = (size_t) (end - body);
        if (!memchr(body, '\\', len))
                return strlen(s) == len && memcmp(body, s, len) == 0;
        return body_eq(body, end, s);
}

int jscan_uint(const struct jscan_value *v, uint64_t *ret) {
        const unsigned char *p, *end;
        uint64_t x = 0;

        if (!v || v->type != JSCAN_NUMBER || !v->text || v->len == 0 || !ret)
                return -EINVAL;
        p = (const unsigned char *) v->text;
        end = p + v->len;
        /* jansson reads -0 as the integer 0: a count of zero, not a negative one. */
        if (v->len == 2 && p[0] == '-' && p[1] == '0') {
                *ret = 0;
                return 0;
        }
        for (const unsigned char *q = p; q < end; q++)
                if (!is_digit(*q))
                        return -EINVAL;
        for (; p < end; p++) {
                unsigned d = (unsigned) (*p - '0');

                if (x > (UINT64_MAX - d) / 10)
                        return -ERANGE;
                x = x * 10 + d;
        }
        *ret = x;
        return 0;
}

/* Enough significant digits that cutting the rest (and standing a nonzero 1 in for them) cannot
 * change how strtod rounds: a double's exact decimal expansion has at most 767. */
#define DOUBLE_DIGITS 800
#define EXPONENT_CLAMP 100000   /* far beyond where any 801-digit mantissa overflows or underflows */

int jscan_double(const struct jscan_value *v, double *ret) {
        char buf[1 + DOUBLE_DIGITS + 1 + 32];
        const unsigned char *p, *end;
        long long scale = 0, exponent = 0;
        size_t n = 0, digits = 0;
        bool dropped = false;
        double x;

        if (!v || v->type != JSCAN_NUMBER || !v->text || v->len == 0 || !ret)
                return -EINVAL;
        p = (const unsigned char *) v->text;
        end = p + v->len;
        /* strtod reads only NUL-terminated text in the current locale's notation: rebuild the
         * number as [-]DIGITSeEXP, which is also where an endless mantissa is cut. */
        if (*p == '-')
                buf[n++] = *p++;
        for (bool fraction = false; p < end && (is_digit(*p) || *p == '.'); p++) {
                if (*p == '.') {
                        fraction = true;
                        continue;
                }
                if (digits == 0 && *p == '0') {
                        if (fraction)
                                scale--;
                        continue;
                }
                if (digits < DOUBLE_DIGITS) {
                        buf[n++] = (char) *p;
                        digits++;
                        if (fraction)
                                scale--;
                } else {
                        dropped |= *p != '0';
                        if (!fraction)
                                scale++;
                }
        }
        if (p < end && (*p | 0x20) == 'e') {
                bool negative = false;

                p++;
                if (p < end && (*p == '+' || *p == '-'))
                        negative = *p++ == '-';
                for (; p < end && is_digit(*p); p++)
                        if (exponent < EXPONENT_CLAMP)
                                exponent = exponent * 10 + (*p - '0');
                if (negative)
                        exponent = -exponent;
        }
        if (p != end)
                return -EINVAL;
        if (digits == 0) {
                /* buf holds only the sign so far, if any: buf[0] is not written otherwise. */
                *ret = n > 0 ? -0.0 : 0.0;
                return 0;
        }
        if (dropped) {
                buf[n++] = '1';
                scale--;
        }
        scale += exponent;
        if (scale > EXPONENT_CLAMP)
                scale = EXPONENT_CLAMP;
        if (scale < -EXPONENT_CLAMP)
                scale = -EXPONENT_CLAMP;
        snprintf(buf + n, sizeof(buf) - n, "e%lld", scale);
        x = strtod(buf, NULL);
        if (isinf(x))
                return -ERANGE;
        *ret = x;
        return 0;
}
