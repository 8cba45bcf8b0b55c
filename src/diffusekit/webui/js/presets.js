// Named parameter presets: built-ins, plus the user's own stored server-side (per API key) when the
// server has /v1/presets, else in this browser's localStorage (said so in the status line).

import * as api from "./api.js";
import { applyParams, readPreset } from "./form.js";

const $ = (id) => document.getElementById(id);
const LOCAL = "diffusekit.presets";

export const BUILTIN = {
  "Fast draft": { steps: 8, cfg_scale: 5, batch_size: 1, n_iter: 1, enable_hr: false },
  Quality: { steps: 40, cfg_scale: 7, sampler: "DPM++ 2M", schedule: "Karras", enable_hr: false },
  "Hires 2x": { steps: 25, enable_hr: true, hr_scale: 2, hr_second_pass_steps: 10, hr_denoising_strength: 0.55 },
};

let own = {}; // name -> params
let serverSide = null; // true once /v1/presets answered, false when the server has no such route

function status(text) { $("preset-status").textContent = text; }

async function loadOwn() {
  try {
    if (!(await api.hasRoute("/v1/presets"))) throw new api.ApiError(404, "no /v1/presets on this server");
    const data = await api.listPresets();
    const list = Array.isArray(data) ? data : data.presets || data.items || [];
    own = Object.fromEntries(list.map((p) => [p.name, p.params || {}]));
    serverSide = true;
  } catch (e) {
    if (e.status !== 404 && e.status !== 405) status(`Presets: ${e.message}`);
    serverSide = false;
    own = JSON.parse(localStorage.getItem(LOCAL) || "{}");
  }
}

async function store(name, params) {
  if (serverSide) await api.savePreset(name, params);
  else localStorage.setItem(LOCAL, JSON.stringify({ ...own, [name]: params }));
  own[name] = params;
}

async function remove(name) {
  if (serverSide) await api.deletePreset(name);
  else {
    const next = { ...own };
    delete next[name];
    localStorage.setItem(LOCAL, JSON.stringify(next));
  }
  delete own[name];
}

function render(selected) {
  const sel = $("preset");
  sel.replaceChildren();
  const mine = document.createElement("optgroup");
  mine.label = serverSide ? "Yours (saved on the server)" : "Yours (saved in this browser)";
  for (const name of Object.keys(own).sort()) mine.append(new Option(name, `own:${name}`));
  const built = document.createElement("optgroup");
  built.label = "Built-in";
  for (const name of Object.keys(BUILTIN)) built.append(new Option(name, `builtin:${name}`));
  if (mine.children.length) sel.append(mine);
  sel.append(built);
  if (selected) sel.value = `own:${selected}`;
}

function selected() {
  const [where, ...rest] = $("preset").value.split(":");
  return { where, name: rest.join(":") };
}

/** Fetch the user's presets again (after the API key changed). */
export async function reloadPresets() {
  await loadOwn();
  render();
}

export async function initPresets() {
  await reloadPresets();
  $("preset-load").addEventListener("click", () => {
    const { where, name } = selected();
    const params = where === "builtin" ? BUILTIN[name] : own[name];
    if (!params) return;
    applyParams(params);
    status(`Loaded preset "${name}".`);
  });
  $("preset-save").addEventListener("click", async () => {
    const name = $("preset-name").value.trim();
    if (!name) return status("Type a name for the preset first.");
    try {
      await store(name, readPreset());
      render(name);
      status(`Saved preset "${name}".`);
    } catch (e) {
      status(`Could not save: ${e.message}`);
    }
  });
  $("preset-rename").addEventListener("click", async () => {
    const { where, name } = selected();
    const to = $("preset-name").value.trim();
    if (where !== "own") return status("Pick one of your presets to rename (built-ins cannot change).");
    if (!to || to === name) return status("Type the new name in Preset name.");
    try {
      await store(to, own[name]);
      await remove(name);
      render(to);
      status(`Renamed "${name}" to "${to}".`);
    } catch (e) {
      status(`Could not rename: ${e.message}`);
    }
  });
  $("preset-delete").addEventListener("click", async () => {
    const { where, name } = selected();
    if (where !== "own") return status("Pick one of your presets to delete (built-ins cannot change).");
    try {
      await remove(name);
      render();
      status(`Deleted preset "${name}".`);
    } catch (e) {
      status(`Could not delete: ${e.message}`);
    }
  });
}
