"""The registry's Lua scripts: every state change is one atomic script (no read-modify-write in Python).

Every script receives the same ARGV header, then its own arguments from ARGV[6]:

    ARGV[1] namespace   ARGV[2] lease_ms   ARGV[3] request_ttl_ms   ARGV[4] aux_ttl_ms
    ARGV[5] reservation_ttl_ms

Keys are built inside the scripts from the namespace (see `keys` in registry.py for the layout), so
the scripts run on a single Redis, not a cluster. Time is Redis's own clock (TIME), so every process
agrees on lease deadlines and reservation ages. A script that refuses returns {0, message} before it
writes anything (Redis does not roll back a script that fails half-way); success returns {1, ...}.
"""

from __future__ import annotations

PRELUDE = """
local ns = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local request_ttl_ms = tonumber(ARGV[3])
local aux_ttl_ms = tonumber(ARGV[4])
local reservation_ttl_ms = tonumber(ARGV[5])
local ROLES = {'prefill', 'decode'}

local function k_worker(id) return ns .. ':worker:' .. id end
local function k_worker_requests(id) return ns .. ':worker-requests:' .. id end
local function k_worker_prefixes(id) return ns .. ':worker-prefixes:' .. id end
local function k_role(role) return ns .. ':workers:' .. role end
local function k_request(id) return ns .. ':request:' .. id end
local k_requests = ns .. ':requests'
local k_reserved = ns .. ':reserved'

local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end

local function load_request(rid)
  local flat = redis.call('HGETALL', k_request(rid))
  if #flat == 0 then return nil end
  local rec = {}
  for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
  return rec
end

local function describe(rec)
  return 'state ' .. rec.state .. ', owner ' .. rec.owner .. ', decode worker ' .. rec.decode_worker
end

local function record_reply(rid)
  local reply = {1}
  for _, v in ipairs(redis.call('HGETALL', k_request(rid))) do reply[#reply + 1] = v end
  return reply
end

-- refresh a record's TTL and its deadline in the live set (the two always move together)
local function touch_request(rid, now)
  redis.call('PEXPIRE', k_request(rid), request_ttl_ms)
  redis.call('ZADD', k_requests, fmt(now + request_ttl_ms / 1000), rid)
  redis.call('PEXPIRE', k_requests, aux_ttl_ms)
  redis.call('PEXPIRE', k_reserved, aux_ttl_ms)
end

local function index_add(wid, rid)
  redis.call('SADD', k_worker_requests(wid), rid)
  redis.call('PEXPIRE', k_worker_requests(wid), aux_ttl_ms)
end

local function delete_request(rid, rec)
  redis.call('DEL', k_request(rid))
  redis.call('ZREM', k_requests, rid)
  redis.call('ZREM', k_reserved, rid)
  for _, wid in ipairs({rec.decode_worker, rec.owner, rec.prefill_worker}) do
    if wid ~= '' then redis.call('SREM', k_worker_requests(wid), rid) end
  end
end

-- PREFILLING (owner P) -> RESERVED (owner D): P gave up or died; D still holds the blocks
local function release_to_decode(rid, rec, now)
  redis.call('HSET', k_request(rid), 'state', 'reserved', 'owner', rec.decode_worker,
             'prefill_worker', '', 'updated_at', fmt(now))
  redis.call('ZADD', k_reserved, fmt(now), rid)
  redis.call('SREM', k_worker_requests(rec.owner), rid)
  touch_request(rid, now)
end

-- drop a worker: membership, prefix set, request index; delete what it decodes, release what it
-- prefills. Returns {dropped ids, released ids}.
local function drop_worker(wid, now)
  for _, role in ipairs(ROLES) do redis.call('ZREM', k_role(role), wid) end
  redis.call('DEL', k_worker_prefixes(wid))
  local dropped, released = {}, {}
  for _, rid in ipairs(redis.call('SMEMBERS', k_worker_requests(wid))) do
    local rec = load_request(rid)
    if rec and rec.decode_worker == wid then
      delete_request(rid, rec)
      dropped[#dropped + 1] = rid
    elseif rec and rec.owner == wid and rec.state == 'prefilling' then
      release_to_decode(rid, rec, now)
      released[#released + 1] = rid
    end
  end
  redis.call('DEL', k_worker_requests(wid))
  return {dropped, released}
end
"""

# ARGV[6] worker_id, ARGV[7] role, ARGV[8..] field/value pairs (the whole worker hash but heartbeat_at).
# (Re)joining starts a fresh prefix set: the worker publishes its whole cache after registering.
REGISTER_WORKER = """
local wid, role = ARGV[6], ARGV[7]
local now = now_s()
local key = k_worker(wid)
redis.call('DEL', key, k_worker_prefixes(wid))
redis.call('HSET', key, 'heartbeat_at', fmt(now), unpack(ARGV, 8))
redis.call('PEXPIRE', key, lease_ms)
for _, r in ipairs(ROLES) do
  if r ~= role then redis.call('ZREM', k_role(r), wid) end
end
redis.call('ZADD', k_role(role), fmt(now + lease_ms / 1000), wid)
redis.call('PEXPIRE', k_role(role), aux_ttl_ms)
redis.call('PEXPIRE', k_worker_requests(wid), aux_ttl_ms)
return 1
"""

# ARGV[6] worker_id, ARGV[7..9] num_free_blocks, num_running, num_waiting, ARGV[10..] request ids.
# Returns 0 if the worker's key is gone (lease expired, reaped, Redis flushed): re-register.
HEARTBEAT = """
local wid = ARGV[6]
local key = k_worker(wid)
if redis.call('EXISTS', key) == 0 then return 0 end
local now = now_s()
redis.call('HSET', key, 'num_free_blocks', ARGV[7], 'num_running', ARGV[8], 'num_waiting', ARGV[9],
           'heartbeat_at', fmt(now))
redis.call('PEXPIRE', key, lease_ms)
local role = redis.call('HGET', key, 'role')
redis.call('ZADD', k_role(role), fmt(now + lease_ms / 1000), wid)
redis.call('PEXPIRE', k_role(role), aux_ttl_ms)
redis.call('PEXPIRE', k_worker_prefixes(wid), aux_ttl_ms)
local index = k_worker_requests(wid)
for _, rid in ipairs(redis.call('SMEMBERS', index)) do
  if redis.call('EXISTS', k_request(rid)) == 0 then redis.call('SREM', index, rid) end
end
for i = 10, #ARGV do
  local rid = ARGV[i]
  if redis.call('HGET', k_request(rid), 'owner') == wid then
    touch_request(rid, now)
    index_add(wid, rid)
  end
end
redis.call('PEXPIRE', index, aux_ttl_ms)
return 1
"""

# ARGV[6] worker_id. Graceful exit: the worker key too; returns {dropped ids, released ids}.
DEREGISTER_WORKER = """
local wid = ARGV[6]
redis.call('DEL', k_worker(wid))
return drop_worker(wid, now_s())
"""

# Returns {dead workers, dropped ids, released ids, expired reservation ids}.
REAP = """
local now = now_s()
local dead, dropped, released, expired = {}, {}, {}, {}
for _, role in ipairs(ROLES) do
  for _, wid in ipairs(redis.call('ZRANGEBYSCORE', k_role(role), '-inf', fmt(now))) do
    local ttl_ms = redis.call('PTTL', k_worker(wid))  -- -2: no key, the lease is over
    if ttl_ms ~= -2 then  -- alive after all (deadline drifted): fix its deadline
      if ttl_ms < 0 then ttl_ms = lease_ms end
      redis.call('ZADD', k_role(role), fmt(now + ttl_ms / 1000), wid)
    else
      dead[#dead + 1] = wid
      local out = drop_worker(wid, now)
      for _, rid in ipairs(out[1]) do dropped[#dropped + 1] = rid end
      for _, rid in ipairs(out[2]) do released[#released + 1] = rid end
    end
  end
end
local cutoff = fmt(now - reservation_ttl_ms / 1000)
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', k_reserved, '-inf', cutoff)) do
  local rec = load_request(rid)
  if rec and rec.state == 'reserved' then
    delete_request(rid, rec)
    expired[#expired + 1] = rid
  else
    redis.call('ZREM', k_reserved, rid)
  end
end
redis.call('ZREMRANGEBYSCORE', k_requests, '-inf', fmt(now))
return {dead, dropped, released, expired}
"""

# ARGV[6] request_id, ARGV[7] decode_worker, ARGV[8] num_blocks, ARGV[9] '1' if D prefills locally.
RESERVE = """
local rid, d = ARGV[6], ARGV[7]
local existing = load_request(rid)
if existing then
  return {0, 'request ' .. rid .. ': expected no record, found one (' .. describe(existing) .. ')'}
end
local now = now_s()
local state = 'reserved'
if ARGV[9] == '1' then state = 'decoding' end
redis.call('HSET', k_request(rid), 'request_id', rid, 'state', state, 'owner', d, 'decode_worker', d,
           'prefill_worker', '', 'num_blocks', ARGV[8], 'created_at', fmt(now), 'updated_at', fmt(now))
if state == 'reserved' then redis.call('ZADD', k_reserved, fmt(now), rid) end
touch_request(rid, now)
index_add(d, rid)
return record_reply(rid)
"""

# ARGV[6] request_id, ARGV[7] prefill_worker. RESERVED -> PREFILLING, owner P.
BEGIN_PREFILL = """
local rid, p = ARGV[6], ARGV[7]
local rec = load_request(rid)
if not rec then return {0, 'request ' .. rid .. ': expected state reserved, found no record'} end
if rec.state ~= 'reserved' then
  return {0, 'request ' .. rid .. ': expected state reserved, found ' .. describe(rec)}
end
local now = now_s()
redis.call('HSET', k_request(rid), 'state', 'prefilling', 'owner', p, 'prefill_worker', p,
           'updated_at', fmt(now))
redis.call('ZREM', k_reserved, rid)
touch_request(rid, now)
index_add(p, rid)
return record_reply(rid)
"""

# ARGV[6] request_id, ARGV[7] prefill_worker, ARGV[8] decode_worker. PREFILLING(P) -> DECODING, owner D.
COMMIT_HANDOFF = """
local rid, p, d = ARGV[6], ARGV[7], ARGV[8]
local rec = load_request(rid)
local expected = 'expected state prefilling, owner ' .. p .. ', decode worker ' .. d
if not rec then return {0, 'request ' .. rid .. ': ' .. expected .. '; found no record'} end
if rec.state ~= 'prefilling' or rec.owner ~= p or rec.decode_worker ~= d then
  return {0, 'request ' .. rid .. ': ' .. expected .. '; found ' .. describe(rec)}
end
local now = now_s()
redis.call('HSET', k_request(rid), 'state', 'decoding', 'owner', d, 'updated_at', fmt(now))
redis.call('SREM', k_worker_requests(p), rid)
touch_request(rid, now)
return record_reply(rid)
"""

# ARGV[6] request_id, ARGV[7] prefill_worker. PREFILLING(P) -> RESERVED, owner D (P gave up).
RELEASE_PREFILL = """
local rid, p = ARGV[6], ARGV[7]
local rec = load_request(rid)
local expected = 'expected state prefilling, owner ' .. p
if not rec then return {0, 'request ' .. rid .. ': ' .. expected .. '; found no record'} end
if rec.state ~= 'prefilling' or rec.owner ~= p then
  return {0, 'request ' .. rid .. ': ' .. expected .. '; found ' .. describe(rec)}
end
release_to_decode(rid, rec, now_s())
return record_reply(rid)
"""

# ARGV[6] request_id, ARGV[7] worker_id. Returns {1, 1} ended, {1, 0} absent, {0, message} refused.
END_REQUEST = """
local rid, wid = ARGV[6], ARGV[7]
local rec = load_request(rid)
if not rec then
  redis.call('ZREM', k_requests, rid)
  redis.call('ZREM', k_reserved, rid)
  redis.call('SREM', k_worker_requests(wid), rid)
  return {1, 0}
end
if rec.owner ~= wid and rec.decode_worker ~= wid then
  return {0, 'request ' .. rid .. ': expected owner or decode worker ' .. wid .. ', found ' .. describe(rec)}
end
delete_request(rid, rec)
return {1, 1}
"""

# ARGV[6] worker_id, ARGV[7..] 8 values per record in `RESTORE_FIELDS` order. Recreates the records
# that are missing (after a flush/restart) and name the worker as owner or decode worker; returns ids.
RESTORE_FIELDS = (
    "request_id",
    "state",
    "owner",
    "decode_worker",
    "prefill_worker",
    "num_blocks",
    "created_at",
    "updated_at",
)
RESTORE_REQUESTS = """
local wid = ARGV[6]
local now = now_s()
local restored = {}
for i = 7, #ARGV, 8 do
  local rid, state, owner, d, p = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if (owner == wid or d == wid) and redis.call('EXISTS', k_request(rid)) == 0 then
    redis.call('HSET', k_request(rid), 'request_id', rid, 'state', state, 'owner', owner,
               'decode_worker', d, 'prefill_worker', p, 'num_blocks', ARGV[i + 5],
               'created_at', ARGV[i + 6], 'updated_at', ARGV[i + 7])
    if state == 'reserved' then redis.call('ZADD', k_reserved, fmt(now), rid) end
    touch_request(rid, now)
    index_add(d, rid)
    if owner ~= d then index_add(owner, rid) end
    restored[#restored + 1] = rid
  end
end
return restored
"""

# Returns every live record as a flat HGETALL list; prunes ids whose record expired.
LIVE_REQUESTS = """
local now = now_s()
redis.call('ZREMRANGEBYSCORE', k_requests, '-inf', fmt(now))
local out = {}
for _, rid in ipairs(redis.call('ZRANGE', k_requests, 0, -1)) do
  local flat = redis.call('HGETALL', k_request(rid))
  if #flat == 0 then redis.call('ZREM', k_requests, rid) else out[#out + 1] = flat end
end
return out
"""

# ARGV[6] number of workers W, ARGV[7..6+W] worker ids, the rest block hashes in prefix order.
# Read-only: for each worker, how many leading hashes its prefix set holds (stops at the first miss).
PREFIX_OVERLAP = """
local n = tonumber(ARGV[6])
local first_hash = 7 + n
local counts = {}
for w = 7, 6 + n do
  local key = k_worker_prefixes(ARGV[w])
  local count = 0
  for i = first_hash, #ARGV do
    if redis.call('SISMEMBER', key, ARGV[i]) == 0 then break end
    count = count + 1
  end
  counts[#counts + 1] = count
end
return counts
"""
