// Record rows and the pager that appends older pages as the list scrolls.
import { Unauthorized } from "./api.js";
import { colourJson, deviceLink, el, stamp, visible } from "./dom.js";

export const PAGE = 100;

export function recordRow(record, { showDevice = false, fresh = false } = {}) {
  const level = record.level || "-";
  const text = record.message ?? JSON.stringify(record.data);
  const row = el("div", { class: `row${fresh ? " fresh" : ""}`, tabindex: "0", role: "button",
                          "data-seq": record.seq, "aria-expanded": "false" },
    el("span", { class: "t", text: stamp(record.received_at) }),
    el("span", { class: `lvl-${level}`, text: visible(level.toUpperCase()) }),
    el("span", { class: "m" }, showDevice ? deviceLink(record.device_id, "dev") : null,
       document.createTextNode(visible(text))));
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

// Pages of `fetchPage(cursor)` appended to `list` while the sentinel (put after the list) shows.
// Starting again (new filters) stops the pager before.
export class Pager {
  // `skip(record)`: a record not to append (one already shown, above the pages).
  constructor(list, { showDevice = false, skip = () => false } = {}) {
    this.list = list;
    this.showDevice = showDevice;
    this.skip = skip;
    this.sentinel = el("p", { class: "muted" });
    list.after(this.sentinel);
    this.observer = new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) this.more(); });
    this.run = 0;
  }

  // Start over with `fetchPage`; `onFirst(page)` sees the first page, `onFirstFailed(error)` its failure.
  start(fetchPage, onFirst, onFirstFailed) {
    this.run += 1;
    Object.assign(this, { fetchPage, onFirst, onFirstFailed, cursor: null, done: false, busy: false, first: true });
    this.list.replaceChildren();
    this.sentinel.textContent = "Loading…";
    this.observer.disconnect();
    this.observer.observe(this.sentinel);
  }

  clear() {
    this.run += 1;
    this.observer.disconnect();
    this.list.replaceChildren();
    this.sentinel.textContent = "";
  }

  async more() {
    if (this.busy || this.done || !this.fetchPage) return;
    const run = this.run;
    this.busy = true;
    try {
      const page = await this.fetchPage(this.cursor);
      if (run !== this.run) return;  // started over meanwhile: this page belongs to nobody
      if (this.first && this.onFirst) this.onFirst(page);
      this.first = false;
      this.list.append(...page.records.filter((r) => !this.skip(r))
        .map((r) => recordRow(r, { showDevice: this.showDevice })));
      this.cursor = page.next_cursor;
      this.done = !this.cursor;
      this.sentinel.textContent = this.done ? (this.list.children.length ? "No older records." : "No records.") : "Loading…";
      if (!this.done) { this.observer.unobserve(this.sentinel); this.observer.observe(this.sentinel); }  // still in view: on
    } catch (e) {
      if (run !== this.run) return;
      if (!(e instanceof Unauthorized)) this.sentinel.textContent = `Error: ${e.message}`;
      this.done = true;
      if (this.first && this.onFirstFailed) this.onFirstFailed(e);
    } finally {
      if (run === this.run) this.busy = false;
    }
  }

  stop() { this.observer.disconnect(); this.run += 1; }
}
