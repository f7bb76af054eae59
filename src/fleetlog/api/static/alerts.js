// Alerts: the rules (with mute, test, remove), a form for a new rule with a live preview of the
// recent records its condition matches, what is firing and what resolved, the notifications and
// delivery failures; and one rule's history.  The same /api/alerts a script or `fleetlog alert` uses.
import { ApiError, Unauthorized, json, send } from "./api.js";
import { colourJson, deviceLink, el, stamp, table, visible } from "./dom.js";
import { recordRow } from "./records.js";

// Each kind of condition: the field of the rule that holds it, and how it is typed.
const KINDS = {
  records: { field: "when", label: "records matching (CEL)", placeholder: 'level == "error" && message.contains("door forced")' },
  offline: { field: "offline", label: "offline for longer than", placeholder: "10m" },
  reconnects: { field: "reconnects", label: "reconnects per minute above", placeholder: "5", number: true },
  refusals: { field: "refusals", label: "refusals per minute above", placeholder: "20", number: true },
  backlog: { field: "backlog", label: "queue backlog above (records)", placeholder: "100000", number: true },
  dead_letters: { field: "dead_letters", label: "dead letters above", placeholder: "0", number: true },
  lag: { field: "lag", label: "worker behind by more than", placeholder: "30s" },
};

// What the page reads and shows at most: the rules whose firings it fetches, the resolved ones it lists.
const MAX_RULES_SHOWN = 100;
const MAX_RESOLVED_SHOWN = 20;

const alertHash = (name) => `#/alert/${encodeURIComponent(name)}`;
const fail = (box) => (e) => { if (!(e instanceof Unauthorized)) box.replaceChildren(el("p", { class: "error", text: e.message })); };
const shown = (iso) => (iso ? stamp(iso) : "-");

function stateOf(rule) {
  if (rule.muted) return el("span", { class: "pill", text: `muted until ${shown(rule.muted_until)}` });
  if (rule.firing) return el("span", { class: "pill firing", text: `firing (${rule.firing})` });
  return el("span", { class: "pill ok", text: "ok" });
}

function notificationRows(notes, body) {
  body.replaceChildren(...notes.map((n) => el("tr", { class: `note-${n.status}`, "data-rule": n.rule },
    el("td", { text: shown(n.created_at) }),
    el("td", {}, el("a", { href: alertHash(n.rule), text: visible(n.rule) })),
    el("td", { text: n.event }),
    el("td", { text: `#${n.destination}` }),
    el("td", { class: "status", text: n.status }),
    el("td", { text: n.attempts }),
    el("td", { class: "last-error", text: visible(n.last_error || ""), title: visible(n.last_error || "") }))));
  if (!notes.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "None." })));
}
const NOTE_HEADERS = ["Created", "Rule", "Event", "To", "Status", "Tries", "Last error"];

function firingBlock(rule, firing) {
  const samples = el("div", { class: "rows" }, ...firing.samples.map((r) => recordRow(r, { showDevice: true })));
  const group = firing.group === "*" ? el("span", { text: "the fleet" }) : deviceLink(firing.group);
  return el("div", { class: `firing-block ${firing.state}`, "data-firing": firing.id },
    el("p", {}, el("a", { href: alertHash(rule), text: visible(rule) }), " · ", group, " · ",
       el("b", { class: "count", text: `${firing.count}` }), ` record(s) or events, ${shown(firing.first_at)} → ${shown(firing.last_at)} · `,
       el("span", { class: `pill ${firing.state === "firing" ? "firing" : "ok"}`, text: firing.state }),
       firing.resolved_at ? ` at ${shown(firing.resolved_at)}` : ""),
    firing.samples.length ? samples : null,
    Object.keys(firing.detail || {}).length ? colourJson(firing.detail) : null);
}

export async function alertsPage(main, crumbs, life) {
  crumbs.replaceChildren(el("a", { href: "#/", text: "Fleet" }), document.createTextNode(" / "), el("span", { text: "Alerts" }));
  const rules = el("tbody", { id: "rules" });
  const firing = el("div", { id: "firing" });
  const resolved = el("div", { id: "resolved" });
  const notes = el("tbody", { id: "notifications" });
  const failures = el("tbody", { id: "failures" });
  const actionResult = el("div", { id: "action-result", role: "status" });
  const form = ruleForm(() => update());
  main.replaceChildren(
    el("h3", { text: "Rules" }), actionResult,
    table(["Rule", "Condition", { text: "Devices", class: "hide-narrow" }, { text: "To", class: "hide-narrow" }, "State", ""], rules),
    form.box,
    el("h3", { text: "Firing now" }), firing,
    el("h3", { text: "Resolved in the last 24 hours" }), resolved,
    el("h3", { text: "Delivery failures" }), table(NOTE_HEADERS, failures),
    el("h3", { text: "Notifications" }), table(NOTE_HEADERS, notes));

  const act = (label, work) => async () => {
    actionResult.replaceChildren(el("p", { class: "muted", text: `${label}…` }));
    try {
      const outcome = await work();
      actionResult.replaceChildren(el("p", { class: "muted", text: `${label}: done` }), outcome ? colourJson(outcome) : "");
      await update();
    } catch (e) { fail(actionResult)(e); }
  };
  const update = async () => {
    const [list, recent, failed] = await Promise.all([
      json("/api/alerts"), json("/api/notifications", { limit: 50 }), json("/api/notifications", { status: "failed", limit: 50 })]);
    rules.replaceChildren(...list.map((r) => {
      const path = `/api/alerts/${encodeURIComponent(r.name)}`;
      return el("tr", { "data-rule": r.name },
        el("td", {}, el("a", { href: alertHash(r.name), text: visible(r.name) })),
        el("td", { class: "condition", text: visible(r.condition) }),
        el("td", { class: "hide-narrow", text: visible(r.devices) }),
        el("td", { class: "hide-narrow", text: r.to.map(visible).join(", ") }),
        el("td", {}, stateOf(r)),
        el("td", { class: "actions" },
          r.muted ? el("button", { type: "button", text: "Unmute", onclick: act(`Unmute ${r.name}`, () => send("DELETE", `${path}/mute`)) })
                  : el("button", { type: "button", text: "Mute 1 h", onclick: act(`Mute ${r.name}`, () => send("POST", `${path}/mute`, { for: "1h" })) }),
          " ", el("button", { type: "button", text: "Test", onclick: act(`Test ${r.name}`, () => send("POST", `${path}/test`)) }),
          " ", el("button", { type: "button", text: "Remove", onclick: () => {
            if (confirm(`Remove the rule ${r.name}, its history and its unsent notifications?`)) act(`Remove ${r.name}`, () => send("DELETE", path))();
          } })));
    }));
    if (!list.length) rules.append(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No rules yet: add one below." })));
    form.box.open = form.box.open || !list.length;
    notificationRows(recent, notes);
    notificationRows(failed, failures);
    // Each rule's latest firings: the open ones, and those resolved in the last day.
    const details = await Promise.all(list.slice(0, MAX_RULES_SHOWN).map((r) => json(`/api/alerts/${encodeURIComponent(r.name)}`, { limit: 10 })));
    const firings = details.flatMap((d) => d.firings.map((f) => ({ rule: d.rule.name, f })));
    const since = Date.now() - 86_400_000;
    const open = firings.filter(({ f }) => f.state === "firing");
    const ended = firings.filter(({ f }) => f.state === "resolved" && Date.parse(f.resolved_at) >= since)
      .sort((a, b) => Date.parse(b.f.resolved_at) - Date.parse(a.f.resolved_at)).slice(0, MAX_RESOLVED_SHOWN);
    firing.replaceChildren(...(open.length ? open.map(({ rule, f }) => firingBlock(rule, f))
      : [el("p", { class: "muted", text: "Nothing is firing." })]));
    resolved.replaceChildren(...(ended.length ? ended.map(({ rule, f }) => firingBlock(rule, f))
      : [el("p", { class: "muted", text: "Nothing resolved in the last 24 hours." })]));
  };
  await update();
  life.every(() => update().catch(() => {}), 5000);
}

// The form for a new rule; while a record condition is typed, the newest records it matches.
function ruleForm(saved) {
  const name = el("input", { name: "name", required: true, maxlength: 64, placeholder: "door-forced", "aria-label": "rule name" });
  const kind = el("select", { name: "kind", "aria-label": "kind of condition" },
    ...Object.entries(KINDS).map(([k, v]) => el("option", { value: k, text: v.label })));
  const condition = el("textarea", { name: "condition", rows: 2, "aria-label": "condition", spellcheck: "false" });
  const devices = el("input", { name: "devices", value: "*", "aria-label": "devices", title: "*, a device id, or a glob (door-*)" });
  const count = el("input", { type: "number", name: "count", min: 1, value: 1, size: 5, "aria-label": "count" });
  const within = el("input", { name: "within", value: "1m", size: 5, "aria-label": "within" });
  const per = el("select", { name: "per", "aria-label": "per" }, el("option", { value: "device", text: "per device" }),
                 el("option", { value: "fleet", text: "across the fleet" }));
  const groupWait = el("input", { name: "group_wait", value: "10s", size: 4, "aria-label": "group wait",
                                  title: "how long a new firing gathers its burst before the one message is sent" });
  const to = el("textarea", { name: "to", rows: 2, "aria-label": "destinations",
                              placeholder: "https://hooks.example.com/fleetlog  or  slack://…  ntfy://ntfy.sh/topic  (one per line)" });
  const secret = el("input", { type: "password", name: "secret", autocomplete: "off", "aria-label": "webhook secret",
                               placeholder: "webhook secret (optional, 16+ characters)" });
  const error = el("pre", { class: "error", id: "rule-error", role: "alert" });
  const previewState = el("p", { class: "muted", id: "preview-state" });
  const previewRows = el("div", { class: "rows", id: "preview" });
  const threshold = el("span", { class: "threshold" }, "fire at ", count, " match(es) within ", within, " ", per,
                           ", send after gathering for ", groupWait);
  const box = el("details", { id: "new-rule" }, el("summary", { text: "New rule" }),
    el("form", { id: "rule-form", class: "rule-form", onsubmit: (e) => { e.preventDefault(); save(); } },
      el("label", {}, "Name ", name), el("label", {}, "When ", kind), condition,
      el("label", {}, "Devices ", devices), threshold,
      el("label", { class: "wide" }, "Send to ", to), secret,
      el("button", { type: "submit", text: "Save rule" }), error),
    el("h4", { text: "Preview: the newest records this condition matches" }), previewState, previewRows);

  const sync = () => {
    const k = KINDS[kind.value];
    condition.placeholder = k.placeholder;
    threshold.hidden = kind.value !== "records";
    previewRows.hidden = previewState.hidden = kind.value !== "records";
    preview();
  };
  kind.addEventListener("change", sync);

  let asked = 0, timer = null;
  // Asked 300 ms after the last keystroke; an older answer arriving late is dropped.
  const preview = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const mine = ++asked;
      if (kind.value !== "records" || !condition.value.trim()) { previewState.textContent = ""; previewRows.replaceChildren(); return; }
      previewState.textContent = "Trying…";
      try {
        const found = await send("POST", "/api/alerts/preview", { when: condition.value, devices: devices.value || "*" });
        if (mine !== asked) return;
        previewState.textContent = `Matches ${found.matched} of the newest ${found.checked} records`
          + (found.errors ? ` (${found.errors} could not be evaluated: ${found.first_error})` : "") + ".";
        previewState.className = "muted";
        previewRows.replaceChildren(...found.records.map((r) => recordRow(r, { showDevice: true })));
      } catch (e) {
        if (mine !== asked || e instanceof Unauthorized) return;
        previewState.textContent = e.message;
        previewState.className = "error";
        previewRows.replaceChildren();
      }
    }, 300);
  };
  condition.addEventListener("input", preview);
  devices.addEventListener("input", preview);

  const save = async () => {
    const k = KINDS[kind.value];
    const rule = { name: name.value.trim(), devices: devices.value.trim() || "*",
                   to: to.value.split("\n").map((s) => s.trim()).filter(Boolean) };
    rule[k.field] = k.number ? Number(condition.value) : condition.value;
    if (kind.value === "records") {
      Object.assign(rule, { count: Number(count.value), within: within.value.trim(), per: per.value,
                            group_wait: groupWait.value.trim() });
    }
    if (secret.value) rule.secret = secret.value;
    error.textContent = "";
    try {
      await send("POST", "/api/alerts", rule);
      secret.value = "";
      error.textContent = "";
      await saved();
    } catch (e) {
      if (e instanceof Unauthorized) return;
      error.textContent = e instanceof ApiError && e.status === 403 ? `${e.message} (saving a rule needs an admin token)` : e.message;
    }
  };
  sync();
  return { box };
}

// One rule and its history: every firing, newest first, with its notifications.
export async function alertPage(main, crumbs, life, name) {
  crumbs.replaceChildren(el("a", { href: "#/", text: "Fleet" }), document.createTextNode(" / "),
                         el("a", { href: "#/alerts", text: "Alerts" }), document.createTextNode(" / "),
                         el("span", { text: visible(name) }));
  const summary = el("div", {});
  const history = el("div", { id: "history" });
  main.replaceChildren(summary, el("h3", { text: "History" }), history);
  const update = async () => {
    const detail = await json(`/api/alerts/${encodeURIComponent(name)}`, { limit: 50 });
    summary.replaceChildren(el("p", {}, el("b", { text: visible(detail.rule.name) }), " ", stateOf(detail.rule), " ",
                                   el("span", { class: "condition", text: visible(detail.rule.condition) })), colourJson(detail.rule));
    history.replaceChildren(...detail.firings.map((f) => {
      const body = el("tbody");
      notificationRows(f.notifications, body);
      return el("div", {}, firingBlock(detail.rule.name, f), table(NOTE_HEADERS, body));
    }));
    if (!detail.firings.length) history.append(el("p", { class: "muted", text: "It has not fired." }));
  };
  await update();
  life.every(() => update().catch(() => {}), 5000);
}
