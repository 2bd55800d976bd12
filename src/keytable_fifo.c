/* keytable_fifo.c — waiting for a key in arrival order across workers.
 *
 * Owns the waiters' tickets: per pool row a counter that hands out tickets, and per worker slot
 * and pool the ticket of that worker's oldest waiter. Each worker keeps its own waiters in a
 * FIFO, so within a worker the order was always kept; across workers a key freed (or rested
 * back) would go to whichever worker looked first, and a request that came later on another
 * worker could overtake. With tickets, acquire gives a key to a caller only when no waiter of
 * another live worker holds an older ticket of the same pool: the younger caller yields and
 * looks again shortly (the older waiter's own worker is woken by the same release or timer that
 * woke the younger one). Everything here is atomic loads and stores with no lock: a ticket
 * published a moment late costs one request its place once, never a key or a request.
 */

#include <stdbool.h>
#include <stdint.h>

#include "keypool/keytable.h"
#include "keytable_internal.h"

/* A worker whose heartbeat (once a second) is this old is stopped or wedged: its waiters are not
 * waited for, or one SIGSTOPped worker would hold every other worker's waiters until it dies. */
#define KT_FIFO_STALE_MS 5000

uint64_t keytable_wait_ticket(struct keytable *t, unsigned slot, unsigned pool) {
        unsigned b;

        if (!t || slot >= t->n_slots)
                return 0;
        b = kt_slot_bank(t, slot);
        if (pool >= kt_bank_n_pools(t, b))
                return 0;
        return __atomic_add_fetch(&t->pools[kt_bank_first_pool(t, b) + pool].ticket_seq, 1,
                                  __ATOMIC_ACQ_REL);
}

void keytable_slot_set_wait_head(struct keytable *t, unsigned slot, unsigned pool, uint64_t ticket) {
        if (t && slot < t->n_slots && pool < t->max_pools)
                KT_STORE(&kt_slot_tickets(t, slot)[pool], ticket);
}

void kt_fifo_slot_clear(const struct keytable *t, unsigned slot) {
        uint64_t *tickets = kt_slot_tickets(t, slot);

        for (unsigned i = 0; i < t->max_pools; i++)
                KT_STORE(&tickets[i], 0);
}

bool kt_fifo_yields(const struct keytable *t, unsigned slot, unsigned p, uint64_t ticket,
                    int64_t now_ms) {
        unsigned b = p / t->max_pools, pool = p % t->max_pools;

        /* No slot has waiters (or only this one): nobody to yield to, and no scan of every
         * slot's cache line on each acquire. */
        if (KT_LOAD(&t->hdr->waiting_slots) <= (KT_LOAD(&t->slots[slot].waiters) > 0 ? 1u : 0u))
                return false;
        if (ticket == 0)
                ticket = UINT64_MAX;
        for (unsigned s = 0; s < t->n_slots; s++) {
                const struct kt_slot *other = &t->slots[s];
                uint64_t theirs;

                if (s == slot || KT_LOAD(&other->waiters) == 0 ||
                    KT_LOAD(&other->stage) == WORKER_STAGE_FREE || kt_slot_bank(t, s) != b)
                        continue;
                theirs = KT_LOAD(&kt_slot_tickets(t, s)[pool]);
                if (theirs == 0 || theirs >= ticket)
                        continue;
                if (now_ms - KT_LOAD(&other->heartbeat_ms) > KT_FIFO_STALE_MS)
                        continue;
                return true;
        }
        return false;
}
