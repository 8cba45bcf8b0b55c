// The Animate view: an "animate" job from its form, frame-by-frame progress over SSE, the video.

import * as api from "./api.js";
import { markInvalid, progressBar } from "./feedback.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const NUMBERS = ["frames", "fps", "cadence", "steps", "cfg_scale", "seed"];
const TEXTS = ["prompt", "negative_prompt", "format", "interpolation", "curve", "sampler"];
const MOTION = ["zoom", "angle", "translation_x", "translation_y", "strength", "noise"];

let current = null; // {id, abort}
let videoUrl = null; // the object URL of the shown video

const setProgress = progressBar("an-progress", "an-progress-text");

function clearErrors() {
  $("an-error").hidden = true;
  for (const el of document.querySelectorAll("#an-form .field-error")) el.remove();
  for (const el of document.querySelectorAll("#an-form .invalid")) {
    el.classList.remove("invalid");
    el.removeAttribute("aria-invalid");
  }
}

/** The message beside the field the server named (an-<field>), else above the form. */
function showError(message, field) {
  const id = field === "width" || field === "height" ? "size" : field;
  const input = id ? $(`an-${id}`) : null;
  if (input) {
    markInvalid(input, `err-an-${id}`, message);
    return;
  }
  $("an-error").textContent = message;
  $("an-error").hidden = false;
}

/** "0: a red circle" lines -> {"0": "a red circle"}; throws naming the bad line. */
function parsePrompts(text) {
  const out = {};
  const lines = text.split("\n").map((l) => l.trim()).filter(Boolean);
  for (const [i, line] of lines.entries()) {
    const m = /^(\d+)\s*:\s*(.*)$/.exec(line);
    if (!m) throw new Error(`Keyframed prompts, line ${i + 1}: expected "FRAME: prompt", e.g. "0: a red circle"`);
    out[m[1]] = m[2];
  }
  return lines.length ? out : null;
}

function readParams() {
  const mode = $("an-mode").value;
  const p = { mode };
  for (const k of TEXTS) {
    const v = $(`an-${k}`).value;
    if (v !== "" || k === "prompt" || k === "negative_prompt") p[k] = v;
  }
  for (const k of NUMBERS) {
    const v = $(`an-${k}`).value.trim();
    if (v !== "") p[k] = Number(v);
  }
  const size = $("an-size").value;
  if (size) [p.width, p.height] = size.split("x").map(Number);
  const prompts = parsePrompts($("an-prompts").value);
  if (prompts) p.prompts = prompts;
  if (mode === "seed") {
    const seeds = $("an-seeds").value.split(/[\s,]+/).filter(Boolean);
    p.seeds = seeds.map(Number);
  }
  if (mode === "motion") for (const k of MOTION) p[k] = $(`an-${k}`).value.trim();
  if (mode === "animatediff" && $("an-motion_module").value) p.motion_module = $("an-motion_module").value;
  return p;
}

function showProgress(data) {
  const p = data.progress && typeof data.progress === "object" ? data.progress : data;
  if (data.state === "queued") {
    setProgress(0, data.queue_position ? `Queued (position ${data.queue_position})` : "Queued");
    return;
  }
  if (!p.frames) return;
  let text = `Frame ${p.frame} of ${p.frames}`;
  if (p.total) text += ` · step ${p.step}/${p.total}`;
  text += ` · ${p.frames_done} done`;
  setProgress(Number(p.fraction || 0), text);
  if (data.preview) {
    $("an-preview").src = data.preview;
    $("an-preview-wrap").hidden = false;
  }
}

async function showVideo(job) {
  const v = job.video;
  const blob = await api.fetchBlob(v.url);
  if (videoUrl) URL.revokeObjectURL(videoUrl);
  videoUrl = URL.createObjectURL(blob);
  const isVideo = v.media_type.startsWith("video/");
  $("an-video").hidden = !isVideo;
  $("an-image").hidden = isVideo;
  if (isVideo) $("an-video").src = videoUrl;
  else $("an-image").src = videoUrl;
  $("an-download").href = videoUrl;
  $("an-download").download = `animation-${job.id.slice(0, 8)}.${v.format}`;
  $("an-result").hidden = false;
}

async function finish(job) {
  current = null;
  $("an-run").disabled = false;
  $("an-cancel").disabled = true;
  if (job.state === "succeeded") {
    const v = job.video;
    setProgress(1, `Done: ${v.frames} frames, ${v.width}×${v.height}, ${v.fps} fps, ${v.format.toUpperCase()}`, "done");
    await showVideo(job);
  } else if (job.state === "cancelled") {
    setProgress(0, "Cancelled", "failed");
  } else {
    setProgress(0, `Failed: ${job.error || "unknown error"}`, "failed");
    showError(job.error || "The animation failed");
  }
}

async function follow(id) {
  const abort = new AbortController();
  current = { id, abort };
  let final = null;
  try {
    await api.followEvents(id, (type, data) => {
      if (type === "progress") showProgress(data);
      if (type === "done") { final = data; return false; }
      return true;
    }, abort.signal);
  } catch (e) {
    if (e.name === "AbortError") return;
  }
  while (!final || !TERMINAL.has(final.state)) { // the stream ended early: poll
    final = await api.getJob(id);
    if (!TERMINAL.has(final.state)) await new Promise((r) => setTimeout(r, 500));
  }
  await finish(final);
}

export async function animate() {
  if (current) return;
  clearErrors();
  let params;
  try {
    params = readParams();
  } catch (e) {
    showError(e.message, "prompts");
    return;
  }
  $("an-run").disabled = true;
  $("an-result").hidden = true;
  $("an-preview-wrap").hidden = true;
  setProgress(0, "Queued");
  try {
    const model = $("an-model").value || null;
    const job = await api.submitJob("animate", params, { model });
    $("an-cancel").disabled = false;
    await follow(job.id);
  } catch (e) {
    current = null;
    $("an-run").disabled = false;
    $("an-cancel").disabled = true;
    setProgress(0, "Not started", "failed");
    showError(e.message, e.field);
  }
}

async function cancel() {
  if (!current) return;
  setProgress(Number($("an-progress").getAttribute("aria-valuenow")) / 100, "Cancelling…");
  try {
    await api.cancelJob(current.id);
  } catch (e) {
    showError(e.message, e.field);
  }
}

function onModeChange() {
  const mode = $("an-mode").value;
  for (const el of document.querySelectorAll("#an-form [data-mode]")) el.hidden = el.dataset.mode !== mode;
}

/** Fill the model and sampler pickers from the Generate form's (already loaded), and the motion modules. */
export async function refreshAnimateLists() {
  for (const [from, to] of [["model", "an-model"], ["sampler", "an-sampler"]]) {
    const keep = $(to).value;
    $(to).replaceChildren(...[...$(from).options].map((o) => new Option(o.text, o.value)));
    if (keep) $(to).value = keep;
    else if (from === "model") $(to).value = $(from).value;
  }
  try {
    const { motion_modules: mms = [] } = await api.get("/v1/motion-modules");
    const keep = $("an-motion_module").value;
    $("an-motion_module").replaceChildren(...mms.map((m) => new Option(m.name, m.name)));
    if (keep) $("an-motion_module").value = keep;
  } catch {
    /* an older server: no motion modules to offer */
  }
}

export function initAnimate() {
  $("an-form").addEventListener("submit", (ev) => { ev.preventDefault(); animate(); });
  $("an-form").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); animate(); }
  });
  $("an-cancel").addEventListener("click", cancel);
  $("an-mode").addEventListener("change", onModeChange);
  onModeChange();
}

/** Show a finished animate job (opened from the queue): its video or animated image and its summary. */
export async function showAnimateJob(job) {
  clearErrors();
  if (current) { // an animation is running here: show the opened one without touching that run's state
    if (job.video) await showVideo(job);
    return;
  }
  if (job.params?.prompt !== undefined) $("an-prompt").value = job.params.prompt;
  await finish(job);
}
