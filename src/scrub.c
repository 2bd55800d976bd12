/* scrub.c — keeping secrets out of text that came from an upstream.
 *
 * Owns the scrubber: copies of the configured secrets and an index to find them in one pass.
 * Providers echo what they were sent (the Authorization header in an error body, the key in a
 * message), so any upstream text may hold a secret verbatim; see scrub.h for what is hidden.
 *
 * Finding many secrets in one pass: keys of one provider share their first bytes ("sk-or-v1-"),
 * but not their last, so each secret is filed under a hash of its last SCRUB_TAIL bytes. The
 * text is read once; at each position the SCRUB_TAIL bytes ending there pick one bucket, and only
 * the secrets filed there are compared. The few secrets shorter than SCRUB_TAIL are compared at
 * every position.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/conf.h"
#include "keypool/keyid.h"
#include "keypool/scrub.h"

#define SCRUB_TAIL 8
#define SCRUB_REPLACEMENT "[redacted]"
/* A word this long with letters and digits, or this long at all, is no word of any language. */
#define SCRUB_MIXED_WORD 24
#define SCRUB_LONG_WORD  32

struct scrub_secret {
        char *text;
        size_t len;
        uint64_t tail;          /* its last SCRUB_TAIL bytes, as loaded */
        uint32_t next;          /* next in its bucket, UINT32_MAX: none */
};

struct scrub {
        struct scrub_secret *secrets;
        size_t n, cap;
        uint32_t *buckets;      /* first secret of each bucket, UINT32_MAX: none */
        size_t n_buckets;       /* a power of two */
        size_t n_short;         /* secrets[0..n_short) are shorter than SCRUB_TAIL (after seal) */
};

static uint64_t load_tail(const char *end) {
        uint64_t v;

        memcpy(&v, end - SCRUB_TAIL, SCRUB_TAIL);
        return v;
}

static size_t bucket_of(const struct scrub *s, uint64_t tail) {
        return (size_t) ((tail * 0x9E3779B97F4A7C15ULL) >> 32) & (s->n_buckets - 1);
}

int scrub_new(struct scrub **ret) {
        struct scrub *s = calloc(1, sizeof *s);

        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

int scrub_add(struct scrub *s, const char *secret, size_t len) {
        struct scrub_secret *e;

        if (!s || (!secret && len > 0))
                return -EINVAL;
        if (len < SCRUB_MIN_SECRET)
                return 0;
        if (s->n == s->cap) {
                size_t cap = s->cap ? s->cap * 2 : 16;
                struct scrub_secret *n = realloc(s->secrets, cap * sizeof *n);

                if (!n)
                        return -ENOMEM;
                s->secrets = n;
                s->cap = cap;
        }
        e = &s->secrets[s->n];
        e->text = malloc(len);
        if (!e->text)
                return -ENOMEM;
        memcpy(e->text, secret, len);
        e->len = len;
        e->tail = len >= SCRUB_TAIL ? load_tail(secret + len) : 0;
        e->next = UINT32_MAX;
        s->n++;
        return 0;
}

static int by_length(const void *a, const void *b) {
        const struct scrub_secret *x = a, *y = b;

        return (x->len > y->len) - (x->len < y->len);
}

int scrub_seal(struct scrub *s) {
        size_t nb = 16;

        if (!s)
                return -EINVAL;
        if (s->n > UINT32_MAX - 1)
                return -E2BIG;
        /* Short secrets first: they are the ones compared everywhere. */
        if (s->n > 1)
                qsort(s->secrets, s->n, sizeof *s->secrets, by_length);
        s->n_short = 0;
        while (s->n_short < s->n && s->secrets[s->n_short].len < SCRUB_TAIL)
                s->n_short++;
        while (nb < 2 * s->n)
                nb *= 2;
        free(s->buckets);
        s->buckets = malloc(nb * sizeof *s->buckets);
        if (!s->buckets)
                return -ENOMEM;
        s->n_buckets = nb;
        memset(s->buckets, 0xff, nb * sizeof *s->buckets);
        for (size_t i = s->n_short; i < s->n; i++) {
                size_t b = bucket_of(s, s->secrets[i].tail);

                s->secrets[i].next = s->buckets[b];
                s->buckets[b] = (uint32_t) i;
        }
        return 0;
}

int scrub_from_config(const struct config *c, struct scrub **ret) {
        struct scrub *s;
        int r;

        r = scrub_new(&s);
        if (r < 0)
                return r;
        for (unsigned p = 0; c && p < c->n_pools; p++)
                for (unsigned k = 0; k < c->pools[p].n_keys; k++) {
                        const char *secret = c->pools[p].keys[k].secret;

                        r = secret ? scrub_add(s, secret, strlen(secret)) : 0;
                        if (r < 0)
                                goto fail;
                }
        r = scrub_seal(s);
        if (r < 0)
                goto fail;
        *ret = s;
        return 0;
fail:
        scrub_free(s);
        return r;
}

void scrub_free(struct scrub *s) {
        if (!s)
                return;
        for (size_t i = 0; i < s->n; i++) {
                explicit_bzero(s->secrets[i].text, s->secrets[i].len);
                free(s->secrets[i].text);
        }
        free(s->secrets);
        free(s->buckets);
        free(s);
}

/* --- finding ------------------------------------------------------------------------------- */

static void hide(unsigned char *marks, size_t from, size_t to) {
        memset(marks + from, 1, to - from);
}

/* Marks every configured secret in text. */
static void mark_secrets(const struct scrub *s, const char *text, size_t len, unsigned char *marks) {
        if (!s || s->n == 0)
                return;
        for (size_t end = 1; end <= len; end++) {
                for (size_t i = 0; i < s->n_short; i++) {
                        const struct scrub_secret *e = &s->secrets[i];

                        if (e->len <= end && memcmp(text + end - e->len, e->text, e->len) == 0)
                                hide(marks, end - e->len, end);
                }
                if (end < SCRUB_TAIL || !s->buckets)
                        continue;
                uint64_t tail = load_tail(text + end);

                for (uint32_t i = s->buckets[bucket_of(s, tail)]; i != UINT32_MAX; i = s->secrets[i].next) {
                        const struct scrub_secret *e = &s->secrets[i];

                        if (e->tail == tail && e->len <= end && memcmp(text + end - e->len, e->text, e->len) == 0)
                                hide(marks, end - e->len, end);
                }
        }
}

static bool is_alpha(char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

static bool is_digit(char c) {
        return c >= '0' && c <= '9';
}

/* The characters of a word that may be a key: what providers' keys and base64 are made of. */
static bool word_char(char c) {
        return is_alpha(c) || is_digit(c) || c == '-' || c == '_' || c == '.' || c == '~' || c == '+' ||
               c == '/' || c == '=';
}

/* Where a credential value ends: white space, quotes, JSON and list punctuation. */
static bool value_end(char c) {
        return (unsigned char) c <= 0x20 || c == '"' || c == '\'' || c == ',' || c == ';' || c == '}' ||
               c == ']' || c == ')' || c == '<' || c == '>' || c == '\\' || c == 0x7f;
}

static bool starts_ci(const char *text, size_t len, size_t at, const char *word) {
        size_t n = strlen(word);

        if (at + n > len)
                return false;
        for (size_t i = 0; i < n; i++) {
                char a = text[at + i], b = word[i];

                if (a >= 'A' && a <= 'Z')
                        a = (char) (a - 'A' + 'a');
                if (a != b)
                        return false;
        }
        return true;
}

/* Hides the value that starts at or after i (skipping the separators in skip). Returns where
 * the value ends. */
static size_t hide_value(const char *text, size_t len, size_t i, const char *skip, unsigned char *marks) {
        size_t start;

        while (i < len && text[i] && strchr(skip, text[i]))
                i++;
        start = i;
        while (i < len && !value_end(text[i]))
                i++;
        if (i > start)
                hide(marks, start, i);
        return i;
}

/* Auth header names as providers' errors (and echoing servers) write them: the value after
 * the name and a ':' or '=' is a credential. */
static const char *const auth_names[] = {
        "authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "api-key", "api_key",
        "apikey", "x-auth-token", "access_token",
};

/* Marks the value of "Bearer <v>" and of "<auth header>: <v>" / "<name>=<v>" / "<name>":"<v>". */
static void mark_auth_values(const char *text, size_t len, unsigned char *marks) {
        for (size_t i = 0; i < len; i++) {
                /* Names start a word: "myapikey" is not an auth header. */
                if (i > 0 && (is_alpha(text[i - 1]) || is_digit(text[i - 1]) || text[i - 1] == '-' ||
                              text[i - 1] == '_'))
                        continue;
                if (starts_ci(text, len, i, "bearer") && i + 6 < len && (text[i + 6] == ' ' || text[i + 6] == '\t')) {
                        hide_value(text, len, i + 6, " \t", marks);
                        continue;
                }
                for (size_t n = 0; n < sizeof auth_names / sizeof auth_names[0]; n++) {
                        size_t j = i + strlen(auth_names[n]), k;

                        if (!starts_ci(text, len, i, auth_names[n]))
                                continue;
                        /* The name, then its separator: the closing quote of a JSON name, ':' or '='. */
                        k = j;
                        while (k < len && (text[k] == '"' || text[k] == '\'' || text[k] == ' ' || text[k] == '\t'))
                                k++;
                        if (k >= len || (text[k] != ':' && text[k] != '='))
                                continue;
                        k++;
                        while (k < len && (text[k] == '"' || text[k] == '\'' || text[k] == ' ' || text[k] == '\t'))
                                k++;
                        /* "Authorization: Bearer <v>": the scheme is no secret, what follows is. */
                        if (starts_ci(text, len, k, "bearer ") || starts_ci(text, len, k, "basic ") ||
                            starts_ci(text, len, k, "token "))
                                while (k < len && text[k] != ' ')
                                        k++;
                        hide_value(text, len, k, " \t", marks);
                        break;
                }
        }
}

/* Marks words that start like a provider's key, and words too long to be words. */
static void mark_key_shaped_words(const char *text, size_t len, unsigned char *marks) {
        size_t i = 0;

        while (i < len) {
                size_t start, end, prefix;
                bool letters = false, digits = false;

                if (!word_char(text[i])) {
                        i++;
                        continue;
                }
                start = i;
                while (i < len && word_char(text[i])) {
                        letters |= is_alpha(text[i]);
                        digits |= is_digit(text[i]);
                        i++;
                }
                /* A sentence's full stop ends the word, not the key. */
                end = i;
                while (end > start && text[end - 1] == '.')
                        end--;
                prefix = keyid_prefix_len(text + start, end - start);
                if ((prefix > 0 && end - start > prefix) || end - start >= SCRUB_LONG_WORD ||
                    (end - start >= SCRUB_MIXED_WORD && letters && digits))
                        hide(marks, start, end);
        }
}

/* Rewrites text with every marked run replaced. The replacement is never longer than the run. */
static size_t compact(char *text, size_t len, const unsigned char *marks) {
        size_t out = 0, i = 0;

        while (i < len) {
                size_t run;

                if (!marks[i]) {
                        text[out++] = text[i++];
                        continue;
                }
                run = 0;
                while (i + run < len && marks[i + run])
                        run++;
                if (run >= sizeof SCRUB_REPLACEMENT - 1) {
                        memcpy(text + out, SCRUB_REPLACEMENT, sizeof SCRUB_REPLACEMENT - 1);
                        out += sizeof SCRUB_REPLACEMENT - 1;
                } else {
                        memset(text + out, '*', run);
                        out += run;
                }
                i += run;
        }
        return out;
}

static size_t scrub(const struct scrub *s, char *buf, size_t len, bool shapes) {
        unsigned char *marks;
        size_t out;

        if (!buf || len == 0 || (!shapes && (!s || s->n == 0)))
                return buf ? len : 0;
        marks = calloc(len, 1);
        if (!marks) {
                /* Without room to mark, hide everything: a message lost beats a key shown. */
                memset(buf, '*', len);
                return len;
        }
        mark_secrets(s, buf, len, marks);
        if (shapes) {
                mark_auth_values(buf, len, marks);
                mark_key_shaped_words(buf, len, marks);
        }
        out = compact(buf, len, marks);
        free(marks);
        return out;
}

size_t scrub_secrets(const struct scrub *s, char *buf, size_t len) {
        return scrub(s, buf, len, false);
}

size_t scrub_text(const struct scrub *s, char *buf, size_t len) {
        return scrub(s, buf, len, true);
}
