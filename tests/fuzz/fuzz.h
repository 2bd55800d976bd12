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
