/* check_proxy.c — unit tests of the proxied request's pure logic.
 *
 * What an attempt's end means (proxy_decide, table-driven: one row per case, read as "outcome,
 * verdict, attempts, bytes sent → next step"), how an answer is taken in as it arrives (answer.c:
 * modes, held SSE events, error events, usage, the headers relayed to the client), the request
 * as it goes upstream (model rewrite, header filtering), and the pool-key accessor. No daemon,
 * no sockets, no clock.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "keypool/answer.h"
#include "keypool/conf.h"
#include "keypool/proxy.h"
#include "keypool/scrub.h"

#define N(arr) (sizeof(arr) / sizeof((arr)[0]))

static const struct proxy_limits limits = {
        .max_attempts = 32, .max_transient = 5, .backoff_initial_ms = 1000, .backoff_max_ms = 10000,
};

static const char *next_name(enum proxy_next n) {
        switch (n) {
        case PROXY_NEXT_ROTATE: return "rotate";
        case PROXY_NEXT_RETRY: return "retry";
        case PROXY_NEXT_STREAM_END: return "stream_end";
        case PROXY_NEXT_ANSWER: return "answer";
        case PROXY_NEXT_CUT: return "cut";
        case PROXY_NEXT_FAIL: return "fail";
        case PROXY_NEXT_DROP: return "drop";
        default: return "?";
        }
}

/* --- proxy_decide ------------------------------------------------------------------------- */

struct decide_row {
        const char *what;
        enum proxy_result result;
        enum verdict_class cls;
        unsigned attempts, transient_failures;
        bool bytes_sent, client_gone;
        int64_t retry_after_ms;
        enum proxy_next next;
        enum proxy_next otherwise;      /* RETRY rows only */
        int status;                     /* FAIL, or RETRY otherwise FAIL */
        const char *code;
        int64_t delay_min, delay_max;   /* RETRY rows only */
        bool auth_unconfirmed, refused_before, other_keys;
        bool confirm_auth;              /* the key is to be probed */
        bool http1;                     /* RETRY rows: the next attempt goes over HTTP/1.1 */
        enum upstream_failure failure;  /* NO_ANSWER rows: which transport failure */
        const char *message_has;        /* FAIL: a word the message must carry */
        enum proxy_timeout timeout;     /* TIMEOUT rows: which one */
        int64_t time_left_ms;           /* until request_timeout: 0 for plenty, -1 for passed */
        const char *failure_text;       /* BAD_ANSWER rows: what was wrong */
};

static void check_row(const struct decide_row *row) {
        struct proxy_attempt_end a = {
                .result = row->result, .cls = row->cls, .retry_after_ms = row->retry_after_ms,
                .client_gone = row->client_gone, .bytes_sent = row->bytes_sent,
                .attempts = row->attempts, .transient_failures = row->transient_failures,
                .auth_unconfirmed = row->auth_unconfirmed, .refused_before = row->refused_before,
                .other_keys = row->other_keys, .failure = row->failure,
                .failure_text = row->failure_text ? row->failure_text : row->failure ? "curl's own words" : NULL,
                .random = 0x12345678, .timeout = row->timeout,
                .time_left_ms = row->time_left_ms ? row->time_left_ms : 600000,
        };
        struct proxy_decision d;

        proxy_decide(&a, &limits, &d);
        ck_assert_msg(d.next == row->next, "%s: expected %s, got %s", row->what, next_name(row->next),
                      next_name(d.next));
        ck_assert_msg(d.confirm_auth == row->confirm_auth, "%s: expected %s", row->what,
                      row->confirm_auth ? "a confirmation probe" : "no confirmation probe");
        if (row->next == PROXY_NEXT_RETRY) {
                ck_assert_msg(d.otherwise == row->otherwise, "%s: expected otherwise %s, got %s", row->what,
                              next_name(row->otherwise), next_name(d.otherwise));
                ck_assert_msg(d.delay_ms >= row->delay_min && d.delay_ms <= row->delay_max,
                              "%s: expected a delay in [%lld, %lld] ms, got %lld", row->what,
                              (long long) row->delay_min, (long long) row->delay_max, (long long) d.delay_ms);
                ck_assert_msg(d.http1 == row->http1, "%s: expected the retry %s", row->what,
                              row->http1 ? "over HTTP/1.1" : "as before");
        }
        if (row->status) {
                ck_assert_msg(d.status == row->status, "%s: expected status %d, got %d", row->what,
                              row->status, d.status);
                ck_assert_msg(d.code && strcmp(d.code, row->code) == 0, "%s: expected code %s, got %s",
                              row->what, row->code, d.code ? d.code : "(null)");
                ck_assert_msg(d.message && d.message[0], "%s: a failure says why", row->what);
        }
        if (row->message_has)
                ck_assert_msg(strstr(d.message, row->message_has) != NULL, "%s: expected '%s' in '%s'", row->what,
                              row->message_has, d.message);
        if (row->failure_text && row->status)
                ck_assert_msg(d.detail && strcmp(d.detail, row->failure_text) == 0,
                              "%s: what was wrong follows the message", row->what);
        if (row->failure && row->failure != UPSTREAM_FAILURE_OTHER && row->status)
                ck_assert_msg(d.detail && strcmp(d.detail, "curl's own words") == 0,
                              "%s: curl's text follows the message", row->what);
}

static void check_rows(const struct decide_row *rows, size_t n) {
        for (size_t i = 0; i < n; i++)
                check_row(&rows[i]);
}

START_TEST(test_rate_limited_attempt_rotates_to_next_key) {
        static const struct decide_row rows[] = {
                { "429 answer, first attempt", PROXY_RESULT_ANSWER, VERDICT_RATE_LIMITED, 1, 0, .next = PROXY_NEXT_ROTATE },
                { "429 answer, 31st attempt", PROXY_RESULT_ANSWER, VERDICT_RATE_LIMITED, 31, 0, .next = PROXY_NEXT_ROTATE },
                { "429 error event held at a stream's start", PROXY_RESULT_HELD_ERROR, VERDICT_RATE_LIMITED, 1, 0,
                  .next = PROXY_NEXT_ROTATE },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_dead_key_attempt_rotates_to_next_key) {
        static const struct decide_row rows[] = {
                { "401 answer", PROXY_RESULT_ANSWER, VERDICT_AUTH, 1, 0, .next = PROXY_NEXT_ROTATE },
                { "402 quota answer", PROXY_RESULT_ANSWER, VERDICT_QUOTA, 2, 1, .next = PROXY_NEXT_ROTATE },
                { "quota error event held", PROXY_RESULT_HELD_ERROR, VERDICT_QUOTA, 1, 0, .next = PROXY_NEXT_ROTATE },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_rotation_stops_at_the_attempt_limit_and_relays_the_last_answer) {
        static const struct decide_row rows[] = {
                { "429 answer at the limit", PROXY_RESULT_ANSWER, VERDICT_RATE_LIMITED, 32, 0, .next = PROXY_NEXT_ANSWER },
                { "401 answer past the limit", PROXY_RESULT_ANSWER, VERDICT_AUTH, 33, 0, .next = PROXY_NEXT_ANSWER },
                { "held 429 event at the limit", PROXY_RESULT_HELD_ERROR, VERDICT_RATE_LIMITED, 32, 0,
                  .next = PROXY_NEXT_STREAM_END },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_transient_answer_is_retried_after_a_backoff) {
        static const struct decide_row rows[] = {
                { "503, first failure", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 1, 1, .next = PROXY_NEXT_RETRY,
                  .otherwise = PROXY_NEXT_ANSWER, .delay_min = 900, .delay_max = 1100 },
                { "503, second failure waits twice as long", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 2, 2,
                  .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_ANSWER, .delay_min = 1800, .delay_max = 2200 },
                { "502 event held at a stream's start", PROXY_RESULT_HELD_ERROR, VERDICT_TRANSIENT, 1, 1,
                  .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_STREAM_END, .delay_min = 900, .delay_max = 1100 },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_provider_retry_hint_lengthens_the_backoff_up_to_the_cap) {
        static const struct decide_row rows[] = {
                { "Retry-After 3 s", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 1, 1, .retry_after_ms = 3000,
                  .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_ANSWER, .delay_min = 3000, .delay_max = 3000 },
                { "Retry-After 60 s is capped", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 1, 1, .retry_after_ms = 60000,
                  .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_ANSWER, .delay_min = 10000, .delay_max = 10000 },
                { "a hint shorter than the backoff is ignored", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 1, 1,
                  .retry_after_ms = 10, .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_ANSWER,
                  .delay_min = 900, .delay_max = 1100 },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_transient_answer_is_relayed_once_retries_run_out) {
        static const struct decide_row rows[] = {
                { "503 after max transient failures", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 5, 5,
                  .next = PROXY_NEXT_ANSWER },
                { "503 at the attempt limit", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 32, 1, .next = PROXY_NEXT_ANSWER },
                { "held 502 event after max transient failures", PROXY_RESULT_HELD_ERROR, VERDICT_TRANSIENT, 5, 5,
                  .next = PROXY_NEXT_STREAM_END },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_unreachable_upstream_is_retried_then_answered_502) {
        static const struct decide_row rows[] = {
                { "connection refused, first failure", PROXY_RESULT_NO_ANSWER, VERDICT_TRANSIENT, 1, 1,
                  .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_FAIL, .status = 502,
                  .code = "upstream_unreachable", .delay_min = 900, .delay_max = 1100 },
                { "connection refused, retries exhausted", PROXY_RESULT_NO_ANSWER, VERDICT_TRANSIENT, 5, 5,
                  .next = PROXY_NEXT_FAIL, .status = 502, .code = "upstream_unreachable" },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_upstream_timeout_is_retried_then_answered_504) {
        static const struct decide_row rows[] = {
                { "timeout, first failure", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT, 1, 1, .next = PROXY_NEXT_RETRY,
                  .otherwise = PROXY_NEXT_FAIL, .status = 504, .code = "upstream_timeout",
                  .delay_min = 900, .delay_max = 1100 },
                { "timeout, retries exhausted", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT, 5, 5,
                  .next = PROXY_NEXT_FAIL, .status = 504, .code = "upstream_timeout" },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_each_timeout_is_retried_then_answered_504_naming_it) {
        static const struct decide_row rows[] = {
                { "connect timeout, first failure", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT, 1, 1,
                  .timeout = PROXY_TIMEOUT_CONNECT, .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_FAIL,
                  .status = 504, .code = "upstream_timeout", .delay_min = 900, .delay_max = 1100 },
                { "connect timeout, retries exhausted", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT, 5, 5,
                  .timeout = PROXY_TIMEOUT_CONNECT, .next = PROXY_NEXT_FAIL, .status = 504,
                  .code = "upstream_timeout", .message_has = "connect_timeout" },
                { "no head within first_byte_timeout, first failure", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT, 1, 1,
                  .timeout = PROXY_TIMEOUT_FIRST_BYTE, .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_FAIL,
                  .status = 504, .code = "upstream_timeout", .delay_min = 900, .delay_max = 1100 },
                { "no head within first_byte_timeout, retries exhausted", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT,
                  5, 5, .timeout = PROXY_TIMEOUT_FIRST_BYTE, .next = PROXY_NEXT_FAIL, .status = 504,
                  .code = "upstream_timeout", .message_has = "first_byte_timeout" },
                { "silent held first event (idle) is retried", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT, 1, 1,
                  .timeout = PROXY_TIMEOUT_IDLE, .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_FAIL,
                  .status = 504, .code = "upstream_timeout", .delay_min = 900, .delay_max = 1100 },
                { "silent held first event, retries exhausted", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT, 2, 2,
                  .timeout = PROXY_TIMEOUT_IDLE, .next = PROXY_NEXT_FAIL, .status = 504, .code = "upstream_timeout",
                  .message_has = "idle_timeout", .time_left_ms = -1 },
                { "silence after the client had bytes is a cut", PROXY_RESULT_TIMEOUT, VERDICT_NONE, 1, 1,
                  .timeout = PROXY_TIMEOUT_IDLE, .bytes_sent = true, .next = PROXY_NEXT_CUT },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_request_timeout_ends_the_request_whatever_is_left) {
        static const struct decide_row rows[] = {
                { "request_timeout during an attempt", PROXY_RESULT_TIMEOUT, VERDICT_NONE, 1, 1,
                  .timeout = PROXY_TIMEOUT_REQUEST, .next = PROXY_NEXT_FAIL, .status = 504,
                  .code = "request_timeout", .message_has = "request_timeout" },
                { "request_timeout with plenty of attempts and time said left", PROXY_RESULT_TIMEOUT, VERDICT_NONE,
                  1, 0, .timeout = PROXY_TIMEOUT_REQUEST, .next = PROXY_NEXT_FAIL, .status = 504,
                  .code = "request_timeout" },
                { "request_timeout mid-stream is the stream's (visible) end", PROXY_RESULT_TIMEOUT, VERDICT_NONE, 1, 0,
                  .timeout = PROXY_TIMEOUT_REQUEST, .bytes_sent = true, .next = PROXY_NEXT_CUT },
                { "no retry once the time is up", PROXY_RESULT_NO_ANSWER, VERDICT_TRANSIENT, 1, 1,
                  .failure = UPSTREAM_FAILURE_OTHER, .time_left_ms = -1, .next = PROXY_NEXT_FAIL, .status = 502,
                  .code = "upstream_unreachable" },
                { "a backoff that would outlast the time is not waited", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 1, 1,
                  .time_left_ms = 500, .next = PROXY_NEXT_ANSWER },
                { "a hinted wait that would outlast the time is not waited", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT,
                  1, 1, .retry_after_ms = 5000, .time_left_ms = 4000, .next = PROXY_NEXT_ANSWER },
                { "a backoff within the time is waited", PROXY_RESULT_ANSWER, VERDICT_TRANSIENT, 1, 1,
                  .time_left_ms = 1500, .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_ANSWER,
                  .delay_min = 900, .delay_max = 1100 },
                { "no rotation once the time is up", PROXY_RESULT_ANSWER, VERDICT_RATE_LIMITED, 1, 0,
                  .time_left_ms = -1, .next = PROXY_NEXT_ANSWER },
                { "no rotation of a held event once the time is up", PROXY_RESULT_HELD_ERROR, VERDICT_QUOTA, 1, 0,
                  .time_left_ms = -1, .next = PROXY_NEXT_STREAM_END },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_broken_answer_is_transient_then_answered_502) {
        static const struct decide_row rows[] = {
                { "closed mid-head, first failure", PROXY_RESULT_BAD_ANSWER, VERDICT_TRANSIENT, 1, 1,
                  .failure = UPSTREAM_FAILURE_OTHER, .failure_text = "closed mid-head", .next = PROXY_NEXT_RETRY,
                  .otherwise = PROXY_NEXT_FAIL, .status = 502, .code = "upstream_bad_answer",
                  .delay_min = 900, .delay_max = 1100 },
                { "short body, retries exhausted", PROXY_RESULT_BAD_ANSWER, VERDICT_TRANSIENT, 5, 5,
                  .failure = UPSTREAM_FAILURE_OTHER, .failure_text = "short body", .next = PROXY_NEXT_FAIL,
                  .status = 502, .code = "upstream_bad_answer" },
                { "status 999 at the attempt limit", PROXY_RESULT_BAD_ANSWER, VERDICT_TRANSIENT, 32, 1,
                  .failure = UPSTREAM_FAILURE_OTHER, .failure_text = "a status outside 100..599",
                  .next = PROXY_NEXT_FAIL, .status = 502, .code = "upstream_bad_answer" },
                { "too many headers, out of time", PROXY_RESULT_BAD_ANSWER, VERDICT_TRANSIENT, 1, 1,
                  .failure = UPSTREAM_FAILURE_OTHER, .failure_text = "too many headers", .time_left_ms = -1,
                  .next = PROXY_NEXT_FAIL, .status = 502, .code = "upstream_bad_answer" },
                { "short body after the client had bytes", PROXY_RESULT_BAD_ANSWER, VERDICT_TRANSIENT, 1, 1,
                  .failure = UPSTREAM_FAILURE_OTHER, .bytes_sent = true, .next = PROXY_NEXT_CUT },
        };

        check_rows(rows, N(rows));
}
END_TEST

/* max_attempts bounds rotations and retries together, in any mix. */
START_TEST(test_attempts_are_bounded_whatever_the_mix) {
        static const struct proxy_limits five = {
                .max_attempts = 5, .max_transient = 5, .backoff_initial_ms = 1000, .backoff_max_ms = 10000,
        };
        static const enum verdict_class mix[] = {
                VERDICT_RATE_LIMITED, VERDICT_TRANSIENT, VERDICT_AUTH, VERDICT_TRANSIENT, VERDICT_QUOTA,
                VERDICT_RATE_LIMITED, VERDICT_TRANSIENT,
        };
        unsigned attempts = 0, transient = 0;
        struct proxy_decision d;

        for (size_t i = 0; i < N(mix); i++) {
                struct proxy_attempt_end a = {
                        .result = PROXY_RESULT_ANSWER, .cls = mix[i], .attempts = ++attempts,
                        .transient_failures = transient += mix[i] == VERDICT_TRANSIENT, .other_keys = true,
                        .time_left_ms = 600000,
                };

                proxy_decide(&a, &five, &d);
                if (d.next != PROXY_NEXT_ROTATE && d.next != PROXY_NEXT_RETRY)
                        break;
        }
        ck_assert_uint_eq(attempts, 5);
        ck_assert_int_eq(d.next, PROXY_NEXT_ANSWER);
}
END_TEST

START_TEST(test_transfer_failure_after_bytes_reached_the_client_cuts_the_connection) {
        static const struct decide_row rows[] = {
                { "reset mid-stream", PROXY_RESULT_NO_ANSWER, VERDICT_TRANSIENT, 1, 1, .bytes_sent = true,
                  .next = PROXY_NEXT_CUT },
                { "timeout mid-stream", PROXY_RESULT_TIMEOUT, VERDICT_TRANSIENT, 1, 1, .bytes_sent = true,
                  .next = PROXY_NEXT_CUT },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_relayed_success_ends_the_stream_whatever_it_carried) {
        static const struct decide_row rows[] = {
                { "200 relayed", PROXY_RESULT_STREAM, VERDICT_OK, 1, 0, .bytes_sent = true, .next = PROXY_NEXT_STREAM_END },
                { "200 with an empty body", PROXY_RESULT_STREAM, VERDICT_OK, 1, 0, .next = PROXY_NEXT_STREAM_END },
                { "429 event in mid-stream", PROXY_RESULT_STREAM, VERDICT_RATE_LIMITED, 1, 0, .bytes_sent = true,
                  .next = PROXY_NEXT_STREAM_END },
                { "502 event in mid-stream", PROXY_RESULT_STREAM, VERDICT_TRANSIENT, 1, 0, .bytes_sent = true,
                  .next = PROXY_NEXT_STREAM_END },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_caller_error_is_relayed_as_it_came) {
        static const struct decide_row rows[] = {
                { "400 answer", PROXY_RESULT_ANSWER, VERDICT_CALLER, 1, 0, .next = PROXY_NEXT_ANSWER },
                { "304 answer", PROXY_RESULT_ANSWER, VERDICT_OK, 1, 0, .next = PROXY_NEXT_ANSWER },
                { "400 event held at a stream's start", PROXY_RESULT_HELD_ERROR, VERDICT_CALLER, 1, 0,
                  .next = PROXY_NEXT_STREAM_END },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_gone_client_gets_nothing_more_whatever_the_outcome) {
        static const struct decide_row rows[] = {
                { "success", PROXY_RESULT_STREAM, VERDICT_OK, 1, 0, .client_gone = true, .next = PROXY_NEXT_DROP },
                { "429", PROXY_RESULT_ANSWER, VERDICT_RATE_LIMITED, 1, 0, .client_gone = true, .next = PROXY_NEXT_DROP },
                { "no answer", PROXY_RESULT_NO_ANSWER, VERDICT_TRANSIENT, 1, 1, .client_gone = true,
                  .next = PROXY_NEXT_DROP },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_certificate_failure_fails_at_once_naming_tls) {
        static const struct decide_row rows[] = {
                { "untrusted certificate", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 1, 1,
                  .failure = UPSTREAM_FAILURE_CERTIFICATE, .next = PROXY_NEXT_FAIL, .status = 502,
                  .code = "upstream_tls_failure", .message_has = "TLS" },
                { "certificate failure on a later attempt", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 3, 2,
                  .failure = UPSTREAM_FAILURE_CERTIFICATE, .next = PROXY_NEXT_FAIL, .status = 502,
                  .code = "upstream_tls_failure", .message_has = "certificate" },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_tls_and_dns_failures_are_retried_then_answered_502_naming_them) {
        static const struct decide_row rows[] = {
                { "handshake cut short, first failure", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 1, 1,
                  .failure = UPSTREAM_FAILURE_TLS, .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_FAIL,
                  .status = 502, .code = "upstream_tls_failure", .message_has = "TLS",
                  .delay_min = 900, .delay_max = 1100 },
                { "handshake cut short, retries exhausted", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 5, 5,
                  .failure = UPSTREAM_FAILURE_TLS, .next = PROXY_NEXT_FAIL, .status = 502,
                  .code = "upstream_tls_failure", .message_has = "TLS" },
                { "an HTTP/2 stream libcurl failed before any answer: again at once, over HTTP/1.1",
                  PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 1, 1,
                  .failure = UPSTREAM_FAILURE_STREAM,
                  .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_FAIL, .status = 502,
                  .code = "upstream_unreachable", .message_has = "HTTP/2", .delay_min = 0, .delay_max = 0,
                  .http1 = true },
                { "the same with the retries used up: 502", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 5, 5,
                  .failure = UPSTREAM_FAILURE_STREAM,
                  .next = PROXY_NEXT_FAIL, .status = 502, .code = "upstream_unreachable", .message_has = "HTTP/2" },
                { "name does not resolve, first failure", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 1, 1,
                  .failure = UPSTREAM_FAILURE_DNS, .next = PROXY_NEXT_RETRY, .otherwise = PROXY_NEXT_FAIL,
                  .status = 502, .code = "upstream_dns_failure", .message_has = "DNS",
                  .delay_min = 900, .delay_max = 1100 },
                { "name does not resolve, retries exhausted", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 5, 5,
                  .failure = UPSTREAM_FAILURE_DNS, .next = PROXY_NEXT_FAIL, .status = 502,
                  .code = "upstream_dns_failure", .message_has = "DNS" },
                { "refused is still unreachable", PROXY_RESULT_NO_ANSWER, VERDICT_TRANSIENT, 5, 5,
                  .failure = UPSTREAM_FAILURE_OTHER, .next = PROXY_NEXT_FAIL, .status = 502,
                  .code = "upstream_unreachable" },
                { "TLS failure after bytes went out", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 1, 1,
                  .bytes_sent = true, .failure = UPSTREAM_FAILURE_TLS, .next = PROXY_NEXT_CUT },
                { "certificate failure after the client left", PROXY_RESULT_NO_ANSWER, VERDICT_NONE, 1, 1,
                  .client_gone = true, .failure = UPSTREAM_FAILURE_CERTIFICATE, .next = PROXY_NEXT_DROP },
        };

        check_rows(rows, N(rows));
}
END_TEST

START_TEST(test_refusal_of_the_callers_path_moves_once_and_asks_the_probe) {
        static const struct decide_row rows[] = {
                { "first 401, another key", PROXY_RESULT_ANSWER, VERDICT_AUTH, 1, 0, .auth_unconfirmed = true,
                  .other_keys = true, .next = PROXY_NEXT_ROTATE, .confirm_auth = true },
                { "first 403 event held, another key", PROXY_RESULT_HELD_ERROR, VERDICT_AUTH, 1, 0,
                  .auth_unconfirmed = true, .other_keys = true, .next = PROXY_NEXT_ROTATE, .confirm_auth = true },
                { "second refusal goes to the caller", PROXY_RESULT_ANSWER, VERDICT_AUTH, 2, 0,
                  .auth_unconfirmed = true, .refused_before = true, .other_keys = true,
                  .next = PROXY_NEXT_ANSWER, .confirm_auth = true },
                { "second refusal held goes to the caller", PROXY_RESULT_HELD_ERROR, VERDICT_AUTH, 2, 0,
                  .auth_unconfirmed = true, .refused_before = true, .other_keys = true,
                  .next = PROXY_NEXT_STREAM_END, .confirm_auth = true },
                { "401 in a single-key pool goes to the caller", PROXY_RESULT_ANSWER, VERDICT_AUTH, 1, 0,
                  .auth_unconfirmed = true, .next = PROXY_NEXT_ANSWER, .confirm_auth = true },
                { "401 at the attempt limit", PROXY_RESULT_ANSWER, VERDICT_AUTH, 32, 0, .auth_unconfirmed = true,
                  .other_keys = true, .next = PROXY_NEXT_ANSWER, .confirm_auth = true },
                { "401 event in mid-stream", PROXY_RESULT_STREAM, VERDICT_AUTH, 1, 0, .bytes_sent = true,
                  .auth_unconfirmed = true, .other_keys = true, .next = PROXY_NEXT_STREAM_END,
                  .confirm_auth = true },
                { "401 after the client left", PROXY_RESULT_ANSWER, VERDICT_AUTH, 1, 0, .client_gone = true,
                  .auth_unconfirmed = true, .other_keys = true, .next = PROXY_NEXT_DROP, .confirm_auth = true },
                { "a 429 after a refusal still rotates", PROXY_RESULT_ANSWER, VERDICT_RATE_LIMITED, 2, 0,
                  .refused_before = true, .other_keys = true, .next = PROXY_NEXT_ROTATE },
        };

        check_rows(rows, N(rows));
}
END_TEST

/* --- answer ------------------------------------------------------------------------------- */

static void feed_headers(struct answer *a, const char *const *lines, size_t n) {
        for (size_t i = 0; i < n; i++)
                ck_assert_int_eq(answer_add_header_line(a, lines[i], strlen(lines[i])), 0);
}

START_TEST(test_success_answer_is_relayed_as_it_arrives) {
        static const char *const lines[] = { "HTTP/1.1 200 OK\r\n", "Content-Type: application/json\r\n", "\r\n" };
        struct answer a = { .mode = ANSWER_HEADERS };

        feed_headers(&a, lines, N(lines));
        ck_assert_int_eq(a.status, 200);
        ck_assert_int_eq(a.mode, ANSWER_STREAM);
        ck_assert_msg(!a.sse && !a.holding, "a JSON success is not held");
        ck_assert_uint_eq(a.n_headers, 1);
        ck_assert_str_eq(answer_line(&a, 0), "Content-Type: application/json");
        answer_free(&a);
}
END_TEST

START_TEST(test_error_answer_is_kept_whole_to_be_judged) {
        static const char *const lines[] = { "HTTP/2 429 \r\n", "retry-after: 7\r\n", "\r\n" };
        struct answer a = { .mode = ANSWER_HEADERS };

        feed_headers(&a, lines, N(lines));
        ck_assert_int_eq(a.status, 429);
        ck_assert_int_eq(a.mode, ANSWER_BUFFER);
        ck_assert_int_eq(answer_append(&a, "{\"error\":", 9), 0);
        ck_assert_int_eq(answer_append(&a, "\"slow down\"}", 12), 0);
        ck_assert_str_eq(a.body, "{\"error\":\"slow down\"}");
        answer_free(&a);
}
END_TEST

/* Found by fuzz_answer (corpus entry status_line_without_status): atoi skipped the line end as
 * white space and read past the line, which curl does not NUL-terminate. */
START_TEST(test_status_line_is_read_within_its_line) {
        static const char *const lines[] = { "HTTP/1.1 \n", "HTTP/1.1 4290 Odd\r\n", "HTTP/2 503\r\n" };
        static const int want[] = { 0, 0, 503 };
        struct answer a = { .mode = ANSWER_HEADERS };

        for (size_t i = 0; i < N(lines); i++) {
                size_t len = strlen(lines[i]);
                char *exact = malloc(len);      /* no NUL after it, as curl hands it over */

                ck_assert_ptr_nonnull(exact);
                memcpy(exact, lines[i], len);
                ck_assert_int_eq(answer_add_header_line(&a, exact, len), 0);
                ck_assert_int_eq(a.status, want[i]);
                free(exact);
        }
        answer_free(&a);
}
END_TEST

START_TEST(test_informational_answer_is_replaced_by_the_final_one) {
        static const char *const lines[] = {
                "HTTP/1.1 100 Continue\r\n", "\r\n",
                "HTTP/1.1 200 OK\r\n", "Content-Type: text/event-stream; charset=utf-8\r\n", "\r\n",
        };
        struct answer a = { .mode = ANSWER_HEADERS };

        feed_headers(&a, lines, 2);
        ck_assert_int_eq(a.mode, ANSWER_HEADERS);
        feed_headers(&a, lines + 2, 3);
        ck_assert_int_eq(a.status, 200);
        ck_assert_int_eq(a.mode, ANSWER_STREAM);
        ck_assert_msg(a.sse && a.holding, "an event-stream success holds its first event");
        answer_free(&a);
}
END_TEST

START_TEST(test_first_complete_event_ends_where_its_blank_line_ends) {
        static const char chunk1[] = "data: {\"a\":1}\n", chunk2[] = "\ndata: {\"b\":2}\r\n\r\n";
        struct answer a = { .mode = ANSWER_STREAM, .sse = true };

        ck_assert_uint_eq(answer_scan_events(&a, chunk1, strlen(chunk1)), 0);
        ck_assert_uint_eq(answer_scan_events(&a, chunk2, strlen(chunk2)), 1);
        ck_assert_int_eq(a.stream_error_status, 0);
        answer_free(&a);
}
END_TEST

/* An open stream spends its life between events: it holds no event buffer there, and an event
 * split across reads is still seen whole. */
START_TEST(test_a_stream_holds_no_event_buffer_between_events) {
        static const char part1[] = "data: {\"usage\":{\"prompt_tokens\":3,", part2[] = "\"completion_tokens\":4}}\n\n";
        struct answer a = { .mode = ANSWER_STREAM, .sse = true };

        answer_scan_events(&a, part1, strlen(part1));
        ck_assert_ptr_nonnull(a.event);
        answer_scan_events(&a, part2, strlen(part2));
        ck_assert_ptr_null(a.event);
        ck_assert_uint_eq(a.event_cap, 0);
        ck_assert_uint_eq(a.tokens_in, 3);
        ck_assert_uint_eq(a.tokens_out, 4);
        answer_free(&a);
}
END_TEST

/* An answer is a stream when its Content-Type names text/event-stream anywhere in its value, in
 * any ASCII case; nothing else (another header, a near miss) makes it one. */
START_TEST(test_event_stream_content_type_is_found_in_any_case_and_place) {
        static const struct {
                const char *line;
                bool sse;
        } cases[] = {
                { "Content-Type: text/event-stream\r\n", true },
                { "content-type:TEXT/Event-Stream; charset=utf-8\r\n", true },
                { "Content-Type: application/x-ttext/event-stream\r\n", true },
                { "Content-Type: application/json\r\n", false },
                { "Content-Type: text/event-strea\r\n", false },
                { "Content-Type: text/event_stream\r\n", false },
                { "X-Content-Type: text/event-stream\r\n", false },
                { "Content-Typo: text/event-stream\r\n", false },
        };

        for (size_t i = 0; i < N(cases); i++) {
                const char *lines[] = { "HTTP/1.1 200 OK\r\n", cases[i].line, "\r\n" };
                struct answer a = { .mode = ANSWER_HEADERS };

                feed_headers(&a, lines, N(lines));
                ck_assert_msg(a.sse == cases[i].sse, "'%s' should %sbe a stream", cases[i].line,
                              cases[i].sse ? "" : "not ");
                answer_free(&a);
        }
}
END_TEST

/* Once a stream's held first event is relayed, nothing reads its body again: it goes. Held bytes,
 * and the body of a buffered (error) answer, stay. */
START_TEST(test_a_relayed_streams_body_is_released_and_a_held_one_kept) {
        static const char *const lines[] = { "HTTP/1.1 200 OK\r\n", "Content-Type: text/event-stream\r\n", "\r\n" };
        static const char first[] = "data: {\"a\":1}\n\n";
        struct answer a = { .mode = ANSWER_HEADERS }, e = { .mode = ANSWER_BUFFER };

        feed_headers(&a, lines, N(lines));
        ck_assert_int_eq(answer_append(&a, first, strlen(first)), 0);
        a.held = strlen(first);
        ck_assert_uint_eq(answer_scan_events(&a, first, strlen(first)), strlen(first));
        a.holding = false;
        answer_release_relayed(&a);
        ck_assert_ptr_nonnull(a.body);  /* still held: not sent yet */
        a.held = 0;
        answer_release_relayed(&a);
        ck_assert_ptr_null(a.body);
        ck_assert_uint_eq(a.body_len, 0);
        answer_free(&a);

        ck_assert_int_eq(answer_append(&e, "{}", 2), 0);
        answer_release_relayed(&e);
        ck_assert_str_eq(e.body, "{}");
        answer_free(&e);
}
END_TEST

START_TEST(test_error_event_in_a_stream_is_noted_once) {
        static const char events[] =
                "data: {\"error\":{\"code\":429,\"message\":\"Rate limit exceeded\"}}\n\n"
                "data: {\"error\":{\"code\":502,\"message\":\"Bad Gateway\"}}\n\n";
        struct answer a = { .mode = ANSWER_STREAM, .sse = true, .status = 200 };
        struct policy_config pc = { .recovery_ms = 900000, .max_cooldown_ms = 86400000 };
        struct verdict v;

        answer_scan_events(&a, events, strlen(events));
        ck_assert_int_eq(a.stream_error_status, 429);
        ck_assert_ptr_nonnull(a.stream_error);
        /* The event wins over the 200 the stream opened with. */
        answer_classify(&a, &pc, INT64_C(1787313600000), &v);
        ck_assert_int_eq(v.cls, VERDICT_RATE_LIMITED);
        answer_free(&a);
}
END_TEST

START_TEST(test_stream_usage_keeps_the_last_running_totals) {
        static const char events[] =
                "data: {\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":1}}\n\n"
                "data: {\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":7}}\n\n";
        struct answer a = { .mode = ANSWER_STREAM, .sse = true };

        answer_scan_events(&a, events, strlen(events));
        ck_assert_uint_eq(a.tokens_in, 10);
        ck_assert_uint_eq(a.tokens_out, 7);
        answer_free(&a);
}
END_TEST

START_TEST(test_oversized_event_is_not_inspected) {
        struct answer a = { .mode = ANSWER_STREAM, .sse = true };
        size_t big = ANSWER_MAX_SSE_EVENT + 100;
        char *ev = malloc(big + 2);
        static const char head[] = "data: {\"error\":{\"code\":429,\"message\":\"";

        ck_assert_ptr_nonnull(ev);
        memset(ev, 'x', big);
        memcpy(ev, head, strlen(head));
        ev[big] = '\n';
        ev[big + 1] = '\n';
        answer_scan_events(&a, ev, big + 2);
        ck_assert_msg(a.stream_error_status == 0, "an event cut at the size limit is not judged");
        free(ev);
        answer_free(&a);
}
END_TEST

START_TEST(test_events_after_an_oversized_one_are_inspected_again) {
        struct answer a = { .mode = ANSWER_STREAM, .sse = true };
        size_t big = ANSWER_MAX_SSE_EVENT + 100;
        char *ev = malloc(big + 2);
        static const char error_event[] =
                "data: {\"error\":{\"code\":429,\"message\":\"Rate limit exceeded\"}}\r\n\r\n";

        ck_assert_ptr_nonnull(ev);
        memset(ev, 'x', big);
        memcpy(ev, "data: ", 6);
        ev[big] = '\n';
        ev[big + 1] = '\n';
        answer_scan_events(&a, ev, big + 2);
        answer_scan_events(&a, error_event, strlen(error_event));
        ck_assert_msg(a.stream_error_status == 429,
                      "expected the error event after an oversized one to be seen, got status %d",
                      a.stream_error_status);
        free(ev);
        answer_free(&a);
}
END_TEST

START_TEST(test_non_sse_success_counts_tokens_from_its_body) {
        static const char body[] = "{\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34}}";
        struct answer a = { .mode = ANSWER_STREAM };

        ck_assert_int_eq(answer_append(&a, body, strlen(body)), 0);
        answer_count_usage(&a);
        ck_assert_uint_eq(a.tokens_in, 12);
        ck_assert_uint_eq(a.tokens_out, 34);
        answer_free(&a);
}
END_TEST

/* The headers a client gets of an answer of these lines (a stays alive: the values are in it). */
static size_t client_headers_of(struct answer *a, const char *const *lines, size_t n_lines, struct http_header *h,
                                size_t max, char *names, size_t names_size) {
        feed_headers(a, lines, n_lines);
        return answer_client_headers(a, h, max, names, names_size);
}

START_TEST(test_client_gets_end_to_end_headers_only) {
        static const char *const lines[] = {
                "HTTP/1.1 200 OK\r\n", "Content-Type: application/json\r\n", "Connection: keep-alive\r\n",
                "Transfer-Encoding: chunked\r\n", "content-length: 12\r\n", "X-Keypool-Key: forged\r\n",
                "x-request-id:   abc\r\n", ": no name\r\n", "\r\n",
        };
        struct answer a = { .mode = ANSWER_HEADERS };
        struct http_header h[8];
        char names[256];

        ck_assert_uint_eq(client_headers_of(&a, lines, N(lines), h, N(h), names, sizeof names), 2);
        ck_assert_str_eq(h[0].name, "Content-Type");
        ck_assert_str_eq(h[0].value, "application/json");
        ck_assert_str_eq(h[1].name, "x-request-id");
        ck_assert_str_eq(h[1].value, "abc");
        answer_free(&a);
}
END_TEST

/* The answer notes as its lines arrive whether a name carries rate-limit figures, and policy
 * reads the same figures from that note as from its own look at the names. A new status line
 * (after 100 Continue) forgets what the last answer's names said. */
START_TEST(test_rate_figure_names_are_noted_as_lines_arrive) {
        static const char *const with[] = {
                "HTTP/1.1 200 OK\r\n", "Content-Type: application/json\r\n",
                "x-RateLimit-Remaining-Requests: 0\r\n", "X-RATELIMIT-RESET-REQUESTS: 7s\r\n", "\r\n",
        };
        static const char *const without[] = {
                "HTTP/1.1 100 Continue\r\n", "x-ratelimit-remaining-tokens: 0\r\n", "\r\n",
                "HTTP/1.1 200 OK\r\n", "Content-Type: application/json\r\n", "X-Rate: limit\r\n",
                "ratelimit no colon\r\n", "\r\n",
        };
        static const struct {
                const char *const *lines;
                size_t n;
                enum policy_figure_names want;
        } cases[] = {
                { with, N(with), POLICY_FIGURE_NAMES_SOME },
                { without, N(without), POLICY_FIGURE_NAMES_NONE },
        };

        for (size_t i = 0; i < N(cases); i++) {
                struct answer a = { .mode = ANSWER_HEADERS };
                struct answer_header ah[ANSWER_MAX_HEADERS];
                struct upstream_answer u, looked;
                struct rate_figures noted, own;

                feed_headers(&a, cases[i].lines, cases[i].n);
                answer_view(&a, ah, &u);
                ck_assert_int_eq(u.figure_names, cases[i].want);
                looked = u;
                looked.figure_names = POLICY_FIGURE_NAMES_UNKNOWN;
                policy_read_figures(&u, 1700000000000, &noted);
                policy_read_figures(&looked, 1700000000000, &own);
                ck_assert(memcmp(&noted, &own, sizeof noted) == 0);
                ck_assert_int_eq(noted.remaining_requests, cases[i].want == POLICY_FIGURE_NAMES_SOME ? 0 : -1);
                answer_free(&a);
        }
}
END_TEST

/* Whatever run of CR and LF ends a line goes, and only that. */
START_TEST(test_header_lines_lose_every_line_end_and_nothing_else) {
        static const struct {
                const char *line;
                const char *kept;
        } cases[] = {
                { "A: 1\r\n", "A: 1" }, { "B: 2\n", "B: 2" }, { "C: 3\r\r\n", "C: 3" }, { "D: 4\n\r\n", "D: 4" },
                { "E: 5\r", "E: 5" }, { "F: 6 \r\n", "F: 6 " }, { "G: \n7\r\n", "G: \n7" }, { "H: 8", "H: 8" },
        };
        struct answer a = { .mode = ANSWER_HEADERS };

        ck_assert_int_eq(answer_add_header_line(&a, "HTTP/1.1 200 OK\r\n", 17), 0);
        for (size_t i = 0; i < N(cases); i++)
                ck_assert_int_eq(answer_add_header_line(&a, cases[i].line, strlen(cases[i].line)), 0);
        ck_assert_uint_eq(a.n_headers, N(cases));
        for (size_t i = 0; i < N(cases); i++)
                ck_assert_str_eq(answer_line(&a, i), cases[i].kept);
        answer_free(&a);
}
END_TEST

/* Every hop-by-hop name is dropped in any case; names of the same lengths that are not one of
 * them reach the client. */
START_TEST(test_every_hop_by_hop_answer_header_is_dropped_and_its_near_misses_kept) {
        static const char *const lines[] = {
                "HTTP/1.1 200 OK\r\n", "te: trailers\r\n", "UPGRADE: h2c\r\n", "trailer: x\r\n",
                "Keep-Alive: timeout=5\r\n", "connection: close\r\n", "Content-Length: 2\r\n",
                "PROXY-CONNECTION: close\r\n", "transfer-encoding: chunked\r\n", "x-keypool-pool: forged\r\n",
                "Tf: 1\r\n", "Upgradz: 2\r\n", "Keep-Alivf: 3\r\n", "Content-Lengtf: 4\r\n",
                "Proxy-Connectiof: 5\r\n", "Transfer-Encodinf: 6\r\n", "X-Keypool: 7\r\n", "\r\n",
        };
        static const char *const kept[] = {
                "Tf", "Upgradz", "Keep-Alivf", "Content-Lengtf", "Proxy-Connectiof", "Transfer-Encodinf", "X-Keypool",
        };
        struct answer a = { .mode = ANSWER_HEADERS };
        struct http_header h[16];
        char names[512];

        ck_assert_uint_eq(client_headers_of(&a, lines, N(lines), h, N(h), names, sizeof names), N(kept));
        for (size_t i = 0; i < N(kept); i++)
                ck_assert_str_eq(h[i].name, kept[i]);
        answer_free(&a);
}
END_TEST

START_TEST(test_out_of_range_status_and_too_many_headers_are_refused) {
        struct answer a = { .mode = ANSWER_HEADERS };
        char line[64];

        ck_assert_int_eq(answer_add_header_line(&a, "HTTP/1.1 999 Odd\r\n", 18), 0);
        ck_assert_int_eq(answer_add_header_line(&a, "\r\n", 2), -EPROTO);
        ck_assert_int_eq(answer_add_header_line(&a, "HTTP/1.1 20\r\n", 13), 0);
        ck_assert_int_eq(answer_add_header_line(&a, "\r\n", 2), -EPROTO);
        ck_assert_int_eq(answer_add_header_line(&a, "HTTP/1.1 599 Edge\r\n", 19), 0);
        ck_assert_int_eq(answer_add_header_line(&a, "\r\n", 2), 0);
        ck_assert_int_eq(answer_add_header_line(&a, "HTTP/1.1 200 OK\r\n", 17), 0);
        for (unsigned i = 0; i < ANSWER_MAX_HEADERS; i++) {
                snprintf(line, sizeof line, "X-H%u: v\r\n", i);
                ck_assert_int_eq(answer_add_header_line(&a, line, strlen(line)), 0);
        }
        ck_assert_int_eq(answer_add_header_line(&a, "X-One-Too-Many: v\r\n", 20), -E2BIG);
        answer_reset(&a);
        {
                static char big[ANSWER_MAX_HEADER_BYTES + 16];

                memset(big, 'a', sizeof big - 3);
                memcpy(big, "X-Big: ", 7);
                memcpy(big + sizeof big - 3, "\r\n", 2);
                ck_assert_int_eq(answer_add_header_line(&a, big, sizeof big - 1), -E2BIG);
        }
        answer_free(&a);
}
END_TEST

START_TEST(test_new_status_line_starts_a_new_answer) {
        static const char *const lines[] = {
                "HTTP/1.1 503 Busy\r\n", "Retry-After: 1\r\n", "HTTP/1.1 200 OK\r\n", "\r\n",
        };
        struct answer a = { .mode = ANSWER_HEADERS };

        feed_headers(&a, lines, N(lines));
        ck_assert_int_eq(a.status, 200);
        ck_assert_uint_eq(a.n_headers, 0);
        ck_assert_int_eq(a.mode, ANSWER_STREAM);
        answer_free(&a);
}
END_TEST

START_TEST(test_reset_empties_the_answer_but_keeps_small_buffers) {
        static const char *const lines[] = { "HTTP/1.1 503 Busy\r\n", "Retry-After: 1\r\n", "\r\n" };
        struct answer a = { .mode = ANSWER_HEADERS };

        feed_headers(&a, lines, N(lines));
        ck_assert_int_eq(answer_append(&a, "busy", 4), 0);
        answer_reset(&a);
        ck_assert_int_eq(a.mode, ANSWER_HEADERS);
        ck_assert_int_eq(a.status, 0);
        ck_assert_uint_eq(a.n_headers, 0);
        ck_assert_uint_eq(a.body_len, 0);
        ck_assert_msg(a.body != NULL, "a small body buffer is kept for the next attempt");
        answer_free(&a);
}
END_TEST

static struct scrub *scrub_of(const char *secret) {
        struct scrub *s = NULL;

        ck_assert_int_eq(scrub_new(&s), 0);
        ck_assert_int_eq(scrub_add(s, secret, strlen(secret)), 0);
        ck_assert_int_eq(scrub_seal(s), 0);
        return s;
}

START_TEST(test_buffered_error_answer_loses_the_echoed_key_before_it_is_relayed) {
        static const char *const lines[] = { "HTTP/1.1 401 Unauthorized\r\n", "\r\n" };
        static const char secret[] = "FakeKeyForScrubbingTestsOnly";
        static const char body[] = "{\"error\":\"bad key FakeKeyForScrubbingTestsOnly\"}";
        struct scrub *s = scrub_of(secret);
        struct answer a = { .mode = ANSWER_HEADERS };

        feed_headers(&a, lines, N(lines));
        ck_assert_int_eq(a.mode, ANSWER_BUFFER);
        ck_assert_int_eq(answer_append(&a, body, strlen(body)), 0);
        answer_scrub_unsent(&a, s);
        ck_assert_ptr_null(strstr(a.body, secret));
        ck_assert_ptr_nonnull(strstr(a.body, "bad key [redacted]"));
        ck_assert_uint_eq(a.body_len, strlen(a.body));
        answer_free(&a);
        scrub_free(s);
}
END_TEST

START_TEST(test_held_error_event_loses_the_echoed_key_and_stays_held) {
        static const char *const lines[] = { "HTTP/1.1 200 OK\r\n", "Content-Type: text/event-stream\r\n", "\r\n" };
        static const char secret[] = "FakeKeyForScrubbingTestsOnly";
        static const char event[] = "data: {\"error\":{\"code\":401,\"message\":\"FakeKeyForScrubbingTestsOnly\"}}\n\n";
        struct scrub *s = scrub_of(secret);
        struct answer a = { .mode = ANSWER_HEADERS };

        feed_headers(&a, lines, N(lines));
        ck_assert_msg(a.holding, "the first event is held");
        ck_assert_int_eq(answer_append(&a, event, strlen(event)), 0);
        a.held = a.body_len;
        answer_scrub_unsent(&a, s);
        ck_assert_ptr_null(strstr(a.body, secret));
        ck_assert_uint_eq(a.held, a.body_len);
        ck_assert_uint_eq(a.body_len, strlen(a.body));
        answer_free(&a);
        scrub_free(s);
}
END_TEST

/* --- the request as it goes upstream ----------------------------------------------------- */

static void check_rewrite(const char *body, const char *model_id, const char *expected) {
        struct jscan_value model;
        char *text = NULL;
        size_t len = 0;

        ck_assert_int_eq(jscan_object_member(body, strlen(body), "model", &model), 0);
        ck_assert_int_eq(proxy_rewrite_model(body, strlen(body), &model, model_id, &text, &len), 0);
        ck_assert_str_eq(text, expected);
        ck_assert_uint_eq(len, strlen(expected));
        free(text);
}

START_TEST(test_pool_name_given_as_model_is_replaced_where_it_stands) {
        check_rewrite("{ \"model\" : \"fast\" ,\n  \"messages\": [] }", "gpt-4o-mini",
                      "{ \"model\" : \"gpt-4o-mini\" ,\n  \"messages\": [] }");
        check_rewrite("{\"messages\":[{\"role\":\"user\"}],\"model\":\"fast\"}", "m",
                      "{\"messages\":[{\"role\":\"user\"}],\"model\":\"m\"}");
}
END_TEST

START_TEST(test_missing_model_is_added_as_the_first_member) {
        check_rewrite("  {\"messages\":[]}", "m", "  {\"model\":\"m\",\"messages\":[]}");
        check_rewrite("{ }", "m", "{\"model\":\"m\" }");
}
END_TEST

START_TEST(test_model_id_is_written_as_a_json_string) {
        check_rewrite("{\"model\":null}", "a\"b\\c\n", "{\"model\":\"a\\\"b\\\\c\\u000a\"}");
}
END_TEST

START_TEST(test_client_credentials_and_hop_headers_never_go_upstream) {
        static const char *const dropped[] = {
                "Authorization", "authorization", "x-api-key", "X-Goog-Api-Key", "Proxy-Authorization",
                "Host", "Connection", "transfer-encoding", "TE", "Content-Length", "Expect",
                "Accept-Encoding", "X-Keypool-Pool", "x-keypool-max-wait", "keep-alive", "UPGRADE",
                "Trailer", "proxy-connection",
        };
        struct config_provider prov = { .name = "p" };

        for (size_t i = 0; i < N(dropped); i++)
                ck_assert_msg(!proxy_forwards_header(&prov, dropped[i]), "%s must not be forwarded", dropped[i]);
}
END_TEST

START_TEST(test_other_client_headers_go_upstream_unless_the_provider_sets_them) {
        static const char *const kept[] = { "Content-Type", "anthropic-version", "OpenAI-Beta", "Tea", "Keep",
                                            "Upgrade-Insecure-Requests", "Trailers", "Proxy", "X-Title" };
        char *headers[] = { "HTTP-Referer: https://example.invalid", "X-Title: keypool" };
        struct config_provider prov = { .name = "p", .headers = headers, .n_headers = 2 };

        for (size_t i = 0; i < N(kept) - 1; i++)
                ck_assert_msg(proxy_forwards_header(&prov, kept[i]), "%s must be forwarded", kept[i]);
        ck_assert_msg(!proxy_forwards_header(&prov, "x-title"), "the provider's X-Title wins");
        ck_assert_msg(!proxy_forwards_header(&prov, "http-referer"), "the provider's HTTP-Referer wins");
}
END_TEST

/* --- config_pool_key ---------------------------------------------------------------------- */

START_TEST(test_pool_key_is_found_by_its_table_row) {
        struct config_key keys[3] = { { .id = "k0" }, { .id = "k1" }, { .id = "k2" } };
        struct config_pool pool = { .name = "p", .keys = keys, .n_keys = 3 };

        ck_assert_ptr_eq(config_pool_key(&pool, 10, 10), &keys[0]);
        ck_assert_ptr_eq(config_pool_key(&pool, 10, 12), &keys[2]);
        ck_assert_ptr_null(config_pool_key(&pool, 10, 9));
        ck_assert_ptr_null(config_pool_key(&pool, 10, 13));
        ck_assert_ptr_null(config_pool_key(NULL, 0, 0));
}
END_TEST

/* libcurl 7.88 fails an HTTP/2 transfer whose server ended the stream with its answer before
 * the request's body was sent ("framing layer"): a whole answer stands, nothing less does. */
START_TEST(test_a_whole_answer_stands_despite_a_later_http2_stream_error)
{
        static const struct {
                const char *what;
                CURLcode res;
                bool head;
                int64_t expected, got;
                bool stands;
        } rows[] = {
                { "every byte of its Content-Length arrived", CURLE_HTTP2_STREAM, true, 281, 281, true },
                { "an empty answer, whole", CURLE_HTTP2_STREAM, true, 0, 0, true },
                { "part of the body only", CURLE_HTTP2_STREAM, true, 281, 200, false },
                { "no Content-Length: whole or not cannot be told", CURLE_HTTP2_STREAM, true, -1, 281, false },
                { "no head yet", CURLE_HTTP2_STREAM, false, -1, 0, false },
                { "another error, with every byte", CURLE_RECV_ERROR, true, 281, 281, false },
                { "a reset connection, with every byte", CURLE_HTTP2, true, 281, 281, false },
        };

        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
                ck_assert_msg(proxy_answer_stands(rows[i].res, rows[i].head, rows[i].expected, rows[i].got) ==
                              rows[i].stands, "%s: expected %s", rows[i].what,
                              rows[i].stands ? "the answer to stand" : "a failure");
}
END_TEST

static Suite *proxy_suite(void) {
        Suite *s = suite_create("proxy");
        TCase *tc;

        tc = tcase_create("decide");
        tcase_add_test(tc, test_a_whole_answer_stands_despite_a_later_http2_stream_error);
        tcase_add_test(tc, test_rate_limited_attempt_rotates_to_next_key);
        tcase_add_test(tc, test_event_stream_content_type_is_found_in_any_case_and_place);
        tcase_add_test(tc, test_every_hop_by_hop_answer_header_is_dropped_and_its_near_misses_kept);
        tcase_add_test(tc, test_rate_figure_names_are_noted_as_lines_arrive);
        tcase_add_test(tc, test_header_lines_lose_every_line_end_and_nothing_else);
        tcase_add_test(tc, test_each_timeout_is_retried_then_answered_504_naming_it);
        tcase_add_test(tc, test_request_timeout_ends_the_request_whatever_is_left);
        tcase_add_test(tc, test_broken_answer_is_transient_then_answered_502);
        tcase_add_test(tc, test_attempts_are_bounded_whatever_the_mix);
        tcase_add_test(tc, test_dead_key_attempt_rotates_to_next_key);
        tcase_add_test(tc, test_rotation_stops_at_the_attempt_limit_and_relays_the_last_answer);
        tcase_add_test(tc, test_transient_answer_is_retried_after_a_backoff);
        tcase_add_test(tc, test_provider_retry_hint_lengthens_the_backoff_up_to_the_cap);
        tcase_add_test(tc, test_transient_answer_is_relayed_once_retries_run_out);
        tcase_add_test(tc, test_unreachable_upstream_is_retried_then_answered_502);
        tcase_add_test(tc, test_upstream_timeout_is_retried_then_answered_504);
        tcase_add_test(tc, test_transfer_failure_after_bytes_reached_the_client_cuts_the_connection);
        tcase_add_test(tc, test_relayed_success_ends_the_stream_whatever_it_carried);
        tcase_add_test(tc, test_caller_error_is_relayed_as_it_came);
        tcase_add_test(tc, test_gone_client_gets_nothing_more_whatever_the_outcome);
        tcase_add_test(tc, test_refusal_of_the_callers_path_moves_once_and_asks_the_probe);
        tcase_add_test(tc, test_certificate_failure_fails_at_once_naming_tls);
        tcase_add_test(tc, test_tls_and_dns_failures_are_retried_then_answered_502_naming_them);
        suite_add_tcase(s, tc);

        tc = tcase_create("answer");
        tcase_add_test(tc, test_success_answer_is_relayed_as_it_arrives);
        tcase_add_test(tc, test_error_answer_is_kept_whole_to_be_judged);
        tcase_add_test(tc, test_status_line_is_read_within_its_line);
        tcase_add_test(tc, test_informational_answer_is_replaced_by_the_final_one);
        tcase_add_test(tc, test_first_complete_event_ends_where_its_blank_line_ends);
        tcase_add_test(tc, test_a_stream_holds_no_event_buffer_between_events);
        tcase_add_test(tc, test_a_relayed_streams_body_is_released_and_a_held_one_kept);
        tcase_add_test(tc, test_error_event_in_a_stream_is_noted_once);
        tcase_add_test(tc, test_stream_usage_keeps_the_last_running_totals);
        tcase_add_test(tc, test_oversized_event_is_not_inspected);
        tcase_add_test(tc, test_events_after_an_oversized_one_are_inspected_again);
        tcase_add_test(tc, test_non_sse_success_counts_tokens_from_its_body);
        tcase_add_test(tc, test_client_gets_end_to_end_headers_only);
        tcase_add_test(tc, test_new_status_line_starts_a_new_answer);
        tcase_add_test(tc, test_out_of_range_status_and_too_many_headers_are_refused);
        tcase_add_test(tc, test_reset_empties_the_answer_but_keeps_small_buffers);
        tcase_add_test(tc, test_buffered_error_answer_loses_the_echoed_key_before_it_is_relayed);
        tcase_add_test(tc, test_held_error_event_loses_the_echoed_key_and_stays_held);
        suite_add_tcase(s, tc);

        tc = tcase_create("upstream_request");
        tcase_add_test(tc, test_pool_name_given_as_model_is_replaced_where_it_stands);
        tcase_add_test(tc, test_missing_model_is_added_as_the_first_member);
        tcase_add_test(tc, test_model_id_is_written_as_a_json_string);
        tcase_add_test(tc, test_client_credentials_and_hop_headers_never_go_upstream);
        tcase_add_test(tc, test_other_client_headers_go_upstream_unless_the_provider_sets_them);
        suite_add_tcase(s, tc);

        tc = tcase_create("config");
        tcase_add_test(tc, test_pool_key_is_found_by_its_table_row);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        SRunner *sr = srunner_create(proxy_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
