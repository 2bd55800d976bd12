/* fuzz_persist.c — importing a state document (the state file, `keypoolctl import`).
 *
 * A table like the daemon's (one pool of three fake keys, a claimed slot) takes the document
 * with persist_import. Whatever it did, the table must then export a document that imports again
 * without complaint (abort() otherwise): a state file keypool wrote must never be refused.
 * Set FUZZ_PERSIST_EXPORT=1 to print the fixture's export instead (how the seed was made).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/keyid.h"
#include "keypool/keytable.h"
#include "keypool/persist.h"
#include "fuzz.h"

/* The daemon's default max_cooldown (a day). */
#define MAX_COOLDOWN_MS (86400LL * 1000)

#define N_KEYS 3
#define MONO INT64_C(5000000)
/* 2026-11-28T10:20:00Z */
#define WALL INT64_C(1795861200000)

/* Small, as the unit tests' tables: the document's keys are what matter, not the table's size. */
static const struct keytable_limits limits = {
        .max_pools = 2, .max_keys = 8, .n_slots = 1, .leases_per_slot = 2, .history_size = 8,
};

static struct keytable *table_new(void) {
        struct keytable *t;
        unsigned pool, slot, key;

        CHECK(keytable_create(&limits, MONO, &t) == 0);
        CHECK(keytable_add_pool(t, "openrouter", "openai/gpt-4o-mini", &pool) == 0);
        for (unsigned i = 0; i < N_KEYS; i++) {
                char secret[64], id[KEYID_ID_LEN + 1], masked[KEYID_MASK_MAX + 1];

                /* Fake keys; only their ids and masked forms reach the table. */
                snprintf(secret, sizeof secret, "sk-or-v1-fake-fuzz-%040u", i + 1);
                CHECK(keyid_fingerprint(secret, strlen(secret), id) == 0);
                keyid_mask(secret, strlen(secret), masked);
                CHECK(keytable_add_key(t, pool, id, masked, &key) == 0);
        }
        CHECK(keytable_slot_claim(t, 1, MONO, &slot) == 0);
        return t;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct persist_report rep;
        struct keytable *t = table_new();
        char err[256], *doc;

        if (getenv("FUZZ_PERSIST_EXPORT")) {
                doc = persist_export(t, MONO, WALL);
                CHECK(doc);
                puts(doc);
                free(doc);
        }
        memset(err, 'x', sizeof err);
        if (persist_import(t, (const char *) data, size, MONO, WALL, MAX_COOLDOWN_MS, &rep, err, sizeof err) < 0)
                CHECK(memchr(err, 0, sizeof err));

        /* What the table holds now survives a save and a restart. */
        doc = persist_export(t, MONO + 1000, WALL + 1000);
        CHECK(doc);
        keytable_destroy(t);
        t = table_new();
        if (persist_import(t, doc, strlen(doc), MONO + 2000, WALL + 2000, MAX_COOLDOWN_MS, &rep, err, sizeof err) < 0) {
                fprintf(stderr, "own export refused: %s\n%s\n", err, doc);
                abort();
        }
        free(doc);
        keytable_destroy(t);
        return 0;
}
