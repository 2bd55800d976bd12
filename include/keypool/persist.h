/* persist.h — keypool's state outside the process: state files, export and import.
 *
 * Owns the state document ({"format":"keypool-state","version":1,…}): every key's state,
 * cooldown (as wall-clock time, so a restart keeps the rest of it), counters and the rotation
 * history, keys named by pool and id only — never a secret. Encoding and applying are pure
 * functions of the table and two clocks; the file functions write atomically (an exclusively
 * created temporary file, fsync, rename) and move a corrupt file aside.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "keypool/keytable.h"

struct persist_report {
        unsigned imported;              /* keys whose state was applied */
        unsigned ignored;               /* keys not applied: unknown to the table, or refused */
        unsigned refused;               /* of those, keys whose fields made no sense */
        unsigned capped;                /* applied keys whose rest was cut to max_cooldown */
        unsigned events;                /* history entries added */
        char problem[200];              /* the first refused or cut key and why, or "" */
};

/* The current bank's state as a document (malloc'ed), or NULL on allocation failure. */
char *persist_export(struct keytable *t, int64_t now_mono_ms, int64_t now_wall_ms);

/* Applies a document: keys matched by pool name and id, else by id (every row with that id);
 * cooldowns already over become ready, and one longer than max_cooldown_ms (when > 0) is cut to
 * it, as a live rest would be; a key whose state is unknown or whose counters are not whole
 * numbers from 0 to 2^53 is refused (ignored, counted, the first one named in ret->problem);
 * history entries are appended (only when the table's ring is empty, so a re-import does not
 * duplicate them). -EINVAL for a document that is not JSON, not a keypool state, or of another
 * version, with a reason in err. */
int persist_import(struct keytable *t, const char *json, size_t len, int64_t now_mono_ms,
                   int64_t now_wall_ms, int64_t max_cooldown_ms, struct persist_report *ret,
                   char *err, size_t errlen);

/* Writes text to path atomically: a temporary file created exclusively under a fresh random
 * name in the same directory (never a file or symlink that was already there), fsync, rename,
 * fsync the directory. Mode 0600. On failure the temporary file is removed and path is as it
 * was. */
int persist_save(const char *path, const char *text);

/* Reads path, without blocking. -ENOENT when it does not exist (normal on a first start);
 * -EISDIR or -EBADFD when it is not a regular file (fileio_kind says what it is). */
int persist_read(const char *path, char **ret_text, size_t *ret_len);

/* Renames a bad state file to "<path>.corrupt-<unix time>" and returns the new name (malloc'ed)
 * in ret_path. */
int persist_move_aside(const char *path, int64_t now_wall_ms, char **ret_path);
