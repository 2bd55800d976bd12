/* ctl.h — keypoolctl's presentation: the daemon's JSON documents as text for people.
 *
 * Pure formatting, no sockets and no HTTP: every function reads a parsed document (jansson) and
 * writes to a stream the caller owns, so the unit tests drive it with open_memstream(). Tables
 * are aligned by display width (UTF-8 aware), numbers right-aligned, absent values shown as "-",
 * and the state column coloured (green ready, yellow cooling, red disabled) only when asked.
 * Nothing here ever sees a secret: the daemon's documents carry key ids and masked forms only.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

/* --- tables ------------------------------------------------------------------------------- */

struct ctl_table;

/* A table with n_columns columns and these headers (copied). 0 or -ENOMEM. */
int ctl_table_new(unsigned n_columns, const char *const *headers, struct ctl_table **ret);
void ctl_table_free(struct ctl_table *t);

/* Right-aligns a column (numbers). */
void ctl_table_align_right(struct ctl_table *t, unsigned column);

/* Marks the column whose cells are key states, coloured when the table is written with colour. */
void ctl_table_colour_states(struct ctl_table *t, unsigned column);

/* Appends a row of n_columns cells (copied; NULL shows as "-"). 0 or -ENOMEM. */
int ctl_table_add(struct ctl_table *t, const char *const *cells);

unsigned ctl_table_rows(const struct ctl_table *t);

/* Writes the header line and every row, columns two spaces apart, no trailing blanks. */
int ctl_table_write(const struct ctl_table *t, FILE *out, bool colour);

/* --- small pieces ------------------------------------------------------------------------- */

/* The ANSI colour sequence for a key state ("ready", "cooling", "disabled"), NULL for others. */
const char *ctl_state_colour(const char *state);

/* Whether to colour: only on a terminal, and never when NO_COLOR is set to anything non-empty
 * (no-color.org) or TERM is "dumb". */
bool ctl_want_colour(bool is_terminal, const char *no_color, const char *term);

/* A duration for people: "45s", "4m10s", "2h05m", "3d04h"; "0s" for zero or less. */
void ctl_format_duration(int64_t seconds, char *buf, size_t size);

/* Percent-encodes s for a URL path segment or query value (RFC 3986 unreserved kept).
 * A malloc'ed string, or NULL when out of memory. */
char *ctl_url_escape(const char *s);

/* The request path of GET /api/history for these filters (limit 0 = the daemon's default; pool
 * and key may be NULL). A malloc'ed string, or NULL when out of memory. */
char *ctl_history_path(unsigned limit, const char *pool, const char *key);

/* What went wrong, for a refused request: the daemon's error message and code from an OpenAI
 * shaped body ({"error":{"message","code"}}), else the body's first line, followed by the HTTP
 * status: "unknown key kp-0123456789 (not_found, HTTP 404)". A malloc'ed string, or NULL when
 * out of memory. */
char *ctl_error_text(long http_status, const char *body, size_t size);

/* --- the daemon's documents --------------------------------------------------------------- */

/* Every writer below has this shape, so the client can pick one per command; colour is ignored
 * where nothing is coloured. 0, -EINVAL when the document does not have the expected shape, or
 * -EIO when the stream failed. */
typedef int (*ctl_writer)(FILE *out, const json_t *doc, bool colour);

/* GET /api/key-status: one row per key (pool, key id, masked, state, reason, cooldown left,
 * requests, successes, rate limited, failures, in flight, last status), then a note for each
 * pool whose account limit is suspected. -EINVAL when doc is not such a document. */
int ctl_write_keys(FILE *out, const json_t *doc, bool colour);

/* GET /status: the daemon line, the totals, the workers table and the pools table. */
int ctl_write_status(FILE *out, const json_t *doc, bool colour);

/* GET /health: "ok" or "degraded", then ready/total keys per pool. */
int ctl_write_health(FILE *out, const json_t *doc, bool colour);

/* GET /api/check: "ok" and what was checked, or one line per problem found. */
int ctl_write_check(FILE *out, const json_t *doc, bool colour);

/* GET /api/history: one row per event, oldest first; "no events" when there are none. */
int ctl_write_history(FILE *out, const json_t *doc, bool colour);

/* The answer to POST /api/keys/{id}/disable|enable ({"key":KEY}): one line saying what the
 * key is now. */
int ctl_write_key_action(FILE *out, const json_t *doc, bool colour);

/* The answer to POST /api/state/import ({"imported":n,"ignored":m}). */
int ctl_write_import(FILE *out, const json_t *doc, bool colour);

/* Checks that doc is a keypool state document ({"format":"keypool-state","version":1,...}) and
 * counts its keys and events. -EINVAL when it is not one. */
int ctl_state_summary(const json_t *doc, size_t *ret_keys, size_t *ret_events);
