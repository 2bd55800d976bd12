/* cluster_redis.c — hiredis's async API on sd-event.
 *
 * Owns the glue between a redisAsyncContext and an sd-event loop: hiredis says when it wants to
 * read or write (ev.addRead, delRead, addWrite, delWrite) and when it is done with the socket
 * (ev.cleanup); this keeps one io source on the context's fd with exactly those events, and hands
 * readiness back to redisAsyncHandleRead/Write. hiredis 0.14 ships adapters for libevent, libev,
 * libuv and others, not for sd-event.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>

#include "cluster_internal.h"

struct redis_io {
        redisAsyncContext *ac;
        sd_event_source *source;
        uint32_t events;
};

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct redis_io *io = userdata;

        /* One handler per wake-up: a read may free the context (a disconnect), and with it io.
         * The source is level-triggered, so a pending write comes round again at once. */
        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR))
                redisAsyncHandleRead(io->ac);
        else if (revents & EPOLLOUT)
                redisAsyncHandleWrite(io->ac);
        return 0;
}

static void set_events(struct redis_io *io, uint32_t events) {
        if (events == io->events)
                return;
        io->events = events;
        if (!io->source)
                return;
        if (events) {
                sd_event_source_set_io_events(io->source, events);
                sd_event_source_set_enabled(io->source, SD_EVENT_ON);
        } else
                sd_event_source_set_enabled(io->source, SD_EVENT_OFF);
}

static void add_read(void *data) {
        struct redis_io *io = data;

        set_events(io, io->events | EPOLLIN);
}

static void del_read(void *data) {
        struct redis_io *io = data;

        set_events(io, io->events & ~(uint32_t) EPOLLIN);
}

static void add_write(void *data) {
        struct redis_io *io = data;

        set_events(io, io->events | EPOLLOUT);
}

static void del_write(void *data) {
        struct redis_io *io = data;

        set_events(io, io->events & ~(uint32_t) EPOLLOUT);
}

static void cleanup(void *data) {
        struct redis_io *io = data;

        /* May run inside on_io: sd-event defers freeing a source that is dispatching. */
        sd_event_source_disable_unref(io->source);
        free(io);
}

int cluster_redis_attach(redisAsyncContext *ac, sd_event *e) {
        struct redis_io *io;
        int r;

        if (!ac || !e || ac->ev.data)
                return -EINVAL;
        io = calloc(1, sizeof *io);
        if (!io)
                return -ENOMEM;
        io->ac = ac;
        r = sd_event_add_io(e, &io->source, ac->c.fd, 0, on_io, io);
        if (r < 0) {
                free(io);
                return r;
        }
        sd_event_source_set_enabled(io->source, SD_EVENT_OFF);
        ac->ev.data = io;
        ac->ev.addRead = add_read;
        ac->ev.delRead = del_read;
        ac->ev.addWrite = add_write;
        ac->ev.delWrite = del_write;
        ac->ev.cleanup = cleanup;
        return 0;
}
