// Small DOM helpers.  Text from records always goes in with textContent, never as HTML, and
// characters that could reorder or hide text are shown as escapes, as the CLI shows them.

export const $ = (sel, root = document) => root.querySelector(sel);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// C0/C1 controls, DEL, line and paragraph separators, the bidirectional marks and overrides
// (Trojan Source: "abc\u202eexe.txt" reads as "abctxt.exe"; U+061C too), the zero-width space,
// word joiner and invisible operators, BOM, lone surrogates: the same set as
// fleetlog.view.safe_text.
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u061c\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ud800-\udfff]/gu;
const SHORT = { "\n": "\\n", "\r": "\\r", "\t": "\\t", "\u001b": "\\e" };
const hex = (code, width) => code.toString(16).padStart(width, "0");

export const visible = (text) => String(text).replace(UNSAFE, (c) => {
  const code = c.charCodeAt(0);
  return SHORT[c] || (code < 0x100 ? `\\x${hex(code, 2)}` : `\\u${hex(code, 4)}`);
});

export const ago = (iso) => {
  if (!iso) return "never";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
};
export const stamp = (iso) => (iso ? iso.replace("T", " ").replace("Z", "") : "");
export const deviceHash = (id) => `#/device/${encodeURIComponent(id)}`;

// A device id as a link: long ids are cut short on screen (CSS), the full id on hover.
export const deviceLink = (id, cls = "") => el("a", { href: deviceHash(id), class: `device-id ${cls}`.trim(),
                                                      title: visible(id), text: visible(id) });

// A JSON value as coloured text nodes (keys, strings, numbers, literals).
export function colourJson(value) {
  const out = [];
  const span = (cls, text) => el("span", { class: cls, text });
  const walk = (v, pad) => {
    if (v === null || typeof v === "boolean") out.push(span("b", String(v)));
    else if (JSON.isRawJSON && JSON.isRawJSON(v)) out.push(span("n", v.rawJSON));  // an exact integer (api.js)
    else if (typeof v === "number") out.push(span("n", String(v)));
    else if (typeof v === "string") out.push(span("s", visible(JSON.stringify(v))));
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
        out.push(pad + "  ", span("k", visible(JSON.stringify(k))), ": ");
        walk(v[k], pad + "  ");
        out.push(i < keys.length - 1 ? ",\n" : "\n");
      });
      out.push(pad + "}");
    }
  };
  walk(value, "");
  return el("pre", { class: "json" }, ...out);
}

export const LEVELS = ["trace", "debug", "info", "warn", "error", "fatal"];

export function levelSelect(value = "") {
  return el("select", { name: "level", "aria-label": "level" }, el("option", { value: "", text: "any level" }),
    ...LEVELS.map((l) => el("option", { value: l, text: `${l}+`, selected: l === value })));
}

// A table with its header; rows go in the returned tbody.
export function table(headers, body = el("tbody")) {
  return el("div", { class: "scroll-x" }, el("table", {}, el("thead", {}, el("tr", {},
    ...headers.map((h) => (typeof h === "string" ? el("th", { text: h }) : el("th", h))))), body));
}

// What a page leaves running (timers, a live tail, listeners), stopped when another page opens.
export class Life {
  constructor() { this.stops = []; this.over = false; }
  onStop(fn) { if (this.over) fn(); else this.stops.push(fn); }
  every(fn, ms) { const id = setInterval(fn, ms); this.onStop(() => clearInterval(id)); }
  listen(target, type, fn) { target.addEventListener(type, fn); this.onStop(() => target.removeEventListener(type, fn)); }
  stop() { this.over = true; for (const fn of this.stops.splice(0)) fn(); }
}
