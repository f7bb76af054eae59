// The fleet page: totals, the 24 h chart, a search across every device, the device table.
import { json } from "./api.js";
import { chart } from "./chart.js";
import { ago, deviceLink, el, levelSelect, table, visible } from "./dom.js";
import { PAGE, Pager } from "./records.js";

export async function fleetPage(main, crumbs, life) {
  crumbs.replaceChildren(el("span", { text: "Fleet" }));
  const totals = el("div", { class: "totals" });
  const search = el("input", { type: "search", name: "q", placeholder: "Search every device (plain text)  [/]",
                               "aria-label": "fleet search" });
  const level = levelSelect();
  const results = el("div", { class: "rows", id: "fleet-results" });
  const devices = el("tbody");
  const chartBox = el("div", { class: "chart-box" });
  main.replaceChildren(
    totals, el("h3", { text: "Records, last 24 h" }), chartBox,
    el("form", { class: "filters", id: "fleet-search", onsubmit: (e) => { e.preventDefault(); find(); } },
       search, level, el("button", { type: "submit", text: "Search" })),
    results,
    el("h3", { text: "Devices" }),
    table(["Device", "Last seen", { text: "Last error", class: "hide-narrow" }, "Records",
           { text: "Node", class: "hide-narrow" }], devices));
  const pager = new Pager(results, { showDevice: true });
  life.onStop(() => pager.stop());
  // One search, from the form or a chart bar (which adds its time range).
  const find = (range = {}) => {
    if (!search.value && !level.value && !range.since) { pager.clear(); return; }
    pager.start((cursor) => json("/api/logs", { q: search.value, level: level.value, ...range, cursor, limit: PAGE }));
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
    chartBox.replaceChildren(chart(volume, (since, until) => find({ since, until })));
    devices.replaceChildren(...list.devices.map((d) => el("tr", { "data-device": d.device_id },
      el("td", {}, el("span", { class: `dot${d.online ? " on" : ""}`, title: d.online ? "online" : "offline" }),
         deviceLink(d.device_id)),
      el("td", { text: ago(d.last_seen), title: d.last_seen || "" }),
      el("td", { text: d.last_error ? ago(d.last_error) : "-", title: d.last_error || "", class: "hide-narrow" }),
      el("td", { text: d.records }),
      el("td", { text: visible(d.node || ""), class: "hide-narrow" }))));
    if (!list.devices.length) devices.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No devices yet." })));
  };
  await update();
  // Online dots, totals and the chart follow the fleet while the page is open.
  life.every(() => update().catch(() => {}), 5000);
}
