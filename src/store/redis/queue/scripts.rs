//! The Lua scripts of the queue protocol (see the parent module's docs). Scripts reach batch
//! context keys by name: they carry the app's hash tag, so they share the Cluster slot of the
//! keys the scripts declare.

/// Lua shared by the scripts that read a record before replacing or deleting it: lowers the
/// count of each packed record's batch context, and deletes a context no record refers to.
/// The batch is read with a pattern, not a JSON decode: a packed record always starts
/// `{"packed":{"batch":"<hex>"` (`PackedJob` serializes `batch` first; the tests pin it).
pub(super) const RELEASE_FN: &str = r#"
local BATCH_OF = '^{"packed":{"batch":"([^"]+)"'
local function release(jobs, prefix, ids)
  if #ids == 0 then return end
  local recs = redis.call('HMGET', jobs, unpack(ids))
  local counts = {}
  for i = 1, #ids do
    local batch = recs[i] and string.match(recs[i], BATCH_OF)
    if batch then counts[batch] = (counts[batch] or 0) + 1 end
  end
  for batch, n in pairs(counts) do
    local key = prefix .. batch
    if redis.call('HINCRBY', key, 'left', -n) <= 0 then redis.call('DEL', key) end
  end
end
"#;

/// Releases packed records about to be replaced or deleted (park, dead letter).
pub(super) const RELEASE: &str = r#"
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
release(KEYS[1], ARGV[1], ids)
return 1
"#;

/// Undoes an accept whose outcome is unknown (its MULTI may have been applied with the reply
/// lost). For each (id, batch) pair: the record is removed with its lease and owner (its batch
/// context released) only if this replica owns it and it is the packed record of that batch
/// (a later accept of the same id, a resend, is left alone); the id's idempotency key is
/// deleted when the record was removed, or when there is none and the key still says
/// `accepted`, so a resend of the id is accepted. Returns how many records were removed.
/// KEYS: leases, owner, jobs; ARGV: replica, batch-context prefix, idempotency-key prefix, then
/// id, batch pairs.
pub(super) const UNACCEPT: &str = r#"
local me = ARGV[1]
local ours = {}
for i = 4, #ARGV - 1, 2 do
  local id, batch = ARGV[i], ARGV[i + 1]
  local rec = redis.call('HGET', KEYS[3], id)
  local idem = ARGV[3] .. id
  if rec then
    if redis.call('HGET', KEYS[2], id) == me and string.match(rec, BATCH_OF) == batch then
      ours[#ours + 1] = id
      redis.call('DEL', idem)
    end
  elseif string.find(redis.call('GET', idem) or '', '^accepted') then
    redis.call('DEL', idem)
  end
end
if #ours > 0 then
  release(KEYS[3], ARGV[2], ours)
  redis.call('HDEL', KEYS[3], unpack(ours))
  redis.call('ZREM', KEYS[1], unpack(ours))
  redis.call('HDEL', KEYS[2], unpack(ours))
end
return #ours
"#;

/// Claims due and expired-lease jobs. Returns `{jobs, contexts}`: `jobs` as flat
/// `id, record, reclaimed` triples, and `contexts` as flat `batch, ctx, buf` triples, once per
/// batch that a claimed packed record refers to (`ctx`/`buf` false if the context is gone).
pub(super) const CLAIM: &str = r#"
local now = tonumber(ARGV[1])
local deadline = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local me = ARGV[4]
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
if #ids > 0 then
  -- The due ids are the lowest ranks.
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #ids - 1)
  local recs = redis.call('HMGET', KEYS[4], unpack(ids))
  local lease = {}
  local own = {}
  for i, id in ipairs(ids) do
    local rec = recs[i]
    if rec then
      lease[#lease + 1] = deadline
      lease[#lease + 1] = id
      own[#own + 1] = id
      own[#own + 1] = me
      out[#out + 1] = id
      out[#out + 1] = rec
      out[#out + 1] = '0'
    end
  end
  if #lease > 0 then
    redis.call('ZADD', KEYS[2], unpack(lease))
    redis.call('HSET', KEYS[3], unpack(own))
  end
end
local left = limit - #ids
if left > 0 then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, left)
  for _, id in ipairs(expired) do
    local rec = redis.call('HGET', KEYS[4], id)
    if redis.call('HGET', KEYS[3], id) == me then
      -- Still ours (renewal lagged, e.g. after a Redis outage): extend, do not re-run.
      redis.call('ZADD', KEYS[2], deadline, id)
    elseif rec then
      redis.call('ZADD', KEYS[2], deadline, id)
      redis.call('HSET', KEYS[3], id, me)
      out[#out + 1] = id
      out[#out + 1] = rec
      out[#out + 1] = '1'
    else
      redis.call('ZREM', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
    end
  end
end
local contexts = {}
local seen = {}
for i = 2, #out, 3 do
  local batch = string.match(out[i], '^{"packed":{"batch":"([^"]+)"')
  if batch and not seen[batch] then
    seen[batch] = true
    local ctx = redis.call('HMGET', ARGV[5] .. batch, 'ctx', 'buf')
    contexts[#contexts + 1] = batch
    contexts[#contexts + 1] = ctx[1]
    contexts[#contexts + 1] = ctx[2]
  end
end
return {out, contexts}
"#;

/// Lua shared by the scripts that write for a message this replica may no longer hold: a
/// message is fenced off when another replica owns its lease (it reclaimed the lease after ours
/// lapsed: a stall, a partition or an outage longer than `lease_ms`), so only the owner parks,
/// dead-letters or finishes it. A message nobody owns is not fenced for parks and dead letters
/// (a write batch applied once already and written again, or a Redis that lost its data: the
/// record is written again rather than lost).
pub(super) const FENCE_FN: &str = r#"
local function owners_of(owner, ids)
  if #ids == 0 then return {} end
  return redis.call('HMGET', owner, unpack(ids))
end
local function taken(holder, me)
  return holder and holder ~= me
end
-- ARGV from 3 on as id, score, record triples, split into the ids not fenced off (with their
-- `HSET` id, record and `ZADD` score, id arguments) and the fenced ids.
local function split_fenced(owner, me)
  local all = {}
  for i = 3, #ARGV - 2, 3 do all[#all + 1] = ARGV[i] end
  local holders = owners_of(owner, all)
  local ids, records, scored, fenced = {}, {}, {}, {}
  local k = 0
  for i = 3, #ARGV - 2, 3 do
    k = k + 1
    local id = ARGV[i]
    if taken(holders[k], me) then
      fenced[#fenced + 1] = id
    else
      ids[#ids + 1] = id
      scored[#scored + 1] = ARGV[i + 1]
      scored[#scored + 1] = id
      records[#records + 1] = id
      records[#records + 1] = ARGV[i + 2]
    end
  end
  return ids, records, scored, fenced
end
"#;

/// Lua shared by the scripts that count terminal receipts for campaign measurement (see
/// `crate::store::redis::insights`): `count` takes the JSON of one `insights::Count` (empty:
/// nothing to count), writes an exposure's record and the user's exposures (latest per
/// campaign, and every one for ForgetUser) at once, and adds the counter to `pending`; `add_counts` then writes
/// each campaign's counters once per call (a write batch is mostly one campaign: two or three fields, not one command per receipt).
pub(super) const COUNT_FN: &str = r#"
local pending = {}
local function count(base, window, c)
  if c == nil or c == '' then return end
  local t = cjson.decode(c)
  local skey = base .. 'stats:' .. t.c
  local fields = pending[skey]
  if not fields then
    fields = {}
    pending[skey] = fields
  end
  fields[t.f] = (fields[t.f] or 0) + 1
  if t.m then
    local x = base .. 'exp:' .. t.m
    redis.call('HSET', x, 'c', t.c, 'v', t.v, 'u', t.u, 't', t.t)
    redis.call('PEXPIRE', x, window)
    if t.u ~= '' then
      -- The user's latest exposure per campaign and overall, and (`m:<id>`, which ForgetUser
      -- reads) every exposure of the user: one key per user, one write per exposure.
      local u = base .. 'uexp:' .. t.u
      redis.call('HSET', u, t.c, t.m, '*', t.m, 'm:' .. t.m, t.m)
      redis.call('PEXPIRE', u, window)
    end
  end
end
local function add_counts(retention)
  for skey, fields in pairs(pending) do
    for f, n in pairs(fields) do redis.call('HINCRBY', skey, f, n) end
    redis.call('PEXPIRE', skey, retention)
  end
  pending = {}
end
"#;

/// Counts terminal receipts that release no lease (after `COUNT_FN`). ARGV: insights prefix,
/// window, retention, then one count each.
pub(super) const COUNT: &str = r#"
for i = 4, #ARGV do count(ARGV[1], ARGV[2], ARGV[i]) end
add_counts(ARGV[3])
return 1
"#;

/// Finishes messages (after `RELEASE_FN` and `COUNT_FN`): for each id this replica still owns,
/// its terminal receipt (if any) is appended to the receipts stream, its campaign counts (if
/// any) are added, and its lease, owner and record are removed. A receipt for an id this
/// replica does not own is neither written nor counted: the replica that reclaimed the message
/// writes and counts the one terminal receipt it ends with, and a write batch written again
/// after a lost reply appends and counts no receipt twice. KEYS: leases, owner, jobs, receipts
/// stream; ARGV: replica, batch-context prefix, stream maxlen, n, insights prefix, window,
/// retention, then n (id, count) pairs without a receipt, then (id, receipt, count) triples.
/// Returns `{acked, fenced}`.
pub(super) const ACK: &str = r#"
local me = ARGV[1]
local n = tonumber(ARGV[4])
local base, window, retention = ARGV[5], ARGV[6], ARGV[7]
local ids, counts = {}, {}
for i = 8, 7 + 2 * n, 2 do
  ids[#ids + 1] = ARGV[i]
  counts[#counts + 1] = ARGV[i + 1]
end
local first = 8 + 2 * n
for i = first, #ARGV - 2, 3 do ids[#ids + 1] = ARGV[i] end
local owners = #ids > 0 and redis.call('HMGET', KEYS[2], unpack(ids)) or {}
local mine = {}
local fenced = 0
for j = 1, n do
  if owners[j] == me then
    mine[#mine + 1] = ids[j]
    count(base, window, counts[j])
  end
end
local j = n
for i = first, #ARGV - 2, 3 do
  j = j + 1
  if owners[j] == me then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'r', ARGV[i + 1])
    count(base, window, ARGV[i + 2])
    mine[#mine + 1] = ARGV[i]
  else
    fenced = fenced + 1
  end
end
add_counts(retention)
if #mine > 0 then
  release(KEYS[3], ARGV[2], mine)
  redis.call('ZREM', KEYS[1], unpack(mine))
  redis.call('HDEL', KEYS[2], unpack(mine))
  redis.call('HDEL', KEYS[3], unpack(mine))
end
return {#mine, fenced}
"#;

/// Parks retries (after `RELEASE_FN` and `FENCE_FN`): each id not fenced off gets its new
/// record, a place in this replica's delay set at its due time, and loses its lease. KEYS:
/// jobs, delay set, leases, owner; ARGV: replica, batch-context prefix, then id, due, record
/// triples. Returns the fenced ids.
pub(super) const PARK: &str = r#"
local ids, records, due, fenced = split_fenced(KEYS[4], ARGV[1])
if #ids > 0 then
  release(KEYS[1], ARGV[2], ids)
  redis.call('HSET', KEYS[1], unpack(records))
  redis.call('ZADD', KEYS[2], unpack(due))
  redis.call('ZREM', KEYS[3], unpack(ids))
  redis.call('HDEL', KEYS[4], unpack(ids))
end
return fenced
"#;

/// Dead-letters messages (after `RELEASE_FN` and `FENCE_FN`): each id not fenced off moves
/// from `jobs` to the dead letters. Its lease stays: the terminal receipt that follows releases
/// it through `ACK`, fenced the same way. KEYS: jobs, dead, dead index, owner; ARGV: replica,
/// batch-context prefix, then id, at, record triples. Returns how many were fenced.
pub(super) const DEAD: &str = r#"
local ids, records, at, fenced = split_fenced(KEYS[4], ARGV[1])
if #ids > 0 then
  release(KEYS[1], ARGV[2], ids)
  redis.call('HSET', KEYS[2], unpack(records))
  redis.call('ZADD', KEYS[3], unpack(at))
  redis.call('HDEL', KEYS[1], unpack(ids))
end
return #fenced
"#;

pub(super) const TAKEOVER: &str = r#"
redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MIN')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"#;

/// Cancels scheduled messages that are still waiting: each id that is in one of the delay sets
/// named in ARGV and whose record was never attempted leaves its delay set and `jobs` (KEYS[1])
/// in one step, so a claim and a cancel never both take it. ARGV: n, n delay-set keys, ids.
/// Returns the cancelled records.
pub(super) const CANCEL: &str = r#"
local n = tonumber(ARGV[1])
local out = {}
for i = n + 2, #ARGV do
  local id = ARGV[i]
  local rec = redis.call('HGET', KEYS[1], id)
  if rec and string.find(rec, '"attempt":0[,}]') then
    for d = 2, n + 1 do
      if redis.call('ZREM', ARGV[d], id) == 1 then
        redis.call('HDEL', KEYS[1], id)
        out[#out + 1] = rec
        break
      end
    end
  end
end
return out
"#;
