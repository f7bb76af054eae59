"""Alerts: tell people when a device logs something that matters, or goes quiet.

One model (:mod:`.rules`) for the CLI (``fleetlog alert ...``), the HTTP API
(``/api/alerts``) and the console; one process (``fleetlog alerter``, run by
``fleetlog up``) that evaluates every rule and delivers the notifications.

* :mod:`.rules`: what a rule is: a CEL condition over a record, or a presence
  or queue condition; a device selector; a threshold and a window; where to
  send.  Validation (a bad expression is refused with its position) lives here.
* :mod:`.engine`: evaluation without I/O: records and facts in, changes out
  (firings opened and resolved, notifications due), deterministic ids.
* :mod:`.book`: everything kept in Redis under ``fleetlog:{alerts}:``: the rules,
  the evaluation state, the cursor, the firings and their history, the outbox.
  Each evaluation step commits in one Lua script, fenced by the alerter's lease.
* :mod:`.watch`: presence (``device:links``, node heartbeats), refusal counters
  and queue numbers, read from Redis.
* :mod:`.delivery`: the webhook (JSON body, HMAC-SHA256 signature) and Apprise.
* :mod:`.alerter`: the process: lease, follow the store, evaluate, commit, deliver.
"""
