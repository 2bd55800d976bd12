/* check_config.c — keypool.conf and orche.env become a validated config, or every problem in
 * them is reported with its file and line, and never with a secret. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* nftw */
#endif

#include <check.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keypool/config.h"
#include "keypool/keyid.h"

#ifndef TEST_SRCDIR
#error "TEST_SRCDIR must name the tests directory"
#endif

#define PROVIDERS "providers = ( { name = \"openrouter\"; base_url = \"https://openrouter.ai/api/v1\"; } );\n"
#define ONE_POOL  "pools = ( { name = \"P\"; model = \"m/p\"; keys = [ \"sk-test-fake-p1\" ]; } );\n"

static char dir[64];
static char conf_path[PATH_MAX];
static struct config *cfg;
static struct config_diag diag;

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
        return remove(path);
}

static void setup(void) {
        snprintf(dir, sizeof(dir), "/tmp/check_config.XXXXXX");
        ck_assert_ptr_nonnull(mkdtemp(dir));
        snprintf(conf_path, sizeof(conf_path), "%s/keypool.conf", dir);
        cfg = NULL;
        diag = (struct config_diag) {};
        unsetenv("CREDENTIALS_DIRECTORY");
}

static void teardown(void) {
        config_free(cfg);
        cfg = NULL;
        config_diag_clear(&diag);
        nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void write_file(const char *name, const char *text) {
        char path[PATH_MAX];
        FILE *f;

        snprintf(path, sizeof(path), "%s/%s", dir, name);
        f = fopen(path, "w");
        ck_assert_msg(f != NULL, "cannot create %s", path);
        fputs(text, f);
        ck_assert_int_eq(fclose(f), 0);
}

static int load(const char *text) {
        config_free(cfg);
        cfg = NULL;
        config_diag_clear(&diag);
        write_file("keypool.conf", text);
        return config_load(conf_path, &cfg, &diag);
}

static void dump_diag(void) {
        for (size_t i = 0; i < diag.n; i++)
                fprintf(stderr, "  diag: %s\n", diag.messages[i]);
}

static void load_ok(const char *text) {
        int r = load(text);

        if (r != 0)
                dump_diag();
        ck_assert_msg(r == 0, "config_load failed: %d (%zu messages)", r, diag.n);
        ck_assert_ptr_nonnull(cfg);
        ck_assert_uint_eq(diag.n, 0);
}

static void load_fails(const char *text) {
        int r = load(text);

        ck_assert_msg(r == -EINVAL, "config_load returned %d, expected -EINVAL", r);
        ck_assert_ptr_null(cfg);
        ck_assert_uint_gt(diag.n, 0);
}

/* Asserts a message "<dir>/<file>:<line>: …needle…" (line 0: "<dir>/<file>: …"). */
static void expect(const char *file, unsigned line, const char *needle) {
        char prefix[PATH_MAX + 32];

        if (line > 0)
                snprintf(prefix, sizeof(prefix), "%s/%s:%u: ", dir, file, line);
        else
                snprintf(prefix, sizeof(prefix), "%s/%s: ", dir, file);
        for (size_t i = 0; i < diag.n; i++)
                if (strncmp(diag.messages[i], prefix, strlen(prefix)) == 0 &&
                    strstr(diag.messages[i] + strlen(prefix), needle))
                        return;
        dump_diag();
        ck_abort_msg("no message \"%s…%s\"", prefix, needle);
}

static void expect_secret_absent(const char *secret) {
        for (size_t i = 0; i < diag.n; i++)
                ck_assert_msg(!strstr(diag.messages[i], secret), "a message shows a secret: %s",
                              diag.messages[i]);
}

static void expect_key(const struct config_key *k, const char *secret) {
        char id[KEYID_ID_LEN + 1], masked[KEYID_MASK_MAX + 1];

        ck_assert_str_eq(k->secret, secret);
        ck_assert_int_eq(keyid_fingerprint(secret, strlen(secret), id), 0);
        keyid_mask(secret, strlen(secret), masked);
        ck_assert_str_eq(k->id, id);
        ck_assert_str_eq(k->masked, masked);
}

/* --- valid configurations --------------------------------------------------------------------- */

START_TEST(test_full_config_sets_every_field)
{
        setenv("KP_TEST_BACKUP", "sk-test-fake-env-key", 1);
        write_file("k2", "sk-test-fake-file-key\n");
        load_ok("# every setting\n"
                "socket = \"/tmp/kp-test.sock\";\n"
                "socket_mode = \"0600\";\n"
                "workers = 3;\n"
                "recovery_time = 120;\n"
                "client_timeout = 30;\n"
                "connect_timeout = 5;\n"
                "upstream_timeout = 300;\n"
                "max_connections = 100;\n"
                "max_body = 4294967296L;\n"
                "max_header = 8192;\n"
                "providers = (\n"
                "  { name = \"openrouter\"; base_url = \"https://openrouter.ai/api/v1/\"; },\n"
                "  { name = \"local\"; base_url = \"http://127.0.0.1:8080/v1\"; }\n"
                ");\n"
                "pools = (\n"
                "  { name = \"GLM45\"; provider = \"openrouter\"; model = \"z-ai/glm-4.5\";\n"
                "    keys = [ \"sk-or-v1-fake0000000000000000000000000001\", \"env:KP_TEST_BACKUP\", \"file:k2\" ]; },\n"
                "  { name = \"LOCAL\"; provider = \"local\"; model = \"local/model\"; keys = [ \"sk-test-fake-local\" ]; }\n"
                ");\n");
        unsetenv("KP_TEST_BACKUP");

        ck_assert_str_eq(cfg->path, conf_path);
        ck_assert_str_eq(cfg->socket_path, "/tmp/kp-test.sock");
        ck_assert_uint_eq(cfg->socket_mode, 0600);
        ck_assert_uint_eq(cfg->workers, 3);
        ck_assert_uint_eq(cfg->recovery_time, 120);
        ck_assert_uint_eq(cfg->client_timeout, 30);
        ck_assert_uint_eq(cfg->connect_timeout, 5);
        ck_assert_uint_eq(cfg->upstream_timeout, 300);
        ck_assert_uint_eq(cfg->max_connections, 100);
        ck_assert_uint_eq(cfg->max_body, 4294967296ULL);
        ck_assert_uint_eq(cfg->max_header, 8192);
        ck_assert_ptr_null(cfg->env_file);

        ck_assert_uint_eq(cfg->n_providers, 2);
        ck_assert_str_eq(cfg->providers[0].name, "openrouter");
        ck_assert_str_eq(cfg->providers[0].base_url, "https://openrouter.ai/api/v1");
        ck_assert_str_eq(cfg->providers[1].base_url, "http://127.0.0.1:8080/v1");

        ck_assert_uint_eq(cfg->n_pools, 2);
        ck_assert_uint_eq(cfg->n_keys, 4);
        ck_assert_str_eq(cfg->pools[0].name, "GLM45");
        ck_assert_str_eq(cfg->pools[0].model, "z-ai/glm-4.5");
        ck_assert_uint_eq(cfg->pools[0].provider, 0);
        ck_assert_uint_eq(cfg->pools[0].n_keys, 3);
        expect_key(&cfg->pools[0].keys[0], "sk-or-v1-fake0000000000000000000000000001");
        expect_key(&cfg->pools[0].keys[1], "sk-test-fake-env-key");
        expect_key(&cfg->pools[0].keys[2], "sk-test-fake-file-key");
        ck_assert_str_eq(cfg->pools[0].keys[0].masked, "sk-or-v1-fake00...001");
        ck_assert_str_eq(cfg->pools[1].name, "LOCAL");
        ck_assert_uint_eq(cfg->pools[1].provider, 1);
        ck_assert_uint_eq(cfg->pools[1].n_keys, 1);
}
END_TEST

START_TEST(test_defaults_apply_to_settings_left_out)
{
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);

        load_ok(PROVIDERS ONE_POOL);

        ck_assert_str_eq(cfg->socket_path, CONFIG_DEFAULT_SOCKET);
        ck_assert_str_eq(cfg->socket_path, "/run/keypool/keypool.sock");
        ck_assert_uint_eq(cfg->socket_mode, 0660);
        ck_assert_uint_eq(cfg->workers, cpus < 1 ? 1 : cpus > 64 ? 64 : (unsigned) cpus);
        ck_assert_uint_eq(cfg->recovery_time, 900);
        ck_assert_uint_eq(cfg->client_timeout, 60);
        ck_assert_uint_eq(cfg->connect_timeout, 10);
        ck_assert_uint_eq(cfg->upstream_timeout, 600);
        ck_assert_uint_eq(cfg->max_connections, 8192);
        ck_assert_uint_eq(cfg->max_body, 16 * 1024 * 1024);
        ck_assert_uint_eq(cfg->max_header, 16 * 1024);
        ck_assert_ptr_null(cfg->env_file);
        /* A pool without provider takes the first one. */
        ck_assert_uint_eq(cfg->pools[0].provider, 0);
        ck_assert_uint_eq(cfg->n_keys, 1);
}
END_TEST

START_TEST(test_socket_mode_takes_octal_strings_and_chmod_style_integers)
{
        load_ok("socket_mode = \"0640\";\n" PROVIDERS ONE_POOL);
        ck_assert_uint_eq(cfg->socket_mode, 0640);
        load_ok("socket_mode = \"600\";\n" PROVIDERS ONE_POOL);
        ck_assert_uint_eq(cfg->socket_mode, 0600);
        /* libconfig has no octal literals: 660 is read the way chmod reads it. */
        load_ok("socket_mode = 660;\n" PROVIDERS ONE_POOL);
        ck_assert_uint_eq(cfg->socket_mode, 0660);
        load_ok("socket_mode = 0x1a4;\n" PROVIDERS ONE_POOL);
        ck_assert_uint_eq(cfg->socket_mode, 0644);

        load_fails("socket_mode = \"0980\";\n" PROVIDERS ONE_POOL);
        expect("keypool.conf", 1, "socket_mode '0980' is not an octal mode");
        load_fails("socket_mode = 688;\n" PROVIDERS ONE_POOL);
        expect("keypool.conf", 1, "socket_mode 688 is not a mode");
        load_fails(PROVIDERS "socket_mode = \"01777\";\n" ONE_POOL);
        expect("keypool.conf", 2, "socket_mode '01777'");
        load_fails(PROVIDERS ONE_POOL "socket_mode = 1.5;\n");
        expect("keypool.conf", 3, "socket_mode must be an octal string");
}
END_TEST

START_TEST(test_relative_paths_are_relative_to_the_config_directory)
{
        write_file("orche.env", "PROVIDER_E_API_KEY=sk-test-fake-e\nPROVIDER_E_MODEL=m/e\n");
        write_file("key", "sk-test-fake-relative\n");
        load_ok(PROVIDERS "env_file = \"orche.env\";\n"
                "pools = ( { name = \"P\"; model = \"m\"; keys = [ \"file:key\" ]; } );\n");

        ck_assert_str_eq(cfg->pools[0].keys[0].secret, "sk-test-fake-relative");
        ck_assert_uint_eq(cfg->n_pools, 2);
        ck_assert_ptr_nonnull(cfg->env_file);
        ck_assert_ptr_nonnull(strstr(cfg->env_file, dir));
}
END_TEST

/* --- parse errors ------------------------------------------------------------------------------ */

START_TEST(test_syntax_error_is_reported_with_file_line_and_libconfig_text)
{
        load_fails(PROVIDERS "workers = 2\nrecovery_time = ;\n" ONE_POOL);
        expect("keypool.conf", 3, "syntax error");
        ck_assert_uint_eq(diag.n, 1);
}
END_TEST

START_TEST(test_duplicate_setting_is_a_parse_error)
{
        load_fails(PROVIDERS "workers = 2;\nworkers = 3;\n" ONE_POOL);
        expect("keypool.conf", 3, "duplicate setting name");
}
END_TEST

START_TEST(test_missing_config_file_is_reported_with_its_errno)
{
        char path[PATH_MAX];

        snprintf(path, sizeof(path), "%s/nope.conf", dir);
        ck_assert_int_eq(config_load(path, &cfg, &diag), -ENOENT);
        ck_assert_ptr_null(cfg);
        ck_assert_uint_eq(diag.n, 1);
        expect("nope.conf", 0, "No such file or directory");
}
END_TEST

/* --- checks ------------------------------------------------------------------------------------ */

START_TEST(test_wrong_types_are_reported_at_their_lines)
{
        load_fails(PROVIDERS
                   "socket = 5;\n"
                   "workers = \"2\";\n"
                   "max_header = 2048.0;\n"
                   "env_file = true;\n"
                   "pools = { name = \"P\"; };\n");
        expect("keypool.conf", 2, "socket must be a string, not an integer");
        expect("keypool.conf", 3, "workers must be an integer, not a string");
        expect("keypool.conf", 4, "max_header must be an integer, not a float");
        expect("keypool.conf", 5, "env_file must be a string, not a boolean");
        expect("keypool.conf", 6, "pools must be a list of groups");
}
END_TEST

START_TEST(test_numbers_out_of_range_are_reported)
{
        load_fails(PROVIDERS ONE_POOL
                   "workers = 65;\n"
                   "recovery_time = 604801;\n"
                   "client_timeout = 0;\n"
                   "connect_timeout = -1;\n"
                   "upstream_timeout = 0;\n"
                   "max_connections = 1048577;\n"
                   "max_body = 1023;\n"
                   "max_header = 1048577;\n");
        expect("keypool.conf", 3, "workers must be between 1 and 64, not 65");
        expect("keypool.conf", 4, "recovery_time must be between 1 and 604800");
        expect("keypool.conf", 5, "client_timeout must be");
        expect("keypool.conf", 6, "connect_timeout must be");
        expect("keypool.conf", 7, "upstream_timeout must be");
        expect("keypool.conf", 8, "max_connections must be between 1 and 1048576");
        expect("keypool.conf", 9, "max_body must be at least 1024, not 1023");
        expect("keypool.conf", 10, "max_header must be between 1024 and 1048576");
        ck_assert_uint_eq(diag.n, 8);

        load_fails(PROVIDERS ONE_POOL "workers = 0;\nmax_header = 1023;\n");
        expect("keypool.conf", 3, "workers must be between 1 and 64, not 0");
        expect("keypool.conf", 4, "max_header must be between 1024");

        load_ok(PROVIDERS ONE_POOL "workers = 64;\nrecovery_time = 604800;\nmax_connections = 1048576;\n"
                "max_body = 1024;\nmax_header = 1048576;\nclient_timeout = 1;\n");
}
END_TEST

START_TEST(test_unknown_settings_are_reported_with_a_suggestion)
{
        load_fails(PROVIDERS
                   "worker = 2;\n"
                   "pools = ( { name = \"P\"; modle = \"m\"; model = \"m\"; keys = [ \"sk-test-fake-1\" ]; } );\n"
                   "colour = \"blue\";\n");
        expect("keypool.conf", 2, "unknown setting 'worker' (did you mean 'workers'?)");
        expect("keypool.conf", 3, "pool 'P': unknown setting 'modle' (did you mean 'model'?)");
        expect("keypool.conf", 4, "unknown setting 'colour'");

        load_fails("providers = ( { name = \"o\"; baseurl = \"https://x\"; } );\n" ONE_POOL);
        expect("keypool.conf", 1, "provider 'o': unknown setting 'baseurl' (did you mean 'base_url'?)");
        expect("keypool.conf", 1, "provider 'o' has no base_url");
}
END_TEST

START_TEST(test_provider_problems_are_reported)
{
        load_fails("providers = (\n"
                   "  { name = \"a\"; base_url = \"https://a.example/v1\"; },\n"
                   "  { name = \"a\"; base_url = \"https://b.example/v1\"; },\n"
                   "  { base_url = \"https://c.example/v1\"; },\n"
                   "  { name = \"d\"; },\n"
                   "  { name = \"e\"; base_url = \"ftp://e.example\"; },\n"
                   "  { name = \"f g\"; base_url = \"https://f.example\"; },\n"
                   "  { name = \"h\"; base_url = \"https:///v1\"; }\n"
                   ");\n" ONE_POOL);
        expect("keypool.conf", 3, "provider 'a' is already defined at");
        expect("keypool.conf", 4, "provider #3 has no name");
        expect("keypool.conf", 5, "provider 'd' has no base_url");
        expect("keypool.conf", 6, "must start with http:// or https://");
        expect("keypool.conf", 7, "name 'f g' must be 1 to 63");
        expect("keypool.conf", 8, "has no host");
        ck_assert_uint_eq(diag.n, 6);
}
END_TEST

START_TEST(test_at_least_one_provider_is_required)
{
        load_fails(ONE_POOL);
        expect("keypool.conf", 0, "no providers defined");
        ck_assert_uint_eq(diag.n, 1);

        load_fails(ONE_POOL "providers = ();\n");
        expect("keypool.conf", 2, "at least one provider is required");
}
END_TEST

START_TEST(test_pool_problems_are_reported)
{
        load_fails(PROVIDERS
                   "pools = (\n"
                   "  { name = \"ok\"; model = \"m/ok\"; keys = [ \"sk-test-fake-1\" ]; },\n"
                   "  { name = \"ok\"; model = \"m/dup\"; keys = [ \"sk-test-fake-2\" ]; },\n"
                   "  { name = \"bad/name\"; model = \"m\"; keys = [ \"sk-test-fake-3\" ]; },\n"
                   "  { name = \"nomodel\"; keys = [ \"sk-test-fake-4\" ]; },\n"
                   "  { name = \"badprov\"; provider = \"nope\"; model = \"m\"; keys = [ \"sk-test-fake-5\" ]; },\n"
                   "  { name = \"nokeys\"; model = \"m\"; },\n"
                   "  { name = \"emptykeys\"; model = \"m\"; keys = [ ]; },\n"
                   "  { name = \"intkey\"; model = \"m\"; keys = [ 5 ]; },\n"
                   "  { name = \"strkeys\"; model = \"m\"; keys = \"sk-test-fake-6\"; },\n"
                   "  { model = \"m\"; keys = [ \"sk-test-fake-7\" ]; },\n"
                   "  { name = \"spacemodel\"; model = \"m x\"; keys = [ \"sk-test-fake-8\" ]; }\n"
                   ");\n");
        expect("keypool.conf", 4, "pool 'ok' is already defined at");
        expect("keypool.conf", 5, "name 'bad/name' must be 1 to 63");
        expect("keypool.conf", 6, "pool 'nomodel' has no model");
        expect("keypool.conf", 7, "pool 'badprov': unknown provider 'nope'");
        expect("keypool.conf", 8, "pool 'nokeys' has no keys");
        expect("keypool.conf", 9, "pool 'emptykeys': keys is empty");
        expect("keypool.conf", 10, "pool 'intkey' key 1 must be a string, not an integer");
        expect("keypool.conf", 11, "pool 'strkeys': keys must be a list of strings");
        expect("keypool.conf", 12, "pool #10 has no name");
        expect("keypool.conf", 13, "pool 'spacemodel': model must not contain whitespace");
        ck_assert_uint_eq(diag.n, 10);
}
END_TEST

START_TEST(test_name_and_model_length_limits)
{
        char text[1024];
        char name63[64], name64[65], model127[128], model128[129];

        memset(name63, 'n', 63);
        name63[63] = '\0';
        memset(name64, 'n', 64);
        name64[64] = '\0';
        memset(model127, 'm', 127);
        model127[127] = '\0';
        memset(model128, 'm', 128);
        model128[128] = '\0';

        snprintf(text, sizeof(text), PROVIDERS "pools = ( { name = \"%s\"; model = \"%s\"; keys = [ \"sk-test-fake-1\" ]; } );\n",
                 name63, model127);
        load_ok(text);
        ck_assert_str_eq(cfg->pools[0].name, name63);

        snprintf(text, sizeof(text), PROVIDERS "pools = (\n { name = \"%s\"; model = \"%s\"; keys = [ \"sk-test-fake-1\" ]; } );\n",
                 name64, model128);
        load_fails(text);
        expect("keypool.conf", 3, "must be 1 to 63");
        expect("keypool.conf", 3, "model must be 1 to 127 characters");
}
END_TEST

START_TEST(test_every_problem_is_reported_in_one_pass_in_file_order)
{
        load_fails("workers = 0;\n"
                   PROVIDERS
                   "pools = ( { name = \"P\"; keys = [ \"sk-test-fake-1\" ]; } );\n"
                   "bogus = 1;\n"
                   "max_body = 5;\n");
        ck_assert_uint_eq(diag.n, 4);
        expect("keypool.conf", 1, "workers");
        expect("keypool.conf", 3, "has no model");
        expect("keypool.conf", 4, "unknown setting 'bogus'");
        expect("keypool.conf", 5, "max_body");
        ck_assert_ptr_nonnull(strstr(diag.messages[0], ":1: "));
        ck_assert_ptr_nonnull(strstr(diag.messages[1], ":3: "));
        ck_assert_ptr_nonnull(strstr(diag.messages[2], ":4: "));
        ck_assert_ptr_nonnull(strstr(diag.messages[3], ":5: "));
}
END_TEST

START_TEST(test_no_pools_at_all_is_an_error)
{
        load_fails(PROVIDERS);
        expect("keypool.conf", 0, "no pools defined");

        write_file("orche.env", "# nothing here\nOTHER=1\n");
        load_fails(PROVIDERS "env_file = \"orche.env\";\npools = ();\n");
        expect("keypool.conf", 0, "no pools defined");
}
END_TEST

START_TEST(test_diag_may_be_null)
{
        write_file("keypool.conf", "workers = 0;\n");
        ck_assert_int_eq(config_load(conf_path, &cfg, NULL), -EINVAL);
        ck_assert_ptr_null(cfg);
}
END_TEST

/* --- keys -------------------------------------------------------------------------------------- */

START_TEST(test_same_key_twice_in_a_pool_names_both_positions)
{
        load_fails(PROVIDERS
                   "pools = ( { name = \"P\"; model = \"m\";\n"
                   "  keys = [ \"sk-test-fake-dup\",\n"
                   "           \"sk-test-fake-other\",\n"
                   "           \"sk-test-fake-dup\" ]; } );\n");
        expect("keypool.conf", 5, "pool 'P' key 3: the same key as key 1");
        expect_secret_absent("sk-test-fake-dup");
        ck_assert_uint_eq(diag.n, 1);

        /* Across pools it is allowed. */
        load_ok(PROVIDERS
                "pools = ( { name = \"P\"; model = \"m\"; keys = [ \"sk-test-fake-dup\" ]; },\n"
                "          { name = \"Q\"; model = \"n\"; keys = [ \"sk-test-fake-dup\" ]; } );\n");
        ck_assert_str_eq(cfg->pools[0].keys[0].id, cfg->pools[1].keys[0].id);
}
END_TEST

START_TEST(test_env_references_resolve_and_report_unset_variables)
{
        setenv("KP_TEST_KEY", "sk-test-fake-from-env", 1);
        unsetenv("GLM45_BACKUP");
        setenv("KP_TEST_EMPTY", "", 1);
        load_fails(PROVIDERS
                   "pools = ( { name = \"GLM45\"; model = \"m\";\n"
                   "  keys = [ \"env:KP_TEST_KEY\",\n"
                   "           \"env:GLM45_BACKUP\",\n"
                   "           \"env:KP_TEST_EMPTY\",\n"
                   "           \"env:\" ]; } );\n");
        expect("keypool.conf", 4, "pool 'GLM45' key 2: environment variable GLM45_BACKUP is not set");
        expect("keypool.conf", 5, "pool 'GLM45' key 3: environment variable KP_TEST_EMPTY is empty");
        expect("keypool.conf", 6, "pool 'GLM45' key 4: env: needs a variable name");
        ck_assert_uint_eq(diag.n, 3);
        expect_secret_absent("sk-test-fake-from-env");

        load_ok(PROVIDERS "pools = ( { name = \"GLM45\"; model = \"m\"; keys = [ \"env:KP_TEST_KEY\" ]; } );\n");
        expect_key(&cfg->pools[0].keys[0], "sk-test-fake-from-env");
        unsetenv("KP_TEST_KEY");
        unsetenv("KP_TEST_EMPTY");
}
END_TEST

START_TEST(test_file_references_read_the_first_line_only)
{
        char text[1024];

        write_file("crlf", "sk-test-fake-crlf\r\nsecond line\n");
        write_file("noeol", "sk-test-fake-noeol");
        snprintf(text, sizeof(text), PROVIDERS
                 "pools = ( { name = \"P\"; model = \"m\"; keys = [ \"file:crlf\", \"file:%s/noeol\" ]; } );\n", dir);
        load_ok(text);
        expect_key(&cfg->pools[0].keys[0], "sk-test-fake-crlf");
        expect_key(&cfg->pools[0].keys[1], "sk-test-fake-noeol");
}
END_TEST

START_TEST(test_file_reference_failures_name_the_file_not_the_key)
{
        write_file("empty", "");
        write_file("blank-first", "\nsk-test-fake-on-line-two\n");
        write_file("spaced", "sk-test-fake spaced\n");
        load_fails(PROVIDERS
                   "pools = ( { name = \"P\"; model = \"m\";\n"
                   "  keys = [ \"file:missing\",\n"
                   "           \"file:empty\",\n"
                   "           \"file:blank-first\",\n"
                   "           \"file:spaced\" ]; } );\n");
        expect("keypool.conf", 3, "pool 'P' key 1: file ");
        expect("keypool.conf", 3, "missing: No such file or directory");
        expect("keypool.conf", 4, "pool 'P' key 2: file ");
        expect("keypool.conf", 4, "is empty");
        expect("keypool.conf", 5, "pool 'P' key 3: file ");
        expect("keypool.conf", 6, "pool 'P' key 4: file ");
        expect("keypool.conf", 6, "contains whitespace or control characters");
        ck_assert_uint_eq(diag.n, 4);
        expect_secret_absent("sk-test-fake");
}
END_TEST

START_TEST(test_cred_references_read_from_the_credentials_directory)
{
        char creds[PATH_MAX];

        snprintf(creds, sizeof(creds), "%s/creds", dir);
        ck_assert_int_eq(mkdir(creds, 0700), 0);
        write_file("creds/glm45-primary", "sk-test-fake-credential\n");

        load_fails(PROVIDERS "pools = ( { name = \"GLM45\"; model = \"m\"; keys = [ \"cred:glm45-primary\" ]; } );\n");
        expect("keypool.conf", 2, "pool 'GLM45' key 1: credential glm45-primary: CREDENTIALS_DIRECTORY is not set");

        setenv("CREDENTIALS_DIRECTORY", creds, 1);
        load_ok(PROVIDERS "pools = ( { name = \"GLM45\"; model = \"m\"; keys = [ \"cred:glm45-primary\" ]; } );\n");
        expect_key(&cfg->pools[0].keys[0], "sk-test-fake-credential");

        load_fails(PROVIDERS "pools = ( { name = \"GLM45\"; model = \"m\";\n"
                   "  keys = [ \"cred:absent\", \"cred:../glm45-primary\" ]; } );\n");
        expect("keypool.conf", 3, "pool 'GLM45' key 1: credential absent: No such file or directory");
        expect("keypool.conf", 3, "pool 'GLM45' key 2: credential name '../glm45-primary' is not a plain file name");
        unsetenv("CREDENTIALS_DIRECTORY");
}
END_TEST

START_TEST(test_no_message_ever_contains_a_secret)
{
        char text[2048];

        setenv("KP_TEST_BAD", "sk-test-fake-SECRET-env\twith-tab", 1);
        write_file("bad", "sk-test-fake-SECRET-file with space\n");
        write_file("orche.env",
                   "PROVIDER_E_API_KEY=\"sk-test-fake-SECRET-envfile with space\"\n"
                   "PROVIDER_E_BACKUP_KEYS=\"sk-test-fake-SECRET-b1, sk-test-fake-SECRET-b1,sk-test-fake-SECRET b2\"\n"
                   "PROVIDER_E_MODEL=m\n");
        snprintf(text, sizeof(text), PROVIDERS "env_file = \"orche.env\";\n"
                 "pools = ( { name = \"P\"; model = \"m\"; keys = [\n"
                 "  \"sk-test-fake-SECRET-literal with space\",\n"
                 "  \"sk-test-fake-SECRET-dup\", \"sk-test-fake-SECRET-dup\",\n"
                 "  \"env:KP_TEST_BAD\", \"file:bad\",\n"
                 "  \"sk-test-fake-SECRET-\\u00e9\" ]; } );\n");
        load_fails(text);
        unsetenv("KP_TEST_BAD");
        ck_assert_uint_ge(diag.n, 7);
        expect_secret_absent("SECRET");
        expect("orche.env", 1, "pool 'E' key 1: PROVIDER_E_API_KEY contains whitespace");
        expect("orche.env", 2, "pool 'E' key 3: the same key as key 2");
        expect("orche.env", 2, "pool 'E' key 4 (in PROVIDER_E_BACKUP_KEYS)");
}
END_TEST

/* --- the env file ------------------------------------------------------------------------------ */

START_TEST(test_env_file_pools_follow_the_config_pools)
{
        write_file("orche.env",
                   "# deployed\n"
                   "PROVIDER_GLM45_API_KEY=sk-or-v1-fake-glm-1\n"
                   "PROVIDER_GLM45_BACKUP_KEYS=\" sk-or-v1-fake-glm-2 ,, sk-or-v1-fake-glm-3,\"\n"
                   "export PROVIDER_GLM45_MODEL='z-ai/glm-4.5'\n"
                   "PROVIDER_KIMI_API_KEY=env:NOT_A_REFERENCE\n"
                   "PROVIDER_KIMI_MODEL=moonshotai/kimi-k2\n"
                   "UNRELATED=1\n");
        load_ok(PROVIDERS ONE_POOL "env_file = \"orche.env\";\n");

        ck_assert_uint_eq(cfg->n_pools, 3);
        ck_assert_uint_eq(cfg->n_keys, 5);
        ck_assert_str_eq(cfg->pools[0].name, "P");
        ck_assert_str_eq(cfg->pools[1].name, "GLM45");
        ck_assert_str_eq(cfg->pools[1].model, "z-ai/glm-4.5");
        ck_assert_uint_eq(cfg->pools[1].provider, 0);
        ck_assert_uint_eq(cfg->pools[1].n_keys, 3);
        expect_key(&cfg->pools[1].keys[0], "sk-or-v1-fake-glm-1");
        expect_key(&cfg->pools[1].keys[1], "sk-or-v1-fake-glm-2");
        expect_key(&cfg->pools[1].keys[2], "sk-or-v1-fake-glm-3");
        /* Values in the env file are taken literally. */
        ck_assert_str_eq(cfg->pools[2].name, "KIMI");
        ck_assert_str_eq(cfg->pools[2].keys[0].secret, "env:NOT_A_REFERENCE");
        ck_assert_uint_eq(cfg->n_providers, 1);
}
END_TEST

START_TEST(test_env_file_base_url_picks_a_provider_or_adds_one)
{
        write_file("orche.env",
                   "PROVIDER_A_API_KEY=sk-test-fake-a\n"
                   "PROVIDER_A_MODEL=m/a\n"
                   "PROVIDER_A_BASE_URL=http://127.0.0.1:8080/v1/\n"
                   "PROVIDER_NEW_API_KEY=sk-test-fake-new\n"
                   "PROVIDER_NEW_MODEL=m/new\n"
                   "PROVIDER_NEW_BASE_URL=https://api.example.test/v1\n"
                   "PROVIDER_NEW2_API_KEY=sk-test-fake-new2\n"
                   "PROVIDER_NEW2_MODEL=m/new2\n"
                   "PROVIDER_NEW2_BASE_URL=https://api.example.test/v1/\n"
                   "PROVIDER_DEF_API_KEY=sk-test-fake-def\n"
                   "PROVIDER_DEF_MODEL=m/def\n");
        load_ok("providers = ( { name = \"openrouter\"; base_url = \"https://openrouter.ai/api/v1\"; },\n"
                "              { name = \"local\"; base_url = \"http://127.0.0.1:8080/v1\"; } );\n"
                "env_file = \"orche.env\";\n");

        ck_assert_uint_eq(cfg->n_pools, 4);
        ck_assert_uint_eq(cfg->n_providers, 3);
        ck_assert_str_eq(cfg->pools[0].name, "A");
        ck_assert_str_eq(cfg->providers[cfg->pools[0].provider].name, "local");
        ck_assert_str_eq(cfg->pools[1].name, "NEW");
        ck_assert_str_eq(cfg->providers[cfg->pools[1].provider].name, "new");
        ck_assert_str_eq(cfg->providers[cfg->pools[1].provider].base_url, "https://api.example.test/v1");
        ck_assert_uint_eq(cfg->pools[2].provider, cfg->pools[1].provider);
        ck_assert_str_eq(cfg->pools[3].name, "DEF");
        ck_assert_uint_eq(cfg->pools[3].provider, 0);
}
END_TEST

START_TEST(test_env_file_problems_cite_the_env_file_and_line)
{
        write_file("orche.env",
                   "PROVIDER_P_API_KEY=sk-test-fake-clash\n"
                   "PROVIDER_P_MODEL=m\n"
                   "\n"
                   "PROVIDER_NOMODEL_API_KEY=sk-test-fake-nomodel\n"
                   "PROVIDER_URL_API_KEY=sk-test-fake-url\n"
                   "PROVIDER_URL_MODEL=m\n"
                   "PROVIDER_URL_BASE_URL=ftp://x\n"
                   "PROVIDER_ORPHAN_BACKUP_KEYS=sk-test-fake-orphan\n"
                   "PROVIDER_EMPTY_API_KEY=\n"
                   "PROVIDER_EMPTY_MODEL=m\n");
        load_fails(PROVIDERS ONE_POOL "env_file = \"orche.env\";\n");
        expect("orche.env", 1, "pool 'P' is already defined at");
        expect("orche.env", 4, "pool 'NOMODEL': PROVIDER_NOMODEL_MODEL is not set");
        expect("orche.env", 7, "PROVIDER_URL_BASE_URL must start with http:// or https://");
        expect("orche.env", 8, "PROVIDER_ORPHAN_BACKUP_KEYS is set but PROVIDER_ORPHAN_API_KEY is not");
        expect("orche.env", 9, "pool 'EMPTY' key 1: PROVIDER_EMPTY_API_KEY is empty");
        ck_assert_uint_eq(diag.n, 5);
        expect_secret_absent("sk-test-fake");
}
END_TEST

START_TEST(test_env_file_syntax_error_and_absence_are_reported)
{
        write_file("orche.env", "PROVIDER_X_API_KEY=sk-test-fake-x\nPROVIDER_X_MODEL=\"open\n");
        load_fails(PROVIDERS ONE_POOL "env_file = \"orche.env\";\n");
        expect("orche.env", 2, "syntax error");

        load_fails(PROVIDERS ONE_POOL "env_file = \"absent.env\";\n");
        expect("keypool.conf", 3, "absent.env: No such file or directory");
}
END_TEST

START_TEST(test_env_file_alone_may_define_every_pool)
{
        write_file("orche.env", "PROVIDER_ONLY_API_KEY=sk-test-fake-only\nPROVIDER_ONLY_MODEL=m/only\n");
        load_ok(PROVIDERS "env_file = \"orche.env\";\n");
        ck_assert_uint_eq(cfg->n_pools, 1);
        ck_assert_str_eq(cfg->pools[0].name, "ONLY");
}
END_TEST

START_TEST(test_shipped_examples_load_with_the_six_deployed_pools)
{
        static const struct {
                const char *name, *model;
        } want[] = {
                { "GLM45", "z-ai/glm-4.5" },
                { "GPTOSS", "openai/gpt-oss-120b" },
                { "LLAMA3", "meta-llama/llama-4-maverick" },
                { "KIMI", "moonshotai/kimi-k2" },
                { "QWEN3", "qwen/qwen3-235b-a22b" },
                { "FALCON", "tngtech/deepseek-r1t2-chimera" },
        };
        const char *path = TEST_SRCDIR "/../etc/keypool.conf";
        unsigned keys = 0;
        int r;

        r = config_load(path, &cfg, &diag);
        if (r != 0)
                dump_diag();
        ck_assert_int_eq(r, 0);
        ck_assert_uint_eq(cfg->n_providers, 1);
        ck_assert_str_eq(cfg->providers[0].name, "openrouter");
        ck_assert_str_eq(cfg->providers[0].base_url, "https://openrouter.ai/api/v1");
        ck_assert_uint_eq(cfg->n_pools, 6);
        for (unsigned i = 0; i < 6; i++) {
                const struct config_pool *p = &cfg->pools[i];

                ck_assert_str_eq(p->name, want[i].name);
                ck_assert_str_eq(p->model, want[i].model);
                ck_assert_uint_eq(p->provider, 0);
                ck_assert_msg(p->n_keys >= 2 && p->n_keys <= 3, "pool %s has %u keys", p->name, p->n_keys);
                for (unsigned k = 0; k < p->n_keys; k++)
                        ck_assert_ptr_nonnull(strstr(p->keys[k].secret, "fake"));
                keys += p->n_keys;
                ck_assert_int_eq(config_find_pool(cfg, want[i].name, strlen(want[i].name)), (int) i);
                ck_assert_int_eq(config_find_pool(cfg, want[i].model, strlen(want[i].model)), (int) i);
        }
        ck_assert_uint_eq(cfg->n_keys, keys);
}
END_TEST

/* --- lookups ----------------------------------------------------------------------------------- */

START_TEST(test_find_pool_matches_names_before_model_ids)
{
        load_ok(PROVIDERS
                "pools = ( { name = \"first\"; model = \"second\"; keys = [ \"sk-test-fake-1\" ]; },\n"
                "          { name = \"second\"; model = \"vendor/model\"; keys = [ \"sk-test-fake-2\" ]; },\n"
                "          { name = \"third\"; model = \"vendor/model\"; keys = [ \"sk-test-fake-3\" ]; } );\n");

        ck_assert_int_eq(config_find_pool(cfg, "first", 5), 0);
        ck_assert_int_eq(config_find_pool(cfg, "second", 6), 1);
        ck_assert_int_eq(config_find_pool(cfg, "vendor/model", 12), 1);
        ck_assert_int_eq(config_find_pool(cfg, "third", 5), 2);
        /* Only len bytes count: no NUL needed, no prefix matches. */
        ck_assert_int_eq(config_find_pool(cfg, "thirdXYZ", 5), 2);
        ck_assert_int_eq(config_find_pool(cfg, "thir", 4), -1);
        ck_assert_int_eq(config_find_pool(cfg, "nope", 4), -1);
        ck_assert_int_eq(config_find_pool(cfg, "", 0), -1);
}
END_TEST

static Suite *config_suite(void) {
        Suite *s = suite_create("config");
        TCase *tc = tcase_create("config");

        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_full_config_sets_every_field);
        tcase_add_test(tc, test_defaults_apply_to_settings_left_out);
        tcase_add_test(tc, test_socket_mode_takes_octal_strings_and_chmod_style_integers);
        tcase_add_test(tc, test_relative_paths_are_relative_to_the_config_directory);
        tcase_add_test(tc, test_syntax_error_is_reported_with_file_line_and_libconfig_text);
        tcase_add_test(tc, test_duplicate_setting_is_a_parse_error);
        tcase_add_test(tc, test_missing_config_file_is_reported_with_its_errno);
        tcase_add_test(tc, test_wrong_types_are_reported_at_their_lines);
        tcase_add_test(tc, test_numbers_out_of_range_are_reported);
        tcase_add_test(tc, test_unknown_settings_are_reported_with_a_suggestion);
        tcase_add_test(tc, test_provider_problems_are_reported);
        tcase_add_test(tc, test_at_least_one_provider_is_required);
        tcase_add_test(tc, test_pool_problems_are_reported);
        tcase_add_test(tc, test_name_and_model_length_limits);
        tcase_add_test(tc, test_every_problem_is_reported_in_one_pass_in_file_order);
        tcase_add_test(tc, test_no_pools_at_all_is_an_error);
        tcase_add_test(tc, test_diag_may_be_null);
        tcase_add_test(tc, test_same_key_twice_in_a_pool_names_both_positions);
        tcase_add_test(tc, test_env_references_resolve_and_report_unset_variables);
        tcase_add_test(tc, test_file_references_read_the_first_line_only);
        tcase_add_test(tc, test_file_reference_failures_name_the_file_not_the_key);
        tcase_add_test(tc, test_cred_references_read_from_the_credentials_directory);
        tcase_add_test(tc, test_no_message_ever_contains_a_secret);
        tcase_add_test(tc, test_env_file_pools_follow_the_config_pools);
        tcase_add_test(tc, test_env_file_base_url_picks_a_provider_or_adds_one);
        tcase_add_test(tc, test_env_file_problems_cite_the_env_file_and_line);
        tcase_add_test(tc, test_env_file_syntax_error_and_absence_are_reported);
        tcase_add_test(tc, test_env_file_alone_may_define_every_pool);
        tcase_add_test(tc, test_shipped_examples_load_with_the_six_deployed_pools);
        tcase_add_test(tc, test_find_pool_matches_names_before_model_ids);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(config_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
