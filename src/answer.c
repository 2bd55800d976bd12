/* answer.c — one upstream attempt's answer, as it arrives.
 *
 * Owns the answer's status, header lines, body and SSE scanning state (struct answer); see
 * answer.h. No I/O, no clock of its own, no curl: the proxy feeds it bytes and reads facts.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "keypool/answer.h"

#define SPARE_BUFFER_MAX        (64 * 1024)     /* buffers kept across attempts up to this size */
/* A buffer's first size. Each open stream holds three (header lines, the held first event, the
 * event being scanned) that need a few hundred bytes each: 4 KiB apiece was a third of a
 * stream's memory. Larger answers double their way up once; a recycled record keeps its size. */
#define ANSWER_BUFFER_FIRST     512

static int buf_add(char **buf, size_t *len, size_t *cap, const void *data, size_t n) {
        if (*len + n + 1 > *cap) {
                size_t c = *cap ? *cap : ANSWER_BUFFER_FIRST;
                char *p;

                while (c < *len + n + 1)
                        c *= 2;
                p = realloc(*buf, c);
                if (!p)
                        return -ENOMEM;
                *buf = p;
                *cap = c;
        }
        memcpy(*buf + *len, data, n);
        *len += n;
        (*buf)[*len] = 0;
        return 0;
}

/* Empties a buffer, keeping its memory unless it grew large. */
static void buffer_clear(char **buf, size_t *len, size_t *cap) {
        if (*cap > SPARE_BUFFER_MAX) {
                free(*buf);
                *buf = NULL;
                *cap = 0;
        }
        *len = 0;
}

bool answer_header_is(const char *line, const char *name) {
        size_t n;

        /* Equal names have equal first bytes once ASCII case is folded (|0x20 folds more, which
         * only leaves strncasecmp to decide): most lines are passed over at once. */
        if (name[0] && ((unsigned char) line[0] | 0x20) != ((unsigned char) name[0] | 0x20))
                return false;
        n = strlen(name);
        return strncasecmp(line, name, n) == 0 && line[n] == ':';
}

static bool is_dropped_answer_header(const char *name, size_t len) {
#define IS(s) (strncasecmp(name, s, len) == 0)
        if (len >= 10 && (name[0] | 0x20) == 'x' && strncasecmp(name, "X-Keypool-", 10) == 0)
                return true;
        /* Its length picks the few names it could be. */
        switch (len) {
        case 2:
                return IS("TE");
        case 7:
                return IS("Upgrade") || IS("Trailer");
        case 10:
                return IS("Connection") || IS("Keep-Alive");
        case 14:
                return IS("Content-Length");
        case 16:
                return IS("Proxy-Connection");
        case 17:
                return IS("Transfer-Encoding");
        default:
                return false;
        }
#undef IS
}

/* Does the NUL-terminated s hold needle[0..n) (lower case, no NUL), ASCII case folded? What
 * strcasestr answers in the C locale, with a look at only the bytes that can begin a match, and
 * none at all in a text shorter than the needle ("application/json" is). */
static bool contains_ci(const char *s, const char *needle, size_t n) {
        size_t len = strlen(s);

        for (size_t i = 0; i + n <= len; i++)
                if (((unsigned char) s[i] | 0x20) == (unsigned char) needle[0] && strncasecmp(s + i, needle, n) == 0)
                        return true;
        return false;
}

/* The value of a header line after its colon, without the blanks before it. */
static const char *value_after(const char *colon) {
        const char *v = colon + 1;

        while (*v == ' ' || *v == '\t')
                v++;
        return v;
}

void answer_reset(struct answer *a) {
        a->n_headers = 0;
        a->figure_names = false;
        buffer_clear(&a->text, &a->text_len, &a->text_cap);
        buffer_clear(&a->body, &a->body_len, &a->body_cap);
        free(a->event);
        a->event = NULL;
        a->event_len = a->event_cap = 0;
        a->event_overflow = false;
        a->event_tail[0] = a->event_tail[1] = 0;
        free(a->stream_error);
        a->stream_error = NULL;
        a->stream_error_status = 0;
        a->status = 0;
        a->mode = ANSWER_HEADERS;
        a->sse = a->holding = false;
        a->held = 0;
        a->tokens_in = a->tokens_out = 0;
}

void answer_free(struct answer *a) {
        free(a->text);
        free(a->body);
        free(a->event);
        free(a->stream_error);
        *a = (struct answer) {};
}

const char *answer_line(const struct answer *a, size_t i) {
        return a->text + a->header_off[i];
}

/* The status code of a status line ("HTTP/1.1 429 Too Many Requests"), 0 when it has none.
 * Read within len: curl's line is not NUL-terminated, and atoi would skip a line end as white
 * space and read on past it. */
static int status_of(const char *line, size_t len) {
        const char *p = memchr(line, ' ', len), *end = line + len;
        int status = 0;

        if (!p)
                return 0;
        while (p < end && *p == ' ')
                p++;
        for (; p < end && *p >= '0' && *p <= '9'; p++) {
                if (status > 99)
                        return 0;       /* a status has three digits */
                status = status * 10 + (*p - '0');
        }
        return status;
}

int answer_add_header_line(struct answer *a, const char *data, size_t len) {
        size_t trimmed = len, off;

        /* Nearly every line ends in CRLF: that pair goes at once, whatever else is left. */
        if (trimmed >= 2 && data[trimmed - 1] == '\n' && data[trimmed - 2] == '\r')
                trimmed -= 2;
        while (trimmed > 0 && (data[trimmed - 1] == '\n' || data[trimmed - 1] == '\r'))
                trimmed--;

        if (trimmed >= 5 && memcmp(data, "HTTP/", 5) == 0) {
                /* A status line starts a new answer (after 100 Continue, say). */
                answer_reset(a);
                a->status = status_of(data, trimmed);
                return 0;
        }
        if (trimmed == 0) {
                /* End of headers: decide how the body is handled. Informational answers are
                 * followed by the real one. */
                if (a->status >= 100 && a->status < 200)
                        return 0;
                /* No such status exists: whatever follows cannot be judged or relayed. */
                if (a->status < 100 || a->status > 599)
                        return -EPROTO;
                a->mode = a->status >= 200 && a->status < 300 ? ANSWER_STREAM : ANSWER_BUFFER;
                for (size_t i = 0; i < a->n_headers; i++)
                        if (answer_header_is(answer_line(a, i), "Content-Type") &&
                            contains_ci(answer_line(a, i) + strlen("Content-Type:"), "text/event-stream",
                                        strlen("text/event-stream")))
                                a->sse = true;
                a->holding = a->mode == ANSWER_STREAM && a->sse;
                return 0;
        }
        /* Dropping the rest would relay (and judge) an answer without the headers that may
         * matter most, a Retry-After among them: the answer is refused instead. */
        if (a->n_headers >= ANSWER_MAX_HEADERS || a->text_len + trimmed + 1 > ANSWER_MAX_HEADER_BYTES)
                return -E2BIG;
        off = a->text_len;
        /* buf_add ends the text with a NUL, kept as the line's end. */
        if (buf_add(&a->text, &a->text_len, &a->text_cap, data, trimmed) < 0)
                return -ENOMEM;
        a->text_len++;
        a->header_off[a->n_headers++] = (uint32_t) off;
        /* Looked at once here, not at every judgement: the name as answer_view reads it. */
        if (!a->figure_names) {
                const char *line = a->text + off, *colon = strchr(line, ':');

                a->figure_names = colon && policy_names_rate_figure(line, (size_t) (colon - line));
        }
        return 0;
}

int answer_append(struct answer *a, const void *data, size_t len) {
        return buf_add(&a->body, &a->body_len, &a->body_cap, data, len);
}

/* One complete SSE event of a relayed stream: count its usage, note an error in it. */
static void inspect_event(struct answer *a, const char *ev, size_t len) {
        const char *data;
        size_t data_len;
        uint64_t in, out;
        int status;

        if (policy_sse_error(ev, len, &status, &data, &data_len) == 1) {
                if (!a->stream_error_status) {
                        a->stream_error_status = status;
                        a->stream_error = strndup(data, data_len);
                }
                return;
        }
        if (memmem(ev, len, "sage", 4)) {
                const char *d = memmem(ev, len, "data:", 5);

                if (d && policy_usage(d + 5, len - (size_t) (d + 5 - ev), &in, &out) == 0) {
                        /* Providers repeat running totals; the last figures are the request's. */
                        a->tokens_in = in > a->tokens_in ? in : a->tokens_in;
                        a->tokens_out = out > a->tokens_out ? out : a->tokens_out;
                }
        }
}

size_t answer_scan_events(struct answer *a, const char *data, size_t len) {
        size_t first_end = 0;

        for (size_t i = 0; i < len; i++) {
                char ch = data[i];

                bool ends;

                if (!a->event_overflow) {
                        if (a->event_len + 1 >= ANSWER_MAX_SSE_EVENT)
                                a->event_overflow = true;
                        else if (buf_add(&a->event, &a->event_len, &a->event_cap, &ch, 1) < 0)
                                a->event_overflow = true;
                }
                /* A blank line ends the event: "\n\n" or "\n\r\n". The tail is kept apart from
                 * the buffer so that the end of an event too long to keep is still seen, and the
                 * events after it are inspected again. */
                ends = ch == '\n' && (a->event_tail[1] == '\n' ||
                                      (a->event_tail[1] == '\r' && a->event_tail[0] == '\n'));
                a->event_tail[0] = a->event_tail[1];
                a->event_tail[1] = ch;
                if (!ends)
                        continue;
                if (!a->event_overflow)
                        inspect_event(a, a->event, a->event_len);
                a->event_len = 0;
                a->event_overflow = false;
                a->event_tail[0] = a->event_tail[1] = 0;
                if (!first_end)
                        first_end = i + 1;
        }
        /* Between events the buffer goes: an open stream spends most of its life there, and
         * providers send whole events, so most reads end on an event's end. */
        if (a->event_len == 0 && !a->event_overflow) {
                free(a->event);
                a->event = NULL;
                a->event_cap = 0;
        }
        return first_end;
}

void answer_release_relayed(struct answer *a) {
        if (a->mode != ANSWER_STREAM || !a->sse || a->holding || a->held > 0)
                return;
        free(a->body);
        a->body = NULL;
        a->body_len = a->body_cap = 0;
}

void answer_view(const struct answer *a, struct answer_header *ah, struct upstream_answer *ret) {
        *ret = (struct upstream_answer) {
                .status = a->status,
                .headers = ah,
                .figure_names = a->figure_names ? POLICY_FIGURE_NAMES_SOME : POLICY_FIGURE_NAMES_NONE,
        };
        for (size_t i = 0; i < a->n_headers; i++) {
                const char *line = answer_line(a, i), *colon = strchr(line, ':');
                const char *value;

                if (!colon)
                        continue;
                value = value_after(colon);
                ah[ret->n_headers++] = (struct answer_header) {
                        .name = line, .name_len = (size_t) (colon - line),
                        .value = value, .value_len = strlen(value),
                };
        }
}

void answer_classify(const struct answer *a, const struct policy_config *pc, int64_t now_ms,
                     struct verdict *ret) {
        struct answer_header ah[ANSWER_MAX_HEADERS];
        struct upstream_answer u;

        answer_view(a, ah, &u);
        if (a->stream_error_status) {
                u.status = a->stream_error_status;
                u.body = a->stream_error;
                u.body_len = a->stream_error ? strlen(a->stream_error) : 0;
        } else {
                u.body = a->body;
                u.body_len = a->body_len;
        }
        policy_classify(&u, pc, now_ms, ret);
}

void answer_count_usage(struct answer *a) {
        uint64_t in, out;

        if (!a->sse && a->body_len > 0 && policy_usage(a->body, a->body_len, &in, &out) == 0) {
                a->tokens_in = in;
                a->tokens_out = out;
        }
}

void answer_error_summary(const struct answer *a, const struct scrub *scrub, char *ret, size_t size) {
        if (a->stream_error)
                policy_error_summary(a->stream_error, strlen(a->stream_error), scrub, ret, size);
        else
                policy_error_summary(a->body, a->body_len, scrub, ret, size);
}

void answer_scrub_unsent(struct answer *a, const struct scrub *scrub) {
        size_t unsent = a->mode == ANSWER_BUFFER ? a->body_len : a->held, n;

        if (unsent == 0)
                return;
        /* The unsent bytes are the body's last: hiding a secret never grows the text, so what
         * follows them is only the terminating NUL. */
        n = scrub_secrets(scrub, a->body + a->body_len - unsent, unsent);
        a->body_len -= unsent - n;
        a->body[a->body_len] = 0;
        if (a->mode != ANSWER_BUFFER)
                a->held = n;
}

size_t answer_client_headers(const struct answer *a, struct http_header *h, size_t max, char *names,
                             size_t names_size) {
        size_t n = 0, used = 0;

        for (size_t i = 0; i < a->n_headers && n < max; i++) {
                const char *line = answer_line(a, i);
                const char *colon = strchr(line, ':');
                size_t len;

                if (!colon || colon == line)
                        continue;
                len = (size_t) (colon - line);
                if (is_dropped_answer_header(line, len) || used + len + 1 > names_size)
                        continue;
                memcpy(names + used, line, len);
                names[used + len] = 0;
                h[n].name = names + used;
                used += len + 1;
                h[n].value = value_after(colon);
                n++;
        }
        return n;
}
