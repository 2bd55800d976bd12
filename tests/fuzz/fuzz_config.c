/* fuzz_config.c — loading keypool.conf.
 *
 * The input is written as keypool.conf into a private directory that also holds the example
 * deployment's orche.env (so env_file = "orche.env" leads somewhere real) and is loaded with
 * config_load, the daemon's one entry point for configuration; its result is freed, wiped and
 * its diagnostics cleared. On success the loaded configuration must hold what config_load
 * promises (abort() otherwise).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keypool/conf.h"
#include "fuzz.h"

/* A fake deployment, with the example's shape (the keys are obviously not real). */
static const char orche_env[] =
        "PROVIDER_GLM45_API_KEY=sk-or-v1-fake0000000000000000000000000000000000000000000000000001\n"
        "PROVIDER_GLM45_BACKUP_KEYS=\"sk-or-v1-fake0000000000000000000000000000000000000000000000000002\"\n"
        "export PROVIDER_GLM45_MODEL='z-ai/glm-4.5'\n";

/* libconfig's parser leaks the strings it was scanning on some syntax errors (a file holding
 * just "" loses them: corpus entry libconfig_leaks_a_lone_string). Not keypool's memory, and
 * nothing keypool can free: LeakSanitizer ignores what libconfig allocated, so that the fuzzer
 * goes on looking for leaks of keypool's own. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) {
        return "leak:libconfig.so\n";
}

static char dir[] = "/tmp/keypool-fuzz-config-XXXXXX";
static char conf_path[sizeof dir + 32];

static void write_file(const char *path, const void *data, size_t len) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

        CHECK(fd >= 0);
        CHECK(write(fd, data, len) == (ssize_t) len);
        close(fd);
}

static void cleanup(void) {
        char p[sizeof dir + 32];

        snprintf(p, sizeof p, "%s/orche.env", dir);
        unlink(p);
        unlink(conf_path);
        rmdir(dir);
}

static void setup(void) {
        char p[sizeof dir + 32];

        CHECK(mkdtemp(dir));
        snprintf(p, sizeof p, "%s/orche.env", dir);
        write_file(p, orche_env, sizeof orche_env - 1);
        snprintf(conf_path, sizeof conf_path, "%s/keypool.conf", dir);
        atexit(cleanup);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct config_diag diag = { 0 };
        struct config *c = NULL;
        int r;

        if (!conf_path[0])
                setup();
        write_file(conf_path, data, size);

        r = config_load(conf_path, &c, &diag);
        if (r == 0) {
                CHECK(c);
                CHECK(c->n_pools > 0);
                for (unsigned i = 0; i < c->n_pools; i++) {
                        const struct config_pool *pool = &c->pools[i];

                        CHECK(pool->name && pool->model && pool->n_keys > 0);
                        CHECK(pool->provider < c->n_providers);
                        CHECK(config_find_pool(c, pool->name, strlen(pool->name)) >= 0);
                        for (unsigned k = 0; k < pool->n_keys; k++)
                                CHECK(pool->keys[k].secret);
                }
                config_wipe_secrets(c);
                config_free(c);
        } else {
                CHECK(r == -EINVAL || r == -ENOMEM || r == -EIO);
                CHECK(r != -EINVAL || diag.n > 0);
        }
        config_diag_clear(&diag);
        return 0;
}
