/* supervisor.c — the coordinator: keypoold's main process.
 *
 * One state machine (starting → running → stopping → stopped), advanced by signals and by
 * worker exits, each transition logged. Workers are identified by their position (0 … workers-1);
 * a position keeps its crash history so a worker that dies right after starting is respawned
 * after a growing delay instead of in a tight loop.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <systemd/sd-event.h>

#include "keypool/clock.h"
#include "keypool/keytable.h"
#include "keypool/log.h"
#include "keypool/supervisor.h"
#include "keypool/worker.h"

#define MAX_WORKERS             64
#define QUICK_DEATH_MS          2000            /* a worker that dies sooner counts as a crash */
#define RESPAWN_MIN_DELAY_MS    100
#define RESPAWN_MAX_DELAY_MS    10000
#define STOP_GRACEFUL_USEC      (30ULL * 1000000)
#define STOP_FAST_USEC          (5ULL * 1000000)
#define STOP_IMMEDIATE_USEC     (1ULL * 1000000)

enum supervisor_state {
        STATE_STARTING = 1,
        STATE_RUNNING,
        STATE_STOPPING,
        STATE_STOPPED,
        _STATE_MAX,
};

static const char *const state_names[_STATE_MAX] = {
        [STATE_STARTING] = "starting",
        [STATE_RUNNING] = "running",
        [STATE_STOPPING] = "stopping",
        [STATE_STOPPED] = "stopped",
};

struct child {
        struct supervisor *owner;
        unsigned position;              /* 0 … workers-1 */
        pid_t pid;                      /* 0 when no process runs at this position */
        unsigned slot;
        int64_t started_ms;
        unsigned crashes;               /* quick deaths in a row */
        sd_event_source *exit_source;
        sd_event_source *respawn_timer;
};

struct supervisor {
        const struct config *config;
        enum supervisor_state state;
        sd_event *event;
        struct keytable *table;
        int listen_fd;
        int *wake_fds;                  /* one eventfd per worker slot, shared by all workers */
        unsigned n_wake_fds;
        bool own_socket;                /* we created the socket file and remove it at exit */
        pid_t pid;
        unsigned generation;
        struct child children[MAX_WORKERS];
        unsigned n_children;            /* positions in use */
        sd_event_source *stop_timer;
        int stop_signal;                /* what workers were told to stop with */
};

static int spawn(struct supervisor *s, unsigned position);

static void set_state(struct supervisor *s, enum supervisor_state next) {
        if (s->state == next)
                return;
        log_info("coordinator: %s → %s", s->state ? state_names[s->state] : "none", state_names[next]);
        s->state = next;
}

static unsigned live_children(const struct supervisor *s) {
        unsigned n = 0;

        for (unsigned i = 0; i < s->n_children; i++)
                n += s->children[i].pid > 0;
        return n;
}

static void maybe_stopped(struct supervisor *s) {
        if (s->state == STATE_STOPPING && live_children(s) == 0) {
                set_state(s, STATE_STOPPED);
                sd_event_exit(s->event, 0);
        }
}

/* --- workers ----------------------------------------------------------------------------- */

static int on_respawn_due(sd_event_source *src, uint64_t usec, void *userdata) {
        struct child *c = userdata;

        c->respawn_timer = sd_event_source_disable_unref(c->respawn_timer);
        if (c->owner->state == STATE_RUNNING)
                spawn(c->owner, c->position);
        return 0;
}

static void schedule_respawn(struct supervisor *s, unsigned position) {
        struct child *c = &s->children[position];
        uint64_t delay_ms = 0;

        if (c->crashes > 0) {
                delay_ms = RESPAWN_MIN_DELAY_MS << (c->crashes > 8 ? 8 : c->crashes - 1);
                if (delay_ms > RESPAWN_MAX_DELAY_MS)
                        delay_ms = RESPAWN_MAX_DELAY_MS;
        }
        if (delay_ms == 0) {
                spawn(s, position);
                return;
        }
        log_warning("worker %u keeps dying: respawning in %llu ms", position, (unsigned long long) delay_ms);
        if (sd_event_add_time_relative(s->event, &c->respawn_timer, CLOCK_MONOTONIC, delay_ms * 1000, 0,
                                       on_respawn_due, c) < 0)
                spawn(s, position);
}

static int on_worker_exit(sd_event_source *src, const siginfo_t *si, void *userdata) {
        struct child *c = userdata;
        struct supervisor *s = c->owner;
        struct log_fields f = LOG_FIELDS_NONE;
        int64_t lived = clock_mono_ms() - c->started_ms;
        bool clean = si->si_code == CLD_EXITED && si->si_status == 0;

        /* sd-event reaped the process already; the table keeps what it held until now. Its
         * leases may have held keys other workers' requests wait for: wake them all. */
        keytable_slot_release(s->table, c->slot);
        for (unsigned i = 0; i < s->n_wake_fds; i++) {
                uint64_t one = 1;

                if (s->wake_fds[i] >= 0)
                        (void) !write(s->wake_fds[i], &one, sizeof one);
        }
        c->exit_source = sd_event_source_disable_unref(c->exit_source);
        f.worker = c->pid;
        if (si->si_code == CLD_EXITED)
                log_event(clean || s->state == STATE_STOPPING ? LOG_INFO : LOG_WARNING, "worker_exit", &f,
                          "worker %u exited with status %d", c->position, si->si_status);
        else
                log_event(s->state == STATE_STOPPING ? LOG_INFO : LOG_WARNING, "worker_exit", &f,
                          "worker %u killed by signal %s", c->position, strsignal(si->si_status));
        c->pid = 0;

        if (s->state != STATE_RUNNING) {
                maybe_stopped(s);
                return 0;
        }
        c->crashes = lived < QUICK_DEATH_MS ? c->crashes + 1 : 0;
        schedule_respawn(s, c->position);
        return 0;
}

static int spawn(struct supervisor *s, unsigned position) {
        struct child *c = &s->children[position];
        struct log_fields f = LOG_FIELDS_NONE;
        unsigned slot;
        pid_t pid;
        int r;

        r = keytable_slot_claim(s->table, s->generation, clock_mono_ms(), &slot);
        if (r < 0) {
                log_error("no free worker slot for worker %u: %s", position, strerror(-r));
                return r;
        }
        pid = fork();
        if (pid < 0) {
                r = -errno;
                keytable_slot_release(s->table, slot);
                log_error("fork failed for worker %u: %s", position, strerror(-r));
                c->crashes++;
                schedule_respawn(s, position);
                return r;
        }
        if (pid == 0) {
                struct worker_params wp = {
                        .config = s->config,
                        .table = s->table,
                        .slot = slot,
                        .generation = s->generation,
                        .listen_fd = s->listen_fd,
                        .wake_fds = s->wake_fds,
                        .n_wake_fds = s->n_wake_fds,
                        .coordinator_pid = s->pid,
                };

                _exit(worker_run(&wp));
        }
        keytable_slot_set_pid(s->table, slot, pid);
        c->pid = pid;
        c->slot = slot;
        c->started_ms = clock_mono_ms();
        r = sd_event_add_child(s->event, &c->exit_source, pid, WEXITED, on_worker_exit, c);
        if (r < 0)
                log_error("cannot watch worker %d: %s", (int) pid, strerror(-r));
        f.worker = pid;
        log_event(LOG_INFO, "worker_spawn", &f, "worker %u started (slot %u, generation %u)",
                  position, slot, s->generation);
        return 0;
}

/* --- stopping ---------------------------------------------------------------------------- */

static void signal_workers(struct supervisor *s, int sig) {
        for (unsigned i = 0; i < s->n_children; i++)
                if (s->children[i].pid > 0)
                        kill(s->children[i].pid, sig);
}

static int on_stop_deadline(sd_event_source *src, uint64_t usec, void *userdata) {
        struct supervisor *s = userdata;

        if (live_children(s) > 0) {
                log_warning("workers did not stop in time: killing them");
                signal_workers(s, SIGKILL);
        }
        return 0;
}

static void begin_stop(struct supervisor *s, int sig) {
        uint64_t deadline = sig == SIGTERM ? STOP_GRACEFUL_USEC : sig == SIGINT ? STOP_FAST_USEC : STOP_IMMEDIATE_USEC;

        if (s->state == STATE_STOPPING) {
                /* A harder signal while stopping escalates. */
                if (sig == SIGTERM || sig == s->stop_signal)
                        return;
        }
        log_event(LOG_NOTICE, "shutdown", NULL, "%s: %s shutdown", strsignal(sig),
                  sig == SIGTERM ? "graceful" : sig == SIGINT ? "fast" : "immediate");
        set_state(s, STATE_STOPPING);
        s->stop_signal = sig;
        for (unsigned i = 0; i < s->n_children; i++)
                s->children[i].respawn_timer = sd_event_source_disable_unref(s->children[i].respawn_timer);
        signal_workers(s, sig);
        s->stop_timer = sd_event_source_disable_unref(s->stop_timer);
        sd_event_add_time_relative(s->event, &s->stop_timer, CLOCK_MONOTONIC, deadline, 0, on_stop_deadline, s);
        maybe_stopped(s);
}

static int on_signal(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        struct supervisor *s = userdata;

        switch (si->ssi_signo) {
        case SIGTERM:
        case SIGINT:
        case SIGQUIT:
                begin_stop(s, (int) si->ssi_signo);
                break;
        case SIGHUP:
                log_notice("SIGHUP: configuration reload is not supported by this version; nothing changed");
                break;
        }
        return 0;
}

/* --- the listening socket ---------------------------------------------------------------- */

static int make_parent_dir(const char *path) {
        char *dir = strdup(path), *slash;
        int r = 0;

        if (!dir)
                return -ENOMEM;
        slash = strrchr(dir, '/');
        if (slash && slash != dir) {
                *slash = 0;
                for (char *p = dir + 1; *p; p++) {
                        if (*p != '/')
                                continue;
                        *p = 0;
                        if (mkdir(dir, 0755) < 0 && errno != EEXIST)
                                r = -errno;
                        *p = '/';
                }
                if (r == 0 && mkdir(dir, 0755) < 0 && errno != EEXIST)
                        r = -errno;
        }
        free(dir);
        return r;
}

/* Is something accepting connections on path right now? */
static bool socket_answers(const struct sockaddr_un *sa) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        bool answers;

        if (fd < 0)
                return false;
        answers = connect(fd, (const struct sockaddr *) sa, sizeof *sa) == 0;
        close(fd);
        return answers;
}

static int open_listener(struct supervisor *s) {
        const char *path = s->config->socket_path;
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct stat st;
        mode_t old_umask;
        int fd, r;

        if (strlen(path) >= sizeof sa.sun_path) {
                log_error("socket path %s is too long", path);
                return -ENAMETOOLONG;
        }
        strcpy(sa.sun_path, path);
        r = make_parent_dir(path);
        if (r < 0) {
                log_error("cannot create the directory of %s: %s", path, strerror(-r));
                return r;
        }
        if (lstat(path, &st) == 0) {
                if (!S_ISSOCK(st.st_mode)) {
                        log_error("%s exists and is not a socket: refusing to replace it", path);
                        return -EEXIST;
                }
                if (socket_answers(&sa)) {
                        log_error("another server answers on %s: refusing to start", path);
                        return -EADDRINUSE;
                }
                /* A stale socket file from a process that is gone. */
                unlink(path);
        }

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        /* Bind under a tight umask so the socket is never briefly open to everyone. */
        old_umask = umask(0177);
        r = bind(fd, (struct sockaddr *) &sa, sizeof sa);
        umask(old_umask);
        if (r < 0 || chmod(path, s->config->socket_mode) < 0 || listen(fd, SOMAXCONN) < 0) {
                r = -errno;
                log_error("cannot listen on %s: %s", path, strerror(-r));
                close(fd);
                return r;
        }
        s->listen_fd = fd;
        s->own_socket = true;
        return 0;
}

/* --- the table --------------------------------------------------------------------------- */

static int build_table(struct supervisor *s) {
        const struct config *cfg = s->config;
        struct keytable_limits limits = {
                .max_pools = cfg->n_pools,
                .max_keys = cfg->n_keys,
                /* Room for a second generation of workers during a reload, and a spare. */
                .n_slots = cfg->workers * 2 + 2,
                .leases_per_slot = cfg->max_connections,
        };
        int r;

        struct keytable_policy policy = {
                .cooldown_scope_key = cfg->cooldown_scope != CONFIG_SCOPE_POOL,
                .transient_threshold = cfg->transient_threshold,
                .transient_cooldown_ms = (int64_t) cfg->transient_cooldown * 1000,
                .probe_interval_ms = (int64_t) cfg->probe_interval * 1000,
                .probe_auth = cfg->probe_auth,
        };

        r = keytable_create(&limits, clock_mono_ms(), &s->table);
        if (r < 0) {
                log_error("cannot create the shared key table: %s", strerror(-r));
                return r;
        }
        keytable_set_policy(s->table, &policy);

        /* Waiting requests sleep in their worker's loop; a worker that frees a key wakes the
         * others through these (created before any fork, so every worker holds them all). */
        s->wake_fds = calloc(limits.n_slots, sizeof *s->wake_fds);
        if (!s->wake_fds)
                return -ENOMEM;
        s->n_wake_fds = limits.n_slots;
        for (unsigned i = 0; i < limits.n_slots; i++)
                s->wake_fds[i] = -1;
        for (unsigned i = 0; i < limits.n_slots; i++) {
                s->wake_fds[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
                if (s->wake_fds[i] < 0) {
                        r = -errno;
                        log_error("cannot create wake-up eventfds: %s", strerror(-r));
                        return r;
                }
        }
        for (unsigned p = 0; p < cfg->n_pools; p++) {
                const struct config_pool *pool = &cfg->pools[p];
                unsigned index;

                r = keytable_add_pool(s->table, pool->name, pool->model, &index);
                for (unsigned k = 0; r >= 0 && k < pool->n_keys; k++) {
                        unsigned key;

                        r = keytable_add_key(s->table, index, pool->keys[k].id, pool->keys[k].masked, &key);
                        if (r >= 0)
                                r = keytable_set_key_limits(s->table, key, pool->keys[k].max_concurrent,
                                                            pool->keys[k].rpm);
                }
                if (r < 0) {
                        log_error("cannot add pool %s to the key table: %s", pool->name, strerror(-r));
                        return r;
                }
        }
        return 0;
}

int supervisor_run(const struct config *cfg) {
        struct supervisor *s;
        sigset_t mask;
        int r, status = 1;

        s = calloc(1, sizeof *s);
        if (!s)
                return 1;
        s->config = cfg;
        s->listen_fd = -1;
        s->pid = getpid();
        s->generation = 1;
        s->n_children = cfg->workers > MAX_WORKERS ? MAX_WORKERS : cfg->workers;
        for (unsigned i = 0; i < s->n_children; i++)
                s->children[i] = (struct child) { .owner = s, .position = i };
        set_state(s, STATE_STARTING);
        log_event(LOG_INFO, "startup", NULL, "keypoold %s starting: %u pools, %u keys, %u workers",
                  PACKAGE_VERSION, cfg->n_pools, cfg->n_keys, s->n_children);

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGQUIT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, SIGCHLD);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);

        r = sd_event_new(&s->event);
        if (r >= 0)
                r = sd_event_add_signal(s->event, NULL, SIGTERM, on_signal, s);
        if (r >= 0)
                r = sd_event_add_signal(s->event, NULL, SIGINT, on_signal, s);
        if (r >= 0)
                r = sd_event_add_signal(s->event, NULL, SIGQUIT, on_signal, s);
        if (r >= 0)
                r = sd_event_add_signal(s->event, NULL, SIGHUP, on_signal, s);
        if (r < 0) {
                log_error("cannot set up the event loop: %s", strerror(-r));
                goto finish;
        }
        if (build_table(s) < 0 || open_listener(s) < 0)
                goto finish;

        for (unsigned i = 0; i < s->n_children; i++)
                if (spawn(s, i) < 0)
                        goto finish;
        set_state(s, STATE_RUNNING);
        log_event(LOG_INFO, "ready", NULL, "listening on %s", cfg->socket_path);

        r = sd_event_loop(s->event);
        status = r < 0 ? 1 : 0;

finish:
        if (s->state != STATE_STOPPED && live_children(s) > 0) {
                /* Failed while starting: take down what did start. */
                signal_workers(s, SIGKILL);
                for (unsigned i = 0; i < s->n_children; i++)
                        if (s->children[i].pid > 0)
                                waitpid(s->children[i].pid, NULL, 0);
        }
        for (unsigned i = 0; i < s->n_children; i++) {
                sd_event_source_disable_unref(s->children[i].exit_source);
                sd_event_source_disable_unref(s->children[i].respawn_timer);
        }
        sd_event_source_disable_unref(s->stop_timer);
        if (s->listen_fd >= 0)
                close(s->listen_fd);
        for (unsigned i = 0; i < s->n_wake_fds; i++)
                if (s->wake_fds[i] >= 0)
                        close(s->wake_fds[i]);
        free(s->wake_fds);
        if (s->own_socket)
                unlink(cfg->socket_path);
        keytable_destroy(s->table);
        sd_event_unref(s->event);
        if (status == 0)
                log_event(LOG_INFO, "shutdown", NULL, "keypoold stopped");
        free(s);
        return status;
}
