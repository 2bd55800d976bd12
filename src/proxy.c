/* proxy.c — serving POST /v1/… through a pool's keys.
 *
 * One struct proxy_request lives from the client's complete request until the answer is
 * complete or the client is gone. Each attempt holds one lease on one key; the lease is returned
 * with the attempt's outcome before anything else happens, so the shared table always knows what
 * is in flight.
 *
 * Answers are handled by status as soon as their headers arrive: a success is relayed to the
 * client as it arrives (streams chunk by chunk, nothing buffered); anything else is buffered —
 * error bodies are small — so that policy can judge it and, when it says the key must rest or is
 * dead, the request is sent again with the next key before the client has seen a byte.
 *
 * curl forbids removing a transfer from inside its own callbacks, and a client can vanish from
 * inside one (a failed write): such an abort is only marked, the callback fails the transfer,
 * and the done callback cleans up.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "keypool/clock.h"
#include "keypool/log.h"
#include "keypool/proxy.h"

#define MAX_ATTEMPTS            32
#define MAX_BUFFERED_ERROR      (1024 * 1024)   /* larger error bodies are relayed unjudged */
#define MAX_ANSWER_HEADERS      128

enum answer_mode {
        MODE_HEADERS = 1,       /* status and headers still arriving */
        MODE_STREAM,            /* a success: relay as it comes */
        MODE_BUFFER,            /* an error: keep it to judge it */
        _MODE_MAX,
};

struct proxy_request {
        struct proxy_context *ctx;
        struct http_conn *conn;         /* NULL once the client is gone */
        unsigned pool;
        const struct config_pool *cpool;
        const struct config_provider *provider;
        char *url;                      /* upstream URL */
        char *body;                     /* forwarded body: the client's, or rewritten */
        size_t body_len;
        bool own_body;
        char **fwd_headers;             /* "Name: value" lines forwarded from the client */
        size_t n_fwd_headers;
        char request_id[24];

        CURL *easy;
        struct curl_slist *headers;     /* this attempt's request headers */
        struct keytable_lease lease;
        bool leased;
        unsigned attempts;

        /* the current attempt's answer */
        enum answer_mode mode;
        int status;
        char *answer_headers[MAX_ANSWER_HEADERS];
        size_t n_answer_headers;
        char *answer_body;
        size_t answer_len, answer_cap;
        bool in_curl;                   /* inside a curl callback */
        bool aborted;                   /* the client went away */
        bool pressure;                  /* the client's output buffer is full */
        bool paused;                    /* the transfer is paused on pressure */
};

/* Headers that belong to one connection, or that keypool sets itself. */
static bool is_dropped_request_header(const char *name) {
        static const char *const dropped[] = {
                "Connection", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "TE",
                "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Expect",
                "Authorization", "Accept-Encoding", "x-api-key", "x-goog-api-key",
        };

        if (strncasecmp(name, "X-Keypool-", 10) == 0)
                return true;
        for (size_t i = 0; i < sizeof dropped / sizeof dropped[0]; i++)
                if (strcasecmp(name, dropped[i]) == 0)
                        return true;
        return false;
}

static bool is_dropped_answer_header(const char *name, size_t len) {
        static const char *const dropped[] = {
                "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade",
                "Content-Length", "Trailer", "TE",
        };

        if (len >= 10 && strncasecmp(name, "X-Keypool-", 10) == 0)
                return true;
        for (size_t i = 0; i < sizeof dropped / sizeof dropped[0]; i++)
                if (strlen(dropped[i]) == len && strncasecmp(name, dropped[i], len) == 0)
                        return true;
        return false;
}

/* --- the request's life ------------------------------------------------------------------ */

static void answer_reset(struct proxy_request *pr) {
        for (size_t i = 0; i < pr->n_answer_headers; i++)
                free(pr->answer_headers[i]);
        pr->n_answer_headers = 0;
        free(pr->answer_body);
        pr->answer_body = NULL;
        pr->answer_len = pr->answer_cap = 0;
        pr->status = 0;
        pr->mode = MODE_HEADERS;
}

static void request_free(struct proxy_request *pr) {
        if (pr->easy)
                curl_easy_cleanup(pr->easy);
        curl_slist_free_all(pr->headers);
        answer_reset(pr);
        for (size_t i = 0; i < pr->n_fwd_headers; i++)
                free(pr->fwd_headers[i]);
        free(pr->fwd_headers);
        if (pr->own_body)
                free(pr->body);
        free(pr->url);
        pr->ctx->active--;
        free(pr);
}

static const char *current_key_id(const struct proxy_request *pr) {
        struct keytable_pool_view info;

        if (keytable_pool_info(pr->ctx->table, pr->pool, &info) < 0 || pr->lease.key < info.first_key)
                return "?";
        return pr->cpool->keys[pr->lease.key - info.first_key].id;
}

static void release(struct proxy_request *pr, enum verdict_class cls, const struct verdict *v) {
        struct keytable_outcome o = { .cls = cls, .status = pr->status };
        struct keytable_change change = {};

        if (!pr->leased)
                return;
        if (v && cls == VERDICT_RATE_LIMITED)
                o.rest_ms = v->rest_ms;
        keytable_release(pr->ctx->table, &pr->lease, &o, clock_mono_ms(), &change);
        pr->leased = false;
        if (change.changed) {
                struct log_fields f = LOG_FIELDS_NONE;

                f.key = current_key_id(pr);
                f.pool = pr->cpool->name;
                f.status = pr->status;
                f.request_id = pr->request_id;
                if (change.to == KEY_COOLING) {
                        f.retry_after_s = (o.rest_ms + 999) / 1000;
                        log_event(LOG_WARNING, "cooldown", &f, "key rate limited: resting %llds%s",
                                  (long long) f.retry_after_s, v && v->hinted ? " as the provider asked" : " (no hint: recovery_time)");
                } else if (change.to == KEY_DISABLED) {
                        log_event(LOG_ERR, "disable", &f, "key disabled: %s (status %d)",
                                  keytable_reason_name(change.reason), pr->status);
                }
        }
}

/* Hands the client's connection back to http and frees the request. */
static struct http_conn *detach(struct proxy_request *pr) {
        struct http_conn *c = pr->conn;

        if (c)
                http_conn_set_request_data(c, NULL);
        pr->conn = NULL;
        return c;
}

/* Answer headers keypool adds to every proxied answer. */
static size_t keypool_headers(struct proxy_request *pr, struct http_header *h, char *attempts, size_t size) {
        snprintf(attempts, size, "%u", pr->attempts);
        h[0] = (struct http_header) { "X-Keypool-Pool", pr->cpool->name };
        h[1] = (struct http_header) { "X-Keypool-Key", current_key_id(pr) };
        h[2] = (struct http_header) { "X-Keypool-Attempts", attempts };
        return 3;
}

/* The upstream's end-to-end headers plus keypool's; the strings point into pr. */
static size_t answer_headers(struct proxy_request *pr, struct http_header *h, size_t max,
                             char *names, size_t names_size, char *attempts, size_t attempts_size) {
        size_t n = 0, used = 0;

        for (size_t i = 0; i < pr->n_answer_headers && n + 3 < max; i++) {
                const char *line = pr->answer_headers[i];
                const char *colon = strchr(line, ':');
                size_t len;

                if (!colon || colon == line)
                        continue;
                len = (size_t) (colon - line);
                if (is_dropped_answer_header(line, len) || used + len + 1 > names_size)
                        continue;
                memcpy(names + used, line, len);
                names[used + len] = 0;
                h[n].name = names + used;
                used += len + 1;
                h[n].value = colon + 1 + strspn(colon + 1, " \t");
                n++;
        }
        return n + keypool_headers(pr, h + n, attempts, attempts_size);
}

static void respond_buffered(struct proxy_request *pr) {
        struct http_header h[MAX_ANSWER_HEADERS + 3];
        char names[8192], attempts[16];
        struct http_conn *c;
        size_t n;

        n = answer_headers(pr, h, sizeof h / sizeof h[0], names, sizeof names, attempts, sizeof attempts);
        c = detach(pr);
        if (c)
                http_conn_respond(c, pr->status, h, n, pr->answer_body ? pr->answer_body : "", pr->answer_len);
}

static int begin_stream(struct proxy_request *pr) {
        struct http_header h[MAX_ANSWER_HEADERS + 3];
        char names[8192], attempts[16];
        size_t n;

        n = answer_headers(pr, h, sizeof h / sizeof h[0], names, sizeof names, attempts, sizeof attempts);
        return http_conn_stream_begin(pr->conn, pr->status, h, n);
}

static void respond_error(struct proxy_request *pr, int status, const char *code,
                          int64_t retry_after_s, const char *message) {
        struct http_header h[2];
        char retry[24];
        size_t n = 0;
        struct http_conn *c;

        h[n++] = (struct http_header) { "X-Keypool-Pool", pr->cpool->name };
        if (retry_after_s > 0) {
                snprintf(retry, sizeof retry, "%lld", (long long) retry_after_s);
                h[n++] = (struct http_header) { "Retry-After", retry };
        }
        c = detach(pr);
        if (c)
                http_conn_respond_error(c, status, "keypool_error", code, h, n, "%s", message);
}

/* --- curl callbacks ---------------------------------------------------------------------- */

static size_t on_answer_header(char *data, size_t size, size_t nmemb, void *userdata) {
        struct proxy_request *pr = userdata;
        size_t len = size * nmemb, trimmed = len;

        if (pr->aborted)
                return 0;
        while (trimmed > 0 && (data[trimmed - 1] == '\n' || data[trimmed - 1] == '\r'))
                trimmed--;

        if (trimmed >= 5 && strncmp(data, "HTTP/", 5) == 0) {
                /* A status line starts a new answer (after 100 Continue, say). */
                const char *sp = memchr(data, ' ', trimmed);

                answer_reset(pr);
                pr->status = sp ? atoi(sp + 1) : 0;
                return len;
        }
        if (trimmed == 0) {
                /* End of headers: decide how the body is handled. Informational answers are
                 * followed by the real one. */
                if (pr->status >= 100 && pr->status < 200)
                        return len;
                pr->mode = pr->status >= 200 && pr->status < 300 ? MODE_STREAM : MODE_BUFFER;
                return len;
        }
        if (pr->n_answer_headers < MAX_ANSWER_HEADERS) {
                char *line = strndup(data, trimmed);

                if (!line)
                        return 0;
                pr->answer_headers[pr->n_answer_headers++] = line;
        }
        return len;
}

static size_t on_answer_body(char *data, size_t size, size_t nmemb, void *userdata) {
        struct proxy_request *pr = userdata;
        size_t len = size * nmemb;
        int r;

        if (pr->aborted)
                return 0;

        if (pr->mode == MODE_BUFFER) {
                if (pr->answer_len + len <= MAX_BUFFERED_ERROR) {
                        if (pr->answer_len + len + 1 > pr->answer_cap) {
                                size_t cap = pr->answer_cap ? pr->answer_cap : 4096;
                                char *p;

                                while (cap < pr->answer_len + len + 1)
                                        cap *= 2;
                                p = realloc(pr->answer_body, cap);
                                if (!p)
                                        return 0;
                                pr->answer_body = p;
                                pr->answer_cap = cap;
                        }
                        memcpy(pr->answer_body + pr->answer_len, data, len);
                        pr->answer_len += len;
                        pr->answer_body[pr->answer_len] = 0;
                        return len;
                }
                /* Too large to be an error worth judging: relay what we have and the rest. */
                pr->mode = MODE_STREAM;
        }

        if (pr->pressure) {
                pr->paused = true;
                return CURL_WRITEFUNC_PAUSE;
        }
        pr->in_curl = true;
        r = 0;
        if (!http_conn_stream_started(pr->conn)) {
                r = begin_stream(pr);
                if (r >= 0 && pr->answer_len > 0 && !pr->aborted)
                        r = http_conn_stream_write(pr->conn, pr->answer_body, pr->answer_len);
                pr->answer_len = 0;
        }
        if (r >= 0 && !pr->aborted)
                r = http_conn_stream_write(pr->conn, data, len);
        pr->in_curl = false;
        if (pr->aborted || r < 0)
                return 0;
        if (r == 1)
                pr->pressure = true;
        return len;
}

/* --- attempts ---------------------------------------------------------------------------- */

static void attempt(struct proxy_request *pr);

static const char *auth_header(const struct proxy_request *pr, const char *secret, char *buf, size_t size) {
        snprintf(buf, size, "Authorization: Bearer %s", secret);
        return buf;
}

static void on_done(CURL *easy, CURLcode res, void *userdata) {
        struct proxy_request *pr = userdata;
        struct verdict v = {};
        struct log_fields f = LOG_FIELDS_NONE;

        if (pr->aborted) {
                release(pr, VERDICT_NONE, NULL);
                request_free(pr);
                return;
        }

        f.pool = pr->cpool->name;
        f.key = current_key_id(pr);
        f.request_id = pr->request_id;

        if (res != CURLE_OK) {
                bool timeout = res == CURLE_OPERATION_TIMEDOUT;

                release(pr, VERDICT_TRANSIENT, NULL);
                log_event(LOG_WARNING, "upstream_error", &f, "upstream %s: %s",
                          pr->provider->name, curl_easy_strerror(res));
                if (pr->conn && http_conn_stream_started(pr->conn)) {
                        /* Bytes have reached the client: the only honest end is a cut. */
                        http_conn_abort(detach(pr));
                } else {
                        respond_error(pr, timeout ? 504 : 502, timeout ? "upstream_timeout" : "upstream_unreachable",
                                      0, timeout ? "the upstream did not answer in time"
                                                 : "the upstream could not be reached or closed the connection");
                }
                request_free(pr);
                return;
        }

        if (pr->mode != MODE_BUFFER) {
                release(pr, VERDICT_OK, NULL);
                if (pr->conn && http_conn_stream_started(pr->conn))
                        http_conn_stream_end(detach(pr));
                else
                        respond_buffered(pr);   /* a success with an empty body */
                request_free(pr);
                return;
        }

        {
                struct answer_header ah[MAX_ANSWER_HEADERS];
                struct upstream_answer a = { .status = pr->status };
                size_t n = 0;

                for (size_t i = 0; i < pr->n_answer_headers; i++) {
                        const char *line = pr->answer_headers[i];
                        const char *colon = strchr(line, ':');
                        const char *value;

                        if (!colon)
                                continue;
                        value = colon + 1 + strspn(colon + 1, " \t");
                        ah[n++] = (struct answer_header) {
                                .name = line, .name_len = (size_t) (colon - line),
                                .value = value, .value_len = strlen(value),
                        };
                }
                a.headers = ah;
                a.n_headers = n;
                a.body = pr->answer_body;
                a.body_len = pr->answer_len;
                policy_classify(&a, &pr->ctx->policy, clock_wall_ms(), &v);
        }

        switch (v.cls) {
        case VERDICT_RATE_LIMITED:
        case VERDICT_AUTH:
        case VERDICT_QUOTA:
                f.status = pr->status;
                release(pr, v.cls, &v);
                if (pr->attempts < MAX_ATTEMPTS) {
                        log_event(LOG_NOTICE, "rotate", &f, "answer %d (%s): moving the request to the next key",
                                  pr->status, verdict_class_name(v.cls));
                        curl_easy_cleanup(pr->easy);
                        pr->easy = NULL;
                        answer_reset(pr);
                        attempt(pr);
                        return;
                }
                respond_buffered(pr);
                request_free(pr);
                return;
        default:
                release(pr, v.cls, &v);
                respond_buffered(pr);
                request_free(pr);
                return;
        }
}

static void attempt(struct proxy_request *pr) {
        struct proxy_context *p = pr->ctx;
        const struct config *cfg = p->config;
        struct keytable_change change = {};
        struct keytable_pool_view info;
        int64_t now = clock_mono_ms(), retry_at = 0;
        char auth[1024];
        const char *secret;
        int r;

        r = keytable_acquire(p->table, p->slot, pr->pool, now, &pr->lease, &retry_at, &change);
        if (change.changed && change.to == KEY_READY && keytable_pool_info(p->table, pr->pool, &info) >= 0) {
                struct log_fields f = LOG_FIELDS_NONE;

                f.pool = pr->cpool->name;
                f.key = pr->cpool->keys[change.key - info.first_key].id;
                log_event(LOG_INFO, "recover", &f, "key is ready again");
        }
        if (r == -EAGAIN) {
                char msg[256];
                int64_t wait_s = retry_at > 0 ? (retry_at - now + 999) / 1000 : 0;

                if (retry_at > 0)
                        snprintf(msg, sizeof msg, "no key of pool '%s' is ready: the next one recovers in %llds",
                                 pr->cpool->name, (long long) wait_s);
                else
                        snprintf(msg, sizeof msg, "no key of pool '%s' is ready: every key is disabled",
                                 pr->cpool->name);
                respond_error(pr, 503, "no_key_available", wait_s > 0 ? wait_s : 0, msg);
                request_free(pr);
                return;
        }
        if (r < 0) {
                respond_error(pr, 503, "worker_busy", 1, "this worker has too many requests in flight");
                request_free(pr);
                return;
        }
        pr->leased = true;
        pr->attempts++;
        if (keytable_pool_info(p->table, pr->pool, &info) < 0) {
                release(pr, VERDICT_NONE, NULL);
                respond_error(pr, 500, "internal_error", 0, "the key table does not know this pool");
                request_free(pr);
                return;
        }
        secret = pr->cpool->keys[pr->lease.key - info.first_key].secret;

        curl_slist_free_all(pr->headers);
        pr->headers = curl_slist_append(NULL, auth_header(pr, secret, auth, sizeof auth));
        explicit_bzero(auth, sizeof auth);
        for (size_t i = 0; pr->headers && i < pr->n_fwd_headers; i++)
                pr->headers = curl_slist_append(pr->headers, pr->fwd_headers[i]);

        pr->easy = curl_easy_init();
        if (!pr->easy || !pr->headers) {
                release(pr, VERDICT_NONE, NULL);
                respond_error(pr, 500, "internal_error", 0, "out of memory");
                request_free(pr);
                return;
        }
        curl_easy_setopt(pr->easy, CURLOPT_URL, pr->url);
        curl_easy_setopt(pr->easy, CURLOPT_POST, 1L);
        curl_easy_setopt(pr->easy, CURLOPT_POSTFIELDS, pr->body);
        curl_easy_setopt(pr->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) pr->body_len);
        curl_easy_setopt(pr->easy, CURLOPT_HTTPHEADER, pr->headers);
        curl_easy_setopt(pr->easy, CURLOPT_HEADERFUNCTION, on_answer_header);
        curl_easy_setopt(pr->easy, CURLOPT_HEADERDATA, pr);
        curl_easy_setopt(pr->easy, CURLOPT_WRITEFUNCTION, on_answer_body);
        curl_easy_setopt(pr->easy, CURLOPT_WRITEDATA, pr);
        curl_easy_setopt(pr->easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(pr->easy, CURLOPT_CONNECTTIMEOUT, (long) cfg->connect_timeout);
        curl_easy_setopt(pr->easy, CURLOPT_TIMEOUT, (long) cfg->upstream_timeout);
        curl_easy_setopt(pr->easy, CURLOPT_TCP_KEEPALIVE, 1L);
        curl_easy_setopt(pr->easy, CURLOPT_TCP_NODELAY, 1L);
        /* Keys travel in headers only; redirects could carry them to another host. */
        curl_easy_setopt(pr->easy, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(pr->easy, CURLOPT_PROTOCOLS_STR, "http,https");

        r = upstream_start(p->upstream, pr->easy, on_done, pr);
        if (r < 0) {
                release(pr, VERDICT_NONE, NULL);
                respond_error(pr, 500, "internal_error", 0, "could not start the upstream transfer");
                request_free(pr);
        }
}

/* --- entry points ------------------------------------------------------------------------ */

void proxy_on_abort(struct http_conn *c, void *request_data) {
        struct proxy_request *pr = request_data;

        pr->aborted = true;
        pr->conn = NULL;
        if (pr->in_curl || !pr->easy)
                return;                 /* the callback fails the transfer; on_done frees */
        upstream_cancel(pr->ctx->upstream, pr->easy);
        release(pr, VERDICT_NONE, NULL);
        request_free(pr);
}

void proxy_on_drain(struct http_conn *c, void *request_data) {
        struct proxy_request *pr = request_data;

        pr->pressure = false;
        if (pr->paused && !pr->in_curl && pr->easy) {
                pr->paused = false;
                upstream_resume(pr->ctx->upstream, pr->easy);
        }
}

/* The pool the request names: X-Keypool-Pool wins over the body's model. On success the body
 * may have been rewritten (a pool name given as model becomes the pool's model id). Returns 0,
 * or answers the client and returns -1. */
static int route(struct proxy_request *pr, struct http_conn *c, const struct http_request *req) {
        const struct config *cfg = pr->ctx->config;
        const char *header = http_request_header(req, "X-Keypool-Pool");
        json_error_t error;
        json_t *body, *model;
        const char *model_name = NULL;
        int pool = -1;

        body = json_loadb(req->body, req->body_len, 0, &error);
        if (!body || !json_is_object(body)) {
                json_decref(body);
                http_conn_respond_error(c, 400, "invalid_request_error", "invalid_json", NULL, 0,
                                        "the request body must be a JSON object");
                return -1;
        }
        model = json_object_get(body, "model");
        if (model && json_is_string(model))
                model_name = json_string_value(model);

        if (header) {
                pool = config_find_pool(cfg, header, strlen(header));
                if (pool < 0) {
                        json_decref(body);
                        http_conn_respond_error(c, 404, "invalid_request_error", "unknown_pool", NULL, 0,
                                                "no pool is named '%.100s'", header);
                        return -1;
                }
        } else if (model_name) {
                pool = config_find_pool(cfg, model_name, strlen(model_name));
                if (pool < 0) {
                        http_conn_respond_error(c, 404, "invalid_request_error", "model_not_found", NULL, 0,
                                                "no pool serves the model '%.100s'", model_name);
                        json_decref(body);
                        return -1;
                }
        } else {
                json_decref(body);
                http_conn_respond_error(c, 400, "invalid_request_error", "missing_model", NULL, 0,
                                        "the request names no model (set \"model\" or X-Keypool-Pool)");
                return -1;
        }

        pr->pool = (unsigned) pool;
        pr->cpool = &cfg->pools[pool];
        pr->provider = &cfg->providers[pr->cpool->provider];

        /* The upstream knows models, not pool names: rewrite only when the client used a name. */
        if (!model_name || (strcmp(model_name, pr->cpool->model) != 0 &&
                            (header ? !model_name : strcmp(model_name, pr->cpool->name) == 0))) {
                char *text;

                json_object_set_new(body, "model", json_string(pr->cpool->model));
                text = json_dumps(body, JSON_COMPACT);
                if (!text) {
                        json_decref(body);
                        http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0,
                                                "out of memory");
                        return -1;
                }
                pr->body = text;
                pr->body_len = strlen(text);
                pr->own_body = true;
        } else {
                pr->body = req->body;
                pr->body_len = req->body_len;
        }
        json_decref(body);
        return 0;
}

static int build_forward_headers(struct proxy_request *pr, const struct http_request *req) {
        bool content_type = false;

        pr->fwd_headers = calloc(req->n_fields + 1, sizeof *pr->fwd_headers);
        if (!pr->fwd_headers)
                return -ENOMEM;
        for (size_t i = 0; i < req->n_fields; i++) {
                const struct http_field *f = &req->fields[i];
                char *line;

                if (is_dropped_request_header(f->name))
                        continue;
                if (strcasecmp(f->name, "Content-Type") == 0)
                        content_type = true;
                /* curl drops "Name:" with an empty value unless it is written "Name;". */
                if (asprintf(&line, f->value[0] ? "%s: %s" : "%s;", f->name, f->value) < 0)
                        return -ENOMEM;
                pr->fwd_headers[pr->n_fwd_headers++] = line;
        }
        if (!content_type) {
                /* Without it curl would label the body a form. */
                char *line = strdup("Content-Type: application/json");

                if (!line)
                        return -ENOMEM;
                pr->fwd_headers[pr->n_fwd_headers++] = line;
        }
        return 0;
}

void proxy_handle(struct proxy_context *p, struct http_conn *c, const struct http_request *req) {
        struct proxy_request *pr;
        const char *rest;

        if (strcmp(req->method, "POST") != 0) {
                http_conn_respond_error(c, 405, "invalid_request_error", "method_not_allowed",
                                        (const struct http_header[]) { { "Allow", "POST" } }, 1,
                                        "only POST is proxied");
                return;
        }
        pr = calloc(1, sizeof *pr);
        if (!pr) {
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0, "out of memory");
                return;
        }
        pr->ctx = p;
        p->active++;
        pr->mode = MODE_HEADERS;
        snprintf(pr->request_id, sizeof pr->request_id, "%u-%llu", p->slot,
                 (unsigned long long) ++p->next_request_id);

        if (route(pr, c, req) < 0) {
                request_free(pr);
                return;
        }
        rest = req->url + strlen("/v1/");
        if (asprintf(&pr->url, "%s/%s", pr->provider->base_url, rest) < 0 ||
            build_forward_headers(pr, req) < 0) {
                pr->url = NULL;
                http_conn_respond_error(c, 500, "keypool_error", "internal_error", NULL, 0, "out of memory");
                request_free(pr);
                return;
        }
        pr->conn = c;
        http_conn_set_request_data(c, pr);
        attempt(pr);
}
