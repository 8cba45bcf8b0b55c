// The img2img / inpaint input: an image on a canvas, a mask painted over it, outpainting by extension.

const $ = (id) => document.getElementById(id);
const MASK_RGB = [255, 64, 64]; // how painted mask pixels look; exported as white

let image = null; // HTMLCanvasElement at the image's own size, or null
let erasing = false;
let onChange = () => {};

const imgCanvas = () => $("image-canvas");
const maskCanvas = () => $("mask-canvas");

export const hasImage = () => image !== null;
export const imageSize = () => (image ? [image.width, image.height] : null);

/** Show `source` (Blob, File or canvas) as the input image, with an empty mask. */
export async function loadImage(source) {
  let canvas;
  if (source instanceof HTMLCanvasElement) canvas = source;
  else {
    if (source.type && !source.type.startsWith("image/")) throw new Error(`not an image (${source.type})`);
    let bitmap;
    try {
      bitmap = await createImageBitmap(source);
    } catch {
      throw new Error("this file could not be read as an image");
    }
    canvas = document.createElement("canvas");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
  }
  setImage(canvas, null);
}

function setImage(canvas, maskSource) {
  image = canvas;
  const ic = imgCanvas();
  const mc = maskCanvas();
  ic.width = mc.width = canvas.width;
  ic.height = mc.height = canvas.height;
  ic.getContext("2d").drawImage(canvas, 0, 0);
  const mctx = mc.getContext("2d");
  mctx.clearRect(0, 0, mc.width, mc.height);
  if (maskSource) mctx.drawImage(maskSource, 0, 0);
  $("stage").hidden = false;
  $("drop-hint").hidden = true;
  $("image-size").textContent = `${canvas.width} × ${canvas.height}`;
  const brush = $("brush");
  brush.max = String(Math.max(8, Math.round(Math.max(canvas.width, canvas.height) / 2)));
  if (Number(brush.value) > Number(brush.max)) brush.value = brush.max;
  $("brush-out").value = brush.value;
  onChange(canvas.width, canvas.height);
}

export function clearImage() {
  image = null;
  $("stage").hidden = true;
  $("drop-hint").hidden = false;
  $("image-size").textContent = "";
}

// --- mask painting ------------------------------------------------------------------------------

function toImageXY(ev) {
  const rect = maskCanvas().getBoundingClientRect();
  return [
    ((ev.clientX - rect.left) / rect.width) * maskCanvas().width,
    ((ev.clientY - rect.top) / rect.height) * maskCanvas().height,
  ];
}

function stroke(from, to) {
  const ctx = maskCanvas().getContext("2d");
  ctx.save();
  ctx.globalCompositeOperation = erasing ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = `rgb(${MASK_RGB.join(",")})`;
  ctx.lineWidth = Number($("brush").value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(to[0] + 0.01, to[1]);
  ctx.stroke();
  ctx.restore();
}

function bindPainting() {
  const mc = maskCanvas();
  let last = null;
  mc.addEventListener("pointerdown", (ev) => {
    if (!image || ev.button !== 0) return;
    mc.setPointerCapture(ev.pointerId);
    last = toImageXY(ev);
    stroke(last, last);
    ev.preventDefault();
  });
  mc.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const p = toImageXY(ev);
    stroke(last, p);
    last = p;
  });
  const end = () => { last = null; };
  mc.addEventListener("pointerup", end);
  mc.addEventListener("pointercancel", end);
}

export function clearMask() {
  const mc = maskCanvas();
  mc.getContext("2d").clearRect(0, 0, mc.width, mc.height);
}

export function invertMask() {
  const mc = maskCanvas();
  const ctx = mc.getContext("2d");
  const data = ctx.getImageData(0, 0, mc.width, mc.height);
  const px = data.data;
  for (let i = 0; i < px.length; i += 4) {
    px[i] = MASK_RGB[0]; px[i + 1] = MASK_RGB[1]; px[i + 2] = MASK_RGB[2];
    px[i + 3] = 255 - px[i + 3];
  }
  ctx.putImageData(data, 0, 0);
}

/** True when some mask pixel is painted. */
export function hasMask() {
  if (!image) return false;
  const mc = maskCanvas();
  const px = mc.getContext("2d").getImageData(0, 0, mc.width, mc.height).data;
  for (let i = 3; i < px.length; i += 4) if (px[i] > 127) return true;
  return false;
}

// --- outpainting --------------------------------------------------------------------------------

/** Grow the canvas by `pixels` on each side in `sides`; the new area is stretched edge and masked. */
export function extend(sides, pixels) {
  if (!image) throw new Error("load an image first");
  const px = Math.max(0, Math.round(pixels / 8) * 8);
  if (!px || !sides.length) throw new Error("choose at least one side and a number of pixels (a multiple of 8)");
  const pad = { left: 0, right: 0, top: 0, bottom: 0 };
  for (const s of sides) pad[s] = px;
  const w = image.width;
  const h = image.height;
  const W = w + pad.left + pad.right;
  const H = h + pad.top + pad.bottom;
  const next = document.createElement("canvas");
  next.width = W;
  next.height = H;
  const ctx = next.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  // stretch each edge row/column outwards, then the corners from the corner pixels
  const L = pad.left, T = pad.top, R = pad.right, B = pad.bottom;
  if (L) ctx.drawImage(image, 0, 0, 1, h, 0, T, L, h);
  if (R) ctx.drawImage(image, w - 1, 0, 1, h, L + w, T, R, h);
  if (T) ctx.drawImage(image, 0, 0, w, 1, L, 0, w, T);
  if (B) ctx.drawImage(image, 0, h - 1, w, 1, L, T + h, w, B);
  if (L && T) ctx.drawImage(image, 0, 0, 1, 1, 0, 0, L, T);
  if (R && T) ctx.drawImage(image, w - 1, 0, 1, 1, L + w, 0, R, T);
  if (L && B) ctx.drawImage(image, 0, h - 1, 1, 1, 0, T + h, L, B);
  if (R && B) ctx.drawImage(image, w - 1, h - 1, 1, 1, L + w, T + h, R, B);
  ctx.drawImage(image, L, T);
  const mask = document.createElement("canvas");
  mask.width = W;
  mask.height = H;
  const mctx = mask.getContext("2d");
  mctx.fillStyle = `rgb(${MASK_RGB.join(",")})`;
  mctx.fillRect(0, 0, W, H);
  mctx.clearRect(L, T, w, h);
  mctx.drawImage(maskCanvas(), L, T); // keep what was painted on the old area
  setImage(next, mask);
}

// --- export -------------------------------------------------------------------------------------

function canvasBase64(canvas) {
  return new Promise((resolve, reject) => {
    canvas.toBlob((blob) => {
      if (!blob) return reject(new Error("the canvas could not be encoded"));
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    }, "image/png");
  });
}

export const imageBase64 = () => canvasBase64(image);

/** The mask as a black/white PNG (white = repaint), base64. */
export function maskBase64() {
  const mc = maskCanvas();
  const out = document.createElement("canvas");
  out.width = mc.width;
  out.height = mc.height;
  const src = mc.getContext("2d").getImageData(0, 0, mc.width, mc.height);
  const ctx = out.getContext("2d");
  const dst = ctx.createImageData(mc.width, mc.height);
  for (let i = 0; i < src.data.length; i += 4) {
    const v = src.data[i + 3] > 127 ? 255 : 0;
    dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = v;
    dst.data[i + 3] = 255;
  }
  ctx.putImageData(dst, 0, 0);
  return canvasBase64(out);
}

/** Wire the editor's controls; `changed(w, h)` runs when a new image is shown. */
export function initEditor({ changed, error }) {
  onChange = changed;
  bindPainting();
  const zone = $("dropzone");
  const load = (file) => loadImage(file).catch((e) => error(e.message));
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    ev.stopPropagation();
    zone.classList.remove("over");
    const file = ev.dataTransfer.files[0];
    if (file) load(file);
  });
  $("init-file").addEventListener("change", (ev) => { if (ev.target.files[0]) load(ev.target.files[0]); ev.target.value = ""; });
  $("clear-image").addEventListener("click", clearImage);
  $("brush").addEventListener("input", () => { $("brush-out").value = $("brush").value; });
  $("eraser").addEventListener("click", () => {
    erasing = !erasing;
    $("eraser").setAttribute("aria-pressed", String(erasing));
  });
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-invert").addEventListener("click", invertMask);
  $("extend").addEventListener("click", () => {
    const sides = [...document.querySelectorAll('input[name="out-side"]:checked')].map((c) => c.value);
    try {
      extend(sides, Number($("out-pixels").value));
    } catch (e) {
      error(e.message);
    }
  });
  return { load };
}
