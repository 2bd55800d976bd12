/* upstream.h — a worker's libcurl multi handle, driven by its sd-event loop.
 *
 * Owns the curl multi handle (and so the worker's pool of upstream connections, reused across
 * requests) and the glue that lets curl's sockets and timer live in sd-event:
 * CURLMOPT_SOCKETFUNCTION maps to io sources, CURLMOPT_TIMERFUNCTION to one time source. Callers
 * prepare easy handles; this module runs them and reports each one's end. Created only in a
 * worker, after fork: curl state never crosses a fork.
 */
#pragma once

#include <curl/curl.h>
#include <systemd/sd-event.h>

struct upstream;

/* Called once per transfer when it ends (res is CURLE_OK or the error), after the handle has
 * been removed from the multi handle; the callee owns easy again. */
typedef void (*upstream_done_fn)(CURL *easy, CURLcode res, void *userdata);

int upstream_new(sd_event *e, struct upstream **ret);
void upstream_free(struct upstream *u);

/* Starts a transfer. userdata goes to done and is stored as CURLOPT_PRIVATE. */
int upstream_start(struct upstream *u, CURL *easy, upstream_done_fn done, void *userdata);

/* Stops a running transfer without calling done; the caller owns easy again. */
void upstream_cancel(struct upstream *u, CURL *easy);

/* Resumes a transfer paused by returning CURL_WRITEFUNC_PAUSE. */
void upstream_resume(struct upstream *u, CURL *easy);

/* Transfers running now. */
unsigned upstream_running(const struct upstream *u);
