// The fields the Generate and Animate forms share (negative prompt, model, sampler, steps, CFG, seed, size),
// defined once. A form holds a placeholder <template data-field="KIND" data-id="ID" data-label="LABEL"> that
// buildFields() replaces with the field: its label and control. Each form names its own label, so that a
// label names one control on the page. Elements in the template go after the control: further <option>s
// into a select, buttons beside an input (in a row).

const SIZES = [
  ["", "Model default"],
  ["64x64", "64 × 64"],
  ["128x128", "128 × 128"],
  ["256x256", "256 × 256"],
  ["512x512", "512 × 512"],
  ["512x768", "512 × 768 (portrait)"],
  ["768x512", "768 × 512 (landscape)"],
  ["768x768", "768 × 768"],
  ["1024x1024", "1024 × 1024"],
];

const CONTROLS = {
  negative_prompt: { tag: "textarea", attrs: { name: "negative_prompt", rows: "2", spellcheck: "false" } },
  model: { tag: "select", attrs: { name: "model" } },
  sampler: { tag: "select", attrs: { name: "sampler" }, options: [["", "Model default"]] },
  steps: { tag: "input", attrs: { type: "number", name: "steps", min: "1", max: "150", placeholder: "model default" } },
  cfg_scale: {
    tag: "input",
    attrs: { type: "number", name: "cfg_scale", min: "0", max: "30", step: "0.5", placeholder: "model default" },
  },
  seed: { tag: "input", attrs: { type: "number", name: "seed", value: "-1", min: "-1" } },
  size: { tag: "select", attrs: { name: "size" }, options: SIZES },
};

/** The field for one placeholder: a div.field with the label and the control (data-rows overrides rows). */
function buildField(slot) {
  const { field: kind, id, label: text, rows } = slot.dataset;
  const spec = CONTROLS[kind];
  if (!spec) throw new Error(`unknown shared field "${kind}"; known: ${Object.keys(CONTROLS).join(", ")}`);
  const control = document.createElement(spec.tag);
  for (const [name, value] of Object.entries(spec.attrs)) control.setAttribute(name, value);
  if (rows) control.setAttribute("rows", rows);
  control.id = id;
  for (const [value, label] of spec.options || []) control.append(new Option(label, value));
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = text;
  const field = document.createElement("div");
  field.className = "field";
  const extra = [...slot.content.children];
  if (extra.length && spec.tag !== "select") { // buttons beside the input
    const row = document.createElement("div");
    row.className = "row tight";
    row.append(control, ...extra);
    field.append(label, row);
  } else {
    control.append(...extra); // further options of a select
    field.append(label, control);
  }
  return field;
}

/** Replace every shared-field placeholder of the page with its field; run before the forms are wired up. */
export function buildFields(root = document) {
  for (const slot of root.querySelectorAll("template[data-field]")) slot.replaceWith(buildField(slot));
}
