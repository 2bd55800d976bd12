/* fuzz.h — what every fuzz harness shares: libFuzzer's entry point and the way a harness reports
 * a broken promise (abort(), which libFuzzer and the standalone driver both count as a finding).
 */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) do {                                                                        \
                if (!(cond)) {                                                                  \
                        fprintf(stderr, "%s:%d: broken promise: %s\n", __FILE__, __LINE__, #cond); \
                        abort();                                                                \
                }                                                                               \
        } while (0)

#ifdef FUZZ_WANTS_SCRUB
#include <string.h>

#include "keypool/scrub.h"

/* Fake secrets of the shapes redaction once missed, for harnesses that keep upstream text:
 * whatever the input, none may survive in what keypool keeps or shows. */
static const char *const fuzz_secrets[] = {
        "sk-or-v1-fuzzfakefuzzfakefuzzfakefuzzfake0000",
        "letters.and.dots.only.fake.fuzz.key",
        "onlylowercaselettersfakefuzzkeyabcdefghij",
};

static inline const struct scrub *fuzz_scrubber(void) {
        static struct scrub *s;

        if (!s) {
                CHECK(scrub_new(&s) == 0);
                for (size_t i = 0; i < sizeof fuzz_secrets / sizeof fuzz_secrets[0]; i++)
                        CHECK(scrub_add(s, fuzz_secrets[i], strlen(fuzz_secrets[i])) == 0);
                CHECK(scrub_seal(s) == 0);
        }
        return s;
}

static inline void fuzz_check_scrubbed(const char *text) {
        for (size_t i = 0; i < sizeof fuzz_secrets / sizeof fuzz_secrets[0]; i++)
                CHECK(!strstr(text, fuzz_secrets[i]));
}
#endif
