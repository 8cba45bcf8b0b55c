// The LoRA and embedding picker: lists the server's LoRAs and embeddings, inserts one into the prompt.

import * as api from "./api.js";

const $ = (id) => document.getElementById(id);

let items = []; // [{kind: "lora" | "embedding", name, text, detail}]

/** Insert `text` into the prompt at its cursor (replacing a selection), spaced from its neighbours. */
export function insertAtCursor(textarea, text) {
  const { value, selectionStart: start, selectionEnd: end } = textarea;
  const before = value.slice(0, start);
  const after = value.slice(end);
  const pre = before && !/[\s,(]$/.test(before) ? " " : "";
  const post = after && !/^[\s,)]/.test(after) ? " " : "";
  const insert = pre + text + post;
  textarea.value = before + insert + after;
  const caret = before.length + insert.length;
  textarea.focus();
  textarea.setSelectionRange(caret, caret);
  textarea.dispatchEvent(new Event("input", { bubbles: true }));
}

function render() {
  const query = $("net-search").value.trim().toLowerCase();
  const shown = items.filter((it) => !query || it.name.toLowerCase().includes(query)
    || (it.alias || "").toLowerCase().includes(query));
  const rows = shown.map((it) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = `net net-${it.kind}`;
    b.textContent = it.name;
    b.title = it.detail;
    b.setAttribute("aria-label", `Insert ${it.kind === "lora" ? "LoRA" : "embedding"} ${it.name}`);
    b.addEventListener("click", () => insertAtCursor($("prompt"), it.text));
    const kind = document.createElement("span");
    kind.className = "muted";
    kind.textContent = it.kind === "lora" ? " LoRA" : " embedding";
    li.append(b, kind);
    return li;
  });
  $("net-list").replaceChildren(...rows);
  const n = items.length;
  $("net-status").textContent = n
    ? `${shown.length} of ${n} shown`
    : "No LoRAs or embeddings on the server (put files in its LoRA and embedding folders).";
}

/** Re-read the server's LoRA and embedding lists (embeddings for the chosen model). */
export async function refreshNetworks() {
  const status = $("net-status");
  const model = $("model").value;
  const [loras, embs] = await Promise.allSettled([
    api.get("/v1/loras"),
    api.get(`/v1/embeddings${model ? `?model=${encodeURIComponent(model)}` : ""}`),
  ]);
  const next = [];
  const problems = [];
  if (loras.status === "fulfilled") {
    for (const l of loras.value) {
      const bits = [l.file, l.rank ? `rank ${l.rank}` : "", l.base_model || "", l.trained_by_job ? `trained by job ${String(l.trained_by_job).slice(0, 8)}` : ""];
      next.push({ kind: "lora", name: l.name, alias: l.alias, text: l.prompt || `<lora:${l.name}:1>`,
        detail: bits.filter(Boolean).join(" · ") });
    }
  } else problems.push(`LoRAs: ${loras.reason.message}`);
  if (embs.status === "fulfilled") {
    for (const e of embs.value.loaded || []) {
      next.push({ kind: "embedding", name: e.name, text: e.name,
        detail: [e.vectors ? `${e.vectors} vectors` : "", e.step ? `step ${e.step}` : ""].filter(Boolean).join(" · ") });
    }
  } else problems.push(`embeddings: ${embs.reason.message}`);
  items = next;
  render();
  if (problems.length) status.textContent = `Could not list ${problems.join("; ")}`;
}

export function initNetworks() {
  $("net-search").addEventListener("input", render);
  $("net-refresh").addEventListener("click", refreshNetworks);
  $("networks").addEventListener("toggle", () => { if ($("networks").open) refreshNetworks(); });
  $("model").addEventListener("change", () => { if ($("networks").open) refreshNetworks(); });
}
