/* secmem.h — memory for secrets, left out of core dumps.
 *
 * Owns the process's secret memory: anonymous private mappings marked MADV_DONTDUMP, so a core
 * dump (a crash, gcore) of the coordinator or a worker holds no key that lives here. Small
 * blocks (a key) come from shared chunks by size class, larger ones (a request's header block)
 * from mappings of their own. Freeing wipes. Mappings and their marks are inherited by fork, so
 * a worker's copies are covered too. Not thread-safe: keypool's processes are single-threaded.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

/* size bytes of zeroed secret memory, or NULL (errno ENOMEM). */
void *secmem_alloc(size_t size);
/* A copy of the first n bytes of s (cut at a NUL), NUL-terminated, in secret memory; or NULL. */
char *secmem_strndup(const char *s, size_t n);
/* Wipes and frees p if it is secret memory and returns true; false (nothing done) for any other
 * pointer, NULL included, so callers holding either kind can try this first. */
bool secmem_free(void *p);

/* Marks the whole of the process's heap as it is now MADV_DONTDUMP. Loading keypool.conf leaves
 * copies of keys in freed heap that keypool cannot wipe (libconfig's scanner copies the text and
 * frees it unwiped): the coordinator calls this after every load, before it forks, so neither
 * its core nor a worker's holds them. Heap grown later stays dumpable. 0, or -errno (-ENOENT:
 * no heap mapping yet). */
int secmem_exclude_heap(void);
