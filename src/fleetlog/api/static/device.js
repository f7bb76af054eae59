// One device: its chart, records (search, level, range), live tail, export, and commands.
import { Unauthorized, call, json, parseExact, send } from "./api.js";
import { chart } from "./chart.js";
import { ago, colourJson, el, levelSelect, stamp, visible } from "./dom.js";
import { PAGE, Pager, recordRow } from "./records.js";
import { follow } from "./tail.js";

export async function devicePage(main, crumbs, life, deviceId) {
  crumbs.replaceChildren(el("a", { href: "#/", text: "Fleet" }), document.createTextNode(" / "),
                         el("span", { class: "device-id", title: visible(deviceId), text: visible(deviceId) }));
  // A browser resolves "." and ".." (escaped or not) in a path: "/api/devices/../logs" was
  // "/api/logs", the whole fleet shown as device "..". Its records go by query string, and a
  // command, which has only a path, is refused for such an id (fleetlog send reaches it).
  const dotSegment = /^\.{1,2}$/.test(deviceId);
  const path = `/api/devices/${encodeURIComponent(deviceId)}`;
  const q = el("input", { type: "search", name: "q", placeholder: "Search this device  [/]", "aria-label": "search" });
  const level = levelSelect();
  const since = el("input", { type: "text", name: "since", placeholder: "since (1h, ISO)", size: 12, "aria-label": "since" });
  const until = el("input", { type: "text", name: "until", placeholder: "until", size: 12, "aria-label": "until" });
  const tailButton = el("button", { type: "button", id: "tail", "aria-pressed": "false", text: "Live tail: off" });
  const newRows = el("button", { id: "new-rows", type: "button", hidden: true });
  const list = el("div", { class: "rows", id: "records" });
  const chartBox = el("div", {});
  const status = el("span", { class: "muted", id: "tail-state" });
  const exportBox = el("span", {}, el("button", { type: "button", text: "Export NDJSON", onclick: () => download("ndjson") }),
                       " ", el("button", { type: "button", text: "Export CSV", onclick: () => download("csv") }));
  const body = el("textarea", { name: "command", "aria-label": "command JSON", text: '{"cmd": "status"}' });
  const wait = el("input", { type: "number", name: "wait", min: 0, max: 60, value: 0, size: 3, "aria-label": "wait seconds" });
  const result = el("div", { id: "command-result" });
  const info = el("p", { class: "muted" });
  main.replaceChildren(
    info,
    el("h3", { text: "Records, last 24 h (click a bar to zoom)" }), chartBox,
    el("form", { class: "filters", id: "filters", onsubmit: (e) => { e.preventDefault(); load(); } },
       q, level, since, until, el("button", { type: "submit", text: "Apply" }), tailButton, status, exportBox),
    newRows, list,
    el("details", {}, el("summary", { text: "Send a command" }),
       el("form", { id: "command", onsubmit: (e) => { e.preventDefault(); command(); } }, body,
          el("label", {}, "wait for the result (s) ", wait), " ", el("button", { type: "submit", text: "Send" })),
       result));

  const filters = () => ({ q: q.value, level: level.value, since: since.value, until: until.value });
  // The tail starts where the first page was read (its tail_from: the store's position taken
  // before the read), once that page is in, and skips the records it shows; turned off and on,
  // it resumes after the last record it brought; the older pages skip what it brought (a record
  // a slower worker committed late is older than the page's newest).  (From the page's newest
  // cursor it could miss that record; started before the new page came, it showed records twice.)
  const tailed = new Set();
  const pager = new Pager(list, { skip: (r) => tailed.has(r.cursor) });
  let resume = null, shown = new Set(), wanted = false, loading = false, held = [], stopTail = null;
  const endTail = () => { if (stopTail) { stopTail(); stopTail = null; } };
  life.onStop(() => { pager.stop(); endTail(); });
  const load = () => {
    endTail();
    loading = true;
    held = [];
    tailed.clear();
    newRows.hidden = true;
    pager.start((cursor) => json("/api/logs", { device: deviceId, ...filters(), cursor, limit: PAGE }),
                (page) => {
                  loading = false;
                  resume = page.tail_from ?? (page.records.length ? page.records[0].cursor : null);
                  shown = new Set(page.records.map((r) => r.cursor));
                  if (wanted) tail(true);
                },
                () => {  // no first page (the store busy, a bad range): the tail goes on from where it was
                  loading = false;
                  if (wanted) tail(true);
                });
  };
  // New rows go on top; while the user has scrolled away from the top they wait, counted.
  const showHeld = () => {
    for (const r of held) list.prepend(recordRow(r, { fresh: true }));
    held = [];
    newRows.hidden = true;
  };
  newRows.addEventListener("click", () => { showHeld(); window.scrollTo({ top: 0 }); });
  life.listen(window, "scroll", () => { if (window.scrollY < 40 && held.length) showHeld(); });
  const tail = (on) => {
    wanted = on;
    tailButton.textContent = on ? "Live tail: on" : "Live tail: off";
    tailButton.classList.toggle("tail-on", on);
    tailButton.setAttribute("aria-pressed", String(on));
    endTail();
    status.textContent = "";
    if (!on) return;
    if (loading) { status.textContent = "starting"; return; }  // the first page starts it
    const { q: text, level: lvl } = filters();
    stopTail = follow({ device: deviceId, q: text, level: lvl }, resume, {
      onRecord: (record, id) => {
        if (id) resume = id;
        if (shown.delete(record.cursor)) return;  // the first page has it already
        tailed.add(record.cursor);
        if (window.scrollY < 40) list.prepend(recordRow(record, { fresh: true }));
        else { held.push(record); newRows.hidden = false; newRows.textContent = `${held.length} new record(s) ↑`; }
      },
      onState: (state) => { status.textContent = state; },
    });
  };
  tailButton.addEventListener("click", () => tail(!wanted));
  const download = async (format) => {
    const answer = await call("/api/export", { device: deviceId, ...filters(), format });
    const blob = await answer.blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: `${deviceId.replace(/[^\w.-]/g, "_")}.${format}` });
    document.body.append(link);
    link.click();
    link.remove();
  };
  const command = async () => {
    result.replaceChildren(el("p", { class: "muted", text: "Sending…" }));
    if (dotSegment) {
      result.replaceChildren(el("p", { class: "error", text: "A browser cannot address a device named \".\" or \"..\": use fleetlog send." }));
      return;
    }
    let parsed;
    // parseExact: an integer past 2^53 goes as typed, not rounded.
    try { parsed = parseExact(body.value); } catch (e) { result.replaceChildren(el("p", { class: "error", text: `Not JSON: ${e.message}` })); return; }
    try {
      result.replaceChildren(colourJson(await send("POST", `${path}/commands`, parsed, { wait: wait.value })));
    } catch (e) { if (!(e instanceof Unauthorized)) result.replaceChildren(el("p", { class: "error", text: e.message })); }
  };
  load();
  const [volume, devices] = await Promise.all([
    json("/api/stats/volume", { device: deviceId, since: "24h", step: "hour" }),
    json("/api/devices", { prefix: deviceId })]);
  chartBox.replaceChildren(chart(volume, (from, to) => { since.value = from; until.value = to; load(); }));
  const d = devices.devices.find((x) => x.device_id === deviceId);
  if (d) {
    info.replaceChildren(el("span", { class: `dot${d.online ? " on" : ""}` }),
      document.createTextNode(`${d.online ? `online on ${visible(d.node)} since ${stamp(d.connected_since)}` : "offline"} · `
        + `${d.records} records · last seen ${ago(d.last_seen)} · last error ${d.last_error ? ago(d.last_error) : "never"}`));
  }
}
