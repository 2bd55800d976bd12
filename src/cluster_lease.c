/* cluster_lease.c — how a host leases its part of each limited key's budgets from Redis.
 *
 * Owns the decisions (pure: the plan for one key at one tick) and the Lua script that grants
 * leases atomically; cluster.c carries both between the table and Redis. rpm is a sliding
 * minute of grants in Redis per key row, from which a host takes small slices ahead of need and
 * to which it gives back what it did not use once the key is idle or resting. max_concurrent is a hash
 * per key row of the slots each node holds; a node's slots count only while its heartbeat key
 * lives, so those of a dead node come back when its heartbeat expires.
 */
#include "keypool/cluster.h"

#include "cluster_internal.h"

/* KEYS: the rpm window, the slots hash. ARGV: node, node key prefix, rpm, requests wanted
 * (negative: given back), max_concurrent, slots wanted (-1: leave them), slots in flight here,
 * how long (ms) a refusal says "contended". The rpm window is a hash of grants (the ms granted
 * at → how many), forgotten after 60 s: no 60 s span ever holds more than rpm grants, so no
 * upstream window of a minute sees more, whichever way it is cut. What is given back comes off
 * the newest grants. Redis's clock runs it, so the hosts' clocks need not agree. Returns
 * requests granted, slots now recorded for the node (-1: untouched), 1 when another node was
 * refused slots lately, and the slots granted (before the in-flight floor). */
const char cluster_lease_script[] =
        "local t = redis.call('TIME')\n"
        "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
        "local node, rpm, delta = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])\n"
        "local conc, want, floor, cms = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])\n"
        "local granted, held, contended, g = 0, -1, 0, -1\n"
        "if rpm > 0 and delta ~= 0 then\n"
        "  local h = redis.call('HGETALL', KEYS[1])\n"
        "  local used, grants = 0, {}\n"
        "  for i = 1, #h, 2 do\n"
        "    local at, n = tonumber(h[i]), tonumber(h[i + 1]) or 0\n"
        "    if not at or at <= now - 60000 or n <= 0 then redis.call('HDEL', KEYS[1], h[i])\n"
        "    else used = used + n; grants[#grants + 1] = { at, h[i], n } end\n"
        "  end\n"
        "  if delta > 0 then\n"
        "    granted = math.max(0, math.min(delta, rpm - used))\n"
        "    if granted > 0 then redis.call('HINCRBY', KEYS[1], t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)), granted) end\n"
        "  else\n"
        "    local back = -delta\n"
        "    table.sort(grants, function(x, y) return x[1] > y[1] end)\n"
        "    for _, e in ipairs(grants) do\n"
        "      if back <= 0 then break end\n"
        "      local take = math.min(e[3], back)\n"
        "      if take == e[3] then redis.call('HDEL', KEYS[1], e[2])\n"
        "      else redis.call('HINCRBY', KEYS[1], e[2], -take) end\n"
        "      back = back - take\n"
        "    end\n"
        "  end\n"
        "  redis.call('PEXPIRE', KEYS[1], 61000)\n"
        "end\n"
"if conc > 0 then\n"
        "  local h = redis.call('HGETALL', KEYS[2])\n"
        "  local others = 0\n"
        "  for i = 1, #h, 2 do\n"
        "    local f, v = h[i], tonumber(h[i + 1]) or 0\n"
        "    if string.sub(f, 1, 2) == 'w:' then\n"
        "      if now - v >= cms then redis.call('HDEL', KEYS[2], f)\n"
        "      elseif string.sub(f, 3) ~= node then contended = 1 end\n"
        "    elseif f ~= node then\n"
        "      if redis.call('EXISTS', ARGV[2] .. f) == 1 then others = others + v\n"
        "      else redis.call('HDEL', KEYS[2], f) end\n"
        "    end\n"
        "  end\n"
        "  if want >= 0 then\n"
        "    g = math.max(0, math.min(want, conc - others))\n"
        "    if g < want and want > floor then redis.call('HSET', KEYS[2], 'w:' .. node, tostring(now))\n"
        "    else redis.call('HDEL', KEYS[2], 'w:' .. node) end\n"
        "    held = math.max(g, floor)\n"
        "    if held > 0 then redis.call('HSET', KEYS[2], node, tostring(held))\n"
        "    else redis.call('HDEL', KEYS[2], node) end\n"
        "    redis.call('PEXPIRE', KEYS[2], 120000)\n"
        "  end\n"
        "end\n"
        "return { granted, held, contended, g }\n";

static unsigned min_u(unsigned a, unsigned b) {
        return a < b ? a : b;
}

unsigned cluster_lease_slice(unsigned limit, unsigned nodes) {
        unsigned share;

        if (limit == 0)
                return 0;
        if (nodes == 0)
                nodes = 1;
        /* Half a fair share: small enough that an idle host holds little, large enough that a
         * busy one asks Redis a few times per share, not per request. */
        share = limit / nodes + (limit % nodes > 0);
        return share / 2 + (share % 2 > 0);
}

void cluster_lease_plan(const struct cluster_lease_input *in, struct cluster_lease_plan *ret) {
        bool busy = in->ready && in->active;

        *ret = (struct cluster_lease_plan) { .cap = -1, .ask = -1 };
        if (in->rpm > 0) {
                unsigned slice = cluster_lease_slice(in->rpm, in->nodes);

                if (!busy)
                        ret->rpm_return = in->left;
                else if (in->left <= slice / 2)
                        /* Ahead of need: the next slice is on its way while half of this one is
                         * still there to serve. */
                        ret->rpm_want = slice - in->left;
        }
        if (in->max_concurrent > 0) {
                if (!busy) {
                        /* Idle or resting: keep what is in flight, give back the rest. */
                        if (in->slots > in->in_flight)
                                ret->cap = (int) in->in_flight;
                        if (in->held > in->in_flight)
                                ret->ask = (int) in->in_flight;
                } else if (in->contended) {
                        /* Another node waits: take no new request, and give each slot back as
                         * the request on it ends (Redis keeps counting those in flight). */
                        unsigned cap = in->in_flight > 0 ? in->in_flight - 1 : 0;

                        if (in->slots > cap)
                                ret->cap = (int) cap;
                        if (in->held > in->in_flight)
                                ret->ask = (int) in->in_flight;
                } else {
                        unsigned target = min_u(in->max_concurrent,
                                                in->in_flight + cluster_lease_slice(in->max_concurrent,
                                                                                   in->nodes));

                        if (target > in->slots) {
                                ret->ask = (int) target;
                                ret->raise = true;
                        }
                }
        }
}
