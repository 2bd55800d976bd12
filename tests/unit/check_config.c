/* check_config.c — keypool.conf and orche.env become a validated config, or every problem in
 * them is reported with its file and line, and never with a secret. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* nftw */
#endif

#include <check.h>
#include <errno.h>
#include <ftw.h>
#include <grp.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "keypool/conf.h"
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
        ck_assert_str_eq(cfg->pools[0].keys[0].masked, "sk-or-v1-...0001");
        ck_assert_str_eq(cfg->pools[1].name, "LOCAL");
        ck_assert_uint_eq(cfg->pools[1].provider, 1);
        ck_assert_uint_eq(cfg->pools[1].n_keys, 1);
}
END_TEST

START_TEST(test_provider_transport_settings_are_read_and_default_to_verified_http2)
{
        char text[1024];

        write_file("corp-ca.pem", "-----BEGIN CERTIFICATE-----\nfake\n-----END CERTIFICATE-----\n");
        snprintf(text, sizeof text,
                 "providers = ( { name = \"corp\"; base_url = \"https://llm.corp.example/v1\";\n"
                 "  ca_file = \"%s/corp-ca.pem\"; ca_path = \"%s\"; proxy = \"http://user:fakepass@proxy:3128\";\n"
                 "  http2 = false; },\n"
                 "  { name = \"plain\"; base_url = \"https://api.example/v1\"; } );\n"
                 "pools = ( { name = \"P\"; provider = \"corp\"; model = \"m/p\"; keys = [ \"sk-test-fake-p1\" ]; } );\n",
                 dir, dir);
        load_ok(text);
        ck_assert_ptr_nonnull(strstr(cfg->providers[0].ca_file, "/corp-ca.pem"));
        ck_assert_str_eq(cfg->providers[0].ca_path, dir);
        ck_assert_str_eq(cfg->providers[0].proxy, "http://user:fakepass@proxy:3128");
        ck_assert(!cfg->providers[0].http2);
        ck_assert(cfg->providers[0].tls_verify);
        ck_assert_ptr_null(cfg->providers[1].ca_file);
        ck_assert_ptr_null(cfg->providers[1].proxy);
        ck_assert(cfg->providers[1].http2);
        ck_assert(cfg->providers[1].tls_verify);
}
END_TEST

START_TEST(test_provider_ca_file_must_be_an_absolute_readable_file_and_a_proxy_is_never_quoted)
{
        load_fails("providers = ( { name = \"p\"; base_url = \"https://a.example/v1\"; ca_file = \"ca.pem\";\n"
                   "  proxy = \"http://user:fake pass@proxy\"; } );\n" ONE_POOL);
        expect("keypool.conf", 1, "ca_file must be an absolute path");
        expect("keypool.conf", 2, "proxy must be a URL");
        expect_secret_absent("fake pass");
        load_fails("providers = ( { name = \"p\"; base_url = \"https://a.example/v1\";\n"
                   "  ca_path = \"/nonexistent/keypool-cas\"; } );\n" ONE_POOL);
        expect("keypool.conf", 2, "is not a readable directory");
}
END_TEST

START_TEST(test_wiping_secrets_also_wipes_a_providers_proxy_password)
{
        load_ok("providers = ( { name = \"openrouter\"; base_url = \"https://openrouter.ai/api/v1\";\n"
                "  proxy = \"http://user:fakepass@proxy:3128\"; } );\n" ONE_POOL);
        config_wipe_secrets(cfg);
        ck_assert_msg(cfg->providers[0].proxy[0] == 0, "the proxy URL, password and all, is wiped");
        ck_assert_msg(cfg->pools[0].keys[0].secret[0] == 0, "keys are wiped too");
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

START_TEST(test_pool_timeouts_default_to_the_top_level_ones_and_may_be_set_per_pool)
{
        const struct config_pool *a, *b;

        load_ok(PROVIDERS "pools = ( { name = \"A\"; model = \"m/a\"; keys = [ \"sk-test-fake-a1\" ]; },\n"
                "  { name = \"B\"; model = \"m/b\"; keys = [ \"sk-test-fake-b1\" ];\n"
                "    connect_timeout = 3; first_byte_timeout = 900; idle_timeout = 30; request_timeout = 1200; } );\n");
        a = &cfg->pools[0];
        b = &cfg->pools[1];
        ck_assert_uint_eq(a->connect_timeout, 10);
        ck_assert_uint_eq(a->first_byte_timeout, 300);
        ck_assert_uint_eq(a->idle_timeout, 120);
        ck_assert_uint_eq(a->request_timeout, 600);
        ck_assert_uint_eq(b->connect_timeout, 3);
        ck_assert_uint_eq(b->first_byte_timeout, 900);
        ck_assert_uint_eq(b->idle_timeout, 30);
        ck_assert_uint_eq(b->request_timeout, 1200);

        load_ok("connect_timeout = 5; first_byte_timeout = 60; idle_timeout = 20; request_timeout = 90;\n"
                PROVIDERS ONE_POOL);
        a = &cfg->pools[0];
        ck_assert_uint_eq(a->connect_timeout, 5);
        ck_assert_uint_eq(a->first_byte_timeout, 60);
        ck_assert_uint_eq(a->idle_timeout, 20);
        ck_assert_uint_eq(a->request_timeout, 90);

        load_fails(PROVIDERS "pools = ( { name = \"P\"; model = \"m/p\"; keys = [ \"sk-test-fake-p1\" ];\n"
                   "  idle_timeout = 0; } );\n");
        load_fails("request_timeout = 100000;\n" PROVIDERS ONE_POOL);
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
        expect("keypool.conf", 10, "pool 'intkey' key 1 must be a string or a group");
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

START_TEST(test_an_env_file_that_is_not_a_regular_file_is_refused)
{
        load_fails(PROVIDERS "env_file = \"/dev/null\";\n"
                   "pools = ( { name = \"P\"; model = \"m\"; keys = [ \"sk-test-fake-0001\" ]; } );\n");
        expect("keypool.conf", 2, "env_file /dev/null: not a regular file");
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

/* Duplicates are found through a hash of the secrets: at scale, every key still gets compared
 * with every earlier key of its pool, and only of its pool. */
START_TEST(test_duplicate_among_20000_keys_is_found_and_named_by_position)
{
        enum { N = 20000, REPEATED = 12345 };
        size_t size = 256 + (size_t) (N + 8) * 64, len;
        char *text = malloc(size);

        ck_assert_ptr_nonnull(text);
        /* Line 1: providers; line 2: the pool; key i on line i + 2. */
        len = (size_t) snprintf(text, size, PROVIDERS "pools = ( { name = \"BIG\"; model = \"m\"; keys = [\n");
        for (unsigned i = 1; i <= N; i++)
                len += (size_t) snprintf(text + len, size - len, "  \"sk-test-fake-SECRET-%08u\",\n", i);
        /* Key N + 1 repeats key REPEATED, on line N + 3. */
        len += (size_t) snprintf(text + len, size - len, "  \"sk-test-fake-SECRET-%08u\" ]; },\n",
                                 (unsigned) REPEATED);
        /* The next pool may hold the same secrets; its own repeat is counted from its own start
         * (the unresolvable first key still counts), on lines N + 4 … N + 7. */
        len += (size_t) snprintf(text + len, size - len,
                                 "  { name = \"NEXT\"; model = \"n\"; keys = [\n"
                                 "    \"env:KP_TEST_UNSET_FOR_SCALE\",\n"
                                 "    \"sk-test-fake-SECRET-%08u\",\n"
                                 "    \"sk-test-fake-SECRET-%08u\" ]; } );\n",
                                 (unsigned) REPEATED, (unsigned) REPEATED);
        ck_assert_uint_lt(len, size);
        unsetenv("KP_TEST_UNSET_FOR_SCALE");

        load_fails(text);
        free(text);
        expect("keypool.conf", N + 3, "pool 'BIG' key 20001: the same key as key 12345");
        expect("keypool.conf", N + 5, "pool 'NEXT' key 1: environment variable KP_TEST_UNSET_FOR_SCALE");
        expect("keypool.conf", N + 7, "pool 'NEXT' key 3: the same key as key 2");
        ck_assert_uint_eq(diag.n, 3);
        expect_secret_absent("SECRET");
}
END_TEST

START_TEST(test_20000_distinct_keys_load_in_order_with_their_ids)
{
        enum { N = 20000 };
        size_t size = 256 + (size_t) N * 64, len;
        char *text = malloc(size), secret[64];

        ck_assert_ptr_nonnull(text);
        len = (size_t) snprintf(text, size, PROVIDERS "pools = ( { name = \"BIG\"; model = \"m\"; keys = [\n");
        for (unsigned i = 1; i <= N; i++)
                len += (size_t) snprintf(text + len, size - len, "  \"sk-test-fake-%08u\"%s\n", i,
                                         i < N ? "," : " ]; } );");
        ck_assert_uint_lt(len, size);

        load_ok(text);
        free(text);
        ck_assert_uint_eq(cfg->n_keys, N);
        ck_assert_uint_eq(cfg->pools[0].n_keys, N);
        for (unsigned i = 1; i <= N; i += 997) {
                snprintf(secret, sizeof(secret), "sk-test-fake-%08u", i);
                expect_key(&cfg->pools[0].keys[i - 1], secret);
        }
        expect_key(&cfg->pools[0].keys[N - 1], "sk-test-fake-00020000");
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

START_TEST(test_file_references_bound_the_line_and_the_file_and_refuse_devices)
{
        static char text[80 * 1024];
        size_t n;

        /* A first line one byte past the limit is still read, and rejected as too long a key;
         * a longer one is not read at all. */
        memset(text, 'k', 4097);
        text[4097] = '\0';
        write_file("just-over", text);
        memset(text, 'k', 5000);
        text[5000] = '\0';
        write_file("long-line", text);
        /* A key file holds one key: a file of 64 KiB or more is a wrong path. */
        n = (size_t) snprintf(text, sizeof(text), "sk-test-fake-huge\n");
        memset(text + n, '#', 70000);
        text[n + 70000] = '\0';
        write_file("huge", text);
        load_fails(PROVIDERS
                   "pools = ( { name = \"P\"; model = \"m\";\n"
                   "  keys = [ \"file:just-over\",\n"
                   "           \"file:long-line\",\n"
                   "           \"file:huge\",\n"
                   "           \"file:/dev/null\" ]; } );\n");
        expect("keypool.conf", 3, "the key is longer than 4096 bytes");
        expect("keypool.conf", 4, "the first line is longer than 4096 bytes");
        expect("keypool.conf", 5, "larger than 65536 bytes (a key file holds one key)");
        expect("keypool.conf", 6, "pool 'P' key 4: file /dev/null: not a regular file");
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

        /* A provider added for a BASE_URL speaks the OpenAI dialect. */
        ck_assert_int_eq(cfg->providers[2].auth, CONFIG_AUTH_BEARER);
        ck_assert_ptr_null(cfg->providers[2].headers);
        ck_assert_uint_eq(cfg->providers[2].n_headers, 0);
        ck_assert_str_eq(cfg->providers[2].probe_path, "/models");
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

        ck_assert_int_eq(cfg->providers[0].auth, CONFIG_AUTH_BEARER);
        ck_assert_uint_eq(cfg->providers[0].n_headers, 2);
        ck_assert_str_eq(cfg->providers[0].headers[0], "HTTP-Referer: https://example.invalid/keypool");
        ck_assert_str_eq(cfg->providers[0].headers[1], "X-Title: keypool");
        ck_assert_str_eq(cfg->providers[0].probe_path, "/models");

        ck_assert_str_eq(cfg->state_file, "/var/lib/keypool/state.json");
        ck_assert_uint_eq(cfg->state_interval, 60);
        ck_assert_uint_eq(cfg->history_size, 1024);
        ck_assert_ptr_null(cfg->socket_group);
        ck_assert_ptr_null(cfg->http_listen);
        ck_assert(!cfg->http_allow_remote);
        ck_assert_uint_eq(cfg->n_client_tokens, 0);
        ck_assert_uint_eq(cfg->worker_timeout, 10);
        ck_assert_uint_eq(cfg->shutdown_timeout, 30);
}
END_TEST

static char *read_all(const char *path) {
        FILE *f = fopen(path, "re");
        char *text;
        long n;

        ck_assert_msg(f != NULL, "cannot open %s", path);
        ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
        n = ftell(f);
        ck_assert_int_ge(n, 0);
        rewind(f);
        text = calloc(1, (size_t) n + 1);
        ck_assert_ptr_nonnull(text);
        ck_assert_uint_eq(fread(text, 1, (size_t) n, f), (size_t) n);
        fclose(f);
        return text;
}

/* Removes the "# " before the first line that starts with commented, so the example holds. */
static void uncomment(char *text, const char *commented) {
        char *at = strstr(text, commented);

        ck_assert_msg(at != NULL && (at == text || at[-1] == '\n'), "no line \"%s\"", commented);
        memmove(at, at + 2, strlen(at + 2) + 1);
}

START_TEST(test_shipped_listener_and_token_examples_load_when_uncommented)
{
        char *text = read_all(TEST_SRCDIR "/../etc/keypool.conf");
        char *env = read_all(TEST_SRCDIR "/../etc/orche.env");

        uncomment(text, "# http_listen = \"127.0.0.1:8002\";");
        uncomment(text, "# client_tokens = [ ");
        write_file("orche.env", env);
        load_ok(text);
        free(text);
        free(env);

        ck_assert_str_eq(cfg->http_listen, "127.0.0.1:8002");
        ck_assert_uint_eq(cfg->n_client_tokens, 1);
        ck_assert_uint_eq(strlen(cfg->client_tokens[0]), 64);
}
END_TEST


/* --- rotation, retry and probing settings ----------------------------------------------------- */

START_TEST(test_rotation_settings_default_as_documented)
{
        load_ok(PROVIDERS ONE_POOL);

        ck_assert_uint_eq(cfg->max_wait, 30);
        ck_assert_uint_eq(cfg->max_cooldown, 86400);
        ck_assert_uint_eq(cfg->probe_interval, 3600);
        ck_assert(!cfg->probe_auth);
        ck_assert_uint_eq(cfg->transient_threshold, 3);
        ck_assert_uint_eq(cfg->transient_cooldown, 30);
        ck_assert_uint_eq(cfg->worker_timeout, 10);
        ck_assert_uint_eq(cfg->shutdown_timeout, 30);
        ck_assert_int_eq(cfg->cooldown_scope, CONFIG_SCOPE_KEY);
        ck_assert_ptr_null(cfg->rate_limit_phrases);
        ck_assert_uint_eq(cfg->n_rate_limit_phrases, 0);
        ck_assert_uint_eq(cfg->retry.backoff_initial_ms, 1000);
        ck_assert_uint_eq(cfg->retry.backoff_max_ms, 10000);
        ck_assert_uint_eq(cfg->retry.max_attempts, 5);

        ck_assert_int_eq(cfg->providers[0].auth, CONFIG_AUTH_BEARER);
        ck_assert_ptr_null(cfg->providers[0].headers);
        ck_assert_uint_eq(cfg->providers[0].n_headers, 0);
        ck_assert_str_eq(cfg->providers[0].probe_path, "/models");

        /* No limits unless configured. */
        ck_assert_uint_eq(cfg->pools[0].max_concurrent, 0);
        ck_assert_uint_eq(cfg->pools[0].rpm, 0);
        ck_assert_uint_eq(cfg->pools[0].keys[0].max_concurrent, 0);
        ck_assert_uint_eq(cfg->pools[0].keys[0].rpm, 0);
}
END_TEST

START_TEST(test_rotation_settings_take_their_lowest_and_highest_values)
{
        load_ok(PROVIDERS ONE_POOL
                "max_wait = 0;\nmax_cooldown = 1;\nprobe_interval = 1;\nprobe_auth = true;\n"
                "transient_threshold = 0;\ntransient_cooldown = 1;\ncooldown_scope = \"pool\";\n"
                "retry = { backoff_initial_ms = 1; backoff_max_ms = 1; max_attempts = 1; };\n");
        ck_assert_uint_eq(cfg->max_wait, 0);
        ck_assert_uint_eq(cfg->max_cooldown, 1);
        ck_assert_uint_eq(cfg->probe_interval, 1);
        ck_assert(cfg->probe_auth);
        ck_assert_uint_eq(cfg->transient_threshold, 0);
        ck_assert_uint_eq(cfg->transient_cooldown, 1);
        ck_assert_int_eq(cfg->cooldown_scope, CONFIG_SCOPE_POOL);
        ck_assert_uint_eq(cfg->retry.backoff_initial_ms, 1);
        ck_assert_uint_eq(cfg->retry.backoff_max_ms, 1);
        ck_assert_uint_eq(cfg->retry.max_attempts, 1);

        load_ok(PROVIDERS ONE_POOL
                "max_wait = 3600;\nmax_cooldown = 604800;\nprobe_interval = 604800;\nprobe_auth = false;\n"
                "transient_threshold = 1000;\ntransient_cooldown = 86400;\ncooldown_scope = \"key\";\n"
                "retry = { backoff_initial_ms = 600000; backoff_max_ms = 600000; max_attempts = 32; };\n");
        ck_assert_uint_eq(cfg->max_wait, 3600);
        ck_assert_uint_eq(cfg->max_cooldown, 604800);
        ck_assert_uint_eq(cfg->probe_interval, 604800);
        ck_assert(!cfg->probe_auth);
        ck_assert_uint_eq(cfg->transient_threshold, 1000);
        ck_assert_uint_eq(cfg->transient_cooldown, 86400);
        ck_assert_int_eq(cfg->cooldown_scope, CONFIG_SCOPE_KEY);
        ck_assert_uint_eq(cfg->retry.backoff_initial_ms, 600000);
        ck_assert_uint_eq(cfg->retry.backoff_max_ms, 600000);
        ck_assert_uint_eq(cfg->retry.max_attempts, 32);

        /* A partial retry group keeps the defaults of what it leaves out. */
        load_ok(PROVIDERS ONE_POOL "retry = { max_attempts = 2; };\n");
        ck_assert_uint_eq(cfg->retry.backoff_initial_ms, 1000);
        ck_assert_uint_eq(cfg->retry.backoff_max_ms, 10000);
        ck_assert_uint_eq(cfg->retry.max_attempts, 2);
}
END_TEST

START_TEST(test_rotation_settings_out_of_range_are_reported_at_their_lines)
{
        load_fails(PROVIDERS ONE_POOL
                   "max_wait = 3601;\n"
                   "max_cooldown = 0;\n"
                   "probe_interval = 0;\n"
                   "probe_auth = 1;\n"
                   "transient_threshold = 1001;\n"
                   "transient_cooldown = 86401;\n"
                   "cooldown_scope = \"global\";\n");
        expect("keypool.conf", 3, "max_wait must be between 0 and 3600, not 3601");
        expect("keypool.conf", 4, "max_cooldown must be between 1 and 604800, not 0");
        expect("keypool.conf", 5, "probe_interval must be between 1 and 604800, not 0");
        expect("keypool.conf", 6, "probe_auth must be true or false, not an integer");
        expect("keypool.conf", 7, "transient_threshold must be between 0 and 1000, not 1001");
        expect("keypool.conf", 8, "transient_cooldown must be between 1 and 86400, not 86401");
        expect("keypool.conf", 9, "cooldown_scope must be \"key\" or \"pool\", not 'global'");
        ck_assert_uint_eq(diag.n, 7);

        load_fails(PROVIDERS ONE_POOL "max_wait = -1;\ncooldown_scope = 1;\n");
        expect("keypool.conf", 3, "max_wait must be between 0 and 3600, not -1");
        expect("keypool.conf", 4, "cooldown_scope must be \"key\" or \"pool\", not an integer");
}
END_TEST

START_TEST(test_retry_group_problems_are_reported_at_their_lines)
{
        load_fails(PROVIDERS ONE_POOL
                   "retry = {\n"
                   "  backoff_initial_ms = 5000;\n"
                   "  backoff_max_ms = 4000;\n"
                   "  max_attempts = 0;\n"
                   "  max_atempts = 3;\n"
                   "};\n");
        expect("keypool.conf", 5, "retry: backoff_max_ms (4000) must not be less than backoff_initial_ms (5000)");
        expect("keypool.conf", 6, "retry: max_attempts must be between 1 and 32, not 0");
        expect("keypool.conf", 7, "retry: unknown setting 'max_atempts' (did you mean 'max_attempts'?)");
        ck_assert_uint_eq(diag.n, 3);

        /* Only the initial step given, above the default cap: the line the operator wrote. */
        load_fails(PROVIDERS ONE_POOL "retry = {\n  backoff_initial_ms = 20000;\n};\n");
        expect("keypool.conf", 4, "retry: backoff_initial_ms (20000) is above backoff_max_ms (10000 by default)");
        ck_assert_uint_eq(diag.n, 1);

        /* A value out of range is reported once, not again as an inverted pair. */
        load_fails(PROVIDERS ONE_POOL "retry = { backoff_initial_ms = 0; backoff_max_ms = 600001; max_attempts = 33; };\n");
        expect("keypool.conf", 3, "retry: backoff_initial_ms must be between 1 and 600000, not 0");
        expect("keypool.conf", 3, "retry: backoff_max_ms must be between 1 and 600000, not 600001");
        expect("keypool.conf", 3, "retry: max_attempts must be between 1 and 32, not 33");
        ck_assert_uint_eq(diag.n, 3);

        load_fails(PROVIDERS ONE_POOL "retry = 5;\n");
        expect("keypool.conf", 3, "retry must be a group");
}
END_TEST

START_TEST(test_rate_limit_phrases_are_stored_in_order)
{
        load_ok(PROVIDERS ONE_POOL "rate_limit_phrases = [ \"rate limit\", \"Slow Down\", \"capacity\" ];\n");
        ck_assert_uint_eq(cfg->n_rate_limit_phrases, 3);
        ck_assert_ptr_nonnull(cfg->rate_limit_phrases);
        ck_assert_str_eq(cfg->rate_limit_phrases[0], "rate limit");
        ck_assert_str_eq(cfg->rate_limit_phrases[1], "Slow Down");
        ck_assert_str_eq(cfg->rate_limit_phrases[2], "capacity");

        /* A list in parentheses is the same. */
        load_ok(PROVIDERS ONE_POOL "rate_limit_phrases = ( \"overloaded\" );\n");
        ck_assert_uint_eq(cfg->n_rate_limit_phrases, 1);
        ck_assert_str_eq(cfg->rate_limit_phrases[0], "overloaded");
}
END_TEST

START_TEST(test_rate_limit_phrase_problems_are_reported)
{
        char text[8192], phrase129[130];
        size_t n;

        memset(phrase129, 'p', 129);
        phrase129[129] = '\0';
        snprintf(text, sizeof(text), PROVIDERS ONE_POOL
                 "rate_limit_phrases = (\n"
                 "  \"ok\",\n"
                 "  \"\",\n"
                 "  \"%s\",\n"
                 "  5\n"
                 ");\n", phrase129);
        load_fails(text);
        expect("keypool.conf", 5, "rate_limit_phrases entry 2 is empty");
        expect("keypool.conf", 6, "rate_limit_phrases entry 3 is longer than 128 characters");
        expect("keypool.conf", 7, "rate_limit_phrases entry 4 must be a string, not an integer");
        ck_assert_uint_eq(diag.n, 3);

        /* 128 characters and 64 entries are the most there may be. */
        phrase129[128] = '\0';
        n = (size_t) snprintf(text, sizeof(text), PROVIDERS ONE_POOL "rate_limit_phrases = [ \"%s\"", phrase129);
        for (int i = 1; i < 64; i++)
                n += (size_t) snprintf(text + n, sizeof(text) - n, ", \"p%d\"", i);
        snprintf(text + n, sizeof(text) - n, " ];\n");
        load_ok(text);
        ck_assert_uint_eq(cfg->n_rate_limit_phrases, 64);
        ck_assert_str_eq(cfg->rate_limit_phrases[0], phrase129);
        ck_assert_str_eq(cfg->rate_limit_phrases[63], "p63");

        n = (size_t) snprintf(text, sizeof(text), PROVIDERS ONE_POOL "rate_limit_phrases = [ \"p0\"");
        for (int i = 1; i < 65; i++)
                n += (size_t) snprintf(text + n, sizeof(text) - n, ", \"p%d\"", i);
        snprintf(text + n, sizeof(text) - n, " ];\n");
        load_fails(text);
        expect("keypool.conf", 3, "rate_limit_phrases has 65 entries; at most 64 are allowed");

        load_fails(PROVIDERS ONE_POOL "rate_limit_phrases = [ ];\n");
        expect("keypool.conf", 3, "rate_limit_phrases is empty: leave it out");
        load_fails(PROVIDERS ONE_POOL "rate_limit_phrases = \"rate limit\";\n");
        expect("keypool.conf", 3, "rate_limit_phrases must be a list of strings");
}
END_TEST

/* --- provider auth, headers and probes --------------------------------------------------------- */

START_TEST(test_provider_auth_headers_and_probe_path_are_stored)
{
        load_ok("providers = (\n"
                "  { name = \"openrouter\"; base_url = \"https://openrouter.ai/api/v1\"; auth = \"bearer\";\n"
                "    headers = [ \"HTTP-Referer: https://example.invalid/keypool\", \"X-Title:keypool  \" ]; },\n"
                "  { name = \"anthropic\"; base_url = \"https://api.anthropic.com/v1\"; auth = \"x-api-key\";\n"
                "    headers = ( \"anthropic-version: 2023-06-01\" ); probe_path = \"/models?limit=1\"; },\n"
                "  { name = \"gemini\"; base_url = \"https://generativelanguage.googleapis.com/v1beta\";\n"
                "    auth = \"x-goog-api-key\"; headers = [ ]; probe_path = \"/\"; },\n"
                "  { name = \"odd\"; base_url = \"http://127.0.0.1:9/v1\";\n"
                "    headers = [ \"!#$%&'*+-.^_`|~09azAZ: a\\tb ; c=\\\"d\\\"\" ]; }\n"
                ");\n" ONE_POOL);

        ck_assert_int_eq(cfg->providers[0].auth, CONFIG_AUTH_BEARER);
        ck_assert_uint_eq(cfg->providers[0].n_headers, 2);
        ck_assert_str_eq(cfg->providers[0].headers[0], "HTTP-Referer: https://example.invalid/keypool");
        /* Stored as "Name: value", the value without its surrounding blanks. */
        ck_assert_str_eq(cfg->providers[0].headers[1], "X-Title: keypool");
        ck_assert_str_eq(cfg->providers[0].probe_path, "/models");

        ck_assert_int_eq(cfg->providers[1].auth, CONFIG_AUTH_X_API_KEY);
        ck_assert_uint_eq(cfg->providers[1].n_headers, 1);
        ck_assert_str_eq(cfg->providers[1].headers[0], "anthropic-version: 2023-06-01");
        ck_assert_str_eq(cfg->providers[1].probe_path, "/models?limit=1");

        ck_assert_int_eq(cfg->providers[2].auth, CONFIG_AUTH_X_GOOG_API_KEY);
        ck_assert_uint_eq(cfg->providers[2].n_headers, 0);
        ck_assert_ptr_null(cfg->providers[2].headers);
        ck_assert_str_eq(cfg->providers[2].probe_path, "/");

        /* Every token character in a name; tabs and quotes in a value. */
        ck_assert_int_eq(cfg->providers[3].auth, CONFIG_AUTH_BEARER);
        ck_assert_str_eq(cfg->providers[3].headers[0], "!#$%&'*+-.^_`|~09azAZ: a\tb ; c=\"d\"");
}
END_TEST

START_TEST(test_provider_auth_headers_and_probe_path_problems_are_reported)
{
        load_fails("providers = ( {\n"
                   "  name = \"o\"; base_url = \"https://o.example/v1\";\n"
                   "  auth = \"basic\";\n"
                   "  probe_path = \"models\";\n"
                   "  headers = [\n"
                   "    \"X-Title keypool\",\n"
                   "    \": value\",\n"
                   "    \"X Title: keypool\",\n"
                   "    \"X-Title:   \",\n"
                   "    \"X-Title: a\\r\\nHost: evil.example\",\n"
                   "    \"X-Title: a\\nb\",\n"
                   "    \"X-Title: ok\"\n"
                   "  ];\n"
                   "  header = 1;\n"
                   "} );\n" ONE_POOL);
        expect("keypool.conf", 3, "provider 'o': auth must be \"bearer\", \"x-api-key\" or \"x-goog-api-key\"");
        expect("keypool.conf", 4, "provider 'o': probe_path must start with '/'");
        expect("keypool.conf", 6, "provider 'o': header 1 has no ':'");
        expect("keypool.conf", 7, "provider 'o': header 2 has no name before ':'");
        expect("keypool.conf", 8, "provider 'o': header 3: the name contains a space");
        expect("keypool.conf", 9, "provider 'o': header 4 (X-Title) has no value");
        expect("keypool.conf", 10, "provider 'o': header 5 (X-Title): the value must not contain CR, LF");
        expect("keypool.conf", 11, "provider 'o': header 6 (X-Title): the value must not contain CR, LF");
        expect("keypool.conf", 14, "provider 'o': unknown setting 'header' (did you mean 'headers'?)");
        ck_assert_uint_eq(diag.n, 9);

        load_fails("providers = ( { name = \"o\"; base_url = \"https://o.example/v1\";\n"
                   "  auth = 1; probe_path = \"/a b\"; headers = \"X-Title: keypool\"; } );\n" ONE_POOL);
        expect("keypool.conf", 2, "provider 'o': auth must be \"bearer\", \"x-api-key\" or \"x-goog-api-key\", not an integer");
        expect("keypool.conf", 2, "provider 'o': probe_path must not contain whitespace");
        expect("keypool.conf", 2, "provider 'o': headers must be a list of strings");

        /* Case matters for the auth kind, as for every other name in the file. */
        load_fails("providers = ( { name = \"o\"; base_url = \"https://o.example/v1\"; auth = \"X-Api-Key\"; } );\n" ONE_POOL);
        expect("keypool.conf", 1, "auth must be");
}
END_TEST

START_TEST(test_headers_keypool_sends_itself_are_refused_whatever_their_case)
{
        static const char *const names[] = {
                "Authorization", "authorization", "X-API-KEY", "x-goog-api-key", "X-Goog-Api-Key",
                "host", "Content-Length", "TRANSFER-ENCODING", "connection",
        };
        char text[512];

        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
                snprintf(text, sizeof(text), "providers = ( { name = \"o\"; base_url = \"https://o.example/v1\";\n"
                         "  headers = [ \"X-Title: ok\",\n"
                         "              \"%s: sk-test-fake-SECRET-in-header\" ]; } );\n" ONE_POOL, names[i]);
                load_fails(text);
                expect("keypool.conf", 3, "provider 'o': header 2: ");
                expect("keypool.conf", 3, "; it cannot be in headers");
                ck_assert_uint_eq(diag.n, 1);
                expect_secret_absent("SECRET");
        }

        /* Names that merely start like one are someone else's. */
        load_ok("providers = ( { name = \"o\"; base_url = \"https://o.example/v1\";\n"
                "  headers = [ \"Authorization-Hint: x\", \"X-Host: y\", \"Connection-Id: z\" ]; } );\n" ONE_POOL);
        ck_assert_uint_eq(cfg->providers[0].n_headers, 3);
}
END_TEST

/* --- per-key limits ---------------------------------------------------------------------------- */

START_TEST(test_key_groups_override_the_pool_limits_and_others_inherit_them)
{
        setenv("KP_TEST_GROUP_KEY", "sk-test-fake-group-env", 1);
        load_ok(PROVIDERS
                "pools = (\n"
                "  { name = \"P\"; model = \"m/p\"; max_concurrent = 4; rpm = 60;\n"
                "    keys = ( \"sk-test-fake-plain\",\n"
                "             { key = \"sk-test-fake-own-both\"; max_concurrent = 1; rpm = 10; },\n"
                "             { key = \"sk-test-fake-own-rpm\"; rpm = 0; },\n"
                "             { key = \"env:KP_TEST_GROUP_KEY\"; max_concurrent = 100000; },\n"
                "             { key = \"sk-test-fake-bare-group\"; } ); },\n"
                "  { name = \"Q\"; model = \"m/q\";\n"
                "    keys = ( { key = \"sk-test-fake-q1\"; rpm = 1000000; }, \"sk-test-fake-q2\" ); }\n"
                ");\n");
        unsetenv("KP_TEST_GROUP_KEY");

        ck_assert_uint_eq(cfg->pools[0].max_concurrent, 4);
        ck_assert_uint_eq(cfg->pools[0].rpm, 60);
        ck_assert_uint_eq(cfg->pools[0].n_keys, 5);
        expect_key(&cfg->pools[0].keys[0], "sk-test-fake-plain");
        ck_assert_uint_eq(cfg->pools[0].keys[0].max_concurrent, 4);
        ck_assert_uint_eq(cfg->pools[0].keys[0].rpm, 60);
        expect_key(&cfg->pools[0].keys[1], "sk-test-fake-own-both");
        ck_assert_uint_eq(cfg->pools[0].keys[1].max_concurrent, 1);
        ck_assert_uint_eq(cfg->pools[0].keys[1].rpm, 10);
        /* An explicit 0 lifts the pool's limit for that key. */
        expect_key(&cfg->pools[0].keys[2], "sk-test-fake-own-rpm");
        ck_assert_uint_eq(cfg->pools[0].keys[2].max_concurrent, 4);
        ck_assert_uint_eq(cfg->pools[0].keys[2].rpm, 0);
        expect_key(&cfg->pools[0].keys[3], "sk-test-fake-group-env");
        ck_assert_uint_eq(cfg->pools[0].keys[3].max_concurrent, 100000);
        ck_assert_uint_eq(cfg->pools[0].keys[3].rpm, 60);
        expect_key(&cfg->pools[0].keys[4], "sk-test-fake-bare-group");
        ck_assert_uint_eq(cfg->pools[0].keys[4].max_concurrent, 4);
        ck_assert_uint_eq(cfg->pools[0].keys[4].rpm, 60);

        ck_assert_uint_eq(cfg->pools[1].max_concurrent, 0);
        ck_assert_uint_eq(cfg->pools[1].rpm, 0);
        ck_assert_uint_eq(cfg->pools[1].keys[0].max_concurrent, 0);
        ck_assert_uint_eq(cfg->pools[1].keys[0].rpm, 1000000);
        ck_assert_uint_eq(cfg->pools[1].keys[1].max_concurrent, 0);
        ck_assert_uint_eq(cfg->pools[1].keys[1].rpm, 0);
        ck_assert_uint_eq(cfg->n_keys, 7);
}
END_TEST

START_TEST(test_pool_and_key_group_limit_problems_are_reported_at_their_lines)
{
        load_fails(PROVIDERS
                   "pools = ( { name = \"P\"; model = \"m\";\n"
                   "  rpm = -1;\n"
                   "  max_concurrent = 100001;\n"
                   "  keys = (\n"
                   "    { key = \"sk-test-fake-1\"; rpm = -5; },\n"
                   "    { key = \"sk-test-fake-2\"; burst = 3; },\n"
                   "    { max_concurrent = 2; },\n"
                   "    { key = 5; },\n"
                   "    { key = \"sk-test-fake-3\"; max_concurrent = \"2\"; rpm = 1000001; },\n"
                   "    { key = \"sk-test-fake-4\"; rmp = 3; }\n"
                   "  ); } );\n");
        expect("keypool.conf", 3, "pool 'P': rpm must be between 0 and 1000000, not -1");
        expect("keypool.conf", 4, "pool 'P': max_concurrent must be between 0 and 100000, not 100001");
        expect("keypool.conf", 6, "pool 'P' key 1: rpm must be between 0 and 1000000, not -5");
        expect("keypool.conf", 7, "pool 'P' key 2: unknown setting 'burst'");
        expect("keypool.conf", 8, "pool 'P' key 3 has no key");
        expect("keypool.conf", 9, "pool 'P' key 4: key must be a string, not an integer");
        expect("keypool.conf", 10, "pool 'P' key 5: max_concurrent must be an integer, not a string");
        expect("keypool.conf", 10, "pool 'P' key 5: rpm must be between 0 and 1000000, not 1000001");
        expect("keypool.conf", 11, "pool 'P' key 6: unknown setting 'rmp' (did you mean 'rpm'?)");
        ck_assert_uint_eq(diag.n, 9);
}
END_TEST

START_TEST(test_key_group_positions_count_for_duplicates)
{
        load_fails(PROVIDERS
                   "pools = ( { name = \"P\"; model = \"m\"; keys = (\n"
                   "  \"sk-test-fake-SECRET-dup\",\n"
                   "  { rpm = 5;\n"
                   "    key = \"sk-test-fake-SECRET-dup\"; } ); } );\n");
        expect("keypool.conf", 5, "pool 'P' key 2: the same key as key 1");
        ck_assert_uint_eq(diag.n, 1);
        expect_secret_absent("SECRET");
}
END_TEST

START_TEST(test_no_message_about_new_settings_contains_a_secret)
{
        unsetenv("KP_TEST_UNSET_GROUP_KEY");
        load_fails("providers = ( { name = \"o\"; base_url = \"https://o.example/v1\";\n"
                   "  auth = \"Bearer sk-test-fake-SECRET-auth\";\n"
                   "  probe_path = \"models?key=sk-test-fake-SECRET-probe\";\n"
                   "  headers = [ \"sk-test-fake-SECRET-nocolon\",\n"
                   "              \"X-Token: sk-test-fake-SECRET-crlf\\r\\n\",\n"
                   "              \"Bad Name sk-test-fake-SECRET-name: x\",\n"
                   "              \"x-api-key: sk-test-fake-SECRET-reserved\" ]; } );\n"
                   "pools = ( { name = \"P\"; model = \"m\"; keys = (\n"
                   "  { key = \"env:KP_TEST_UNSET_GROUP_KEY\"; rpm = 5; },\n"
                   "  { key = \"sk-test-fake-SECRET-literal with space\"; },\n"
                   "  { key = \"sk-test-fake-SECRET-x\"; colour = 1; } ); } );\n");
        expect("keypool.conf", 2, "provider 'o': auth must be");
        expect("keypool.conf", 3, "provider 'o': probe_path must start with '/'");
        expect("keypool.conf", 4, "provider 'o': header 1 has no ':'");
        expect("keypool.conf", 5, "provider 'o': header 2 (X-Token)");
        expect("keypool.conf", 6, "provider 'o': header 3: the name contains a space");
        expect("keypool.conf", 7, "provider 'o': header 4: x-api-key carries the key, which keypool puts where auth says");
        expect("keypool.conf", 9, "pool 'P' key 1: environment variable KP_TEST_UNSET_GROUP_KEY is not set");
        expect("keypool.conf", 10, "pool 'P' key 2: the key contains whitespace");
        expect("keypool.conf", 11, "pool 'P' key 3: unknown setting 'colour'");
        ck_assert_uint_eq(diag.n, 9);
        expect_secret_absent("SECRET");
}
END_TEST

START_TEST(test_env_file_limits_apply_to_every_key_of_its_pool)
{
        write_file("orche.env",
                   "PROVIDER_GLM45_API_KEY=sk-test-fake-glm-1\n"
                   "PROVIDER_GLM45_BACKUP_KEYS=sk-test-fake-glm-2\n"
                   "PROVIDER_GLM45_MODEL=z-ai/glm-4.5\n"
                   "PROVIDER_GLM45_MAX_CONCURRENT=2\n"
                   "PROVIDER_GLM45_RPM=20\n"
                   "PROVIDER_KIMI_API_KEY=sk-test-fake-kimi\n"
                   "PROVIDER_KIMI_MODEL=moonshotai/kimi-k2\n"
                   "PROVIDER_KIMI_RPM=1000000\n"
                   "PROVIDER_FREE_API_KEY=sk-test-fake-free\n"
                   "PROVIDER_FREE_MODEL=m/free\n");
        load_ok(PROVIDERS "env_file = \"orche.env\";\n");

        ck_assert_uint_eq(cfg->n_pools, 3);
        ck_assert_uint_eq(cfg->pools[0].max_concurrent, 2);
        ck_assert_uint_eq(cfg->pools[0].rpm, 20);
        for (unsigned k = 0; k < 2; k++) {
                ck_assert_uint_eq(cfg->pools[0].keys[k].max_concurrent, 2);
                ck_assert_uint_eq(cfg->pools[0].keys[k].rpm, 20);
        }
        ck_assert_uint_eq(cfg->pools[1].max_concurrent, 0);
        ck_assert_uint_eq(cfg->pools[1].rpm, 1000000);
        ck_assert_uint_eq(cfg->pools[1].keys[0].rpm, 1000000);
        ck_assert_uint_eq(cfg->pools[2].max_concurrent, 0);
        ck_assert_uint_eq(cfg->pools[2].rpm, 0);
        ck_assert_uint_eq(cfg->pools[2].keys[0].max_concurrent, 0);
        ck_assert_uint_eq(cfg->pools[2].keys[0].rpm, 0);
}
END_TEST

START_TEST(test_env_file_limit_garbage_cites_the_env_file_and_line)
{
        write_file("orche.env",
                   "PROVIDER_A_API_KEY=sk-test-fake-a\n"
                   "PROVIDER_A_MODEL=m/a\n"
                   "PROVIDER_A_MAX_CONCURRENT=two\n"
                   "PROVIDER_A_RPM=-1\n"
                   "PROVIDER_B_API_KEY=sk-test-fake-b\n"
                   "PROVIDER_B_MODEL=m/b\n"
                   "PROVIDER_B_MAX_CONCURRENT=100001\n"
                   "PROVIDER_B_RPM=99999999999999999999999\n"
                   "PROVIDER_C_API_KEY=sk-test-fake-c\n"
                   "PROVIDER_C_MODEL=m/c\n"
                   "PROVIDER_C_MAX_CONCURRENT=\n"
                   "PROVIDER_C_RPM=\" 5\"\n");
        load_fails(PROVIDERS "env_file = \"orche.env\";\n");
        expect("orche.env", 3, "pool 'A': PROVIDER_A_MAX_CONCURRENT must be an integer between 0 and 100000");
        expect("orche.env", 4, "pool 'A': PROVIDER_A_RPM must be an integer between 0 and 1000000");
        expect("orche.env", 7, "pool 'B': PROVIDER_B_MAX_CONCURRENT must be between 0 and 100000, not 100001");
        expect("orche.env", 8, "pool 'B': PROVIDER_B_RPM must be between 0 and 1000000");
        expect("orche.env", 11, "pool 'C': PROVIDER_C_MAX_CONCURRENT must be an integer");
        expect("orche.env", 12, "pool 'C': PROVIDER_C_RPM must be an integer");
        ck_assert_uint_eq(diag.n, 6);
}
END_TEST

/* --- state file, socket group, TCP listener and client tokens ---------------------------------- */

/* SHA-256 of "kp-test-token-fake-1" and "kp-test-token-fake-2". */
#define DIGEST1 "b7fab7baff7be09fe22f01d9e8d10fe5ee003a383ef530ee2f8a17e22aeb7836"
#define DIGEST2 "39b7c4ad17eb2bb80be1bd1f5c7893cd3c64123a4f97b1e35598b77e6dee0d06"
#define DIGEST2_UPPER "39B7C4AD17EB2BB80BE1BD1F5C7893CD3C64123A4F97B1E35598B77E6DEE0D06"

START_TEST(test_api_settings_default_as_documented)
{
        load_ok(PROVIDERS ONE_POOL);

        ck_assert_str_eq(cfg->state_file, "/var/lib/keypool/state.json");
        ck_assert_uint_eq(cfg->state_interval, 60);
        ck_assert_uint_eq(cfg->history_size, 1024);
        ck_assert_ptr_null(cfg->socket_group);
        ck_assert_ptr_null(cfg->http_listen);
        ck_assert(!cfg->http_allow_remote);
        ck_assert_ptr_null(cfg->client_tokens);
        ck_assert_uint_eq(cfg->n_client_tokens, 0);
        ck_assert_uint_eq(cfg->worker_timeout, 10);
        ck_assert_uint_eq(cfg->shutdown_timeout, 30);
}
END_TEST

START_TEST(test_api_and_worker_settings_take_their_lowest_and_highest_values)
{
        load_ok(PROVIDERS ONE_POOL "state_interval = 1;\nhistory_size = 16;\n"
                "worker_timeout = 2;\nshutdown_timeout = 1;\n");
        ck_assert_uint_eq(cfg->state_interval, 1);
        ck_assert_uint_eq(cfg->history_size, 16);
        ck_assert_uint_eq(cfg->worker_timeout, 2);
        ck_assert_uint_eq(cfg->shutdown_timeout, 1);

        load_ok(PROVIDERS ONE_POOL "state_interval = 86400;\nhistory_size = 1048576;\n"
                "worker_timeout = 3600;\nshutdown_timeout = 3600;\n");
        ck_assert_uint_eq(cfg->state_interval, 86400);
        ck_assert_uint_eq(cfg->history_size, 1048576);
        ck_assert_uint_eq(cfg->worker_timeout, 3600);
        ck_assert_uint_eq(cfg->shutdown_timeout, 3600);
}
END_TEST

START_TEST(test_api_and_worker_settings_out_of_range_are_reported_at_their_lines)
{
        load_fails(PROVIDERS ONE_POOL
                   "state_interval = 0;\n"
                   "history_size = 15;\n"
                   "worker_timeout = 1;\n"
                   "shutdown_timeout = 0;\n"
                   "state_file = 5;\n"
                   "http_allow_remote = \"yes\";\n"
                   "http_listen = 8002;\n"
                   "socket_group = 1.5;\n");
        expect("keypool.conf", 3, "state_interval must be between 1 and 86400, not 0");
        expect("keypool.conf", 4, "history_size must be between 16 and 1048576, not 15");
        expect("keypool.conf", 5, "worker_timeout must be between 2 and 3600, not 1");
        expect("keypool.conf", 6, "shutdown_timeout must be between 1 and 3600, not 0");
        expect("keypool.conf", 7, "state_file must be a string, not an integer");
        expect("keypool.conf", 8, "http_allow_remote must be true or false, not a string");
        expect("keypool.conf", 9, "http_listen must be a string, not an integer");
        expect("keypool.conf", 10, "socket_group must be a group name or id, not a float");
        ck_assert_uint_eq(diag.n, 8);

        load_fails(PROVIDERS ONE_POOL
                   "state_interval = 86401;\n"
                   "history_size = 1048577;\n"
                   "worker_timeout = 3601;\n"
                   "shutdown_timeout = 3601;\n");
        expect("keypool.conf", 3, "state_interval must be between 1 and 86400, not 86401");
        expect("keypool.conf", 4, "history_size must be between 16 and 1048576, not 1048577");
        expect("keypool.conf", 5, "worker_timeout must be between 2 and 3600, not 3601");
        expect("keypool.conf", 6, "shutdown_timeout must be between 1 and 3600, not 3601");
        ck_assert_uint_eq(diag.n, 4);
}
END_TEST

START_TEST(test_unknown_api_settings_are_reported_with_a_suggestion)
{
        load_fails(PROVIDERS ONE_POOL
                   "client_token = [ \"" DIGEST1 "\" ];\n"
                   "http_listn = \"127.0.0.1:8002\";\n"
                   "state_intervall = 5;\n"
                   "history_sise = 64;\n");
        expect("keypool.conf", 3, "unknown setting 'client_token' (did you mean 'client_tokens'?)");
        expect("keypool.conf", 4, "unknown setting 'http_listn' (did you mean 'http_listen'?)");
        expect("keypool.conf", 5, "unknown setting 'state_intervall' (did you mean 'state_interval'?)");
        expect("keypool.conf", 6, "unknown setting 'history_sise' (did you mean 'history_size'?)");
        ck_assert_uint_eq(diag.n, 4);
}
END_TEST

START_TEST(test_state_file_may_be_disabled_absolute_or_relative_to_the_config)
{
        char want[PATH_MAX];

        load_ok(PROVIDERS ONE_POOL "state_file = \"\";\n");
        ck_assert_str_eq(cfg->state_file, "");

        load_ok(PROVIDERS ONE_POOL "state_file = \"/srv/kp/state.json\";\n");
        ck_assert_str_eq(cfg->state_file, "/srv/kp/state.json");

        load_ok(PROVIDERS ONE_POOL "state_file = \"state/kp.json\";\n");
        snprintf(want, sizeof(want), "%s/state/kp.json", dir);
        ck_assert_str_eq(cfg->state_file, want);
}
END_TEST

START_TEST(test_state_file_naming_a_directory_is_reported)
{
        char sub[128], needle[512];

        snprintf(sub, sizeof(sub), "%s/sub", dir);
        ck_assert_int_eq(mkdir(sub, 0700), 0);

        load_fails(PROVIDERS ONE_POOL
                   "state_file = \"/var/lib/keypool/\";\n");
        expect("keypool.conf", 3, "state_file '/var/lib/keypool/' names a directory: it must name a file");
        load_fails(PROVIDERS ONE_POOL "\n"
                   "state_file = \"sub/..\";\n");
        expect("keypool.conf", 4, "state_file 'sub/..' names a directory");
        load_fails(PROVIDERS ONE_POOL "state_file = \".\";\n");
        expect("keypool.conf", 3, "state_file '.' names a directory");

        /* No trailing slash, but a directory all the same: said at load, not at the first save. */
        load_fails(PROVIDERS ONE_POOL "state_file = \"sub\";\n");
        snprintf(needle, sizeof(needle), "state_file %s is a directory: it must name a file, e.g. \"%s/state.json\"",
                 sub, sub);
        expect("keypool.conf", 3, needle);
        ck_assert_uint_eq(diag.n, 1);
}
END_TEST

START_TEST(test_socket_group_takes_an_existing_name_or_gid)
{
        struct group *g = getgrgid(0);
        char text[512];

        ck_assert_msg(g != NULL, "this system has no group 0");
        snprintf(text, sizeof(text), PROVIDERS ONE_POOL "socket_group = \"%s\";\n", g->gr_name);
        load_ok(text);
        ck_assert_str_eq(cfg->socket_group, g->gr_name);
        ck_assert_uint_eq(cfg->socket_gid, 0);

        load_ok(PROVIDERS ONE_POOL "socket_group = \"0\";\n");
        ck_assert_str_eq(cfg->socket_group, "0");
        ck_assert_uint_eq(cfg->socket_gid, 0);
        load_ok(PROVIDERS ONE_POOL "socket_group = 0;\n");
        ck_assert_str_eq(cfg->socket_group, "0");
        ck_assert_uint_eq(cfg->socket_gid, 0);

        /* "" says the same as leaving it out: the daemon's own group. */
        load_ok(PROVIDERS ONE_POOL "socket_group = \"\";\n");
        ck_assert_ptr_null(cfg->socket_group);
}
END_TEST

START_TEST(test_socket_group_that_does_not_exist_is_reported)
{
        ck_assert_ptr_null(getgrnam("kp-test-no-such-group"));
        ck_assert_ptr_null(getgrgid(3999999999u));

        load_fails(PROVIDERS ONE_POOL "\nsocket_group = \"kp-test-no-such-group\";\n");
        expect("keypool.conf", 4, "group 'kp-test-no-such-group' does not exist");
        ck_assert_uint_eq(diag.n, 1);

        load_fails(PROVIDERS ONE_POOL "socket_group = \"3999999999\";\n");
        expect("keypool.conf", 3, "group '3999999999' does not exist");
        load_fails(PROVIDERS ONE_POOL "socket_group = 3999999999L;\n");
        expect("keypool.conf", 3, "group '3999999999' does not exist");
        /* (gid_t) -1 is chown's "leave it", never a group. */
        load_fails(PROVIDERS ONE_POOL "socket_group = \"4294967295\";\n");
        expect("keypool.conf", 3, "group '4294967295' does not exist");
        load_fails(PROVIDERS ONE_POOL "socket_group = -1;\n");
        expect("keypool.conf", 3, "socket_group -1 is not a group id");
        load_fails(PROVIDERS ONE_POOL "socket_group = \"kp group\";\n");
        expect("keypool.conf", 3, "socket_group must be a group name or id without whitespace");
}
END_TEST

START_TEST(test_http_listen_accepts_loopback_addresses)
{
        /* What is bound is parsed here, once: the address without brackets and the port. */
        static const struct {
                const char *text, *host;
                unsigned port;
        } ok[] = {
                { "127.0.0.1:8002", "127.0.0.1", 8002 },
                { "127.9.8.7:1", "127.9.8.7", 1 },
                { "[::1]:65535", "::1", 65535 },
                { "localhost:8002", "localhost", 8002 },
                { "[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1", 80 },
        };

        for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
                char text[512];

                snprintf(text, sizeof(text), PROVIDERS ONE_POOL "http_listen = \"%s\";\n", ok[i].text);
                load_ok(text);
                ck_assert_str_eq(cfg->http_listen, ok[i].text);
                ck_assert_str_eq(cfg->http_host, ok[i].host);
                ck_assert_uint_eq(cfg->http_port, ok[i].port);
                ck_assert(!cfg->http_allow_remote);
        }
}
END_TEST

START_TEST(test_http_listen_elsewhere_needs_http_allow_remote)
{
        static const char *const remote[] = { "0.0.0.0:8002", "[::]:8002", "192.0.2.1:80", "[2001:db8::1]:443" };

        for (size_t i = 0; i < sizeof(remote) / sizeof(remote[0]); i++) {
                char text[512], needle[256];

                snprintf(text, sizeof(text), PROVIDERS ONE_POOL "\nhttp_listen = \"%s\";\n", remote[i]);
                load_fails(text);
                snprintf(needle, sizeof(needle), "http_listen '%s' is not a loopback address: set "
                         "http_allow_remote = true;", remote[i]);
                expect("keypool.conf", 4, needle);
                ck_assert_uint_eq(diag.n, 1);

                snprintf(text, sizeof(text), PROVIDERS ONE_POOL "http_listen = \"%s\";\n"
                         "http_allow_remote = true;\n", remote[i]);
                load_ok(text);
                ck_assert_str_eq(cfg->http_listen, remote[i]);
                ck_assert(cfg->http_allow_remote);
        }

        load_fails(PROVIDERS ONE_POOL "http_listen = \"0.0.0.0:8002\";\nhttp_allow_remote = false;\n");
        expect("keypool.conf", 3, "is not a loopback address");

        /* A mistyped http_allow_remote is one problem, not two. */
        load_fails(PROVIDERS ONE_POOL "http_listen = \"0.0.0.0:8002\";\nhttp_allow_remote = \"yes\";\n");
        expect("keypool.conf", 4, "http_allow_remote must be true or false");
        ck_assert_uint_eq(diag.n, 1);

        /* Allowing remote clients without a listener changes nothing and is no error. */
        load_ok(PROVIDERS ONE_POOL "http_allow_remote = true;\n");
        ck_assert_ptr_null(cfg->http_listen);
        ck_assert(cfg->http_allow_remote);
}
END_TEST

START_TEST(test_malformed_http_listen_is_reported)
{
        static const struct {
                const char *value, *needle;
        } bad[] = {
                { "127.0.0.1",          "http_listen '127.0.0.1' must be HOST:PORT" },
                { "127.0.0.1:",         "http_listen '127.0.0.1:' must end in a port between 1 and 65535" },
                { "127.0.0.1:0",        "must end in a port between 1 and 65535" },
                { "127.0.0.1:65536",    "must end in a port between 1 and 65535" },
                { "127.0.0.1:99999999999999999999", "must end in a port between 1 and 65535" },
                { "127.0.0.1:80x",      "must end in a port between 1 and 65535" },
                { "127.0.0.1:+80",      "must end in a port between 1 and 65535" },
                { ":8002",              "http_listen ':8002' must have an IPv4 address, an [IPv6] address or localhost" },
                { "::1:8002",           "http_listen '::1:8002' has an IPv6 address without brackets" },
                { "[::1]8002",          "http_listen '[::1]8002' must be HOST:PORT" },
                { "[::1:8002",          "http_listen '[::1:8002' has no ']' after the IPv6 address" },
                { "[]:8002",            "must have an IPv4 address" },
                { "[zz::1]:8002",       "has no valid IPv6 address in the brackets" },
                { "[127.0.0.1]:8002",   "has no valid IPv6 address in the brackets" },
                { "example.com:80",     "host names other than localhost are not resolved" },
                { "127.1:80",           "must have an IPv4 address" },
                { "127.0.0.256:80",     "must have an IPv4 address" },
                { "",                   "http_listen must not be empty" },
                { "127.0.0.1 :80",      "http_listen must not contain whitespace" },
        };

        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                char text[512];

                snprintf(text, sizeof(text), PROVIDERS ONE_POOL "\n\nhttp_listen = \"%s\";\n", bad[i].value);
                load_fails(text);
                expect("keypool.conf", 5, bad[i].needle);
                ck_assert_msg(diag.n == 1, "%s: %zu messages", bad[i].value, diag.n);
        }
}
END_TEST

START_TEST(test_client_tokens_are_stored_lowercase_in_order)
{
        load_ok(PROVIDERS ONE_POOL "client_tokens = [ \"" DIGEST1 "\", \"" DIGEST2_UPPER "\" ];\n");
        ck_assert_uint_eq(cfg->n_client_tokens, 2);
        ck_assert_str_eq(cfg->client_tokens[0], DIGEST1);
        ck_assert_str_eq(cfg->client_tokens[1], DIGEST2);

        /* A list in parentheses is the same. */
        load_ok(PROVIDERS ONE_POOL "client_tokens = ( \"" DIGEST2 "\" );\n");
        ck_assert_uint_eq(cfg->n_client_tokens, 1);
        ck_assert_str_eq(cfg->client_tokens[0], DIGEST2);
}
END_TEST

START_TEST(test_client_token_problems_name_the_position_never_the_value)
{
        load_fails(PROVIDERS ONE_POOL
                   "client_tokens = (\n"
                   "  \"" DIGEST1 "\",\n"
                   "  \"kp-test-token-fake-SECRET-raw\",\n"
                   "  \"b7fab7baff7be09fe22f01d9e8d10fe5ee003a383ef530ee2f8a17e22aeb783\",\n"
                   "  \"b7fab7baff7be09fe22f01d9e8d10fe5ee003a383ef530ee2f8a17e22aeb78366\",\n"
                   "  \"" DIGEST2 "  -\",\n"
                   "  \"g9b7c4ad17eb2bb80be1bd1f5c7893cd3c64123a4f97b1e35598b77e6dee0d06\",\n"
                   "  42,\n"
                   "  \"" DIGEST2_UPPER "\",\n"
                   "  \"" DIGEST2 "\",\n"
                   "  \"\" );\n");
        expect("keypool.conf", 5, "client_tokens entry 2 must be the SHA-256 digest of a token: 64 "
               "hexadecimal digits (printf %s \"$TOKEN\" | sha256sum)");
        expect("keypool.conf", 6, "client_tokens entry 3 must be the SHA-256 digest");
        expect("keypool.conf", 7, "client_tokens entry 4 must be the SHA-256 digest");
        expect("keypool.conf", 8, "client_tokens entry 5 has text after its 64 hexadecimal digits");
        expect("keypool.conf", 9, "client_tokens entry 6 must be the SHA-256 digest");
        expect("keypool.conf", 10, "client_tokens entry 7 must be a string, not an integer");
        expect("keypool.conf", 12, "client_tokens entry 9 is the same digest as entry 8");
        expect("keypool.conf", 13, "client_tokens entry 10 must be the SHA-256 digest");
        ck_assert_uint_eq(diag.n, 8);
        expect_secret_absent("SECRET");
        expect_secret_absent("b7fab7baff");
        expect_secret_absent("39b7c4ad17");
        expect_secret_absent("39B7C4AD17");
        expect_secret_absent("g9b7c4ad17");
}
END_TEST

START_TEST(test_client_tokens_list_itself_must_be_a_short_nonempty_list)
{
        char *text;
        size_t n, cap = 1100 * 72 + 1024;

        load_fails(PROVIDERS ONE_POOL "client_tokens = \"" DIGEST1 "\";\n");
        expect("keypool.conf", 3, "client_tokens must be a list of SHA-256 hex digests");
        expect_secret_absent(DIGEST1);

        load_fails(PROVIDERS ONE_POOL "client_tokens = [ ];\n");
        expect("keypool.conf", 3, "client_tokens is empty: leave it out to serve TCP requests without a token");

        /* 1024 digests are the most there may be: write distinct ones. */
        text = malloc(cap);
        ck_assert_ptr_nonnull(text);
        n = (size_t) snprintf(text, cap, PROVIDERS ONE_POOL "client_tokens = [\n");
        for (int i = 0; i < 1024; i++)
                n += (size_t) snprintf(text + n, cap - n, "%s\"%064x\"", i ? ",\n" : "", i);
        snprintf(text + n, cap - n, " ];\n");
        load_ok(text);
        ck_assert_uint_eq(cfg->n_client_tokens, 1024);
        ck_assert_str_eq(cfg->client_tokens[1023],
                         "00000000000000000000000000000000000000000000000000000000000003ff");

        n = (size_t) snprintf(text, cap, PROVIDERS ONE_POOL "client_tokens = [\n");
        for (int i = 0; i < 1025; i++)
                n += (size_t) snprintf(text + n, cap - n, "%s\"%064x\"", i ? ",\n" : "", i);
        snprintf(text + n, cap - n, " ];\n");
        load_fails(text);
        expect("keypool.conf", 3, "client_tokens has 1025 entries; at most 1024 are allowed");
        free(text);
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


/* --- operator files that are not what they should be ------------------------------------------- */

static void make_fifo(const char *name) {
        char path[PATH_MAX];

        snprintf(path, sizeof(path), "%s/%s", dir, name);
        ck_assert_int_eq(mkfifo(path, 0600), 0);
}

/* Each of these would wait for a writer for ever if the file were opened blocking. */
START_TEST(test_a_fifo_as_keypool_conf_is_refused_at_once_naming_it)
{
        make_fifo("keypool.conf");
        ck_assert_int_eq(config_load(conf_path, &cfg, &diag), -EBADFD);
        ck_assert_ptr_null(cfg);
        expect("keypool.conf", 0, "not a regular file (a FIFO)");
}
END_TEST

START_TEST(test_a_directory_as_keypool_conf_is_refused_naming_it)
{
        char path[PATH_MAX];

        snprintf(path, sizeof(path), "%s/sub.conf", dir);
        ck_assert_int_eq(mkdir(path, 0700), 0);
        ck_assert_int_eq(config_load(path, &cfg, &diag), -EISDIR);
        expect("sub.conf", 0, "not a regular file (a directory)");
}
END_TEST

START_TEST(test_a_fifo_as_env_file_is_refused_at_once_naming_it)
{
        make_fifo("orche.env");
        load_fails(PROVIDERS "env_file = \"orche.env\";\n" ONE_POOL);
        expect("keypool.conf", 2, "env_file ");
        expect("keypool.conf", 2, "orche.env: not a regular file (a FIFO)");
}
END_TEST

START_TEST(test_a_fifo_as_key_file_is_refused_at_once_naming_it)
{
        make_fifo("key");
        load_fails(PROVIDERS "pools = ( { name = \"P\"; model = \"m\";\n keys = [ \"file:key\" ]; } );\n");
        expect("keypool.conf", 3, "pool 'P' key 1: file ");
        expect("keypool.conf", 3, "/key: not a regular file (a FIFO)");
}
END_TEST

START_TEST(test_a_byte_order_mark_before_keypool_conf_is_skipped_and_lines_still_count)
{
        load_ok("\xef\xbb\xbf" PROVIDERS ONE_POOL);
        ck_assert_str_eq(cfg->pools[0].name, "P");
        load_fails("\xef\xbb\xbf" PROVIDERS "workers = ;\n" ONE_POOL);
        expect("keypool.conf", 2, "syntax error");
}
END_TEST

START_TEST(test_a_nul_byte_in_keypool_conf_is_an_error_at_its_line)
{
        char path[PATH_MAX];
        static const char text[] = PROVIDERS ONE_POOL "# a comment\0workers = 99;\n";
        FILE *f;

        snprintf(path, sizeof(path), "%s/keypool.conf", dir);
        f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        ck_assert_uint_eq(fwrite(text, 1, sizeof(text) - 1, f), sizeof(text) - 1);
        ck_assert_int_eq(fclose(f), 0);
        ck_assert_int_eq(config_load(conf_path, &cfg, &diag), -EINVAL);
        expect("keypool.conf", 3, "contains a NUL byte");
}
END_TEST

START_TEST(test_a_keypool_conf_over_16_mib_is_refused_before_parsing)
{
        char path[PATH_MAX], chunk[65536];
        FILE *f;

        snprintf(path, sizeof(path), "%s/keypool.conf", dir);
        f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        fputs(PROVIDERS ONE_POOL, f);
        memset(chunk, ' ', sizeof(chunk));
        for (int i = 0; i < 256; i++)
                ck_assert_uint_eq(fwrite(chunk, 1, sizeof(chunk), f), sizeof(chunk));
        ck_assert_int_eq(fclose(f), 0);
        ck_assert_int_eq(config_load(conf_path, &cfg, &diag), -EFBIG);
        expect("keypool.conf", 0, "is larger than 16777216 bytes");
}
END_TEST

START_TEST(test_a_string_setting_over_4_kib_names_its_length_and_the_limit)
{
        size_t n = 5000;
        char *long_path = malloc(n + 1), *text = NULL;

        memset(long_path, 'a', n);
        long_path[n] = '\0';
        ck_assert_int_ne(asprintf(&text, PROVIDERS ONE_POOL "state_file = \"/%s\";\n", long_path), -1);
        load_fails(text);
        expect("keypool.conf", 3, "state_file is 5001 bytes; at most 4096");
        free(text);

        ck_assert_int_ne(asprintf(&text, "providers = ( { name = \"openrouter\";\n base_url = \"https://x/%s\"; } );\n"
                                  ONE_POOL, long_path), -1);
        load_fails(text);
        expect("keypool.conf", 2, "providers[0].base_url is 5010 bytes; at most 4096");
        free(text);
        free(long_path);
}
END_TEST

START_TEST(test_a_multi_megabyte_string_setting_is_refused_quickly)
{
        size_t n = 8u << 20;
        char *big = malloc(n + 1), *text = NULL;
        time_t start = time(NULL);

        memset(big, 'x', n);
        big[n] = '\0';
        ck_assert_int_ne(asprintf(&text, PROVIDERS ONE_POOL "socket = \"%s\";\n", big), -1);
        load_fails(text);
        expect("keypool.conf", 3, "socket is 8388608 bytes; at most 4096");
        ck_assert_msg(time(NULL) - start < 10, "took %ld s", (long) (time(NULL) - start));
        free(text);
        free(big);
}
END_TEST

START_TEST(test_include_is_relative_to_the_config_and_keeps_its_own_line_numbers)
{
        write_file("pools.inc", "\npools = ( { name = \"P\"; model = \"m/p\"; keys = [ \"sk-test-fake-p1\" ]; } );\n");
        load_ok(PROVIDERS "@include \"pools.inc\"\n");
        ck_assert_str_eq(cfg->pools[0].name, "P");
        write_file("pools.inc", "\npools = ( { name = \"P\"; model = \"m/p\"; keys = [ \"sk-test-fake-p1\" ]; } );\nworkers = \"many\";\n");
        load_fails(PROVIDERS "@include \"pools.inc\"\n");
        /* Named as the @include line wrote it. */
        for (size_t i = 0; i < diag.n; i++)
                if (strstr(diag.messages[i], "pools.inc:3: workers must be"))
                        return;
        dump_diag();
        ck_abort_msg("no message \"pools.inc:3: workers must be…\"");
}
END_TEST


START_TEST(test_an_unresolved_reference_in_the_env_file_is_reported_at_its_line)
{
        unsetenv("KEYPOOL_TEST_UNSET");
        write_file("orche.env", "PROVIDER_P_MODEL=m/p\n\nPROVIDER_P_API_KEY=${KEYPOOL_TEST_UNSET}\n");
        load_fails(PROVIDERS "env_file = \"orche.env\";\n");
        expect("orche.env", 3, "a ${NAME} reference names a variable set neither");
        write_file("orche.env", "FAKE=sk-test-fake-ref1\nPROVIDER_P_MODEL=m/p\nPROVIDER_P_API_KEY=${FAKE}\n");
        load_ok(PROVIDERS "env_file = \"orche.env\";\n");
        ck_assert_str_eq(cfg->pools[0].keys[0].secret, "sk-test-fake-ref1");
}
END_TEST

static Suite *config_suite(void) {
        Suite *s = suite_create("config");
        TCase *tc = tcase_create("config");

        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_full_config_sets_every_field);
        tcase_add_test(tc, test_provider_transport_settings_are_read_and_default_to_verified_http2);
        tcase_add_test(tc, test_provider_ca_file_must_be_an_absolute_readable_file_and_a_proxy_is_never_quoted);
        tcase_add_test(tc, test_wiping_secrets_also_wipes_a_providers_proxy_password);
        tcase_add_test(tc, test_defaults_apply_to_settings_left_out);
        tcase_add_test(tc, test_pool_timeouts_default_to_the_top_level_ones_and_may_be_set_per_pool);
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
        tcase_add_test(tc, test_an_env_file_that_is_not_a_regular_file_is_refused);
        tcase_add_test(tc, test_diag_may_be_null);
        tcase_add_test(tc, test_same_key_twice_in_a_pool_names_both_positions);
        tcase_add_test(tc, test_env_references_resolve_and_report_unset_variables);
        tcase_add_test(tc, test_file_references_read_the_first_line_only);
        tcase_add_test(tc, test_file_reference_failures_name_the_file_not_the_key);
        tcase_add_test(tc, test_file_references_bound_the_line_and_the_file_and_refuse_devices);
        tcase_add_test(tc, test_cred_references_read_from_the_credentials_directory);
        tcase_add_test(tc, test_no_message_ever_contains_a_secret);
        tcase_add_test(tc, test_env_file_pools_follow_the_config_pools);
        tcase_add_test(tc, test_env_file_base_url_picks_a_provider_or_adds_one);
        tcase_add_test(tc, test_env_file_problems_cite_the_env_file_and_line);
        tcase_add_test(tc, test_env_file_syntax_error_and_absence_are_reported);
        tcase_add_test(tc, test_env_file_alone_may_define_every_pool);
        tcase_add_test(tc, test_shipped_examples_load_with_the_six_deployed_pools);
        tcase_add_test(tc, test_shipped_listener_and_token_examples_load_when_uncommented);
        tcase_add_test(tc, test_rotation_settings_default_as_documented);
        tcase_add_test(tc, test_rotation_settings_take_their_lowest_and_highest_values);
        tcase_add_test(tc, test_rotation_settings_out_of_range_are_reported_at_their_lines);
        tcase_add_test(tc, test_retry_group_problems_are_reported_at_their_lines);
        tcase_add_test(tc, test_rate_limit_phrases_are_stored_in_order);
        tcase_add_test(tc, test_rate_limit_phrase_problems_are_reported);
        tcase_add_test(tc, test_provider_auth_headers_and_probe_path_are_stored);
        tcase_add_test(tc, test_provider_auth_headers_and_probe_path_problems_are_reported);
        tcase_add_test(tc, test_headers_keypool_sends_itself_are_refused_whatever_their_case);
        tcase_add_test(tc, test_key_groups_override_the_pool_limits_and_others_inherit_them);
        tcase_add_test(tc, test_pool_and_key_group_limit_problems_are_reported_at_their_lines);
        tcase_add_test(tc, test_key_group_positions_count_for_duplicates);
        tcase_add_test(tc, test_duplicate_among_20000_keys_is_found_and_named_by_position);
        tcase_add_test(tc, test_20000_distinct_keys_load_in_order_with_their_ids);
        tcase_add_test(tc, test_no_message_about_new_settings_contains_a_secret);
        tcase_add_test(tc, test_env_file_limits_apply_to_every_key_of_its_pool);
        tcase_add_test(tc, test_env_file_limit_garbage_cites_the_env_file_and_line);
        tcase_add_test(tc, test_api_settings_default_as_documented);
        tcase_add_test(tc, test_api_and_worker_settings_take_their_lowest_and_highest_values);
        tcase_add_test(tc, test_api_and_worker_settings_out_of_range_are_reported_at_their_lines);
        tcase_add_test(tc, test_unknown_api_settings_are_reported_with_a_suggestion);
        tcase_add_test(tc, test_state_file_may_be_disabled_absolute_or_relative_to_the_config);
        tcase_add_test(tc, test_state_file_naming_a_directory_is_reported);
        tcase_add_test(tc, test_socket_group_takes_an_existing_name_or_gid);
        tcase_add_test(tc, test_socket_group_that_does_not_exist_is_reported);
        tcase_add_test(tc, test_http_listen_accepts_loopback_addresses);
        tcase_add_test(tc, test_http_listen_elsewhere_needs_http_allow_remote);
        tcase_add_test(tc, test_malformed_http_listen_is_reported);
        tcase_add_test(tc, test_client_tokens_are_stored_lowercase_in_order);
        tcase_add_test(tc, test_client_token_problems_name_the_position_never_the_value);
        tcase_add_test(tc, test_client_tokens_list_itself_must_be_a_short_nonempty_list);
        tcase_add_test(tc, test_find_pool_matches_names_before_model_ids);
        tcase_add_test(tc, test_a_fifo_as_keypool_conf_is_refused_at_once_naming_it);
        tcase_add_test(tc, test_a_directory_as_keypool_conf_is_refused_naming_it);
        tcase_add_test(tc, test_a_fifo_as_env_file_is_refused_at_once_naming_it);
        tcase_add_test(tc, test_a_fifo_as_key_file_is_refused_at_once_naming_it);
        tcase_add_test(tc, test_a_byte_order_mark_before_keypool_conf_is_skipped_and_lines_still_count);
        tcase_add_test(tc, test_a_nul_byte_in_keypool_conf_is_an_error_at_its_line);
        tcase_add_test(tc, test_a_keypool_conf_over_16_mib_is_refused_before_parsing);
        tcase_add_test(tc, test_a_string_setting_over_4_kib_names_its_length_and_the_limit);
        tcase_add_test(tc, test_a_multi_megabyte_string_setting_is_refused_quickly);
        tcase_add_test(tc, test_include_is_relative_to_the_config_and_keeps_its_own_line_numbers);
        tcase_add_test(tc, test_an_unresolved_reference_in_the_env_file_is_reported_at_its_line);
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
