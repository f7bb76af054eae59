"""Lua run inside Redis, where several commands must happen as one.

Each script is atomic, so a batch is either wholly queued or not at all, and a
backlog check cannot race the write it guards.
"""

from __future__ import annotations

from typing import Final

#: KEYS[1] stream; ARGV[1] max backlog; ARGV[2..] device, record, device, record...
#: Returns the new entry ids, or the backlog (a number) when it is over the limit.
STREAM_INGEST: Final = """
local backlog = redis.call('XLEN', KEYS[1])
if backlog >= tonumber(ARGV[1]) then return backlog end
local ids = {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'd', ARGV[i], 'r', ARGV[i + 1])
end
return ids
"""

#: The original design's write: LPUSH of the record's JSON onto device:log:list.
LIST_INGEST: Final = """
local backlog = redis.call('LLEN', KEYS[1])
if backlog >= tonumber(ARGV[1]) then return backlog end
for i = 2, #ARGV, 2 do
  redis.call('LPUSH', KEYS[1], ARGV[i + 1])
end
return {}
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
