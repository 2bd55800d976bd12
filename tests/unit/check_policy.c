/* check_policy.c — unit tests of the upstream-answer classifier.
 *
 * Every example of reference/provider-signals.md goes through policy_classify with a fixed clock,
 * and every expected rest is an exact number of milliseconds worked out by hand (or, for the
 * Pacific-midnight cases, by Python's zoneinfo), never by calling the code under test.
 */
#include <errno.h>
#include <stdint.h>
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
        struct verdict v = { .cls = VERDICT_NONE, .rest_ms = -12345, .hinted = -1 };

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
                "99999999999999999999s", "9999999h", "2562048h", "5000000h1h", "\xff\xfe", "1..5s",
        };

        for (size_t i = 0; i < N(bad); i++)
                ck_assert_msg(rest_for_token_reset(bad[i], DAY) == -1, "reset '%s' should be ignored", bad[i]);
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

START_TEST(test_rate_limit_words_in_a_4xx_make_it_a_rate_limit) {
        static const struct answer_header h[] = { HDR("retry-after", "7") };

        assert_rests(judge(400, h, N(h), "{\"error\":{\"message\":\"Rate-limit hit for this model\"}}"), 7 * SEC);
        assert_unhinted(judge(422, NULL, 0, "{\"error\":{\"code\":\"ratelimit\",\"message\":\"x\"}}"));
        assert_unhinted(judge(404, NULL, 0, "{\"error\":\"Too Many Requests\"}"));
        assert_unhinted(judge(400, NULL, 0, "{\"detail\":\"rate_limit reached\"}"));
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

START_TEST(test_negative_retry_after_falls_through_to_the_next_hint) {
        static const struct answer_header h[] = {
                HDR("Retry-After", "-5"),
                HDR("retry-after-ms", "2500"),
        };

        assert_rests(judge(429, h, N(h), NULL), 2500);
}
END_TEST

START_TEST(test_huge_retry_after_is_ignored_not_overflowed) {
        static const struct answer_header h[] = { HDR("Retry-After", "99999999999999999999") };
        static const struct answer_header h2[] = { HDR("Retry-After", "9223372036854775807") };

        assert_unhinted(judge(429, h, N(h), NULL));
        assert_unhinted(judge(429, h2, N(h2), NULL));
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
                HDR("x-ms-retry-after-ms", "-1"),
                HDR("x-ratelimit-reset", "1787313604000"),
        };
        static const struct answer_header huge[] = { HDR("retry-after-ms", "99999999999999999999") };

        assert_rests(judge(429, h, N(h), NULL), 4 * SEC);
        assert_unhinted(judge(429, huge, N(huge), NULL));
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
        assert_unhinted(judge(429, NULL, 0,
                              "{\"error\":{\"message\":\"retry in 99999999999999999999999s\"}}"));
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
        static const char *const bad[] = { "", "-1", "abc", "99999999999999999999", "1e3", "30 s", "NaN" };
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
        assert_unhinted(judge(400, NULL, 0, "{\"error\":{\"message\":\"Rate limit exce"));
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

static Suite *policy_suite(void) {
        Suite *s = suite_create("policy");
        TCase *tc;

        tc = tcase_create("status");
        tcase_add_test(tc, test_class_names_match_the_status_vocabulary);
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
        tcase_add_test(tc, test_rate_limit_words_in_a_4xx_make_it_a_rate_limit);
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
        tcase_add_test(tc, test_negative_retry_after_falls_through_to_the_next_hint);
        tcase_add_test(tc, test_huge_retry_after_is_ignored_not_overflowed);
        tcase_add_test(tc, test_long_but_valid_retry_after_is_capped_by_max_cooldown);
        tcase_add_test(tc, test_max_cooldown_of_zero_or_less_means_a_day);
        tcase_add_test(tc, test_garbage_retry_after_values_are_ignored);
        tcase_add_test(tc, test_retry_after_ms_headers_set_the_rest_in_milliseconds);
        tcase_add_test(tc, test_garbage_retry_after_ms_falls_through);
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
