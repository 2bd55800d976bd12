/* keypoold.c — the daemon's entry point: options, configuration, then the coordinator.
 *
 * Runs in the foreground (a supervisor such as systemd runs it; it never daemonizes).
 */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include "keypool/conf.h"
#include "keypool/keyid.h"
#include "keypool/log.h"
#include "keypool/supervisor.h"

static void usage(FILE *out) {
        fprintf(out,
                "Usage: keypoold [OPTIONS]\n"
                "Serve LLM API requests through pools of keys, rotating away from rate-limited keys.\n"
                "\n"
                "  -c, --config FILE   configuration file (default %s)\n"
                "      --check-config  validate the configuration, print every problem, and exit\n"
                "      --log-target=auto|journal|stderr\n"
                "                      where events go (auto: the journal when stderr is connected\n"
                "                      to it, as under systemd; else readable lines on stderr)\n"
                "  -h, --help          show this help and exit\n"
                "      --version       show the version and exit\n",
                CONFIG_DEFAULT_PATH);
}

/* Every client and every upstream connection is a descriptor, and the traditional soft limit of
 * 1024 would cap a worker far below max_connections: take what the hard limit allows. */
static void raise_fd_limit(void) {
        struct rlimit rl;

        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                (void) setrlimit(RLIMIT_NOFILE, &rl);
        }
}

int main(int argc, char **argv) {
        enum { OPT_CHECK = 256, OPT_VERSION, OPT_LOG_TARGET };
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "check-config", no_argument, NULL, OPT_CHECK },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, OPT_VERSION },
                { "log-target", required_argument, NULL, OPT_LOG_TARGET },
                {}
        };
        const char *path = CONFIG_DEFAULT_PATH;
        struct config_diag diag = {};
        struct config *cfg = NULL;
        enum log_target target = LOG_TARGET_AUTO;
        bool check = false;
        int opt, r;

        while ((opt = getopt_long(argc, argv, "c:h", options, NULL)) != -1) {
                switch (opt) {
                case 'c':
                        path = optarg;
                        break;
                case OPT_CHECK:
                        check = true;
                        break;
                case 'h':
                        usage(stdout);
                        return 0;
                case OPT_VERSION:
                        printf("keypoold %s\n", PACKAGE_VERSION);
                        return 0;
                case OPT_LOG_TARGET:
                        target = log_target_from_string(optarg);
                        if (!target) {
                                fprintf(stderr, "keypoold: --log-target must be auto, journal or stderr, not '%s'\n", optarg);
                                return 2;
                        }
                        break;
                default:
                        usage(stderr);
                        return 2;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "keypoold: unexpected argument '%s'\n", argv[optind]);
                usage(stderr);
                return 2;
        }

        /* Keys are about to be read: no core dump of this process or its workers may hold them. */
        prctl(PR_SET_DUMPABLE, 0);
        log_setup("keypoold", LOG_INFO, check ? LOG_TARGET_STDERR : target);
        r = config_load(path, &cfg, &diag);
        if (r < 0) {
                /* --check-config answers a person at a terminal; a failing start is an event. */
                for (size_t i = 0; i < diag.n; i++) {
                        if (check)
                                fprintf(stderr, "%s\n", diag.messages[i]);
                        else
                                log_event(LOG_ERR, "config_error", NULL, "%s", diag.messages[i]);
                }
                if (diag.n == 0)
                        log_event(LOG_ERR, "config_error", NULL, "%s: cannot load the configuration: %s",
                                  path, strerror(-r));
                fprintf(stderr, "keypoold: configuration %s is not valid (%zu problem%s)\n",
                        path, diag.n, diag.n == 1 ? "" : "s");
                config_diag_clear(&diag);
                return 1;
        }
        config_diag_clear(&diag);
        if (check) {
                /* A key short or simple enough to find from its id (which is shown everywhere)
                 * is valid, but its operator should know. */
                for (unsigned p = 0; p < cfg->n_pools; p++)
                        for (unsigned k = 0; k < cfg->pools[p].n_keys; k++) {
                                const struct config_key *key = &cfg->pools[p].keys[k];
                                const char *why = key->secret ? keyid_weak(key->secret, strlen(key->secret)) : NULL;

                                if (why)
                                        fprintf(stderr, "%s: warning: pool '%s' key %u (%s) is weak: %s\n", path,
                                                cfg->pools[p].name, k + 1, key->id, why);
                        }
                printf("%s: configuration OK: %u pools, %u keys, %u providers\n",
                       path, cfg->n_pools, cfg->n_keys, cfg->n_providers);
                config_free(cfg);
                return 0;
        }

        raise_fd_limit();
        return supervisor_run(cfg);
}
