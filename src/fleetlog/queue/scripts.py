"""Lua run inside Redis, where several commands must happen as one.

Each script is atomic, so a batch is either wholly queued or not at all, and a
backlog check cannot race the write it guards.
"""

from __future__ import annotations

from typing import Final

#: One key or argument of a Redis call, as Redis takes them.
ScriptArg = bytes | str | int

#: Frame ids remembered per device: twice what one connection may have in flight
#: (the gateway's 256), so a device whose connection died with every frame
#: unanswered can resend them all and have each stored once.  ~90 B each at most.
MAX_FRAMES: Final = 512

#: Sessions remembered per device (least recently used forgotten first), and
#: ranges of stored seqs per session (the lowest kept, those just above it
#: forgotten first).  Forgetting only ever makes a resend be stored again, never
#: makes a record look stored: ``stored_through`` never passes a gap.
MAX_SESSIONS: Final = 8
MAX_RANGES: Final = 64

#: Queue submissions atomically: the backlog check, v2 frame-id dedupe, per-device
#: seq bookkeeping and the writes themselves happen as one step.
#:
#: KEYS[1] the stream (or the legacy list); in stream mode KEYS[2] its backlog
#: counter (:func:`fleetlog.keys.queue_backlog`, same slot); then every per-device
#: key the call touches, each once: the script touches no key it was not given,
#: so on a Redis Cluster one call is one slot (a shard's keys share its hash
#: tag).  ARGV[1] max backlog (records), ARGV[2] dedupe window (ms), ARGV[3]
#: 'stream' or 'list', ARGV[4..6] MAX_FRAMES, MAX_SESSIONS, MAX_RANGES; ARGV[7]
#: the call's records, every group's in order, joined by newlines (a record is
#: compact JSON, which holds no raw newline); then 8 per group of records: the
#: index in KEYS of its recent-frames key (0: none), frame id, the index of its
#: stored-seqs key (0: none), session, record count n (its records are the next n
#: of ARGV[7]), seqs ('' untracked; 'a-b' the n consecutive seqs a..b; else n
#: comma-separated seqs, '-' for a record without one), its devices (runs of
#: records of one device: the runs' devices joined by newlines) and the runs'
#: record counts (comma-separated).  A v2 frame is a group of one device;
#: consecutive legacy submissions go as one group.
#:
#: Stream mode writes ONE entry for the whole call (the packed entry the worker
#: splits, :mod:`fleetlog.queue.consumer`): ``n`` records, ``d`` the runs'
#: devices, ``c`` their counts, ``r`` the records, newline-joined; and adds n to
#: the backlog counter, which the worker takes them off when it acknowledges the
#: entry.  When every group is kept whole (the usual call) ``r`` is ARGV[7] as
#: it came: the records are not split, nor joined again, in Lua (joining a call's
#: 180 KB there cost Redis three times what the rest of the call did); only a
#: call with a duplicate frame or seq splits them to leave those out.  The
#: backlog is that counter, or XLEN if more (entries written before the counter
#: existed count one each); an empty stream has none.  List mode
#: LPUSHes each record JSON, exactly the original design's write.
#:
#: Dedupe state records only what was stored: a seq is a duplicate only if it is
#: in a range of seqs this session stored, a frame id only if that frame was
#: queued.  A refused call (backlog over its limit) returns before any write, and
#: under maxmemory Redis refuses the call's first write (always an XADD, LPUSH,
#: ZADD, HSET or a duplicate frame's PEXPIRE), so a refused frame changes no
#: state and its resend is stored.  Consecutive seqs are checked and stored as a
#: range, at once: per record the script only copies bytes.
#:
#: Returns the backlog (a number) when it is over the limit and nothing was
#: written; else per group 0 (queued, no seqs tracked) or {duplicate_frame 0/1,
#: {duplicate seqs}, stored_through or -1, {missing ranges flattened: from, to, ...}}, where
#: stored_through ends the session's lowest stored range and missing are the gaps
#: above it.  Seqs travel as canonical decimal strings (< 2^53, exact in Lua's
#: doubles); '%.0f' writes them back in the same form.
INGEST: Final = """
local key, mode = KEYS[1], ARGV[3]
local stream = mode ~= 'list'
local backlog, length = 0, 0
if stream then
  length = redis.call('XLEN', key)
  if length > 0 then backlog = math.max(length, tonumber(redis.call('GET', KEYS[2]) or '0') or 0) end
else
  backlog = redis.call('LLEN', key)
end
if backlog >= tonumber(ARGV[1]) then return backlog end
local window = tonumber(ARGV[2])
local max_frames, max_sessions, max_ranges = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
local function fmt(x) return string.format('%.0f', x) end

-- The records of a blob, in order.
local function split(blob)
  local out, at = {}, 1
  while true do
    local nl = string.find(blob, '\\n', at, true)
    if not nl then
      out[#out + 1] = string.sub(blob, at)
      return out
    end
    out[#out + 1] = string.sub(blob, at, nl - 1)
    at = nl + 1
  end
end
-- The n seqs of a group (false: none).
local function seq_list(text, n)
  local list = {}
  local a = string.match(text, '^(%d+)%-%d+$')
  if a then
    local first = tonumber(a)
    for k = 1, n do list[k] = first + k - 1 end
    return list
  end
  for s in string.gmatch(text, '[^,]+') do
    if s == '-' then list[#list + 1] = false else list[#list + 1] = tonumber(s) end
  end
  return list
end

-- A session's stored seqs: sorted, disjoint, non-adjacent {from, to} ranges.
local function parse(value)
  local ranges = {}
  local body = string.match(value, '|(.*)$') or ''
  for a, b in string.gmatch(body, '(%d+)-(%d+)') do ranges[#ranges + 1] = {tonumber(a), tonumber(b)} end
  return ranges
end
local function serialise(ranges)
  local parts = {}
  for k, r in ipairs(ranges) do parts[k] = fmt(r[1]) .. '-' .. fmt(r[2]) end
  return fmt(clock()) .. '|' .. table.concat(parts, ',')
end
-- Adds the seqs a..b; false (and nothing changed) if any of them was there already.
local function add(ranges, a, b)
  local last = ranges[#ranges]
  if last == nil or a > last[2] + 1 then  -- the usual cases: above everything stored
    ranges[#ranges + 1] = {a, b}
    return true
  end
  if a == last[2] + 1 then  -- right after the highest stored
    last[2] = b
    return true
  end
  local lo, hi = 1, #ranges
  while lo <= hi do  -- the first range ending at or above a
    local mid = math.floor((lo + hi) / 2)
    if ranges[mid][2] < a then lo = mid + 1 else hi = mid - 1 end
  end
  local after, before = ranges[lo], ranges[lo - 1]
  if after and after[1] <= b then return false end
  local join_before = before ~= nil and before[2] == a - 1
  local join_after = after ~= nil and after[1] == b + 1
  if join_before and join_after then
    before[2] = after[2]
    table.remove(ranges, lo)
  elseif join_before then
    before[2] = b
  elseif join_after then
    after[1] = a
  else
    table.insert(ranges, lo, {a, b})
  end
  return true
end

local all, listed = ARGV[7], nil
-- The n records of ARGV[7] from its first-th on (split once, when first needed).
local function records_of(first, n)
  if not listed then listed = split(all) end
  local out = {}
  for k = 1, n do out[k] = listed[first + k - 1] end
  return out
end

-- What the entry gets: each kept part's devices, counts, and its records (a list,
-- or false for the n records of ARGV[7] from first on); whole while no record was left out.
local devices, counts, firsts, sizes, lists, total, whole = {}, {}, {}, {}, {}, 0, true
local function keep(group_devices, group_counts, first, n, list)
  if stream then
    local k = #devices + 1
    devices[k], counts[k] = group_devices, group_counts
    firsts[k], sizes[k], lists[k] = first, n, list or false
    total = total + n
  else
    for _, record in ipairs(list or records_of(first, n)) do redis.call('LPUSH', key, record) end
  end
end

local out = {}
local i, at = 8, 1
while i <= #ARGV do
  local frames_at, frame_id = tonumber(ARGV[i]), ARGV[i + 1]
  local seqs_at, session = tonumber(ARGV[i + 2]), ARGV[i + 3]
  local n, seqs, group_devices, group_counts =
    tonumber(ARGV[i + 4]), ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local first = at
  i, at = i + 8, at + n
  local frames_key, seqs_key = '', ''
  if frames_at > 0 then frames_key = KEYS[frames_at] end
  if seqs_at > 0 then seqs_key = KEYS[seqs_at] end
  local duplicate_frame = false
  if frames_key ~= '' then
    local score = redis.call('ZSCORE', frames_key, frame_id)
    duplicate_frame = score ~= false and score ~= nil and tonumber(score) > clock() - window
  end
  local ranges, known = nil, false
  if seqs_key ~= '' then
    local raw = redis.call('HGET', seqs_key, session)
    known = raw ~= false and raw ~= nil
    if known then ranges = parse(raw) else ranges = {} end
  end
  local dups = {}
  if duplicate_frame then
    -- A write, so the WAIT after this call covers the first copy of the frame too:
    -- WAIT waits for the offset of this connection's last write, and a call that
    -- wrote nothing would be acked on an older one (the first copy may be on the
    -- master only: it was answered unconfirmed, and lost if the master fails now).
    redis.call('PEXPIRE', frames_key, window)
    whole = false
  else
    local changed = false
    if ranges == nil or seqs == '' then
      keep(group_devices, group_counts, first, n)
    else
      local a, b = string.match(seqs, '^(%d+)%-(%d+)$')
      if a and add(ranges, tonumber(a), tonumber(b)) then  -- none stored yet: all at once
        changed = true
        keep(group_devices, group_counts, first, n)
      else
        local records, list, kept = records_of(first, n), seq_list(seqs, n), {}
        for k = 1, n do
          local s = list[k]
          if s and not add(ranges, s, s) then
            dups[#dups + 1] = s
          else
            if s then changed = true end
            kept[#kept + 1] = records[k]
          end
        end
        if #kept < n then whole = false end
        if #kept > 0 then keep(group_devices, tostring(#kept), first, #kept, kept) end
      end
    end
    if frames_key ~= '' then
      local t = clock()
      redis.call('ZADD', frames_key, t, frame_id)
      -- An id older than the window is no duplicate (the ZSCORE check looks at its
      -- time), only memory: it goes with the oldest once the set is over its bound,
      -- not by a range removal on every frame (a call a frame, an eighth of a frame's).
      if redis.call('ZCARD', frames_key) > max_frames then
        redis.call('ZREMRANGEBYRANK', frames_key, 0, -(max_frames + 1))
      end
      redis.call('PEXPIRE', frames_key, window)
    end
    if changed then
      -- Over the bound, the ranges just above the lowest are forgotten: their gaps
      -- merge, so their seqs show as missing (a resend stores them again) and
      -- stored_through, the lowest range's end, never passes a seq not stored.
      while #ranges > max_ranges do table.remove(ranges, 2) end
      redis.call('HSET', seqs_key, session, serialise(ranges))
      if not known and redis.call('HLEN', seqs_key) > max_sessions then
        local oldest, oldest_use = nil, nil
        local all = redis.call('HGETALL', seqs_key)
        for k = 1, #all, 2 do
          local use = tonumber(string.match(all[k + 1], '^(%d+)|')) or 0
          if all[k] ~= session and (oldest_use == nil or use < oldest_use) then
            oldest, oldest_use = all[k], use
          end
        end
        if oldest then redis.call('HDEL', seqs_key, oldest) end
      end
      redis.call('PEXPIRE', seqs_key, window)
    end
  end
  local through, missing = -1, {}
  if ranges and #ranges > 0 then
    through = ranges[1][2]
    for k = 1, math.min(#ranges - 1, 100) do
      missing[#missing + 1] = ranges[k][2] + 1
      missing[#missing + 1] = ranges[k + 1][1] - 1
    end
  end
  if duplicate_frame or #dups > 0 or through >= 0 then
    out[#out + 1] = {duplicate_frame and 1 or 0, dups, through, missing}
  else
    out[#out + 1] = 0  -- queued, nothing to report: the usual legacy frame
  end
end
if total > 0 then
  local blob = all
  if not whole then
    local records = {}
    for k = 1, #devices do
      for _, record in ipairs(lists[k] or records_of(firsts[k], sizes[k])) do
        records[#records + 1] = record
      end
    end
    blob = table.concat(records, '\\n')
  end
  redis.call('XADD', key, '*', 'n', total, 'd', table.concat(devices, '\\n'),
             'c', table.concat(counts, ','), 'r', blob)
  if length == 0 then redis.call('SET', KEYS[2], total) else redis.call('INCRBY', KEYS[2], total) end
end
return out
"""

#: Acknowledge stream entries and take their records off the backlog counter.
#:
#: KEYS[1] the stream, KEYS[2] its backlog counter; ARGV[1] the group, then pairs
#: (entry id, records it counts in the backlog: its ``n``, or 0 for an entry of
#: one record written before packing, which was never counted).  Only an entry
#: this call acknowledged counts, so acknowledging twice takes off once.  Allowed
#: when Redis is out of memory: acknowledging is what lets the worker free it.
ACK: Final = """#!lua flags=allow-oom
local taken = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then taken = taken + tonumber(ARGV[i + 1]) end
end
if taken > 0 then
  if redis.call('DECRBY', KEYS[2], taken) <= 0 then redis.call('DEL', KEYS[2]) end
end
return taken
"""

#: :data:`INGEST` for a call whose submissions all go without dedupe state (legacy
#: frames: the usual call of a legacy fleet), in stream mode: the same backlog check,
#: the same one entry and the same counter, and nothing per record or per submission,
#: so Redis parses four arguments and copies one string whatever the call holds.
#: KEYS[1] the stream, KEYS[2] its backlog counter; ARGV[1] max backlog, ARGV[2] the
#: record count, ARGV[3] the devices' runs, ARGV[4] the runs' lengths, ARGV[5] the
#: records, newline-joined (see :func:`fleetlog.queue.producer._group`).  Returns the
#: backlog (a number) when it is over the limit and nothing was written, else
#: ``{0, backlog}``: the group queued (as :data:`INGEST` answers the same call) and
#: the backlog with it, which tells the producer when it may :func:`plain_append`.
INGEST_PLAIN: Final = """
local length, backlog = redis.call('XLEN', KEYS[1]), 0
if length > 0 then backlog = math.max(length, tonumber(redis.call('GET', KEYS[2]) or '0') or 0) end
if backlog >= tonumber(ARGV[1]) then return backlog end
redis.call('XADD', KEYS[1], '*', 'n', ARGV[2], 'd', ARGV[3], 'c', ARGV[4], 'r', ARGV[5])
if length == 0 then redis.call('SET', KEYS[2], ARGV[2]) else redis.call('INCRBY', KEYS[2], ARGV[2]) end
return {0, backlog + tonumber(ARGV[2])}
"""


def plain_append(
    stream: ScriptArg, counter: ScriptArg, count: ScriptArg, devices: ScriptArg, counts: ScriptArg,
    records: ScriptArg,
) -> list[tuple[ScriptArg, ...]]:
    """:data:`INGEST_PLAIN`'s write without its backlog check, and without Lua: a transaction.

    For a call the producer knows is under the backlog limit (:class:`~fleetlog.
    queue.producer.Producer`: the backlog it last saw, plus what it has sent
    since, is below it), the check has nothing to refuse, and the script's set-up
    is most of what such a call costs Redis: ``MULTI``, ``XLEN``, the same
    ``XADD``, ``INCRBY`` of the counter, ``EXEC`` cost a legacy call of ~50 records
    a fifth less Redis CPU (``bench.redis_calls``).  ``EXEC`` answers
    ``[length before, entry id, counter after]``: the backlog the producer sees
    next is ``max(counter, length + 1)``, as the script counts it.  A stream that
    was empty must have had no counter (the script SETs it then);
    :data:`RESET_BACKLOG` puts right one that was left behind.  Under
    ``maxmemory`` Redis refuses the ``XADD`` as it is queued and ``EXEC`` runs
    nothing, so a refused call changes no state, as with the script.
    """
    return [
        ("MULTI",),
        ("XLEN", stream),
        ("XADD", stream, "*", "n", count, "d", devices, "c", counts, "r", records),
        ("INCRBY", counter, count),
        ("EXEC",),
    ]


#: KEYS[1] a stream, KEYS[2] its backlog counter; ARGV[1] the counter's value a
#: :func:`plain_append` to the empty stream read back, ARGV[2] the records it added.
#: Sets the counter to them, as :data:`INGEST_PLAIN` does when it writes to an empty
#: stream, if nothing has changed either since (one entry, the same count): a
#: counter whose stream was deleted under it would otherwise count records gone.
RESET_BACKLOG: Final = """
if redis.call('XLEN', KEYS[1]) == 1 and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

#: KEYS[1] device:links; ARGV[1] device, ARGV[2] link JSON, ARGV[3] this node,
#: ARGV[4] this connection, ARGV[5] control channel prefix, ARGV[6] '1' to take over,
#: ARGV[7] '1' for a move between two connections of this node.
#: Points the device at this connection; with take-over, tells the node of the
#: connection it replaces (if another node) to close that one: it publishes
#: ``{"op": "takeover", "device": <ARGV[1]>, "conn": <the old link's conn>}`` (keys in
#: any order) on that node's control channel, which the node reads with
#: :func:`fleetlog.control.parse_control` (the one message of :mod:`fleetlog.control`
#: built here, in Lua).  A move is made only while the link names this node (or
#: none): one that another node took since is newer than the move, and stays.
#: Returns 1 if it linked, 0 if a move found the link taken.
LINK: Final = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and ARGV[7] == '1' then
  local ok, link = pcall(cjson.decode, old)
  if ok and type(link) == 'table' and link['node'] and link['node'] ~= ARGV[3] then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if old and ARGV[6] == '1' then
  local ok, link = pcall(cjson.decode, old)
  if ok and type(link) == 'table' and link['node'] and link['node'] ~= ARGV[3]
     and link['conn'] ~= ARGV[4] then
    redis.call('PUBLISH', ARGV[5] .. link['node'],
               cjson.encode({op = 'takeover', device = ARGV[1], conn = link['conn']}))
  end
end
return 1
"""

#: KEYS[1] device:links; ARGV[1] device; ARGV[2] connection id.
#: Deletes the link only if it still names this connection (a newer one may own it).
UNLINK: Final = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current)['conn'] == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

#: KEYS[1] the list batches' counter; ARGV[1] the current time in µs.  The next batch
#: id.  A batch's records are stored as ``L<batch>-<index>``, and a store keeps a
#: qid once: a counter that Redis lost (no persistence, a restored snapshot,
#: FLUSHALL) must not start again at 1 and hand out ids already stored, or the new
#: records would be taken, acknowledged and never stored.  So a counter starts
#: at the time in µs, above every id it handed out before (that would take more
#: than a batch a µs), as a stream's entry ids start again at the time.
LIST_BATCH: Final = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  n = tonumber(ARGV[1])
  redis.call('SET', KEYS[1], ARGV[1])
end
return n
"""

#: KEYS[1] legacy list, KEYS[2] processing list; ARGV[1] how many more to move.
#: Moves up to ARGV[1] records, oldest first, from the legacy list onto a batch.
LIST_TAKE: Final = """
local moved = 0
for i = 1, tonumber(ARGV[1]) do
  if not redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') then break end
  moved = moved + 1
end
return moved
"""

#: KEYS[1] in-flight zset; ARGV[1] batch id, ARGV[2] score it was seen with, ARGV[3] now.
#: Claims a stale legacy batch only if nobody claimed it since it was seen.
LIST_CLAIM: Final = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""
