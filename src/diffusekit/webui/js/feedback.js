// What the forms show while a job runs and when a request fails: a progress bar, an error beside a field.

/** A setter (fraction 0..1, text, class) for the progress bar `barId` and its status line `textId`. */
export function progressBar(barId, textId) {
  return (fraction, text, cls = "") => {
    const bar = document.getElementById(barId);
    const pct = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    bar.setAttribute("aria-valuenow", String(pct));
    bar.setAttribute("aria-valuetext", text);
    bar.className = `bar ${cls}`;
    bar.querySelector(".fill").style.width = `${pct}%`;
    document.getElementById(textId).textContent = text;
  };
}

/** Mark `input` invalid and show `message` below it in its field, as the alert `errId`. */
export function markInvalid(input, errId, message) {
  const err = document.createElement("span");
  err.className = "field-error";
  err.id = errId;
  err.setAttribute("role", "alert");
  err.textContent = message;
  input.classList.add("invalid");
  input.setAttribute("aria-invalid", "true");
  input.setAttribute("aria-errormessage", err.id);
  (input.closest(".field") || input.parentElement).append(err);
}

/** A training sample image (`url`) with its step and prompt as the caption. */
export function sampleFigure(url, sample) {
  const fig = document.createElement("figure");
  fig.className = "sample";
  const img = document.createElement("img");
  img.src = url;
  img.alt = `Sample at step ${sample.step}: ${sample.prompt ?? ""}`;
  const cap = document.createElement("figcaption");
  cap.className = "cap";
  cap.textContent = `Step ${sample.step}: ${sample.prompt ?? ""}`;
  fig.append(img, cap);
  return fig;
}
