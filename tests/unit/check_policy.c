/* check_policy.c — unit tests of the upstream-answer classifier.
 *
 * Every example of reference/provider-signals.md goes through policy_classify with a fixed clock,
 * and every expected rest is an exact number of milliseconds worked out by hand (or, for the
 * Pacific-midnight cases, by Python's zoneinfo), never by calling the code under test.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "keypool/policy.h"

#define SEC  INT64_C(1000)
#define MIN  (60 * SEC)
#define HOUR (60 * MIN)
#define DAY  (24 * HOUR)

/* 2026-08-21T12:00:00Z, a Friday; 05:00 PDT. */
#define NOW INT64_C(1787313600000)

#define RECOVERY (900 * SEC)

static const struct policy_config pc_default = { .recovery_ms = RECOVERY, .max_cooldown_ms = DAY };

#define HDR(n, v) { (n), sizeof(n) - 1, (v), sizeof(v) - 1 }
#define N(arr) (sizeof(arr) / sizeof((arr)[0]))

static struct verdict judge_full(int status, const struct answer_header *h, size_t n_h, const char *body,
                                 size_t body_len, const struct policy_config *pc, int64_t now) {
        struct upstream_answer a = {
                .status = status,
                .headers = h,
                .n_headers = n_h,
                .body = body,
                .body_len = body_len,
        };
        struct verdict v = { .cls = VERDICT_NONE, .rest_ms = -12345, .hinted = -1, .retry_after_ms = -12345 };

        policy_classify(&a, pc, now, &v);
        return v;
}

static struct verdict judge(int status, const struct answer_header *h, size_t n_h, const char *body) {
        return judge_full(status, h, n_h, body, body ? strlen(body) : 0, &pc_default, NOW);
}

static struct verdict judge_at(int status, const char *body, const struct policy_config *pc, int64_t now) {
        return judge_full(status, NULL, 0, body, body ? strlen(body) : 0, pc, now);
}

#define assert_verdict(v, want_cls, want_rest, want_hinted)                                               \
        do {                                                                                              \
                struct verdict _v = (v);                                                                  \
                ck_assert_msg(_v.cls == (want_cls) && _v.rest_ms == (int64_t) (want_rest) &&              \
                                      _v.hinted == (want_hinted),                                         \
                              "expected %s rest %lld hinted %d, got %s rest %lld hinted %d",              \
                              verdict_class_name(want_cls), (long long) (want_rest), (want_hinted),       \
                              verdict_class_name(_v.cls) ? verdict_class_name(_v.cls) : "none",           \
                              (long long) _v.rest_ms, _v.hinted);                                         \
        } while (0)

#define assert_class(v, want_cls) assert_verdict(v, want_cls, 0, 0)
#define assert_ok_rests(v, ms)    assert_verdict(v, VERDICT_OK, ms, 1)

/* A transient verdict never rests the key; the hint, if any, is only for the retry loop. */
#define assert_transient_retry(v, want_retry)                                                           \
        do {                                                                                            \
                struct verdict _t = (v);                                                                \
                assert_class(_t, VERDICT_TRANSIENT);                                                    \
                ck_assert_msg(_t.retry_after_ms == (int64_t) (want_retry),                              \
                              "expected retry_after_ms %lld, got %lld", (long long) (want_retry),       \
                              (long long) _t.retry_after_ms);                                           \
        } while (0)
#define assert_rests(v, ms)       assert_verdict(v, VERDICT_RATE_LIMITED, ms, 1)
#define assert_unhinted(v)        assert_verdict(v, VERDICT_RATE_LIMITED, RECOVERY, 0)

/* ---- bodies as the providers send them -------------------------------------------------- */

static const char openai_rate_limit_body[] =
        "{\"error\":{\"message\":\"Rate limit reached for gpt-4o in organization org-fake on tokens per min "
        "(TPM): Limit 30000, Used 29000, Requested 2000. Please try again in 2.5s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.\",\"type\":\"tokens\",\"param\":null,"
        "\"code\":\"rate_limit_exceeded\"}}";

static const char openai_rate_limit_no_delay_body[] =
        "{\"error\":{\"message\":\"Rate limit reached for gpt-4o on requests per min (RPM): Limit 500.\","
        "\"type\":\"requests\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}";

static const char openai_quota_body[] =
        "{\"error\":{\"message\":\"You exceeded your current quota, please check your plan and billing "
        "details.\",\"type\":\"insufficient_quota\",\"param\":null,\"code\":\"insufficient_quota\"}}";

static const char anthropic_rate_limit_body[] =
        "{\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"Number of request tokens "
        "has exceeded your per-minute rate limit\"}}";

static const char anthropic_spend_cap_body[] =
        "{\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"You have reached your "
        "specified workspace API usage limits.\",\"details\":{\"error_code\":\"enforced_spend_limit_reached\"}}}";

static const char anthropic_overloaded_body[] =
        "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}";

static const char openrouter_rate_limit_body[] =
        "{\"error\":{\"code\":429,\"message\":\"Rate limit exceeded: free-models-per-min.\","
        "\"metadata\":{\"headers\":{\"X-RateLimit-Limit\":\"20\",\"X-RateLimit-Remaining\":\"0\"}}}}";

static const char gemini_per_minute_body[] =
        "{\"error\":{\"code\":429,\"status\":\"RESOURCE_EXHAUSTED\",\"message\":\"You exceeded your current "
        "quota. Please retry in 57.3s.\",\"details\":["
        "{\"@type\":\"type.googleapis.com/google.rpc.QuotaFailure\",\"violations\":[{\"quotaMetric\":"
        "\"generativelanguage.googleapis.com/generate_content_free_tier_requests\",\"quotaId\":"
        "\"GenerateRequestsPerMinutePerProjectPerModel-FreeTier\",\"quotaValue\":\"10\"}]},"
        "{\"@type\":\"type.googleapis.com/google.rpc.RetryInfo\",\"retryDelay\":\"57s\"}]}}";

static const char gemini_per_day_body[] =
        "{\"error\":{\"code\":429,\"status\":\"RESOURCE_EXHAUSTED\",\"message\":\"You exceeded your current "
        "quota. Please retry in 57.3s.\",\"details\":["
        "{\"@type\":\"type.googleapis.com/google.rpc.QuotaFailure\",\"violations\":[{\"quotaMetric\":"
        "\"generativelanguage.googleapis.com/generate_content_free_tier_requests\",\"quotaId\":"
        "\"GenerateRequestsPerDayPerProjectPerModel-FreeTier\",\"quotaValue\":\"250\"}]},"
        "{\"@type\":\"type.googleapis.com/google.rpc.RetryInfo\",\"retryDelay\":\"57s\"}]}}";

/* ---- vocabulary ------------------------------------------------------------------------- */

START_TEST(test_class_names_match_the_status_vocabulary) {
        ck_assert_str_eq(verdict_class_name(VERDICT_OK), "ok");
        ck_assert_str_eq(verdict_class_name(VERDICT_RATE_LIMITED), "rate_limited");
        ck_assert_str_eq(verdict_class_name(VERDICT_QUOTA), "quota");
        ck_assert_str_eq(verdict_class_name(VERDICT_AUTH), "auth");
        ck_assert_str_eq(verdict_class_name(VERDICT_TRANSIENT), "transient");
        ck_assert_str_eq(verdict_class_name(VERDICT_CALLER), "caller");
        ck_assert_ptr_null(verdict_class_name(VERDICT_NONE));
        ck_assert_ptr_null(verdict_class_name(_VERDICT_MAX));
}
END_TEST

/* ---- status alone ----------------------------------------------------------------------- */

START_TEST(test_transport_error_is_transient_and_blames_no_key) {
        struct upstream_answer a = { .status = 429, .transport_error = 28 };
        struct verdict v;

        policy_classify(&a, &pc_default, NOW, &v);
        assert_class(v, VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_answer_without_status_is_transient) {
        assert_class(judge(0, NULL, 0, NULL), VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_success_and_redirect_are_ok_even_with_limit_words) {
        static const struct answer_header h[] = { HDR("Retry-After", "30") };

        assert_class(judge(200, NULL, 0, "{}"), VERDICT_OK);
        assert_class(judge(204, NULL, 0, NULL), VERDICT_OK);
        assert_class(judge(302, h, N(h), "Too many requests"), VERDICT_OK);
        /* A stream that fails after HTTP 200 is judged by the stream reader, not by the status. */
        assert_class(judge(200, NULL, 0,
                           "data: {\"error\":{\"code\":429,\"message\":\"Rate limit exceeded\"},"
                           "\"choices\":[{\"finish_reason\":\"error\"}]}\n\n"),
                     VERDICT_OK);
}
END_TEST

START_TEST(test_informational_and_impossible_statuses_are_transient) {
        assert_class(judge(100, NULL, 0, NULL), VERDICT_TRANSIENT);
        assert_class(judge(600, NULL, 0, "rate limit"), VERDICT_TRANSIENT);
        assert_class(judge(-429, NULL, 0, NULL), VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_missing_answer_is_transient_and_missing_config_uses_defaults) {
        static const struct answer_header h[] = { HDR("Retry-After", "999999") };
        struct verdict v;

        policy_classify(NULL, &pc_default, NOW, &v);
        assert_class(v, VERDICT_TRANSIENT);
        policy_classify(NULL, &pc_default, NOW, NULL); /* must not crash */
        assert_unhinted(judge_full(429, NULL, 0, NULL, 0, NULL, NOW));
        assert_rests(judge_full(429, h, N(h), NULL, 0, NULL, NOW), DAY);
}
END_TEST

/* ---- OpenAI ----------------------------------------------------------------------------- */

START_TEST(test_openai_rate_limit_rests_for_the_delay_named_in_the_message) {
        assert_rests(judge(429, NULL, 0, openai_rate_limit_body), 2500);
}
END_TEST

START_TEST(test_openai_message_delay_in_go_duration_form_is_understood) {
        assert_rests(judge(429, NULL, 0,
                           "{\"error\":{\"message\":\"Rate limit reached. Please try again in 6m0s.\","
                           "\"code\":\"rate_limit_exceeded\"}}"),
                     6 * MIN);
}
END_TEST

START_TEST(test_openai_rate_limit_without_any_hint_rests_the_recovery_time) {
        assert_unhinted(judge(429, NULL, 0, openai_rate_limit_no_delay_body));
}
END_TEST

START_TEST(test_openai_insufficient_quota_429_is_billing_not_a_rate_limit) {
        static const struct answer_header h[] = { HDR("retry-after", "20") };

        assert_class(judge(429, NULL, 0, openai_quota_body), VERDICT_QUOTA);
        assert_class(judge(429, h, N(h), openai_quota_body), VERDICT_QUOTA);
}
END_TEST

START_TEST(test_openai_insufficient_quota_named_only_by_type_or_code_is_billing) {
        assert_class(judge(429, NULL, 0, "{\"error\":{\"message\":\"x\",\"type\":\"insufficient_quota\"}}"),
                     VERDICT_QUOTA);
        assert_class(judge(429, NULL, 0, "{\"error\":{\"message\":\"x\",\"code\":\"insufficient_quota\"}}"),
                     VERDICT_QUOTA);
}
END_TEST

START_TEST(test_openai_401_invalid_key_is_auth) {
        assert_class(judge(401, NULL, 0,
                           "{\"error\":{\"message\":\"Incorrect API key provided: sk-fake****test.\","
                           "\"type\":\"invalid_request_error\",\"code\":\"invalid_api_key\"}}"),
                     VERDICT_AUTH);
}
END_TEST

START_TEST(test_openai_503_overloaded_is_transient) {
        assert_class(judge(503, NULL, 0,
                           "{\"error\":{\"message\":\"The engine is currently overloaded, please try again "
                           "later\",\"type\":\"server_error\"}}"),
                     VERDICT_TRANSIENT);
}
END_TEST

/* ---- OpenAI/Groq reset headers ---------------------------------------------------------- */

START_TEST(test_empty_request_bucket_rests_until_its_go_duration_reset) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-limit-requests", "14400"),
                HDR("x-ratelimit-remaining-requests", "0"),
                HDR("x-ratelimit-reset-requests", "2m59.56s"),
                HDR("x-ratelimit-remaining-tokens", "5800"),
                HDR("x-ratelimit-reset-tokens", "7.66s"),
        };

        assert_rests(judge(429, h, N(h), openai_rate_limit_no_delay_body), 179560);
}
END_TEST

START_TEST(test_empty_token_bucket_rests_until_its_go_duration_reset) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-remaining-requests", "14399"),
                HDR("x-ratelimit-reset-requests", "6m0s"),
                HDR("x-ratelimit-remaining-tokens", "0"),
                HDR("x-ratelimit-reset-tokens", "7.66s"),
        };

        assert_rests(judge(429, h, N(h), NULL), 7660);
}
END_TEST

START_TEST(test_both_buckets_empty_rests_until_the_later_reset) {
        static const struct answer_header h[] = {
                HDR("X-RateLimit-Remaining-Requests", "0"),
                HDR("X-RateLimit-Reset-Requests", "1s"),
                HDR("X-RateLimit-Remaining-Tokens", "0"),
                HDR("X-RateLimit-Reset-Tokens", "6m0s"),
        };

        assert_rests(judge(429, h, N(h), NULL), 6 * MIN);
}
END_TEST

START_TEST(test_reset_headers_are_ignored_while_buckets_have_room) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-remaining-requests", "14"),
                HDR("x-ratelimit-reset-requests", "2m59.56s"),
                HDR("x-ratelimit-remaining-tokens", "5800"),
                HDR("x-ratelimit-reset-tokens", "7.66s"),
        };
        static const struct answer_header no_remaining[] = {
                HDR("x-ratelimit-reset-requests", "2m59.56s"),
                HDR("x-ratelimit-reset-tokens", "7.66s"),
        };

        assert_unhinted(judge(429, h, N(h), NULL));
        assert_unhinted(judge(429, no_remaining, N(no_remaining), NULL));
}
END_TEST

static int64_t rest_for_token_reset(const char *reset, int64_t max) {
        struct answer_header h[] = {
                HDR("x-ratelimit-remaining-tokens", "0"),
                { "x-ratelimit-reset-tokens", strlen("x-ratelimit-reset-tokens"), reset, strlen(reset) },
        };
        struct policy_config pc = { .recovery_ms = RECOVERY, .max_cooldown_ms = max };
        struct verdict v = judge_full(429, h, N(h), NULL, 0, &pc, NOW);

        return v.hinted ? v.rest_ms : -1;
}

START_TEST(test_go_durations_of_every_unit_are_understood) {
        ck_assert_int_eq(rest_for_token_reset("1s", DAY), 1000);
        ck_assert_int_eq(rest_for_token_reset("1h2m3s", DAY), 3723000);
        ck_assert_int_eq(rest_for_token_reset("1.5h", DAY), 90 * MIN);
        ck_assert_int_eq(rest_for_token_reset("1500ms", DAY), 1500);
        ck_assert_int_eq(rest_for_token_reset("2500000us", DAY), 2500);
        ck_assert_int_eq(rest_for_token_reset("2500000\xc2\xb5s", DAY), 2500);
        ck_assert_int_eq(rest_for_token_reset("2500000\xce\xbcs", DAY), 2500);
        ck_assert_int_eq(rest_for_token_reset("2500000001ns", DAY), 2501); /* rounds up */
        ck_assert_int_eq(rest_for_token_reset("1m0.5s", DAY), 60500);
}
END_TEST

START_TEST(test_sub_second_resets_rest_the_one_second_minimum) {
        ck_assert_int_eq(rest_for_token_reset("12ms", DAY), 1000);
        ck_assert_int_eq(rest_for_token_reset("500us", DAY), 1000);
        ck_assert_int_eq(rest_for_token_reset("0s", DAY), 1000);
        ck_assert_int_eq(rest_for_token_reset("0", DAY), 1000);
}
END_TEST

START_TEST(test_garbage_go_durations_are_ignored) {
        static const char *const bad[] = {
                "", "-1s", "+1s", "1", "s", "1x", "1s garbage", "1 s", "NaN", "inf", "1e3s", "ms",
                "\xff\xfe", "1..5s", "99999999999999999999x",
        };
        /* Absurd but well formed: capped like any other hint, never ignored. */
        static const char *const absurd[] = { "99999999999999999999s", "9999999h", "2562048h", "5000000h1h" };

        for (size_t i = 0; i < N(bad); i++)
                ck_assert_msg(rest_for_token_reset(bad[i], DAY) == -1, "reset '%s' should be ignored", bad[i]);
        for (size_t i = 0; i < N(absurd); i++)
                ck_assert_msg(rest_for_token_reset(absurd[i], DAY) == DAY, "reset '%s' should be capped", absurd[i]);
}
END_TEST

START_TEST(test_longest_go_duration_that_fits_is_capped_by_max_cooldown) {
        ck_assert_int_eq(rest_for_token_reset("2562047h", DAY), DAY);
        ck_assert_int_eq(rest_for_token_reset("1h", 30 * MIN), 30 * MIN);
}
END_TEST

/* ---- Anthropic -------------------------------------------------------------------------- */

START_TEST(test_anthropic_rate_limit_error_rests_for_retry_after) {
        static const struct answer_header h[] = {
                HDR("retry-after", "30"),
                HDR("anthropic-ratelimit-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T12:40:59Z"),
        };

        assert_rests(judge(429, h, N(h), anthropic_rate_limit_body), 30 * SEC);
}
END_TEST

START_TEST(test_anthropic_spend_cap_is_billing) {
        assert_class(judge(429, NULL, 0, anthropic_spend_cap_body), VERDICT_QUOTA);
        /* Wherever the code sits, and even when the body is not JSON. */
        assert_class(judge(429, NULL, 0,
                           "{\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\","
                           "\"message\":\"enforced_spend_limit_reached: blocked until next month\"}}"),
                     VERDICT_QUOTA);
        assert_class(judge(429, NULL, 0, "error: enforced_spend_limit_reached"), VERDICT_QUOTA);
}
END_TEST

START_TEST(test_anthropic_overloaded_529_is_transient) {
        static const struct answer_header h[] = { HDR("retry-after", "10") };

        assert_class(judge(529, h, N(h), anthropic_overloaded_body), VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_anthropic_error_types_map_to_classes) {
        assert_class(judge(400, NULL, 0,
                           "{\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\","
                           "\"message\":\"max_tokens: Field required\"}}"),
                     VERDICT_CALLER);
        assert_class(judge(401, NULL, 0,
                           "{\"type\":\"error\",\"error\":{\"type\":\"authentication_error\","
                           "\"message\":\"invalid x-api-key\"}}"),
                     VERDICT_AUTH);
        assert_class(judge(403, NULL, 0,
                           "{\"type\":\"error\",\"error\":{\"type\":\"permission_error\","
                           "\"message\":\"Your API key does not have permission\"}}"),
                     VERDICT_AUTH);
        assert_class(judge(404, NULL, 0,
                           "{\"type\":\"error\",\"error\":{\"type\":\"not_found_error\",\"message\":\"model: x\"}}"),
                     VERDICT_CALLER);
        assert_class(judge(413, NULL, 0,
                           "{\"type\":\"error\",\"error\":{\"type\":\"request_too_large\","
                           "\"message\":\"Request exceeds the maximum allowed number of bytes.\"}}"),
                     VERDICT_CALLER);
        assert_class(judge(500, NULL, 0,
                           "{\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"Internal "
                           "server error\"}}"),
                     VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_anthropic_rate_limit_error_type_inside_a_5xx_is_a_rate_limit) {
        assert_unhinted(judge(500, NULL, 0,
                              "{\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"x\"}}"));
}
END_TEST

START_TEST(test_anthropic_empty_token_bucket_rests_until_its_rfc3339_reset) {
        static const struct answer_header h[] = {
                HDR("anthropic-ratelimit-requests-remaining", "49"),
                HDR("anthropic-ratelimit-requests-reset", "2026-08-21T12:00:01Z"),
                HDR("anthropic-ratelimit-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T12:40:59Z"),
        };

        assert_rests(judge(429, h, N(h), anthropic_rate_limit_body), 40 * MIN + 59 * SEC);
}
END_TEST

START_TEST(test_anthropic_reset_with_fraction_and_offset_is_understood) {
        static const struct answer_header input[] = {
                HDR("anthropic-ratelimit-input-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-input-tokens-reset", "2026-08-21T05:40:59.250-07:00"),
        };
        static const struct answer_header output[] = {
                HDR("anthropic-ratelimit-output-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-output-tokens-reset", "2026-08-21T14:00:30.5+02:00"),
        };
        static const struct answer_header requests[] = {
                HDR("anthropic-ratelimit-requests-remaining", "0"),
                HDR("anthropic-ratelimit-requests-reset", "2026-08-21t12:00:07.123456789z"),
        };

        assert_rests(judge(429, input, N(input), NULL), 40 * MIN + 59 * SEC + 250);
        assert_rests(judge(429, output, N(output), NULL), 30500);
        assert_rests(judge(429, requests, N(requests), NULL), 7123);
}
END_TEST

START_TEST(test_anthropic_several_empty_buckets_rest_until_the_latest_reset) {
        static const struct answer_header h[] = {
                HDR("anthropic-ratelimit-requests-remaining", "0"),
                HDR("anthropic-ratelimit-requests-reset", "2026-08-21T12:00:10Z"),
                HDR("anthropic-ratelimit-input-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-input-tokens-reset", "2026-08-21T12:01:00Z"),
                HDR("anthropic-ratelimit-output-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-output-tokens-reset", "2026-08-21T12:00:20Z"),
        };

        assert_rests(judge(429, h, N(h), NULL), MIN);
}
END_TEST

START_TEST(test_anthropic_reset_is_ignored_while_the_bucket_has_room) {
        static const struct answer_header h[] = {
                HDR("anthropic-ratelimit-tokens-remaining", "12000"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T12:40:59Z"),
        };

        assert_unhinted(judge(429, h, N(h), anthropic_rate_limit_body));
}
END_TEST

START_TEST(test_anthropic_reset_in_the_past_rests_the_minimum) {
        static const struct answer_header h[] = {
                HDR("anthropic-ratelimit-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T11:59:00Z"),
        };

        assert_rests(judge(429, h, N(h), anthropic_rate_limit_body), SEC);
}
END_TEST

START_TEST(test_anthropic_garbage_resets_are_ignored) {
        static const char *const bad[] = {
                "",
                "yesterday",
                "2026-02-29T00:00:00Z",
                "2026-08-21T25:00:00Z",
                "2026-08-21T12:60:00Z",
                "2026-13-01T00:00:00Z",
                "2026-08-21T12:40:59",
                "2026-08-21T12:40:59+25:00",
                "2026-08-21T12:40:59.Z",
                "2026-08-21T12:40:59Zjunk",
                "99999-08-21T12:40:59Z",
                "-2026-08-21T12:40:59Z",
                "1787313600",
        };

        for (size_t i = 0; i < N(bad); i++) {
                struct answer_header h[] = {
                        HDR("anthropic-ratelimit-tokens-remaining", "0"),
                        { "anthropic-ratelimit-tokens-reset", strlen("anthropic-ratelimit-tokens-reset"), bad[i],
                          strlen(bad[i]) },
                };
                struct verdict v = judge(429, h, N(h), NULL);

                ck_assert_msg(v.cls == VERDICT_RATE_LIMITED && v.hinted == 0 && v.rest_ms == RECOVERY,
                              "reset '%s' should be ignored", bad[i]);
        }
}
END_TEST

/* ---- OpenRouter ------------------------------------------------------------------------- */

START_TEST(test_openrouter_429_rests_until_x_ratelimit_reset_in_epoch_ms) {
        static const struct answer_header h[] = {
                HDR("X-RateLimit-Limit", "20"),
                HDR("X-RateLimit-Remaining", "0"),
                HDR("X-RateLimit-Reset", "1787313645000"),
        };

        assert_rests(judge(429, h, N(h), openrouter_rate_limit_body), 45 * SEC);
}
END_TEST

START_TEST(test_x_ratelimit_reset_in_epoch_seconds_is_accepted) {
        static const struct answer_header h[] = { HDR("x-ratelimit-reset", "1787313690") };

        assert_rests(judge(429, h, N(h), openrouter_rate_limit_body), 90 * SEC);
}
END_TEST

START_TEST(test_x_ratelimit_reset_in_the_past_rests_the_minimum) {
        static const struct answer_header h[] = { HDR("X-RateLimit-Reset", "1787313500000") };

        assert_rests(judge(429, h, N(h), openrouter_rate_limit_body), SEC);
}
END_TEST

START_TEST(test_x_ratelimit_reset_too_small_for_a_date_is_read_as_seconds_to_wait) {
        static const struct answer_header h[] = { HDR("X-RateLimit-Reset", "60") };

        assert_rests(judge(429, h, N(h), openrouter_rate_limit_body), MIN);
}
END_TEST

START_TEST(test_garbage_x_ratelimit_reset_is_ignored) {
        static const struct answer_header h1[] = { HDR("X-RateLimit-Reset", "99999999999999999999") };
        static const struct answer_header h2[] = { HDR("X-RateLimit-Reset", "-1787313645000") };
        static const struct answer_header h3[] = { HDR("X-RateLimit-Reset", "soon") };
        static const struct answer_header h4[] = { HDR("X-RateLimit-Reset", "") };
        static const struct answer_header h5[] = { HDR("X-RateLimit-Reset", "9223372036854775807") };
        const struct policy_config pc = pc_default;

        assert_unhinted(judge(429, h1, N(h1), openrouter_rate_limit_body));
        assert_unhinted(judge(429, h2, N(h2), openrouter_rate_limit_body));
        assert_unhinted(judge(429, h3, N(h3), openrouter_rate_limit_body));
        assert_unhinted(judge(429, h4, N(h4), openrouter_rate_limit_body));
        /* The largest int64 is a valid (absurd) time: capped, and no overflow with any clock. */
        assert_rests(judge(429, h5, N(h5), openrouter_rate_limit_body), DAY);
        assert_unhinted(judge_full(429, h5, N(h5), NULL, 0, &pc, INT64_MIN));
}
END_TEST

START_TEST(test_openrouter_402_out_of_credits_is_quota) {
        assert_class(judge(402, NULL, 0,
                           "{\"error\":{\"code\":402,\"message\":\"Insufficient credits\","
                           "\"metadata\":{\"limit_source\":\"openrouter_credits\"}}}"),
                     VERDICT_QUOTA);
}
END_TEST

START_TEST(test_openrouter_402_key_limit_is_quota) {
        assert_class(judge(402, NULL, 0,
                           "{\"error\":{\"code\":402,\"message\":\"Key limit exceeded\","
                           "\"metadata\":{\"limit_source\":\"openrouter_key_limit\"}}}"),
                     VERDICT_QUOTA);
}
END_TEST

START_TEST(test_openrouter_402_in_flight_budget_is_transient) {
        static const struct answer_header h[] = { HDR("Retry-After", "2") };

        assert_class(judge(402, h, N(h),
                           "{\"error\":{\"code\":402,\"message\":\"Too much spend in flight\","
                           "\"metadata\":{\"limit_source\":\"openrouter_in_flight_budget\"}}}"),
                     VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_402_without_a_body_is_quota) {
        assert_class(judge(402, NULL, 0, NULL), VERDICT_QUOTA);
        assert_class(judge(402, NULL, 0, "Payment Required"), VERDICT_QUOTA);
}
END_TEST

START_TEST(test_openrouter_401_disabled_key_is_auth) {
        assert_class(judge(401, NULL, 0, "{\"error\":{\"code\":401,\"message\":\"User not found.\"}}"),
                     VERDICT_AUTH);
}
END_TEST

START_TEST(test_openrouter_403_moderation_is_auth) {
        assert_class(judge(403, NULL, 0,
                           "{\"error\":{\"code\":403,\"message\":\"Input was flagged\",\"metadata\":"
                           "{\"reasons\":[\"harassment\"]}}}"),
                     VERDICT_AUTH);
}
END_TEST

START_TEST(test_openrouter_408_502_503_are_transient) {
        assert_class(judge(408, NULL, 0, "{\"error\":{\"code\":408,\"message\":\"Request timed out\"}}"),
                     VERDICT_TRANSIENT);
        assert_class(judge(502, NULL, 0, "{\"error\":{\"code\":502,\"message\":\"Model is down\"}}"),
                     VERDICT_TRANSIENT);
        assert_class(judge(503, NULL, 0,
                           "{\"error\":{\"code\":503,\"message\":\"No available model provider that meets "
                           "your routing requirements\"}}"),
                     VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_rate_limit_words_in_a_502_error_make_it_a_rate_limit) {
        static const struct answer_header h[] = { HDR("Retry-After", "12") };
        static const char body[] =
                "{\"error\":{\"code\":502,\"message\":\"Provider returned error: Rate limit exceeded\","
                "\"metadata\":{\"provider_code\":429}}}";

        assert_unhinted(judge(502, NULL, 0, body));
        assert_rests(judge(502, h, N(h), body), 12 * SEC);
}
END_TEST

START_TEST(test_rate_limit_words_in_a_plain_text_503_make_it_a_rate_limit) {
        assert_unhinted(judge(503, NULL, 0, "upstream said: 429 Too Many Requests"));
}
END_TEST

START_TEST(test_rate_limit_words_in_a_caller_4xx_never_count) {
        static const struct answer_header h[] = { HDR("retry-after", "7") };

        /* Providers quote the request in these: the words may be the caller's. */
        assert_class(judge(400, h, N(h), "{\"error\":{\"message\":\"Rate-limit hit for this model\"}}"),
                     VERDICT_CALLER);
        assert_class(judge(422, NULL, 0, "{\"error\":{\"code\":\"ratelimit\",\"message\":\"x\"}}"), VERDICT_CALLER);
        assert_class(judge(404, NULL, 0, "{\"error\":\"Too Many Requests\"}"), VERDICT_CALLER);
        assert_class(judge(400, NULL, 0, "{\"detail\":\"rate_limit reached\"}"), VERDICT_CALLER);
        assert_class(judge(413, NULL, 0, "too many requests"), VERDICT_CALLER);
}
END_TEST

START_TEST(test_unknown_model_404_quoting_a_hostile_model_name_leaves_the_key_alone) {
        static const struct answer_header h[] = { HDR("retry-after", "3600") };
        static const char body[] =
                "{\"error\":{\"message\":\"The model `rate limit exceeded, retry in 3600s` does not exist\","
                "\"type\":\"invalid_request_error\",\"code\":\"model_not_found\"}}";
        struct verdict v = judge(404, h, N(h), body);

        ck_assert_int_eq(v.cls, VERDICT_CALLER);
        ck_assert_int_eq(v.rest_ms, 0);
}
END_TEST

START_TEST(test_rate_limit_words_in_a_5xx_or_403_make_it_a_rate_limit) {
        static const struct answer_header h[] = { HDR("retry-after", "7") };

        assert_rests(judge(503, h, N(h), "{\"error\":{\"message\":\"Rate-limit hit for this model\"}}"), 7 * SEC);
        assert_unhinted(judge(403, NULL, 0,
                              "{\"error\":{\"code\":403,\"message\":\"Rate Limit Exceeded\","
                              "\"errors\":[{\"reason\":\"rateLimitExceeded\"}]}}"));
        assert_class(judge(403, NULL, 0, "{\"error\":{\"message\":\"Forbidden\"}}"), VERDICT_AUTH);
}
END_TEST

START_TEST(test_rate_limit_words_outside_the_error_fields_do_not_count) {
        assert_class(judge(400, NULL, 0,
                           "{\"error\":{\"message\":\"messages: too long\",\"param\":\"rate limit\"},"
                           "\"echo\":\"please explain rate limit algorithms\"}"),
                     VERDICT_CALLER);
}
END_TEST

START_TEST(test_billing_code_in_a_4xx_or_5xx_is_not_a_rate_limit) {
        assert_class(judge(400, NULL, 0,
                           "{\"error\":{\"message\":\"Quota exceeded\",\"code\":\"insufficient_quota\"}}"),
                     VERDICT_CALLER);
        assert_class(judge(500, NULL, 0,
                           "{\"error\":{\"message\":\"Quota exceeded\",\"type\":\"insufficient_quota\"}}"),
                     VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_plain_4xx_errors_are_the_callers) {
        assert_class(judge(400, NULL, 0, "{\"error\":{\"message\":\"bad json\"}}"), VERDICT_CALLER);
        assert_class(judge(404, NULL, 0, NULL), VERDICT_CALLER);
        assert_class(judge(413, NULL, 0, "Request Entity Too Large"), VERDICT_CALLER);
        assert_class(judge(422, NULL, 0, "{}"), VERDICT_CALLER);
        assert_class(judge(418, NULL, 0, "[]"), VERDICT_CALLER);
}
END_TEST

/* ---- Gemini ----------------------------------------------------------------------------- */

START_TEST(test_gemini_per_minute_quota_rests_for_retry_delay) {
        assert_rests(judge(429, NULL, 0, gemini_per_minute_body), 57 * SEC);
}
END_TEST

START_TEST(test_gemini_fractional_retry_delay_is_kept) {
        assert_rests(judge(429, NULL, 0,
                           "{\"error\":{\"code\":429,\"status\":\"RESOURCE_EXHAUSTED\",\"details\":["
                           "{\"@type\":\"type.googleapis.com/google.rpc.RetryInfo\",\"retryDelay\":\"1.5s\"}]}}"),
                     1500);
}
END_TEST

START_TEST(test_gemini_message_delay_is_used_without_retry_info) {
        assert_rests(judge(429, NULL, 0,
                           "{\"error\":{\"code\":429,\"status\":\"RESOURCE_EXHAUSTED\",\"message\":\"You "
                           "exceeded your current quota. Please retry in 57.3s.\"}}"),
                     57300);
}
END_TEST

START_TEST(test_gemini_array_wrapped_error_is_understood) {
        assert_rests(judge(429, NULL, 0,
                           "[{\"error\":{\"code\":429,\"details\":[{\"@type\":"
                           "\"type.googleapis.com/google.rpc.RetryInfo\",\"retryDelay\":\"20s\"}]}}]"),
                     20 * SEC);
}
END_TEST

START_TEST(test_gemini_503_unavailable_is_transient) {
        assert_class(judge(503, NULL, 0,
                           "{\"error\":{\"code\":503,\"message\":\"The model is overloaded. Please try again "
                           "later.\",\"status\":\"UNAVAILABLE\"}}"),
                     VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_gemini_per_day_quota_rests_until_pacific_midnight_in_summer) {
        /* 05:00 PDT → 2026-08-22 00:00 PDT = 07:00Z: 19 h; retryDelay and retry-after lose. */
        static const struct answer_header h[] = { HDR("Retry-After", "57") };

        assert_rests(judge(429, NULL, 0, gemini_per_day_body), 19 * HOUR);
        assert_rests(judge(429, h, N(h), gemini_per_day_body), 19 * HOUR);
}
END_TEST

START_TEST(test_gemini_per_day_quota_rests_until_pacific_midnight_in_winter) {
        /* 2026-01-15T12:00Z = 04:00 PST → 2026-01-16 08:00Z. */
        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, INT64_C(1768478400000)), 20 * HOUR);
}
END_TEST

START_TEST(test_gemini_per_day_quota_across_spring_forward) {
        /* The day before: 2026-03-07T12:00Z = 04:00 PST; midnight of the 8th is still PST (08:00Z). */
        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, INT64_C(1772884800000)), 20 * HOUR);
        /* 2026-03-08T09:00Z = 01:00 PST on the 23-hour day; 9 March 00:00 PDT = 07:00Z. */
        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, INT64_C(1772960400000)), 22 * HOUR);
        /* 2026-03-08T12:00Z = 05:00 PDT, after the switch at 10:00Z. */
        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, INT64_C(1772971200000)), 19 * HOUR);
}
END_TEST

START_TEST(test_gemini_per_day_quota_across_fall_back) {
        const struct policy_config two_days = { .recovery_ms = RECOVERY, .max_cooldown_ms = 2 * DAY };

        /* 2026-11-01T07:30Z = 00:30 PDT on the 25-hour day; 2 November 00:00 PST = 08:00Z. */
        assert_rests(judge_at(429, gemini_per_day_body, &two_days, INT64_C(1793518200000)), 24 * HOUR + 30 * MIN);
        /* 08:00Z = 01:00 PDT, the first pass through 01:00. */
        assert_rests(judge_at(429, gemini_per_day_body, &two_days, INT64_C(1793520000000)), 24 * HOUR);
        /* 09:30Z = 01:30 PST, the second pass. */
        assert_rests(judge_at(429, gemini_per_day_body, &two_days, INT64_C(1793525400000)), 22 * HOUR + 30 * MIN);
}
END_TEST

START_TEST(test_gemini_per_day_rest_is_capped_by_max_cooldown) {
        const struct policy_config hour = { .recovery_ms = RECOVERY, .max_cooldown_ms = HOUR };

        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, INT64_C(1793518200000)), DAY);
        assert_rests(judge_at(429, gemini_per_day_body, &hour, NOW), HOUR);
}
END_TEST

START_TEST(test_gemini_per_day_quota_over_new_year) {
        /* 2026-01-01T03:00Z is 2025-12-31 19:00 PST. */
        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, INT64_C(1767236400000)), 5 * HOUR);
}
END_TEST

START_TEST(test_gemini_per_day_quota_exactly_at_midnight_waits_a_full_day) {
        /* 2026-08-21T07:00Z is 00:00 PDT. */
        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, INT64_C(1787295600000)), DAY);
}
END_TEST

START_TEST(test_gemini_per_day_with_a_broken_clock_falls_back_to_other_hints) {
        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, INT64_MAX), 57 * SEC);
        assert_rests(judge_at(429, gemini_per_day_body, &pc_default, -1), 57 * SEC);
}
END_TEST

/* ---- Retry-After and the other hints ---------------------------------------------------- */

START_TEST(test_retry_after_delta_seconds_sets_the_rest) {
        static const struct answer_header h[] = { HDR("Retry-After", "30") };

        assert_rests(judge(429, h, N(h), NULL), 30 * SEC);
}
END_TEST

START_TEST(test_header_names_match_in_any_case) {
        static const struct answer_header h1[] = { HDR("RETRY-AFTER", "31") };
        static const struct answer_header h2[] = { HDR("rEtRy-AfTeR-mS", "3100") };

        assert_rests(judge(429, h1, N(h1), NULL), 31 * SEC);
        assert_rests(judge(429, h2, N(h2), NULL), 3100);
}
END_TEST

START_TEST(test_retry_after_http_dates_in_all_three_forms) {
        static const struct answer_header imf[] = { HDR("Retry-After", "Fri, 21 Aug 2026 12:01:30 GMT") };
        static const struct answer_header rfc850[] = { HDR("Retry-After", "Friday, 21-Aug-26 12:02:00 GMT") };
        static const struct answer_header asc[] = { HDR("Retry-After", "Fri Aug 21 12:00:05 2026") };
        static const struct answer_header asc_pad[] = { HDR("Retry-After", "Sat Aug  22 00:00:00 2026") };
        static const struct answer_header asc_pad1[] = { HDR("Retry-After", "Sat Aug  1 00:00:00 2026") };

        assert_rests(judge(429, imf, N(imf), NULL), 90 * SEC);
        assert_rests(judge(429, rfc850, N(rfc850), NULL), 2 * MIN);
        assert_rests(judge(429, asc, N(asc), NULL), 5 * SEC);
        assert_rests(judge(429, asc_pad, N(asc_pad), NULL), 12 * HOUR);
        assert_rests(judge(429, asc_pad1, N(asc_pad1), NULL), SEC); /* in the past */
}
END_TEST

START_TEST(test_retry_after_date_from_the_provider_reference) {
        static const struct answer_header h[] = { HDR("Retry-After", "Wed, 21 Oct 2026 07:28:00 GMT") };

        /* now = 2026-10-21T07:27:00Z */
        assert_rests(judge_full(429, h, N(h), NULL, 0, &pc_default, INT64_C(1792567620000)), MIN);
}
END_TEST

START_TEST(test_retry_after_in_the_past_or_zero_rests_the_minimum) {
        static const struct answer_header past[] = { HDR("Retry-After", "Fri, 21 Aug 2026 11:00:00 GMT") };
        static const struct answer_header zero[] = { HDR("Retry-After", "0") };

        assert_rests(judge(429, past, N(past), NULL), SEC);
        assert_rests(judge(429, zero, N(zero), NULL), SEC);
}
END_TEST

START_TEST(test_negative_retry_after_is_the_floor_not_a_fall_through) {
        static const struct answer_header h[] = {
                HDR("Retry-After", "-5"),
                HDR("retry-after-ms", "2500"),
        };

        /* A negative figure is "now": the floor, not a reason to look further. */
        assert_rests(judge(429, h, N(h), NULL), SEC);
}
END_TEST

START_TEST(test_huge_retry_after_is_capped_not_overflowed) {
        static const struct answer_header h[] = { HDR("Retry-After", "99999999999999999999") };
        static const struct answer_header h2[] = { HDR("Retry-After", "9223372036854775807") };

        assert_rests(judge(429, h, N(h), NULL), DAY);
        assert_rests(judge(429, h2, N(h2), NULL), DAY);
}
END_TEST

START_TEST(test_long_but_valid_retry_after_is_capped_by_max_cooldown) {
        static const struct answer_header h[] = { HDR("Retry-After", "1000000") };
        const struct policy_config hour = { .recovery_ms = RECOVERY, .max_cooldown_ms = HOUR };

        assert_rests(judge(429, h, N(h), NULL), DAY);
        assert_rests(judge_full(429, h, N(h), NULL, 0, &hour, NOW), HOUR);
}
END_TEST

START_TEST(test_max_cooldown_of_zero_or_less_means_a_day) {
        static const struct answer_header h[] = { HDR("Retry-After", "1000000") };
        const struct policy_config zero = { .recovery_ms = RECOVERY, .max_cooldown_ms = 0 };
        const struct policy_config neg = { .recovery_ms = RECOVERY, .max_cooldown_ms = -5 };

        assert_rests(judge_full(429, h, N(h), NULL, 0, &zero, NOW), DAY);
        assert_rests(judge_full(429, h, N(h), NULL, 0, &neg, NOW), DAY);
}
END_TEST

START_TEST(test_garbage_retry_after_values_are_ignored) {
        static const char *const bad[] = {
                "",
                "   ",
                "soon",
                "30s",
                "1e5",
                "NaN",
                "inf",
                "+5",
                "0x10",
                "3 0",
                "30.",
                "Fri, 32 Aug 2026 12:00:00 GMT",
                "Fri, 21 Aug 2026 24:00:00 GMT",
                "Fri, 21 Aug 2026 12:00:00 PST",
                "Fri, 21 Foo 2026 12:00:00 GMT",
                "Fri, 29 Feb 2026 12:00:00 GMT",
                "Fri, 21 Aug 26 12:00:00 GMT",
                "Fri, 21 Aug 2026 12:00 GMT",
                "Xyz, 21 Aug 2026 12:00:00 GMT",
                "Fri, 21 Aug 2026 12:00:00 GMT trailing",
                "Fri Aug 21 12:00:05",
                "\xff\xfe\xfd",
        };

        for (size_t i = 0; i < N(bad); i++) {
                struct answer_header h[] = { { "Retry-After", 11, bad[i], strlen(bad[i]) } };
                struct verdict v = judge(429, h, N(h), NULL);

                ck_assert_msg(v.cls == VERDICT_RATE_LIMITED && v.hinted == 0 && v.rest_ms == RECOVERY,
                              "Retry-After '%s' should be ignored", bad[i]);
        }
}
END_TEST

START_TEST(test_retry_after_ms_headers_set_the_rest_in_milliseconds) {
        static const struct answer_header ms[] = { HDR("retry-after-ms", "1500") };
        static const struct answer_header azure[] = { HDR("x-ms-retry-after-ms", "2500") };
        static const struct answer_header frac[] = { HDR("retry-after-ms", "1500.2") };

        assert_rests(judge(429, ms, N(ms), NULL), 1500);
        assert_rests(judge(429, azure, N(azure), NULL), 2500);
        assert_rests(judge(429, frac, N(frac), NULL), 1501);
}
END_TEST

START_TEST(test_garbage_retry_after_ms_falls_through) {
        static const struct answer_header h[] = {
                HDR("retry-after-ms", "NaN"),
                HDR("x-ratelimit-reset", "1787313604000"),
        };

        assert_rests(judge(429, h, N(h), NULL), 4 * SEC);
}
END_TEST

/* "Come back now" in any form is a real rest of at least a second, and "come back in a century"
 * in any form rests max_cooldown: never recovery_time, never zero, never more than the cap. */
START_TEST(test_zero_negative_past_and_absurd_hints_are_floored_and_capped_alike) {
        static const struct answer_header zero[] = { HDR("Retry-After", "0") };
        static const struct answer_header negative[] = { HDR("Retry-After", "-5") };
        static const struct answer_header past[] = { HDR("Retry-After", "Sun, 06 Nov 1994 08:49:37 GMT") };
        static const struct answer_header ms_negative[] = { HDR("x-ms-retry-after-ms", "-1") };
        static const struct answer_header ms_zero[] = { HDR("retry-after-ms", "0") };
        static const struct answer_header reset_past[] = { HDR("X-RateLimit-Reset", "1787313500000") };
        static const struct answer_header huge_s[] = { HDR("Retry-After", "99999999999999999999") };
        static const struct answer_header huge_ms[] = { HDR("retry-after-ms", "99999999999999999999") };
        static const struct answer_header year[] = { HDR("Retry-After", "31536000") };
        static const struct answer_header far_date[] = { HDR("Retry-After", "Fri, 21 Aug 2099 12:00:00 GMT") };
        static const struct answer_header far_go[] = {
                HDR("x-ratelimit-remaining-requests", "0"), HDR("x-ratelimit-reset-requests", "99999999999999999999h"),
        };
        const struct policy_config hour = { .recovery_ms = RECOVERY, .max_cooldown_ms = HOUR };

        assert_rests(judge(429, zero, 1, NULL), SEC);
        assert_rests(judge(429, negative, 1, NULL), SEC);
        assert_rests(judge(429, past, 1, NULL), SEC);
        assert_rests(judge(429, ms_negative, 1, NULL), SEC);
        assert_rests(judge(429, ms_zero, 1, NULL), SEC);
        assert_rests(judge(429, reset_past, 1, NULL), SEC);
        /* A retry's wait is no rest: the backoff is its floor. */
        assert_transient_retry(judge(503, zero, 1, NULL), 0);
        assert_transient_retry(judge(503, negative, 1, NULL), 0);

        assert_rests(judge(429, huge_s, 1, NULL), DAY);
        assert_rests(judge(429, huge_ms, 1, NULL), DAY);
        assert_rests(judge(429, far_date, 1, NULL), DAY);
        assert_rests(judge(429, far_go, N(far_go), NULL), DAY);
        assert_rests(judge(429, NULL, 0, "{\"error\":{\"message\":\"retry in 99999999999999999999999s\"}}"), DAY);
        assert_verdict(judge_full(429, year, 1, NULL, 0, &hour, NOW), VERDICT_RATE_LIMITED, HOUR, 1);
        assert_verdict(judge_full(429, huge_ms, 1, NULL, 0, &hour, NOW), VERDICT_RATE_LIMITED, HOUR, 1);
        assert_transient_retry(judge_full(503, huge_s, 1, NULL, 0, &hour, NOW), HOUR);
}
END_TEST

START_TEST(test_hints_are_taken_in_order_of_explicitness) {
        static const struct answer_header all[] = {
                HDR("x-ratelimit-remaining-tokens", "0"),
                HDR("x-ratelimit-reset-tokens", "6s"),
                HDR("anthropic-ratelimit-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T12:00:07Z"),
                HDR("X-RateLimit-Reset", "1787313605000"),
                HDR("retry-after-ms", "2000"),
                HDR("Retry-After", "1"),
        };

        assert_rests(judge(429, all, N(all), gemini_per_minute_body), 1 * SEC);
        assert_rests(judge(429, all + 1, N(all) - 2, gemini_per_minute_body), 2 * SEC);
        assert_rests(judge(429, all, N(all) - 2, gemini_per_minute_body), 57 * SEC);
        assert_rests(judge(429, all, N(all) - 2, openai_rate_limit_body), 2500);
        assert_rests(judge(429, all, N(all) - 2, NULL), 5 * SEC);
        assert_rests(judge(429, all, N(all) - 3, NULL), 6 * SEC);
        assert_rests(judge(429, all + 2, 2, NULL), 7 * SEC);
}
END_TEST

START_TEST(test_retry_phrases_in_messages_set_the_rest) {
        assert_rests(judge(429, NULL, 0, "{\"error\":{\"message\":\"Please retry after 30 seconds.\"}}"), 30 * SEC);
        assert_rests(judge(429, NULL, 0, "{\"error\":{\"message\":\"Try again in 20s\"}}"), 20 * SEC);
        assert_rests(judge(429, NULL, 0, "{\"error\":{\"message\":\"RETRY IN 5 MINUTES\"}}"), 5 * MIN);
        assert_rests(judge(429, NULL, 0, "{\"message\":\"Too many requests, try again in 1.054s\"}"), 1054);
        assert_rests(judge(429, NULL, 0, "Too Many Requests: retry in 2m59.56s"), 179560);
        /* The first "retry in" has no duration; the second does. */
        assert_rests(judge(429, NULL, 0, "{\"error\":{\"message\":\"retry in a moment, retry in 9s\"}}"), 9 * SEC);
}
END_TEST

START_TEST(test_retry_phrases_without_a_usable_duration_are_ignored) {
        assert_unhinted(judge(429, NULL, 0, "{\"error\":{\"message\":\"Please retry in 30.\"}}"));
        assert_unhinted(judge(429, NULL, 0, "{\"error\":{\"message\":\"Please retry in -30s.\"}}"));
        assert_unhinted(judge(429, NULL, 0, "{\"error\":{\"message\":\"retry in 2 fortnights\"}}"));
        assert_unhinted(judge(429, NULL, 0, "{\"error\":{\"message\":\"retry in\"}}"));
        /* Only the message counts when the body is JSON. */
        assert_unhinted(judge(429, NULL, 0, "{\"error\":{\"message\":\"slow down\",\"hint\":\"retry in 5s\"}}"));
}
END_TEST

START_TEST(test_rate_limit_without_hints_rests_the_recovery_time) {
        const struct policy_config pc = { .recovery_ms = 42 * SEC, .max_cooldown_ms = DAY };
        const struct policy_config unset = { .recovery_ms = 0, .max_cooldown_ms = DAY };

        assert_verdict(judge_at(429, NULL, &pc, NOW), VERDICT_RATE_LIMITED, 42 * SEC, 0);
        assert_verdict(judge_at(429, NULL, &unset, NOW), VERDICT_RATE_LIMITED, 900 * SEC, 0);
}
END_TEST

/* ---- policy_parse_retry_after ----------------------------------------------------------- */

START_TEST(test_parse_retry_after_reads_seconds_and_dates) {
        int64_t ms = -1;

        ck_assert_int_eq(policy_parse_retry_after("30", 2, NOW, &ms), 0);
        ck_assert_int_eq(ms, 30000);
        ck_assert_int_eq(policy_parse_retry_after(" 0 ", 3, NOW, &ms), 0);
        ck_assert_int_eq(ms, 0);
        ck_assert_int_eq(policy_parse_retry_after("1.5", 3, NOW, &ms), 0);
        ck_assert_int_eq(ms, 1500);
        ck_assert_int_eq(policy_parse_retry_after("Fri, 21 Aug 2026 12:00:01 GMT", 29, NOW, &ms), 0);
        ck_assert_int_eq(ms, 1000);
        /* Only len bytes count: the trailing "9" is not part of the value. */
        ck_assert_int_eq(policy_parse_retry_after("309", 2, NOW, &ms), 0);
        ck_assert_int_eq(ms, 30000);
}
END_TEST

START_TEST(test_parse_retry_after_gives_zero_for_a_past_date) {
        int64_t ms = -1;

        ck_assert_int_eq(policy_parse_retry_after("-5", 2, NOW, &ms), 0);
        ck_assert_int_eq(ms, 0);
        ck_assert_int_eq(policy_parse_retry_after("99999999999999999999", 20, NOW, &ms), 0);
        ck_assert_int_eq(ms, INT64_MAX);
        ms = -1;

        ck_assert_int_eq(policy_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 29, NOW, &ms), 0);
        ck_assert_int_eq(ms, 0);
        ms = -1;
        /* RFC 850's "94" is 1994, not 2094: more than 50 years ahead means the past century. */
        ck_assert_int_eq(policy_parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", 30, NOW, &ms), 0);
        ck_assert_int_eq(ms, 0);
        ck_assert_int_eq(policy_parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", 30, INT64_C(784111777000) - 5000,
                                                  &ms),
                         0);
        ck_assert_int_eq(ms, 5000);
}
END_TEST

START_TEST(test_parse_retry_after_rejects_garbage_and_leaves_the_output_alone) {
        static const char *const bad[] = { "", "-", "--1", "abc", "1e3", "30 s", "NaN", "-1x", "9999999999999999999999x" };
        int64_t ms = 777;

        for (size_t i = 0; i < N(bad); i++)
                ck_assert_msg(policy_parse_retry_after(bad[i], strlen(bad[i]), NOW, &ms) == -EINVAL,
                              "'%s' should be rejected", bad[i]);
        ck_assert_int_eq(policy_parse_retry_after(NULL, 0, NOW, &ms), -EINVAL);
        ck_assert_int_eq(policy_parse_retry_after("30", 2, NOW, NULL), -EINVAL);
        ck_assert_int_eq(ms, 777);
}
END_TEST

/* ---- policy_mentions_rate_limit --------------------------------------------------------- */

START_TEST(test_mentions_rate_limit_recognises_each_phrase_in_any_case) {
        static const char *const yes[] = {
                "Rate limit exceeded",           "RATE-LIMIT",
                "x-ratelimit",                   "rate_limit_error",
                "429 Too Many Requests",         "Quota exceeded for metric",
                "Resource has been exhausted (e.g. check quota).", "RESOURCE_EXHAUSTED",
        };

        for (size_t i = 0; i < N(yes); i++)
                ck_assert_msg(policy_mentions_rate_limit(yes[i], strlen(yes[i])) == 1, "'%s' mentions a rate limit",
                              yes[i]);
}
END_TEST

START_TEST(test_mentions_rate_limit_ignores_other_text) {
        static const char *const no[] = {
                "", "rate", "limit", "You exceeded your current quota, please check your plan",
                "insufficient_quota", "overloaded", "rate  limit",
        };

        for (size_t i = 0; i < N(no); i++)
                ck_assert_msg(policy_mentions_rate_limit(no[i], strlen(no[i])) == 0,
                              "'%s' does not mention a rate limit", no[i]);
}
END_TEST

START_TEST(test_mentions_rate_limit_matches_phrases_inside_words) {
        /* Documented as a substring match: phrases are not words. */
        ck_assert_int_eq(policy_mentions_rate_limit("first-rate limits", 17), 1);
}
END_TEST

START_TEST(test_mentions_rate_limit_reads_only_len_bytes_and_past_nuls) {
        static const char nul_inside[] = "\0\0binary\0rate limit";

        ck_assert_int_eq(policy_mentions_rate_limit(NULL, 0), 0);
        ck_assert_int_eq(policy_mentions_rate_limit(NULL, 10), 0);
        ck_assert_int_eq(policy_mentions_rate_limit("rate limit", 9), 0);
        ck_assert_int_eq(policy_mentions_rate_limit(nul_inside, sizeof(nul_inside) - 1), 1);
}
END_TEST

/* ---- hostile input ---------------------------------------------------------------------- */

START_TEST(test_truncated_json_is_read_as_text) {
        assert_class(judge(429, NULL, 0, "{\"error\":{\"code\":\"insufficient_quota\",\"mess"), VERDICT_QUOTA);
        assert_unhinted(judge(500, NULL, 0, "{\"error\":{\"message\":\"Rate limit exce"));
        assert_class(judge(400, NULL, 0, "{\"error\":{\"message\":\"Rate limit exce"), VERDICT_CALLER);
        assert_class(judge(400, NULL, 0, "{\"error\":{\"message\":\"bad"), VERDICT_CALLER);
        assert_class(judge(402, NULL, 0, "{\"error\":{\"metadata\":{\"limit_source\":\"openrouter_in_flight_budget"),
                     VERDICT_TRANSIENT);
        assert_rests(judge(429, NULL, 0, "{\"error\":{\"message\":\"try again in 3s"), 3 * SEC);
}
END_TEST

START_TEST(test_non_json_bodies_are_read_as_text) {
        assert_unhinted(judge(500, NULL, 0, "<html><body><h1>429 Too Many Requests</h1></body></html>"));
        assert_class(judge(500, NULL, 0, "<html><body><h1>500 Internal Server Error</h1></body></html>"),
                     VERDICT_TRANSIENT);
        assert_rests(judge(503, NULL, 0, "rate limited; retry after 30 seconds"), 30 * SEC);
}
END_TEST

START_TEST(test_binary_junk_bodies_are_harmless) {
        static const char junk[] = "\xff\xfe\x00\x01{\"error\x00\x80\xc2\xb5\xce retry in \xff\x00";
        static const char junk_with_words[] = "\x00\x01\x02RATE LIMIT\x00\xff";

        assert_class(judge_full(400, NULL, 0, junk, sizeof(junk) - 1, &pc_default, NOW), VERDICT_CALLER);
        assert_unhinted(judge_full(429, NULL, 0, junk, sizeof(junk) - 1, &pc_default, NOW));
        assert_class(judge_full(502, NULL, 0, junk, sizeof(junk) - 1, &pc_default, NOW), VERDICT_TRANSIENT);
        assert_unhinted(judge_full(502, NULL, 0, junk_with_words, sizeof(junk_with_words) - 1, &pc_default, NOW));
}
END_TEST

START_TEST(test_null_body_of_length_zero_is_judged_by_status) {
        assert_unhinted(judge_full(429, NULL, 0, NULL, 0, &pc_default, NOW));
        assert_class(judge_full(500, NULL, 0, NULL, 0, &pc_default, NOW), VERDICT_TRANSIENT);
        assert_class(judge_full(400, NULL, 0, NULL, 0, &pc_default, NOW), VERDICT_CALLER);
        assert_class(judge_full(402, NULL, 0, NULL, 0, &pc_default, NOW), VERDICT_QUOTA);
        assert_class(judge_full(401, NULL, 0, NULL, 0, &pc_default, NOW), VERDICT_AUTH);
        /* A NULL body with a length is a caller bug; it must still not be read. */
        assert_unhinted(judge_full(429, NULL, 0, NULL, 100, &pc_default, NOW));
}
END_TEST

START_TEST(test_json_of_unexpected_shape_is_harmless) {
        static const char *const bodies[] = {
                "{\"error\":5}",
                "{\"error\":null}",
                "{\"error\":{\"message\":null,\"code\":429,\"details\":\"x\"}}",
                "{\"error\":{\"details\":[5,null,{\"@type\":7},{\"@type\":\"google.rpc.RetryInfo\",\"retryDelay\":57}]}}",
                "{\"error\":{\"details\":[{\"@type\":\"google.rpc.QuotaFailure\",\"violations\":{}}]}}",
                "{\"error\":{\"details\":[{\"@type\":\"google.rpc.QuotaFailure\",\"violations\":[1,{\"quotaId\":5}]}]}}",
                "{\"error\":{\"metadata\":\"openrouter\"}}",
                "[]",
                "[1,2,3]",
                "\"a string\"",
                "12",
                "{}",
        };

        for (size_t i = 0; i < N(bodies); i++) {
                struct verdict v = judge(429, NULL, 0, bodies[i]);

                ck_assert_msg(v.cls == VERDICT_RATE_LIMITED && v.hinted == 0 && v.rest_ms == RECOVERY,
                              "body '%s' should be an unhinted rate limit", bodies[i]);
                v = judge(402, NULL, 0, bodies[i]);
                ck_assert_msg(v.cls == VERDICT_QUOTA, "402 with '%s' should be quota", bodies[i]);
        }
}
END_TEST

START_TEST(test_deeply_nested_json_is_harmless) {
        size_t depth = 100000;
        char *body = malloc(2 * depth + 1);

        ck_assert_ptr_nonnull(body);
        memset(body, '[', depth);
        memset(body + depth, ']', depth);
        body[2 * depth] = '\0';
        assert_unhinted(judge(429, NULL, 0, body));
        assert_class(judge(400, NULL, 0, body), VERDICT_CALLER);
        free(body);
}
END_TEST

START_TEST(test_odd_headers_are_harmless) {
        static const struct answer_header h[] = {
                { NULL, 0, "30", 2 },
                { "Retry-After", 11, NULL, 0 },
                { "retry-after-ms", 14, NULL, 5 },
                { "x-ratelimit-remaining-tokens", 28, "0", 1 },
                { "x-ratelimit-reset-tokens", 24, "", 0 },
                { "X-RateLimit-Reset", 17, "  1787313609000\t", 16 },
        };
        struct upstream_answer a = { .status = 429, .headers = NULL, .n_headers = 3 };
        struct verdict v;

        assert_rests(judge(429, h, N(h), NULL), 9 * SEC);
        policy_classify(&a, &pc_default, NOW, &v);
        assert_unhinted(v);
}
END_TEST

START_TEST(test_only_the_first_of_repeated_headers_counts) {
        static const struct answer_header h[] = {
                HDR("Retry-After", "5"),
                HDR("retry-after", "50"),
        };

        assert_rests(judge(429, h, N(h), NULL), 5 * SEC);
}
END_TEST

/* ---- configured phrases ----------------------------------------------------------------- */

START_TEST(test_default_phrase_list_is_exported_and_null_terminated) {
        size_t n = 0;

        while (policy_default_phrases[n])
                n++;
        ck_assert_uint_eq(n, 8);
        ck_assert_str_eq(policy_default_phrases[0], "rate limit");
        ck_assert_str_eq(policy_default_phrases[4], "too many requests");
        ck_assert_str_eq(policy_default_phrases[7], "resource_exhausted");
}
END_TEST

START_TEST(test_configured_phrases_replace_the_built_in_list) {
        static const char *const phrases[] = { "slow down" };
        static const struct policy_config pc = {
                .recovery_ms = RECOVERY, .max_cooldown_ms = DAY, .phrases = phrases, .n_phrases = 1,
        };
        static const char slow[] = "{\"error\":{\"message\":\"Please Slow Down, friend\"}}";
        static const char limited[] = "{\"error\":{\"message\":\"Rate limit exceeded\"}}";

        assert_unhinted(judge_at(503, slow, &pc, NOW));
        assert_class(judge_at(400, slow, &pc, NOW), VERDICT_CALLER);
        /* The built-in list no longer applies to the classifier... */
        assert_class(judge_at(503, limited, &pc, NOW), VERDICT_TRANSIENT);
        assert_class(judge_at(400, limited, &pc, NOW), VERDICT_CALLER);
        /* ...but policy_mentions_rate_limit keeps using it, and the default config still does. */
        ck_assert_int_eq(policy_mentions_rate_limit("Rate limit exceeded", 19), 1);
        ck_assert_int_eq(policy_mentions_rate_limit("Please slow down", 16), 0);
        assert_unhinted(judge_at(503, limited, &pc_default, NOW));
        assert_class(judge_at(503, slow, &pc_default, NOW), VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_configured_phrases_match_plain_text_in_any_case) {
        static const char *const phrases[] = { "Throttled", "try later" };
        static const struct policy_config pc = {
                .recovery_ms = RECOVERY, .max_cooldown_ms = DAY, .phrases = phrases, .n_phrases = 2,
        };

        assert_unhinted(judge_at(502, "upstream THROTTLED this key", &pc, NOW));
        assert_unhinted(judge_at(500, "<html>please TRY LATER</html>", &pc, NOW));
        assert_class(judge_at(500, "<html>internal error</html>", &pc, NOW), VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_empty_configured_list_matches_nothing_and_429_still_rests) {
        static const char *const phrases[] = { "unused" };
        static const struct policy_config pc = {
                .recovery_ms = RECOVERY, .max_cooldown_ms = DAY, .phrases = phrases, .n_phrases = 0,
        };

        assert_class(judge_at(502, "rate limit, too many requests", &pc, NOW), VERDICT_TRANSIENT);
        assert_class(judge_at(400, "unused", &pc, NOW), VERDICT_CALLER);
        /* A 429 is a rate limit by its status alone, whatever the phrases. */
        assert_unhinted(judge_at(429, "{}", &pc, NOW));
}
END_TEST

START_TEST(test_null_and_empty_configured_phrases_match_nothing) {
        static const char *const phrases[] = { NULL, "", "throttled" };
        static const struct policy_config pc = {
                .recovery_ms = RECOVERY, .max_cooldown_ms = DAY, .phrases = phrases, .n_phrases = 3,
        };

        /* An empty phrase would otherwise match every error. */
        assert_class(judge_at(500, "anything at all", &pc, NOW), VERDICT_TRANSIENT);
        assert_class(judge_at(400, "anything at all", &pc, NOW), VERDICT_CALLER);
        assert_unhinted(judge_at(500, "throttled", &pc, NOW));
}
END_TEST

/* ---- successes that empty a bucket ------------------------------------------------------ */

START_TEST(test_success_with_an_empty_openai_request_bucket_rests_until_its_reset) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-limit-requests", "500"),
                HDR("x-ratelimit-remaining-requests", "0"),
                HDR("x-ratelimit-reset-requests", "6m0s"),
                HDR("x-ratelimit-remaining-tokens", "29000"),
                HDR("x-ratelimit-reset-tokens", "2s"),
        };
        static const struct answer_header tok[] = {
                HDR("x-ratelimit-remaining-tokens", "0"),
                HDR("x-ratelimit-reset-tokens", "7.66s"),
        };
        struct verdict v = judge(200, h, N(h), "{}");

        assert_ok_rests(v, 6 * MIN);
        ck_assert_int_eq(v.retry_after_ms, 0);
        assert_ok_rests(judge(200, tok, N(tok), "{}"), 7660);
}
END_TEST

START_TEST(test_success_with_both_openai_buckets_empty_rests_until_the_later_reset) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-remaining-requests", "0"),
                HDR("x-ratelimit-reset-requests", "1s"),
                HDR("x-ratelimit-remaining-tokens", "0"),
                HDR("x-ratelimit-reset-tokens", "2m59.56s"),
        };

        assert_ok_rests(judge(201, h, N(h), "{}"), 179560);
}
END_TEST

START_TEST(test_success_with_an_empty_anthropic_bucket_rests_until_its_rfc3339_reset) {
        static const struct answer_header h[] = {
                HDR("anthropic-ratelimit-requests-limit", "50"),
                HDR("anthropic-ratelimit-requests-remaining", "0"),
                HDR("anthropic-ratelimit-requests-reset", "2026-08-21T12:00:42Z"),
                HDR("anthropic-ratelimit-tokens-remaining", "12000"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T12:05:00Z"),
        };
        static const struct answer_header out[] = {
                HDR("anthropic-ratelimit-requests-remaining", "0"),
                HDR("anthropic-ratelimit-requests-reset", "2026-08-21T12:00:42Z"),
                HDR("anthropic-ratelimit-output-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-output-tokens-reset", "2026-08-21T05:01:30-07:00"),
        };

        assert_ok_rests(judge(200, h, N(h), "{}"), 42 * SEC);
        assert_ok_rests(judge(200, out, N(out), "{}"), 90 * SEC);
}
END_TEST

START_TEST(test_success_with_openrouter_remaining_zero_rests_until_x_ratelimit_reset) {
        static const struct answer_header h[] = {
                HDR("X-RateLimit-Limit", "20"),
                HDR("X-RateLimit-Remaining", "0"),
                HDR("X-RateLimit-Reset", "1787313615000"),
        };

        assert_ok_rests(judge(200, h, N(h), "{}"), 15 * SEC);
}
END_TEST

START_TEST(test_success_takes_the_latest_reset_across_providers) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-remaining-tokens", "0"),
                HDR("x-ratelimit-reset-tokens", "10s"),
                HDR("X-RateLimit-Remaining", "0"),
                HDR("X-RateLimit-Reset", "1787313620000"),
                HDR("anthropic-ratelimit-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T12:00:05Z"),
        };

        assert_ok_rests(judge(200, h, N(h), "{}"), 20 * SEC);
}
END_TEST

START_TEST(test_simulator_success_headers_without_a_reset_do_not_cool) {
        /* The bundled simulator sends these on every admitted request, the last one of a window
         * included; with no reset there is nothing to wait for. */
        static const struct answer_header last[] = {
                HDR("X-RateLimit-Limit", "20"),
                HDR("X-RateLimit-Remaining", "0"),
        };
        static const struct answer_header some[] = {
                HDR("X-RateLimit-Limit", "20"),
                HDR("X-RateLimit-Remaining", "7"),
        };
        struct verdict v = judge(200, last, N(last), "{\"usage\":{\"prompt_tokens\":10}}");

        assert_class(v, VERDICT_OK);
        ck_assert_int_eq(v.retry_after_ms, 0);
        assert_class(judge(200, some, N(some), "{}"), VERDICT_OK);
}
END_TEST

START_TEST(test_success_with_room_left_or_no_figures_does_not_cool) {
        static const struct answer_header room[] = {
                HDR("x-ratelimit-remaining-requests", "1"),
                HDR("x-ratelimit-reset-requests", "6m0s"),
                HDR("anthropic-ratelimit-tokens-remaining", "500"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T12:00:42Z"),
                HDR("X-RateLimit-Remaining", "3"),
                HDR("X-RateLimit-Reset", "1787313615000"),
        };
        static const struct answer_header resets_only[] = {
                HDR("x-ratelimit-reset-requests", "6m0s"),
                HDR("X-RateLimit-Reset", "1787313615000"),
        };

        assert_class(judge(200, room, N(room), "{}"), VERDICT_OK);
        assert_class(judge(200, resets_only, N(resets_only), "{}"), VERDICT_OK);
        assert_class(judge(200, NULL, 0, NULL), VERDICT_OK);
}
END_TEST

START_TEST(test_redirect_with_an_empty_bucket_does_not_cool) {
        /* Only a 2xx spent the bucket on a real answer; a redirect is passed on as it is. */
        static const struct answer_header h[] = {
                HDR("x-ratelimit-remaining-requests", "0"),
                HDR("x-ratelimit-reset-requests", "6m0s"),
        };

        assert_class(judge(302, h, N(h), NULL), VERDICT_OK);
        assert_ok_rests(judge(299, h, N(h), NULL), 6 * MIN);
}
END_TEST

START_TEST(test_success_with_an_unusable_reset_does_not_cool) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-remaining-requests", "0"),
                HDR("x-ratelimit-reset-requests", "soon"),
                HDR("x-ratelimit-remaining-tokens", "0"),
                HDR("x-ratelimit-reset-tokens", "-5s"),
                HDR("anthropic-ratelimit-requests-remaining", "0"),
                HDR("anthropic-ratelimit-requests-reset", "2026-02-30T00:00:00Z"),
                HDR("X-RateLimit-Remaining", "0"),
                HDR("X-RateLimit-Reset", "tomorrow"),
        };
        static const struct answer_header remaining_garbage[] = {
                HDR("x-ratelimit-remaining-requests", "zero"),
                HDR("x-ratelimit-reset-requests", "6m0s"),
                HDR("X-RateLimit-Remaining", "-0"),
                HDR("X-RateLimit-Reset", "1787313615000"),
        };

        assert_class(judge(200, h, N(h), "{}"), VERDICT_OK);
        assert_class(judge(200, remaining_garbage, N(remaining_garbage), "{}"), VERDICT_OK);
}
END_TEST

START_TEST(test_success_rest_is_clamped_to_one_second_and_max_cooldown) {
        static const struct answer_header now[] = {
                HDR("x-ratelimit-remaining-requests", "0"),
                HDR("x-ratelimit-reset-requests", "0s"),
        };
        static const struct answer_header past[] = {
                HDR("anthropic-ratelimit-requests-remaining", "0"),
                HDR("anthropic-ratelimit-requests-reset", "2026-08-21T11:00:00Z"),
        };
        static const struct answer_header far[] = {
                HDR("x-ratelimit-remaining-tokens", "0"),
                HDR("x-ratelimit-reset-tokens", "100h"),
        };
        static const struct policy_config tight = { .recovery_ms = RECOVERY, .max_cooldown_ms = 30 * SEC };

        assert_ok_rests(judge(200, now, N(now), "{}"), SEC);
        assert_ok_rests(judge(200, past, N(past), "{}"), SEC);
        assert_ok_rests(judge(200, far, N(far), "{}"), DAY);
        assert_ok_rests(judge_full(200, far, N(far), "{}", 2, &tight, NOW), 30 * SEC);
        assert_ok_rests(judge_full(200, far, N(far), "{}", 2, NULL, NOW), DAY);
}
END_TEST

START_TEST(test_retry_after_on_a_success_does_not_cool) {
        static const struct answer_header h[] = {
                HDR("Retry-After", "30"),
                HDR("retry-after-ms", "30000"),
        };

        assert_class(judge(200, h, N(h), "{}"), VERDICT_OK);
}
END_TEST

/* ---- retry hints on transient answers --------------------------------------------------- */

START_TEST(test_503_with_retry_after_carries_the_hint) {
        static const struct answer_header h[] = { HDR("Retry-After", "30") };

        assert_transient_retry(judge(503, h, N(h), "{\"error\":{\"code\":503,\"message\":\"No provider available\"}}"),
                               30 * SEC);
        assert_transient_retry(judge(502, h, N(h), NULL), 30 * SEC);
        assert_transient_retry(judge(408, h, N(h), NULL), 30 * SEC);
}
END_TEST

START_TEST(test_503_with_millisecond_hints_carries_them) {
        static const struct answer_header ms[] = { HDR("retry-after-ms", "1500") };
        static const struct answer_header azure[] = { HDR("x-ms-retry-after-ms", "250") };
        static const struct answer_header both[] = { HDR("retry-after-ms", "1500"), HDR("Retry-After", "2") };

        assert_transient_retry(judge(503, ms, N(ms), NULL), 1500);
        assert_transient_retry(judge(503, azure, N(azure), NULL), 250);
        /* Retry-After is the standard one and comes first. */
        assert_transient_retry(judge(503, both, N(both), NULL), 2 * SEC);
}
END_TEST

START_TEST(test_503_with_an_http_date_carries_the_time_until_it) {
        static const struct answer_header h[] = { HDR("Retry-After", "Fri, 21 Aug 2026 12:02:00 GMT") };
        static const struct answer_header past[] = { HDR("Retry-After", "Fri, 21 Aug 2026 11:02:00 GMT") };

        assert_transient_retry(judge(503, h, N(h), NULL), 2 * MIN);
        assert_transient_retry(judge(503, past, N(past), NULL), 0);
}
END_TEST

START_TEST(test_openrouter_in_flight_budget_402_carries_retry_after) {
        static const struct answer_header h[] = { HDR("Retry-After", "5") };

        assert_transient_retry(judge(402, h, N(h),
                                     "{\"error\":{\"code\":402,\"message\":\"Too much spend in flight\","
                                     "\"metadata\":{\"limit_source\":\"openrouter_in_flight_budget\"}}}"),
                               5 * SEC);
}
END_TEST

START_TEST(test_anthropic_overloaded_529_carries_retry_after) {
        static const struct answer_header h[] = { HDR("retry-after", "10") };

        assert_transient_retry(judge(529, h, N(h), anthropic_overloaded_body), 10 * SEC);
}
END_TEST

START_TEST(test_transient_retry_hint_is_clamped_to_max_cooldown_not_raised) {
        static const struct answer_header huge[] = { HDR("Retry-After", "999999") };
        static const struct answer_header zero[] = { HDR("Retry-After", "0") };
        static const struct answer_header tiny[] = { HDR("retry-after-ms", "1") };
        static const struct policy_config tight = { .recovery_ms = RECOVERY, .max_cooldown_ms = 30 * SEC };

        assert_transient_retry(judge(503, huge, N(huge), NULL), DAY);
        assert_transient_retry(judge_full(503, huge, N(huge), NULL, 0, &tight, NOW), 30 * SEC);
        assert_transient_retry(judge_full(503, huge, N(huge), NULL, 0, NULL, NOW), DAY);
        assert_transient_retry(judge(503, zero, N(zero), NULL), 0);
        assert_transient_retry(judge(503, tiny, N(tiny), NULL), 1);
}
END_TEST

START_TEST(test_transient_without_a_usable_hint_has_none) {
        static const struct answer_header garbage[] = {
                HDR("Retry-After", "soon"),
                HDR("retry-after-ms", "-5"),
                HDR("x-ms-retry-after-ms", "1e3"),
        };
        static const struct answer_header overflow[] = { HDR("Retry-After", "99999999999999999999") };

        assert_transient_retry(judge(503, NULL, 0, NULL), 0);
        assert_transient_retry(judge(503, garbage, N(garbage), NULL), 0);
        /* An absurd hint is still one, capped like any other. */
        assert_transient_retry(judge(503, overflow, N(overflow), NULL), DAY);
        /* A delay in the message is for rate limits; a transient hint comes from headers only. */
        assert_transient_retry(judge(503, NULL, 0, "{\"error\":{\"message\":\"Please retry in 20s\"}}"), 0);
}
END_TEST

START_TEST(test_only_transient_verdicts_carry_a_retry_hint) {
        static const struct answer_header h[] = { HDR("Retry-After", "30") };
        struct upstream_answer dropped = { .status = 503, .transport_error = 28, .headers = h, .n_headers = N(h) };
        struct verdict v = { .retry_after_ms = -1 };

        ck_assert_int_eq(judge(401, h, N(h), NULL).retry_after_ms, 0);
        ck_assert_int_eq(judge(400, h, N(h), NULL).retry_after_ms, 0);
        ck_assert_int_eq(judge(402, h, N(h), NULL).retry_after_ms, 0);
        /* The rate limit's hint is its rest, not a retry hint. */
        v = judge(429, h, N(h), NULL);
        assert_rests(v, 30 * SEC);
        ck_assert_int_eq(v.retry_after_ms, 0);
        /* Without a usable answer its headers mean nothing. */
        policy_classify(&dropped, &pc_default, NOW, &v);
        assert_transient_retry(v, 0);
}
END_TEST

/* ---- backoff ---------------------------------------------------------------------------- */

#define CENTRE UINT32_C(0x80000000)

START_TEST(test_backoff_doubles_from_initial_up_to_the_cap) {
        static const int64_t want[] = { 1000, 2000, 4000, 8000, 10000, 10000, 10000 };

        for (unsigned r = 0; r < N(want); r++)
                ck_assert_int_eq(policy_backoff_ms(r, 1000, 10000, CENTRE), want[r]);
}
END_TEST

START_TEST(test_backoff_jitter_spans_minus_to_plus_ten_percent) {
        static const int64_t low[] = { 900, 1800, 3600, 7200, 9000, 9000 };
        static const int64_t high[] = { 1100, 2200, 4400, 8800, 10000, 10000 };

        for (unsigned r = 0; r < N(low); r++) {
                ck_assert_int_eq(policy_backoff_ms(r, 1000, 10000, 0), low[r]);
                ck_assert_int_eq(policy_backoff_ms(r, 1000, 10000, UINT32_MAX), high[r]);
        }
        /* The mapping is monotonic: a quarter of the range is −5 %, three quarters +5 %. */
        ck_assert_int_eq(policy_backoff_ms(1, 1000, 10000, UINT32_C(0x40000000)), 1900);
        ck_assert_int_eq(policy_backoff_ms(1, 1000, 10000, UINT32_C(0xC0000000)), 2100);
}
END_TEST

START_TEST(test_backoff_jitter_stays_within_ten_percent_for_any_random) {
        uint32_t x = 2463534242u;
        int64_t lo = INT64_MAX, hi = 0;

        for (int i = 0; i < 100000; i++) {
                int64_t d;

                /* xorshift32: many spread values, reproducibly. */
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                d = policy_backoff_ms(2, 1000, 10000, x);
                ck_assert_msg(d >= 3600 && d <= 4400, "backoff %lld outside 4000 ± 10 %%", (long long) d);
                lo = d < lo ? d : lo;
                hi = d > hi ? d : hi;
        }
        /* ...and really spreads, rather than sitting on the centre. */
        ck_assert_int_lt(lo, 3610);
        ck_assert_int_gt(hi, 4390);
}
END_TEST

START_TEST(test_backoff_with_huge_retry_counts_or_values_does_not_overflow) {
        ck_assert_int_eq(policy_backoff_ms(63, 1000, 10000, CENTRE), 10000);
        ck_assert_int_eq(policy_backoff_ms(64, 1000, 10000, CENTRE), 10000);
        ck_assert_int_eq(policy_backoff_ms(UINT32_MAX, 1000, 10000, 0), 9000);
        ck_assert_int_eq(policy_backoff_ms(62, 1, INT64_MAX, CENTRE), INT64_C(4611686018427387904));
        ck_assert_int_eq(policy_backoff_ms(63, 1, INT64_MAX, CENTRE), INT64_MAX);
        ck_assert_int_eq(policy_backoff_ms(UINT32_MAX, INT64_MAX, INT64_MAX, UINT32_MAX), INT64_MAX);
        ck_assert_int_eq(policy_backoff_ms(0, INT64_MAX, INT64_MAX, 0), INT64_C(8301034833169298227));
}
END_TEST

START_TEST(test_backoff_with_odd_configurations_stays_within_one_and_max) {
        /* Initial above the cap: the cap. */
        ck_assert_int_eq(policy_backoff_ms(0, 5000, 3000, CENTRE), 3000);
        ck_assert_int_eq(policy_backoff_ms(0, 5000, 3000, 0), 2700);
        /* Initial of 0 or less: 1 ms, never 0 or negative. */
        ck_assert_int_eq(policy_backoff_ms(0, 0, 10000, 0), 1);
        ck_assert_int_eq(policy_backoff_ms(0, -5, 10000, CENTRE), 1);
        ck_assert_int_eq(policy_backoff_ms(3, 0, 10000, CENTRE), 8);
        /* A cap of 0 or less: 1 ms rather than a hot loop or a negative sleep. */
        ck_assert_int_eq(policy_backoff_ms(0, 1000, 0, UINT32_MAX), 1);
        ck_assert_int_eq(policy_backoff_ms(5, 1000, INT64_MIN, 0), 1);
        /* An odd cap is reached without overshooting it. */
        ck_assert_int_eq(policy_backoff_ms(0, 3, 7, CENTRE), 3);
        ck_assert_int_eq(policy_backoff_ms(1, 3, 7, CENTRE), 6);
        ck_assert_int_eq(policy_backoff_ms(2, 3, 7, CENTRE), 7);
        ck_assert_int_eq(policy_backoff_ms(2, 3, 7, UINT32_MAX), 7);
}
END_TEST

/* ---- rate-limit figures ----------------------------------------------------------------- */

static struct rate_figures figures(const struct answer_header *h, size_t n_h) {
        struct upstream_answer a = { .status = 200, .headers = h, .n_headers = n_h };
        struct rate_figures f = { -7, -7, -7, -7 };

        policy_read_figures(&a, NOW, &f);
        return f;
}

#define assert_figures(f, rr, rt, xr, xt)                                                               \
        do {                                                                                            \
                struct rate_figures _f = (f);                                                           \
                ck_assert_msg(_f.remaining_requests == (int64_t) (rr) &&                                \
                                      _f.remaining_tokens == (int64_t) (rt) &&                          \
                                      _f.reset_requests_ms == (int64_t) (xr) &&                         \
                                      _f.reset_tokens_ms == (int64_t) (xt),                             \
                              "expected figures %lld %lld %lld %lld, got %lld %lld %lld %lld",          \
                              (long long) (rr), (long long) (rt), (long long) (xr), (long long) (xt),   \
                              (long long) _f.remaining_requests, (long long) _f.remaining_tokens,       \
                              (long long) _f.reset_requests_ms, (long long) _f.reset_tokens_ms);        \
        } while (0)

START_TEST(test_figures_unknown_when_nothing_is_sent) {
        static const struct answer_header h[] = { HDR("Content-Type", "application/json") };
        struct rate_figures f = { -7, -7, -7, -7 };

        assert_figures(figures(NULL, 0), -1, -1, -1, -1);
        assert_figures(figures(h, N(h)), -1, -1, -1, -1);
        policy_read_figures(NULL, NOW, &f);
        assert_figures(f, -1, -1, -1, -1);
        policy_read_figures(NULL, NOW, NULL); /* must not crash */
}
END_TEST

START_TEST(test_figures_from_openai_headers) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-limit-requests", "60"),
                HDR("x-ratelimit-limit-tokens", "150000"),
                HDR("x-ratelimit-remaining-requests", "59"),
                HDR("x-ratelimit-remaining-tokens", "149984"),
                HDR("x-ratelimit-reset-requests", "1s"),
                HDR("x-ratelimit-reset-tokens", "6m0s"),
        };

        assert_figures(figures(h, N(h)), 59, 149984, 1000, 6 * MIN);
}
END_TEST

START_TEST(test_figures_from_groq_fractional_go_durations) {
        static const struct answer_header h[] = {
                HDR("X-Ratelimit-Remaining-Requests", "14370"),
                HDR("X-Ratelimit-Remaining-Tokens", "0"),
                HDR("X-Ratelimit-Reset-Requests", "2m59.56s"),
                HDR("X-Ratelimit-Reset-Tokens", "7.66s"),
        };

        assert_figures(figures(h, N(h)), 14370, 0, 179560, 7660);
}
END_TEST

START_TEST(test_figures_from_anthropic_headers) {
        static const struct answer_header h[] = {
                HDR("anthropic-ratelimit-requests-limit", "50"),
                HDR("anthropic-ratelimit-requests-remaining", "49"),
                HDR("anthropic-ratelimit-requests-reset", "2026-08-21T12:00:30Z"),
                HDR("anthropic-ratelimit-tokens-limit", "40000"),
                HDR("anthropic-ratelimit-tokens-remaining", "39000"),
                HDR("anthropic-ratelimit-tokens-reset", "2026-08-21T12:00:00.250Z"),
        };

        assert_figures(figures(h, N(h)), 49, 39000, 30 * SEC, 250);
}
END_TEST

START_TEST(test_figures_from_openrouter_headers) {
        static const struct answer_header h[] = {
                HDR("X-RateLimit-Limit", "20"),
                HDR("X-RateLimit-Remaining", "17"),
                HDR("X-RateLimit-Reset", "1787313660000"),
        };
        static const struct answer_header sim[] = {
                HDR("X-RateLimit-Limit", "20"),
                HDR("X-RateLimit-Remaining", "0"),
        };

        assert_figures(figures(h, N(h)), 17, -1, MIN, -1);
        assert_figures(figures(sim, N(sim)), 0, -1, -1, -1);
}
END_TEST

START_TEST(test_figures_with_resets_in_the_past_are_zero) {
        static const struct answer_header h[] = {
                HDR("anthropic-ratelimit-requests-remaining", "3"),
                HDR("anthropic-ratelimit-requests-reset", "2026-08-21T11:00:00Z"),
                HDR("anthropic-ratelimit-tokens-remaining", "0"),
                HDR("anthropic-ratelimit-tokens-reset", "1999-01-01T00:00:00Z"),
        };
        static const struct answer_header or[] = {
                HDR("X-RateLimit-Remaining", "0"),
                HDR("X-RateLimit-Reset", "1787313500000"),
        };

        assert_figures(figures(h, N(h)), 3, 0, 0, 0);
        assert_figures(figures(or, N(or)), 0, -1, 0, -1);
}
END_TEST

START_TEST(test_garbage_figures_are_unknown) {
        static const char *const remaining[] = {
                "", "-1", "abc", "1.5", "12 ", "1e3", "0x10", "99999999999999999999", "+5", "5.",
        };
        static const char *const go_resets[] = { "", "soon", "-5s", "5", "1y", "1.s", "99999999999h" };
        static const char *const rfc_resets[] = { "", "2026-13-01T00:00:00Z", "2026-08-21", "yesterday",
                                                  "2026-08-21T12:00:42" };

        for (size_t i = 0; i < N(remaining); i++) {
                struct answer_header h[] = {
                        { "x-ratelimit-remaining-requests", 30, remaining[i], strlen(remaining[i]) },
                        { "anthropic-ratelimit-tokens-remaining", 36, remaining[i], strlen(remaining[i]) },
                };

                /* "12 " is trimmed to "12" like every header value. */
                if (strcmp(remaining[i], "12 ") == 0)
                        assert_figures(figures(h, N(h)), 12, 12, -1, -1);
                else
                        assert_figures(figures(h, N(h)), -1, -1, -1, -1);
        }
        for (size_t i = 0; i < N(go_resets); i++) {
                struct answer_header h[] = {
                        { "x-ratelimit-reset-requests", 26, go_resets[i], strlen(go_resets[i]) },
                        { "x-ratelimit-reset-tokens", 24, go_resets[i], strlen(go_resets[i]) },
                };

                assert_figures(figures(h, N(h)), -1, -1, -1, -1);
        }
        for (size_t i = 0; i < N(rfc_resets); i++) {
                struct answer_header h[] = {
                        { "anthropic-ratelimit-requests-reset", 34, rfc_resets[i], strlen(rfc_resets[i]) },
                        { "anthropic-ratelimit-tokens-reset", 32, rfc_resets[i], strlen(rfc_resets[i]) },
                };

                assert_figures(figures(h, N(h)), -1, -1, -1, -1);
        }
}
END_TEST

START_TEST(test_unusable_figure_falls_back_to_another_providers_header) {
        static const struct answer_header h[] = {
                HDR("x-ratelimit-remaining-requests", "lots"),
                HDR("X-RateLimit-Remaining", "4"),
                HDR("x-ratelimit-reset-requests", "later"),
                HDR("X-RateLimit-Reset", "1787313601500"),
                HDR("x-ratelimit-remaining-tokens", "9223372036854775807"),
        };

        assert_figures(figures(h, N(h)), 4, INT64_MAX, 1500, -1);
}
END_TEST

/* ---- usage ------------------------------------------------------------------------------ */

static int usage(const char *json, uint64_t *in, uint64_t *out) {
        *in = 777;
        *out = 777;
        return policy_usage(json, json ? strlen(json) : 0, in, out);
}

#define assert_usage(json, want_in, want_out)                                                          \
        do {                                                                                           \
                uint64_t _in, _out;                                                                    \
                int _r = usage(json, &_in, &_out);                                                     \
                ck_assert_msg(_r == 0 && _in == (want_in) && _out == (want_out),                       \
                              "usage of %s: expected 0 %llu %llu, got %d %llu %llu", (json),           \
                              (unsigned long long) (want_in), (unsigned long long) (want_out), _r,     \
                              (unsigned long long) _in, (unsigned long long) _out);                    \
        } while (0)

#define assert_no_usage(json)                                                                          \
        do {                                                                                           \
                uint64_t _in, _out;                                                                    \
                int _r = usage(json, &_in, &_out);                                                     \
                ck_assert_msg(_r == -ENOENT && _in == 777 && _out == 777,                              \
                              "usage of %s: expected -ENOENT and untouched outputs, got %d %llu %llu", \
                              (json) ? (json) : "NULL", _r, (unsigned long long) _in,                  \
                              (unsigned long long) _out);                                              \
        } while (0)

START_TEST(test_usage_from_openai_and_openrouter_answers) {
        assert_usage("{\"id\":\"gen-fake\",\"object\":\"chat.completion\",\"choices\":[],"
                     "\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5,\"total_tokens\":15}}",
                     10, 5);
        /* The last chunk of a stream with include_usage. */
        assert_usage("{\"id\":\"gen-fake\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
                     "\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":10,"
                     "\"completion_tokens\":3,\"total_tokens\":13}}",
                     10, 3);
        /* OpenAI's Responses API says input/output. */
        assert_usage("{\"object\":\"response\",\"usage\":{\"input_tokens\":36,\"output_tokens\":87}}", 36, 87);
}
END_TEST

START_TEST(test_usage_from_anthropic_message_and_stream_events) {
        assert_usage("{\"id\":\"msg_fake\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],"
                     "\"usage\":{\"input_tokens\":25,\"output_tokens\":12,\"cache_read_input_tokens\":100}}",
                     25, 12);
        assert_usage("{\"type\":\"message_start\",\"message\":{\"id\":\"msg_fake\",\"type\":\"message\","
                     "\"usage\":{\"input_tokens\":472,\"output_tokens\":2}}}",
                     472, 2);
        assert_usage("{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},"
                     "\"usage\":{\"output_tokens\":15}}",
                     0, 15);
}
END_TEST

START_TEST(test_usage_from_gemini_usage_metadata) {
        assert_usage("{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"hi\"}]}}],\"usageMetadata\":"
                     "{\"promptTokenCount\":8,\"candidatesTokenCount\":20,\"totalTokenCount\":28}}",
                     8, 20);
        assert_usage("{\"usageMetadata\":{\"promptTokenCount\":8}}", 8, 0);
}
END_TEST

START_TEST(test_usage_object_without_counts_gives_zeros) {
        assert_usage("{\"usage\":{}}", 0, 0);
        assert_usage("{\"message\":{\"usage\":{\"something\":1}}}", 0, 0);
        assert_usage("{\"usageMetadata\":{}}", 0, 0);
}
END_TEST

START_TEST(test_no_usage_object_is_enoent_and_leaves_outputs_alone) {
        static const char *const bodies[] = {
                "{\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}",
                "{\"usage\":null}",
                "{\"usage\":5}",
                "{\"usage\":[10,5]}",
                "{\"message\":{\"content\":\"no usage\"}}",
                "{\"message\":\"usage\"}",
                "{\"usageMetadata\":\"8\"}",
                "[{\"usage\":{\"prompt_tokens\":10}}]",
                "[DONE]",
                "not json at all",
                "{\"usage\":{\"prompt_tokens\":10}",
                "\"usage\"",
                "12",
                "",
                "{}",
        };
        uint64_t in = 777, out = 777;

        for (size_t i = 0; i < N(bodies); i++)
                assert_no_usage(bodies[i]);
        assert_no_usage(NULL);
        ck_assert_int_eq(policy_usage(NULL, 10, &in, &out), -ENOENT);
        ck_assert_int_eq(policy_usage("{\"usage\":{}}", 12, NULL, &out), -EINVAL);
        ck_assert_int_eq(policy_usage("{\"usage\":{}}", 12, &in, NULL), -EINVAL);
        ck_assert_uint_eq(in, 777);
        ck_assert_uint_eq(out, 777);
}
END_TEST

START_TEST(test_usage_ignores_non_integer_and_negative_counts) {
        assert_usage("{\"usage\":{\"prompt_tokens\":-3,\"completion_tokens\":\"5\"}}", 0, 0);
        assert_usage("{\"usage\":{\"prompt_tokens\":1.5,\"completion_tokens\":null}}", 0, 0);
        assert_usage("{\"usage\":{\"prompt_tokens\":true,\"completion_tokens\":{},\"input_tokens\":4}}", 4, 0);
        assert_usage("{\"usageMetadata\":{\"promptTokenCount\":-1,\"candidatesTokenCount\":[3]}}", 0, 0);
}
END_TEST

START_TEST(test_usage_handles_huge_counts_and_reads_only_len_bytes) {
        static const char buf[] = "{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}trailing junk";
        uint64_t in = 0, out = 0;

        assert_usage("{\"usage\":{\"prompt_tokens\":9223372036854775807,\"completion_tokens\":0}}",
                     UINT64_C(9223372036854775807), 0);
        /* Beyond int64 the JSON parser refuses the document: no usage rather than a wrong one. */
        assert_no_usage("{\"usage\":{\"prompt_tokens\":99999999999999999999999}}");
        assert_no_usage("{\"usage\":{\"prompt_tokens\":1e400}}");
        ck_assert_int_eq(policy_usage(buf, 51, &in, &out), 0);
        ck_assert_uint_eq(in, 1);
        ck_assert_uint_eq(out, 2);
        ck_assert_int_eq(policy_usage(buf, sizeof(buf) - 1, &in, &out), -ENOENT);
}
END_TEST

/* ---- errors inside streams -------------------------------------------------------------- */

static const char openrouter_stream_429_data[] =
        "{\"id\":\"gen-fake\",\"object\":\"chat.completion.chunk\",\"model\":\"test/model:free\","
        "\"error\":{\"code\":429,\"message\":\"Rate limit exceeded\"},"
        "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":\"error\"}]}";

static const char anthropic_stream_error_data[] =
        "{\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"Number of request tokens "
        "has exceeded your per-minute rate limit\"}}";

/* Runs policy_sse_error on a NUL-terminated event and checks the status and the data it points
 * at, which must lie inside the event. */
static void check_sse_error(const char *event, int want_status, const char *want_data) {
        int status = -1;
        const char *data = NULL;
        size_t data_len = 12345;
        int r = policy_sse_error(event, strlen(event), &status, &data, &data_len);

        ck_assert_msg(r == 1, "event '%s' should be an error, got %d", event, r);
        ck_assert_msg(status == want_status, "event '%s': expected status %d, got %d", event, want_status,
                      status);
        ck_assert_msg(data >= event && data + data_len <= event + strlen(event), "data outside the event");
        ck_assert_msg(data_len == strlen(want_data) && memcmp(data, want_data, data_len) == 0,
                      "event '%s': expected data '%s', got '%.*s'", event, want_data, (int) data_len, data);
}

static void check_sse_fine_len(const char *event, size_t len) {
        int status = -1;
        const char *data = (const char *) &status;
        size_t data_len = 12345;
        int r = policy_sse_error(event, len, &status, &data, &data_len);

        ck_assert_msg(r == 0, "event '%.*s' should not be an error, got %d", (int) (len < 200 ? len : 200),
                      event ? event : "", r);
        ck_assert_msg(status == -1 && data == (const char *) &status && data_len == 12345,
                      "outputs written for a non-error event");
}

static void check_sse_fine(const char *event) {
        check_sse_fine_len(event, strlen(event));
}

static struct verdict judge_stream_error(const char *event) {
        int status = 0;
        const char *data = NULL;
        size_t data_len = 0;

        ck_assert_int_eq(policy_sse_error(event, strlen(event), &status, &data, &data_len), 1);
        return judge_full(status, NULL, 0, data, data_len, &pc_default, NOW);
}

START_TEST(test_openrouter_mid_stream_429_is_an_error_classified_as_rate_limited) {
        char event[sizeof(openrouter_stream_429_data) + 16];

        snprintf(event, sizeof(event), "data: %s", openrouter_stream_429_data);
        check_sse_error(event, 429, openrouter_stream_429_data);
        assert_unhinted(judge_stream_error(event));
}
END_TEST

START_TEST(test_openrouter_mid_stream_502_is_an_error_classified_as_transient) {
        static const char event[] =
                "data: {\"id\":\"gen-fake\",\"error\":{\"code\":502,\"message\":\"Bad Gateway\"},"
                "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":\"error\"}]}";

        check_sse_error(event, 502, event + 6);
        assert_class(judge_stream_error(event), VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_anthropic_error_event_maps_its_type_to_a_status) {
        char event[sizeof(anthropic_stream_error_data) + 32];

        snprintf(event, sizeof(event), "event: error\ndata: %s", anthropic_stream_error_data);
        check_sse_error(event, 429, anthropic_stream_error_data);
        assert_unhinted(judge_stream_error(event));

        check_sse_error("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\","
                        "\"message\":\"Overloaded\"}}\n",
                        529,
                        "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}");
        assert_class(judge_stream_error("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":"
                                        "\"overloaded_error\",\"message\":\"Overloaded\"}}"),
                     VERDICT_TRANSIENT);
}
END_TEST

START_TEST(test_anthropic_error_types_each_map_to_their_status) {
        static const struct {
                const char *type;
                int status;
        } cases[] = {
                { "invalid_request_error", 400 }, { "authentication_error", 401 }, { "permission_error", 403 },
                { "not_found_error", 404 },       { "request_too_large", 413 },    { "rate_limit_error", 429 },
                { "api_error", 500 },             { "overloaded_error", 529 },     { "brand_new_error", 500 },
                { "", 500 },
        };

        for (size_t i = 0; i < N(cases); i++) {
                char data[256], event[300];

                snprintf(data, sizeof(data), "{\"type\":\"error\",\"error\":{\"type\":\"%s\",\"message\":\"x\"}}",
                         cases[i].type);
                snprintf(event, sizeof(event), "event: error\ndata: %s\n", data);
                check_sse_error(event, cases[i].status, data);
        }
        /* A type that is not a string counts for nothing. */
        check_sse_error("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":429}}", 500,
                        "{\"type\":\"error\",\"error\":{\"type\":429}}");
}
END_TEST

START_TEST(test_anthropic_shaped_error_without_event_line_is_an_error) {
        char event[sizeof(anthropic_stream_error_data) + 16];

        snprintf(event, sizeof(event), "data: %s", anthropic_stream_error_data);
        check_sse_error(event, 429, anthropic_stream_error_data);
        /* "type":"error" alone is enough to call it an error. */
        check_sse_error("data: {\"type\":\"error\"}", 500, "{\"type\":\"error\"}");
}
END_TEST

START_TEST(test_openai_quota_error_in_a_stream_is_classified_as_billing) {
        static const char event[] =
                "data: {\"error\":{\"message\":\"You exceeded your current quota, please check your plan and "
                "billing details.\",\"type\":\"insufficient_quota\",\"param\":null,\"code\":\"insufficient_quota\"}}";
        static const char limited[] =
                "data: {\"error\":{\"message\":\"Rate limit reached. Please try again in 2s.\","
                "\"type\":\"requests\",\"code\":\"rate_limit_exceeded\"}}";

        check_sse_error(event, 429, event + 6);
        assert_class(judge_stream_error(event), VERDICT_QUOTA);
        check_sse_error(limited, 429, limited + 6);
        assert_rests(judge_stream_error(limited), 2 * SEC);
}
END_TEST

START_TEST(test_error_event_with_odd_or_missing_data_is_still_an_error) {
        int status = -1;
        const char *data = NULL;
        size_t data_len = 99;
        static const char bare[] = "event: error";

        check_sse_error("event: error\ndata: oops, not JSON", 500, "oops, not JSON");
        check_sse_error("event: error\ndata: [DONE]", 500, "[DONE]");
        check_sse_error("event: error\ndata: {\"error\":{\"code\":99999999999999999999999}}", 500,
                        "{\"error\":{\"code\":99999999999999999999999}}");
        check_sse_error("event: error\ndata: {\"error\":\"plain string\"}", 500, "{\"error\":\"plain string\"}");
        check_sse_error("event: error\ndata:", 500, "");

        ck_assert_int_eq(policy_sse_error(bare, strlen(bare), &status, &data, &data_len), 1);
        ck_assert_int_eq(status, 500);
        ck_assert_uint_eq(data_len, 0);
        ck_assert_ptr_nonnull(data);
        /* Judged by status alone: a 500 without words is transient. */
        assert_class(judge_full(status, NULL, 0, data, data_len, &pc_default, NOW), VERDICT_TRANSIENT);
        /* Callers that only want the yes/no may pass NULL outputs. */
        ck_assert_int_eq(policy_sse_error(bare, strlen(bare), NULL, NULL, NULL), 1);
}
END_TEST

START_TEST(test_error_codes_outside_the_error_range_give_500) {
        static const char *const codes[] = { "200", "399", "99", "600", "-429", "\"429\"", "429.0", "null",
                                             "9223372036854775807" };

        for (size_t i = 0; i < N(codes); i++) {
                char data[128], event[160];

                snprintf(data, sizeof(data), "{\"error\":{\"code\":%s,\"message\":\"x\"}}", codes[i]);
                snprintf(event, sizeof(event), "data: %s", data);
                check_sse_error(event, 500, data);
        }
        check_sse_error("data: {\"error\":{\"code\":400}}", 400, "{\"error\":{\"code\":400}}");
        check_sse_error("data: {\"error\":{\"code\":599}}", 599, "{\"error\":{\"code\":599}}");
        /* An integer code wins over an Anthropic type. */
        check_sse_error("data: {\"error\":{\"code\":503,\"type\":\"rate_limit_error\"}}", 503,
                        "{\"error\":{\"code\":503,\"type\":\"rate_limit_error\"}}");
}
END_TEST

START_TEST(test_normal_chunks_done_and_comments_are_not_errors) {
        static const char *const events[] = {
                "data: [DONE]",
                "data: {\"id\":\"gen-fake\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
                "\"delta\":{\"content\":\"tok0 \"},\"finish_reason\":null}]}",
                "data: {\"id\":\"gen-fake\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],"
                "\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5}}",
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":1}}}",
                "event: ping\ndata: {\"type\": \"ping\"}",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"error\"}}",
                ": OPENROUTER PROCESSING",
                "data: {\"error\":null}",
                "data: {\"error\":false,\"text\":\"rate limit\"}",
                "data: {\"type\":\"errors\"}",
                "data: rate limit exceeded",
                "event: errors\ndata: x",
                "event: error\nevent: message\ndata: {}",
                "id: 5\nretry: 1000",
                "\n\n\n",
                "\r\n",
                "data:",
                "data",
        };

        for (size_t i = 0; i < N(events); i++)
                check_sse_fine(events[i]);
        check_sse_fine("");
        check_sse_fine_len(NULL, 0);
        check_sse_fine_len(NULL, 10);
}
END_TEST

START_TEST(test_sse_crlf_and_lone_cr_line_endings) {
        char event[sizeof(anthropic_stream_error_data) + 32];
        static const char lf_data[] = "{\"type\":\"error\",\"error\":{\"type\":\"api_error\"}}";

        snprintf(event, sizeof(event), "event: error\r\ndata: %s\r\n", anthropic_stream_error_data);
        check_sse_error(event, 429, anthropic_stream_error_data);
        snprintf(event, sizeof(event), "event: error\rdata: %s\r", anthropic_stream_error_data);
        check_sse_error(event, 429, anthropic_stream_error_data);
        check_sse_error("event: error\r\n\r\ndata: oops\r\n\r\n", 500, "oops");
        check_sse_error(": keep-alive\r\nevent: error\r\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\"}}\r\n",
                        500, lf_data);
        /* "event: error\r" must not leave the CR in the event name. */
        check_sse_error("event: error\r\ndata: x", 500, "x");
}
END_TEST

START_TEST(test_sse_data_without_space_after_colon) {
        check_sse_error("event:error\ndata:{\"error\":{\"code\":429}}", 429, "{\"error\":{\"code\":429}}");
        /* Only one space is part of the syntax; a second belongs to the value (JSON skips it). */
        check_sse_error("data:  {\"error\":{\"code\":429}}", 429, " {\"error\":{\"code\":429}}");
}
END_TEST

START_TEST(test_sse_field_names_are_case_sensitive_and_last_event_wins) {
        check_sse_fine("Event: error\ndata: x");
        check_sse_fine("EVENT: error\nDATA: {\"error\":{\"code\":429}}");
        check_sse_fine("event: Error\ndata: x");
        check_sse_error("event: message\nevent: error\ndata: x", 500, "x");
        check_sse_fine("event: error\nevent: message\ndata: x");
}
END_TEST

START_TEST(test_sse_data_on_several_lines_is_joined) {
        static const char event[] =
                "event: error\n"
                "data: {\"type\":\"error\",\n"
                "data: \"error\":{\"type\":\"rate_limit_error\",\"message\":\"Rate limited\"}}\n";
        static const char span[] =
                "{\"type\":\"error\",\n"
                "data: \"error\":{\"type\":\"rate_limit_error\",\"message\":\"Rate limited\"}}";

        check_sse_error(event, 429, span);
        /* The span is not JSON, but its words still classify it. */
        assert_unhinted(judge_stream_error(event));
        check_sse_error("data: {\"error\":\ndata: {\"code\":502}}", 502, "{\"error\":\ndata: {\"code\":502}}");
        check_sse_fine("data: {\"a\":\ndata: 1}");
        check_sse_fine("data: {\"error\":\ndata: \ndata: 5}");
}
END_TEST

START_TEST(test_sse_hostile_events_are_harmless) {
        static const char binary[] = "data: \x00\xff\xfe{\"error\":{\"code\":429}}\n\x01\x02:::\n";
        static const char nul_inside[] = "data: {\"error\":{\"code\":429}}\0 junk";
        size_t big = 1 << 20, depth = 100000;
        char *event = malloc(big + 1);
        char *nested = malloc(2 * depth + 7);

        check_sse_fine_len(binary, sizeof(binary) - 1);
        /* Only len bytes count: the same bytes cut before the NUL are an error, with it not JSON. */
        check_sse_fine_len(nul_inside, sizeof(nul_inside) - 1);
        check_sse_error("data: {\"error\":{\"code\":429}}", 429, "{\"error\":{\"code\":429}}");
        check_sse_fine("data: {\"error\":{\"code\":1e400}}");

        ck_assert_ptr_nonnull(event);
        for (size_t i = 0; i < big; i += 8)
                memcpy(event + i, "data: x\n", 8);
        event[big] = '\0';
        check_sse_fine_len(event, big);
        memset(event, ':', big);
        check_sse_fine_len(event, big);
        memset(event, '\n', big);
        check_sse_fine_len(event, big);
        memset(event, 'a', big);
        check_sse_fine_len(event, big);
        free(event);

        ck_assert_ptr_nonnull(nested);
        memcpy(nested, "data: ", 6);
        memset(nested + 6, '[', depth);
        memset(nested + 6 + depth, ']', depth);
        nested[6 + 2 * depth] = '\0';
        check_sse_fine_len(nested, 6 + 2 * depth);
        free(nested);
}
END_TEST

START_TEST(test_error_summary_takes_the_message_and_redacts_credentials) {
        static const char body[] =
                "{\"error\":{\"message\":\"Incorrect API key provided:  sk-or-v1-fake0123456789abcdef.\\nCheck it\",\"code\":401}}";
        char out[96];

        policy_error_summary(body, strlen(body), NULL, out, sizeof out);
        ck_assert_str_eq(out, "Incorrect API key provided: [redacted]. Check it");
        policy_error_summary("plain text AIzaFAKEFAKE", 23, NULL, out, sizeof out);
        ck_assert_str_eq(out, "plain text [redacted]");
        policy_error_summary("token abcdefghij0123456789abcdefXYZ end", 39, NULL, out, 12);
        ck_assert_str_eq(out, "token [reda");
        policy_error_summary(NULL, 0, NULL, out, sizeof out);
        ck_assert_str_eq(out, "");
}
END_TEST

START_TEST(test_error_summary_hides_configured_secrets_of_any_shape_an_upstream_echoes) {
        static const char *const secrets[] = { "fake.letters.and.dots", "FakeLettersOnly", "fakeabcdefghijklmnopqrstuvwxyzabcdefghij" };
        static const char body[] =
                "{\"error\":{\"message\":\"echo: fake.letters.and.dots FakeLettersOnly; "
                "fakeabcdefghijklmnopqrstuvwxyzabcdefghij!\"}}";
        struct scrub *s;
        char out[256];

        ck_assert_int_eq(scrub_new(&s), 0);
        for (size_t i = 0; i < 3; i++)
                ck_assert_int_eq(scrub_add(s, secrets[i], strlen(secrets[i])), 0);
        ck_assert_int_eq(scrub_seal(s), 0);
        policy_error_summary(body, strlen(body), s, out, sizeof out);
        ck_assert_str_eq(out, "echo: [redacted] [redacted]; [redacted]!");
        /* A cut never leaves a secret's head: it is hidden before the text is cut. */
        policy_error_summary("x FakeLettersOnly", 17, s, out, 10);
        ck_assert_str_eq(out, "x [redact");
        /* Nor does dropping an unprintable byte put a split secret back together (found by
         * fuzz_policy: the byte was dropped after scrubbing had missed the split secret). */
        policy_error_summary("x FakeLetters\xfd" "Only y\x01" "FakeLettersOnly", 36, s, out, sizeof out);
        ck_assert_str_eq(out, "x [redacted] y[redacted]");
        scrub_free(s);
}
END_TEST

START_TEST(test_error_summary_hides_an_echoed_authorization_header_whatever_the_key) {
        static const char body[] =
                "{\"error\":{\"message\":\"upstream said: Authorization: Bearer abc.def.ghi\"}}";
        char out[128];

        policy_error_summary(body, strlen(body), NULL, out, sizeof out);
        ck_assert_str_eq(out, "upstream said: Authorization: Bearer [redacted]");
}
END_TEST

static Suite *policy_suite(void) {
        Suite *s = suite_create("policy");
        TCase *tc;

        tc = tcase_create("status");
        tcase_add_test(tc, test_class_names_match_the_status_vocabulary);
        tcase_add_test(tc, test_error_summary_takes_the_message_and_redacts_credentials);
        tcase_add_test(tc, test_error_summary_hides_configured_secrets_of_any_shape_an_upstream_echoes);
        tcase_add_test(tc, test_error_summary_hides_an_echoed_authorization_header_whatever_the_key);
        tcase_add_test(tc, test_transport_error_is_transient_and_blames_no_key);
        tcase_add_test(tc, test_answer_without_status_is_transient);
        tcase_add_test(tc, test_success_and_redirect_are_ok_even_with_limit_words);
        tcase_add_test(tc, test_informational_and_impossible_statuses_are_transient);
        tcase_add_test(tc, test_missing_answer_is_transient_and_missing_config_uses_defaults);
        tcase_add_test(tc, test_plain_4xx_errors_are_the_callers);
        suite_add_tcase(s, tc);

        tc = tcase_create("openai");
        tcase_add_test(tc, test_openai_rate_limit_rests_for_the_delay_named_in_the_message);
        tcase_add_test(tc, test_openai_message_delay_in_go_duration_form_is_understood);
        tcase_add_test(tc, test_openai_rate_limit_without_any_hint_rests_the_recovery_time);
        tcase_add_test(tc, test_openai_insufficient_quota_429_is_billing_not_a_rate_limit);
        tcase_add_test(tc, test_openai_insufficient_quota_named_only_by_type_or_code_is_billing);
        tcase_add_test(tc, test_openai_401_invalid_key_is_auth);
        tcase_add_test(tc, test_openai_503_overloaded_is_transient);
        tcase_add_test(tc, test_empty_request_bucket_rests_until_its_go_duration_reset);
        tcase_add_test(tc, test_empty_token_bucket_rests_until_its_go_duration_reset);
        tcase_add_test(tc, test_both_buckets_empty_rests_until_the_later_reset);
        tcase_add_test(tc, test_reset_headers_are_ignored_while_buckets_have_room);
        tcase_add_test(tc, test_go_durations_of_every_unit_are_understood);
        tcase_add_test(tc, test_sub_second_resets_rest_the_one_second_minimum);
        tcase_add_test(tc, test_garbage_go_durations_are_ignored);
        tcase_add_test(tc, test_longest_go_duration_that_fits_is_capped_by_max_cooldown);
        suite_add_tcase(s, tc);

        tc = tcase_create("anthropic");
        tcase_add_test(tc, test_anthropic_rate_limit_error_rests_for_retry_after);
        tcase_add_test(tc, test_anthropic_spend_cap_is_billing);
        tcase_add_test(tc, test_anthropic_overloaded_529_is_transient);
        tcase_add_test(tc, test_anthropic_error_types_map_to_classes);
        tcase_add_test(tc, test_anthropic_rate_limit_error_type_inside_a_5xx_is_a_rate_limit);
        tcase_add_test(tc, test_anthropic_empty_token_bucket_rests_until_its_rfc3339_reset);
        tcase_add_test(tc, test_anthropic_reset_with_fraction_and_offset_is_understood);
        tcase_add_test(tc, test_anthropic_several_empty_buckets_rest_until_the_latest_reset);
        tcase_add_test(tc, test_anthropic_reset_is_ignored_while_the_bucket_has_room);
        tcase_add_test(tc, test_anthropic_reset_in_the_past_rests_the_minimum);
        tcase_add_test(tc, test_anthropic_garbage_resets_are_ignored);
        suite_add_tcase(s, tc);

        tc = tcase_create("openrouter");
        tcase_add_test(tc, test_openrouter_429_rests_until_x_ratelimit_reset_in_epoch_ms);
        tcase_add_test(tc, test_x_ratelimit_reset_in_epoch_seconds_is_accepted);
        tcase_add_test(tc, test_x_ratelimit_reset_in_the_past_rests_the_minimum);
        tcase_add_test(tc, test_x_ratelimit_reset_too_small_for_a_date_is_read_as_seconds_to_wait);
        tcase_add_test(tc, test_garbage_x_ratelimit_reset_is_ignored);
        tcase_add_test(tc, test_openrouter_402_out_of_credits_is_quota);
        tcase_add_test(tc, test_openrouter_402_key_limit_is_quota);
        tcase_add_test(tc, test_openrouter_402_in_flight_budget_is_transient);
        tcase_add_test(tc, test_402_without_a_body_is_quota);
        tcase_add_test(tc, test_openrouter_401_disabled_key_is_auth);
        tcase_add_test(tc, test_openrouter_403_moderation_is_auth);
        tcase_add_test(tc, test_openrouter_408_502_503_are_transient);
        tcase_add_test(tc, test_rate_limit_words_in_a_502_error_make_it_a_rate_limit);
        tcase_add_test(tc, test_rate_limit_words_in_a_plain_text_503_make_it_a_rate_limit);
        tcase_add_test(tc, test_rate_limit_words_in_a_caller_4xx_never_count);
        tcase_add_test(tc, test_unknown_model_404_quoting_a_hostile_model_name_leaves_the_key_alone);
        tcase_add_test(tc, test_rate_limit_words_in_a_5xx_or_403_make_it_a_rate_limit);
        tcase_add_test(tc, test_rate_limit_words_outside_the_error_fields_do_not_count);
        tcase_add_test(tc, test_billing_code_in_a_4xx_or_5xx_is_not_a_rate_limit);
        suite_add_tcase(s, tc);

        tc = tcase_create("gemini");
        tcase_add_test(tc, test_gemini_per_minute_quota_rests_for_retry_delay);
        tcase_add_test(tc, test_gemini_fractional_retry_delay_is_kept);
        tcase_add_test(tc, test_gemini_message_delay_is_used_without_retry_info);
        tcase_add_test(tc, test_gemini_array_wrapped_error_is_understood);
        tcase_add_test(tc, test_gemini_503_unavailable_is_transient);
        tcase_add_test(tc, test_gemini_per_day_quota_rests_until_pacific_midnight_in_summer);
        tcase_add_test(tc, test_gemini_per_day_quota_rests_until_pacific_midnight_in_winter);
        tcase_add_test(tc, test_gemini_per_day_quota_across_spring_forward);
        tcase_add_test(tc, test_gemini_per_day_quota_across_fall_back);
        tcase_add_test(tc, test_gemini_per_day_rest_is_capped_by_max_cooldown);
        tcase_add_test(tc, test_gemini_per_day_quota_over_new_year);
        tcase_add_test(tc, test_gemini_per_day_quota_exactly_at_midnight_waits_a_full_day);
        tcase_add_test(tc, test_gemini_per_day_with_a_broken_clock_falls_back_to_other_hints);
        suite_add_tcase(s, tc);

        tc = tcase_create("hints");
        tcase_add_test(tc, test_retry_after_delta_seconds_sets_the_rest);
        tcase_add_test(tc, test_header_names_match_in_any_case);
        tcase_add_test(tc, test_retry_after_http_dates_in_all_three_forms);
        tcase_add_test(tc, test_retry_after_date_from_the_provider_reference);
        tcase_add_test(tc, test_retry_after_in_the_past_or_zero_rests_the_minimum);
        tcase_add_test(tc, test_negative_retry_after_is_the_floor_not_a_fall_through);
        tcase_add_test(tc, test_huge_retry_after_is_capped_not_overflowed);
        tcase_add_test(tc, test_long_but_valid_retry_after_is_capped_by_max_cooldown);
        tcase_add_test(tc, test_max_cooldown_of_zero_or_less_means_a_day);
        tcase_add_test(tc, test_garbage_retry_after_values_are_ignored);
        tcase_add_test(tc, test_retry_after_ms_headers_set_the_rest_in_milliseconds);
        tcase_add_test(tc, test_garbage_retry_after_ms_falls_through);
        tcase_add_test(tc, test_zero_negative_past_and_absurd_hints_are_floored_and_capped_alike);
        tcase_add_test(tc, test_hints_are_taken_in_order_of_explicitness);
        tcase_add_test(tc, test_retry_phrases_in_messages_set_the_rest);
        tcase_add_test(tc, test_retry_phrases_without_a_usable_duration_are_ignored);
        tcase_add_test(tc, test_rate_limit_without_hints_rests_the_recovery_time);
        tcase_add_test(tc, test_parse_retry_after_reads_seconds_and_dates);
        tcase_add_test(tc, test_parse_retry_after_gives_zero_for_a_past_date);
        tcase_add_test(tc, test_parse_retry_after_rejects_garbage_and_leaves_the_output_alone);
        suite_add_tcase(s, tc);

        tc = tcase_create("phrases");
        tcase_add_test(tc, test_mentions_rate_limit_recognises_each_phrase_in_any_case);
        tcase_add_test(tc, test_mentions_rate_limit_ignores_other_text);
        tcase_add_test(tc, test_mentions_rate_limit_matches_phrases_inside_words);
        tcase_add_test(tc, test_mentions_rate_limit_reads_only_len_bytes_and_past_nuls);
        suite_add_tcase(s, tc);

        tc = tcase_create("configured_phrases");
        tcase_add_test(tc, test_default_phrase_list_is_exported_and_null_terminated);
        tcase_add_test(tc, test_configured_phrases_replace_the_built_in_list);
        tcase_add_test(tc, test_configured_phrases_match_plain_text_in_any_case);
        tcase_add_test(tc, test_empty_configured_list_matches_nothing_and_429_still_rests);
        tcase_add_test(tc, test_null_and_empty_configured_phrases_match_nothing);
        suite_add_tcase(s, tc);

        tc = tcase_create("success_figures");
        tcase_add_test(tc, test_success_with_an_empty_openai_request_bucket_rests_until_its_reset);
        tcase_add_test(tc, test_success_with_both_openai_buckets_empty_rests_until_the_later_reset);
        tcase_add_test(tc, test_success_with_an_empty_anthropic_bucket_rests_until_its_rfc3339_reset);
        tcase_add_test(tc, test_success_with_openrouter_remaining_zero_rests_until_x_ratelimit_reset);
        tcase_add_test(tc, test_success_takes_the_latest_reset_across_providers);
        tcase_add_test(tc, test_simulator_success_headers_without_a_reset_do_not_cool);
        tcase_add_test(tc, test_success_with_room_left_or_no_figures_does_not_cool);
        tcase_add_test(tc, test_redirect_with_an_empty_bucket_does_not_cool);
        tcase_add_test(tc, test_success_with_an_unusable_reset_does_not_cool);
        tcase_add_test(tc, test_success_rest_is_clamped_to_one_second_and_max_cooldown);
        tcase_add_test(tc, test_retry_after_on_a_success_does_not_cool);
        suite_add_tcase(s, tc);

        tc = tcase_create("transient_retry_hint");
        tcase_add_test(tc, test_503_with_retry_after_carries_the_hint);
        tcase_add_test(tc, test_503_with_millisecond_hints_carries_them);
        tcase_add_test(tc, test_503_with_an_http_date_carries_the_time_until_it);
        tcase_add_test(tc, test_openrouter_in_flight_budget_402_carries_retry_after);
        tcase_add_test(tc, test_anthropic_overloaded_529_carries_retry_after);
        tcase_add_test(tc, test_transient_retry_hint_is_clamped_to_max_cooldown_not_raised);
        tcase_add_test(tc, test_transient_without_a_usable_hint_has_none);
        tcase_add_test(tc, test_only_transient_verdicts_carry_a_retry_hint);
        suite_add_tcase(s, tc);

        tc = tcase_create("backoff");
        tcase_add_test(tc, test_backoff_doubles_from_initial_up_to_the_cap);
        tcase_add_test(tc, test_backoff_jitter_spans_minus_to_plus_ten_percent);
        tcase_add_test(tc, test_backoff_jitter_stays_within_ten_percent_for_any_random);
        tcase_add_test(tc, test_backoff_with_huge_retry_counts_or_values_does_not_overflow);
        tcase_add_test(tc, test_backoff_with_odd_configurations_stays_within_one_and_max);
        suite_add_tcase(s, tc);

        tc = tcase_create("read_figures");
        tcase_add_test(tc, test_figures_unknown_when_nothing_is_sent);
        tcase_add_test(tc, test_figures_from_openai_headers);
        tcase_add_test(tc, test_figures_from_groq_fractional_go_durations);
        tcase_add_test(tc, test_figures_from_anthropic_headers);
        tcase_add_test(tc, test_figures_from_openrouter_headers);
        tcase_add_test(tc, test_figures_with_resets_in_the_past_are_zero);
        tcase_add_test(tc, test_garbage_figures_are_unknown);
        tcase_add_test(tc, test_unusable_figure_falls_back_to_another_providers_header);
        suite_add_tcase(s, tc);

        tc = tcase_create("usage");
        tcase_add_test(tc, test_usage_from_openai_and_openrouter_answers);
        tcase_add_test(tc, test_usage_from_anthropic_message_and_stream_events);
        tcase_add_test(tc, test_usage_from_gemini_usage_metadata);
        tcase_add_test(tc, test_usage_object_without_counts_gives_zeros);
        tcase_add_test(tc, test_no_usage_object_is_enoent_and_leaves_outputs_alone);
        tcase_add_test(tc, test_usage_ignores_non_integer_and_negative_counts);
        tcase_add_test(tc, test_usage_handles_huge_counts_and_reads_only_len_bytes);
        suite_add_tcase(s, tc);

        tc = tcase_create("sse_error");
        tcase_add_test(tc, test_openrouter_mid_stream_429_is_an_error_classified_as_rate_limited);
        tcase_add_test(tc, test_openrouter_mid_stream_502_is_an_error_classified_as_transient);
        tcase_add_test(tc, test_anthropic_error_event_maps_its_type_to_a_status);
        tcase_add_test(tc, test_anthropic_error_types_each_map_to_their_status);
        tcase_add_test(tc, test_anthropic_shaped_error_without_event_line_is_an_error);
        tcase_add_test(tc, test_openai_quota_error_in_a_stream_is_classified_as_billing);
        tcase_add_test(tc, test_error_event_with_odd_or_missing_data_is_still_an_error);
        tcase_add_test(tc, test_error_codes_outside_the_error_range_give_500);
        tcase_add_test(tc, test_normal_chunks_done_and_comments_are_not_errors);
        tcase_add_test(tc, test_sse_crlf_and_lone_cr_line_endings);
        tcase_add_test(tc, test_sse_data_without_space_after_colon);
        tcase_add_test(tc, test_sse_field_names_are_case_sensitive_and_last_event_wins);
        tcase_add_test(tc, test_sse_data_on_several_lines_is_joined);
        tcase_add_test(tc, test_sse_hostile_events_are_harmless);
        suite_add_tcase(s, tc);

        tc = tcase_create("hostile");
        tcase_add_test(tc, test_truncated_json_is_read_as_text);
        tcase_add_test(tc, test_non_json_bodies_are_read_as_text);
        tcase_add_test(tc, test_binary_junk_bodies_are_harmless);
        tcase_add_test(tc, test_null_body_of_length_zero_is_judged_by_status);
        tcase_add_test(tc, test_json_of_unexpected_shape_is_harmless);
        tcase_add_test(tc, test_deeply_nested_json_is_harmless);
        tcase_add_test(tc, test_odd_headers_are_harmless);
        tcase_add_test(tc, test_only_the_first_of_repeated_headers_counts);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        SRunner *sr = srunner_create(policy_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
