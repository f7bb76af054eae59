// fleetlog console: one ES module, no build step, no dependencies.
// The token lives in sessionStorage and goes in the Authorization header of every call
// (the live tail too: fetch() + ReadableStream, since EventSource cannot set headers).
// Record text is always put in the page with textContent, never as HTML.

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");
const PAGE = 100;
const LEVELS = ["trace", "debug", "info", "warn", "error", "fatal"];

// -- token and API -----------------------------------------------------------------

const token = {
  get: () => sessionStorage.getItem("fleetlog-token"),
  set: (value) => sessionStorage.setItem("fleetlog-token", value),
  clear: () => sessionStorage.removeItem("fleetlog-token"),
};

class Unauthorized extends Error {}

async function api(path, params = {}, options = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  const answer = await fetch(url, {
    ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${token.get()}` },
  });
  if (answer.status === 401) { askToken("The token was refused; paste another."); throw new Unauthorized(); }
  return answer;
}

async function json(path, params, options) {
  const answer = await api(path, params, options);
  const body = await answer.json();
  if (!answer.ok) throw new Error(typeof body.detail === "string" ? body.detail
    : (body.detail || []).map((d) => d.msg).join("; ") || answer.statusText);
  return body;
}

function askToken(message = "") {
  $("#login-error").textContent = message;
  const dialog = $("#login");
  if (!dialog.open) dialog.showModal();
  $("#token").focus();
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  token.set($("#token").value.trim());
  const answer = await fetch("/api/overview", { headers: { Authorization: `Bearer ${token.get()}` } });
  if (!answer.ok) { $("#login-error").textContent = `Refused (${answer.status}).`; return; }
  $("#token").value = "";
  $("#login").close();
  $("#logout").hidden = false;
  route();
});
$("#logout").addEventListener("click", () => { token.clear(); stopTail(); main.replaceChildren(); askToken(); });

// -- small DOM helpers ---------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const ago = (iso) => {
  if (!iso) return "never";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
};
const stamp = (iso) => (iso ? iso.replace("T", " ").replace("Z", "") : "");
const deviceHash = (id) => `#/device/${encodeURIComponent(id)}`;

// A JSON value as coloured text nodes (keys, strings, numbers, literals).
function colourJson(value, indent = "") {
  const out = [];
  const span = (cls, text) => el("span", { class: cls, text });
  const walk = (v, pad) => {
    if (v === null || typeof v === "boolean") out.push(span("b", String(v)));
    else if (typeof v === "number") out.push(span("n", String(v)));
    else if (typeof v === "string") out.push(span("s", JSON.stringify(v)));
    else if (Array.isArray(v)) {
      if (!v.length) { out.push("[]"); return; }
      out.push("[\n");
      v.forEach((item, i) => { out.push(pad + "  "); walk(item, pad + "  "); out.push(i < v.length - 1 ? ",\n" : "\n"); });
      out.push(pad + "]");
    } else {
      const keys = Object.keys(v);
      if (!keys.length) { out.push("{}"); return; }
      out.push("{\n");
      keys.forEach((k, i) => {
        out.push(pad + "  ", span("k", JSON.stringify(k)), ": ");
        walk(v[k], pad + "  ");
        out.push(i < keys.length - 1 ? ",\n" : "\n");
      });
      out.push(pad + "}");
    }
  };
  walk(value, indent);
  return el("pre", { class: "json" }, ...out);
}

// -- volume chart (plain SVG) --------------------------------------------------

function chart(volume, onPick) {
  const ns = "http://www.w3.org/2000/svg";
  const stepMs = volume.step_seconds * 1000;
  const start = Date.parse(volume.since);
  const count = Math.max(1, Math.ceil((Date.parse(volume.until) - start) / stepMs));
  const totals = new Array(count).fill(0);
  const errors = new Array(count).fill(0);
  for (const b of volume.buckets) {
    const i = Math.floor((Date.parse(b.start) - start) / stepMs);
    if (i < 0 || i >= count) continue;
    totals[i] += b.records;
    if (b.level === "error" || b.level === "fatal") errors[i] += b.records;
  }
  const max = Math.max(1, ...totals);
  const width = 600, height = 140, bottom = 16, w = width / count;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `records per ${volume.step_seconds / 60} min, max ${max}`);
  totals.forEach((total, i) => {
    const from = new Date(start + i * stepMs), to = new Date(start + (i + 1) * stepMs);
    const g = document.createElementNS(ns, "g");
    g.setAttribute("class", errors[i] ? "bar err" : "bar");
    g.setAttribute("tabindex", "0");
    const title = document.createElementNS(ns, "title");
    title.textContent = `${stamp(from.toISOString())}: ${total} records, ${errors[i]} errors`;
    const h = ((height - bottom) * total) / max;
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("class", "v");
    Object.entries({ x: i * w + 0.5, y: height - bottom - h, width: Math.max(1, w - 1), height: Math.max(h, total ? 1 : 0) })
      .forEach(([k, v]) => rect.setAttribute(k, v));
    const hit = document.createElementNS(ns, "rect");  // the whole column is clickable
    hit.setAttribute("class", "hit");
    Object.entries({ x: i * w, y: 0, width: w, height: height - bottom })
      .forEach(([k, v]) => hit.setAttribute(k, v));
    g.append(title, hit, rect);
    const pick = () => onPick && onPick(from.toISOString(), to.toISOString());
    g.addEventListener("click", pick);
    g.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); pick(); } });
    svg.append(g);
  });
  for (const i of [0, Math.floor(count / 2), count - 1]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("class", "axis");
    label.setAttribute("x", Math.min(i * w, width - 60));
    label.setAttribute("y", height - 3);
    label.textContent = new Date(start + i * stepMs).toISOString().slice(5, 16).replace("T", " ");
    svg.append(label);
  }
  return el("div", { class: "chart" }, svg);
}

// -- record rows ---------------------------------------------------------------

function recordRow(record, { showDevice = false, fresh = false } = {}) {
  const level = record.level || "-";
  const text = record.message ?? JSON.stringify(record.data);
  const row = el("div", { class: `row${fresh ? " fresh" : ""}`, tabindex: "0", role: "button",
                          "data-seq": record.seq, "aria-expanded": "false" },
    el("span", { class: "t", text: stamp(record.received_at) }),
    el("span", { class: `lvl-${level}`, text: level.toUpperCase() }),
    el("span", { class: "m" }, showDevice ? el("a", { class: "dev", href: deviceHash(record.device_id), text: record.device_id }) : null,
       document.createTextNode(text)));
  const toggle = () => {
    const open = row.nextElementSibling && row.nextElementSibling.classList.contains("json");
    if (open) { row.nextElementSibling.remove(); row.setAttribute("aria-expanded", "false"); return; }
    row.after(colourJson(record));
    row.setAttribute("aria-expanded", "true");
  };
  row.addEventListener("click", (e) => { if (e.target.tagName !== "A") toggle(); });
  row.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(); } });
  return row;
}

// Infinite scroll: pages of `fetchPage(cursor)` appended to `list` while the sentinel shows.
function pager(list, fetchPage, { showDevice = false, onFirst } = {}) {
  let cursor = null, done = false, busy = false, first = true;
  const sentinel = el("p", { class: "muted", text: "Loading…" });
  const more = async () => {
    if (busy || done) return;
    busy = true;
    try {
      const page = await fetchPage(cursor);
      if (first && onFirst) onFirst(page);
      first = false;
      list.append(...page.records.map((r) => recordRow(r, { showDevice })));
      cursor = page.next_cursor;
      done = !cursor;
      sentinel.textContent = done ? (list.children.length ? "No older records." : "No records.") : "Loading…";
    } catch (e) {
      if (!(e instanceof Unauthorized)) sentinel.textContent = `Error: ${e.message}`;
      done = true;
    } finally { busy = false; }
  };
  const observer = new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) more(); });
  observer.observe(sentinel);
  return { sentinel, more, stop: () => observer.disconnect() };
}

// -- live tail (SSE read with fetch) -------------------------------------------

let tail = null;
function stopTail() { if (tail) { tail.abort(); tail = null; } }

async function startTail(params, lastId, onRecord, onState) {
  stopTail();
  const controller = new AbortController();
  tail = controller;
  let last = lastId;
  for (let attempt = 0; !controller.signal.aborted && attempt < 1000; attempt++) {
    try {
      const headers = last ? { "Last-Event-ID": last } : {};
      const answer = await api("/api/stream", params, { headers, signal: controller.signal });
      if (!answer.ok) throw new Error(`stream: ${answer.status}`);
      onState("live");
      const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let id = null, data = null;
          for (const line of block.split("\n")) {
            if (line.startsWith("id: ")) id = line.slice(4);
            else if (line.startsWith("data: ")) data = line.slice(6);
          }
          if (data) { last = id || last; onRecord(JSON.parse(data)); }
        }
      }
    } catch (e) {
      if (controller.signal.aborted || e instanceof Unauthorized) return;
    }
    onState("reconnecting");
    await new Promise((r) => setTimeout(r, 2000));  // then resume after the last event
  }
}

// -- pages -----------------------------------------------------------------------

async function fleetPage() {
  $("#crumbs").replaceChildren(el("span", { text: "Fleet" }));
  const totals = el("div", { class: "totals" });
  const search = el("input", { type: "search", name: "q", placeholder: "Search every device (plain text)  [/]",
                               "aria-label": "fleet search" });
  const level = levelSelect();
  const results = el("div", { class: "rows", id: "fleet-results" });
  const devices = el("tbody");
  const chartBox = el("div", { class: "chart-box" });
  main.replaceChildren(
    totals, el("h3", { text: "Records, last 24 h" }), chartBox,
    el("form", { class: "filters", id: "fleet-search", onsubmit: (e) => { e.preventDefault(); runSearch(); } },
       search, level, el("button", { type: "submit", text: "Search" })),
    results,
    el("h3", { text: "Devices" }),
    el("div", { class: "scroll-x" }, el("table", {}, el("thead", {}, el("tr", {},
      el("th", { text: "Device" }), el("th", { text: "Last seen" }), el("th", { text: "Last error", class: "hide-narrow" }),
      el("th", { text: "Records" }), el("th", { text: "Node", class: "hide-narrow" }))), devices)));
  let searchPager = null;
  const runSearch = () => {
    if (searchPager) searchPager.stop();
    results.replaceChildren();
    if (!search.value && !level.value) return;
    searchPager = pager(results, (cursor) => json("/api/logs", { q: search.value, level: level.value, cursor, limit: PAGE }),
                        { showDevice: true });
    results.after(searchPager.sentinel);
  };
  const update = async () => {
    const [overview, list, volume] = await Promise.all([
      json("/api/overview"), json("/api/devices", { sort: "device_id" }),
      json("/api/stats/volume", { since: "24h", step: "hour" })]);
    const total = (n, label) => el("div", { class: "total" }, el("b", { text: n ?? "?" }), el("span", { text: label }));
    totals.replaceChildren(total(overview.devices, "devices"), total(overview.online, "online"),
      total(overview.records, "records"), total(overview.backlog, "queue backlog"),
      total(overview.dead_letters, "dead letters"));
    if (overview.warning) totals.append(el("p", { class: "error", text: overview.warning }));
    chartBox.replaceChildren(chart(volume, (since, until) => {
      results.replaceChildren();
      if (searchPager) searchPager.stop();
      searchPager = pager(results, (cursor) => json("/api/logs", { q: search.value, level: level.value, since, until, cursor, limit: PAGE }),
                          { showDevice: true });
      results.after(searchPager.sentinel);
    }));
    devices.replaceChildren(...list.devices.map((d) => el("tr", { "data-device": d.device_id },
      el("td", {}, el("span", { class: `dot${d.online ? " on" : ""}`, title: d.online ? "online" : "offline" }),
         el("a", { href: deviceHash(d.device_id), text: d.device_id })),
      el("td", { text: ago(d.last_seen), title: d.last_seen || "" }),
      el("td", { text: d.last_error ? ago(d.last_error) : "-", title: d.last_error || "", class: "hide-narrow" }),
      el("td", { text: d.records }),
      el("td", { text: d.node || "", class: "hide-narrow" }))));
    if (!list.devices.length) devices.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No devices yet." })));
  };
  await update();
  // Online dots, totals and the chart follow the fleet while the page is open.
  refresh = setInterval(() => update().catch(() => {}), 5000);
}

function levelSelect(value = "") {
  return el("select", { name: "level", "aria-label": "level" }, el("option", { value: "", text: "any level" }),
    ...LEVELS.map((l) => el("option", { value: l, text: `${l}+`, selected: l === value })));
}

let refresh = null;

async function devicePage(deviceId) {
  $("#crumbs").replaceChildren(el("a", { href: "#/", text: "Fleet" }), document.createTextNode(" / "),
                               el("span", { text: deviceId }));
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
       el("form", { id: "command", onsubmit: (e) => { e.preventDefault(); send(); } }, body,
          el("label", {}, "wait for the result (s) ", wait), " ", el("button", { type: "submit", text: "Send" })),
       result));

  const filters = () => ({ q: q.value, level: level.value, since: since.value, until: until.value });
  let current = null, newest = null, held = [];
  const load = () => {
    if (current) current.stop();
    list.replaceChildren();
    current = pager(list, (cursor) => json(`/api/devices/${encodeURIComponent(deviceId)}/logs`, { ...filters(), cursor, limit: PAGE }),
                    { onFirst: (page) => { newest = page.records.length ? page.records[0].cursor : null; } });
    list.after(current.sentinel);
    if (tail) toggleTail(true);
  };
  // New rows go on top; while the user has scrolled away from the top they wait, counted.
  const showHeld = () => {
    for (const r of held) list.prepend(recordRow(r, { fresh: true }));
    held = [];
    newRows.hidden = true;
  };
  newRows.addEventListener("click", () => { showHeld(); window.scrollTo({ top: 0 }); });
  window.onscroll = () => { if (window.scrollY < 40 && held.length) showHeld(); };
  const toggleTail = async (on) => {
    tailButton.textContent = on ? "Live tail: on" : "Live tail: off";
    tailButton.classList.toggle("tail-on", on);
    tailButton.setAttribute("aria-pressed", String(on));
    if (!on) { stopTail(); status.textContent = ""; return; }
    const { q: text, level: lvl } = filters();
    startTail({ device: deviceId, q: text, level: lvl }, newest, (record) => {
      if (window.scrollY < 40) list.prepend(recordRow(record, { fresh: true }));
      else { held.push(record); newRows.hidden = false; newRows.textContent = `${held.length} new record(s) ↑`; }
    }, (state) => { status.textContent = state; });
  };
  tailButton.addEventListener("click", () => toggleTail(!tail));
  const download = async (format) => {
    const answer = await api("/api/export", { device: deviceId, ...filters(), format });
    const blob = await answer.blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: `${deviceId.replace(/[^\w.-]/g, "_")}.${format}` });
    document.body.append(link);
    link.click();
    link.remove();
  };
  const send = async () => {
    result.replaceChildren(el("p", { class: "muted", text: "Sending…" }));
    let parsed;
    try { parsed = JSON.parse(body.value); } catch (e) { result.replaceChildren(el("p", { class: "error", text: `Not JSON: ${e.message}` })); return; }
    try {
      const outcome = await json(`/api/devices/${encodeURIComponent(deviceId)}/commands`, { wait: wait.value },
        { method: "POST", body: JSON.stringify(parsed), headers: { "Content-Type": "application/json" } });
      result.replaceChildren(colourJson(outcome));
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
      document.createTextNode(`${d.online ? `online on ${d.node} since ${stamp(d.connected_since)}` : "offline"} · `
        + `${d.records} records · last seen ${ago(d.last_seen)} · last error ${d.last_error ? ago(d.last_error) : "never"}`));
  }
}

// -- routing and keys -----------------------------------------------------------

async function route() {
  clearInterval(refresh);
  stopTail();
  window.onscroll = null;
  if (!token.get()) { askToken(); return; }
  $("#logout").hidden = false;
  const hash = location.hash || "#/";
  try {
    if (hash.startsWith("#/device/")) await devicePage(decodeURIComponent(hash.slice(9)));
    else await fleetPage();
  } catch (e) {
    if (!(e instanceof Unauthorized)) main.append(el("p", { class: "error", text: e.message }));
  }
}

document.addEventListener("keydown", (e) => {
  if (e.key === "/" && !["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName)) {
    const box = $("input[type=search]");
    if (box) { e.preventDefault(); box.focus(); }
  }
});
window.addEventListener("hashchange", route);
route();
