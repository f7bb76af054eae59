// fleetlog console: plain ES modules, no build step, no dependencies, no globals.
//   api.js      the API client (the token in sessionStorage, sent in the Authorization header)
//   dom.js      DOM helpers; record text always as text, control characters made visible
//   chart.js    the volume chart          records.js  record rows and the pager
//   tail.js     the live tail (SSE over fetch)
//   fleet.js, device.js, alerts.js: the pages
// This module logs in, routes (#/, #/device/ID, #/alerts, #/alert/NAME) and owns the keys.
import { Unauthorized, onRefused, token } from "./api.js";
import { alertPage, alertsPage } from "./alerts.js";
import { devicePage } from "./device.js";
import { $, Life, el } from "./dom.js";
import { fleetPage } from "./fleet.js";

const main = $("#main");
const crumbs = $("#crumbs");

function askToken(message = "") {
  $("#login-error").textContent = message;
  const dialog = $("#login");
  if (!dialog.open) dialog.showModal();
  $("#token").focus();
}
onRefused(askToken);

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  token.set($("#token").value.trim());
  const answer = await fetch("/api/overview", { headers: { Authorization: `Bearer ${token.get()}` } });
  if (!answer.ok) { $("#login-error").textContent = `Refused (${answer.status}).`; return; }
  $("#token").value = "";
  $("#login").close();
  route();
});
$("#logout").addEventListener("click", () => { token.clear(); life.stop(); main.replaceChildren(); askToken(); });

// The page a hash names: [page function, its argument]; a link that cannot be read names none.
const ROUTES = [["#/device/", devicePage], ["#/alert/", alertPage], ["#/alerts", alertsPage]];
function pageOf(hash) {
  for (const [prefix, page] of ROUTES) {
    if (!hash.startsWith(prefix)) continue;
    const rest = hash.slice(prefix.length);
    try {
      return [page, decodeURIComponent(rest)];
    } catch {
      return [null, `This link is broken: ${hash} is not a valid address (bad %-escape).`];
    }
  }
  return [fleetPage, null];
}

let life = new Life();
async function route() {
  life.stop();  // the page before: its timers, tail and listeners end here
  life = new Life();
  const mine = life;
  if (!token.get()) { askToken(); return; }
  $("#logout").hidden = false;
  const [page, argument] = pageOf(location.hash || "#/");
  main.replaceChildren();  // never the page before under an error
  if (page === null) {
    crumbs.replaceChildren(el("a", { href: "#/", text: "Fleet" }));
    main.append(el("p", { class: "error", role: "alert", text: argument }));
    return;
  }
  try {
    await page(main, crumbs, mine, argument);
  } catch (e) {
    if (mine === life && !(e instanceof Unauthorized)) main.append(el("p", { class: "error", text: e.message }));
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
