/* curlmem.c — libcurl's memory, wiped when libcurl lets go of it.
 *
 * Owns the five allocation functions given to curl_global_init_mem. They wrap malloc and free;
 * what they add is that no block goes back to the heap with its bytes in it: free wipes the
 * whole usable size, realloc always moves and wipes the old block (an in-place shrink would
 * leave the tail, a move the whole old block). The blocks are ordinary heap, so a core dump still
 * holds what libcurl has in use at that moment (a transfer under way); it no longer holds what
 * libcurl used and dropped. Receive buffers are the exception (see curlmem.h): their usable
 * sizes are learnt once, from the allocator itself. Upload buffers are wiped, and kept to the
 * size of the request for that reason (curlmem_upload_buffer).
 */
#include <curl/curl.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include "keypool/curlmem.h"

/* curl 7.88's bounds of CURLOPT_UPLOAD_BUFFERSIZE (UPLOADBUFFER_MIN) and its default. */
#define UPLOAD_BUFFER_MIN       16384
#define UPLOAD_BUFFER_DEFAULT   65536
/* The request line and header lines that travel with a body: the key's and what is forwarded. */
#define UPLOAD_HEADROOM         4096

static size_t recv_usable[2];           /* usable sizes of the two receive buffers */

bool curlmem_unwiped_size(size_t n) {
        return n == recv_usable[0] || n == recv_usable[1];
}

long curlmem_upload_buffer(size_t body_len) {
        if (body_len >= UPLOAD_BUFFER_DEFAULT - UPLOAD_HEADROOM)
                return UPLOAD_BUFFER_DEFAULT;
        if (body_len + UPLOAD_HEADROOM <= UPLOAD_BUFFER_MIN)
                return UPLOAD_BUFFER_MIN;
        return (long) (body_len + UPLOAD_HEADROOM);
}

static void wiping_free(void *p) {
        size_t n;

        if (!p)
                return;
        n = malloc_usable_size(p);
        if (!curlmem_unwiped_size(n))
                explicit_bzero(p, n);
        free(p);
}

static size_t usable_size_of(size_t size) {
        void *p = malloc(size);
        size_t n = p ? malloc_usable_size(p) : 0;

        free(p);
        return n;
}

static void *wiping_realloc(void *p, size_t size) {
        size_t old;
        void *q;

        if (!p)
                return malloc(size);
        q = malloc(size ? size : 1);
        if (!q)
                return NULL;
        old = malloc_usable_size(p);
        memcpy(q, p, old < size ? old : size);
        wiping_free(p);
        return q;
}

static char *wiping_strdup(const char *s) {
        size_t n = strlen(s) + 1;
        char *p = malloc(n);

        if (p)
                memcpy(p, s, n);
        return p;
}

int curlmem_global_init(long flags) {
        recv_usable[0] = usable_size_of(CURLMEM_RECV_BUFFER + 1);
        recv_usable[1] = usable_size_of(CURLMEM_STREAM_RECV_BUFFER + 1);
        return (int) curl_global_init_mem(flags, malloc, wiping_free, wiping_realloc, wiping_strdup,
                                          calloc);
}
