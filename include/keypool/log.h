/* log.h — keypool's one way of telling the operator what happened.
 *
 * Every event is one record: a priority (syslog levels), an event kind (KEYPOOL_EVENT: "rotate",
 * "cooldown", "worker_exit", …) and a human message, plus optional fields naming the pool, the
 * key (by id, never the secret), the upstream status and the retry hint. Records go to the
 * journal as structured entries (with a MESSAGE_ID per event kind, documented in
 * systemd/keypool.catalog) or to stderr as one readable line each. Only top levels log
 * (coordinator, worker loop, main); library code returns errors instead.
 */
#pragma once

#include <stdint.h>
#include <syslog.h>

struct log_fields {
        const char *pool;               /* NULL when not about a pool */
        const char *key;                /* key id, NULL when not about a key */
        int status;                     /* upstream HTTP status, 0 when none */
        int64_t retry_after_s;          /* -1 when none */
        int worker;                     /* worker pid, 0 when none */
        const char *request_id;         /* NULL when none */
};

#define LOG_FIELDS_NONE ((struct log_fields) { .retry_after_s = -1 })

enum log_target {
        LOG_TARGET_AUTO = 1,            /* the journal when stderr is connected to it, else stderr */
        LOG_TARGET_JOURNAL,
        LOG_TARGET_STDERR,
        _LOG_TARGET_MAX,
};

/* Sets the program name, the lowest priority recorded (LOG_INFO default) and the target. */
void log_setup(const char *ident, int max_priority, enum log_target target);

/* "auto", "journal", "stderr" → the target, or 0. */
enum log_target log_target_from_string(const char *s);

/* Logs one event. event may be NULL for plain messages. The journal records where it was
 * logged (CODE_FILE, CODE_LINE, CODE_FUNC). */
#define log_event(priority, event, f, ...) \
        log_event_at("CODE_FILE=" __FILE__, __LINE__, __func__, priority, event, f, __VA_ARGS__)
void log_event_at(const char *code_file, int code_line, const char *code_func, int priority,
                  const char *event, const struct log_fields *f, const char *fmt, ...)
        __attribute__((format(printf, 7, 8)));

#define log_error(...)   log_event(LOG_ERR, NULL, NULL, __VA_ARGS__)
#define log_warning(...) log_event(LOG_WARNING, NULL, NULL, __VA_ARGS__)
#define log_notice(...)  log_event(LOG_NOTICE, NULL, NULL, __VA_ARGS__)
#define log_info(...)    log_event(LOG_INFO, NULL, NULL, __VA_ARGS__)
#define log_debug(...)   log_event(LOG_DEBUG, NULL, NULL, __VA_ARGS__)
