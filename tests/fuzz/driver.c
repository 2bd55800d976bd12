/* driver.c — runs a fuzz harness over files, without libFuzzer (the way oss-fuzz's standalone
 * drivers and systemd's fuzz-main.c do), so that `make check` replays every corpus with the
 * normal compiler under the same ASan/UBSan build as the unit tests.
 *
 * Each argument is a file or a directory whose regular files are all run; with none, the corpus
 * the build named in FUZZ_DEFAULT_CORPUS. A harness reports a finding by crashing (abort or a
 * sanitizer), so reaching the end is the test passing.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

static int run_file(const char *path) {
        FILE *f = fopen(path, "re");
        uint8_t *buf = NULL;
        size_t len = 0, cap = 0;

        if (!f) {
                fprintf(stderr, "%s: %s\n", path, strerror(errno));
                return -1;
        }
        for (;;) {
                size_t n;

                if (cap - len < 4096) {
                        uint8_t *p = realloc(buf, cap ? cap * 2 : 4096);

                        if (!p) {
                                fclose(f);
                                free(buf);
                                return -1;
                        }
                        buf = p;
                        cap = cap ? cap * 2 : 4096;
                }
                n = fread(buf + len, 1, cap - len, f);
                len += n;
                if (n == 0)
                        break;
        }
        fclose(f);
        /* An exact-size copy, so that ASan sees a read past the input as the fuzzer would. */
        {
                uint8_t *exact = malloc(len ? len : 1);

                if (!exact) {
                        free(buf);
                        return -1;
                }
                memcpy(exact, buf, len);
                free(buf);
                printf("%s (%zu bytes)\n", path, len);
                fflush(stdout);
                LLVMFuzzerTestOneInput(exact, len);
                free(exact);
        }
        return 0;
}

static int run_path(const char *path, unsigned *n_run) {
        struct stat st;
        DIR *d;
        struct dirent *de;
        int r = 0;

        if (stat(path, &st) < 0) {
                fprintf(stderr, "%s: %s\n", path, strerror(errno));
                return -1;
        }
        if (!S_ISDIR(st.st_mode)) {
                if (run_file(path) < 0)
                        return -1;
                (*n_run)++;
                return 0;
        }
        d = opendir(path);
        if (!d) {
                fprintf(stderr, "%s: %s\n", path, strerror(errno));
                return -1;
        }
        while ((de = readdir(d))) {
                char *p;

                if (de->d_name[0] == '.')
                        continue;
                if (asprintf(&p, "%s/%s", path, de->d_name) < 0) {
                        r = -1;
                        break;
                }
                if (run_path(p, n_run) < 0)
                        r = -1;
                free(p);
        }
        closedir(d);
        return r;
}

int main(int argc, char **argv) {
        unsigned n_run = 0;
        int r = 0;

        if (argc < 2) {
#ifdef FUZZ_DEFAULT_CORPUS
                r = run_path(FUZZ_DEFAULT_CORPUS, &n_run);
#else
                fprintf(stderr, "usage: %s FILE|DIR...\n", argv[0]);
                return 2;
#endif
        }
        for (int i = 1; i < argc; i++)
                if (run_path(argv[i], &n_run) < 0)
                        r = -1;
        printf("%u inputs run\n", n_run);
        /* An empty corpus is a mistake in the build, not a pass. */
        return r < 0 || n_run == 0 ? 1 : 0;
}
