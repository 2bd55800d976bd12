/* log.c — event records on stderr.
 *
 * One line per event, written with a single write(2) so lines from the coordinator and all
 * workers, which share stderr, never interleave mid-line. Fields come first in key=value form so
 * the lines stay greppable; the message follows. A later journald backend takes the same records.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "keypool/log.h"

static const char *log_ident = "keypoold";
static int log_max_priority = LOG_INFO;

static const char *const priority_names[] = {
        [LOG_EMERG] = "emerg", [LOG_ALERT] = "alert", [LOG_CRIT] = "crit", [LOG_ERR] = "error",
        [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice", [LOG_INFO] = "info",
        [LOG_DEBUG] = "debug",
};

void log_setup(const char *ident, int max_priority) {
        if (ident)
                log_ident = ident;
        log_max_priority = max_priority;
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

void log_event(int priority, const char *event, const struct log_fields *f, const char *fmt, ...) {
        char line[2048];
        size_t len = 0;
        va_list ap;
        int saved_errno = errno;
        int n;

        if (priority > log_max_priority)
                return;

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
                        len = append(line, sizeof line, len, " retry_after=%lld",
                                     (long long) f->retry_after_s);
                if (f->worker > 0)
                        len = append(line, sizeof line, len, " worker=%d", f->worker);
                if (f->request_id)
                        len = append(line, sizeof line, len, " request=%s", f->request_id);
        }
        len = append(line, sizeof line, len, " ");

        va_start(ap, fmt);
        n = vsnprintf(line + len, sizeof line - len, fmt, ap);
        va_end(ap);
        if (n > 0)
                len = len + (size_t) n >= sizeof line - 1 ? sizeof line - 2 : len + (size_t) n;
        line[len++] = '\n';

        /* One write per line: shared stderr, many processes. Nothing useful to do on failure. */
        if (write(STDERR_FILENO, line, len) < 0)
                (void) 0;
        errno = saved_errno;
}
