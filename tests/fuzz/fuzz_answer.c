/* fuzz_answer.c — the SSE event scanner fed in arbitrary splits, and the rest of an answer's life.
 *
 * Input: a flags byte, SPLIT_BYTES bytes that choose where the stream is cut (chunk sizes 1..256,
 * used in turn), then, when FLAG_HEADERS is set, header lines up to a blank line, then the body.
 * The body is scanned whole and then in the chosen chunks: what the scanner finds (the first
 * event's end, the in-band error and its payload, the token usage) must not depend on where the
 * network cut the stream, so any difference is an abort(). Then the answer goes through what the
 * proxy does with it (header lines, append, hold, classify, count usage, summary, client headers).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/answer.h"
#define FUZZ_WANTS_SCRUB
#include "fuzz.h"

#define FLAG_HEADERS    0x1     /* header lines follow the split bytes */
#define FLAG_ERROR      0x2     /* default headers: a 429, buffered, not a 200 stream */
#define FLAG_JSON       0x4     /* default headers: application/json, not text/event-stream */
#define SPLIT_BYTES     8
#define NOW_MS INT64_C(1795861200000)

struct found {
        size_t first_end;               /* offset in the body, 0 when no event ended */
        int error_status;
        char *error;
        uint64_t in, out;
};

/* Feeds each line (its '\n' included, as curl hands them over) in a buffer of its own size.
 * 0, or the refusal of a broken head (a status outside 100..599, too many or too long lines),
 * after which the proxy ends the attempt: nothing more is fed. */
static int add_line(struct answer *a, const char *line, size_t len) {
        char *copy = malloc(len ? len : 1);
        int r;

        CHECK(copy);
        memcpy(copy, line, len);
        r = answer_add_header_line(a, copy, len);
        CHECK(r == 0 || r == -EPROTO || r == -E2BIG);
        free(copy);
        return r;
}

static int add_str(struct answer *a, const char *s) {
        return add_line(a, s, strlen(s));
}

static int add_headers(struct answer *a, unsigned flags, const char *h, size_t h_len) {
        int r = 0;

        if (flags & FLAG_HEADERS) {
                const char *p = h, *end = h + h_len;

                while (r == 0 && p < end) {
                        const char *nl = memchr(p, '\n', (size_t) (end - p));

                        if (!nl)
                                break;
                        r = add_line(a, p, (size_t) (nl + 1 - p));
                        p = nl + 1;
                }
                return r < 0 ? r : add_line(a, "\r\n", 2);
        }
        r = add_str(a, flags & FLAG_ERROR ? "HTTP/1.1 429 Too Many Requests\r\n" : "HTTP/1.1 200 OK\r\n");
        if (r == 0)
                r = add_str(a, flags & FLAG_JSON ? "Content-Type: application/json\r\n" :
                                                   "Content-Type: text/event-stream\r\n");
        if (r == 0)
                r = add_str(a, "Retry-After: 7\r\n");
        return r < 0 ? r : add_str(a, "\r\n");
}

/* Scans body in chunks whose sizes the split bytes give (all at once when split is NULL). */
static void scan(const char *body, size_t len, const uint8_t *split, struct found *ret) {
        struct answer a = { 0 };
        size_t off = 0, turn = 0;

        answer_reset(&a);
        memset(ret, 0, sizeof *ret);
        while (off < len) {
                size_t n = split ? (size_t) split[turn++ % SPLIT_BYTES] + 1 : len;
                size_t end;
                char *chunk;

                if (n > len - off)
                        n = len - off;
                /* Each chunk in its own buffer, as curl's would be. */
                chunk = malloc(n);
                CHECK(chunk);
                memcpy(chunk, body + off, n);
                end = answer_scan_events(&a, chunk, n);
                CHECK(end <= n);
                if (end && !ret->first_end)
                        ret->first_end = off + end;
                free(chunk);
                off += n;
        }
        ret->error_status = a.stream_error_status;
        ret->error = a.stream_error ? strdup(a.stream_error) : NULL;
        ret->in = a.tokens_in;
        ret->out = a.tokens_out;
        answer_free(&a);
}

/* What the proxy's body callback does with a chunk, without curl or a client. */
static void proxy_like(unsigned flags, const char *h, size_t h_len, const char *body, size_t len,
                       const uint8_t *split) {
        struct answer a = { 0 };
        struct answer_header ah[ANSWER_MAX_HEADERS];
        struct upstream_answer ua;
        struct http_header ch[ANSWER_MAX_HEADERS];
        struct policy_config pc = { .recovery_ms = 900000, .max_cooldown_ms = 86400000 };
        struct verdict v;
        char names[4096], summary[128];
        size_t off = 0, turn = 0, n_ch;

        answer_reset(&a);
        if (add_headers(&a, flags, h, h_len) < 0) {
                /* A broken head ends the attempt before any body; a retry starts afresh. */
                answer_reset(&a);
                CHECK(add_headers(&a, flags & ~FLAG_HEADERS, NULL, 0) == 0);
                answer_free(&a);
                return;
        }
        while (off < len) {
                size_t n = (size_t) split[turn++ % SPLIT_BYTES] + 1;

                if (n > len - off)
                        n = len - off;
                if (a.mode == ANSWER_BUFFER) {
                        CHECK(answer_append(&a, body + off, n) == 0);
                } else if (a.holding) {
                        CHECK(answer_append(&a, body + off, n) == 0);
                        a.held += n;
                        if (answer_scan_events(&a, body + off, n) || a.held >= ANSWER_MAX_SSE_EVENT)
                                a.holding = false;
                } else if (a.sse) {
                        answer_scan_events(&a, body + off, n);
                } else if (a.body_len + n <= ANSWER_MAX_USAGE_COPY) {
                        CHECK(answer_append(&a, body + off, n) == 0);
                }
                off += n;
        }
        CHECK(a.held <= a.body_len);
        answer_view(&a, ah, &ua);
        answer_classify(&a, &pc, NOW_MS, &v);
        CHECK(v.cls > VERDICT_NONE && v.cls < _VERDICT_MAX);
        if (a.mode == ANSWER_STREAM && !a.sse)
                answer_count_usage(&a);
        answer_error_summary(&a, fuzz_scrubber(), summary, sizeof summary);
        fuzz_check_scrubbed(summary);
        CHECK(memchr(summary, 0, sizeof summary));
        n_ch = answer_client_headers(&a, ch, ANSWER_MAX_HEADERS, names, sizeof names);
        CHECK(n_ch <= ANSWER_MAX_HEADERS);
        for (size_t i = 0; i < n_ch; i++)
                CHECK(ch[i].name && ch[i].value);
        /* A second attempt on the same answer, as a retry does. */
        answer_reset(&a);
        CHECK(add_headers(&a, flags & ~FLAG_HEADERS, NULL, 0) == 0);
        CHECK(answer_append(&a, body, len) == 0);
        answer_free(&a);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const char *p = (const char *) data, *end = p + size, *h = NULL, *body;
        const uint8_t *split;
        struct found whole, cut;
        unsigned flags;
        size_t h_len = 0, body_len;

        if (size < 1 + SPLIT_BYTES)
                return 0;
        flags = data[0];
        split = data + 1;
        p += 1 + SPLIT_BYTES;
        if (flags & FLAG_HEADERS) {
                const char *blank = memmem(p, (size_t) (end - p), "\n\r\n", 3);

                h = p;
                h_len = blank ? (size_t) (blank + 1 - p) : (size_t) (end - p);
                p = blank ? blank + 3 : end;
        }
        body = p;
        body_len = (size_t) (end - p);

        scan(body, body_len, NULL, &whole);
        scan(body, body_len, split, &cut);
        CHECK(whole.first_end == cut.first_end);
        CHECK(whole.error_status == cut.error_status);
        CHECK((whole.error == NULL) == (cut.error == NULL));
        CHECK(!whole.error || strcmp(whole.error, cut.error) == 0);
        CHECK(whole.in == cut.in && whole.out == cut.out);
        free(whole.error);
        free(cut.error);

        proxy_like(flags, h, h_len, body, body_len, split);
        return 0;
}
