/* secmem.c — memory for secrets, left out of core dumps.
 *
 * Owns a small allocator over anonymous mappings marked MADV_DONTDUMP. Blocks of up to
 * SECMEM_SMALL_MAX bytes are slots of 64 KiB chunks, one size class per chunk, with a free list
 * per class threaded through wiped slots; larger blocks get a mapping of their own. Every mapping
 * is described in a list (ordinary heap, holding no secret), so secmem_free can tell its own
 * blocks from anything else. Chunks are never returned: they are bounded by the most secrets the
 * process held at once.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "keypool/secmem.h"

#define SECMEM_CHUNK     (64u * 1024)
#define SECMEM_N_CLASSES 8
#define SECMEM_SMALL_MAX 8192u

/* Up to 8 KiB: a proxied request's header block (its auth line alone may take 4 KiB) is one of
 * these, and a mapping of its own per request cost three system calls. */
static const size_t class_size[SECMEM_N_CLASSES] = { 64, 128, 256, 512, 1024, 2048, 4096, 8192 };

struct mapping {
        struct mapping *next;
        unsigned char *base;
        size_t len;
        int cls;                        /* a size class, or -1: one block of its own */
        size_t used;                    /* chunks: bytes handed out from the start so far */
};

static struct mapping *mappings;
static void *free_list[SECMEM_N_CLASSES];

static struct mapping *map_new(size_t len, int cls) {
        struct mapping *m = calloc(1, sizeof *m);
        void *base;

        if (!m)
                return NULL;
        base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) {
                free(m);
                return NULL;
        }
        /* Best effort on kernels without it (before 3.4): the memory is still wiped on free. */
        (void) madvise(base, len, MADV_DONTDUMP);
        *m = (struct mapping) { .next = mappings, .base = base, .len = len, .cls = cls };
        mappings = m;
        return m;
}

static struct mapping *map_of(const void *p, struct mapping **ret_prev) {
        struct mapping *prev = NULL;

        for (struct mapping *m = mappings; m; prev = m, m = m->next)
                if ((const unsigned char *) p >= m->base && (const unsigned char *) p < m->base + m->len) {
                        if (ret_prev)
                                *ret_prev = prev;
                        return m;
                }
        return NULL;
}

void *secmem_alloc(size_t size) {
        struct mapping *m;
        int cls = -1;

        for (int c = 0; c < SECMEM_N_CLASSES; c++)
                if (size <= class_size[c]) {
                        cls = c;
                        break;
                }
        if (cls < 0) {
                size_t page = 4096, len;

                if (size > SIZE_MAX - page) {
                        errno = ENOMEM;
                        return NULL;
                }
                len = (size + page - 1) & ~(page - 1);
                m = map_new(len, -1);
                if (!m) {
                        errno = ENOMEM;
                        return NULL;
                }
                return m->base;
        }
        if (free_list[cls]) {
                void *p = free_list[cls];

                memcpy(&free_list[cls], p, sizeof(void *));
                memset(p, 0, class_size[cls]);
                return p;
        }
        for (m = mappings; m; m = m->next)
                if (m->cls == cls && m->used + class_size[cls] <= m->len)
                        break;
        if (!m)
                m = map_new(SECMEM_CHUNK, cls);
        if (!m) {
                errno = ENOMEM;
                return NULL;
        }
        m->used += class_size[cls];
        return m->base + m->used - class_size[cls];
}

char *secmem_strndup(const char *s, size_t n) {
        size_t len = strnlen(s, n);
        char *p = secmem_alloc(len + 1);

        if (p)
                memcpy(p, s, len);
        return p;
}

bool secmem_free(void *p) {
        struct mapping *prev = NULL, *m = p ? map_of(p, &prev) : NULL;

        if (!m)
                return false;
        if (m->cls < 0) {
                explicit_bzero(m->base, m->len);
                (void) munmap(m->base, m->len);
                if (prev)
                        prev->next = m->next;
                else
                        mappings = m->next;
                free(m);
                return true;
        }
        explicit_bzero(p, class_size[m->cls]);
        memcpy(p, &free_list[m->cls], sizeof(void *));
        free_list[m->cls] = p;
        return true;
}

int secmem_exclude_heap(void) {
        char line[512];
        FILE *f = fopen("/proc/self/maps", "re");
        int r = -ENOENT;

        if (!f)
                return -errno;
        while (fgets(line, sizeof line, f)) {
                unsigned long start, end;

                if (!strstr(line, "[heap]") || sscanf(line, "%lx-%lx", &start, &end) != 2)
                        continue;
                r = madvise((void *) start, end - start, MADV_DONTDUMP) < 0 ? -errno : 0;
                break;
        }
        fclose(f);
        return r;
}
