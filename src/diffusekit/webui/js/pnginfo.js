// PNG text chunks and A1111 infotext, read in the browser (PNG Info without a round trip).

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** {keyword: text} from a PNG's tEXt, zTXt and iTXt chunks; throws for a file that is not a PNG. */
export async function pngText(buffer) {
  const bytes = new Uint8Array(buffer);
  if (!SIGNATURE.every((b, i) => bytes[i] === b)) throw new Error("not a PNG file");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const out = {};
  let pos = 8;
  while (pos + 8 <= bytes.length) {
    const len = view.getUint32(pos);
    const type = latin1.decode(bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + len);
    pos += 12 + len;
    if (type === "IEND") break;
    if (!["tEXt", "zTXt", "iTXt"].includes(type)) continue;
    const nul = data.indexOf(0);
    if (nul < 0) continue;
    const key = latin1.decode(data.subarray(0, nul));
    try {
      if (type === "tEXt") out[key] = latin1.decode(data.subarray(nul + 1));
      else if (type === "zTXt") out[key] = latin1.decode(await inflate(data.subarray(nul + 2)));
      else {
        const compressed = data[nul + 1] === 1;
        let p = nul + 3;
        p = data.indexOf(0, p) + 1; // language tag
        p = data.indexOf(0, p) + 1; // translated keyword
        const body = data.subarray(p);
        out[key] = utf8.decode(compressed ? await inflate(body) : body);
      }
    } catch {
      /* a damaged chunk: skip it */
    }
  }
  return out;
}

const PAIR = /\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

function pairs(line) {
  const found = [];
  for (const m of line.matchAll(PAIR)) {
    let value = m[2].trim();
    if (value.startsWith('"')) {
      try { value = JSON.parse(value); } catch { /* keep as written */ }
    }
    found.push([m[1].trim(), value]);
  }
  return found;
}

/** {prompt, negative_prompt, "Key": "value", ...} from an A1111/diffusekit infotext. */
export function parseInfotext(text) {
  const lines = text.trim().split("\n");
  let last = lines[lines.length - 1] || "";
  const kv = pairs(last);
  const out = {};
  if (kv.length >= 3) lines.pop();
  else last = "";
  const prompt = [];
  const negative = [];
  let inNegative = false;
  for (const line of lines) {
    if (line.startsWith("Negative prompt:")) {
      inNegative = true;
      negative.push(line.slice(16).trim());
    } else (inNegative ? negative : prompt).push(line);
  }
  out.prompt = prompt.join("\n").trim();
  out.negative_prompt = negative.join("\n").trim();
  if (last) for (const [k, v] of kv) out[k] = v;
  return out;
}

const NUMBER_KEYS = {
  Steps: "steps",
  "CFG scale": "cfg_scale",
  Seed: "seed",
  "Denoising strength": "denoising_strength",
  "Clip skip": "clip_skip",
  "Mask blur": "mask_blur",
  "Hires steps": "hr_second_pass_steps",
  "Variation seed": "subseed",
  "Variation seed strength": "subseed_strength",
};

/** Form fields (GenerationParams names, plus model) from a parsed infotext. */
export function infotextToParams(parsed) {
  const p = { prompt: parsed.prompt, negative_prompt: parsed.negative_prompt };
  for (const [key, field] of Object.entries(NUMBER_KEYS)) {
    if (parsed[key] !== undefined && !Number.isNaN(Number(parsed[key]))) p[field] = Number(parsed[key]);
  }
  if (parsed.Sampler) p.sampler = parsed.Sampler;
  if (parsed["Schedule type"]) p.schedule = parsed["Schedule type"];
  const size = /^(\d+)x(\d+)$/.exec(parsed.Size || "");
  if (size) {
    p.width = Number(size[1]);
    p.height = Number(size[2]);
  }
  if (parsed.Model) p.model = parsed.Model;
  if (parsed["Model hash"]) p.model_hash = parsed["Model hash"];
  if (parsed["Hires upscale"]) {
    p.enable_hr = true;
    p.hr_scale = Number(parsed["Hires upscale"]);
    if (parsed["Hires upscaler"]) p.hr_upscaler = parsed["Hires upscaler"];
    if (p.denoising_strength !== undefined) p.hr_denoising_strength = p.denoising_strength;
  } else {
    p.enable_hr = false;
  }
  return p;
}

/** Params restored from a PNG file's bytes; throws a readable Error when it carries none. */
export async function paramsFromPng(buffer) {
  const text = await pngText(buffer);
  const info = text.parameters;
  if (!info) throw new Error("this PNG carries no generation parameters (no 'parameters' text chunk)");
  return { infotext: info, params: infotextToParams(parseInfotext(info)) };
}
