/* keyid.c — stable, secret-free names for API keys.
 *
 * Owns the only two ways a key is ever named outside the process-private config: its id (a
 * truncated SHA-256 fingerprint) and its masked form. Everything that logs, stores or shows a key
 * goes through here, so this is the one place that decides how much of a secret may be seen.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include <openssl/evp.h>

#include "keypool/keyid.h"

#define KEYID_HEX_DIGITS 10

/* The masked form shows at most this many characters of what follows the prefix, never more
 * than a quarter of it, and always hides at least KEYID_MASK_HIDDEN of it: with fewer hidden
 * characters, the id (40 bits of the secret's hash) is enough to find the rest offline. */
#define KEYID_MASK_SHOWN  4
#define KEYID_MASK_HIDDEN 24

/* Below these a key can be guessed from its id (see keyid_weak). */
#define KEYID_WEAK_LENGTH   20
#define KEYID_WEAK_DISTINCT 8
#define KEYID_WEAK_BITS     96

/* The prefixes providers put before the random part of a key: they say which provider a key is
 * for and nothing about the key, so they may be shown. Longest first where one starts another. */
static const char *const provider_prefixes[] = {
        "sk-ant-api03-", "sk-ant-", "sk-or-v1-", "sk-proj-", "sk-svcacct-", "sk-", "AIza", "gsk_",
        "xai-", "pplx-", "nvapi-", "hf_", "r8_",
};

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

size_t keyid_prefix_len(const char *secret, size_t len) {
        if (!secret)
                return 0;
        for (size_t i = 0; i < sizeof provider_prefixes / sizeof provider_prefixes[0]; i++) {
                size_t n = strlen(provider_prefixes[i]);

                if (len >= n && memcmp(secret, provider_prefixes[i], n) == 0)
                        return n;
        }
        return 0;
}

/* The masked form ends up in JSON, headers and the journal: anything but printable ASCII is
 * replaced so a stray byte can never make it invalid UTF-8 or a control sequence. */
static char mask_char(char c) {
        unsigned char u = (unsigned char) c;

        return u > 0x20 && u < 0x7f ? c : '?';
}

void keyid_mask(const char *secret, size_t len, char ret_masked[KEYID_MASK_MAX + 1]) {
        size_t prefix, rest, shown, o = 0;

        if (!ret_masked)
                return;
        if (!secret)
                len = 0;
        prefix = keyid_prefix_len(secret, len);
        rest = len - prefix;
        shown = rest / 4 < KEYID_MASK_SHOWN ? rest / 4 : KEYID_MASK_SHOWN;
        if (rest < KEYID_MASK_HIDDEN + shown)
                shown = rest > KEYID_MASK_HIDDEN ? rest - KEYID_MASK_HIDDEN : 0;
        if (shown == 0) {
                /* Too short to show anything of: the id is all a person gets. */
                if (keyid_fingerprint(secret, len, ret_masked) < 0)
                        memcpy(ret_masked, "...", 4);
                return;
        }
        for (size_t i = 0; i < prefix; i++)
                ret_masked[o++] = mask_char(secret[i]);
        memcpy(ret_masked + o, "...", 3);
        o += 3;
        for (size_t i = len - shown; i < len; i++)
                ret_masked[o++] = mask_char(secret[i]);
        ret_masked[o] = '\0';
}

const char *keyid_weak(const char *secret, size_t len) {
        bool seen[256] = { false };
        bool lower = false, upper = false, digit = false, other = false;
        size_t prefix, rest, distinct = 0;
        double space = 1, bound = 1;
        unsigned alphabet;

        if (!secret)
                len = 0;
        prefix = keyid_prefix_len(secret, len);
        rest = len - prefix;
        if (rest < KEYID_WEAK_LENGTH)
                return "fewer than 20 characters after its provider prefix: guessable from its id";
        for (size_t i = prefix; i < len; i++) {
                unsigned char c = (unsigned char) secret[i];

                if (!seen[c])
                        distinct++;
                seen[c] = true;
                lower |= c >= 'a' && c <= 'z';
                upper |= c >= 'A' && c <= 'Z';
                digit |= c >= '0' && c <= '9';
                other |= !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'));
        }
        if (distinct < KEYID_WEAK_DISTINCT)
                return "fewer than 8 different characters after its provider prefix: guessable from its id";
        /* The number of keys of this length and alphabet, against 2^KEYID_WEAK_BITS. */
        alphabet = (lower ? 26 : 0) + (upper ? 26 : 0) + (digit ? 10 : 0) + (other ? 4 : 0);
        for (unsigned i = 0; i < KEYID_WEAK_BITS; i++)
                bound *= 2;
        for (size_t i = 0; i < rest && space < bound; i++)
                space *= alphabet;
        if (space < bound)
                return "too few possible keys of its length and alphabet: guessable from its id";
        return NULL;
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
