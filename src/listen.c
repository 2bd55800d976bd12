/* listen.c — the sockets clients connect to.
 *
 * The coordinator opens them before the first fork so that every worker inherits the same
 * listening sockets and the kernel hands each connection to one of them. A socket file is only
 * ever replaced when it is a socket nobody answers on: a typo in the path must not delete a file,
 * and a second keypoold must not steal a running one's clients.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "keypool/listen.h"

static int make_parent_dir(const char *path) {
        char *dir = strdup(path), *slash;
        int r = 0;

        if (!dir)
                return -ENOMEM;
        slash = strrchr(dir, '/');
        if (slash && slash != dir) {
                *slash = 0;
                for (char *p = dir + 1; *p; p++) {
                        if (*p != '/')
                                continue;
                        *p = 0;
                        if (mkdir(dir, 0755) < 0 && errno != EEXIST)
                                r = -errno;
                        *p = '/';
                }
                if (r == 0 && mkdir(dir, 0755) < 0 && errno != EEXIST)
                        r = -errno;
        }
        free(dir);
        return r;
}

/* Is something accepting connections on path right now? */
static bool socket_answers(const struct sockaddr_un *sa) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        bool answers;

        if (fd < 0)
                return false;
        answers = connect(fd, (const struct sockaddr *) sa, sizeof *sa) == 0;
        close(fd);
        return answers;
}

static void free_names(char **names) {
        for (size_t i = 0; names && names[i]; i++)
                free(names[i]);
        free(names);
}

/* Socket activation: the socket named "keypool", else the first one passed. Returns 1 when a
 * socket was passed (and taken), 0 when none, negative on error. */
static int inherit(int *ret_fd) {
        char **names = NULL;
        int n, fd = SD_LISTEN_FDS_START, r;

        n = sd_listen_fds_with_names(1, &names);
        if (n <= 0) {
                free_names(names);
                return n;
        }
        for (int i = 0; names && i < n; i++)
                if (names[i] && strcmp(names[i], "keypool") == 0) {
                        fd = SD_LISTEN_FDS_START + i;
                        break;
                }
        free_names(names);

        r = sd_is_socket(fd, AF_UNSPEC, SOCK_STREAM, 1);
        if (r <= 0)
                return r < 0 ? r : -ENOTSOCK;
        if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
                return -errno;
        /* Any other passed fds are of no use to us. */
        for (int i = 0; i < n; i++)
                if (SD_LISTEN_FDS_START + i != fd)
                        close(SD_LISTEN_FDS_START + i);
        *ret_fd = fd;
        return 1;
}

static int open_unix(const struct listen_spec *spec, int *ret_fd, int *ret_group_error,
                     enum listen_step *failed) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct stat st;
        mode_t old_umask;
        int fd, r;

        if (strlen(spec->path) >= sizeof sa.sun_path) {
                *failed = LISTEN_STEP_PATH;
                return -ENAMETOOLONG;
        }
        strcpy(sa.sun_path, spec->path);
        r = make_parent_dir(spec->path);
        if (r < 0) {
                *failed = LISTEN_STEP_DIRECTORY;
                return r;
        }
        if (lstat(spec->path, &st) == 0) {
                if (!S_ISSOCK(st.st_mode)) {
                        *failed = LISTEN_STEP_NOT_A_SOCKET;
                        return -EEXIST;
                }
                if (socket_answers(&sa)) {
                        *failed = LISTEN_STEP_IN_USE;
                        return -EADDRINUSE;
                }
                /* A stale socket file from a process that is gone. */
                unlink(spec->path);
        }

        *failed = LISTEN_STEP_UNIX;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        /* Bind under a tight umask so the socket is never briefly open to everyone. */
        old_umask = umask(0177);
        r = bind(fd, (struct sockaddr *) &sa, sizeof sa);
        umask(old_umask);
        *ret_group_error = 0;
        if (r >= 0 && spec->set_group && chown(spec->path, (uid_t) -1, spec->group) < 0)
                *ret_group_error = -errno;
        if (r < 0 || chmod(spec->path, spec->mode) < 0 || listen(fd, SOMAXCONN) < 0) {
                r = -errno;
                close(fd);
                return r;
        }
        *ret_fd = fd;
        return 0;
}

/* getaddrinfo speaks EAI_*, the callers errno. */
static int gai_errno(int gai) {
        switch (gai) {
        case EAI_SYSTEM:
                return errno > 0 ? -errno : -EIO;
        case EAI_MEMORY:
                return -ENOMEM;
        case EAI_AGAIN:
                return -EAGAIN;
        case EAI_FAMILY:
                return -EAFNOSUPPORT;
        case EAI_SERVICE:
                return -EINVAL;
        default:
                return -EADDRNOTAVAIL;
        }
}

static int open_tcp(const struct listen_spec *spec, int *ret_fd, enum listen_step *failed) {
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
        struct addrinfo *ai = NULL;
        int fd, r, one = 1;

        r = getaddrinfo(spec->tcp_host, spec->tcp_port, &hints, &ai);
        if (r != 0) {
                *failed = LISTEN_STEP_TCP_ADDRESS;
                return gai_errno(r);
        }
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
            bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, SOMAXCONN) < 0) {
                r = -errno;
                if (fd >= 0)
                        close(fd);
                freeaddrinfo(ai);
                *failed = LISTEN_STEP_TCP;
                return r;
        }
        freeaddrinfo(ai);
        *ret_fd = fd;
        return 0;
}

int listen_open(const struct listen_spec *spec, struct listen_sockets *ret, enum listen_step *failed) {
        struct listen_sockets l = { .unix_fd = -1, .tcp_fd = -1 };
        int r;

        r = inherit(&l.unix_fd);
        if (r < 0) {
                *failed = LISTEN_STEP_INHERIT;
                return r;
        }
        l.inherited = r > 0;
        if (!l.inherited) {
                r = open_unix(spec, &l.unix_fd, &l.group_error, failed);
                if (r < 0)
                        return r;
                l.created_path = strdup(spec->path);
                if (!l.created_path) {
                        r = -ENOMEM;
                        *failed = LISTEN_STEP_UNIX;
                        goto fail;
                }
        }
        if (spec->tcp) {
                r = open_tcp(spec, &l.tcp_fd, failed);
                if (r < 0)
                        goto fail;
        }
        *ret = l;
        return 0;

fail:
        /* All or nothing: the caller has no file to remove. */
        if (!l.inherited)
                unlink(spec->path);
        free(l.created_path);
        close(l.unix_fd);
        return r;
}

void listen_close(struct listen_sockets *l) {
        if (l->created_path) {
                unlink(l->created_path);
                free(l->created_path);
                l->created_path = NULL;
        }
        if (l->unix_fd >= 0) {
                close(l->unix_fd);
                l->unix_fd = -1;
        }
        if (l->tcp_fd >= 0) {
                close(l->tcp_fd);
                l->tcp_fd = -1;
        }
}
