// The API client.  The operator token lives in sessionStorage (this tab only) and goes in the
// Authorization header of every call, never in a URL.
export const token = {
  get: () => sessionStorage.getItem("fleetlog-token"),
  set: (value) => sessionStorage.setItem("fleetlog-token", value),
  clear: () => sessionStorage.removeItem("fleetlog-token"),
};

// Thrown after a 401 once the page has been told (it asks for another token).
export class Unauthorized extends Error {}

// An answer that is not 2xx, with the API's own words for why.
export class ApiError extends Error {
  constructor(status, detail) {
    super(describe(detail) || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

// FastAPI says why as a string, or as a list of {loc, msg} for a 422.
function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg).join("; ");
  return "";
}

let refused = () => {};
// What the page does when the token is refused (the console asks for another).
export function onRefused(handler) { refused = handler; }

export async function call(path, params = {}, options = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  const answer = await fetch(url, {
    ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${token.get()}` },
  });
  if (answer.status === 401) { refused("The token was refused; paste another."); throw new Unauthorized(); }
  return answer;
}

// JSON with every integer as exact as its text: JSON.parse rounds one past 2^53 (a device's
// counter, an id) to the nearest double, so such a number is kept as its text (JSON.rawJSON:
// shown, and written by JSON.stringify, as it came).  Other numbers parse as usual.
export function parseExact(text) {
  if (typeof JSON.rawJSON !== "function") return JSON.parse(text);  // an older browser: rounded
  return JSON.parse(text, (key, value, context) => (
    typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)
      ? JSON.rawJSON(context.source) : value));
}

// The JSON of a 2xx answer; ApiError otherwise.
export async function json(path, params, options) {
  const answer = await call(path, params, options);
  const body = answer.status === 204 ? null : await answer.text().then(parseExact).catch(() => null);
  if (!answer.ok) throw new ApiError(answer.status, body && body.detail);
  return body;
}

// A JSON body sent with `method`; the answer's JSON.
export const send = (method, path, body, params = {}) => json(path, params, {
  method, body: body === undefined ? undefined : JSON.stringify(body),
  headers: body === undefined ? {} : { "Content-Type": "application/json" },
});
