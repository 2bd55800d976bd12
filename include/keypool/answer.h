/* answer.h — one upstream attempt's answer, as it arrives.
 *
 * Owns what an attempt received: the status, the header lines, the body (kept whole when it is
 * an error to judge, or a bounded copy of a relayed success to count its tokens), the first SSE
 * event held back until it is complete, and what the SSE event scanner found (an error event,
 * token usage). Knows nothing of curl, keys, clients or the event loop: bytes in, facts out.
 * Invariants: header lines and the body are NUL-terminated; `held` bytes at the end of the body
 * are the ones not yet sent to the client; a reset keeps small buffers for the next attempt. An
 * open stream holds as little as it can: no body once its first event is relayed, no event
 * buffer between events.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keypool/http.h"
#include "keypool/policy.h"
#include "keypool/scrub.h"

#define ANSWER_MAX_HEADERS      128
#define ANSWER_MAX_HEADER_BYTES (64 * 1024)     /* the header lines' text, all together */
#define ANSWER_MAX_BUFFERED     (1024 * 1024)   /* larger error bodies are relayed unjudged */
#define ANSWER_MAX_USAGE_COPY   (1024 * 1024)   /* success bodies kept this far to count tokens */
#define ANSWER_MAX_SSE_EVENT    (64 * 1024)     /* an SSE event longer than this is not inspected */

enum answer_mode {
        ANSWER_HEADERS = 1,     /* status and headers still arriving */
        ANSWER_STREAM,          /* a success: relay as it comes */
        ANSWER_BUFFER,          /* an error: keep it to judge it */
        _ANSWER_MODE_MAX,
};

struct answer {
        enum answer_mode mode;
        int status;
        uint32_t header_off[ANSWER_MAX_HEADERS]; /* each line's start in text (< 64 KiB) */
        size_t n_headers;
        char *text;                     /* the header lines, each NUL-terminated, one buffer */
        size_t text_len, text_cap;
        bool figure_names;              /* a line's name says it carries a rate-limit figure */
        char *body;                     /* ANSWER_BUFFER: the body; ANSWER_STREAM: a copy for usage */
        size_t body_len, body_cap;
        bool sse;                       /* text/event-stream */
        bool holding;                   /* the first SSE event is not yet complete */
        size_t held;                    /* bytes at the end of body not yet sent to the client */
        char *event;                    /* the SSE event being received */
        size_t event_len, event_cap;
        bool event_overflow;            /* the event outgrew the buffer: skipped, not inspected */
        char event_tail[2];             /* the two bytes before the current one, overflow or not */
        int stream_error_status;        /* an SSE error event seen inside the stream */
        char *stream_error;             /* … its payload */
        uint64_t tokens_in, tokens_out;
};

/* Empties a for the next attempt (mode ANSWER_HEADERS), keeping buffers that stayed small. */
void answer_reset(struct answer *a);
/* Frees every buffer; a is empty and zeroed afterwards. */
void answer_free(struct answer *a);

/* One header line as curl delivers it (status line, field, or the blank line that ends them),
 * line end included. The blank line after a final status sets the mode (2xx streams, anything
 * else is buffered) and whether an SSE stream's first event is held. 0; -EPROTO for a final
 * status outside 100..599; -E2BIG past ANSWER_MAX_HEADERS lines or ANSWER_MAX_HEADER_BYTES;
 * -ENOMEM. */
int answer_add_header_line(struct answer *a, const char *data, size_t len);

/* Header line i, "Name: value". */
const char *answer_line(const struct answer *a, size_t i);

/* Appends body bytes. 0, or -ENOMEM. */
int answer_append(struct answer *a, const void *data, size_t len);

/* A relayed SSE stream whose held first event has gone out: frees its body, which nothing reads
 * again (its usage and errors are read event by event). Anything else is left as it is. */
void answer_release_relayed(struct answer *a);

/* Splits streamed bytes into SSE events, inspecting each complete one for an error or usage.
 * Returns the number of bytes of data that end the first event completed here (0: none). */
size_t answer_scan_events(struct answer *a, const char *data, size_t len);

/* The status and headers as policy reads them, pointing into a; ah holds ANSWER_MAX_HEADERS. */
void answer_view(const struct answer *a, struct answer_header *ah, struct upstream_answer *ret);

/* Judges the answer (an error event inside a stream wins over the status) at wall time now_ms. */
void answer_classify(const struct answer *a, const struct policy_config *pc, int64_t now_ms,
                     struct verdict *ret);

/* A relayed non-SSE success: reads the token usage from the copy kept of its body. */
void answer_count_usage(struct answer *a);

/* A few words on what went wrong, without credentials: scrub's secrets (scrub may be NULL) and
 * anything shaped like one hidden ("" when nothing can be said). */
void answer_error_summary(const struct answer *a, const struct scrub *scrub, char *ret, size_t size);

/* Hides scrub's secrets in what of the body the client has not been sent (all of a buffered
 * answer, the held bytes of a stream): providers echo what they were sent, the key included.
 * The body shrinks or stays as it is; held follows. */
void answer_scrub_unsent(struct answer *a, const struct scrub *scrub);

/* The end-to-end headers for the client (hop-by-hop and X-Keypool-* dropped), at most max; the
 * names are copied NUL-terminated into names, the values point into a. Returns the count. */
size_t answer_client_headers(const struct answer *a, struct http_header *h, size_t max, char *names,
                             size_t names_size);

/* Is line the header field name ("Name: …", any case)? */
bool answer_header_is(const char *line, const char *name);
