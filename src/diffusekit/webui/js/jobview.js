// A finished non-generation job opened from the queue: a train_lora job's result in a dialog.

import * as api from "./api.js";
import { sampleFigure } from "./feedback.js";
import { insertAtCursor } from "./networks.js";

const $ = (id) => document.getElementById(id);

let imageUrl = null;
let sampleUrls = [];
let tag = "";

function fact(name, value) {
  if (value === undefined || value === null || value === "") return [];
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = String(value);
  return [dt, dd];
}

const fmtLoss = (x) => (typeof x === "number" ? x.toPrecision(4) : x);

/** The newest step's sample images of a training job (one per sample prompt), in the dialog. */
async function showSamples(samples) {
  for (const u of sampleUrls) URL.revokeObjectURL(u);
  sampleUrls = [];
  const box = $("job-view-samples");
  const step = samples.length ? Math.max(...samples.map((s) => s.step)) : null;
  const figures = [];
  for (const s of samples.filter((x) => x.step === step)) {
    const url = URL.createObjectURL(await api.fetchBlob(s.url || `/v1/images/${encodeURIComponent(s.id)}`));
    sampleUrls.push(url);
    figures.push(sampleFigure(url, s));
  }
  box.replaceChildren(...figures);
  box.hidden = !figures.length;
}

/** Show a train_lora job: its LoRA, steps, final loss, loss curve and latest samples (or its error). */
export async function showTrainJob(job) {
  const r = job.result || {};
  const p = job.params || {};
  $("job-view-title").textContent = `Training job ${String(job.id).slice(0, 8)}: ${r.lora || p.name || ""}`;
  // result.losses is [[step, mean loss], ...]
  const losses = Array.isArray(r.losses) ? r.losses.map((x) => (Array.isArray(x) ? x[1] : x)) : [];
  $("job-view-facts").replaceChildren(
    ...fact("State", job.state),
    ...fact("LoRA", r.lora || p.name),
    ...fact("Prompt tag", r.prompt),
    ...fact("File", r.file),
    ...fact("Steps", r.steps ?? p.steps),
    ...fact("Final loss", fmtLoss(r.final_loss ?? job.progress?.loss)),
    ...fact("Lowest loss", losses.length ? fmtLoss(Math.min(...losses)) : ""),
    ...fact("Rank", p.rank),
    ...fact("Learning rate", p.lr),
    ...fact("Base model", job.model_version || p.model),
    ...fact("Time", r.seconds !== undefined ? `${Number(r.seconds).toFixed(1)} s` : ""),
    ...fact("Samples", job.samples?.length ? `${job.samples.length} images, every ${p.sample_every} steps` : ""),
    ...fact("Error", job.error ? (typeof job.error === "string" ? job.error : JSON.stringify(job.error)) : ""),
  );
  tag = r.prompt || "";
  $("job-view-use").hidden = !tag;
  const img = $("job-view-img");
  img.hidden = true;
  const im = (job.images || [])[0];
  if (im) {
    const blob = await api.fetchBlob(im.url || `/v1/images/${encodeURIComponent(im.id)}`);
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(blob);
    img.src = imageUrl;
    img.hidden = false;
  }
  await showSamples(job.samples || []);
  if (!$("job-view").open) $("job-view").showModal();
}

export function initJobView({ toGenerate }) {
  $("job-view-close").addEventListener("click", () => $("job-view").close());
  $("job-view-use").addEventListener("click", () => {
    $("job-view").close();
    toGenerate();
    if (tag) insertAtCursor($("prompt"), tag);
  });
}
