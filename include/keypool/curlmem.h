/* curlmem.h — libcurl's memory, wiped when libcurl lets go of it.
 *
 * Owns the allocator a worker hands libcurl: the ordinary heap, except that every block libcurl
 * frees or moves (realloc) is wiped first. libcurl copies the header that carries a key into its
 * own buffers (the header list, the request it writes out) and frees them as they were; without
 * this a worker's heap, and so a core of it, keeps every key it has used.
 */
#pragma once

/* curl_global_init(flags) with the wiping allocator; a CURLcode (0 on success). Once per process,
 * before any other libcurl call. */
int curlmem_global_init(long flags);
