// The page at / (index.html): bank description and labels, examples, the segment request, and the overlay drawn
// here from the answer's regions (COCO RLE) with the answer's legend colours, so opacity and outlines change without
// a new request. Plain JS, no build step; it talks only to this server.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { refImage: null, scale: 1, box: null, drag: null, labels: [], labelsComplete: false,
                result: null, examples: [] };

// ------------------------------------------------------------------------------------------- messages

function headers() {
  const token = $("token").value.trim();
  localStorage.setItem("refbank-token", token);
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function clearStaleError() { if ($("status").className === "error") setStatus(""); }

function describeError(answer) {
  return `${answer.error}: ${typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail)}`;
}

// ------------------------------------------------------------------------------------------- bank and labels

async function getJSON(path) {
  const r = await fetch(path, { headers: headers() });
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}`, detail: "no JSON body" }));
  if (!r.ok) throw new Error(describeError(body));
  return body;
}

async function loadBank() {
  try {
    const info = await getJSON("/v1/bank");
    const spec = info.encoder;
    $("bank").textContent = `${info.uri} · version ${info.version} · ${info.totals.segments ?? "?"} segments · ` +
                            `${info.labels} labels · encoder ${spec.name} (${spec.weights}) `;
    if (info.untrained) {
      const warn = document.createElement("span");
      warn.className = "untrained";
      warn.textContent = "· UNTRAINED weights: labels carry no learned meaning";
      $("bank").append(warn);
    }
    await loadLabels();
  } catch (e) { $("bank").textContent = "bank information unavailable: " + e.message; }
}

async function loadLabels() {
  const answer = await getJSON("/v1/labels?limit=1000");
  state.labels = answer.labels;
  state.labelsComplete = answer.total <= answer.labels.length;
  const list = $("label-list");
  list.innerHTML = "";
  for (const entry of answer.labels) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.dataset.label = entry.label;
    chip.style.borderLeftColor = entry.color;
    chip.title = `${entry.count} segments in the bank; click to add or remove`;
    chip.append(entry.label + " ");
    const count = document.createElement("small");
    count.textContent = entry.count;
    chip.append(count);
    chip.addEventListener("click", () => toggleClass(entry.label));
    list.append(chip);
  }
  const shown = answer.total > answer.labels.length ? `${answer.labels.length} most frequent of ${answer.total}`
                                                    : `${answer.total}`;
  $("bank-labels-title").textContent = `bank labels (${shown}); click to add`;
  $("bank-labels").classList.toggle("hidden", !answer.labels.length);
  $("bank-labels").open = answer.labels.length <= 60;
  $("classes").placeholder = answer.labels.length ? "e.g. " + answer.labels.slice(0, 3).map((l) => l.label).join(", ")
                                                  : "this bank has no labels";
  checkClasses();
}

function classTokens() { return $("classes").value.split(",").map((c) => c.trim()).filter((c) => c); }

function toggleClass(label) {
  const tokens = classTokens();
  const at = tokens.indexOf(label);
  if (at >= 0) tokens.splice(at, 1); else tokens.push(label);
  $("classes").value = tokens.join(", ");
  checkClasses();
}

// Autocomplete: a datalist whose options are "<the names typed so far>, <bank label>" for labels that start with
// the name being typed, so the browser's own suggestion list completes the last name.
async function suggest() {
  const value = $("classes").value, cut = value.lastIndexOf(",");
  const head = cut >= 0 ? value.slice(0, cut + 1) + " " : "", typed = value.slice(cut + 1).trim().toLowerCase();
  const chosen = new Set(classTokens().map((c) => c.toLowerCase()));
  let labels = state.labels;
  if (!state.labelsComplete && typed) {
    try { labels = (await getJSON(`/v1/labels?limit=20&prefix=${encodeURIComponent(typed)}`)).labels; }
    catch (e) { labels = state.labels; }
  }
  const list = $("class-suggestions");
  list.innerHTML = "";
  for (const entry of labels.filter((l) => l.label.toLowerCase().startsWith(typed) &&
                                           !chosen.has(l.label.toLowerCase())).slice(0, 20)) {
    const option = document.createElement("option");
    option.value = head + entry.label;
    option.label = `${entry.count} segments`;
    list.append(option);
  }
}

function checkClasses() {
  const known = new Set(state.labels.map((l) => l.label.toLowerCase()));
  const tokens = classTokens();
  for (const chip of $("label-list").children) chip.setAttribute("aria-pressed", tokens.includes(chip.dataset.label));
  const unknown = state.labelsComplete ? tokens.filter((c) => !known.has(c.toLowerCase())) : [];
  $("class-check").textContent = unknown.length ?
    `not a bank label: ${unknown.join(", ")} (the nearest labels by text are used instead)` : "";
  $("class-check").className = unknown.length ? "note warn" : "note";
}

// ------------------------------------------------------------------------------------------- examples

async function loadExamples() {
  try {
    const r = await fetch("/static/examples/examples.json");
    if (!r.ok) return;
    state.examples = await r.json();
  } catch (e) { return; }
  for (const example of state.examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = `example: ${example.classes.join(", ")}`;
    button.dataset.file = example.file;
    const img = document.createElement("img");
    img.src = "/static/examples/" + example.file;
    img.alt = button.title;
    button.append(img);
    button.addEventListener("click", () => useExample(example));
    $("examples").append(button);
  }
  $("examples").classList.toggle("hidden", !state.examples.length);
}

async function useExample(example) {
  const blob = await (await fetch("/static/examples/" + example.file)).blob();
  const files = new DataTransfer();
  files.items.add(new File([blob], example.file, { type: blob.type || "image/png" }));
  $("image").files = files.files;
  imageChanged();
  const known = new Set(state.labels.map((l) => l.label));
  const classes = state.labels.length ? example.classes.filter((c) => known.has(c)) : example.classes;
  if (classes.length) { $("classes").value = classes.join(", "); checkClasses(); }
}

// ------------------------------------------------------------------------------------------- reference box

function showMode() {
  const mode = $("mode").value;
  $("vocabulary-options").classList.toggle("hidden", mode !== "vocabulary");
  $("reference-options").classList.toggle("hidden", mode !== "reference");
  if (mode === "reference" && !state.refImage) useReference(selectedReferenceFile());
  clearStaleError();
}

function selectedReferenceFile() { return $("ref-image").files[0] || $("image").files[0] || null; }

function useReference(file) {
  state.box = null;
  $("box-text").textContent = "no box yet";
  if (!file) return;
  const img = new Image();
  img.onload = () => { state.refImage = img; drawReference(); };
  img.src = URL.createObjectURL(file);
}

function drawReference() {
  const canvas = $("ref-canvas"), img = state.refImage;
  if (!img) return;
  state.scale = Math.min(4, 360 / img.naturalWidth, 360 / img.naturalHeight);  // small images drawn larger
  canvas.width = Math.round(img.naturalWidth * state.scale);
  canvas.height = Math.round(img.naturalHeight * state.scale);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const b = state.box;
  if (b) {
    ctx.lineWidth = 2; ctx.strokeStyle = "#facc15"; ctx.fillStyle = "#facc1533";
    const s = state.scale;
    ctx.fillRect(b[0] * s, b[1] * s, (b[2] - b[0]) * s, (b[3] - b[1]) * s);
    ctx.strokeRect(b[0] * s, b[1] * s, (b[2] - b[0]) * s, (b[3] - b[1]) * s);
  }
}

function canvasPoint(event) {
  const canvas = $("ref-canvas"), rect = canvas.getBoundingClientRect(), img = state.refImage;
  const x = (event.clientX - rect.left) * (canvas.width / rect.width) / state.scale;
  const y = (event.clientY - rect.top) * (canvas.height / rect.height) / state.scale;
  return [Math.max(0, Math.min(img.naturalWidth, x)), Math.max(0, Math.min(img.naturalHeight, y))];
}

function boxFrom(a, b) {
  return [Math.floor(Math.min(a[0], b[0])), Math.floor(Math.min(a[1], b[1])),
          Math.ceil(Math.max(a[0], b[0])), Math.ceil(Math.max(a[1], b[1]))];
}

$("ref-canvas").addEventListener("pointerdown", (e) => {
  if (!state.refImage) return;
  state.drag = canvasPoint(e);
  $("ref-canvas").setPointerCapture(e.pointerId);
});
$("ref-canvas").addEventListener("pointermove", (e) => {
  if (!state.drag) return;
  state.box = boxFrom(state.drag, canvasPoint(e));
  drawReference();
});
$("ref-canvas").addEventListener("pointerup", (e) => {
  if (!state.drag) return;
  const box = boxFrom(state.drag, canvasPoint(e));
  state.drag = null;
  state.box = box[2] > box[0] && box[3] > box[1] ? box : null;
  $("box-text").textContent = state.box ? `box ${state.box.join(", ")} (x0, y0, x1, y1 px)` : "no box yet";
  drawReference();
  clearStaleError();
});

// ------------------------------------------------------------------------------------------- the request

function buildRequest() {
  const image = $("image").files[0];
  if (!image) throw new Error("choose an image first (or click an example)");
  const mode = $("mode").value;
  const options = { mode, region: $("region").value, return: ["json"] };
  const body = new FormData();
  body.append("image", image);
  if (mode === "vocabulary") {
    options.classes = classTokens();
    if (!options.classes.length) {
      const some = state.labels.slice(0, 2).map((l) => l.label).join(", ") || "cat, grass";
      throw new Error(`type at least one class name, e.g. ${some}`);
    }
    const threshold = $("threshold").value.trim();
    if (threshold) options.background_threshold = Number(threshold);
  } else if (mode === "reference") {
    if (!state.box) throw new Error("draw a box on the reference image");
    const refFile = $("ref-image").files[0];
    if (refFile) body.append("ref0", refFile);
    options.references = [{ image: refFile ? "ref0" : "image", box: state.box,
                            label: $("ref-label").value.trim() || "target" }];
  }
  body.append("options", JSON.stringify(options));
  return { body, options, image };
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  let request;
  try { request = buildRequest(); } catch (e) { clearResult(); setStatus(e.message, "error"); return; }
  clearResult();
  $("segment").disabled = true;
  setStatus("segmenting…");
  try {
    const r = await fetch("/v1/segment", { method: "POST", body: request.body, headers: headers() });
    const answer = await r.json().catch(() => ({ error: `HTTP ${r.status}`, detail: "no JSON body" }));
    if (!r.ok) { setStatus(describeError(answer), "error"); return; }
    await showResult(answer, request);
  } catch (e) {
    setStatus("request failed: " + e, "error");
  } finally {
    $("segment").disabled = false;
  }
});

// ------------------------------------------------------------------------------------------- the result

// COCO compressed RLE (the counts string) → run lengths, as pycocotools' rleFrString reads it.
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// (H × W) region index per pixel, row-major; -1 = no region. RLE runs are column-major (COCO).
function regionMap(result) {
  const [H, W] = result.size, map = new Int32Array(H * W).fill(-1);
  result.regions.forEach((region, index) => {
    let at = 0;
    rleCounts(region.rle.counts).forEach((run, i) => {
      if (i % 2) for (let p = at; p < at + run; p++) map[(p % H) * W + Math.floor(p / H)] = index;
      at += run;
    });
  });
  return map;
}

// The inner edge of each label's area, the same rule as query.render.outline.
function edges(labels, W, H) {
  const edge = new Uint8Array(W * H);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    const i = y * W + x, v = labels[i];
    if (v && ((x > 0 && labels[i - 1] !== v) || (x < W - 1 && labels[i + 1] !== v) ||
              (y > 0 && labels[i - W] !== v) || (y < H - 1 && labels[i + W] !== v))) edge[i] = 1;
  }
  return edge;
}

function hexRGB(hex) { return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)); }

async function imagePixels(file, W, H) {
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const canvas = new OffscreenCanvas(W, H), ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0, W, H);
  return ctx.getImageData(0, 0, W, H).data;
}

async function showResult(answer, request) {
  const result = answer.result, [H, W] = result.size;
  const regions = regionMap(result);
  const value = new Map(result.classes.map((c, i) => [c, i + 1]));
  const labels = new Uint16Array(W * H);
  for (let i = 0; i < labels.length; i++) {
    const r = regions[i];
    labels[i] = r >= 0 && result.regions[r].label !== null ? value.get(result.regions[r].label) : 0;
  }
  const colours = answer.legend.map((e) => hexRGB(e.color));
  state.result = { answer, W, H, regions, labels, colours, edge: edges(labels, W, H),
                   pixels: await imagePixels(request.image, W, H) };
  const view = $("view");
  view.width = W; view.height = H;
  for (const id of ["view", "display", "hover-info"]) $(id).classList.remove("hidden");
  $("placeholder").classList.add("hidden");
  render();
  showLegend(answer.legend);
  showNotes(answer, request.options);
  const parts = [`mode ${result.mode}`, `${result.regions.length} regions`, `version ${answer.version}`,
                 `${Math.round(answer.timings_ms.segment)} ms`];
  if (result.exists !== null) parts.push(result.exists ? "target found" : "target NOT found (calibrated)");
  if (result.untrained) parts.push("untrained encoder");
  $("summary").textContent = parts.join(" · ");
  const labelled = answer.legend.filter((e) => e.value > 0 && e.pixels > 0).length;
  if (labelled) setStatus(`done: ${labelled} label${labelled > 1 ? "s" : ""} in the image`);
  else setStatus(nothingLabelled(result, request.options), "warn");
}

function nothingLabelled(result, options) {
  const best = Math.max(...result.regions.map((r) => r.score));
  if (options.background_threshold !== undefined)
    return `nothing labelled: every region scored below the background threshold ${options.background_threshold}` +
           ` (best region ${best.toFixed(3)}); lower or clear the threshold`;
  if (result.mode === "reference") return "nothing labelled: the target was not found in this image";
  if (result.mode === "foreground") return "nothing labelled: no region reached the foreground threshold";
  return `nothing labelled (${result.mode} mode)`;
}

function showNotes(answer, options) {
  const unknown = answer.unknown_classes || [];
  if (!unknown.length) { $("notes").textContent = ""; return; }
  const nearest = answer.result.details.prototypes || {};
  $("notes").textContent = "not bank labels: " + unknown.map((c) => nearest[c] ?
    `${c} (matched to ${nearest[c].map((m) => m[0]).join(", ")})` : c).join("; ");
}

function showLegend(legend) {
  const list = $("legend"), total = legend.reduce((n, e) => n + e.pixels, 0) || 1;
  list.innerHTML = "";
  for (const entry of legend) {
    if (entry.pixels === 0) continue;  // only what the image shows
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = entry.value === 0 ? "transparent" : entry.color;
    const name = document.createElement("span");
    name.textContent = entry.label ?? "background / unlabelled";
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * entry.pixels / total).toFixed(1)}%`;
    li.append(swatch, name, pct);
    li.dataset.label = entry.label ?? "";
    li.dataset.color = entry.value === 0 ? "" : entry.color;
    list.append(li);
  }
}

function render() {
  const r = state.result;
  if (!r) return;
  const alpha = Number($("opacity").value), outlines = $("outlines").checked;
  $("opacity-value").textContent = alpha.toFixed(2);
  const out = new ImageData(r.W, r.H), dst = out.data, src = r.pixels;
  for (let i = 0; i < r.W * r.H; i++) {
    const v = r.labels[i], a = v ? (outlines && r.edge[i] ? 1 : alpha) : 0, c = r.colours[v];
    for (let k = 0; k < 3; k++) dst[4 * i + k] = Math.round((1 - a) * src[4 * i + k] + a * c[k]);
    dst[4 * i + 3] = 255;
  }
  $("view").getContext("2d").putImageData(out, 0, 0);
}

function clearResult() {
  state.result = null;
  for (const id of ["view", "display", "hover-info", "tip"]) $(id).classList.add("hidden");
  $("placeholder").classList.remove("hidden");
  $("legend").innerHTML = "";
  $("notes").textContent = "";
  $("summary").textContent = "";
  setStatus("");
}

function hover(event) {
  const r = state.result;
  if (!r) return;
  const rect = $("view").getBoundingClientRect();
  const x = Math.floor((event.clientX - rect.left) * r.W / rect.width);
  const y = Math.floor((event.clientY - rect.top) * r.H / rect.height);
  if (x < 0 || y < 0 || x >= r.W || y >= r.H) return unhover();
  const index = r.regions[y * r.W + x], region = index >= 0 ? r.answer.result.regions[index] : null;
  const label = region ? region.label : null;
  const text = region ? `${label ?? "background / unlabelled"} · score ${region.score.toFixed(3)} · region ${index}`
                      : "no region";
  const tip = $("tip"), stage = $("stage").getBoundingClientRect();
  tip.textContent = text;
  tip.classList.remove("hidden");
  tip.style.left = `${Math.min(event.clientX - stage.left + 12, stage.width - tip.offsetWidth)}px`;
  tip.style.top = `${event.clientY - stage.top + 14}px`;
  $("hover-info").textContent = text;
  for (const li of $("legend").children) li.classList.toggle("active", region !== null && li.dataset.label === (label ?? ""));
}

function unhover() {
  $("tip").classList.add("hidden");
  for (const li of $("legend").children) li.classList.remove("active");
}

// ------------------------------------------------------------------------------------------- wiring

function imageChanged() {
  const file = $("image").files[0];
  clearResult();
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "block";
  if (!$("ref-image").files[0]) { state.refImage = null; if ($("mode").value === "reference") useReference(file); }
}

$("image").addEventListener("change", imageChanged);
$("ref-image").addEventListener("change", () => { useReference(selectedReferenceFile()); clearStaleError(); });
$("mode").addEventListener("change", showMode);
$("classes").addEventListener("input", () => { checkClasses(); suggest(); clearStaleError(); });
for (const id of ["threshold", "region", "ref-label"]) $(id).addEventListener("input", clearStaleError);
$("token").addEventListener("change", () => { clearStaleError(); loadBank(); });
$("opacity").addEventListener("input", render);
$("outlines").addEventListener("change", render);
$("view").addEventListener("pointermove", hover);
$("view").addEventListener("pointerdown", hover);
$("view").addEventListener("pointerleave", unhover);

$("token").value = localStorage.getItem("refbank-token") || "";
loadBank();
loadExamples();
