// The Train tab: a train_lora job from captioned images (or a server dataset folder), its loss, the latest
// sample images as training goes, cancel.

import * as api from "./api.js";
import { progressBar, sampleFigure } from "./feedback.js";
import { refreshNetworks } from "./networks.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

let images = []; // [{name, data (base64), url (object URL), caption}]
let current = null; // {id, stop: bool}
let curveUrl = null;
let sampleUrls = new Map(); // sample image id -> object URL (fetched once each)
let shownSampleStep = null;

const setProgress = progressBar("tr-progress", "tr-progress-text");

function showError(message) {
  $("tr-error").textContent = message;
  $("tr-error").hidden = !message;
}

const fmtLoss = (x) => (typeof x === "number" ? x.toPrecision(4) : "?");

function renderImages() {
  $("tr-images").replaceChildren(...images.map((im, i) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = im.url;
    img.alt = im.name;
    const cap = document.createElement("input");
    cap.type = "text";
    cap.value = im.caption;
    cap.setAttribute("aria-label", `Caption for ${im.name}`);
    cap.addEventListener("input", () => { im.caption = cap.value; });
    const rm = document.createElement("button");
    rm.type = "button";
    rm.textContent = "Remove";
    rm.setAttribute("aria-label", `Remove training image ${im.name}`);
    rm.addEventListener("click", () => {
      URL.revokeObjectURL(im.url);
      images.splice(i, 1);
      renderImages();
    });
    li.append(img, cap, rm);
    return li;
  }));
}

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).replace(/^data:[^,]*,/, ""));
    r.onerror = () => reject(new Error(`${file.name}: could not be read`));
    r.readAsDataURL(file);
  });
}

async function addFiles(files) {
  const caption = $("tr-caption").value.trim();
  for (const f of files) {
    images.push({ name: f.name, data: await base64Of(f), url: URL.createObjectURL(f), caption });
  }
  renderImages();
}

function readParams() {
  const p = { name: $("tr-name").value.trim() };
  const dataset = $("tr-dataset").value.trim();
  if (dataset) p.dataset = dataset;
  else if (images.length) p.images = images.map((im) => ({ image: im.data, caption: im.caption }));
  if ($("tr-model").value) p.model = $("tr-model").value;
  for (const [id, key] of [["tr-steps", "steps"], ["tr-rank", "rank"], ["tr-lr", "lr"]]) {
    const raw = $(id).value.trim();
    if (raw !== "") p[key] = Number(raw);
  }
  const every = Number($("tr-sample-every").value.trim() || "0");
  const prompts = $("tr-sample-prompt").value.split("\n").map((x) => x.trim()).filter(Boolean);
  if (every > 0 || prompts.length) {
    p.sample_every = every;
    p.sample_prompt = prompts;
    const steps = $("tr-sample-steps").value.trim();
    if (steps !== "") p.sample_steps = Number(steps);
  }
  return p;
}

function check(p) {
  if (!p.name) return "Give the LoRA a name (letters, digits, _ and -).";
  if (!/^[A-Za-z0-9_-]+$/.test(p.name)) return `LoRA name ${JSON.stringify(p.name)}: use letters, digits, _ and - only.`;
  if (!p.dataset && !p.images) return "Choose some training images or name a dataset folder on the server.";
  if (p.sample_every > 0 && !p.sample_prompt.length) return "Give a sample prompt, or set Sample every N steps to 0.";
  if (p.sample_prompt && p.sample_prompt.length > 4) return "At most 4 sample prompts (one per line).";
  return "";
}

async function showResult(job) {
  const r = job.result || {};
  $("tr-result-text").textContent = `Trained ${r.lora}: use ${r.prompt} in a prompt (${r.steps} steps, final loss ${fmtLoss(r.final_loss)}).`;
  const im = (job.images || [])[0];
  $("tr-curve").hidden = !im;
  if (im) {
    const blob = await api.fetchBlob(im.url || `/v1/images/${encodeURIComponent(im.id)}`);
    if (curveUrl) URL.revokeObjectURL(curveUrl);
    curveUrl = URL.createObjectURL(blob);
    $("tr-curve").src = curveUrl;
  }
  $("tr-result").hidden = false;
}

function clearSamples() {
  for (const url of sampleUrls.values()) URL.revokeObjectURL(url);
  sampleUrls = new Map();
  shownSampleStep = null;
  $("tr-samples").replaceChildren();
  $("tr-samples-box").hidden = true;
}

/** Show the newest step's sample images (one per sample prompt) of a training job. */
async function showSamples(samples) {
  if (!samples || !samples.length) return;
  const step = Math.max(...samples.map((s) => s.step));
  if (step === shownSampleStep) return;
  const latest = samples.filter((s) => s.step === step);
  const figures = [];
  for (const s of latest) {
    if (!sampleUrls.has(s.id)) {
      const blob = await api.fetchBlob(s.url || `/v1/images/${encodeURIComponent(s.id)}`);
      sampleUrls.set(s.id, URL.createObjectURL(blob));
    }
    figures.push(sampleFigure(sampleUrls.get(s.id), s));
  }
  shownSampleStep = step;
  $("tr-samples").replaceChildren(...figures);
  $("tr-samples-box").hidden = false;
}

async function follow(id) {
  for (;;) {
    const job = await api.getJob(id);
    await showSamples(job.samples);
    if (TERMINAL.has(job.state)) return job;
    const p = job.progress || {};
    if (job.state === "running" && p.waiting) setProgress(0, `Waiting: ${p.waiting}`);
    else if (job.state === "running" && p.total) {
      const loss = p.loss !== undefined && p.loss !== null ? `, loss ${fmtLoss(p.loss)}` : "";
      const sampling = p.sampling ? ", making samples" : "";
      setProgress(p.fraction ?? p.step / p.total, `Step ${p.step}/${p.total}${loss}${sampling}`);
    } else if (job.state === "queued") setProgress(0, "Queued");
    await new Promise((res) => setTimeout(res, 500));
  }
}

async function train() {
  if (current) return;
  showError("");
  const params = readParams();
  const problem = check(params);
  if (problem) { showError(problem); return; }
  $("tr-run").disabled = true;
  $("tr-result").hidden = true;
  clearSamples();
  setProgress(0, "Submitting…");
  let job;
  try {
    job = await api.submitJob("train_lora", params);
  } catch (e) {
    $("tr-run").disabled = false;
    setProgress(0, "Idle");
    if (e.status === 403) {
      showError(`Only an admin key can train a LoRA (${e.message}).`);
      $("tr-run").disabled = true;
    } else showError(e.message);
    return;
  }
  current = { id: job.id };
  $("tr-cancel").disabled = false;
  try {
    const final = await follow(job.id);
    if (final.state === "succeeded") {
      const r = final.result || {};
      setProgress(1, `Done: ${r.steps} steps, final loss ${fmtLoss(r.final_loss)}`, "done");
      await showResult(final);
      await refreshNetworks();
    } else if (final.state === "cancelled") {
      setProgress(0, "Training cancelled", "failed");
    } else {
      const err = typeof final.error === "string" ? final.error : JSON.stringify(final.error);
      setProgress(0, "Training failed", "failed");
      showError(err || "The training job failed");
    }
  } catch (e) {
    showError(e.message);
  } finally {
    current = null;
    $("tr-run").disabled = false;
    $("tr-cancel").disabled = true;
  }
}

async function cancel() {
  if (!current) return;
  $("tr-cancel").disabled = true;
  setProgress(Number($("tr-progress").getAttribute("aria-valuenow")) / 100, "Cancelling…");
  try {
    await api.cancelJob(current.id);
  } catch (e) {
    showError(e.message);
  }
}

/** Fill the base model list from the Generate form's (called when the tab opens). */
export function refreshTrainLists() {
  const keep = $("tr-model").value;
  $("tr-model").replaceChildren(...[...$("model").options].map((o) => new Option(o.textContent, o.value)));
  if (keep) $("tr-model").value = keep;
  else $("tr-model").value = $("model").value;
}

export function initTrain() {
  $("tr-form").addEventListener("submit", (ev) => { ev.preventDefault(); train(); });
  $("tr-cancel").addEventListener("click", cancel);
  $("tr-files").addEventListener("change", async (ev) => {
    try {
      await addFiles([...ev.target.files]);
    } catch (e) {
      showError(e.message);
    }
    ev.target.value = "";
  });
}
