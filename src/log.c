/* log.c — event records, to the journal or to stderr.
 *
 * To the journal, each event is one structured entry sent with sd_journal_send: MESSAGE, PRIORITY,
 * MESSAGE_ID (fixed per event kind; systemd/keypool.catalog explains each), KEYPOOL_EVENT and the
 * KEYPOOL_* fields that apply, so `journalctl -u keypool KEYPOOL_EVENT=rotate` answers "what
 * rotated". To stderr, one line per event written with a single write(2), so lines from the
 * coordinator and all workers, which share stderr, never interleave mid-line.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <systemd/sd-journal.h>

#include "keypool/log.h"

static const char *log_ident = "keypoold";
static int log_max_priority = LOG_INFO;
static bool log_to_journal;

static const char *const priority_names[] = {
        [LOG_EMERG] = "emerg", [LOG_ALERT] = "alert", [LOG_CRIT] = "crit", [LOG_ERR] = "error",
        [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice", [LOG_INFO] = "info",
        [LOG_DEBUG] = "debug",
};

/* One MESSAGE_ID per kind of event; the catalog in systemd/keypool.catalog documents them. */
static const struct {
        const char *event;
        const char *id;
} message_ids[] = {
        { "startup",        "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a11" },
        { "ready",          "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a12" },
        { "reload",         "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a13" },
        { "reload_failed",  "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a14" },
        { "shutdown",       "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a15" },
        { "worker_spawn",   "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a16" },
        { "worker_exit",    "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a17" },
        { "rotate",         "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a18" },
        { "cooldown",       "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a19" },
        { "recover",        "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a1a" },
        { "disable",        "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a1b" },
        { "enable",         "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a1c" },
        { "probe",          "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a1d" },
        { "config_error",   "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a1e" },
        { "retry",          "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a1f" },
        { "upstream_error", "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a20" },
        { "cluster",        "4b8e1f0a6c2d4e7f9a1b3c5d7e9f0a21" },
};

static const char *message_id(const char *event) {
        for (size_t i = 0; event && i < sizeof message_ids / sizeof message_ids[0]; i++)
                if (strcmp(message_ids[i].event, event) == 0)
                        return message_ids[i].id;
        return NULL;
}

/* Is stderr the journal stream systemd connected us to? (JOURNAL_STREAM is "DEV:INODE".) */
static bool stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) < 0)
                return false;
        return st.st_dev == (dev_t) dev && st.st_ino == (ino_t) ino;
}

enum log_target log_target_from_string(const char *s) {
        if (strcmp(s, "auto") == 0)
                return LOG_TARGET_AUTO;
        if (strcmp(s, "journal") == 0)
                return LOG_TARGET_JOURNAL;
        if (strcmp(s, "stderr") == 0)
                return LOG_TARGET_STDERR;
        return 0;
}

void log_setup(const char *ident, int max_priority, enum log_target target) {
        if (ident)
                log_ident = ident;
        log_max_priority = max_priority;
        log_to_journal = target == LOG_TARGET_JOURNAL || (target == LOG_TARGET_AUTO && stderr_is_journal());
}

/* Appends to buf without overflowing; returns the new length (capped at size - 1). */
static size_t append(char *buf, size_t size, size_t len, const char *fmt, ...) {
        va_list ap;
        int n;

        if (len >= size - 1)
                return len;
        va_start(ap, fmt);
        n = vsnprintf(buf + len, size - len, fmt, ap);
        va_end(ap);
        if (n < 0)
                return len;
        return len + (size_t) n >= size ? size - 1 : len + (size_t) n;
}

static int to_journal(const char *code_file, int code_line, const char *code_func, int priority,
                      const char *event, const struct log_fields *f, const char *message) {
        char line_field[32];
        char fields[12][160];
        struct iovec iov[12];
        const char *id = message_id(event);
        char *msg;
        int n = 0, r;

        if (asprintf(&msg, "MESSAGE=%s", message) < 0)
                return -ENOMEM;
        iov[n++] = (struct iovec) { msg, strlen(msg) };
#define FIELD(...) do {                                                                 \
                snprintf(fields[n], sizeof fields[n], __VA_ARGS__);                     \
                iov[n] = (struct iovec) { fields[n], strlen(fields[n]) };               \
                n++;                                                                    \
        } while (0)
        FIELD("PRIORITY=%d", priority);
        FIELD("SYSLOG_IDENTIFIER=%s", log_ident);
        if (id)
                FIELD("MESSAGE_ID=%s", id);
        if (event)
                FIELD("KEYPOOL_EVENT=%s", event);
        if (f) {
                if (f->pool)
                        FIELD("KEYPOOL_POOL=%s", f->pool);
                if (f->key)
                        FIELD("KEYPOOL_KEY=%s", f->key);
                if (f->status > 0)
                        FIELD("KEYPOOL_STATUS=%d", f->status);
                if (f->retry_after_s >= 0)
                        FIELD("KEYPOOL_RETRY_AFTER=%lld", (long long) f->retry_after_s);
                if (f->worker > 0)
                        FIELD("KEYPOOL_WORKER=%d", f->worker);
                if (f->request_id)
                        FIELD("KEYPOOL_REQUEST_ID=%s", f->request_id);
        }
#undef FIELD
        snprintf(line_field, sizeof line_field, "CODE_LINE=%d", code_line);
        r = sd_journal_sendv_with_location(code_file, line_field, code_func, iov, n);
        free(msg);
        return r;
}

static void to_stderr(int priority, const char *event, const struct log_fields *f, const char *message) {
        char line[2048];
        size_t len = 0;

        len = append(line, sizeof line, len, "%s[%d]: %s:", log_ident, (int) getpid(),
                     priority_names[priority & 7]);
        if (event)
                len = append(line, sizeof line, len, " event=%s", event);
        if (f) {
                if (f->pool)
                        len = append(line, sizeof line, len, " pool=%s", f->pool);
                if (f->key)
                        len = append(line, sizeof line, len, " key=%s", f->key);
                if (f->status > 0)
                        len = append(line, sizeof line, len, " status=%d", f->status);
                if (f->retry_after_s >= 0)
                        len = append(line, sizeof line, len, " retry_after=%lld", (long long) f->retry_after_s);
                if (f->worker > 0)
                        len = append(line, sizeof line, len, " worker=%d", f->worker);
                if (f->request_id)
                        len = append(line, sizeof line, len, " request=%s", f->request_id);
        }
        len = append(line, sizeof line, len, " %s", message);
        line[len++] = '\n';

        /* One write per line: shared stderr, many processes. Nothing useful to do on failure. */
        if (write(STDERR_FILENO, line, len) < 0)
                (void) 0;
}

void log_event_at(const char *code_file, int code_line, const char *code_func, int priority,
                  const char *event, const struct log_fields *f, const char *fmt, ...) {
        char message[1024];
        int saved_errno = errno;
        va_list ap;

        if (priority > log_max_priority)
                return;
        va_start(ap, fmt);
        vsnprintf(message, sizeof message, fmt, ap);
        va_end(ap);

        /* A journal that has gone away must not silence us. */
        if (!log_to_journal || to_journal(code_file, code_line, code_func, priority, event, f, message) < 0)
                to_stderr(priority, event, f, message);
        errno = saved_errno;
}
