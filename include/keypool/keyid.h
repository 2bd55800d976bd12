/* keyid.h — stable, secret-free names for API keys.
 *
 * A key's id is "kp-" and the first 10 hex digits of the SHA-256 of the secret: stable across
 * restarts and reloads, safe to log, and the only name the shared table, status output, logs and
 * state files ever use. Its masked form is for people and never gives the key away: a recognised
 * provider prefix (sk-or-v1-, AIza, …), "...", and the last few characters of the rest (at most
 * 4, at most a quarter of the rest, and always leaving 24 or more hidden); a key too short for
 * that is masked as its id. Bytes that are not printable ASCII show as '?'.
 */
#pragma once

#include <stddef.h>

#define KEYID_ID_LEN   13       /* "kp-" + 10 hex digits */
#define KEYID_MASK_MAX 21       /* a prefix of up to 14, "...", up to 4; or an id */

/* Writes the id of the secret's first len bytes (NUL-terminated) to ret_id. 0 or -errno. */
int keyid_fingerprint(const char *secret, size_t len, char ret_id[KEYID_ID_LEN + 1]);

/* Writes the masked form (NUL-terminated) to ret_masked. Never fails. */
void keyid_mask(const char *secret, size_t len, char ret_masked[KEYID_MASK_MAX + 1]);

/* The full SHA-256 of data as 64 lowercase hex digits (client tokens are configured this way). */
int keyid_sha256_hex(const char *data, size_t len, char ret_hex[65]);

/* The length of the provider prefix secret starts with (sk-or-v1-, sk-ant-, AIza, gsk_, …), 0 when
 * none is recognised. */
size_t keyid_prefix_len(const char *secret, size_t len);

/* Why a key is weak enough to be found from its id by trying keys offline (too short after its
 * prefix, too few different characters, too small an alphabet for its length), or NULL. */
const char *keyid_weak(const char *secret, size_t len);
