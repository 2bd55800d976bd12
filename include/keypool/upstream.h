/* upstream.h — a worker's libcurl multi handle, driven by its event loop.
 *
 * Owns the curl multi handle (and so the worker's pool of upstream connections, reused across
 * requests) and the glue that lets curl's sockets and timer live in the worker's loop:
 * CURLMOPT_SOCKETFUNCTION maps to watches in the evloop's epoll set, CURLMOPT_TIMERFUNCTION to
 * one time source (and "now" to the evloop's deferred work). Callers
 * prepare easy handles; this module runs them and reports each one's end. Also owns how a
 * transfer reaches its provider (trust, proxy, HTTP version) and the worker's shared TLS
 * sessions and CA store, and says which failures are the upstream's transport rather than a
 * key's. Created only in a worker, after fork: curl state never crosses a fork.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <curl/curl.h>
#include <systemd/sd-event.h>

#include "keypool/conf.h"

struct upstream;
struct evloop;

/* Called once per transfer when it ends (res is CURLE_OK or the error), after the handle has
 * been removed from the multi handle; the callee owns easy again. */
typedef void (*upstream_done_fn)(CURL *easy, CURLcode res, void *userdata);

/* What kind of transport failure a transfer's result is. */
enum upstream_failure {
        UPSTREAM_FAILURE_INVALID = 0,          /* not a failure (CURLE_OK) */
        UPSTREAM_FAILURE_CERTIFICATE,           /* untrusted, expired, wrong name: configuration */
        UPSTREAM_FAILURE_TLS,                   /* any other TLS failure (a handshake cut short) */
        UPSTREAM_FAILURE_DNS,                   /* the name (or the proxy's) does not resolve */
        UPSTREAM_FAILURE_STREAM,                /* libcurl failed an HTTP/2 stream the server
                                                 * had closed (see proxy_decide) */
        UPSTREAM_FAILURE_OTHER,                 /* refused, reset, timed out, bad answer, … */
        _UPSTREAM_FAILURE_MAX,
};

/* cfg must outlive the upstream (providers are named by their place in it). */
int upstream_new(struct evloop *loop, const struct config *cfg, struct upstream **ret);
/* Frees u once no transfer runs on it (cancel the running ones first). Easy handles whose
 * transfers ended hold nothing of u and may be cleaned up before or after. */
void upstream_free(struct upstream *u);

/* Where upstream_configure sent a transfer, for upstream_start: which provider's connections it
 * loads, and whether it may share one (HTTP/2). */
struct upstream_route {
        int provider;                   /* its place in the config's providers, -1 for none */
        bool multiplex;
};

/* Sets how easy reaches prov: CA file and directory, certificate checks, proxy (the environment's
 * when prov has none), HTTP/2. Call before every upstream_start, and hand it the route returned:
 * handles move between providers. A request body of body_len bytes, or http1, keeps the transfer
 * on HTTP/1.1 (see upstream.c: libcurl 7.88's HTTP/2 fails streams a server ends before it has
 * the body). */
struct upstream_route upstream_configure(struct upstream *u, CURL *easy, const struct config_provider *prov,
                                         size_t body_len, bool http1);

/* Starts a transfer on the route upstream_configure returned (NULL: a transfer of no provider,
 * counted as needing a connection of its own). userdata goes to done and is stored as
 * CURLOPT_PRIVATE. */
int upstream_start(struct upstream *u, CURL *easy, const struct upstream_route *route, upstream_done_fn done,
                   void *userdata);

/* Stops a running transfer without calling done; the caller owns easy again. */
void upstream_cancel(struct upstream *u, CURL *easy);

/* Resumes a transfer paused by returning CURL_WRITEFUNC_PAUSE. */
void upstream_resume(struct upstream *u, CURL *easy);

/* Transfers running now. */
unsigned upstream_running(const struct upstream *u);

/* Which failure res is; pure. */
enum upstream_failure upstream_failure_class(CURLcode res);

/* curl's full description of the failure of the transfer whose done callback is running ("" when
 * curl said nothing more than its code). */
const char *upstream_error_text(const struct upstream *u);

/* Rate limit for reporting prov's transport failures: true at most once per interval_ms. */
bool upstream_report_due(struct upstream *u, const struct config_provider *prov, int64_t now_ms,
                         int64_t interval_ms);
