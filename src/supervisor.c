/* supervisor.c — the coordinator: keypoold's main process.
 *
 * One state machine:
 *
 *   starting → running ⇄ reloading → running … → stopping → stopped
 *
 * Event handlers (signals, worker exits, respawn delays, the tick, the ready poll, the stop
 * deadline) only record what happened on the supervisor and call advance(), the one function
 * that acts on those facts and changes the state, logging each transition once. Which state
 * follows is supervisor_next_state's pure decision.
 *
 * Workers belong to a generation: the configuration they were forked with and the bank of the
 * shared table that holds its pools. A reload builds the new configuration and its bank beside the
 * running ones, forks a new generation, and once that generation accepts, tells the old one to
 * drain (stop accepting, finish what is in flight, exit). Within a generation workers are known by
 * their position (0 … workers-1); a position keeps its crash history so a worker that dies right
 * after starting is respawned after a growing delay instead of in a tight loop.
 *
 * The coordinator never calls libcurl and never blocks on a client; it touches the table only
 * through keytable's short critical sections.
 */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>

#include "keypool/clock.h"
#include "keypool/cluster.h"
#include "keypool/fileio.h"
#include "keypool/keytable.h"
#include "keypool/listen.h"
#include "keypool/log.h"
#include "keypool/notify.h"
#include "keypool/persist.h"
#include "keypool/secmem.h"
#include "keypool/supervisor.h"
#include "keypool/worker.h"

#define MAX_WORKERS             64
#define QUICK_DEATH_MS          2000            /* a worker that dies sooner counts as a crash */
#define RESPAWN_MIN_DELAY_MS    100
#define RESPAWN_MAX_DELAY_MS    10000
#define STOP_FAST_USEC          (5ULL * 1000000)
#define STOP_IMMEDIATE_USEC     (1ULL * 1000000)
/* While waiting for a generation to accept. Workers serve within a few ms of their fork, and
 * what is left of a poll interval (plus the timer's slack) when they do is added to the time to
 * READY=1: the first polls come every ms, then, for a generation that is slow to start (a
 * worker crash-looping), every 5 ms so as not to keep taking the header lock. */
#define READY_POLL_FAST_USEC    (1ULL * 1000)
#define READY_POLL_FAST_COUNT   20
#define READY_POLL_USEC         (5ULL * 1000)
#define READY_POLL_ACCURACY_USEC 100ULL
#define TICK_USEC               (1000ULL * 1000)
/* A new generation that has not accepted within worker_timeout (but never less than this) of a
 * reload is given up: a worker that cannot start (a crash loop, a stall) must not leave the
 * coordinator reloading for ever with the old generation's drain never begun. */
#define RELOAD_MIN_DEADLINE_MS  5000
/* Tests only: workers of this generation stop themselves (SIGSTOP) right after the fork, before
 * they accept: a new generation that never serves. */
#define TEST_STALL_GENERATION_ENV "KEYPOOL_TEST_STALL_GENERATION"

static const char *const state_names[_SUPERVISOR_STATE_MAX] = {
        [0] = "none",
        [SUPERVISOR_STARTING] = "starting",
        [SUPERVISOR_RUNNING] = "running",
        [SUPERVISOR_RELOADING] = "reloading",
        [SUPERVISOR_STOPPING] = "stopping",
        [SUPERVISOR_STOPPED] = "stopped",
};

const char *supervisor_state_to_string(enum supervisor_state state) {
        return (unsigned) state < _SUPERVISOR_STATE_MAX ? state_names[state] : "?";
}

struct generation;

struct child {
        struct generation *gen;
        unsigned position;              /* 0 … workers-1 */
        pid_t pid;                      /* 0 when no process runs at this position */
        unsigned slot;
        int64_t started_ms;
        unsigned crashes;               /* quick deaths in a row */
        bool killed_wedged;             /* we killed it for a stale heartbeat */
        /* Facts for advance(): */
        bool exited;                    /* its process exited, having lived lived_ms */
        int64_t lived_ms;
        bool respawn_due;               /* its back-off delay has passed */
        sd_event_source *exit_source;
        sd_event_source *respawn_timer;
};

struct generation {
        struct supervisor *owner;
        unsigned number;
        struct config *config;          /* owned */
        bool draining;                  /* told to stop; not respawned */
        int64_t drain_started_ms;       /* when it was told (reloads: bounded by shutdown_timeout) */
        bool drain_overdue;             /* a fact for advance: it drains past its deadline */
        bool drain_cut;                 /* … and was killed for it */
        bool serving;                   /* every worker has accepted once (a fact for advance) */
        struct child children[MAX_WORKERS];
        unsigned n_children;
};

/* The cluster process (cluster.h), when keypool.conf has cluster = { … }: supervised like a
 * worker position of its own, outside the generations (a reload restarts it with the new
 * configuration). */
struct cluster_child {
        pid_t pid;                      /* 0 when not running */
        int64_t started_ms;
        unsigned crashes;
        bool exited, respawn_due;       /* facts for advance() */
        int64_t lived_ms;
        sd_event_source *exit_source;
        sd_event_source *respawn_timer;
};

struct supervisor {
        enum supervisor_state state;
        sd_event *event;
        struct keytable *table;
        struct listen_sockets sockets;
        int *wake_fds;                  /* one eventfd per worker slot, shared by all workers */
        unsigned n_wake_fds;
        pid_t pid;
        struct generation *current, *old;
        unsigned next_generation;
        struct notify notify;
        bool reload_failed;             /* the last reload failed: STATUS says so until one works */
        sd_event_source *tick;
        sd_event_source *ready_poll;
        unsigned ready_polls;           /* polls since wait_until_serving */
        sd_event_source *stop_timer;
        sd_event_source *state_timer;
        sd_event_source *reload_timer;  /* the newest generation's deadline to accept */
        /* Facts the event handlers record for advance(), which alone acts on them: */
        int stop_signal;                /* the stop asked for, or 0 */
        int stop_acted;                 /* the stop the workers were told of, or 0 */
        bool stop_deadline_passed;
        bool reload_requested;
        bool reload_deferred;           /* a SIGHUP waits for the previous generation's drain */
        bool reload_deadline_passed;
        struct cluster_child cluster;
};

static int spawn(struct child *c);
static void advance(struct supervisor *s);
static void status_line(struct supervisor *s, int64_t now, char *line, size_t size);

static unsigned live_children(const struct generation *g) {
        unsigned n = 0;

        for (unsigned i = 0; g && i < g->n_children; i++)
                n += g->children[i].pid > 0;
        return n;
}

static void free_generation(struct generation *g) {
        if (!g)
                return;
        for (unsigned i = 0; i < g->n_children; i++) {
                sd_event_source_disable_unref(g->children[i].exit_source);
                sd_event_source_disable_unref(g->children[i].respawn_timer);
        }
        config_free(g->config);
        free(g);
}

static struct generation *new_generation(struct supervisor *s, struct config *cfg) {
        struct generation *g = calloc(1, sizeof *g);

        if (!g)
                return NULL;
        g->owner = s;
        g->number = ++s->next_generation;
        g->config = cfg;
        g->n_children = cfg->workers > MAX_WORKERS ? MAX_WORKERS : cfg->workers;
        for (unsigned i = 0; i < g->n_children; i++)
                g->children[i] = (struct child) { .gen = g, .position = i };
        return g;
}

static void signal_generation(struct generation *g, int sig) {
        for (unsigned i = 0; g && i < g->n_children; i++)
                if (g->children[i].pid > 0)
                        kill(g->children[i].pid, sig);
}

/* The old generation has drained: its configuration and bank can go. */
static void retire_old(struct supervisor *s) {
        log_event(LOG_INFO, "reload", NULL, "generation %u has drained and exited", s->old->number);
        free_generation(s->old);
        s->old = NULL;
}

/* --- workers ----------------------------------------------------------------------------- */

uint64_t supervisor_respawn_delay_ms(unsigned crashes) {
        uint64_t delay_ms;

        if (crashes == 0)
                return 0;
        delay_ms = (uint64_t) RESPAWN_MIN_DELAY_MS << (crashes > 8 ? 8 : crashes - 1);
        return delay_ms > RESPAWN_MAX_DELAY_MS ? RESPAWN_MAX_DELAY_MS : delay_ms;
}

unsigned supervisor_crashes_after_exit(unsigned crashes, int64_t lived_ms, bool killed_wedged) {
        /* A wedged worker killed on purpose is not a crash of its own making. */
        return lived_ms < QUICK_DEATH_MS && !killed_wedged ? crashes + 1 : 0;
}

static int on_respawn_due(sd_event_source *src, uint64_t usec, void *userdata) {
        struct child *c = userdata;

        c->respawn_timer = sd_event_source_disable_unref(c->respawn_timer);
        c->respawn_due = true;
        advance(c->gen->owner);
        return 0;
}

static void schedule_respawn(struct child *c) {
        struct supervisor *s = c->gen->owner;
        uint64_t delay_ms = supervisor_respawn_delay_ms(c->crashes);

        if (delay_ms == 0) {
                spawn(c);
                return;
        }
        log_warning("worker %u keeps dying: respawning in %llu ms", c->position, (unsigned long long) delay_ms);
        if (sd_event_add_time_relative(s->event, &c->respawn_timer, CLOCK_MONOTONIC, delay_ms * 1000, 1000,
                                       on_respawn_due, c) < 0)
                spawn(c);
}

static int on_worker_exit(sd_event_source *src, const siginfo_t *si, void *userdata) {
        struct child *c = userdata;
        struct generation *g = c->gen;
        struct supervisor *s = g->owner;
        struct log_fields f = LOG_FIELDS_NONE;
        int64_t lived = clock_mono_ms() - c->started_ms;
        bool expected = s->state == SUPERVISOR_STOPPING || g->draining;

        /* sd-event reaped the process already; the table kept what it held until now. Its
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
                log_event(si->si_status == 0 || expected ? LOG_INFO : LOG_WARNING, "worker_exit", &f,
                          "worker %u of generation %u exited with status %d", c->position, g->number,
                          si->si_status);
        else
                log_event(expected ? LOG_INFO : LOG_WARNING, "worker_exit", &f,
                          "worker %u of generation %u killed by signal %s%s", c->position, g->number,
                          strsignal(si->si_status), c->killed_wedged ? " (its heartbeat had stopped)" : "");
        c->pid = 0;
        c->exited = true;
        c->lived_ms = lived;
        /* c and its generation may be gone after this. */
        advance(s);
        return 0;
}

static bool test_stalls(const struct generation *g) {
        const char *v = getenv(TEST_STALL_GENERATION_ENV);

        return v && *v && strtoul(v, NULL, 10) == g->number;
}

/* In a freshly forked child: the coordinator's pidfds of its children (sd-event watches each with
 * one) are the coordinator's business; a worker holding them would keep every sibling it was
 * forked beside as a descriptor for its whole life. Found by what they are, so that none is
 * missed whichever generation or source holds it. */
static void close_child_pidfds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;

        if (!d)
                return;
        while ((de = readdir(d))) {
                char path[64], target[32];
                ssize_t n;
                int fd;

                if (de->d_name[0] < '0' || de->d_name[0] > '9')
                        continue;
                fd = atoi(de->d_name);
                if (fd == dirfd(d))
                        continue;
                snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
                n = readlink(path, target, sizeof target - 1);
                if (n > 0) {
                        target[n] = 0;
                        if (strcmp(target, "anon_inode:[pidfd]") == 0)
                                close(fd);
                }
        }
        closedir(d);
}

static int spawn(struct child *c) {
        struct generation *g = c->gen;
        struct supervisor *s = g->owner;
        struct log_fields f = LOG_FIELDS_NONE;
        unsigned slot;
        pid_t pid;
        int r;

        r = keytable_slot_claim(s->table, g->number, clock_mono_ms(), &slot);
        if (r < 0) {
                /* Slots free up as an older generation's workers exit: try again later. */
                log_error("no free worker slot for worker %u: %s", c->position, strerror(-r));
                c->crashes++;
                schedule_respawn(c);
                return r;
        }
        pid = fork();
        if (pid < 0) {
                r = -errno;
                keytable_slot_release(s->table, slot);
                log_error("fork failed for worker %u: %s", c->position, strerror(-r));
                c->crashes++;
                schedule_respawn(c);
                return r;
        }
        if (pid == 0) {
                /* This worker serves g's configuration only: the other generation's keys (some
                 * perhaps removed by the operator) must not live on in it. */
                if (s->old && s->old != g)
                        config_wipe_secrets(s->old->config);
                if (s->current != g)
                        config_wipe_secrets(s->current->config);
                close_child_pidfds();

                struct worker_params wp = {
                        .config = g->config,
                        .table = s->table,
                        .slot = slot,
                        .generation = g->number,
                        .listen_fd = s->sockets.unix_fd,
                        .tcp_listen_fd = s->sockets.tcp_fd,
                        .wake_fds = s->wake_fds,
                        .n_wake_fds = s->n_wake_fds,
                        .coordinator_event_fd = sd_event_get_fd(s->event),
                        .coordinator_pid = s->pid,
                };

                if (test_stalls(g))
                        raise(SIGSTOP);
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
                  c->position, slot, g->number);
        return 0;
}

/* An upstream whose certificate is not checked can be anyone on the path, and the keys go to
 * it: say so loudly every time a generation starts with such a provider, not just once. */
static void warn_unverified(const struct config *cfg) {
        for (unsigned i = 0; i < cfg->n_providers; i++)
                if (!cfg->providers[i].tls_verify)
                        log_warning("provider %s has tls_verify = false: its certificate and name are NOT "
                                    "checked, so anyone on the network path can read its keys; trust its "
                                    "CA with ca_file instead", cfg->providers[i].name);
}

/* Starts every worker of g; one that cannot start now is retried later on its own. */
static int spawn_generation(struct generation *g) {
        int first_error = 0;

        warn_unverified(g->config);
        /* What loading the configuration left in freed heap (keys among it) stays out of the
         * cores of the coordinator and of the workers about to inherit it. */
        (void) secmem_exclude_heap();
        for (unsigned i = 0; i < g->n_children; i++) {
                int r = spawn(&g->children[i]);

                if (r < 0 && first_error == 0)
                        first_error = r;
        }
        return first_error;
}

/* Does every worker of generation g accept connections? */
static bool generation_serving(struct supervisor *s, const struct generation *g) {
        struct keytable_worker_view views[2 * MAX_WORKERS + 2];
        unsigned n = keytable_workers(s->table, views, sizeof views / sizeof views[0]), serving = 0;

        for (unsigned i = 0; i < n; i++)
                if (views[i].generation == g->number && views[i].stage == WORKER_STAGE_SERVING)
                        serving++;
        return serving >= g->n_children;
}

static int on_ready_poll(sd_event_source *src, uint64_t usec, void *userdata) {
        struct supervisor *s = userdata;

        if (s->state != SUPERVISOR_STARTING && s->state != SUPERVISOR_RELOADING) {
                s->ready_poll = sd_event_source_disable_unref(s->ready_poll);
                return 0;
        }
        if (!generation_serving(s, s->current)) {
                sd_event_source_set_time_relative(src, ++s->ready_polls < READY_POLL_FAST_COUNT ?
                                                  READY_POLL_FAST_USEC : READY_POLL_USEC);
                return sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
        }
        s->ready_poll = sd_event_source_disable_unref(s->ready_poll);
        s->current->serving = true;
        advance(s);
        return 0;
}

static void wait_until_serving(struct supervisor *s) {
        s->ready_poll = sd_event_source_disable_unref(s->ready_poll);
        s->ready_polls = 0;
        if (sd_event_add_time_relative(s->event, &s->ready_poll, CLOCK_MONOTONIC, 0,
                                       READY_POLL_ACCURACY_USEC, on_ready_poll, s) < 0)
                log_error("cannot wait for the workers to accept");
}

/* --- status and the watchdog ------------------------------------------------------------ */

static void status_line(struct supervisor *s, int64_t now, char *line, size_t size) {
        struct keytable_worker_view views[2 * MAX_WORKERS + 2];
        unsigned pools = keytable_n_pools(s->table), keys = 0, ready = 0, cooling = 0, disabled = 0;
        unsigned n = keytable_workers(s->table, views, sizeof views / sizeof views[0]);
        uint64_t requests = 0;

        for (unsigned p = 0; p < pools; p++) {
                struct keytable_pool_view info;
                struct keytable_key_view *kv = NULL;
                int nk = keytable_pool_read_alloc(s->table, p, now, &info, &kv);

                for (int k = 0; k < nk; k++) {
                        keys++;
                        ready += kv[k].state == KEY_READY;
                        cooling += kv[k].state == KEY_COOLING;
                        disabled += kv[k].state == KEY_DISABLED;
                }
                free(kv);
        }
        for (unsigned i = 0; i < n; i++)
                requests += views[i].requests;
        struct keytable_cluster_view cv;

        keytable_cluster_read(s->table, &cv);
        snprintf(line, size, "%s%s%u pool%s, %u/%u keys ready, %u cooling, %u disabled; %llu requests",
                 s->reload_failed ? "reload failed (old configuration kept); " : "",
                 cv.enabled && !cv.connected ? "cluster: degraded; " : "",
                 pools, pools == 1 ? "" : "s", ready, keys, cooling, disabled, (unsigned long long) requests);
}

static void update_status(struct supervisor *s, int64_t now) {
        char line[256];

        status_line(s, now, line, sizeof line);
        notify_status(&s->notify, line, now);
}

/* Kills workers whose heartbeat stopped (wedged: stopped, spinning, deadlocked); says whether
 * every worker of the current generation is alive and fresh. */
static bool check_workers(struct supervisor *s, int64_t now) {
        struct keytable_worker_view views[2 * MAX_WORKERS + 2];
        unsigned n = keytable_workers(s->table, views, sizeof views / sizeof views[0]);
        int64_t limit = (int64_t) s->current->config->worker_timeout * 1000;
        /* Pings stop well before a wedged worker is killed, so a watchdog sees the trouble
         * even when the replacement comes quickly. */
        int64_t fresh = limit / 2 > 1500 ? limit / 2 : 1500;
        bool healthy = live_children(s->current) == s->current->n_children;
        struct generation *gens[2] = { s->current, s->old };

        for (unsigned i = 0; i < n; i++) {
                if (views[i].pid > 0 && views[i].generation == s->current->number &&
                    now - views[i].heartbeat_ms > fresh)
                        healthy = false;
                if (views[i].pid <= 0 || now - views[i].heartbeat_ms <= limit)
                        continue;
                for (unsigned g = 0; g < 2; g++)
                        for (unsigned k = 0; gens[g] && k < gens[g]->n_children; k++) {
                                struct child *c = &gens[g]->children[k];
                                struct log_fields f = LOG_FIELDS_NONE;

                                if (c->pid != views[i].pid || c->killed_wedged)
                                        continue;
                                f.worker = c->pid;
                                log_event(LOG_ERR, "worker_exit", &f,
                                          "worker %u sent no heartbeat for %lld ms: killing it",
                                          c->position, (long long) (now - views[i].heartbeat_ms));
                                c->killed_wedged = true;
                                kill(c->pid, SIGKILL);
                                if (gens[g] == s->current)
                                        healthy = false;
                        }
        }
        return healthy;
}

/* Cooldowns end by the clock: say so when they do, not when the next request happens by. */
static void note_recoveries(struct supervisor *s, int64_t now) {
        const struct config *cfg = s->current->config;
        unsigned pools[64], positions[64], n;

        n = keytable_recover_due(s->table, now, pools, positions, 64);
        for (unsigned i = 0; i < n; i++) {
                struct keytable_event ev = { .wall_ms = clock_wall_ms(), .kind = HISTORY_RECOVER };
                struct log_fields f = LOG_FIELDS_NONE;
                const struct config_key *key;

                if (pools[i] >= cfg->n_pools)
                        continue;
                key = config_pool_key(&cfg->pools[pools[i]], 0, positions[i]);
                if (!key)
                        continue;
                f.pool = cfg->pools[pools[i]].name;
                f.key = key->id;
                snprintf(ev.pool, sizeof ev.pool, "%s", f.pool);
                snprintf(ev.key_from, sizeof ev.key_from, "%s", f.key);
                keytable_history_add(s->table, &ev);
                log_event(LOG_INFO, "recover", &f, "key is ready again");
        }
}

static int on_tick(sd_event_source *src, uint64_t usec, void *userdata) {
        struct supervisor *s = userdata;
        int64_t now = clock_mono_ms();
        uint64_t period = TICK_USEC;
        bool healthy;
        int r;

        if (s->state == SUPERVISOR_RUNNING)
                note_recoveries(s, now);
        /* A reload's drain is bounded as a graceful stop is: streams already flowing get
         * shutdown_timeout to finish. */
        if (s->old && s->old->draining && s->old->drain_started_ms > 0 &&
            now - s->old->drain_started_ms > (int64_t) s->current->config->shutdown_timeout * 1000)
                s->old->drain_overdue = true;

        healthy = check_workers(s, now) && (s->state == SUPERVISOR_RUNNING || s->state == SUPERVISOR_RELOADING);
        if (s->state != SUPERVISOR_STOPPING)
                update_status(s, now);
        notify_tick(&s->notify, now, healthy);
        if (s->notify.watchdog_usec > 0 && s->notify.watchdog_usec / 4 < period)
                period = s->notify.watchdog_usec / 4;
        sd_event_source_set_time_relative(src, period);
        r = sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
        advance(s);
        return r;
}

/* --- the table --------------------------------------------------------------------------- */

/* Fills the bank being built with cfg's pools and keys. */
static int fill_bank(struct supervisor *s, const struct config *cfg) {
        struct keytable_policy policy = {
                .cooldown_scope_key = cfg->cooldown_scope != CONFIG_SCOPE_POOL,
                .transient_threshold = cfg->transient_threshold,
                .transient_cooldown_ms = (int64_t) cfg->transient_cooldown * 1000,
                .probe_interval_ms = (int64_t) cfg->probe_interval * 1000,
                .probe_auth = cfg->probe_auth,
        };
        int r = 0;

        keytable_set_policy(s->table, &policy);
        for (unsigned p = 0; r >= 0 && p < cfg->n_pools; p++) {
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
                if (r < 0)
                        log_error("cannot add pool %s to the key table: %s", pool->name, strerror(-r));
        }
        return r;
}

static int build_table(struct supervisor *s, const struct config *cfg) {
        struct keytable_limits limits = {
                /* Room for reloads that add pools and keys: the table is never remapped. */
                .max_pools = cfg->n_pools * 2 > cfg->n_pools + 64 ? cfg->n_pools * 2 : cfg->n_pools + 64,
                .max_keys = cfg->n_keys * 2 > cfg->n_keys + 1024 ? cfg->n_keys * 2 : cfg->n_keys + 1024,
                /* Two generations of workers during a reload, and a spare. */
                .n_slots = 2 * MAX_WORKERS + 2,
                .leases_per_slot = cfg->max_connections,
                .history_size = cfg->history_size,
        };
        int r;

        r = keytable_create(&limits, clock_mono_ms(), &s->table);
        if (r < 0) {
                log_error("cannot create the shared key table: %s", strerror(-r));
                return r;
        }

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
        return fill_bank(s, cfg);
}

/* --- state --------------------------------------------------------------------------------- */

static void save_state(struct supervisor *s) {
        const char *path = s->current->config->state_file;
        char *text;
        int r;

        if (!path || !path[0])
                return;
        text = persist_export(s->table, clock_mono_ms(), clock_wall_ms());
        if (!text) {
                log_warning("cannot encode the state: out of memory");
                return;
        }
        r = persist_save(path, text);
        free(text);
        if (r < 0)
                log_warning("cannot save the state to %s: %s", path, strerror(-r));
}

/* Cooldowns and counters from the last run: a key that was resting still rests. A bad file is
 * moved aside, never fatal. */
static void load_state(struct supervisor *s) {
        const char *path = s->current->config->state_file;
        struct persist_report report = {};
        char err[256] = "", *text = NULL, *aside = NULL;
        size_t len = 0;
        int r;

        if (!path || !path[0])
                return;
        r = persist_read(path, &text, &len);
        if (r == -ENOENT)
                return;
        if (r == -EISDIR || r == -EBADFD) {
                log_warning("cannot read the state file %s: not a regular file (%s); starting fresh",
                            path, fileio_kind(path));
                return;
        }
        if (r < 0) {
                log_warning("cannot read the state file %s: %s; starting fresh", path, strerror(-r));
                return;
        }
        r = persist_import(s->table, text, len, clock_mono_ms(), clock_wall_ms(),
                           (int64_t) s->current->config->max_cooldown * 1000, &report, err, sizeof err);
        free(text);
        /* Out of memory, or the table moved under the import: nothing is wrong with the file,
         * and it is kept for the next start. */
        if (r == -ENOMEM || r == -EAGAIN) {
                log_warning("cannot restore the state file %s now: %s; starting fresh, the file is kept",
                            path, strerror(-r));
                return;
        }
        if (r < 0) {
                if (persist_move_aside(path, clock_wall_ms(), &aside) >= 0)
                        log_warning("state file %s is not usable (%s): moved aside to %s; starting fresh",
                                    path, err, aside);
                else
                        log_warning("state file %s is not usable (%s); starting fresh", path, err);
                free(aside);
                return;
        }
        log_info("state restored from %s: %u keys, %u unknown, %u history events",
                 path, report.imported, report.ignored, report.events);
        if (report.problem[0])
                log_warning("state file %s: %u keys refused, %u rests cut to max_cooldown; first: %s",
                            path, report.refused, report.capped, report.problem);
}

static int on_state_timer(sd_event_source *src, uint64_t usec, void *userdata) {
        struct supervisor *s = userdata;

        save_state(s);
        sd_event_source_set_time_relative(src, (uint64_t) s->current->config->state_interval * 1000000);
        return sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
}

/* --- reload -------------------------------------------------------------------------------- */

static void reload_failed(struct supervisor *s, const char *why) {
        char status[256];

        s->reload_failed = true;
        log_event(LOG_ERR, "reload_failed", NULL, "reload failed: %s; the running configuration stays", why);
        /* The manager is waiting for READY=1 after RELOADING=1, even when nothing changed. */
        status_line(s, clock_mono_ms(), status, sizeof status);
        notify_ready(&s->notify, status);
}

static void reload(struct supervisor *s) {
        const char *path = s->current->config->path;
        struct config_diag diag = {};
        struct config *cfg = NULL;
        struct generation *g;
        int r;

        notify_reloading(&s->notify, "reloading the configuration");
        log_event(LOG_NOTICE, "reload", NULL, "SIGHUP: reloading %s", path);
        if (s->old) {
                reload_failed(s, "the previous reload is still in progress (its workers are draining)");
                return;
        }
        r = config_load(path, &cfg, &diag);
        (void) secmem_exclude_heap();   /* a refused configuration's keys too */
        if (r < 0) {
                for (size_t i = 0; i < diag.n; i++)
                        log_event(LOG_ERR, "config_error", NULL, "%s", diag.messages[i]);
                if (diag.n == 0)
                        log_event(LOG_ERR, "config_error", NULL, "%s: %s", path, strerror(-r));
                config_diag_clear(&diag);
                reload_failed(s, "the new configuration is not valid");
                return;
        }
        config_diag_clear(&diag);
        if (strcmp(cfg->socket_path, s->current->config->socket_path) != 0)
                log_warning("reload: the socket path changed to %s; it takes effect at the next restart",
                            cfg->socket_path);

        r = keytable_bank_begin(s->table);
        if (r >= 0) {
                r = fill_bank(s, cfg);
                if (r < 0)
                        keytable_bank_abort(s->table);
        }
        if (r < 0) {
                config_free(cfg);
                reload_failed(s, r == -ENOSPC ? "the key table has no room for the new configuration "
                                                "(restart keypool to grow it)" : strerror(-r));
                return;
        }
        g = new_generation(s, cfg);
        if (!g) {
                keytable_bank_abort(s->table);
                config_free(cfg);
                reload_failed(s, "out of memory");
                return;
        }
        keytable_bank_commit(s->table);
        keytable_set_config_generation(s->table, g->number);
        s->reload_failed = false;
        /* The newest generation does not serve yet: advance() takes it from here. */
        s->old = s->current;
        s->current = g;
}

static int on_reload_deadline(sd_event_source *src, uint64_t usec, void *userdata) {
        struct supervisor *s = userdata;

        s->reload_timer = sd_event_source_disable_unref(s->reload_timer);
        s->reload_deadline_passed = true;
        advance(s);
        return 0;
}

static int64_t reload_deadline_ms(const struct supervisor *s) {
        int64_t ms = (int64_t) s->current->config->worker_timeout * 1000;

        return ms > RELOAD_MIN_DEADLINE_MS ? ms : RELOAD_MIN_DEADLINE_MS;
}

/* The newest generation did not accept in time: it is killed, the generation before it (which
 * was never told to drain) stays current with its bank, and the failure is logged and shown. */
static void abandon_reload(struct supervisor *s) {
        struct generation *failed = s->current;
        char status[256];

        failed->draining = true;
        signal_generation(failed, SIGKILL);
        s->current = s->old;
        s->old = failed;                /* reaped, then retired, as a drained generation is */
        keytable_bank_revert(s->table);
        keytable_set_config_generation(s->table, s->current->number);
        s->reload_failed = true;
        log_event(LOG_ERR, "reload_failed", NULL,
                  "reload failed: generation %u did not serve within %lld s: killed; generation %u "
                  "keeps serving with the running configuration", failed->number,
                  (long long) (reload_deadline_ms(s) / 1000), s->current->number);
        status_line(s, clock_mono_ms(), status, sizeof status);
        notify_status(&s->notify, status, clock_mono_ms());
}

/* --- stopping ---------------------------------------------------------------------------- */

static int on_stop_deadline(sd_event_source *src, uint64_t usec, void *userdata) {
        struct supervisor *s = userdata;

        s->stop_deadline_passed = true;
        advance(s);
        return 0;
}

bool supervisor_stop_takes_over(int stopping, int sig) {
        return !stopping || (sig != SIGTERM && sig != stopping);
}

uint64_t supervisor_stop_deadline_usec(int sig, unsigned shutdown_timeout_sec) {
        return sig == SIGTERM ? (uint64_t) shutdown_timeout_sec * 1000000
             : sig == SIGINT ? STOP_FAST_USEC : STOP_IMMEDIATE_USEC;
}

static void announce_stop(struct supervisor *s) {
        int sig = s->stop_signal;

        log_event(LOG_NOTICE, "shutdown", NULL, "%s: %s shutdown", strsignal(sig),
                  sig == SIGTERM ? "graceful" : sig == SIGINT ? "fast" : "immediate");
}

/* Tells every worker to stop as stop_signal asks, and gives them until its deadline. */
static void stop_workers(struct supervisor *s) {
        int sig = s->stop_signal;

        s->stop_acted = sig;
        for (unsigned i = 0; i < s->current->n_children; i++)
                s->current->children[i].respawn_timer =
                        sd_event_source_disable_unref(s->current->children[i].respawn_timer);
        /* Workers drain on SIGTERM and stop at once on SIGINT and SIGQUIT. */
        signal_generation(s->current, sig);
        signal_generation(s->old, sig);
        s->cluster.respawn_timer = sd_event_source_disable_unref(s->cluster.respawn_timer);
        if (s->cluster.pid > 0)
                kill(s->cluster.pid, SIGTERM);
        s->stop_timer = sd_event_source_disable_unref(s->stop_timer);
        sd_event_add_time_relative(s->event, &s->stop_timer, CLOCK_MONOTONIC,
                                   supervisor_stop_deadline_usec(sig, s->current->config->shutdown_timeout),
                                   1000, on_stop_deadline, s);
}

static int on_signal(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        struct supervisor *s = userdata;
        int sig = (int) si->ssi_signo;

        switch (sig) {
        case SIGTERM:
        case SIGINT:
        case SIGQUIT:
                if (supervisor_stop_takes_over(s->stop_signal, sig))
                        s->stop_signal = sig;
                break;
        case SIGHUP:
                s->reload_requested = true;
                break;
        }
        advance(s);
        return 0;
}

/* --- the cluster process ------------------------------------------------------------------- */

static void spawn_cluster(struct supervisor *s);

static int on_cluster_respawn_due(sd_event_source *src, uint64_t usec, void *userdata) {
        struct supervisor *s = userdata;

        s->cluster.respawn_timer = sd_event_source_disable_unref(s->cluster.respawn_timer);
        s->cluster.respawn_due = true;
        advance(s);
        return 0;
}

static int on_cluster_exit(sd_event_source *src, const siginfo_t *si, void *userdata) {
        struct supervisor *s = userdata;
        struct log_fields f = LOG_FIELDS_NONE;
        bool expected = s->state == SUPERVISOR_STOPPING;

        s->cluster.exit_source = sd_event_source_disable_unref(s->cluster.exit_source);
        f.worker = s->cluster.pid;
        if (si->si_code == CLD_EXITED)
                log_event(si->si_status == 0 || expected ? LOG_INFO : LOG_WARNING, "worker_exit", &f,
                          "cluster process exited with status %d", si->si_status);
        else
                log_event(expected ? LOG_INFO : LOG_WARNING, "worker_exit", &f,
                          "cluster process killed by signal %s", strsignal(si->si_status));
        s->cluster.pid = 0;
        s->cluster.exited = true;
        s->cluster.lived_ms = clock_mono_ms() - s->cluster.started_ms;
        advance(s);
        return 0;
}

/* The cluster process gets the configuration of the generation that serves, and nothing of the
 * workers' world: no listening socket, no upstream key. */
static void spawn_cluster(struct supervisor *s) {
        struct config *cfg = s->current->config;
        struct log_fields f = LOG_FIELDS_NONE;
        pid_t pid;

        if (!cfg->cluster)
                return;
        pid = fork();
        if (pid < 0) {
                log_error("fork failed for the cluster process: %s", strerror(errno));
                s->cluster.crashes++;
                s->cluster.exited = true;
                return;
        }
        if (pid == 0) {
                struct cluster_params cp = {
                        .config = cfg,
                        .table = s->table,
                        .wake_fds = s->wake_fds,
                        .n_wake_fds = s->n_wake_fds,
                        .coordinator_pid = s->pid,
                };

                if (s->sockets.unix_fd >= 0)
                        close(s->sockets.unix_fd);
                if (s->sockets.tcp_fd >= 0)
                        close(s->sockets.tcp_fd);
                close_child_pidfds();
                for (unsigned p = 0; p < cfg->n_pools; p++)
                        for (unsigned k = 0; k < cfg->pools[p].n_keys; k++)
                                if (cfg->pools[p].keys[k].secret)
                                        explicit_bzero(cfg->pools[p].keys[k].secret,
                                                       strlen(cfg->pools[p].keys[k].secret));
                if (s->old && s->old->config != cfg)
                        config_wipe_secrets(s->old->config);
                _exit(cluster_run(&cp));
        }
        s->cluster.pid = pid;
        s->cluster.started_ms = clock_mono_ms();
        if (sd_event_add_child(s->event, &s->cluster.exit_source, pid, WEXITED, on_cluster_exit, s) < 0)
                log_error("cannot watch the cluster process %d", (int) pid);
        f.worker = pid;
        log_event(LOG_INFO, "worker_spawn", &f, "cluster process started (node %s, Redis at %s)",
                  cfg->cluster->node, cfg->cluster->redis);
}

/* A cluster process that exited is forked again, after a growing delay when it keeps dying. */
static void tend_cluster(struct supervisor *s) {
        bool stopping = s->state == SUPERVISOR_STOPPING || s->state == SUPERVISOR_STOPPED;
        uint64_t delay_ms;

        if (s->cluster.exited) {
                s->cluster.exited = false;
                s->cluster.crashes = supervisor_crashes_after_exit(s->cluster.crashes, s->cluster.lived_ms, false);
                delay_ms = supervisor_respawn_delay_ms(s->cluster.crashes);
                if (stopping)
                        return;
                if (delay_ms == 0)
                        s->cluster.respawn_due = true;
                else if (!s->cluster.respawn_timer &&
                         sd_event_add_time_relative(s->event, &s->cluster.respawn_timer, CLOCK_MONOTONIC,
                                                    delay_ms * 1000, 1000, on_cluster_respawn_due, s) < 0)
                        s->cluster.respawn_due = true;
        }
        if (s->cluster.respawn_due) {
                s->cluster.respawn_due = false;
                if (!stopping && s->cluster.pid == 0)
                        spawn_cluster(s);
        }
}

/* --- the state machine ------------------------------------------------------------------- */

enum supervisor_state supervisor_next_state(const struct supervisor_facts *f) {
        if (!f->state)
                return SUPERVISOR_STARTING;
        switch (f->state) {
        case SUPERVISOR_STARTING:
        case SUPERVISOR_RELOADING:
                if (f->stop_signal)
                        return SUPERVISOR_STOPPING;
                return f->current_serving ? SUPERVISOR_RUNNING : f->state;
        case SUPERVISOR_RUNNING:
                if (f->stop_signal)
                        return SUPERVISOR_STOPPING;
                /* A reload put a generation in place that has yet to accept. */
                return f->current_serving ? SUPERVISOR_RUNNING : SUPERVISOR_RELOADING;
        case SUPERVISOR_STOPPING:
                return f->live_workers == 0 ? SUPERVISOR_STOPPED : SUPERVISOR_STOPPING;
        default:
                return f->state;
        }
}

static void set_state(struct supervisor *s, enum supervisor_state next) {
        log_info("coordinator: %s → %s", supervisor_state_to_string(s->state), supervisor_state_to_string(next));
        s->state = next;
}

/* The transition into next, with what must happen on the way. */
static void enter(struct supervisor *s, enum supervisor_state next) {
        char status[256];

        switch (next) {
        case SUPERVISOR_RUNNING:
                s->reload_timer = sd_event_source_disable_unref(s->reload_timer);
                if (s->state == SUPERVISOR_RELOADING && s->old && !s->old->draining) {
                        /* The new generation accepts: the old one stops accepting and drains. */
                        s->old->draining = true;
                        s->old->drain_started_ms = clock_mono_ms();
                        signal_generation(s->old, SIGTERM);
                        log_event(LOG_NOTICE, "reload", NULL, "generation %u serves; generation %u drains",
                                  s->current->number, s->old->number);
                        /* It carries the old configuration's keys and limits: a new one starts
                         * with the new. */
                        if (s->cluster.pid > 0)
                                kill(s->cluster.pid, SIGTERM);
                }
                set_state(s, next);
                status_line(s, clock_mono_ms(), status, sizeof status);
                notify_ready(&s->notify, status);
                log_event(LOG_INFO, "ready", NULL, "ready: %s", status);
                break;
        case SUPERVISOR_RELOADING:
                set_state(s, next);
                spawn_generation(s->current);
                wait_until_serving(s);
                s->reload_timer = sd_event_source_disable_unref(s->reload_timer);
                if (sd_event_add_time_relative(s->event, &s->reload_timer, CLOCK_MONOTONIC,
                                               (uint64_t) reload_deadline_ms(s) * 1000, 100000,
                                               on_reload_deadline, s) < 0)
                        log_warning("cannot set the reload's deadline: a new generation that never "
                                    "serves will not be given up");
                break;
        case SUPERVISOR_STOPPING:
                announce_stop(s);
                set_state(s, next);
                notify_stopping(&s->notify, "stopping");
                /* Stop taking clients at once: the socket file goes, and the listening sockets
                 * close as soon as the workers have dropped their copies. */
                listen_close(&s->sockets);
                stop_workers(s);
                break;
        case SUPERVISOR_STOPPED:
                set_state(s, next);
                sd_event_exit(s->event, 0);
                break;
        default:
                set_state(s, next);
                break;
        }
}

/* Worker exits and due respawns: a position of the generation that serves gets a process again,
 * after a delay when it keeps dying; a generation being replaced is not kept alive. */
static void tend_workers(struct supervisor *s) {
        struct generation *gens[2] = { s->current, s->old };
        bool stopping = s->state == SUPERVISOR_STOPPING || s->state == SUPERVISOR_STOPPED;

        for (unsigned g = 0; g < 2; g++)
                for (unsigned i = 0; gens[g] && i < gens[g]->n_children; i++) {
                        struct child *c = &gens[g]->children[i];

                        if (c->exited) {
                                c->exited = false;
                                if (!stopping && gens[g] == s->current && !gens[g]->draining) {
                                        c->crashes = supervisor_crashes_after_exit(c->crashes, c->lived_ms,
                                                                                   c->killed_wedged);
                                        c->killed_wedged = false;
                                        schedule_respawn(c);
                                }
                        }
                        if (c->respawn_due) {
                                c->respawn_due = false;
                                if (!stopping && !gens[g]->draining)
                                        spawn(c);
                        }
                }
}

/* The one place the coordinator's state changes (PostgreSQL's PostmasterStateMachine is the
 * model): every event handler records what happened on the supervisor and calls this, which
 * acts on it, moves through as many states as the facts allow, logging each transition once,
 * and then tidies up what the new state leaves behind. */
static void advance(struct supervisor *s) {
        struct supervisor_facts f;
        enum supervisor_state next;

        if (s->reload_requested && s->old &&
            (s->state == SUPERVISOR_RUNNING || s->state == SUPERVISOR_RELOADING)) {
                /* A reload is still under way (its new generation starting, or the previous one
                 * draining): this SIGHUP is kept, not refused, and acted on once the previous
                 * generation has gone (a later event, at the latest the next tick). */
                if (!s->reload_deferred)
                        log_event(LOG_NOTICE, "reload", NULL, "SIGHUP during a reload: reloading again "
                                  "once generation %u has gone", s->old->number);
                s->reload_deferred = true;
        } else if (s->reload_requested) {
                s->reload_requested = false;
                s->reload_deferred = false;
                if (s->state == SUPERVISOR_RUNNING)
                        reload(s);
                else
                        log_event(LOG_WARNING, "reload_failed", NULL, "SIGHUP while %s: ignored",
                                  supervisor_state_to_string(s->state));
        }
        if (s->old && s->old->drain_overdue && !s->old->drain_cut) {
                s->old->drain_cut = true;
                log_event(LOG_WARNING, "reload", NULL, "generation %u still drains after shutdown_timeout "
                          "(%u s): its workers are killed", s->old->number,
                          s->current->config->shutdown_timeout);
                signal_generation(s->old, SIGKILL);
        }
        if (s->reload_deadline_passed) {
                s->reload_deadline_passed = false;
                if (s->state == SUPERVISOR_RELOADING && s->old && !s->current->serving)
                        abandon_reload(s);
        }
        tend_workers(s);
        tend_cluster(s);
        if (s->state == SUPERVISOR_STOPPING && s->stop_signal != s->stop_acted) {
                /* A harder signal while stopping: say so and tell the workers. */
                announce_stop(s);
                notify_stopping(&s->notify, "stopping");
                stop_workers(s);
        }
        if (s->stop_deadline_passed) {
                s->stop_deadline_passed = false;
                if (live_children(s->current) + live_children(s->old) > 0) {
                        log_warning("workers did not stop in time: killing them");
                        signal_generation(s->current, SIGKILL);
                        signal_generation(s->old, SIGKILL);
                }
                if (s->cluster.pid > 0)
                        kill(s->cluster.pid, SIGKILL);
        }

        for (;;) {
                f = (struct supervisor_facts) {
                        .state = s->state,
                        .stop_signal = s->stop_signal,
                        .current_serving = s->current->serving,
                        .live_workers = live_children(s->current) + live_children(s->old) +
                                        (s->cluster.pid > 0),
                };
                next = supervisor_next_state(&f);
                if (next == s->state)
                        break;
                enter(s, next);
        }

        /* The old generation has drained (or died) once it has no process left; while stopping,
         * both generations go together at the end. */
        if (s->old && live_children(s->old) == 0 &&
            (s->state == SUPERVISOR_RUNNING || s->state == SUPERVISOR_RELOADING))
                retire_old(s);
}

/* --- the listening sockets ------------------------------------------------------------- */

/* cfg's socket settings as listen takes them: the values config_load parsed and checked, so
 * what is opened is exactly what was checked. */
static void listen_spec_of(const struct config *cfg, struct listen_spec *ret) {
        *ret = (struct listen_spec) {
                .path = cfg->socket_path,
                .mode = (mode_t) cfg->socket_mode,
                .set_group = cfg->socket_group != NULL,
                .group = cfg->socket_gid,
                .tcp = cfg->http_listen != NULL,
        };
        if (ret->tcp) {
                snprintf(ret->tcp_host, sizeof(ret->tcp_host), "%s", cfg->http_host);
                snprintf(ret->tcp_port, sizeof(ret->tcp_port), "%u", cfg->http_port);
        }
}

/* One message for what listen_open could not do, with the setting it concerns. */
static void log_listen_failure(const struct config *cfg, enum listen_step failed, int r) {
        const char *path = cfg->socket_path;

        switch (failed) {
        case LISTEN_STEP_INHERIT:
                log_error("the socket passed by the service manager is not a listening stream socket: %s",
                          strerror(-r));
                break;
        case LISTEN_STEP_PATH:
                log_error("socket path %s is too long", path);
                break;
        case LISTEN_STEP_DIRECTORY:
                log_error("cannot create the directory of %s: %s", path, strerror(-r));
                break;
        case LISTEN_STEP_NOT_A_SOCKET:
                log_error("%s exists and is not a socket: refusing to replace it", path);
                break;
        case LISTEN_STEP_IN_USE:
                log_error("another server answers on %s: refusing to start", path);
                break;
        case LISTEN_STEP_TCP_ADDRESS:
                log_error("http_listen %s: %s", cfg->http_listen, strerror(-r));
                break;
        case LISTEN_STEP_TCP:
                log_error("cannot listen on %s: %s", cfg->http_listen, strerror(-r));
                break;
        default:
                log_error("cannot listen on %s: %s", path, strerror(-r));
                break;
        }
}

static int open_listeners(struct supervisor *s, const struct config *cfg) {
        struct listen_spec spec;
        enum listen_step failed = LISTEN_STEP_UNIX;
        int r;

        listen_spec_of(cfg, &spec);
        r = listen_open(&spec, &s->sockets, &failed);
        if (r < 0) {
                log_listen_failure(cfg, failed, r);
                return r;
        }
        if (s->sockets.group_error < 0)
                log_warning("cannot give %s to group %s: %s", cfg->socket_path, cfg->socket_group,
                            strerror(-s->sockets.group_error));
        if (s->sockets.inherited)
                log_info("serving the socket passed by the service manager (fd %d)", s->sockets.unix_fd);
        if (s->sockets.tcp_fd >= 0)
                log_info("also serving the API over TCP on %s", cfg->http_listen);
        return 0;
}

/* --- the whole ------------------------------------------------------------------------------ */

/* The signals the coordinator handles arrive through the loop, and the tick that watches the
 * workers starts. */
static int setup_events(struct supervisor *s) {
        static const int handled[] = { SIGTERM, SIGINT, SIGQUIT, SIGHUP };
        sigset_t mask;
        int r;

        sigemptyset(&mask);
        for (size_t i = 0; i < sizeof handled / sizeof handled[0]; i++)
                sigaddset(&mask, handled[i]);
        sigaddset(&mask, SIGCHLD);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);

        r = sd_event_new(&s->event);
        for (size_t i = 0; r >= 0 && i < sizeof handled / sizeof handled[0]; i++)
                r = sd_event_add_signal(s->event, NULL, handled[i], on_signal, s);
        if (r >= 0)
                r = sd_event_add_time_relative(s->event, &s->tick, CLOCK_MONOTONIC, TICK_USEC, 1000, on_tick, s);
        return r;
}

/* Takes down whatever is left (a start that failed half way leaves workers running) and frees
 * everything the coordinator holds. */
static void supervisor_free(struct supervisor *s) {
        if (s->state != SUPERVISOR_STOPPED) {
                struct generation *gens[2] = { s->current, s->old };

                for (unsigned g = 0; g < 2; g++)
                        for (unsigned i = 0; gens[g] && i < gens[g]->n_children; i++)
                                if (gens[g]->children[i].pid > 0) {
                                        kill(gens[g]->children[i].pid, SIGKILL);
                                        waitpid(gens[g]->children[i].pid, NULL, 0);
                                }
        }
        if (s->cluster.pid > 0) {
                kill(s->cluster.pid, SIGKILL);
                waitpid(s->cluster.pid, NULL, 0);
        }
        sd_event_source_disable_unref(s->cluster.exit_source);
        sd_event_source_disable_unref(s->cluster.respawn_timer);
        free_generation(s->current);
        free_generation(s->old);
        sd_event_source_disable_unref(s->tick);
        sd_event_source_disable_unref(s->ready_poll);
        sd_event_source_disable_unref(s->stop_timer);
        sd_event_source_disable_unref(s->state_timer);
        listen_close(&s->sockets);
        for (unsigned i = 0; i < s->n_wake_fds; i++)
                if (s->wake_fds[i] >= 0)
                        close(s->wake_fds[i]);
        free(s->wake_fds);
        keytable_destroy(s->table);
        sd_event_unref(s->event);
        free(s);
}

int supervisor_run(struct config *cfg) {
        struct supervisor *s;
        int r, status = 1;

        s = calloc(1, sizeof *s);
        if (!s) {
                config_free(cfg);
                return 1;
        }
        s->sockets = (struct listen_sockets) { .unix_fd = -1, .tcp_fd = -1 };
        s->pid = getpid();
        notify_init(&s->notify);
        s->current = new_generation(s, cfg);
        if (!s->current) {
                config_free(cfg);
                free(s);
                return 1;
        }
        advance(s);
        log_event(LOG_INFO, "startup", NULL, "keypoold %s starting: %u pools, %u keys, %u workers",
                  PACKAGE_VERSION, cfg->n_pools, cfg->n_keys, s->current->n_children);

        r = setup_events(s);
        if (r < 0) {
                log_error("cannot set up the event loop: %s", strerror(-r));
                goto finish;
        }
        if (build_table(s, cfg) < 0 || open_listeners(s, cfg) < 0)
                goto finish;
        keytable_set_config_generation(s->table, s->current->number);
        load_state(s);
        if (cfg->state_file && cfg->state_file[0] &&
            sd_event_add_time_relative(s->event, &s->state_timer, CLOCK_MONOTONIC,
                                       (uint64_t) cfg->state_interval * 1000000, 1000000, on_state_timer, s) < 0)
                log_warning("cannot schedule state snapshots");
        if (cfg->cluster)
                keytable_cluster_init(s->table, cfg->cluster->node);
        if (spawn_generation(s->current) < 0)
                goto finish;
        spawn_cluster(s);
        log_info("listening on %s", !s->sockets.inherited ? cfg->socket_path : "the socket passed by the service manager");
        wait_until_serving(s);

        r = sd_event_loop(s->event);
        status = r < 0 ? 1 : 0;
        save_state(s);

finish:
        supervisor_free(s);
        if (status == 0)
                log_event(LOG_INFO, "shutdown", NULL, "keypoold stopped");
        return status;
}
