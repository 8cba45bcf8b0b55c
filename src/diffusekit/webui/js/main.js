// Start-up and wiring: tabs, server lists, keyboard, paste and drop, auth.

import { initAnimate, refreshAnimateLists, showAnimateJob } from "./animate.js";
import * as api from "./api.js";
import * as editor from "./editor.js";
import { buildFields } from "./fields.js";
import { applyParams, clearErrors, highlightPrompt, mode, setMode, showError, syncSizePreset } from "./form.js";
import { initJobView, showTrainJob } from "./jobview.js";
import { initNetworks } from "./networks.js";
import { paramsFromPng } from "./pnginfo.js";
import { initPresets, reloadPresets } from "./presets.js";
import { generate, initRun, lastImageSeed, reopen } from "./run.js";
import { initTrain, refreshTrainLists } from "./train.js";
import { initViews, refreshModels, refreshQueue } from "./views.js";

const $ = (id) => document.getElementById(id);

// --- tabs ---------------------------------------------------------------------------------------

const TABS = ["generate", "queue", "models", "animate", "train"];

function selectTab(name, focus = false) {
  for (const t of TABS) {
    const tab = $(`tab-${t}`);
    const on = t === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`view-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (name === "queue") refreshQueue();
  if (name === "models") refreshModels({ onSwitched: (n) => { $("model").value = n; } });
  if (name === "animate") refreshAnimateLists();
  if (name === "train") refreshTrainLists();
}

function initTabs() {
  for (const t of TABS) {
    const tab = $(`tab-${t}`);
    tab.addEventListener("click", () => selectTab(t));
    tab.addEventListener("keydown", (ev) => {
      const i = TABS.indexOf(t);
      if (ev.key === "ArrowRight") selectTab(TABS[(i + 1) % TABS.length], true);
      else if (ev.key === "ArrowLeft") selectTab(TABS[(i + TABS.length - 1) % TABS.length], true);
    });
  }
}

// --- server lists -------------------------------------------------------------------------------

function fill(select, items, keep) {
  const head = keep ? [...select.options].slice(0, keep) : [];
  select.replaceChildren(...head, ...items.map(([value, label]) => new Option(label, value)));
}

const SCHEDULE_LABELS = { automatic: "Automatic", sgm_uniform: "SGM Uniform", ddim_uniform: "DDIM", lcm: "LCM" };
const scheduleLabel = (id) => SCHEDULE_LABELS[id] || id.charAt(0).toUpperCase() + id.slice(1).replace(/_/g, " ");

async function loadLists() {
  const status = $("server-status");
  const [models, samplers] = await Promise.allSettled([api.listModels(), api.listSamplers()]);
  const failed = [models, samplers].find((r) => r.status === "rejected");
  if (failed) {
    if (failed.reason.status !== 401) status.textContent = `Server lists unavailable: ${failed.reason.message}`;
    return false;
  }
  const list = Array.isArray(models.value) ? models.value : models.value.models || [];
  const names = list.map((m) => m.name);
  fill($("model"), names.map((n) => [n, n]));
  const { samplers: sl = [], schedules = [] } = samplers.value;
  fill($("sampler"), sl.map((s) => [s.name, s.name]), 1);
  fill($("schedule"), schedules.map((id) => [id, scheduleLabel(id)]), 1);
  status.textContent = "Connected";
  try {
    // the server's current model (what A1111 requests use) preselects the picker
    const current = (await api.getOptions()).sd_model_checkpoint || "";
    const match = list.find((m) => m.name === current || m.title === current || current.startsWith(`${m.name}.`));
    if (match) $("model").value = match.name;
  } catch {
    /* no options route: keep the first model */
  }
  return true;
}

// --- auth ---------------------------------------------------------------------------------------

function askForKey(message) {
  const dlg = $("auth");
  $("auth-message").textContent = message;
  $("server-status").textContent = message;
  $("key-button").hidden = false;
  if (!dlg.open) dlg.showModal();
  $("api-key").focus();
}

function initAuth() {
  api.setAuthHandler(askForKey);
  $("key-button").addEventListener("click", () => askForKey("Enter an API key for this server."));
  $("auth-form").addEventListener("submit", async () => {
    api.setKey($("api-key").value.trim());
    $("api-key").value = "";
    if (await loadLists()) await reloadPresets();
  });
}

// --- drop and paste -----------------------------------------------------------------------------

async function restoreFromPng(file) {
  clearErrors();
  try {
    const { params } = await paramsFromPng(await file.arrayBuffer());
    applyParams(params);
    $("server-status").textContent = `Parameters restored from ${file.name || "the PNG"}`;
  } catch (e) {
    showError(`${file.name || "The file"}: ${e.message}`);
  }
}

function initDropAndPaste() {
  const overlay = $("drop-overlay");
  let depth = 0;
  const hasFiles = (ev) => [...(ev.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (ev) => {
    if (!hasFiles(ev)) return;
    depth += 1;
    if (!$("dropzone").contains(ev.target)) overlay.hidden = false;
  });
  document.addEventListener("dragover", (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    overlay.hidden = $("dropzone").contains(ev.target) && !$("edit").hidden;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener("drop", (ev) => {
    depth = 0;
    overlay.hidden = true;
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    const file = ev.dataTransfer.files[0];
    if (file) restoreFromPng(file);
  });
  $("pnginfo-file").addEventListener("change", (ev) => {
    if (ev.target.files[0]) restoreFromPng(ev.target.files[0]);
    ev.target.value = "";
  });
  document.addEventListener("paste", (ev) => {
    const item = [...(ev.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (!item) return;
    ev.preventDefault();
    editor.loadImage(item.getAsFile()).then(() => { if (mode() === "txt2img") setMode("img2img"); })
      .catch((e) => showError(e.message, "dropzone"));
  });
}

// --- the form's own behaviour -------------------------------------------------------------------

function onModeChange() {
  const m = mode();
  $("edit").hidden = m === "txt2img";
  $("mask-tools").hidden = m !== "inpaint";
  $("resize-field").hidden = m === "inpaint";
  $("hires").hidden = m !== "txt2img";
}

function initForm() {
  const form = $("gen-form");
  form.addEventListener("submit", (ev) => { ev.preventDefault(); generate(); });
  form.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); generate(); }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !form.contains(ev.target) && !$("view-generate").hidden) {
      ev.preventDefault();
      generate();
    }
  });
  for (const r of document.querySelectorAll('input[name="mode"]')) r.addEventListener("change", onModeChange);
  $("prompt").addEventListener("input", highlightPrompt);
  $("prompt").addEventListener("scroll", () => { $("prompt-hl").scrollTop = $("prompt").scrollTop; });
  $("size-preset").addEventListener("change", () => {
    const v = $("size-preset").value;
    if (v === "custom") return;
    const [w, h] = v ? v.split("x") : ["", ""];
    $("width").value = w;
    $("height").value = h;
  });
  $("width").addEventListener("input", syncSizePreset);
  $("height").addEventListener("input", syncSizePreset);
  $("seed-random").addEventListener("click", () => { $("seed").value = "-1"; });
  $("seed-reuse").addEventListener("click", () => {
    const s = lastImageSeed();
    if (s !== null && s !== undefined) $("seed").value = String(s);
  });
  $("denoising_strength").addEventListener("input", () => {
    $("ds-out").value = Number($("denoising_strength").value).toFixed(2);
  });
  onModeChange();
}

/** Open a finished job from the queue in its own view: generations in the gallery, animations in the
Animate tab, training runs in the job dialog. */
async function openJob(id) {
  const job = await api.getJob(id);
  if (job.kind === "animate") {
    selectTab("animate");
    await showAnimateJob(job);
  } else if (job.kind === "train_lora") {
    await showTrainJob(job);
  } else {
    selectTab("generate");
    await reopen(job);
  }
}

async function main() {
  buildFields(); // the shared form fields first: everything below finds them by id
  initTabs();
  initAuth();
  initForm();
  initRun();
  initAnimate();
  initNetworks();
  initTrain();
  initJobView({ toGenerate: () => selectTab("generate") });
  initViews({ reopen: openJob });
  editor.initEditor({
    changed: (w, h) => {
      // work at the image's own size (rounded down to a multiple of 8)
      $("width").value = String(Math.max(64, Math.floor(w / 8) * 8));
      $("height").value = String(Math.max(64, Math.floor(h / 8) * 8));
      syncSizePreset();
    },
    error: (message) => showError(message, "dropzone"),
  });
  initDropAndPaste();
  highlightPrompt();
  // the form is usable from here (ms since navigation start); the lists fill in as they come
  document.body.dataset.ready = String(Math.round(performance.now()));
  await loadLists();
  await initPresets();
  document.body.dataset.loaded = "true";
}

main();
