/* check_persist.c — the state document and its files: a cooling key stays cooling across a
 * restart for the rest of its time, counters and history come back once, nothing secret is
 * written, bad documents are refused with a reason, bad keys are skipped, and files are replaced
 * atomically. */

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "keypool/keyid.h"
#include "keypool/keytable.h"
#include "keypool/persist.h"

#define N_KEYS 3

/* keypool.conf's default max_cooldown. */
#define MAX_COOLDOWN_MS INT64_C(86400000)

/* 2026-11-28T10:20:00Z */
#define WALL0 INT64_C(1795861200000)

static const char *const fake_secrets[N_KEYS] = {
        "sk-or-v1-fake0000000000000000000000000000000000000000000001",
        "sk-or-v1-fake0000000000000000000000000000000000000000000002",
        "sk-or-v1-fake0000000000000000000000000000000000000000000003",
};

static const struct keytable_limits limits = {
        .max_pools = 4,
        .max_keys = 16,
        .n_slots = 2,
        .leases_per_slot = 4,
        .history_size = 16,
};

struct fixture {
        struct keytable *t;
        unsigned pool;
        unsigned slot;
        unsigned key[N_KEYS];
        char id[N_KEYS][KEYID_ID_LEN + 1];
        char masked[N_KEYS][KEYID_MASK_MAX + 1];
};

/* A table as keypoold builds it: ids and masked forms computed from the (fake) secrets, which
 * then go nowhere near the table. */
static void fixture_setup_at(struct fixture *f, int64_t mono) {
        memset(f, 0, sizeof *f);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_int_eq(keyid_fingerprint(fake_secrets[i], strlen(fake_secrets[i]), f->id[i]), 0);
                keyid_mask(fake_secrets[i], strlen(fake_secrets[i]), f->masked[i]);
        }
        ck_assert_int_eq(keytable_create(&limits, mono, &f->t), 0);
        ck_assert_int_eq(keytable_add_pool(f->t, "openrouter", "openai/gpt-4o-mini", &f->pool), 0);
        for (unsigned i = 0; i < N_KEYS; i++)
                ck_assert_int_eq(keytable_add_key(f->t, f->pool, f->id[i], f->masked[i], &f->key[i]), 0);
        ck_assert_int_eq(keytable_slot_claim(f->t, 1, mono, &f->slot), 0);
}

static void fixture_teardown(struct fixture *f) {
        keytable_destroy(f->t);
        f->t = NULL;
}

static void serve(struct fixture *f, unsigned want_key, enum verdict_class cls, int status,
                  int64_t rest_ms, uint64_t tokens, int64_t now) {
        struct keytable_outcome o = { .cls = cls, .status = status, .rest_ms = rest_ms,
                                      .tokens_in = tokens, .tokens_out = tokens / 2,
                                      .figures = RATE_FIGURES_UNKNOWN };
        struct keytable_lease l;

        ck_assert_int_eq(keytable_acquire(f->t, f->slot, f->pool, now, KEYTABLE_NO_KEY, &l, NULL,
                                          NULL), 0);
        ck_assert_msg(l.key == f->key[want_key], "expected key %u to serve, got row %u", want_key,
                      l.key);
        keytable_release(f->t, &l, &o, now, NULL);
}

static void add_event(struct fixture *f, enum history_kind kind, int64_t wall, unsigned from,
                      int to, int status, enum key_reason reason, int64_t cooldown_ms) {
        struct keytable_event e = { .wall_ms = wall, .kind = kind, .status = status,
                                    .reason = reason, .cooldown_ms = cooldown_ms };

        strcpy(e.pool, "openrouter");
        strcpy(e.key_from, f->id[from]);
        if (to >= 0)
                strcpy(e.key_to, f->id[to]);
        keytable_history_add(f->t, &e);
}

static void snapshot(struct fixture *f, int64_t now, struct keytable_key_view v[N_KEYS]) {
        ck_assert_int_eq(keytable_pool_snapshot(f->t, f->pool, now, v), 0);
}

/* Key 0 cooling (30 s from mono 1000), key 1 serving, key 2 disabled for quota, and the
 * history of it. */
static void scenario(struct fixture *f) {
        serve(f, 0, VERDICT_OK, 200, 0, 100, 1000);
        serve(f, 1, VERDICT_OK, 200, 0, 40, 1000);
        serve(f, 2, VERDICT_QUOTA, 402, 0, 0, 1000);
        serve(f, 0, VERDICT_RATE_LIMITED, 429, 30000, 0, 1000);
        serve(f, 1, VERDICT_TRANSIENT, 502, 0, 0, 1500);
        add_event(f, HISTORY_DISABLE, WALL0 - 9000, 2, -1, 402, KEY_REASON_QUOTA, 0);
        add_event(f, HISTORY_COOLDOWN, WALL0 - 9000 + 123, 0, -1, 429, KEY_REASON_RATE_LIMITED, 30000);
        add_event(f, HISTORY_ROTATE, WALL0 - 9000 + 124, 0, 1, 429, KEY_REASON_RATE_LIMITED, 0);
}

static int import(struct fixture *f, const char *doc, int64_t mono, int64_t wall,
                  struct persist_report *ret, char *err, size_t errlen) {
        return persist_import(f->t, doc, strlen(doc), mono, wall, MAX_COOLDOWN_MS, ret, err, errlen);
}

/* --- round trip ---------------------------------------------------------------------------- */

START_TEST(test_a_cooling_key_is_still_cooling_after_a_restart_for_the_rest_of_its_time)
{
        struct fixture a, b;
        struct keytable_key_view va[N_KEYS], vb[N_KEYS];
        struct keytable_event ea[16], eb[16];
        struct persist_report rep;
        char err[256] = "";
        unsigned na, nb;
        char *doc;

        /* Saved 10 s into a rest of 30 s, at wall time WALL0. */
        fixture_setup_at(&a, 1000);
        scenario(&a);
        doc = persist_export(a.t, 11000, WALL0);
        ck_assert_ptr_nonnull(doc);
        snapshot(&a, 11000, va);
        na = keytable_history_read(a.t, ea, 16);

        /* Started again at once, on a monotonic clock that began elsewhere. */
        fixture_setup_at(&b, 5000000);
        ck_assert_msg(import(&b, doc, 5000000, WALL0, &rep, err, sizeof err) == 0,
                      "import refused: %s", err);
        ck_assert_uint_eq(rep.imported, N_KEYS);
        ck_assert_uint_eq(rep.ignored, 0);
        ck_assert_uint_eq(rep.events, na);
        snapshot(&b, 5000000, vb);

        ck_assert_int_eq(vb[0].state, KEY_COOLING);
        ck_assert_int_eq(vb[0].reason, KEY_REASON_RATE_LIMITED);
        ck_assert_msg(vb[0].cooldown_until_ms >= 5000000 + 20000 &&
                      vb[0].cooldown_until_ms <= 5000000 + 21000,
                      "20 s of rest were left, the restored key rests until +%lld ms",
                      (long long) (vb[0].cooldown_until_ms - 5000000));
        ck_assert_int_eq(vb[2].state, KEY_DISABLED);
        ck_assert_int_eq(vb[2].reason, KEY_REASON_QUOTA);
        ck_assert_int_eq(vb[1].state, KEY_READY);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_str_eq(vb[i].id, va[i].id);
                ck_assert_uint_eq(vb[i].requests, va[i].requests);
                ck_assert_uint_eq(vb[i].successes, va[i].successes);
                ck_assert_uint_eq(vb[i].rate_limited, va[i].rate_limited);
                ck_assert_uint_eq(vb[i].failures, va[i].failures);
                ck_assert_uint_eq(vb[i].tokens_in, va[i].tokens_in);
                ck_assert_uint_eq(vb[i].tokens_out, va[i].tokens_out);
                ck_assert_uint_eq(vb[i].consecutive_failures, va[i].consecutive_failures);
                ck_assert_int_eq(vb[i].last_status, va[i].last_status);
                ck_assert_int_eq(vb[i].last_class, va[i].last_class);
                /* Last use in whole seconds: 10 s ago, give or take one. */
                ck_assert_int_ge(vb[i].last_used_ms, 5000000 - 10000 - 1000);
                ck_assert_int_le(vb[i].last_used_ms, 5000000 - 10000 + 1000);
        }
        ck_assert_uint_eq(vb[1].consecutive_failures, 1);
        ck_assert_uint_eq(vb[0].tokens_in, 100);

        /* The rest goes on in the new table: key 0 serves again only once it is over. */
        serve(&b, 1, VERDICT_OK, 200, 0, 0, 5000000 + 19000);
        serve(&b, 0, VERDICT_OK, 200, 0, 0, 5000000 + 21000);

        nb = keytable_history_read(b.t, eb, 16);
        ck_assert_uint_eq(nb, na);
        for (unsigned i = 0; i < nb; i++) {
                ck_assert_int_eq(eb[i].wall_ms, ea[i].wall_ms);
                ck_assert_int_eq(eb[i].kind, ea[i].kind);
                ck_assert_str_eq(eb[i].pool, ea[i].pool);
                ck_assert_str_eq(eb[i].key_from, ea[i].key_from);
                ck_assert_str_eq(eb[i].key_to, ea[i].key_to);
                ck_assert_int_eq(eb[i].status, ea[i].status);
                ck_assert_int_eq(eb[i].reason, ea[i].reason);
                ck_assert_int_eq(eb[i].cooldown_ms, ea[i].cooldown_ms);
        }

        /* Once more: the history is not doubled. */
        ck_assert_int_eq(import(&b, doc, 5000000, WALL0, &rep, err, sizeof err), 0);
        ck_assert_uint_eq(rep.events, 0);
        ck_assert_uint_eq(keytable_history_read(b.t, eb, 16), na);

        free(doc);
        fixture_teardown(&a);
        fixture_teardown(&b);
}
END_TEST

START_TEST(test_a_rest_that_ran_out_while_stopped_comes_back_ready)
{
        struct fixture a, b;
        struct keytable_key_view v[N_KEYS];
        struct persist_report rep;
        char *doc;

        fixture_setup_at(&a, 1000);
        scenario(&a);
        doc = persist_export(a.t, 11000, WALL0);
        ck_assert_ptr_nonnull(doc);

        /* An hour later. */
        fixture_setup_at(&b, 200);
        ck_assert_int_eq(import(&b, doc, 200, WALL0 + 3600000, &rep, NULL, 0), 0);
        ck_assert_uint_eq(rep.imported, N_KEYS);
        snapshot(&b, 200, v);
        ck_assert_int_eq(v[0].state, KEY_READY);
        ck_assert_int_eq(v[0].reason, KEY_REASON_NONE);
        ck_assert_uint_eq(v[0].rate_limited, 1);
        ck_assert_int_eq(v[2].state, KEY_DISABLED);
        /* Used before this clock began: "never" rather than a time it cannot say. */
        ck_assert_int_eq(v[0].last_used_ms, 0);
        free(doc);
        fixture_teardown(&a);
        fixture_teardown(&b);
}
END_TEST

START_TEST(test_the_document_holds_ids_and_never_a_secret_or_masked_form)
{
        struct fixture f;
        char *doc;

        fixture_setup_at(&f, 1000);
        scenario(&f);
        doc = persist_export(f.t, 11000, WALL0);
        ck_assert_ptr_nonnull(doc);
        for (unsigned i = 0; i < N_KEYS; i++) {
                ck_assert_msg(strstr(doc, f.id[i]) != NULL, "key %u's id is missing", i);
                ck_assert_msg(strstr(doc, fake_secrets[i]) == NULL, "key %u's secret is in the document", i);
                ck_assert_msg(strstr(doc, f.masked[i]) == NULL, "key %u's masked form is in the document", i);
        }
        /* Not even a piece of one. */
        ck_assert_ptr_null(strstr(doc, "sk-or"));
        ck_assert_ptr_null(strstr(doc, "fake000"));
        free(doc);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_the_document_has_the_envelope_and_rfc3339_utc_times)
{
        struct fixture f;
        json_error_t je;
        json_t *root, *keys, *k0, *history, *e1;
        char *doc;

        fixture_setup_at(&f, 1000);
        scenario(&f);
        doc = persist_export(f.t, 11000, WALL0);
        ck_assert_ptr_nonnull(doc);
        root = json_loads(doc, 0, &je);
        ck_assert_msg(root != NULL, "the export is not JSON: %s", je.text);
        ck_assert_str_eq(json_string_value(json_object_get(root, "format")), "keypool-state");
        ck_assert_int_eq(json_integer_value(json_object_get(root, "version")), 1);
        ck_assert_str_eq(json_string_value(json_object_get(root, "saved_at")), "2026-11-28T10:20:00Z");

        keys = json_object_get(root, "keys");
        ck_assert_uint_eq(json_array_size(keys), N_KEYS);
        k0 = json_array_get(keys, 0);
        ck_assert_str_eq(json_string_value(json_object_get(k0, "pool")), "openrouter");
        ck_assert_str_eq(json_string_value(json_object_get(k0, "id")), f.id[0]);
        ck_assert_str_eq(json_string_value(json_object_get(k0, "state")), "cooling");
        ck_assert_str_eq(json_string_value(json_object_get(k0, "reason")), "rate_limited");
        ck_assert_str_eq(json_string_value(json_object_get(k0, "cooldown_until")), "2026-11-28T10:20:20Z");
        ck_assert_str_eq(json_string_value(json_object_get(k0, "last_used")), "2026-11-28T10:19:50Z");
        ck_assert_str_eq(json_string_value(json_object_get(k0, "last_class")), "rate_limited");
        ck_assert_int_eq(json_integer_value(json_object_get(k0, "last_status")), 429);
        ck_assert_int_eq(json_integer_value(json_object_get(k0, "requests")), 2);
        ck_assert(json_is_null(json_object_get(json_array_get(keys, 1), "reason")));
        ck_assert(json_is_null(json_object_get(json_array_get(keys, 1), "cooldown_until")));

        history = json_object_get(root, "history");
        ck_assert_uint_eq(json_array_size(history), 3);
        e1 = json_array_get(history, 1);
        ck_assert_str_eq(json_string_value(json_object_get(e1, "time")), "2026-11-28T10:19:51.123Z");
        ck_assert_str_eq(json_string_value(json_object_get(e1, "event")), "cooldown");
        ck_assert_str_eq(json_string_value(json_object_get(e1, "from")), f.id[0]);
        ck_assert(json_is_null(json_object_get(e1, "to")));
        ck_assert_int_eq(json_integer_value(json_object_get(e1, "cooldown_s")), 30);
        ck_assert_str_eq(json_string_value(json_object_get(json_array_get(history, 2), "to")), f.id[1]);
        json_decref(root);
        free(doc);
        fixture_teardown(&f);
}
END_TEST

/* --- refusing and skipping ----------------------------------------------------------------- */

START_TEST(test_corrupt_foreign_and_other_version_documents_are_refused_with_a_reason)
{
        static const struct {
                const char *doc, *reason_has;
        } bad[] = {
                { "{\"format\":\"keypool-state\",\"version\":1,\"keys\":[", "not JSON" },
                { "", "not JSON" },
                { "sk-or-v1-fake0000000000000000000000000000000000000000000001", "not JSON" },
                { "[1,2,3]", "not a keypool state" },
                { "{\"format\":\"other-tool\",\"version\":1,\"keys\":[]}", "format" },
                { "{\"version\":1,\"keys\":[]}", "format" },
                { "{\"format\":\"keypool-state\",\"version\":2,\"keys\":[]}", "version 2" },
                { "{\"format\":\"keypool-state\",\"keys\":[]}", "version" },
                { "{\"format\":\"keypool-state\",\"version\":1,\"keys\":{}}", "keys" },
                { "{\"format\":\"keypool-state\",\"version\":1,\"keys\":[],\"history\":3}", "history" },
        };
        struct fixture f;
        struct keytable_key_view before[N_KEYS], after[N_KEYS];
        struct persist_report rep = { .imported = 77 };

        fixture_setup_at(&f, 1000);
        scenario(&f);
        snapshot(&f, 2000, before);
        for (unsigned i = 0; i < sizeof bad / sizeof bad[0]; i++) {
                char err[256] = "";
                int r = import(&f, bad[i].doc, 2000, WALL0, &rep, err, sizeof err);

                ck_assert_msg(r == -EINVAL, "document %u: expected -EINVAL, got %d", i, r);
                ck_assert_msg(strstr(err, bad[i].reason_has) != NULL,
                              "document %u: the reason '%s' does not say '%s'", i, err,
                              bad[i].reason_has);
                ck_assert_msg(strstr(err, "fake") == NULL, "document %u: the reason quotes it", i);
        }
        ck_assert_uint_eq(rep.imported, 77);
        snapshot(&f, 2000, after);
        ck_assert(memcmp(before, after, sizeof before) == 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_unknown_and_broken_keys_are_ignored_and_counted)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct persist_report rep;
        char doc[2048], err[256] = "";

        fixture_setup_at(&f, 1000);
        snprintf(doc, sizeof doc,
                 "{\"format\":\"keypool-state\",\"version\":1,\"saved_at\":\"2026-11-28T10:20:00Z\","
                 "\"future_field\":{\"x\":1},\"keys\":["
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"disabled\",\"reason\":\"auth\","
                 "\"requests\":9,\"extra\":true},"
                 "{\"pool\":\"openrouter\",\"id\":\"kp-0000000000\",\"state\":\"ready\"},"
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"sleeping\"},"
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"cooling\",\"cooldown_until\":null},"
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"ready\",\"requests\":-4},"
                 "\"not a key\",{}],"
                 "\"history\":[{\"time\":\"yesterday\",\"event\":\"rotate\"},"
                 "{\"time\":\"2026-11-28T12:20:00+02:00\",\"event\":\"enable\",\"pool\":\"openrouter\","
                 "\"from\":\"%s\",\"to\":null,\"status\":null,\"reason\":null,\"cooldown_s\":1.5},"
                 "{\"time\":\"2026-11-28T10:20:00Z\",\"event\":\"explode\"}]}",
                 f.id[0], f.id[1], f.id[2], f.id[1], f.id[0]);
        ck_assert_msg(import(&f, doc, 1000, WALL0, &rep, err, sizeof err) == 0, "refused: %s", err);
        ck_assert_uint_eq(rep.imported, 1);
        ck_assert_uint_eq(rep.ignored, 6);
        ck_assert_uint_eq(rep.events, 1);

        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_DISABLED);
        ck_assert_int_eq(v[0].reason, KEY_REASON_AUTH);
        ck_assert_uint_eq(v[0].requests, 9);
        ck_assert_int_eq(v[1].state, KEY_READY);
        ck_assert_uint_eq(v[1].requests, 0);
        ck_assert_int_eq(v[2].state, KEY_READY);

        {
                struct keytable_event e;

                ck_assert_uint_eq(keytable_history_read(f.t, &e, 1), 1);
                ck_assert_int_eq(e.kind, HISTORY_ENABLE);
                ck_assert_int_eq(e.wall_ms, WALL0);
                ck_assert_int_eq(e.cooldown_ms, 1500);
                ck_assert_str_eq(e.key_from, f.id[0]);
        }
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_a_number_jansson_cannot_hold_anywhere_refuses_the_document_as_before)
{
        static const char *const docs[] = {
                "{\"format\":\"keypool-state\",\"version\":1,\"future\":[9223372036854775808],\"keys\":[]}",
                "{\"format\":\"keypool-state\",\"version\":1,\"keys\":[{\"id\":\"x\",\"requests\":-9223372036854775809}]}",
                "{\"format\":\"keypool-state\",\"version\":1,\"keys\":[],\"history\":[{\"cooldown_s\":1e400}]}",
        };
        struct fixture f;

        fixture_setup_at(&f, 1000);
        for (unsigned i = 0; i < sizeof docs / sizeof docs[0]; i++) {
                char err[256] = "";

                ck_assert_int_eq(import(&f, docs[i], 1000, WALL0, NULL, err, sizeof err), -EINVAL);
                ck_assert_msg(strstr(err, "not JSON") != NULL, "document %u: '%s'", i, err);
        }
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_escaped_text_duplicates_and_odd_but_valid_fields_read_as_jansson_read_them)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct persist_report rep;
        char doc[2048], err[256] = "";

        fixture_setup_at(&f, 1000);
        /* key 0: escaped pool, id and state, the last "requests" counts, a fraction of any length;
         * key 1: a deadline that is no time, on a ready key, which never reads it;
         * key 2: the largest count a JSON reader keeps exact (2^53), and -0. */
        snprintf(doc, sizeof doc,
                 "{\"format\":\"keypool-st\\u0061te\",\"version\":1,\"keys\":["
                 "{\"pool\":\"open\\u0072outer\",\"id\":\"%.3s\\u00%02x%s\",\"st\\u0061te\":\"dis\\u0061bled\","
                 "\"requests\":1,\"requests\":5,\"last_used\":\"1970-01-01T00:00:00.0000000000000000000000000000000000000000000000000000000000000000001Z\"},"
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"ready\",\"cooldown_until\":\"whenever\",\"requests\":7},"
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"ready\",\"tokens_in\":9007199254740992,"
                 "\"tokens_out\":-0,\"last_status\":-0}]}",
                 f.id[0], (unsigned char) f.id[0][3], f.id[0] + 4, f.id[1], f.id[2]);
        ck_assert_msg(import(&f, doc, 1000, WALL0, &rep, err, sizeof err) == 0, "refused: %s", err);
        ck_assert_uint_eq(rep.imported, 3);
        ck_assert_uint_eq(rep.ignored, 0);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_DISABLED);
        ck_assert_uint_eq(v[0].requests, 5);
        ck_assert_int_eq(v[1].state, KEY_READY);
        ck_assert_uint_eq(v[1].requests, 7);
        ck_assert_uint_eq(v[2].tokens_in, UINT64_C(9007199254740992));
        ck_assert_uint_eq(v[2].tokens_out, 0);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_keys_match_by_pool_and_id_else_by_id_alone)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS], w[1];
        struct persist_report rep;
        unsigned other;
        char doc[1024];

        /* The key is in "openrouter" and in "spare"; the document knows it in "openrouter" and
         * in "gone", a pool that no longer exists. */
        fixture_setup_at(&f, 1000);
        ck_assert_int_eq(keytable_add_pool(f.t, "spare", "m", &other), 0);
        ck_assert_int_eq(keytable_add_key(f.t, other, f.id[0], f.masked[0], NULL), 0);
        snprintf(doc, sizeof doc,
                 "{\"format\":\"keypool-state\",\"version\":1,\"keys\":["
                 "{\"pool\":\"gone\",\"id\":\"%s\",\"state\":\"disabled\",\"reason\":\"quota\",\"requests\":2},"
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"ready\",\"requests\":5},"
                 "{\"id\":\"%s\",\"state\":\"ready\",\"requests\":8}]}",
                 f.id[0], f.id[0], f.id[1]);
        ck_assert_int_eq(import(&f, doc, 1000, WALL0, &rep, NULL, 0), 0);
        ck_assert_uint_eq(rep.imported, 3);
        ck_assert_uint_eq(rep.ignored, 0);

        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_READY);
        ck_assert_uint_eq(v[0].requests, 5);
        ck_assert_uint_eq(v[1].requests, 8);
        ck_assert_int_eq(keytable_pool_snapshot(f.t, other, 1000, w), 0);
        ck_assert_int_eq(w[0].state, KEY_DISABLED);
        ck_assert_int_eq(w[0].reason, KEY_REASON_QUOTA);
        ck_assert_uint_eq(w[0].requests, 2);
        fixture_teardown(&f);
}
END_TEST

START_TEST(test_times_are_read_as_rfc3339_and_impossible_dates_are_skipped)
{
        static const struct {
                const char *when;
                int64_t wall_ms;                /* -2: refused */
        } times[] = {
                { "2026-11-28T10:20:00Z", WALL0 },
                { "2026-11-28t10:20:00.5z", WALL0 + 500 },
                { "2026-11-28T10:20:00.123456789Z", WALL0 + 123 },
                { "2026-11-28T05:50:00-04:30", WALL0 },
                { "2028-02-29T00:00:00Z", INT64_C(1835395200000) },
                { "1969-12-31T23:59:59.999Z", -1 },           /* the ms before the epoch */
                { "2027-02-29T00:00:00Z", -2 },
                { "2026-13-01T00:00:00Z", -2 },
                { "2026-11-28T24:00:00Z", -2 },
                { "2026-11-28T10:20:00", -2 },
                { "2026-11-28T10:20:00.Z", -2 },
                { "2026-11-28T10:20:00Z trailing", -2 },
                { "2026-11-28", -2 },
        };
        const size_t n = sizeof times / sizeof times[0];
        struct keytable_limits lim = limits;
        struct keytable_event out[16];
        struct persist_report rep;
        struct keytable *t;
        char doc[4096];
        size_t at, kept = 0;

        at = (size_t) snprintf(doc, sizeof doc, "{\"format\":\"keypool-state\",\"version\":1,\"history\":[");
        for (size_t i = 0; i < n; i++)
                at += (size_t) snprintf(doc + at, sizeof doc - at,
                                        "%s{\"time\":\"%s\",\"event\":\"probe\",\"pool\":\"p%zu\"}",
                                        i ? "," : "", times[i].when, i);
        snprintf(doc + at, sizeof doc - at, "]}");

        ck_assert_int_eq(keytable_create(&lim, 1000, &t), 0);
        ck_assert_int_eq(persist_import(t, doc, strlen(doc), 1000, WALL0, MAX_COOLDOWN_MS, &rep, NULL, 0), 0);
        for (size_t i = 0; i < n; i++)
                if (times[i].wall_ms != -2)
                        kept++;
        ck_assert_uint_eq(rep.events, kept);
        ck_assert_uint_eq(keytable_history_read(t, out, 16), kept);
        for (size_t i = 0, j = 0; i < n; i++) {
                char pool[16];

                if (times[i].wall_ms == -2)
                        continue;
                snprintf(pool, sizeof pool, "p%zu", i);
                ck_assert_str_eq(out[j].pool, pool);
                ck_assert_msg(out[j].wall_ms == times[i].wall_ms, "%s read as %lld", times[i].when,
                              (long long) out[j].wall_ms);
                j++;
        }
        keytable_destroy(t);
}
END_TEST

START_TEST(test_a_rest_beyond_year_9999_is_written_as_the_last_second_and_still_rests)
{
        struct fixture a, b;
        struct keytable_key_state st = { .state = KEY_COOLING, .reason = KEY_REASON_RATE_LIMITED,
                                         .cooldown_until_ms = INT64_MAX / 2 };
        struct keytable_key_view v[N_KEYS];
        struct persist_report rep;
        char *doc;

        fixture_setup_at(&a, 1000);
        ck_assert_int_eq(keytable_restore_key(a.t, a.pool, 0, &st, 1000), 0);
        doc = persist_export(a.t, 1000, WALL0);
        ck_assert_ptr_nonnull(doc);
        ck_assert_ptr_nonnull(strstr(doc, "\"cooldown_until\":\"9999-12-31T23:59:59Z\""));
        fixture_setup_at(&b, 1000);
        /* Without a limit (0) it comes back whole; under max_cooldown it is cut to it. */
        ck_assert_int_eq(persist_import(b.t, doc, strlen(doc), 1000, WALL0, 0, &rep, NULL, 0), 0);
        snapshot(&b, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_int_gt(v[0].cooldown_until_ms, INT64_C(200000000000000));
        fixture_teardown(&b);
        fixture_setup_at(&b, 1000);
        ck_assert_int_eq(import(&b, doc, 1000, WALL0, &rep, NULL, 0), 0);
        snapshot(&b, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_int_eq(v[0].cooldown_until_ms, 1000 + MAX_COOLDOWN_MS);
        ck_assert_uint_eq(rep.capped, 1);
        free(doc);
        fixture_teardown(&a);
        fixture_teardown(&b);
}
END_TEST


/* --- imported state is held to the live limits ------------------------------------------------ */

START_TEST(test_an_imported_cooldown_longer_than_max_cooldown_is_cut_to_it)
{
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct persist_report rep;
        char doc[2048], err[256] = "";

        fixture_setup_at(&f, 1000);
        /* Thirty days of rest, where max_cooldown allows an hour; key 1 rests 10 minutes. */
        snprintf(doc, sizeof doc,
                 "{\"format\":\"keypool-state\",\"version\":1,\"keys\":["
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"cooling\",\"reason\":\"rate_limited\","
                 "\"cooldown_until\":\"2026-12-28T10:20:00Z\"},"
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",\"state\":\"cooling\",\"reason\":\"rate_limited\","
                 "\"cooldown_until\":\"2026-11-28T10:30:00Z\"}]}",
                 f.id[0], f.id[1]);
        ck_assert_msg(persist_import(f.t, doc, strlen(doc), 1000, WALL0, 3600000, &rep, err, sizeof err) == 0,
                      "refused: %s", err);
        ck_assert_uint_eq(rep.imported, 2);
        ck_assert_uint_eq(rep.capped, 1);
        ck_assert_msg(strstr(rep.problem, "cut to max_cooldown (3600 s)") && strstr(rep.problem, f.id[0]),
                      "problem: '%s'", rep.problem);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_COOLING);
        ck_assert_int_eq(v[0].cooldown_until_ms, 1000 + 3600000);
        ck_assert_int_eq(v[1].state, KEY_COOLING);
        ck_assert_int_eq(v[1].cooldown_until_ms, 1000 + 600000);
        fixture_teardown(&f);
}
END_TEST

static void expect_refused(const char *key_json, const char *needle) {
        struct fixture f;
        struct keytable_key_view v[N_KEYS];
        struct persist_report rep;
        char doc[2048], err[256] = "";

        fixture_setup_at(&f, 1000);
        snprintf(doc, sizeof doc, "{\"format\":\"keypool-state\",\"version\":1,\"keys\":["
                 "{\"pool\":\"openrouter\",\"id\":\"%s\",%s}]}", f.id[0], key_json);
        ck_assert_msg(import(&f, doc, 1000, WALL0, &rep, err, sizeof err) == 0, "refused: %s", err);
        ck_assert_msg(rep.imported == 0 && rep.ignored == 1 && rep.refused == 1,
                      "%s: imported %u, ignored %u, refused %u", key_json, rep.imported, rep.ignored,
                      rep.refused);
        ck_assert_msg(strstr(rep.problem, needle) && strstr(rep.problem, "keys[0]") &&
                      strstr(rep.problem, f.id[0]), "%s: problem '%s', expected '%s'", key_json,
                      rep.problem, needle);
        snapshot(&f, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_READY);
        ck_assert_uint_eq(v[0].requests, 0);
        fixture_teardown(&f);
}

START_TEST(test_counters_out_of_range_and_unknown_states_refuse_the_key_with_a_reason)
{
        expect_refused("\"state\":\"ready\",\"requests\":-1", "\"requests\" is not a whole number from 0 to 2^53");
        expect_refused("\"state\":\"ready\",\"successes\":1.5", "\"successes\" is not a whole number");
        expect_refused("\"state\":\"ready\",\"tokens_in\":9007199254740993", "\"tokens_in\" is not a whole number");
        expect_refused("\"state\":\"ready\",\"failures\":\"7\"", "\"failures\" is not a whole number");
        expect_refused("\"state\":\"ready\",\"last_status\":1000", "\"last_status\" is not an HTTP status");
        expect_refused("\"state\":\"sleeping\"", "\"state\" is not ready, cooling or disabled");
        expect_refused("\"requests\":3", "\"state\" is not ready, cooling or disabled");
        expect_refused("\"state\":\"disabled\",\"reason\":\"bored\"", "\"reason\" is not");
        expect_refused("\"state\":\"cooling\"", "\"cooldown_until\" is not a time");
}
END_TEST

/* --- files --------------------------------------------------------------------------------- */

static char *temp_dir(void) {
        char *dir = strdup("/tmp/check_persist.XXXXXX");

        ck_assert_ptr_nonnull(dir);
        ck_assert_ptr_nonnull(mkdtemp(dir));
        return dir;
}

static char *join(const char *dir, const char *name) {
        size_t n = strlen(dir) + strlen(name) + 2;
        char *p = malloc(n);

        ck_assert_ptr_nonnull(p);
        snprintf(p, n, "%s/%s", dir, name);
        return p;
}

/* Entries of dir other than . and .. */
static unsigned count_entries(const char *dir) {
        DIR *d = opendir(dir);
        struct dirent *e;
        unsigned n = 0;

        ck_assert_ptr_nonnull(d);
        while ((e = readdir(d)))
                if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
                        n++;
        closedir(d);
        return n;
}

START_TEST(test_save_never_writes_through_a_planted_temporary_symlink)
{
        static const char *const names[] = { "state.json.tmp", "state.json.new", "state.json~",
                                             ".state.json.tmp" };
        char *dir = temp_dir(), *path = join(dir, "state.json"), *victim = join(dir, "victim"), *text;
        size_t len;

        {
                FILE *f = fopen(victim, "w");

                ck_assert_ptr_nonnull(f);
                fputs("the victim's own content\n", f);
                ck_assert_int_eq(fclose(f), 0);
        }
        for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++) {
                char *link = join(dir, names[i]);

                ck_assert_int_eq(symlink(victim, link), 0);
                free(link);
        }

        ck_assert_int_eq(persist_save(path, "{\"saved\":1}\n"), 0);

        ck_assert_int_eq(persist_read(victim, &text, &len), 0);
        ck_assert_str_eq(text, "the victim's own content\n");
        free(text);
        ck_assert_int_eq(persist_read(path, &text, &len), 0);
        ck_assert_str_eq(text, "{\"saved\":1}\n");
        free(text);
        /* The victim, the links and the state file: no temporary left. */
        ck_assert_uint_eq(count_entries(dir), 2 + sizeof names / sizeof names[0]);

        for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++) {
                char *link = join(dir, names[i]);

                unlink(link);
                free(link);
        }
        unlink(victim);
        unlink(path);
        rmdir(dir);
        free(victim);
        free(path);
        free(dir);
}
END_TEST

START_TEST(test_a_save_that_fails_while_writing_leaves_no_temporary_and_the_old_file)
{
        char *dir = temp_dir(), *path = join(dir, "state.json"), *text, big[4096];
        struct rlimit small = { 1024, 1024 };
        size_t len;

        ck_assert_int_eq(persist_save(path, "{\"old\":1}"), 0);
        memset(big, 'x', sizeof big - 1);
        big[sizeof big - 1] = '\0';
        /* Past RLIMIT_FSIZE write(2) fails with EFBIG instead of killing the process. */
        signal(SIGXFSZ, SIG_IGN);
        ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &small), 0);
        ck_assert_int_eq(persist_save(path, big), -EFBIG);

        ck_assert_int_eq(persist_read(path, &text, &len), 0);
        ck_assert_str_eq(text, "{\"old\":1}");
        free(text);
        ck_assert_uint_eq(count_entries(dir), 1);
        unlink(path);
        rmdir(dir);
        free(path);
        free(dir);
}
END_TEST

START_TEST(test_save_replaces_the_file_whole_with_mode_0600_and_leaves_no_temporary)
{
        char *dir = temp_dir(), *path = join(dir, "state.json"), *tmp = join(dir, "state.json.tmp"),
             *text;
        struct stat st;
        size_t len;
        int fd;

        ck_assert_int_eq(persist_save(path, "{\"first\":1}\n"), 0);
        ck_assert_int_eq(persist_read(path, &text, &len), 0);
        ck_assert_str_eq(text, "{\"first\":1}\n");
        ck_assert_uint_eq(len, strlen("{\"first\":1}\n"));
        free(text);
        ck_assert_int_eq(stat(path, &st), 0);
        ck_assert_msg((st.st_mode & 07777) == 0600, "mode %o", st.st_mode & 07777);
        ck_assert_int_eq(access(tmp, F_OK), -1);

        /* A file under the old fixed temporary name, readable by all: never written through,
         * and the state is still 0600. */
        fd = open(tmp, O_CREAT | O_WRONLY, 0644);
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(write(fd, "junk junk junk junk junk junk", 29), 29);
        close(fd);
        chmod(tmp, 0644);
        ck_assert_int_eq(persist_save(path, "{\"second\":2}"), 0);
        ck_assert_int_eq(persist_read(path, &text, &len), 0);
        ck_assert_str_eq(text, "{\"second\":2}");
        free(text);
        ck_assert_int_eq(stat(path, &st), 0);
        ck_assert_msg((st.st_mode & 07777) == 0600, "mode %o after replacing", st.st_mode & 07777);
        ck_assert_int_eq(persist_read(tmp, &text, &len), 0);
        ck_assert_str_eq(text, "junk junk junk junk junk junk");
        free(text);
        ck_assert_uint_eq(count_entries(dir), 2);

        unlink(tmp);
        unlink(path);
        rmdir(dir);
        free(tmp);
        free(path);
        free(dir);
}
END_TEST

START_TEST(test_save_into_a_missing_directory_is_enoent_and_creates_nothing)
{
        char *dir = temp_dir(), *path = join(dir, "missing/state.json");

        ck_assert_int_eq(persist_save(path, "{}"), -ENOENT);
        ck_assert_int_eq(rmdir(dir), 0);
        free(path);
        free(dir);
}
END_TEST

START_TEST(test_read_of_a_missing_file_is_enoent_and_of_a_huge_one_efbig)
{
        char *dir = temp_dir(), *path = join(dir, "state.json"), *text = NULL;
        size_t len = 0;
        int fd;

        ck_assert_int_eq(persist_read(path, &text, &len), -ENOENT);
        ck_assert_ptr_null(text);

        fd = open(path, O_CREAT | O_WRONLY, 0600);
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(ftruncate(fd, (off_t) (64 << 20) + 1), 0);     /* sparse */
        close(fd);
        ck_assert_int_eq(persist_read(path, &text, &len), -EFBIG);
        ck_assert_ptr_null(text);

        /* An empty file reads as an empty document, which import then refuses. */
        fd = open(path, O_TRUNC | O_WRONLY);
        ck_assert_int_ge(fd, 0);
        close(fd);
        ck_assert_int_eq(persist_read(path, &text, &len), 0);
        ck_assert_uint_eq(len, 0);
        ck_assert_str_eq(text, "");
        free(text);

        /* Not regular files: refused at once, saying which kind of refusal. */
        ck_assert_int_eq(persist_read(dir, &text, &len), -EISDIR);
        unlink(path);
        ck_assert_int_eq(mkfifo(path, 0600), 0);
        ck_assert_int_eq(persist_read(path, &text, &len), -EBADFD);

        unlink(path);
        rmdir(dir);
        free(path);
        free(dir);
}
END_TEST

START_TEST(test_move_aside_renames_to_corrupt_and_the_unix_time)
{
        char *dir = temp_dir(), *path = join(dir, "state.json"), *aside = NULL, *want, *text;
        size_t len;

        ck_assert_int_eq(persist_save(path, "garbage"), 0);
        ck_assert_int_eq(persist_move_aside(path, WALL0 + 999, &aside), 0);
        want = join(dir, "state.json.corrupt-1795861200");
        ck_assert_str_eq(aside, want);
        ck_assert_int_eq(access(path, F_OK), -1);
        ck_assert_int_eq(persist_read(aside, &text, &len), 0);
        ck_assert_str_eq(text, "garbage");
        free(text);
        ck_assert_int_eq(persist_move_aside(path, WALL0, &text), -ENOENT);

        unlink(aside);
        rmdir(dir);
        free(want);
        free(aside);
        free(path);
        free(dir);
}
END_TEST

START_TEST(test_an_exported_document_saved_and_read_back_imports)
{
        char *dir = temp_dir(), *path = join(dir, "state.json"), *doc, *text;
        struct fixture a, b;
        struct keytable_key_view v[N_KEYS];
        struct persist_report rep;
        size_t len;

        fixture_setup_at(&a, 1000);
        scenario(&a);
        doc = persist_export(a.t, 11000, WALL0);
        ck_assert_ptr_nonnull(doc);
        ck_assert_int_eq(persist_save(path, doc), 0);
        ck_assert_int_eq(persist_read(path, &text, &len), 0);
        ck_assert_str_eq(text, doc);

        fixture_setup_at(&b, 1000);
        ck_assert_int_eq(persist_import(b.t, text, len, 1000, WALL0, MAX_COOLDOWN_MS, &rep, NULL, 0), 0);
        ck_assert_uint_eq(rep.imported, N_KEYS);
        snapshot(&b, 1000, v);
        ck_assert_int_eq(v[0].state, KEY_COOLING);

        unlink(path);
        rmdir(dir);
        free(text);
        free(doc);
        free(path);
        free(dir);
        fixture_teardown(&a);
        fixture_teardown(&b);
}
END_TEST

static Suite *persist_suite(void) {
        Suite *s = suite_create("persist");
        TCase *tc;

        tc = tcase_create("document");
        tcase_add_test(tc, test_a_cooling_key_is_still_cooling_after_a_restart_for_the_rest_of_its_time);
        tcase_add_test(tc, test_a_rest_that_ran_out_while_stopped_comes_back_ready);
        tcase_add_test(tc, test_the_document_holds_ids_and_never_a_secret_or_masked_form);
        tcase_add_test(tc, test_the_document_has_the_envelope_and_rfc3339_utc_times);
        tcase_add_test(tc, test_corrupt_foreign_and_other_version_documents_are_refused_with_a_reason);
        tcase_add_test(tc, test_unknown_and_broken_keys_are_ignored_and_counted);
        tcase_add_test(tc, test_a_number_jansson_cannot_hold_anywhere_refuses_the_document_as_before);
        tcase_add_test(tc, test_escaped_text_duplicates_and_odd_but_valid_fields_read_as_jansson_read_them);
        tcase_add_test(tc, test_keys_match_by_pool_and_id_else_by_id_alone);
        tcase_add_test(tc, test_times_are_read_as_rfc3339_and_impossible_dates_are_skipped);
        tcase_add_test(tc, test_a_rest_beyond_year_9999_is_written_as_the_last_second_and_still_rests);
        tcase_add_test(tc, test_an_imported_cooldown_longer_than_max_cooldown_is_cut_to_it);
        tcase_add_test(tc, test_counters_out_of_range_and_unknown_states_refuse_the_key_with_a_reason);
        suite_add_tcase(s, tc);

        tc = tcase_create("files");
        tcase_add_test(tc, test_save_replaces_the_file_whole_with_mode_0600_and_leaves_no_temporary);
        tcase_add_test(tc, test_save_into_a_missing_directory_is_enoent_and_creates_nothing);
        tcase_add_test(tc, test_save_never_writes_through_a_planted_temporary_symlink);
        tcase_add_test(tc, test_a_save_that_fails_while_writing_leaves_no_temporary_and_the_old_file);
        tcase_add_test(tc, test_read_of_a_missing_file_is_enoent_and_of_a_huge_one_efbig);
        tcase_add_test(tc, test_move_aside_renames_to_corrupt_and_the_unix_time);
        tcase_add_test(tc, test_an_exported_document_saved_and_read_back_imports);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        SRunner *sr = srunner_create(persist_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
