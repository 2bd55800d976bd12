/* scrub.h — keeping secrets out of text that came from an upstream.
 *
 * Owns the one rule for text an upstream sent that keypool keeps, shows or relays: no configured
 * secret survives in it, verbatim, whatever the secret's alphabet or length. A scrubber is built
 * once from the configuration's secrets (its own copies, wiped when it is freed) and only read
 * afterwards, so one worker's requests share it. Text is rewritten in place: every hidden run
 * becomes "[redacted]" ("*" per byte when shorter than that), so the text never grows.
 *
 * scrub_text also hides what has the shape of a credential even when keypool does not know it:
 * the value after "Bearer", after an auth header name ("Authorization:", "x-api-key:", …), a
 * word that starts like a provider's key (sk-, sk-or-v1-, sk-ant-, AIza, gsk_, xai-, …), and long
 * unbroken words no language has. It is for text kept for people (key status, logs), where a
 * word too many hidden costs nothing; relayed answers use scrub_secrets, which changes nothing
 * but the secrets.
 */
#pragma once

#include <stddef.h>

struct config;
struct scrub;

/* Secrets shorter than this are not looked for: they would hide ordinary words. */
#define SCRUB_MIN_SECRET 4

/* An empty scrubber (it still hides shapes in scrub_text). 0 or -ENOMEM. */
int scrub_new(struct scrub **ret);
/* Adds a secret (copied). 0, or -ENOMEM; secrets shorter than SCRUB_MIN_SECRET are ignored. */
int scrub_add(struct scrub *s, const char *secret, size_t len);
/* Builds the lookup index; call once after the last scrub_add. 0 or -ENOMEM. */
int scrub_seal(struct scrub *s);
/* A sealed scrubber of every key secret of c. 0 or -ENOMEM. */
int scrub_from_config(const struct config *c, struct scrub **ret);
/* Wipes the copies of the secrets and frees s (NULL is fine). */
void scrub_free(struct scrub *s);

/* Hides every configured secret in buf[0..len). Returns the new length (≤ len). s may be NULL
 * (nothing is configured: the text is unchanged). */
size_t scrub_secrets(const struct scrub *s, char *buf, size_t len);

/* Hides every configured secret and everything shaped like a credential in buf[0..len).
 * Returns the new length (≤ len). s may be NULL (shapes only). */
size_t scrub_text(const struct scrub *s, char *buf, size_t len);
