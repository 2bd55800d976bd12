/* fuzz_envfile.c — the deployment's env file (orche.env) parser.
 *
 * The text is parsed as envfile_load would read it; on success every entry must have a non-empty
 * name and a value, and envfile_get must give, for each name, its last assignment (abort()
 * otherwise).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/envfile.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct envfile e;
        unsigned err_line = 0;
        int r;

        r = envfile_parse((const char *) data, size, &e, &err_line);
        if (r < 0) {
                CHECK(r != -EINVAL || err_line >= 1);
                return 0;
        }
        for (size_t i = 0; i < e.n; i++) {
                const char *v;

                CHECK(e.entries[i].name && e.entries[i].name[0]);
                CHECK(e.entries[i].value);
                CHECK(e.entries[i].line >= 1);
                v = envfile_get(&e, e.entries[i].name);
                CHECK(v);
                /* A later assignment replaces an earlier one: no later entry has the name. */
                for (size_t j = i + 1; j < e.n; j++)
                        CHECK(strcmp(e.entries[i].name, e.entries[j].name) != 0);
                CHECK(v == e.entries[i].value);
        }
        envfile_free(&e);
        return 0;
}
