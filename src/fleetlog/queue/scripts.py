"""Lua run inside Redis, where several commands must happen as one.

Each script is atomic, so a batch is either wholly queued or not at all, and a
backlog check cannot race the write it guards.
"""

from __future__ import annotations

from typing import Final

#: Frame ids remembered per device: twice what one connection may have in flight
#: (the gateway's 256), so a device whose connection died with every frame
#: unanswered can resend them all and have each stored once.  ~90 B each at most.
MAX_FRAMES: Final = 512

#: Sessions remembered per device (least recently used forgotten first), and
#: ranges of stored seqs per session (lowest forgotten first).  Forgetting only
#: ever makes a resend be stored again, never makes a record look stored.
MAX_SESSIONS: Final = 8
MAX_RANGES: Final = 64

#: Queue submissions atomically: the backlog check, v2 frame-id dedupe, per-device
#: seq bookkeeping and the writes themselves happen as one step.
#:
#: KEYS[1] the stream (or the legacy list), then every per-device key the call
#: touches, each once: the script touches no key it was not given, so on a Redis
#: Cluster one call is one slot (a shard's keys share its hash tag).  ARGV[1] max
#: backlog, ARGV[2] dedupe window (ms), ARGV[3] 'stream' or 'list', ARGV[4..6]
#: MAX_FRAMES, MAX_SESSIONS, MAX_RANGES; then per submission: the index in KEYS
#: of its recent-frames key (0: none), frame id, device id, the index of its
#: stored-seqs key (0: none), session, record count n, and n pairs of (seq or
#: '', record JSON).  List mode LPUSHes the record JSON, exactly the original
#: design's write.
#:
#: Dedupe state records only what was stored: a seq is a duplicate only if it is
#: in a range of seqs this session stored, a frame id only if that frame was
#: queued.  A refused call (backlog over its limit) returns before any write, and
#: under maxmemory Redis refuses the call's first write (always an XADD, LPUSH,
#: ZADD, or a duplicate frame's PEXPIRE), so a refused frame changes no state and
#: its resend is stored.
#:
#: Returns the backlog (a number) when it is over the limit and nothing was
#: written; else per submission 0 (queued, no seqs tracked) or {duplicate_frame 0/1,
#: {duplicate seqs}, stored_through or -1, {missing ranges flattened: from, to, ...}}, where
#: stored_through ends the session's lowest stored range and missing are the gaps
#: above it.  Seqs travel as canonical decimal strings (< 2^53, exact in Lua's
#: doubles); '%.0f' writes them back in the same form.
INGEST: Final = """
local key, mode = KEYS[1], ARGV[3]
local backlog
if mode == 'list' then backlog = redis.call('LLEN', key) else backlog = redis.call('XLEN', key) end
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
-- Adds s; false if it was there already.
local function add(ranges, s)
  local last = ranges[#ranges]
  if last and s == last[2] + 1 then  -- the usual case: the next seq after the highest stored
    last[2] = s
    return true
  end
  local lo, hi = 1, #ranges
  while lo <= hi do  -- the first range ending at or above s
    local mid = math.floor((lo + hi) / 2)
    if ranges[mid][2] < s then lo = mid + 1 else hi = mid - 1 end
  end
  local after, before = ranges[lo], ranges[lo - 1]
  if after and after[1] <= s then return false end
  local join_before = before ~= nil and before[2] == s - 1
  local join_after = after ~= nil and after[1] == s + 1
  if join_before and join_after then
    before[2] = after[2]
    table.remove(ranges, lo)
  elseif join_before then
    before[2] = s
  elseif join_after then
    after[1] = s
  else
    table.insert(ranges, lo, {s, s})
  end
  return true
end

local out = {}
local i = 7
while i <= #ARGV do
  local frames_at, frame_id, device = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2]
  local seqs_at, session = tonumber(ARGV[i + 3]), ARGV[i + 4]
  local frames_key, seqs_key = '', ''
  if frames_at > 0 then frames_key = KEYS[frames_at] end
  if seqs_at > 0 then seqs_key = KEYS[seqs_at] end
  local n = tonumber(ARGV[i + 5])
  i = i + 6
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
    i = i + 2 * n
    -- A write, so the WAIT after this call covers the first copy of the frame too:
    -- WAIT waits for the offset of this connection's last write, and a call that
    -- wrote nothing would be acked on an older one (the first copy may be on the
    -- master only: it was answered unconfirmed, and lost if the master fails now).
    redis.call('PEXPIRE', frames_key, window)
  else
    local changed = false
    for _ = 1, n do
      local seq, record = ARGV[i], ARGV[i + 1]
      i = i + 2
      local keep = true
      if seq ~= '' and ranges then
        if add(ranges, tonumber(seq)) then changed = true else
          dups[#dups + 1] = tonumber(seq)
          keep = false
        end
      end
      if keep then
        if mode == 'list' then
          redis.call('LPUSH', key, record)
        else
          redis.call('XADD', key, '*', 'd', device, 'r', record)
        end
      end
    end
    if frames_key ~= '' then
      local t = clock()
      redis.call('ZADD', frames_key, t, frame_id)
      redis.call('ZREMRANGEBYSCORE', frames_key, '-inf', t - window)
      if redis.call('ZCARD', frames_key) > max_frames then
        redis.call('ZREMRANGEBYRANK', frames_key, 0, -(max_frames + 1))
      end
      redis.call('PEXPIRE', frames_key, window)
    end
    if changed then
      while #ranges > max_ranges do table.remove(ranges, 1) end
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
return out
"""

#: KEYS[1] device:links; ARGV[1] device, ARGV[2] link JSON, ARGV[3] this node,
#: ARGV[4] this connection, ARGV[5] control channel prefix, ARGV[6] '1' to take over.
#: Points the device at this connection; with take-over, tells the node of the
#: connection it replaces (if another node) to close that one.
LINK: Final = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
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
