/* keyid.h — stable, secret-free names for API keys.
 *
 * A key's id is "kp-" and the first 10 hex digits of the SHA-256 of the secret: stable across
 * restarts and reloads, safe to log, and the only name the shared table, status output, logs and
 * state files ever use. Its masked form is for people: the first 15 characters, "...", and the
 * last 3 for secrets of 24 characters or more; "..." and the last 3 for shorter ones; just "..."
 * below 8 characters, where 3 would give away too much. Bytes that are not printable ASCII show
 * as '?'.
 */
#pragma once

#include <stddef.h>

#define KEYID_ID_LEN   13       /* "kp-" + 10 hex digits */
#define KEYID_MASK_MAX 21       /* 15 + "..." + 3 */

/* Writes the id of the secret's first len bytes (NUL-terminated) to ret_id. 0 or -errno. */
int keyid_fingerprint(const char *secret, size_t len, char ret_id[KEYID_ID_LEN + 1]);

/* Writes the masked form (NUL-terminated) to ret_masked. Never fails. */
void keyid_mask(const char *secret, size_t len, char ret_masked[KEYID_MASK_MAX + 1]);

/* The full SHA-256 of data as 64 lowercase hex digits (client tokens are configured this way). */
int keyid_sha256_hex(const char *data, size_t len, char ret_hex[65]);
