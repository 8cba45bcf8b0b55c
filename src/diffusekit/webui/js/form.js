// The generation form: read it into GenerationParams fields, fill it from params, show field errors.

import { markInvalid } from "./feedback.js";

const $ = (id) => document.getElementById(id);

// inputs whose empty value means "the model's recommendation" (the field is left out of the request)
const OPTIONAL_NUMBERS = ["steps", "cfg_scale", "width", "height"];
const NUMBERS = ["seed", "batch_size", "n_iter", "hr_scale", "hr_second_pass_steps", "hr_denoising_strength"];
const EDIT_NUMBERS = ["denoising_strength", "mask_blur", "inpaint_full_res_padding"];
const INTS = new Set(["steps", "width", "height", "seed", "batch_size", "n_iter", "hr_second_pass_steps",
  "inpaint_full_res_padding", "clip_skip"]);

export function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

export function setMode(value) {
  const radio = document.querySelector(`input[name="mode"][value="${value}"]`);
  radio.checked = true;
  radio.dispatchEvent(new Event("change", { bubbles: true }));
}

function num(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  return Number.isNaN(n) ? raw : n;
}

/** The GenerationParams fields the form sets (no images), for the current mode. */
export function readParams() {
  const p = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
  };
  for (const id of [...OPTIONAL_NUMBERS, ...NUMBERS]) {
    const v = num(id);
    if (v !== undefined) p[id] = v;
  }
  if (p.seed === undefined) p.seed = -1;
  for (const id of ["sampler", "schedule"]) if ($(id).value) p[id] = $(id).value;
  p.enable_hr = $("enable_hr").checked;
  p.hr_upscaler = $("hr_upscaler").value;
  if (!p.enable_hr) for (const k of ["hr_scale", "hr_second_pass_steps", "hr_denoising_strength", "hr_upscaler"]) delete p[k];
  const m = mode();
  if (m !== "txt2img") {
    p.enable_hr = false;
    delete p.hr_scale; delete p.hr_second_pass_steps; delete p.hr_denoising_strength; delete p.hr_upscaler;
    for (const id of EDIT_NUMBERS) {
      const v = num(id);
      if (v !== undefined) p[id] = v;
    }
    p.resize_mode = $("resize_mode").value;
    if (m === "inpaint") {
      p.inpainting_fill = $("inpainting_fill").value;
      p.inpaint_full_res = $("inpaint_full_res").checked;
    } else {
      delete p.mask_blur; delete p.inpaint_full_res_padding;
    }
  }
  return p;
}

/** Everything a preset keeps: the form's params plus the model. */
export function readPreset() {
  const p = readParams();
  delete p.prompt; delete p.negative_prompt;
  if ($("model").value) p.model = $("model").value;
  return p;
}

/** Pick the option matching `value` (by value or label, ignoring case); add one if none does. */
export function setSelect(select, value) {
  if (value === undefined || value === null) return;
  const want = String(value).toLowerCase();
  for (const opt of select.options) {
    if (opt.value.toLowerCase() === want || opt.textContent.trim().toLowerCase() === want) {
      select.value = opt.value;
      return;
    }
  }
  const opt = new Option(String(value), String(value));
  select.add(opt);
  select.value = opt.value;
}

/** Put `params` (GenerationParams names; model too) into the form; fields not given keep their value. */
export function applyParams(params) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = String(v); };
  set("prompt", params.prompt);
  set("negative_prompt", params.negative_prompt);
  for (const id of [...OPTIONAL_NUMBERS, ...NUMBERS, ...EDIT_NUMBERS]) set(id, params[id]);
  if (params.width !== undefined || params.height !== undefined) syncSizePreset();
  if (params.sampler) {
    // a legacy combined name ("DPM++ 2M Karras") splits into sampler + schedule when both are listed
    const s = $("sampler");
    const name = String(params.sampler);
    const base = [...s.options].find((o) => o.value && name.toLowerCase().startsWith(o.value.toLowerCase() + " "));
    const exact = [...s.options].some((o) => o.value.toLowerCase() === name.toLowerCase());
    if (!exact && base && !params.schedule) {
      setSelect(s, base.value);
      setSelect($("schedule"), name.slice(base.value.length + 1));
    } else setSelect(s, name);
  }
  if (params.schedule) setSelect($("schedule"), params.schedule);
  if (params.enable_hr !== undefined) {
    $("enable_hr").checked = !!params.enable_hr;
    if (params.enable_hr) $("hires").open = true;
  }
  if (params.hr_upscaler) setSelect($("hr_upscaler"), params.hr_upscaler);
  if (params.resize_mode) setSelect($("resize_mode"), params.resize_mode);
  if (params.inpainting_fill) setSelect($("inpainting_fill"), params.inpainting_fill);
  if (params.inpaint_full_res !== undefined) $("inpaint_full_res").checked = !!params.inpaint_full_res;
  if (params.model) {
    const sel = $("model");
    const name = String(params.model);
    const match = [...sel.options].find((o) => o.value === name || o.value.replace(/\.[a-z]+$/, "") === name);
    if (match) sel.value = match.value;
  }
  $("ds-out").value = Number($("denoising_strength").value).toFixed(2);
  highlightPrompt();
}

export function syncSizePreset() {
  const w = $("width").value;
  const h = $("height").value;
  const sel = $("size-preset");
  const key = w || h ? `${w}x${h}` : "";
  sel.value = [...sel.options].some((o) => o.value === key) ? key : "custom";
}

// --- errors beside the field they name ----------------------------------------------------------

export function clearErrors() {
  for (const el of document.querySelectorAll(".field-error")) el.remove();
  for (const el of document.querySelectorAll(".invalid")) {
    el.classList.remove("invalid");
    el.removeAttribute("aria-invalid");
    el.removeAttribute("aria-errormessage");
  }
  $("form-error").hidden = true;
}

const FIELD_ALIASES = { n_iter: "n_iter", init_image: "dropzone", init_images: "dropzone", mask: "dropzone",
  sampler_name: "sampler", scheduler: "schedule", cfg: "cfg_scale" };

/** Show `message` next to the field `field` names (or at the top of the form when there is none). */
export function showError(message, field) {
  const id = field ? FIELD_ALIASES[field] || field : null;
  const input = id ? $(id) : null;
  if (input) {
    markInvalid(input, `err-${id}`, message);
    const details = input.closest("details");
    if (details) details.open = true;
    return;
  }
  const top = $("form-error");
  top.textContent = message;
  top.hidden = false;
}

// --- A1111 weighting syntax highlight -----------------------------------------------------------

function escapeHtml(s) {
  return s.replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" })[c]);
}

/** Mark (…), […], (word:1.2) weights, BREAK and <lora:…> in the prompt's backdrop. */
export function highlightPrompt() {
  const text = $("prompt").value;
  const html = escapeHtml(text)
    .replace(/&lt;[a-z]+:[^&]*?&gt;/gi, (m) => `<span class="l">${m}</span>`)
    .replace(/\bBREAK\b/g, '<span class="b">BREAK</span>')
    .replace(/:\s*-?\d+(?:\.\d+)?(?=\s*\))/g, (m) => `<span class="w">${m}</span>`)
    .replace(/(?<!\\)[()[\]]/g, (m) => `<span class="d">${m}</span>`);
  $("prompt-hl").innerHTML = html + "\n";
}
