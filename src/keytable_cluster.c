/* keytable_cluster.c — the key table's part in clustering.
 *
 * Owns what the cluster process (cluster.c) reads and writes in the shared segment: the cursor
 * over the history ring (which local events are out), the link state and the live nodes the
 * readers show, other nodes' key states applied to the rows, and the other nodes' counters per
 * row. Applying a state here writes no history: the caller adds the entry naming the node that
 * saw it, which is also what keeps the cluster process from publishing it back.
 */
#include <string.h>

#include "keytable_internal.h"

static void copy_name(char *dst, size_t size, const char *src) {
        size_t n = src ? strnlen(src, size - 1) : 0;

        memcpy(dst, src ? src : "", n);
        memset(dst + n, 0, size - n);
}

void keytable_cluster_init(struct keytable *t, const char *node) {
        if (!t)
                return;
        kt_header_lock(t);
        t->hdr->cluster.enabled = 1;
        /* What is in the ring now (restored from a state file) was published, or not, by the
         * process that saw it: only what happens from here on goes out. */
        t->hdr->cluster.published_seq = t->hdr->history_seq;
        copy_name(t->hdr->cluster.node, sizeof t->hdr->cluster.node, node);
        kt_header_unlock(t);
}

void keytable_cluster_set_link(struct keytable *t, bool connected, unsigned live_nodes, int64_t wall_ms) {
        struct kt_cluster *c;

        if (!t)
                return;
        c = &t->hdr->cluster;
        kt_header_lock(t);
        if (c->connected != (uint32_t) connected || c->since_wall_ms == 0)
                c->since_wall_ms = wall_ms;
        c->connected = connected;
        if (live_nodes > 0)
                c->live_nodes = live_nodes;
        kt_header_unlock(t);
}

void keytable_cluster_set_nodes(struct keytable *t, const struct keytable_node *nodes, unsigned n) {
        if (!t)
                return;
        if (n > KEYTABLE_NODES_MAX)
                n = KEYTABLE_NODES_MAX;
        kt_header_lock(t);
        memcpy(t->hdr->cluster.nodes, nodes, n * sizeof *nodes);
        t->hdr->cluster.n_nodes = n;
        kt_header_unlock(t);
}

void keytable_cluster_read(struct keytable *t, struct keytable_cluster_view *ret) {
        const struct kt_cluster *c;

        *ret = (struct keytable_cluster_view) { .live_nodes = 1 };
        if (!t)
                return;
        c = &t->hdr->cluster;
        kt_header_lock(t);
        ret->enabled = c->enabled != 0;
        ret->connected = c->connected != 0;
        ret->live_nodes = c->live_nodes ? c->live_nodes : 1;
        ret->since_wall_ms = c->since_wall_ms;
        memcpy(ret->node, c->node, sizeof ret->node - 1);
        ret->n_nodes = c->n_nodes < KEYTABLE_NODES_MAX ? c->n_nodes : KEYTABLE_NODES_MAX;
        memcpy(ret->nodes, c->nodes, ret->n_nodes * sizeof *ret->nodes);
        kt_header_unlock(t);
        for (unsigned i = 0; i < ret->n_nodes; i++)
                ret->nodes[i].name[KEYTABLE_NAME_MAX] = '\0';
}

uint64_t keytable_cluster_cursor(struct keytable *t) {
        return t ? KT_LOAD(&t->hdr->cluster.published_seq) : 0;
}

void keytable_cluster_set_cursor(struct keytable *t, uint64_t seq) {
        if (t)
                KT_STORE(&t->hdr->cluster.published_seq, seq);
}

uint64_t keytable_history_seq(const struct keytable *t) {
        return t ? KT_LOAD(&t->hdr->history_seq) : 0;
}

unsigned keytable_history_since(struct keytable *t, uint64_t after, struct keytable_event *ret,
                                unsigned max, uint64_t *ret_lost) {
        uint64_t seq, first, lost = 0;
        unsigned n = 0;

        if (!t || !ret)
                return 0;
        kt_header_lock(t);
        seq = t->hdr->history_seq;
        first = seq > t->history_size ? seq - t->history_size + 1 : 1;
        if (after + 1 > first)
                first = after + 1;
        else
                lost = first - (after + 1);
        for (uint64_t s = first; s <= seq && n < max; s++) {
                const struct kt_event *src = &t->history[(s - 1) % t->history_size];

                if (src->seq != s || src->kind == HISTORY_NONE || src->kind >= _HISTORY_MAX)
                        continue;
                kt_event_copy(src, s, &ret[n]);
                n++;
        }
        kt_header_unlock(t);
        if (ret_lost)
                *ret_lost = lost;
        return n;
}

/* Row k (its pool p locked and marked) takes the state another node saw; true when it changed. */
static bool apply_row(const struct keytable *t, struct kt_key *row, enum key_state state,
                      enum key_reason reason, int64_t until_ms, int64_t now_ms) {
        struct keytable_policy pol;

        switch (state) {
        case KEY_COOLING:
                /* A disabled key stays out, and a longer rest here is not cut short: the newer,
                 * later until wins. */
                if (row->state == KEY_DISABLED || until_ms <= now_ms ||
                    (row->state == KEY_COOLING && row->cooldown_until_ms >= until_ms))
                        return false;
                kt_mark(&row->dirty, 1);
                if (row->state != KEY_COOLING)
                        row->cooling_since_ms = now_ms;
                row->state = KEY_COOLING;
                row->reason = reason > KEY_REASON_NONE && reason < _KEY_REASON_MAX ? reason
                                                                                 : KEY_REASON_RATE_LIMITED;
                row->cooldown_until_ms = until_ms;
                kt_mark(&row->dirty, 0);
                return true;
        case KEY_DISABLED:
                if (row->state == KEY_DISABLED && row->reason == (uint32_t) reason)
                        return false;
                kt_policy_load(t, &pol);
                kt_mark(&row->dirty, 1);
                row->state = KEY_DISABLED;
                row->reason = reason;
                row->cooldown_until_ms = 0;
                row->cooling_since_ms = 0;
                row->next_probe_ms = kt_probe_time(&pol, reason, now_ms);
                kt_mark(&row->dirty, 0);
                return true;
        case KEY_READY:
                if (row->state == KEY_READY)
                        return false;
                kt_mark(&row->dirty, 1);
                kt_key_set_ready(row);
                kt_mark(&row->dirty, 0);
                return true;
        default:
                return false;
        }
}

int keytable_cluster_apply(struct keytable *t, const char *id, enum key_state state,
                           enum key_reason reason, int64_t until_ms, int64_t now_ms, char *ret_pool) {
        int changed = 0;

        if (!t || !id || state <= KEY_STATE_INVALID || state >= _KEY_STATE_MAX ||
            (state == KEY_DISABLED && (reason <= KEY_REASON_NONE || reason >= _KEY_REASON_MAX)))
                return -EINVAL;
        /* A scan, not the coordinator's id index (that one is process-local and may be older than
         * the last reload): events are rare next to requests, and tables hold thousands of keys
         * at most. */
        for (unsigned b = 0; b < KT_BANKS; b++) {
                unsigned lo = kt_bank_first_key(t, b), hi = lo + kt_bank_n_keys(t, b);

                for (unsigned k = lo; k < hi; k++) {
                        unsigned p;
                        bool did;

                        if (strncmp(t->keys[k].id, id, sizeof t->keys[k].id) != 0)
                                continue;
                        if (kt_key_lock(t, k, &p, NULL) < 0)
                                continue;
                        kt_mark(&t->pools[p].dirty, 1);
                        did = apply_row(t, &t->keys[k], state, reason, until_ms, now_ms);
                        if (did)
                                kt_index_update(t, p, k, now_ms);
                        kt_mark(&t->pools[p].dirty, 0);
                        if (did && changed++ == 0 && ret_pool)
                                copy_name(ret_pool, KEYTABLE_NAME_MAX + 1, t->pools[p].name);
                        kt_pool_unlock(t, p);
                }
        }
        return changed;
}

int keytable_cluster_set_usage(struct keytable *t, unsigned pool, unsigned position,
                               const struct keytable_usage *others) {
        unsigned p, first, end, k;

        if (!t || !others || pool >= kt_bank_n_pools(t, kt_bank_current(t)))
                return -EINVAL;
        p = kt_bank_first_pool(t, kt_bank_current(t)) + pool;
        kt_pool_lock(t, p);
        kt_pool_range(t, p, &first, &end);
        k = first + position;
        if (position >= end - first) {
                kt_pool_unlock(t, p);
                return -EINVAL;
        }
        /* Counters only: nothing the choice of a key depends on, so no dirty marks. */
        t->keys[k].others = *others;
        kt_pool_unlock(t, p);
        return 0;
}

int keytable_cluster_usage(struct keytable *t, unsigned key, struct keytable_usage *ret) {
        unsigned p;
        int r;

        r = kt_key_lock(t, key, &p, NULL);
        if (r < 0)
                return r;
        *ret = t->keys[key].others;
        kt_pool_unlock(t, p);
        return 0;
}

/* --- budgets leased from Redis --------------------------------------------------------------- */

int keytable_cluster_lease_read(struct keytable *t, unsigned key, struct keytable_lease_view *ret) {
        const struct kt_key *row;
        unsigned p;
        int r;

        if (!ret)
                return -EINVAL;
        r = kt_key_lock(t, key, &p, NULL);
        if (r < 0)
                return r;
        row = &t->keys[key];
        *ret = (struct keytable_lease_view) {
                .on = row->lease_on != 0,
                .ready = row->state == KEY_READY,
                .in_flight = row->in_flight,
                .slots = row->lease_slots,
                .left = row->lease_left,
                .requests = row->requests,
        };
        kt_pool_unlock(t, p);
        return 0;
}

/* Runs change on row key under its pool's lock with both marked, and moves the row in the index;
 * a row not under leases is left alone (-ESTALE: the link went down meanwhile) unless any. */
static int lease_change(struct keytable *t, unsigned key, int64_t now_ms, bool any,
                        int (*change)(struct kt_key *row, unsigned n, bool flag), unsigned n, bool flag) {
        unsigned p;
        int r;

        r = kt_key_lock(t, key, &p, NULL);
        if (r < 0)
                return r;
        if (!any && !t->keys[key].lease_on) {
                kt_pool_unlock(t, p);
                return -ESTALE;
        }
        kt_mark(&t->pools[p].dirty, 1);
        kt_mark(&t->keys[key].dirty, 1);
        r = change(&t->keys[key], n, flag);
        kt_mark(&t->keys[key].dirty, 0);
        kt_index_update(t, p, key, now_ms);
        kt_mark(&t->pools[p].dirty, 0);
        kt_pool_unlock(t, p);
        return r;
}

static int lease_begin(struct kt_key *row, unsigned n, bool flag) {
        row->lease_on = 1;
        return 0;
}

static int slice_add(struct kt_key *row, unsigned n, bool flag) {
        row->lease_left = row->lease_left > UINT32_MAX - n ? UINT32_MAX : row->lease_left + n;
        return 0;
}

static int slice_take(struct kt_key *row, unsigned n, bool flag) {
        unsigned taken = row->lease_left < n ? row->lease_left : n;

        row->lease_left -= taken;
        return (int) (taken < INT32_MAX ? taken : INT32_MAX);
}

static int slots_set(struct kt_key *row, unsigned n, bool at_least_in_flight) {
        row->lease_slots = at_least_in_flight && row->in_flight > n ? row->in_flight : n;
        return (int) (row->lease_slots < INT32_MAX ? row->lease_slots : INT32_MAX);
}

int keytable_cluster_lease_mode(struct keytable *t, unsigned key, bool on, unsigned max_concurrent,
                                unsigned rpm, int64_t now_ms) {
        /* Nothing is held on either side of a change: a slice leased over a link that is gone
         * is written off (Redis lets it go), never carried into the static share. */
        int r = keytable_set_key_limits(t, key, max_concurrent, rpm);

        return r < 0 || !on ? r : lease_change(t, key, now_ms, true, lease_begin, 0, false);
}

int keytable_cluster_lease_add(struct keytable *t, unsigned key, unsigned n, int64_t now_ms) {
        return lease_change(t, key, now_ms, false, slice_add, n, false);
}

int keytable_cluster_lease_take(struct keytable *t, unsigned key, unsigned n, int64_t now_ms) {
        return lease_change(t, key, now_ms, false, slice_take, n, false);
}

int keytable_cluster_lease_slots(struct keytable *t, unsigned key, unsigned slots,
                                 bool at_least_in_flight, int64_t now_ms) {
        return lease_change(t, key, now_ms, false, slots_set, slots, at_least_in_flight);
}

bool keytable_cluster_pool_waiting(struct keytable *t, unsigned pool, int64_t now_ms) {
        unsigned b;

        if (!t)
                return false;
        b = kt_bank_current(t);
        if (pool >= kt_bank_n_pools(t, b))
                return false;
        /* The published head tickets of the workers' wait queues: the same signs kt_fifo_yields
         * trusts, and as stale after a worker's silence. */
        for (unsigned s = 0; s < t->n_slots; s++) {
                const struct kt_slot *slot = &t->slots[s];

                if (KT_LOAD(&slot->waiters) == 0 || KT_LOAD(&slot->stage) == WORKER_STAGE_FREE ||
                    kt_slot_bank(t, s) != b || KT_LOAD(&kt_slot_tickets(t, s)[pool]) == 0 ||
                    now_ms - KT_LOAD(&slot->heartbeat_ms) > 5000)
                        continue;
                return true;
        }
        return false;
}
