/* fileio.h — reading a whole small file into memory.
 *
 * The one place keypool opens the files an operator names for it to read: the env file, the
 * state file and key files (file:, cred:). Each is read whole, up to a size the caller bounds, so
 * that a wrong path (a log, a device, a huge file) costs an error and never unbounded memory. Only
 * regular files are read, and they are opened without blocking: a FIFO or a device put where a
 * file was expected is refused at once instead of waiting for a writer that never comes. The content may be a secret: every buffer this module lets go of is
 * wiped first, and the caller wipes the one it gets.
 */
#pragma once

#include <stddef.h>

/* Reads all of path into *ret_data (malloc'ed, NUL-terminated; *ret_len, if not NULL, does not
 * count the NUL). Returns 0, or a negative errno: -EFBIG when the file holds more than max bytes,
 * -EISDIR for a directory, -EBADFD for any other file that is not a regular one, else what
 * open(2), fstat(2) or read(2) said. The out-parameters are written only on success. */
int fileio_read(const char *path, size_t max, char **ret_data, size_t *ret_len);

/* What path names now, for a message about a file fileio_read refused: "a regular file", "a
 * directory", "a FIFO", "a character device", "a block device", "a socket", "a symbolic link"
 * (dangling), "missing" or "unreadable". Never opens it, so never blocks. */
const char *fileio_kind(const char *path);
