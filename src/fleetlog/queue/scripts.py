"""Lua run inside Redis, where several commands must happen as one.

Each script is atomic, so a batch is either wholly queued or not at all, and a
backlog check cannot race the write it guards.
"""

from __future__ import annotations

from typing import Final

#: Queue submissions atomically: the backlog check, v2 frame-id dedupe, per-device
#: seq bookkeeping and the writes themselves happen as one step.
#:
#: KEYS[1] the stream (or the legacy list); ARGV[1] max backlog, ARGV[2] frame-id
#: dedupe window (s), ARGV[3] 'stream' or 'list'; then per submission: frame key
#: (or ''), device id, seq state key (or ''), seq-above key (or ''), record count n,
#: and n pairs of (seq or '', record JSON).  List mode LPUSHes the record JSON,
#: exactly the original design's write.
#:
#: Returns the backlog (a number) when it is over the limit and nothing was
#: written; else per submission {duplicate_frame 0/1, {duplicate seqs},
#: stored_through or -1, {missing ranges flattened: from, to, from, to...}}.
#: Seqs travel as canonical decimal strings (< 2^53, exact in Lua's doubles);
#: '%.0f' writes them back in the same form.
INGEST: Final = """
local key, mode = KEYS[1], ARGV[3]
local backlog
if mode == 'list' then backlog = redis.call('LLEN', key) else backlog = redis.call('XLEN', key) end
if backlog >= tonumber(ARGV[1]) then return backlog end
local ttl = ARGV[2]
local out = {}
local i = 4
while i <= #ARGV do
  local frame_key, device, state_key, above_key = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local n = tonumber(ARGV[i + 4])
  i = i + 5
  local duplicate_frame = frame_key ~= '' and redis.call('EXISTS', frame_key) == 1
  local through, above = nil, 0
  if state_key ~= '' then
    local raw = redis.call('HGET', state_key, 'through')
    if raw then through = tonumber(raw) end
    above = redis.call('ZCARD', above_key)
  end
  local dups = {}
  if duplicate_frame then
    i = i + 2 * n
  else
    for _ = 1, n do
      local seq, record = ARGV[i], ARGV[i + 1]
      i = i + 2
      local keep = true
      if seq ~= '' then
        local s = tonumber(seq)
        if through == nil then through = s - 1 end
        if s <= through or (above > 0 and redis.call('ZSCORE', above_key, seq)) then
          dups[#dups + 1] = s
          keep = false
        elseif s == through + 1 then
          through = s
          while above > 0 do
            local next_seq = string.format('%.0f', through + 1)
            if not redis.call('ZSCORE', above_key, next_seq) then break end
            redis.call('ZREM', above_key, next_seq)
            above = above - 1
            through = through + 1
          end
        else
          redis.call('ZADD', above_key, s, seq)
          above = above + 1
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
    if frame_key ~= '' then redis.call('SET', frame_key, '1', 'EX', ttl) end
    if through ~= nil then redis.call('HSET', state_key, 'through', string.format('%.0f', through)) end
  end
  local missing = {}
  if through ~= nil and above > 0 then
    local previous = through
    for _, member in ipairs(redis.call('ZRANGE', above_key, 0, 99)) do
      local value = tonumber(member)
      if value > previous + 1 then
        missing[#missing + 1] = previous + 1
        missing[#missing + 1] = value - 1
      end
      previous = value
    end
  end
  out[#out + 1] = {duplicate_frame and 1 or 0, dups, through or -1, missing}
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
