// The server's public HTTP API: every request the page makes goes through here.

const KEY_STORE = "diffusekit.key";

export class ApiError extends Error {
  constructor(status, message, field = null) {
    super(message);
    this.status = status;
    this.field = field; // the request field the server named, when it named one
  }
}

let onAuthNeeded = null; // set by main.js: shows the key dialog

export function setAuthHandler(fn) { onAuthNeeded = fn; }
export function getKey() { return sessionStorage.getItem(KEY_STORE) || ""; }
export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** Field name and message from a FastAPI/pydantic error body or our ParamError text. */
export function describeError(status, body) {
  let detail = body && body.detail !== undefined ? body.detail : body;
  if (body && typeof body.error === "string" && !Array.isArray(detail)) detail = body.error;
  if (Array.isArray(detail) && detail.length) {
    const first = detail[0];
    const path = typeof first.field === "string" ? first.field.split(".") : first.loc || [];
    const loc = path.filter((p) => typeof p === "string" && !["body", "params", "query"].includes(p));
    const field = loc.length ? loc[loc.length - 1] : null;
    const msg = first.msg || JSON.stringify(first);
    return { field, message: field && !msg.startsWith(field) ? `${field}: ${msg}` : msg };
  }
  if (detail && typeof detail === "object") {
    const message = detail.message || detail.msg || JSON.stringify(detail);
    return { field: detail.field || fieldOf(message), message };
  }
  const text = typeof detail === "string" ? detail.trim() : "";
  const message = text && !text.startsWith("<") ? text.slice(0, 500) : `HTTP ${status}`;
  return { field: fieldOf(message), message };
}

function fieldOf(message) {
  const m = /^\s*([a-z_][a-z0-9_]*)\s*=/.exec(message) || /\b(?:field|parameter) '?([a-z_][a-z0-9_]*)'?/i.exec(message);
  return m ? m[1] : null;
}

async function send(method, path, body, opts = {}) {
  const sentKey = getKey();
  const init = { method, headers: headers(opts.headers) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  if (opts.signal) init.signal = opts.signal;
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "The server cannot be reached; is diffusekit serve running?");
  }
  if (res.status === 401 || (res.status === 403 && !sentKey)) {
    const { message } = describeError(res.status, await safeJson(res));
    // a request sent before the user entered a key answers after it: only an answer to the key in use
    // asks again (otherwise a late 401 to a keyless start-up request reopens the dialog just closed)
    if (onAuthNeeded && sentKey === getKey()) {
      onAuthNeeded(sentKey ? `The API key was refused (${message}).` : "This server requires an API key.");
    }
    throw new ApiError(res.status, message);
  }
  return res;
}

async function safeJson(res) {
  const text = await res.text();
  try { return JSON.parse(text); } catch { return text; }
}

/** JSON request; throws ApiError with the server's message (and field) on a non-2xx answer. */
export async function request(method, path, body, opts) {
  const res = await send(method, path, body, opts);
  const data = res.status === 204 ? null : await safeJson(res);
  if (!res.ok) {
    const { field, message } = describeError(res.status, data);
    throw new ApiError(res.status, message, field);
  }
  return data;
}

export const get = (path, opts) => request("GET", path, undefined, opts);

/** The bytes of an image route as a Blob (img tags cannot send the Authorization header). */
export async function fetchBlob(url) {
  const res = await send("GET", url);
  if (!res.ok) throw new ApiError(res.status, describeError(res.status, await safeJson(res)).message);
  return res.blob();
}

// --- the routes -------------------------------------------------------------------------------

export const listModels = () => get("/v1/models");
export const listSamplers = () => get("/v1/samplers");
// /sdapi/v1 routes answer 401 with a Basic challenge (for A1111 clients), which makes the browser open its
// own password prompt; the page calls them only once a /v1 call has shown the key is good.
export const getOptions = () => get("/sdapi/v1/options");
export const setModel = (name) => request("POST", "/sdapi/v1/options", { sd_model_checkpoint: name });

/** A random id; crypto.randomUUID exists only on https or localhost, getRandomValues everywhere. */
function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Queue a job: kind txt2img | img2img | inpaint; params are GenerationParams fields. */
export function submitJob(kind, params, { priority = 0, model = null } = {}) {
  const body = { kind, params: model ? { ...params, model } : params, priority };
  return request("POST", "/v1/jobs", body, { headers: { "Idempotency-Key": randomId() } });
}

export const getJob = (id) => get(`/v1/jobs/${encodeURIComponent(id)}`);
export const cancelJob = (id) => request("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);

export function listJobs({ state = "", limit = 20, cursor = "" } = {}) {
  const q = new URLSearchParams({ limit: String(limit) });
  if (state) q.set("state", state);
  if (cursor) q.set("cursor", cursor);
  return get(`/v1/jobs?${q}`);
}

let spec = null;

/** Whether the server offers `path` (as its OpenAPI description spells it); asked once per page. */
export async function hasRoute(path) {
  // reading the description avoids probing a missing route, which would log a 404 in the console
  if (!spec) spec = get("/openapi.json").catch(() => ({}));
  const paths = (await spec).paths || {};
  return path in paths;
}

export const inspectModel = (name) => get(`/v1/models/${encodeURIComponent(name)}/inspect`);
export const listPresets = () => get("/v1/presets");
export const savePreset = (name, params) => request("PUT", `/v1/presets/${encodeURIComponent(name)}`, { params });
export const deletePreset = (name) => request("DELETE", `/v1/presets/${encodeURIComponent(name)}`);

/**
 * Follow a job's server-sent events, calling onEvent(type, data) for each.
 * fetch() rather than EventSource, which cannot send the Authorization header.
 * Resolves when the stream ends; rejects on a network or HTTP error.
 */
export async function followEvents(id, onEvent, signal) {
  const res = await send("GET", `/v1/jobs/${encodeURIComponent(id)}/events`, undefined, {
    headers: { Accept: "text/event-stream" },
    signal,
  });
  if (!res.ok || !res.body) throw new ApiError(res.status, `events: HTTP ${res.status}`);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const name = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (name === "event") type = val;
        else if (name === "data") data.push(val);
      }
      if (!data.length) continue;
      let parsed = data.join("\n");
      try { parsed = JSON.parse(parsed); } catch { /* plain text event */ }
      if (onEvent(type, parsed) === false) { reader.cancel(); return; }
    }
  }
}
