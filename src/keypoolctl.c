/* keypoolctl.c — the operator's client: keypoold's socket from the shell.
 *
 * Owns the command line (options, one function per command), the HTTP exchange with the daemon
 * over its UNIX socket (libcurl) and the exit statuses scripts rely on: 0 success, 1 refused or
 * failed, 2 usage error, 3 daemon unreachable. How documents look to people is ctl.c's business;
 * with --json the daemon's own JSON is printed instead. Admin commands are only requests: the
 * daemon decides, from the peer's credentials, whether to obey.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* asprintf */
#endif
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "keypool/conf.h"
#include "keypool/ctl.h"
#include "keypool/fileio.h"
#include "keypool/persist.h"

enum {
        EXIT_OK = 0,
        EXIT_FAILED = 1,
        EXIT_USAGE = 2,
        EXIT_UNREACHABLE = 3,
};

/* Options after the command name: each command says which it takes. */
enum {
        OPT_LIMIT = 1 << 0,
        OPT_POOL = 1 << 1,
        OPT_KEY = 1 << 2,
        OPT_INTERVAL = 1 << 3,
        OPT_CLUSTER = 1 << 4,
};

#define REQUEST_TIMEOUT_MS 30000L
#define CONNECT_TIMEOUT_MS 5000L
#define WATCH_TIMEOUT_MS 10000L
#define MAX_DOCUMENT (64u << 20)        /* far above any real state file; stops a runaway read */

struct ctl {
        const char *socket;
        bool json;
        bool terminal;                  /* stdout is a terminal */
        bool colour;
        unsigned limit;                 /* history -n; 0 = the daemon's default */
        const char *pool;               /* history --pool */
        const char *key;                /* history --key */
        bool cluster;                   /* keys --cluster: counters summed over the cluster */
        double interval;                /* watch --interval, seconds */
        long timeout_ms;
        CURL *curl;
        char curl_error[CURL_ERROR_SIZE];
        char error[CURL_ERROR_SIZE + PATH_MAX + 64];    /* why the last exchange failed */
};

struct reply {
        long status;
        char *body;
        size_t size;
};

static volatile sig_atomic_t interrupted;

static void usage(FILE *out) {
        fprintf(out,
                "Usage: keypoolctl [-s SOCKET] [--json] COMMAND [ARGS]\n"
                "Show and steer keypoold's key pools over its UNIX socket.\n"
                "\n"
                "Commands:\n"
                "  status                 the daemon, its workers, and a summary per pool\n"
                "  health                 whether every pool has a ready key (exit 1 when degraded)\n"
                "  keys [--cluster] [POOL] every key: state, reason, cooldown left, counters (with\n"
                "                         --cluster: counted by every node of the cluster)\n"
                "  history [-n N] [--pool POOL] [--key ID]\n"
                "                         rotation events, oldest first (the daemon's last 100 by default)\n"
                "  disable ID             take a key out of rotation until it is enabled again\n"
                "  enable ID              put a key back into rotation\n"
                "  probe ID               test a key with one request now\n"
                "  export FILE            save the daemon's state (no secrets) to FILE, mode 0600 (\"-\": stdout)\n"
                "  import FILE            load a state document written by export (\"-\": stdin)\n"
                "  watch [--interval S]   the keys table, refreshed every S seconds (default 1) until Ctrl-C\n"
                "  check                  the shared table's consistency check: \"ok\", or each problem (exit 1)\n"
                "  names commands|pools|keys [POOL]\n"
                "                         one name per line, for shell completion and scripts\n"
                "\n"
                "disable, enable, probe, export, import and check are allowed to root and keypoold's own user.\n"
                "\n"
                "Options:\n"
                "  -s, --socket SOCKET    the daemon's socket (default $KEYPOOL_SOCKET, else %s)\n"
                "      --json             print the daemon's JSON instead of tables\n"
                "  -h, --help             show this help and exit\n"
                "      --version          show the version and exit\n"
                "\n"
                "Exit status: 0 success, 1 refused or failed, 2 usage error, 3 daemon unreachable.\n",
                CONFIG_DEFAULT_SOCKET);
}

static void complain(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void complain(const char *fmt, ...) {
        va_list ap;

        fputs("keypoolctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...) {
        va_list ap;

        fputs("keypoolctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputs("\n\n", stderr);
        usage(stderr);
        return EXIT_USAGE;
}

/* A formatted, malloc'ed string, or NULL when out of memory (asprintf leaves its pointer
 * undefined then, which makes cleanup paths awkward). */
static char *text_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *text_printf(const char *fmt, ...) {
        va_list ap;
        char *s;
        int r;

        va_start(ap, fmt);
        r = vasprintf(&s, fmt, ap);
        va_end(ap);
        return r < 0 ? NULL : s;
}

/* --- talking to the daemon ---------------------------------------------------------------- */

static void reply_done(struct reply *r) {
        free(r->body);
        *r = (struct reply) {};
}

static size_t on_data(char *data, size_t size, size_t n, void *userdata) {
        struct reply *r = userdata;
        size_t len = size * n;
        char *grown;

        if (len > MAX_DOCUMENT - r->size)
                return 0;               /* aborts the transfer */
        grown = realloc(r->body, r->size + len + 1);
        if (!grown)
                return 0;
        memcpy(grown + r->size, data, len);
        r->size += len;
        grown[r->size] = '\0';
        r->body = grown;
        return len;
}

/* Whether SIGINT or SIGTERM asked a watch to stop: delivered already, or (blocked while a
 * request runs) waiting to be. */
static bool stop_requested(void) {
        sigset_t pending;

        if (interrupted)
                return true;
        if (sigpending(&pending) < 0)
                return false;
        return sigismember(&pending, SIGINT) == 1 || sigismember(&pending, SIGTERM) == 1;
}

/* Lets Ctrl-C end a watch at once instead of after the request in progress. */
static int on_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow) {
        return stop_requested() ? 1 : 0;
}

/* One HTTP exchange: EXIT_OK with ret filled whenever the daemon answered, whatever the status;
 * otherwise EXIT_UNREACHABLE (nothing accepted the connection) or EXIT_FAILED, with c->error
 * saying why. */
static int exchange(struct ctl *c, const char *method, const char *path, const char *body, size_t size,
                    struct reply *ret) {
        struct curl_slist *headers = NULL;
        struct reply r = {};
        char *url = NULL;
        CURLcode cc;
        long os_errno = 0;
        curl_off_t connect_us = 0;

        /* Expect: 100-continue would cost a round trip (or a stall) on a large import. */
        headers = curl_slist_append(NULL, body ? "Content-Type: application/json" : "Expect:");
        if (headers && body && !curl_slist_append(headers, "Expect:")) {
                curl_slist_free_all(headers);
                headers = NULL;
        }
        url = headers ? text_printf("http://keypool%s", path) : NULL;
        if (!url) {
                curl_slist_free_all(headers);
                snprintf(c->error, sizeof(c->error), "out of memory");
                return EXIT_FAILED;
        }

        c->error[0] = c->curl_error[0] = '\0';
        curl_easy_setopt(c->curl, CURLOPT_URL, url);
        curl_easy_setopt(c->curl, CURLOPT_UNIX_SOCKET_PATH, c->socket);
        curl_easy_setopt(c->curl, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c->curl, CURLOPT_CONNECTTIMEOUT_MS, CONNECT_TIMEOUT_MS);
        curl_easy_setopt(c->curl, CURLOPT_TIMEOUT_MS, c->timeout_ms);
        curl_easy_setopt(c->curl, CURLOPT_USERAGENT, "keypoolctl/" PACKAGE_VERSION);
        curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, headers);
        curl_easy_setopt(c->curl, CURLOPT_WRITEFUNCTION, on_data);
        curl_easy_setopt(c->curl, CURLOPT_WRITEDATA, &r);
        curl_easy_setopt(c->curl, CURLOPT_ERRORBUFFER, c->curl_error);
        curl_easy_setopt(c->curl, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(c->curl, CURLOPT_XFERINFOFUNCTION, on_progress);
        if (strcmp(method, "POST") == 0) {
                curl_easy_setopt(c->curl, CURLOPT_POST, 1L);
                curl_easy_setopt(c->curl, CURLOPT_POSTFIELDS, body ? body : "");
                curl_easy_setopt(c->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) (body ? size : 0));
        } else {
                curl_easy_setopt(c->curl, CURLOPT_HTTPGET, 1L);
        }

        cc = curl_easy_perform(c->curl);
        curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, NULL);
        curl_slist_free_all(headers);
        free(url);

        if (cc == CURLE_OK) {
                curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &r.status);
                *ret = r;
                return EXIT_OK;
        }
        reply_done(&r);
        curl_easy_getinfo(c->curl, CURLINFO_OS_ERRNO, &os_errno);
        curl_easy_getinfo(c->curl, CURLINFO_CONNECT_TIME_T, &connect_us);
        if (cc == CURLE_COULDNT_CONNECT || (cc == CURLE_OPERATION_TIMEDOUT && connect_us == 0)) {
                /* The system's reason ("No such file or directory", "Permission denied",
                 * "Connection refused") tells an operator more than curl's wording does. */
                snprintf(c->error, sizeof(c->error), "keypoold is not reachable on %s: %s", c->socket,
                         os_errno ? strerror((int) os_errno) : curl_easy_strerror(cc));
                return EXIT_UNREACHABLE;
        }
        if (cc == CURLE_ABORTED_BY_CALLBACK) {
                snprintf(c->error, sizeof(c->error), "interrupted");
                return EXIT_FAILED;
        }
        snprintf(c->error, sizeof(c->error), "%s %s on %s failed: %s", method, path, c->socket,
                 c->curl_error[0] ? c->curl_error : curl_easy_strerror(cc));
        return EXIT_FAILED;
}

/* exchange() for a command that expects success: a refusal is reported with the daemon's own
 * words, prefixed by what was asked ("disable kp-…: unknown key … (not_found, HTTP 404)"). */
static int request(struct ctl *c, const char *what, const char *method, const char *path,
                   const char *body, size_t size, struct reply *ret) {
        char *text;
        int r;

        r = exchange(c, method, path, body, size, ret);
        if (r != EXIT_OK) {
                complain("%s", c->error);
                return r;
        }
        if (ret->status >= 200 && ret->status < 300)
                return EXIT_OK;
        text = ctl_error_text(ret->status, ret->body, ret->size);
        complain("%s: %s", what, text ? text : "refused");
        free(text);
        reply_done(ret);
        return EXIT_FAILED;
}

static int parse_reply(const struct reply *r, const char *what, json_t **ret) {
        json_error_t e;
        json_t *doc = json_loadb(r->body ? r->body : "", r->size, 0, &e);

        if (!doc) {
                complain("%s: the daemon's answer is not JSON: %s", what, e.text);
                return EXIT_FAILED;
        }
        *ret = doc;
        return EXIT_OK;
}

/* --json: the daemon's document for scripts. Indented on a terminal for the eye; as received
 * otherwise, so a script sees exactly what the daemon said. */
static int print_json(const struct ctl *c, const struct reply *r) {
        json_t *doc = c->terminal && r->size ? json_loadb(r->body, r->size, 0, NULL) : NULL;

        if (doc) {
                json_dumpf(doc, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
                json_decref(doc);
        } else if (r->size) {
                fwrite(r->body, 1, r->size, stdout);
        }
        if (r->size == 0 || r->body[r->size - 1] != '\n')
                fputc('\n', stdout);
        return EXIT_OK;
}

/* The answer for people (writer) or, with --json, for scripts. */
static int show(const struct ctl *c, const struct reply *r, const char *what, ctl_writer writer) {
        json_t *doc;
        int r2;

        if (c->json)
                return print_json(c, r);
        r2 = parse_reply(r, what, &doc);
        if (r2 != EXIT_OK)
                return r2;
        r2 = writer(stdout, doc, c->colour);
        json_decref(doc);
        if (r2 == -EINVAL) {
                complain("%s: the daemon's answer does not have the expected shape", what);
                return EXIT_FAILED;
        }
        return EXIT_OK;         /* write errors are caught once, when stdout is flushed */
}

/* GET path and show the answer. */
static int get_and_show(struct ctl *c, const char *what, const char *path, ctl_writer writer) {
        struct reply r = {};
        int ret;

        ret = request(c, what, "GET", path, NULL, 0, &r);
        if (ret != EXIT_OK)
                return ret;
        ret = show(c, &r, what, writer);
        reply_done(&r);
        return ret;
}

/* --- files -------------------------------------------------------------------------------- */

/* The whole of path ("-": stdin) as a NUL-terminated buffer. A named file is read as the daemon
 * reads its own: without blocking, and only when it is a regular file (-EBADFD, -EISDIR). */
static int read_all(const char *path, char **ret, size_t *ret_size) {
        FILE *f = stdin;
        char *buf = NULL;
        size_t size = 0, allocated = 0;
        int r = 0;

        if (strcmp(path, "-") != 0)
                return fileio_read(path, MAX_DOCUMENT, ret, ret_size);
        for (;;) {
                size_t n;

                if (allocated - size < 65536 + 1) {
                        char *grown;

                        if (allocated > MAX_DOCUMENT) {
                                r = -EFBIG;
                                break;
                        }
                        grown = realloc(buf, allocated + 65536 * 4);
                        if (!grown) {
                                r = -ENOMEM;
                                break;
                        }
                        buf = grown;
                        allocated += 65536 * 4;
                }
                errno = 0;
                n = fread(buf + size, 1, allocated - size - 1, f);
                size += n;
                if (n == 0) {
                        if (ferror(f))
                                r = errno > 0 ? -errno : -EIO;     /* EISDIR says more than EIO */
                        break;
                }
        }
        if (r < 0) {
                free(buf);
                return r;
        }
        buf[size] = '\0';
        *ret = buf;
        *ret_size = size;
        return 0;
}

/* --- the commands ------------------------------------------------------------------------- */

static int cmd_status(struct ctl *c, char **args) {
        return get_and_show(c, "status", "/status", ctl_write_status);
}

/* A degraded daemon answers 503 with a full document: show it, and let the exit status say it. */
static int cmd_health(struct ctl *c, char **args) {
        struct reply r = {};
        int ret;

        ret = exchange(c, "GET", "/health", NULL, 0, &r);
        if (ret != EXIT_OK) {
                complain("%s", c->error);
                return ret;
        }
        if (r.status != 200 && r.status != 503) {
                char *text = ctl_error_text(r.status, r.body, r.size);

                complain("health: %s", text ? text : "refused");
                free(text);
                reply_done(&r);
                return EXIT_FAILED;
        }
        ret = show(c, &r, "health", ctl_write_health);
        if (ret == EXIT_OK && r.status == 503) {
                complain("health: keypoold is degraded: a pool has no key ready to serve");
                ret = EXIT_FAILED;
        }
        reply_done(&r);
        return ret;
}

static int cmd_keys(struct ctl *c, char **args) {
        char *path = NULL, *pool = NULL;
        int ret;

        if (args[0]) {
                pool = ctl_url_escape(args[0]);
                path = pool ? text_printf("/api/key-status?pool=%s%s", pool, c->cluster ? "&scope=cluster" : "")
                            : NULL;
                free(pool);
                if (!path) {
                        complain("out of memory");
                        return EXIT_FAILED;
                }
        }
        ret = get_and_show(c, "keys", path ? path : c->cluster ? "/api/key-status?scope=cluster"
                                                               : "/api/key-status", ctl_write_keys);
        free(path);
        return ret;
}

static int cmd_history(struct ctl *c, char **args) {
        char *path = ctl_history_path(c->limit, c->pool, c->key);
        int ret;

        if (!path) {
                complain("out of memory");
                return EXIT_FAILED;
        }
        ret = get_and_show(c, "history", path, ctl_write_history);
        free(path);
        return ret;
}

/* The table's consistency check: exit 0 when it holds, 1 with each problem printed. */
static int cmd_check(struct ctl *c, char **args) {
        struct reply r = {};
        json_t *doc = NULL;
        int ret;

        ret = request(c, "check", "GET", "/api/check", NULL, 0, &r);
        if (ret != EXIT_OK)
                return ret;
        ret = show(c, &r, "check", ctl_write_check);
        if (ret == EXIT_OK && parse_reply(&r, "check", &doc) == EXIT_OK &&
            !json_is_true(json_object_get(doc, "ok")))
                ret = EXIT_FAILED;
        json_decref(doc);
        reply_done(&r);
        return ret;
}

/* POST /api/keys/{id}/{action}: disable, enable and probe differ only in what they print. */
static int key_action(struct ctl *c, const char *action, const char *id, ctl_writer writer) {
        struct reply r = {};
        char *eid = ctl_url_escape(id);
        char *path = eid ? text_printf("/api/keys/%s/%s", eid, action) : NULL;
        char *what = text_printf("%s %s", action, id);
        int ret = EXIT_FAILED;

        if (!path || !what) {
                complain("out of memory");
                goto finish;
        }
        ret = request(c, what, "POST", path, NULL, 0, &r);
        if (ret != EXIT_OK)
                goto finish;
        if (writer)
                ret = show(c, &r, what, writer);
        else if (c->json)
                ret = print_json(c, &r);
        else
                printf("a probe of %s is scheduled; its outcome shows in 'keypoolctl keys' and 'keypoolctl history'\n", id);
finish:
        reply_done(&r);
        free(eid);
        free(path);
        free(what);
        return ret;
}

static int cmd_disable(struct ctl *c, char **args) {
        return key_action(c, "disable", args[0], ctl_write_key_action);
}

static int cmd_enable(struct ctl *c, char **args) {
        return key_action(c, "enable", args[0], ctl_write_key_action);
}

static int cmd_probe(struct ctl *c, char **args) {
        return key_action(c, "probe", args[0], NULL);
}

static int cmd_export(struct ctl *c, char **args) {
        const char *file = args[0];
        struct reply r = {};
        size_t n_keys = 0, n_events = 0;
        json_t *doc = NULL;
        int ret;

        ret = request(c, "export", "POST", "/api/state/export", NULL, 0, &r);
        if (ret != EXIT_OK)
                return ret;
        ret = parse_reply(&r, "export", &doc);
        if (ret != EXIT_OK)
                goto finish;
        /* Never leave a file that import would refuse later, when it is needed. */
        if (ctl_state_summary(doc, &n_keys, &n_events) < 0) {
                complain("export: the daemon's answer is not a keypool state document");
                ret = EXIT_FAILED;
                goto finish;
        }
        if (strcmp(file, "-") == 0) {
                ret = print_json(c, &r);
                goto finish;
        }
        /* Atomically and 0600, as the daemon saves its own state: a reader (or a crash) sees the
         * old file or the new one, and the counters and history are the operator's business. */
        ret = persist_save(file, r.body ? r.body : "");
        if (ret < 0) {
                complain("export: cannot write %s: %s", file, strerror(-ret));
                ret = EXIT_FAILED;
                goto finish;
        }
        if (!c->json)
                printf("exported %zu key%s and %zu event%s to %s\n",
                       n_keys, n_keys == 1 ? "" : "s", n_events, n_events == 1 ? "" : "s", file);
        ret = EXIT_OK;
finish:
        json_decref(doc);
        reply_done(&r);
        return ret;
}

static int cmd_import(struct ctl *c, char **args) {
        const char *file = args[0];
        struct reply r = {};
        json_error_t e;
        json_t *doc;
        char *body = NULL;
        size_t size = 0;
        int ret;

        ret = read_all(file, &body, &size);
        if (ret == -EBADFD || ret == -EISDIR) {
                complain("import: cannot read %s: not a regular file (%s)", file, fileio_kind(file));
                return EXIT_FAILED;
        }
        if (ret < 0) {
                complain("import: cannot read %s: %s", file, strerror(-ret));
                return EXIT_FAILED;
        }
        /* The daemon judges the document; a file that is not even JSON is caught here, where the
         * line number can still be told. */
        doc = json_loadb(body, size, 0, &e);
        if (!doc) {
                complain("import: %s is not JSON: line %d: %s", file, e.line, e.text);
                free(body);
                return EXIT_FAILED;
        }
        json_decref(doc);
        ret = request(c, "import", "POST", "/api/state/import", body, size, &r);
        free(body);
        if (ret != EXIT_OK)
                return ret;
        ret = show(c, &r, "import", ctl_write_import);
        reply_done(&r);
        return ret;
}

/* One pool name, or one key id, per line from the key-status document: what shell completion
 * offers. Reading /api/key-status keeps it to what any client may see. */
static int names_from_daemon(struct ctl *c, bool keys, const char *only_pool) {
        struct reply r = {};
        json_t *doc, *pool;
        size_t i;
        int ret;

        ret = request(c, "names", "GET", "/api/key-status", NULL, 0, &r);
        if (ret != EXIT_OK)
                return ret;
        ret = parse_reply(&r, "names", &doc);
        reply_done(&r);
        if (ret != EXIT_OK)
                return ret;
        json_array_foreach(json_object_get(doc, "pools"), i, pool) {
                const char *name = json_string_value(json_object_get(pool, "name"));
                json_t *key;
                size_t j;

                if (!name || (only_pool && strcmp(only_pool, name) != 0))
                        continue;
                if (!keys) {
                        printf("%s\n", name);
                        continue;
                }
                json_array_foreach(json_object_get(pool, "keys"), j, key) {
                        const char *id = json_string_value(json_object_get(key, "id"));

                        if (id)
                                printf("%s\n", id);
                }
        }
        json_decref(doc);
        return EXIT_OK;
}

static void on_interrupt(int sig) {
        interrupted = 1;
}

static void timespec_add(struct timespec *t, double seconds) {
        time_t whole = (time_t) seconds;

        t->tv_sec += whole;
        t->tv_nsec += (long) ((seconds - (double) whole) * 1e9);
        if (t->tv_nsec >= 1000000000L) {
                t->tv_sec++;
                t->tv_nsec -= 1000000000L;
        }
}

static bool timespec_passed(const struct timespec *t) {
        struct timespec now;

        clock_gettime(CLOCK_MONOTONIC, &now);
        return now.tv_sec > t->tv_sec || (now.tv_sec == t->tv_sec && now.tv_nsec >= t->tv_nsec);
}

/* Sleeps until the monotonic deadline, or until SIGINT/SIGTERM. The signals are blocked
 * everywhere else and let in only inside ppoll(), atomically: one that arrives just before
 * the sleep ends it at once, instead of being noticed an interval later. */
static void sleep_until(const struct timespec *deadline, const sigset_t *wait_mask) {
        while (!interrupted && !timespec_passed(deadline)) {
                struct timespec now, left;

                clock_gettime(CLOCK_MONOTONIC, &now);
                left.tv_sec = deadline->tv_sec - now.tv_sec;
                left.tv_nsec = deadline->tv_nsec - now.tv_nsec;
                if (left.tv_nsec < 0) {
                        left.tv_sec--;
                        left.tv_nsec += 1000000000L;
                }
                if (left.tv_sec < 0)
                        break;
                (void) ppoll(NULL, 0, &left, wait_mask);
        }
}

static void watch_frame(struct ctl *c, const struct reply *r, const char *failure) {
        char stamp[32];
        time_t now = time(NULL);
        struct tm tm;

        if (c->json) {
                if (!failure)
                        printf("%.*s%s", (int) r->size, r->body,
                               r->size && r->body[r->size - 1] == '\n' ? "" : "\n");
                fflush(stdout);
                return;
        }
        strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S", localtime_r(&now, &tm));
        if (c->terminal)
                fputs("\033[H\033[2J", stdout);         /* home, clear screen */
        else
                fputc('\n', stdout);
        printf("keypool on %s, every %gs, %s%s\n\n", c->socket, c->interval, stamp,
               c->terminal ? " (Ctrl-C to quit)" : "");
        if (failure) {
                printf("%s\n", failure);
        } else {
                json_t *doc = json_loadb(r->body ? r->body : "", r->size, 0, NULL);

                if (!doc || ctl_write_keys(stdout, doc, c->colour) == -EINVAL)
                        printf("the daemon's answer is not a key-status document\n");
                json_decref(doc);
        }
        fflush(stdout);
}

/* The keys table, redrawn every interval until interrupted. Only the first answer decides the
 * exit status: once watching, a daemon restart is something to see, not a reason to quit. */
static int cmd_watch(struct ctl *c, char **args) {
        struct sigaction sa = { .sa_handler = on_interrupt };
        sigset_t stop_signals, wait_mask;
        struct timespec next;
        bool first = true;

        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        sigemptyset(&stop_signals);
        sigaddset(&stop_signals, SIGINT);
        sigaddset(&stop_signals, SIGTERM);
        sigprocmask(SIG_BLOCK, &stop_signals, &wait_mask);
        c->timeout_ms = WATCH_TIMEOUT_MS;
        clock_gettime(CLOCK_MONOTONIC, &next);

        while (!stop_requested()) {
                struct reply r = {};
                int ret;

                ret = exchange(c, "GET", "/api/key-status", NULL, 0, &r);
                if (stop_requested()) {
                        reply_done(&r);
                        break;
                }
                if (ret == EXIT_OK && r.status != 200) {
                        char *text = ctl_error_text(r.status, r.body, r.size);

                        snprintf(c->error, sizeof(c->error), "watch: %s", text ? text : "refused");
                        free(text);
                        ret = EXIT_FAILED;
                }
                if (ret != EXIT_OK && first) {
                        complain("%s", c->error);
                        reply_done(&r);
                        return ret;
                }
                watch_frame(c, &r, ret == EXIT_OK ? NULL : c->error);
                reply_done(&r);
                first = false;

                /* Ticks on a fixed grid, so a slow answer does not make the view drift; a frame
                 * that overran its tick skips to the next one rather than bunching up. */
                do
                        timespec_add(&next, c->interval);
                while (timespec_passed(&next));
                sleep_until(&next, &wait_mask);
        }
        return EXIT_OK;
}

/* --- the command line --------------------------------------------------------------------- */

struct command {
        const char *name;
        unsigned min_args, max_args;
        unsigned options;               /* OPT_* it accepts */
        int (*run)(struct ctl *c, char **args);
};

static int cmd_names(struct ctl *c, char **args);

static const struct command commands[] = {
        { "status",  0, 0, 0,                           cmd_status },
        { "health",  0, 0, 0,                           cmd_health },
        { "keys",    0, 1, OPT_CLUSTER,                 cmd_keys },
        { "history", 0, 0, OPT_LIMIT | OPT_POOL | OPT_KEY, cmd_history },
        { "disable", 1, 1, 0,                           cmd_disable },
        { "enable",  1, 1, 0,                           cmd_enable },
        { "probe",   1, 1, 0,                           cmd_probe },
        { "export",  1, 1, 0,                           cmd_export },
        { "import",  1, 1, 0,                           cmd_import },
        { "watch",   0, 0, OPT_INTERVAL,                cmd_watch },
        { "check",   0, 0, 0,                           cmd_check },
        { "names",   1, 2, 0,                           cmd_names },
};

/* names commands needs the table above it; the daemon is asked only for pools and keys. */
static int cmd_names(struct ctl *c, char **args) {
        if (strcmp(args[0], "commands") == 0) {
                if (args[1])
                        return usage_error("names commands takes no POOL");
                for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
                        printf("%s\n", commands[i].name);
                return EXIT_OK;
        }
        if (strcmp(args[0], "pools") == 0) {
                if (args[1])
                        return usage_error("names pools takes no POOL");
                return names_from_daemon(c, false, NULL);
        }
        if (strcmp(args[0], "keys") == 0)
                return names_from_daemon(c, true, args[1]);
        return usage_error("names wants commands, pools or keys, not '%s'", args[0]);
}

static const struct command *find_command(const char *name) {
        for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
                if (strcmp(commands[i].name, name) == 0)
                        return &commands[i];
        return NULL;
}

static const char *option_name(unsigned opt) {
        switch (opt) {
        case OPT_LIMIT:    return "-n";
        case OPT_POOL:     return "--pool";
        case OPT_KEY:      return "--key";
        case OPT_INTERVAL: return "--interval";
        case OPT_CLUSTER:  return "--cluster";
        }
        return "?";
}

static int parse_limit(const char *s, unsigned *ret) {
        char *end;
        long v;

        errno = 0;
        v = strtol(s, &end, 10);
        if (errno || end == s || *end || v < 1 || v > INT_MAX)
                return -EINVAL;
        *ret = (unsigned) v;
        return 0;
}

static int parse_interval(const char *s, double *ret) {
        char *end;
        double v;

        errno = 0;
        v = strtod(s, &end);
        if (errno || end == s || *end || !(v >= 0.1 && v <= 3600))
                return -EINVAL;
        *ret = v;
        return 0;
}

int main(int argc, char **argv) {
        enum { ARG_JSON = 256, ARG_VERSION, ARG_POOL, ARG_KEY, ARG_INTERVAL, ARG_CLUSTER };
        static const struct option options[] = {
                { "socket", required_argument, NULL, 's' },
                { "json", no_argument, NULL, ARG_JSON },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "limit", required_argument, NULL, 'n' },
                { "pool", required_argument, NULL, ARG_POOL },
                { "key", required_argument, NULL, ARG_KEY },
                { "interval", required_argument, NULL, ARG_INTERVAL },
                { "cluster", no_argument, NULL, ARG_CLUSTER },
                {}
        };
        struct ctl c = { .interval = 1.0, .timeout_ms = REQUEST_TIMEOUT_MS };
        const struct command *cmd;
        unsigned given = 0, n_args;
        const char *env;
        int opt, ret;

        env = getenv("KEYPOOL_SOCKET");
        c.socket = env && *env ? env : CONFIG_DEFAULT_SOCKET;

        /* Options may come before or after the command ("keypoolctl keys --json"). */
        opterr = 0;
        while ((opt = getopt_long(argc, argv, ":s:hn:", options, NULL)) != -1) {
                switch (opt) {
                case 's':
                        c.socket = optarg;
                        break;
                case ARG_JSON:
                        c.json = true;
                        break;
                case 'h':
                        usage(stdout);
                        return EXIT_OK;
                case ARG_VERSION:
                        printf("keypoolctl %s\n", PACKAGE_VERSION);
                        return EXIT_OK;
                case 'n':
                        if (parse_limit(optarg, &c.limit) < 0)
                                return usage_error("-n wants a count of events (1 or more), not '%s'", optarg);
                        given |= OPT_LIMIT;
                        break;
                case ARG_POOL:
                        c.pool = optarg;
                        given |= OPT_POOL;
                        break;
                case ARG_KEY:
                        c.key = optarg;
                        given |= OPT_KEY;
                        break;
                case ARG_INTERVAL:
                        if (parse_interval(optarg, &c.interval) < 0)
                                return usage_error("--interval wants seconds between 0.1 and 3600, not '%s'", optarg);
                        given |= OPT_INTERVAL;
                        break;
                case ARG_CLUSTER:
                        c.cluster = true;
                        given |= OPT_CLUSTER;
                        break;
                case ':':
                        return usage_error("option '%s' needs an argument", argv[optind - 1]);
                default:
                        if (optopt)
                                return usage_error("unknown option '-%c'", optopt);
                        return usage_error("unknown option '%s'", argv[optind - 1]);
                }
        }

        if (optind >= argc)
                return usage_error("no command given");
        cmd = find_command(argv[optind]);
        if (!cmd)
                return usage_error("unknown command '%s'", argv[optind]);
        n_args = (unsigned) (argc - optind - 1);
        if (n_args < cmd->min_args)
                return usage_error("'%s' needs an argument", cmd->name);
        if (n_args > cmd->max_args)
                return usage_error("'%s' does not take '%s'", cmd->name, argv[optind + 1 + cmd->max_args]);
        for (unsigned o = OPT_LIMIT; o <= OPT_CLUSTER; o <<= 1)
                if ((given & o) && !(cmd->options & o))
                        return usage_error("option %s does not apply to '%s'", option_name(o), cmd->name);
        if (!*c.socket || strlen(c.socket) >= sizeof(((struct sockaddr_un *) NULL)->sun_path))
                return usage_error("the socket path must be 1 to %zu bytes long",
                                   sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1);

        c.terminal = isatty(STDOUT_FILENO);
        c.colour = ctl_want_colour(c.terminal, getenv("NO_COLOR"), getenv("TERM"));

        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
                complain("cannot initialize libcurl");
                return EXIT_FAILED;
        }
        c.curl = curl_easy_init();
        if (!c.curl) {
                complain("cannot initialize libcurl");
                curl_global_cleanup();
                return EXIT_FAILED;
        }
        ret = cmd->run(&c, argv + optind + 1);
        curl_easy_cleanup(c.curl);
        curl_global_cleanup();

        if (fflush(stdout) != 0 || ferror(stdout)) {
                complain("cannot write the output: %s", strerror(errno));
                return EXIT_FAILED;
        }
        return ret;
}
