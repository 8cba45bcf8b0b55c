// The Queue and Models views.

import * as api from "./api.js";

const $ = (id) => document.getElementById(id);
const LIVE = new Set(["queued", "running"]);

let cursor = "";
let followTimer = 0;
let reopenJob = () => {};

function cell(text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  return td;
}

function button(text, label, fn) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", fn);
  return b;
}

function jobRow(job) {
  const tr = document.createElement("tr");
  const p = job.progress || {};
  const short = String(job.id).slice(0, 8);
  const prompt = job.params?.prompt ?? job.prompt ?? (job.kind === "train_lora" && job.params?.name ? `LoRA ${job.params.name}` : "");
  tr.append(
    cell(short),
    cell(job.kind || ""),
    cell(job.state, `state-${job.state}`),
    cell(p.total ? `${p.step}/${p.total}` : ""),
    cell(prompt, "prompt"),
    cell(job.created_at ? new Date(job.created_at * (job.created_at < 1e12 ? 1000 : 1)).toLocaleString() : ""),
  );
  const actions = document.createElement("td");
  if (LIVE.has(job.state)) {
    actions.append(button("Cancel", `Cancel job ${short}`, async () => {
      try {
        await api.cancelJob(job.id);
        refreshQueue();
      } catch (e) {
        showQueueError(e.message);
      }
    }));
  } else if (job.state === "succeeded") {
    actions.append(button("Open", `Open job ${short}`, async () => {
      try {
        await reopenJob(job.id);
      } catch (e) {
        showQueueError(e.message);
      }
    }));
  } else if (job.error) {
    const why = document.createElement("span");
    why.className = "err";
    why.textContent = typeof job.error === "string" ? job.error : JSON.stringify(job.error);
    actions.append(why);
  }
  tr.append(actions);
  tr.querySelector(".prompt").title = prompt;
  return tr;
}

function showQueueError(message) {
  $("queue-error").textContent = message;
  $("queue-error").hidden = !message;
}

async function loadPage(append) {
  showQueueError("");
  try {
    const data = await api.listJobs({ state: $("queue-state").value, limit: 20, cursor: append ? cursor : "" });
    const jobs = Array.isArray(data) ? data : data.jobs || data.items || [];
    cursor = (Array.isArray(data) ? "" : data.next_cursor || data.cursor || "") || "";
    const body = $("queue-body");
    const rows = jobs.map(jobRow);
    if (append) body.append(...rows);
    else body.replaceChildren(...rows);
    $("queue-more").hidden = !cursor;
    // while jobs are live and the view is open, follow them
    clearTimeout(followTimer);
    if (!append && jobs.some((j) => LIVE.has(j.state))) {
      followTimer = setTimeout(() => { if (!$("view-queue").hidden) refreshQueue(); }, 1500);
    }
  } catch (e) {
    showQueueError(e.message);
  }
}

export const refreshQueue = () => loadPage(false);

function fmtBytes(n) {
  if (n === undefined || n === null || Number.isNaN(Number(n))) return "";
  const units = ["B", "KB", "MB", "GB"];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtParams(m) {
  const millions = (n) => `${(n / 1e6).toFixed(1)} M`;
  if (typeof m.parameters !== "number") return "";
  const parts = Object.entries(m.components || {}).map(([k, v]) => `${k} ${millions(v)}`);
  return parts.length ? `${millions(m.parameters)} (${parts.join(", ")})` : millions(m.parameters);
}

export async function refreshModels({ onSwitched } = {}) {
  const err = $("models-error");
  err.hidden = true;
  try {
    const data = await api.listModels();
    const models = Array.isArray(data) ? data : data.models || [];
    const options = await api.getOptions().catch(() => ({}));
    if (await api.hasRoute("/v1/models/{name}/inspect")) {
      // family, sizes and parameter counts (read from the file headers by the server, cached there)
      const reports = await Promise.all(models.map((m) => api.inspectModel(m.name).catch(() => null)));
      reports.forEach((r, i) => { if (r) models[i] = { ...models[i], ...r }; });
    }
    // A1111 titles are "file.safetensors [hash]", the hash only once the server has computed it
    const bare = (title) => (title || "").replace(/ \[[0-9a-f]+\]$/, "");
    const currentName = bare(options.sd_model_checkpoint);
    const rows = models.map((m) => {
      const name = m.name;
      const isCurrent = name === currentName || bare(m.title) === currentName;
      const tr = document.createElement("tr");
      const nameCell = cell(isCurrent ? `${name} (current)` : name, isCurrent ? "current" : "");
      if (m.loaded) nameCell.append(" · loaded");
      tr.append(
        nameCell,
        cell([m.family, m.preset && m.preset !== m.family ? m.preset : "", m.format || m.kind].filter(Boolean).join(" · ")),
        cell(fmtBytes(m.file_bytes ?? m.size_bytes)),
        cell(fmtParams(m)),
      );
      const hash = document.createElement("td");
      const code = document.createElement("code");
      const sha = m.sha256 ?? m.hash ?? "";
      code.textContent = sha ? sha.slice(0, 10) : "not computed yet";
      code.title = sha;
      hash.append(code);
      const actions = document.createElement("td");
      if (!isCurrent) {
        actions.append(button("Use", `Use model ${name}`, async () => {
          try {
            await api.setModel(name);
            await refreshModels({ onSwitched });
            if (onSwitched) onSwitched(name);
          } catch (e) {
            err.textContent = e.status === 403 ? `Only an admin key can switch the model (${e.message}).` : e.message;
            err.hidden = false;
          }
        }));
      }
      tr.append(hash, actions);
      return tr;
    });
    $("models-body").replaceChildren(...rows);
  } catch (e) {
    err.textContent = e.message;
    err.hidden = false;
  }
}

export function initViews({ reopen }) {
  reopenJob = reopen;
  $("queue-refresh").addEventListener("click", refreshQueue);
  $("queue-state").addEventListener("change", refreshQueue);
  $("queue-more").addEventListener("click", () => loadPage(true));
}
