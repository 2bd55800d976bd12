/* fuzz_policy.c — the classifier and every hint parser it uses, on an upstream answer.
 *
 * The input is an answer as it crosses the wire: a status line ("HTTP/1.1 429 …"), header lines,
 * a blank line and the body (JSON, SSE or anything). It is judged the way answer_classify does
 * (policy_classify: status, Retry-After and friends, rate-limit headers, body phrases and JSON
 * error shapes), its figures read, its body searched for usage and split into SSE events for the
 * in-band error check, and an error summary made. Crashes and sanitizer reports are findings; so
 * is a verdict outside its documented ranges (abort()).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/policy.h"
#define FUZZ_WANTS_SCRUB
#include "fuzz.h"

#define MAX_HEADERS 64
/* 2026-11-28T10:20:00Z, when the provider-signal examples are dated. */
#define NOW_MS INT64_C(1795861200000)
#define MAX_COOLDOWN_MS INT64_C(86400000)

static const char *const phrases[] = { "slow down", "capacity" };

static void check_verdict(const struct verdict *v, const struct policy_config *pc) {
        CHECK(v->cls > VERDICT_NONE && v->cls < _VERDICT_MAX);
        CHECK(v->rest_ms >= 0 && v->rest_ms <= pc->max_cooldown_ms);
        CHECK(v->retry_after_ms >= 0);
        CHECK(v->hinted == 0 || v->hinted == 1);
}

static void judge(const struct upstream_answer *a) {
        struct policy_config pc = { .recovery_ms = 900000, .max_cooldown_ms = MAX_COOLDOWN_MS };
        struct verdict v;
        struct rate_figures f;
        char summary[160];
        uint64_t in, out;

        policy_classify(a, &pc, NOW_MS, &v);
        check_verdict(&v, &pc);
        pc.phrases = phrases;
        pc.n_phrases = 2;
        policy_classify(a, &pc, NOW_MS, &v);
        check_verdict(&v, &pc);

        policy_read_figures(a, NOW_MS, &f);
        (void) policy_usage(a->body, a->body_len, &in, &out);
        (void) policy_mentions_rate_limit(a->body, a->body_len);

        memset(summary, 'x', sizeof summary);
        policy_error_summary(a->body, a->body_len, fuzz_scrubber(), summary, sizeof summary);
        fuzz_check_scrubbed(summary);
        CHECK(memchr(summary, 0, sizeof summary) != NULL);
        for (const char *p = summary; *p; p++)
                CHECK(*p >= 0x20 && *p < 0x7f);
        policy_error_summary(a->body, a->body_len, fuzz_scrubber(), summary, 1);
        CHECK(summary[0] == 0);

        for (size_t i = 0; i < a->n_headers; i++) {
                int64_t ms;

                if (policy_parse_retry_after(a->headers[i].value, a->headers[i].value_len, NOW_MS, &ms) == 0)
                        CHECK(ms >= 0);
        }
}

/* Every event of an SSE body ("\n\n" or "\n\r\n" ends one), checked for an in-band error, which
 * is then judged like a whole answer. */
static void judge_events(const struct upstream_answer *a) {
        const char *p = a->body, *end = a->body + a->body_len;

        while (p < end) {
                const char *e = p;
                const char *data;
                size_t data_len;
                int status;

                while (e < end && !(e + 1 < end && e[0] == '\n' && (e[1] == '\n' ||
                                                                    (e[1] == '\r' && e + 2 < end && e[2] == '\n'))))
                        e++;
                if (policy_sse_error(p, (size_t) (e - p), &status, &data, &data_len) == 1) {
                        struct upstream_answer ev = { .status = status, .body = data, .body_len = data_len };

                        CHECK(data >= p && data + data_len <= e);
                        judge(&ev);
                }
                p = e + 1;
                while (p < end && (*p == '\n' || *p == '\r'))
                        p++;
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct answer_header h[MAX_HEADERS];
        struct upstream_answer a = { 0 };
        const char *p = (const char *) data, *end = p + size;
        char *body;

        /* Status line: the number after the first space. */
        {
                const char *nl = memchr(p, '\n', size);
                const char *sp = memchr(p, ' ', nl ? (size_t) (nl - p) : size);

                if (sp)
                        for (const char *q = sp + 1; q < end && *q >= '0' && *q <= '9' && a.status < 100000; q++)
                                a.status = a.status * 10 + (*q - '0');
                p = nl ? nl + 1 : end;
        }
        /* Header lines "Name: value" up to a blank line. */
        while (p < end) {
                const char *nl = memchr(p, '\n', (size_t) (end - p));
                const char *le = nl ? nl : end, *colon;

                if (le > p && le[-1] == '\r')
                        le--;
                if (le == p) {
                        p = nl ? nl + 1 : end;
                        break;
                }
                colon = memchr(p, ':', (size_t) (le - p));
                if (colon && a.n_headers < MAX_HEADERS) {
                        const char *v = colon + 1, *ve = le;

                        while (v < ve && (*v == ' ' || *v == '\t'))
                                v++;
                        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                                ve--;
                        h[a.n_headers++] = (struct answer_header) {
                                .name = p, .name_len = (size_t) (colon - p),
                                .value = v, .value_len = (size_t) (ve - v),
                        };
                }
                p = nl ? nl + 1 : end;
        }
        a.headers = h;
        /* The body in a buffer of its own size, so that a read past it is caught. */
        a.body_len = (size_t) (end - p);
        body = malloc(a.body_len ? a.body_len : 1);
        if (!body)
                return 0;
        memcpy(body, p, a.body_len);
        a.body = body;

        judge(&a);
        judge_events(&a);
        a.transport_error = 1;
        judge(&a);
        free(body);
        return 0;
}
