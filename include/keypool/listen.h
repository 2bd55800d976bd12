/* listen.h — the sockets clients connect to.
 *
 * Owns opening and closing them: the UNIX socket (its directory made, a stale file of a dead
 * server replaced but never a live server's nor a non-socket, bound under a tight umask so it is
 * never briefly open to everyone, then given its mode and group), the socket systemd passes by
 * socket activation instead, and the optional TCP listener. Every descriptor is non-blocking and
 * close-on-exec, ready to be inherited by the workers; only a socket file this module created is
 * ever removed. Nothing here logs: failures come back as -errno and the step that failed, for the
 * caller's one message.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* What to listen on, as config_load parsed it (conf.h: socket_gid, http_host, http_port); opening
 * re-reads no setting text. */
struct listen_spec {
        const char *path;               /* the UNIX socket's file */
        mode_t mode;                    /* its permission bits */
        bool set_group;
        gid_t group;                    /* its group when set_group, else the daemon's own */
        bool tcp;                       /* also listen on tcp_host:tcp_port */
        char tcp_host[256];             /* a numeric address (no brackets) or a host name */
        char tcp_port[8];
};

/* What is open, and what listen_close undoes. */
struct listen_sockets {
        int unix_fd;                    /* -1 when closed */
        int tcp_fd;                     /* -1 when none */
        bool inherited;                 /* unix_fd came from the service manager */
        char *created_path;             /* the socket file we made and remove on close, or NULL */
        int group_error;                /* 0, or why the socket file could not get its group
                                         * (not fatal: it keeps the daemon's group) */
};

/* Which step of listen_open failed. */
enum listen_step {
        LISTEN_STEP_INHERIT = 1,        /* the passed socket is not a listening stream socket */
        LISTEN_STEP_PATH,               /* the socket path does not fit a sockaddr_un */
        LISTEN_STEP_DIRECTORY,          /* its directory cannot be made */
        LISTEN_STEP_NOT_A_SOCKET,       /* something other than a socket has the path */
        LISTEN_STEP_IN_USE,             /* a live server answers on the path */
        LISTEN_STEP_UNIX,               /* socket, bind, chmod or listen of the UNIX socket */
        LISTEN_STEP_TCP_ADDRESS,        /* tcp_host:tcp_port does not resolve */
        LISTEN_STEP_TCP,                /* socket, bind or listen of the TCP socket */
        _LISTEN_STEP_MAX,
};

/* Opens everything spec asks for: the socket systemd passed (the one named "keypool", else the
 * first; the others are closed), else the UNIX socket at spec->path; then the TCP listener.
 * All or nothing: on failure nothing stays open or created, *failed names the step, and ret is
 * untouched. */
int listen_open(const struct listen_spec *spec, struct listen_sockets *ret, enum listen_step *failed);

/* Stops taking clients: removes the socket file we created and closes our descriptors (the
 * workers' copies keep the sockets until they exit). Safe to call again. */
void listen_close(struct listen_sockets *l);
