/* cluster_internal.h — what cluster.c and cluster_redis.c share; not a public header. */
#pragma once

#include <hiredis/async.h>
#include <systemd/sd-event.h>

/* Drives ac from e: its reads and writes become an sd-event io source on its fd (the hooks
 * hiredis calls, as its own adapters/libevent.h does for libevent). 0 or a negative errno; the
 * source goes when hiredis frees ac. */
int cluster_redis_attach(redisAsyncContext *ac, sd_event *e);

/* The lease script (cluster_lease.c): what it takes and returns is said above its text. */
extern const char cluster_lease_script[];
