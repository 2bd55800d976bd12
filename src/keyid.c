/* keyid.c — stable, secret-free names for API keys.
 *
 * Owns the only two ways a key is ever named outside the process-private config: its id (a
 * truncated SHA-256 fingerprint) and its masked form. Everything that logs, stores or shows a key
 * goes through here, so this is the one place that decides how much of a secret may be seen.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>

#include <openssl/evp.h>

#include "keypool/keyid.h"

#define KEYID_HEX_DIGITS 10
#define KEYID_MASK_HEAD  15
#define KEYID_MASK_TAIL  3
#define KEYID_MASK_LONG  24     /* from this length on the head is shown too */

/* Below this length even the last three characters are too large a share of the secret to show:
 * a 5-character test key masked as "...bcd" would give most of it away. */
#define KEYID_MASK_SHORT 8

static EVP_MD *sha256_fetched;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

static void sha256_fetch(void) {
        sha256_fetched = EVP_MD_fetch(NULL, "SHA256", NULL);
}

/* EVP_sha256() makes every EVP_Digest look the algorithm up in the provider store again (a
 * lock, a name lookup, a reference count): a tenth of loading a configuration of 10,000 keys,
 * and a cost on every client-token check. Fetched once, the digest is kept for the life of the
 * process (and inherited by the workers); without a provider the implicit lookup still works. */
static const EVP_MD *sha256_md(void) {
        (void) pthread_once(&sha256_once, sha256_fetch);
        return sha256_fetched ? sha256_fetched : EVP_sha256();
}

int keyid_fingerprint(const char *secret, size_t len, char ret_id[KEYID_ID_LEN + 1]) {
        static const char hex[] = "0123456789abcdef";
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned md_len = 0;
        char id[KEYID_ID_LEN + 1];

        if (!secret && len > 0)
                return -EINVAL;
        if (!ret_id)
                return -EINVAL;

        /* EVP_Digest with an empty message still wants a valid pointer. */
        if (EVP_Digest(secret ? secret : "", len, md, &md_len, sha256_md(), NULL) != 1)
                return -EIO;
        if (md_len < KEYID_HEX_DIGITS / 2)
                return -EIO;

        memcpy(id, "kp-", 3);
        for (size_t i = 0; i < KEYID_HEX_DIGITS / 2; i++) {
                id[3 + 2 * i] = hex[md[i] >> 4];
                id[3 + 2 * i + 1] = hex[md[i] & 0xf];
        }
        id[KEYID_ID_LEN] = '\0';

        memcpy(ret_id, id, sizeof(id));
        return 0;
}

/* The masked form ends up in JSON, headers and the journal: anything but printable ASCII is
 * replaced so a stray byte can never make it invalid UTF-8 or a control sequence. */
static char mask_char(char c) {
        unsigned char u = (unsigned char) c;

        return u > 0x20 && u < 0x7f ? c : '?';
}

void keyid_mask(const char *secret, size_t len, char ret_masked[KEYID_MASK_MAX + 1]) {
        size_t o = 0;

        if (!ret_masked)
                return;
        if (!secret)
                len = 0;

        if (len >= KEYID_MASK_LONG)
                for (size_t i = 0; i < KEYID_MASK_HEAD; i++)
                        ret_masked[o++] = mask_char(secret[i]);

        memcpy(ret_masked + o, "...", 3);
        o += 3;

        if (len >= KEYID_MASK_SHORT)
                for (size_t i = len - KEYID_MASK_TAIL; i < len; i++)
                        ret_masked[o++] = mask_char(secret[i]);

        ret_masked[o] = '\0';
}

int keyid_sha256_hex(const char *data, size_t len, char ret_hex[65]) {
        static const char hex[] = "0123456789abcdef";
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned md_len = 0;

        if ((!data && len > 0) || !ret_hex)
                return -EINVAL;
        if (EVP_Digest(data ? data : "", len, md, &md_len, sha256_md(), NULL) != 1 || md_len != 32)
                return -EIO;
        for (unsigned i = 0; i < 32; i++) {
                ret_hex[2 * i] = hex[md[i] >> 4];
                ret_hex[2 * i + 1] = hex[md[i] & 0xf];
        }
        ret_hex[64] = '\0';
        return 0;
}
