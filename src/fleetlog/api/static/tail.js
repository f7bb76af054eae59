// The live tail: Server-Sent Events read with fetch() (EventSource cannot send the token in a
// header), resumed after the last event received, with the server's `retry:`.
import { ApiError, Unauthorized, call, parseExact } from "./api.js";

// Parse what arrived so far: the complete events in `text`, and the rest (an unfinished event).
// The whole of the format: \n, \r\n or \r line ends, several `data:` lines joined with \n,
// comments (`:`), `id:`, `event:`, `retry:`, one optional space after the colon.
export function parseEvents(text) {
  const events = [];
  let start = 0;       // where the next line begins
  let eventStart = 0;  // where the unfinished event begins: the rest, parsed again next time
  let event = { id: null, event: "message", data: [], retry: null };
  const lineEnd = /\r\n|\r|\n/g;
  let match;
  while ((match = lineEnd.exec(text)) !== null) {
    if (match[0] === "\r" && match.index === text.length - 1) break;  // maybe the first half of \r\n
    const line = text.slice(start, match.index);
    start = lineEnd.lastIndex;
    if (line === "") {  // a blank line ends the event
      if (event.data.length || event.retry !== null || event.id !== null) {
        events.push({ ...event, data: event.data.length ? event.data.join("\n") : null });
      }
      event = { id: null, event: "message", data: [], retry: null };
      eventStart = start;
      continue;
    }
    if (line.startsWith(":")) continue;  // a comment (the keepalive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") event.data.push(value);
    else if (field === "id") event.id = value;
    else if (field === "event") event.event = value;
    else if (field === "retry" && /^\d+$/.test(value)) event.retry = Number(value);
  }
  return { events, rest: text.slice(eventStart) };
}

// Follow `/api/stream` with `params` from `lastId` (none: from now).  onRecord(record) for each
// record, onState("live" | "reconnecting" | "stopped: why").  Returns stop().
export function follow(params, lastId, { onRecord, onState }) {
  const controller = new AbortController();
  let last = lastId;
  let wait = 2000;
  const run = async () => {
    for (let attempt = 0; !controller.signal.aborted && attempt < 1000; attempt++) {
      try {
        const headers = last ? { "Last-Event-ID": last } : {};
        const answer = await call("/api/stream", params, { headers, signal: controller.signal });
        if (!answer.ok) {
          const body = await answer.json().catch(() => null);
          throw new ApiError(answer.status, body && body.detail);
        }
        onState("live");
        const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const { events, rest } = parseEvents(buffer + value);
          buffer = rest;
          for (const e of events) {
            if (e.retry !== null) wait = e.retry;
            if (e.id) last = e.id;
            if (e.event === "record" && e.data) onRecord(parseExact(e.data), e.id);
          }
        }
      } catch (e) {
        if (controller.signal.aborted || e instanceof Unauthorized) return;
        // A request the server will refuse again as it is (a malformed Last-Event-ID, a bad
        // filter) is not retried: said once, not every 2 s for ever.
        if (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 429) {
          onState(`stopped: ${e.message}`);
          return;
        }
      }
      onState("reconnecting");
      await new Promise((r) => setTimeout(r, wait));
    }
  };
  run();
  return () => controller.abort();
}
