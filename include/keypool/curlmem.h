/* curlmem.h — libcurl's memory, wiped when libcurl lets go of it.
 *
 * Owns the allocator a worker hands libcurl: the ordinary heap, except that every block libcurl
 * frees or moves (realloc) is wiped first. libcurl copies the header that carries a key into its
 * own buffers (the request it writes out) and frees them as they were; without this a worker's
 * heap, and so a core of it, keeps every key it has used.
 *
 * One kind of block is left as it is: curl's receive buffer, which 7.88 allocates (its
 * CURLOPT_BUFFERSIZE + 1 bytes) for every transfer and frees at the transfer's end. It holds the
 * answer's bytes, never a request's, and wiping its 16 KiB was the largest single cost of a
 * proxied request. It is told apart by its size: the sizes below are not powers of two, and the
 * buffers curl builds a request in (dynbufs) grow by doubling, so none of them can share its
 * usable size.
 *
 * Its upload buffer is wiped, and so is sized to the request: over TLS with HTTP/1.1, 7.88 copies
 * the request it writes out (the key's header line included) into a buffer of
 * CURLOPT_UPLOAD_BUFFERSIZE bytes that it allocates for every transfer and frees at the
 * transfer's end (OpenSSL must be handed the same address when a write is retried); over HTTP/2
 * it reads the body through one. At curl's default of 64 KiB, wiping it cost a request of a few
 * hundred bytes more than all the rest of curl's work together, and touched fresh heap pages
 * every time.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

/* CURLOPT_BUFFERSIZE for a transfer, and for one whose answer is a stream: a stream holds its
 * buffer for as long as it lasts (tens of thousands of open streams each hold one), and its
 * events are a few hundred bytes. 1200 is above curl's minimum (1024, which it would silently
 * round a smaller value up to) and holds a few events per read; its block (1208 usable bytes)
 * is no dynbuf's. */
#define CURLMEM_RECV_BUFFER             16000
#define CURLMEM_STREAM_RECV_BUFFER      1200
#define CURLMEM_CURL_MIN_BUFFER         1024    /* curl 7.88's READBUFFER_MIN */

/* CURLOPT_UPLOAD_BUFFERSIZE for a request whose body is body_len bytes: room for the body and its
 * header lines, within curl's minimum (16 KiB) and its default (64 KiB). A request that does not
 * fit is sent in pieces by curl, as one that the socket does not take at once. */
long curlmem_upload_buffer(size_t body_len);

/* curl_global_init(flags) with the wiping allocator; a CURLcode (0 on success). Once per process,
 * before any other libcurl call. */
int curlmem_global_init(long flags);

/* Would a block of usable size n be left unwiped (a receive buffer)? For tests. */
bool curlmem_unwiped_size(size_t n);
