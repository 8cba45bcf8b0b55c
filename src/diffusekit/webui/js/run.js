// Running a job from the form: submit, live progress and preview over SSE, cancel, gallery, viewer.

import * as api from "./api.js";
import * as editor from "./editor.js";
import { progressBar } from "./feedback.js";
import { applyParams, clearErrors, mode, readParams, setMode, showError } from "./form.js";
import { infotextToParams, parseInfotext } from "./pnginfo.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

let current = null; // {id, abort: AbortController, done: bool}
let lastSeed = null;
const gallery = []; // newest job first: {n, url, blob, infotext, seed, jobId}
let counter = 0; // results numbered in the order they arrived
let shown = null; // the gallery item in the viewer
const opening = new Map(); // job id -> the addImages() promise of a reopen in flight

export const lastImageSeed = () => lastSeed;

const setProgress = progressBar("progress", "progress-text");

function progressOf(data) {
  const p = data.progress && typeof data.progress === "object" ? data.progress : data;
  const step = Number(p.step ?? 0);
  const total = Number(p.total ?? 0);
  const fraction = p.fraction !== undefined && p.fraction !== null ? Number(p.fraction) : total ? step / total : 0;
  return { step, total, fraction, eta: data.eta_s ?? p.eta_s };
}

function showProgress(data) {
  const { step, total, fraction, eta } = progressOf(data);
  if (!total) {
    if (data.state === "queued") {
      const pos = data.queue_position;
      setProgress(0, pos ? `Queued (position ${pos})` : "Queued");
    } else if (data.state === "running") {
      const waiting = data.waiting ?? data.progress?.waiting; // model memory other jobs' models hold
      setProgress(0, waiting ? `Waiting: ${waiting}` : "Starting…");
    }
    return;
  }
  let text = `Step ${step}/${total}`;
  if (eta !== undefined && eta !== null && Number.isFinite(Number(eta))) text += ` · ETA ${Number(eta).toFixed(1)} s`;
  setProgress(fraction, text);
}

function showPreview(data) {
  const src = data.preview || data.image || data.current_image;
  if (!src || typeof src !== "string") return;
  const img = $("preview");
  img.src = src.startsWith("data:") || src.startsWith("/") ? src : `data:image/png;base64,${src}`;
  $("preview-wrap").hidden = false;
}

/** Build the job for the form's mode; null (with the error shown) when something is missing. */
async function buildJob() {
  const kind = mode();
  const params = readParams();
  if (kind !== "txt2img") {
    if (!editor.hasImage()) {
      showError("Load an input image first: drop, paste or choose one, or send a result from the gallery.", "dropzone");
      return null;
    }
    params.init_image = await editor.imageBase64();
    if (kind === "inpaint") {
      if (!editor.hasMask()) {
        showError("Paint the area to repaint on the image first (or extend the canvas to outpaint).", "dropzone");
        return null;
      }
      params.mask = await editor.maskBase64();
    }
  }
  return { kind, params, priority: Number($("priority").value) || 0, model: $("model").value || null };
}

export async function generate() {
  if (current && !current.done) return;
  clearErrors();
  const job = await buildJob();
  if (!job) return;
  $("generate").disabled = true;
  let accepted;
  try {
    accepted = await api.submitJob(job.kind, job.params, { priority: job.priority, model: job.model });
  } catch (e) {
    $("generate").disabled = false;
    showError(e.message, e.field);
    setProgress(0, "Not started", "failed");
    return;
  }
  current = { id: accepted.id, abort: new AbortController(), done: false };
  $("cancel").disabled = false;
  setProgress(0, "Queued");
  $("preview-wrap").hidden = true;
  await follow(current);
}

async function follow(job) {
  let final = null;
  try {
    await api.followEvents(job.id, (type, data) => {
      if (typeof data !== "object" || data === null) return true;
      if (type === "done" || TERMINAL.has(data.state)) {
        if (data.id) final = data;
        return false;
      }
      showProgress(data);
      showPreview(data);
      return true;
    }, job.abort.signal);
  } catch (e) {
    if (e.name === "AbortError") return;
    /* no event stream: poll the job instead */
  }
  try {
    if (!final || !TERMINAL.has(final.state)) final = await waitTerminal(job);
  } catch (e) {
    showError(e.message, e.field);
  }
  finish(job, final);
}

async function poll(job) {
  for (;;) {
    const j = await api.getJob(job.id);
    if (TERMINAL.has(j.state)) return j;
    if (j.state === "running") showProgress(j);
    await new Promise((r) => setTimeout(r, 400));
  }
}

async function waitTerminal(job) {
  const j = await api.getJob(job.id);
  return TERMINAL.has(j.state) ? j : poll(job);
}

async function finish(job, final) {
  job.done = true;
  $("generate").disabled = false;
  $("cancel").disabled = true;
  if (!final) return;
  if (final.state === "succeeded") {
    setProgress(1, `Done: ${final.images?.length ?? 0} image(s)`, "done");
    await addImages(final);
    $("preview-wrap").hidden = true;
  } else if (final.state === "cancelled") {
    setProgress(0, "Cancelled", "failed");
  } else {
    let err = final.error || "failed";
    if (typeof err === "string") err = err.replace(/^[A-Z]\w*(?:Error|Exception): /, ""); // the Python class
    const { field, message } = api.describeError(0, typeof err === "object" ? { detail: err } : err);
    setProgress(0, `Failed: ${message}`, "failed");
    showError(message, field);
  }
}

/** Put a finished job's images at the front of the gallery. */
export async function addImages(job) {
  const items = [];
  for (const im of job.images || []) {
    const blob = await api.fetchBlob(im.url || `/v1/images/${encodeURIComponent(im.id)}`);
    items.push({ n: ++counter, url: URL.createObjectURL(blob), blob, infotext: im.infotext || "", seed: im.seed, jobId: job.id, id: im.id });
  }
  if (items.length) lastSeed = items[0].seed ?? lastSeed;
  gallery.unshift(...items);
  renderGallery();
  return items;
}

function renderGallery() {
  const ul = $("gallery");
  ul.replaceChildren(...gallery.map((item) => {
    const li = document.createElement("li");
    const btn = document.createElement("button");
    btn.type = "button";
    const label = `Result ${item.n}, seed ${item.seed ?? "?"}`;
    btn.setAttribute("aria-label", `Open ${label}`);
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = label;
    const cap = document.createElement("span");
    cap.className = "cap";
    cap.textContent = `seed ${item.seed ?? "?"}`;
    btn.append(img, cap);
    btn.addEventListener("click", () => openViewer(item));
    li.append(btn);
    return li;
  }));
}

export function openViewer(item) {
  shown = item;
  $("viewer-img").src = item.url;
  $("viewer-info").value = item.infotext;
  const a = $("v-download");
  a.href = item.url;
  a.download = `diffusekit-${item.seed ?? "image"}.png`;
  $("viewer").showModal();
}

export async function cancel() {
  if (!current || current.done) return;
  $("cancel").disabled = true;
  setProgress(Number($("progress").getAttribute("aria-valuenow")) / 100, "Cancelling…");
  try {
    await api.cancelJob(current.id);
  } catch (e) {
    showError(e.message, e.field);
  }
}

async function sendTo(kind) {
  if (!shown) return;
  await editor.loadImage(shown.blob);
  setMode(kind);
  $("viewer").close();
  $("dropzone").scrollIntoView({ block: "nearest" });
}

export function initRun() {
  $("cancel").addEventListener("click", cancel);
  $("v-close").addEventListener("click", () => $("viewer").close());
  $("v-reuse").addEventListener("click", () => {
    if (!shown) return;
    const params = infotextToParams(parseInfotext(shown.infotext));
    if (shown.seed !== undefined && shown.seed !== null) params.seed = shown.seed;
    applyParams(params);
    $("viewer").close();
    $("prompt").focus();
  });
  $("v-img2img").addEventListener("click", () => sendTo("img2img"));
  $("v-inpaint").addEventListener("click", () => sendTo("inpaint"));
}

/** Show a finished job (from the queue view) in the gallery and open its first image. */
export async function reopen(jobOrId) {
  const job = typeof jobOrId === "string" ? await api.getJob(jobOrId) : jobOrId;
  // a job already in the gallery (just generated, or opened before, or still being opened) is shown, not added again
  let items = gallery.filter((it) => it.jobId === job.id);
  if (!items.length) {
    if (!opening.has(job.id)) opening.set(job.id, addImages(job).finally(() => opening.delete(job.id)));
    items = await opening.get(job.id);
  }
  if (job.params) applyParams(job.params);
  if (items.length) openViewer(items[0]);
}
