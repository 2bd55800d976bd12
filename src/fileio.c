/* fileio.c — reading a whole small file into memory.
 *
 * Owns opening and reading the files keypool reads whole (env file, state file, key files):
 * nowhere else opens them, so how they are opened and what kind of file is accepted is decided
 * here once: opened without blocking, then only a regular file is read. Never logs. Invariants: no read goes past max + 1 bytes, and a buffer that held file
 * content is wiped before it is freed or replaced by a larger one (realloc could leave a copy of a
 * key behind in the heap).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "keypool/fileio.h"

static void wipe_free(char *p, size_t size) {
        if (!p)
                return;
        explicit_bzero(p, size);
        free(p);
}

/* Reads fd to its end into a buffer sized from the first guess; the file may have grown since
 * fstat, so the limit is checked against what was read, not what was promised. */
static int read_all(int fd, size_t guess, size_t max, char **ret_data, size_t *ret_len) {
        size_t len = 0, size = guess + 1;
        char *buf = malloc(size);

        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t k;

                if (len + 1 >= size) {
                        char *grown;
                        size_t cap;

                        /* Full past the limit and not at the end: one byte too many. */
                        if (len > max) {
                                wipe_free(buf, size);
                                return -EFBIG;
                        }
                        cap = size < 64 ? 64 : size * 2;
                        if (cap > max + 2 || cap < size)
                                cap = max + 2;
                        grown = malloc(cap);
                        if (!grown) {
                                wipe_free(buf, size);
                                return -ENOMEM;
                        }
                        memcpy(grown, buf, len);
                        wipe_free(buf, size);
                        buf = grown;
                        size = cap;
                }
                k = read(fd, buf + len, size - len - 1);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        k = -errno;
                        wipe_free(buf, size);
                        return (int) k;
                }
                if (k == 0)
                        break;
                len += (size_t) k;
        }
        if (len > max) {
                wipe_free(buf, size);
                return -EFBIG;
        }
        buf[len] = '\0';
        *ret_data = buf;
        *ret_len = len;
        return 0;
}

int fileio_read(const char *path, size_t max, char **ret_data, size_t *ret_len) {
        struct stat st;
        char *data = NULL;
        size_t len = 0;
        int fd, r;

        if (!path || !ret_data || max >= SIZE_MAX - 2)
                return -EINVAL;
        /* O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, and a terminal
         * or a device may wait for a carrier; the kind is checked on the descriptor, after. */
        fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                r = -errno;
        else if (S_ISDIR(st.st_mode))
                r = -EISDIR;
        else if (!S_ISREG(st.st_mode))
                r = -EBADFD;            /* a FIFO or a device could block, or never end */
        else if ((uint64_t) st.st_size > max)
                r = -EFBIG;
        /* A regular file never blocks anyway; reading it with the flag cleared keeps a network
         * file system from answering a read with EAGAIN. */
        else if (fcntl(fd, F_SETFL, 0) < 0)
                r = -errno;
        else
                r = read_all(fd, (size_t) st.st_size, max, &data, &len);
        (void) close(fd);
        if (r < 0)
                return r;
        *ret_data = data;
        if (ret_len)
                *ret_len = len;
        return 0;
}

const char *fileio_kind(const char *path) {
        struct stat st;

        if (!path)
                return "missing";
        if (stat(path, &st) < 0) {
                if (errno == ENOENT && lstat(path, &st) == 0 && S_ISLNK(st.st_mode))
                        return "a symbolic link";
                return errno == ENOENT || errno == ENOTDIR ? "missing" : "unreadable";
        }
        if (S_ISREG(st.st_mode))
                return "a regular file";
        if (S_ISDIR(st.st_mode))
                return "a directory";
        if (S_ISFIFO(st.st_mode))
                return "a FIFO";
        if (S_ISCHR(st.st_mode))
                return "a character device";
        if (S_ISBLK(st.st_mode))
                return "a block device";
        if (S_ISSOCK(st.st_mode))
                return "a socket";
        return "not a regular file";
}
