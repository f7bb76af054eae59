// The volume chart: records per time step as plain SVG bars (errors in red); a click picks a step.
import { el, stamp } from "./dom.js";

export function chart(volume, onPick) {
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
