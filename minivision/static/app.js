// The page of `python -m minisam.app` and `python -m miniflorence.app`: plain JavaScript, no build
// step, nothing fetched from anywhere but this server. The server says which model family it has
// (GET /api/info) and the page shows that family's panel.
//
// Coordinates: the canvas holds the image at its own size (W x H pixels); the browser scales it to fit,
// so a mouse position is mapped back to image pixels with the canvas's displayed size. Prompts and
// answers are always in image pixels, as `SamPredictor.predict` and Florence-2's post-processing use.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

// Everything the page knows; `window.mv` exposes it to the browser tests.
const state = {
  info: null,        // GET /api/info
  imageId: null,     // the server's id of the current image (one per upload: tabs never share one)
  bitmap: null,      // the decoded image, drawn under everything
  width: 0, height: 0,
  ready: false,      // SAM: the image embedding exists
  busy: false,       // a request to the model is under way
  points: [],        // [[x, y, label]], label 1 foreground, 0 background
  box: null,         // [x0, y0, x1, y1]
  history: [],       // "point" | {box: previous box}: what Undo takes back
  candidates: null,  // {masks: [Uint8Array W*H (row-major)], scores, coco}
  selected: 0,
  everything: null,  // [{mask: Uint8Array, colour}]
  drawn: null,       // Florence-2: {boxes: [[x0, y0, x1, y1, label]], quads: [...], polygons: [...]}
  lastDecoderMs: null,
};
window.mv = state;

// ---- messages and requests ----------------------------------------------------------------------

function say(text, kind = "info") {
  const m = $("message");
  m.textContent = text || "";
  m.className = text ? kind : "";
}

// A JSON request; a refusal or a dead server becomes one message on the page and a thrown Error.
async function api(method, path, body, contentType = "application/json") {
  let response;
  try {
    response = await fetch(path, {method, body, headers: body === undefined ? {} : {"Content-Type": contentType}});
  } catch (e) {
    throw new Error("the server does not answer (was it stopped?): start it again, then re-open the image");
  }
  let value;
  try {
    value = await response.json();
  } catch (e) {
    throw new Error(`the server sent an unreadable answer (HTTP ${response.status})`);
  }
  if (!response.ok) throw new Error(value.error || `HTTP ${response.status}`);
  return value;
}

function progress(text) {
  $("progress").hidden = !text;
  $("progress-text").textContent = text || "";
}

// ---- opening an image ---------------------------------------------------------------------------

async function openImage(blob, name) {
  if (state.busy) { say("wait for the current request to finish", "error"); return; }
  if (blob.type && !blob.type.startsWith("image/")) {
    say(`${name} is not an image (${blob.type}): choose a JPEG, PNG, ... file`, "error");
    return;
  }
  const family = state.info.family === "sam" ? "sam" : "florence";
  Object.assign(state, {imageId: null, ready: false, points: [], box: null, history: [], candidates: null,
                        everything: null, drawn: null});
  updateCandidates();
  $("answer").textContent = "";
  progress(`uploading ${name}…`);
  say("");
  let uploaded;
  try {
    uploaded = await api("POST", `/api/${family}/image`, blob, blob.type || "application/octet-stream");
  } catch (e) {
    progress(null);
    say(`${name}: ${e.message}`, "error");
    return;
  }
  try {
    state.bitmap = await createImageBitmap(blob);  // upright by its EXIF orientation, as the server reads it
  } catch (e) {
    state.bitmap = null;
  }
  state.imageId = uploaded.image;
  state.width = uploaded.width;
  state.height = uploaded.height;
  canvas.width = uploaded.width;
  canvas.height = uploaded.height;
  $("drop-hint").hidden = true;
  redraw();
  if (family === "sam") await waitForEncoding(name); else { progress(null); say(`${name}: pick a task and Run`); }
}

// SAM encodes the image once, in the background; the page polls until the embedding is ready.
async function waitForEncoding(name) {
  const id = state.imageId;
  for (;;) {
    let status;
    try {
      status = await api("GET", `/api/sam/status?image=${encodeURIComponent(id)}`);
    } catch (e) {
      progress(null);
      say(e.message, "error");
      return;
    }
    if (state.imageId !== id) return;  // another image was opened meanwhile
    if (status.state === "ready") {
      state.ready = true;
      progress(null);
      say(`${name}: encoded in ${status.seconds} s. Click on an object.`);
      return;
    }
    if (status.state === "failed") {
      progress(null);
      say(status.error, "error");
      return;
    }
    progress(`encoding the image… ${status.seconds.toFixed(1)} s`);
    await new Promise((resolve) => setTimeout(resolve, 150));
  }
}

$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) openImage(file, file.name);
  e.target.value = "";
});

const stage = $("stage");
stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragging"); });
stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
stage.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("dragging");
  const file = e.dataTransfer.files[0];
  if (file) openImage(file, file.name); else say("drop an image file", "error");
});

function addPhotoButtons(photos) {
  for (const path of photos) {
    const button = document.createElement("button");
    const name = path.split("/").pop();
    button.textContent = name.replace(/\.[^.]+$/, "");
    button.addEventListener("click", async () => {
      const response = await fetch(path);
      openImage(await response.blob(), name);
    });
    $("photos").appendChild(button);
  }
}

// ---- drawing ------------------------------------------------------------------------------------

const COLOURS = ["#ff3b30", "#34c759", "#007aff", "#ff9500", "#af52de", "#00c7be", "#ffcc00", "#ffffff"];

function redraw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (state.bitmap) ctx.drawImage(state.bitmap, 0, 0, canvas.width, canvas.height);
  if (state.everything) {
    for (const m of state.everything) paintMask(m.mask, m.colour, 0.55);
  } else if (state.candidates) {
    paintMask(state.candidates.masks[state.selected], [30, 144, 255], 0.5);  // the official notebooks' blue
  }
  const r = Math.max(3, Math.max(canvas.width, canvas.height) / 150);
  for (const [x, y, label] of state.points) {
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = label === 1 ? "#00c800" : "#dc0000";
    ctx.fill();
    ctx.lineWidth = Math.max(1, r / 3);
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
  if (state.box) strokeBox(state.box, "#00c800");
  if (drag && drag.moved) strokeBox(dragBox(drag), "#ffcc00");
  if (state.drawn) drawFlorence(state.drawn);
}

// Blend an RGB colour into the canvas where mask (W*H, row-major, 1 = set) is set.
function paintMask(mask, colour, alpha) {
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    for (let c = 0; c < 3; c++) data[4 * i + c] = Math.round((1 - alpha) * data[4 * i + c] + alpha * colour[c]);
  }
  ctx.putImageData(pixels, 0, 0);
}

function strokeBox([x0, y0, x1, y1], colour) {
  ctx.lineWidth = Math.max(2, Math.max(canvas.width, canvas.height) / 400);
  ctx.strokeStyle = colour;
  ctx.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
}

function label(text, x, y, colour) {
  if (!text) return;
  const size = Math.max(12, Math.round(Math.max(canvas.width, canvas.height) / 60));
  ctx.font = `${size}px sans-serif`;
  const w = ctx.measureText(text).width;
  ctx.fillStyle = colour;
  ctx.fillRect(x, Math.max(0, y - size - 4), w + 6, size + 4);
  ctx.fillStyle = "#000";
  ctx.fillText(text, x + 3, Math.max(size, y - 4));
}

// An uncompressed COCO RLE (column-major runs, background first) -> a row-major W*H mask.
function decodeRle(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let p = 0;
  rle.counts.forEach((count, k) => {
    if (k % 2 === 1) {
      for (let j = p; j < p + count; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;  // j = x * H + y
    }
    p += count;
  });
  return mask;
}

// ---- SAM: prompts from the mouse ----------------------------------------------------------------

let drag = null;  // {x0, y0, x1, y1, moved, negative}

function toImage(e) {
  const rect = canvas.getBoundingClientRect();
  return [(e.clientX - rect.left) * canvas.width / rect.width, (e.clientY - rect.top) * canvas.height / rect.height];
}

function inside([x, y]) {
  return x >= 0 && y >= 0 && x <= state.width && y <= state.height;
}

function dragBox(d) {
  return [Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1), Math.max(d.y0, d.y1)];
}

canvas.addEventListener("contextmenu", (e) => e.preventDefault());
canvas.addEventListener("mousedown", (e) => {
  if (!state.info || state.info.family !== "sam") return;
  e.preventDefault();
  if (!state.imageId) { say("open an image first", "error"); return; }
  if (!state.ready) { say("the image is still being encoded: wait for it to finish, then click", "error"); return; }
  const [x, y] = toImage(e);
  drag = {x0: x, y0: y, x1: x, y1: y, moved: false, negative: e.button === 2 || e.shiftKey};
});
window.addEventListener("mousemove", (e) => {
  if (!drag) return;
  [drag.x1, drag.y1] = toImage(e);
  const scale = canvas.getBoundingClientRect().width / canvas.width;
  if (Math.hypot(drag.x1 - drag.x0, drag.y1 - drag.y0) * scale > 5) drag.moved = true;
  if (drag.moved) redraw();
});
window.addEventListener("mouseup", (e) => {
  if (!drag) return;
  const d = drag;
  drag = null;
  [d.x1, d.y1] = toImage(e);
  if (!inside([d.x1, d.y1])) {
    say("that was outside the image: click or drag on the picture", "error");
    redraw();
    return;
  }
  if (d.moved) {
    state.history.push({box: state.box});
    state.box = dragBox(d).map((v) => Math.round(v));
  } else {
    state.history.push("point");
    state.points.push([Math.floor(d.x0), Math.floor(d.y0), d.negative ? 0 : 1]);
  }
  segment();
});

async function segment() {
  state.everything = null;
  if (!state.points.length && !state.box) {
    state.candidates = null;
    updateCandidates();
    redraw();
    return;
  }
  if (state.busy) { say("still working on the last prompt…", "info"); }
  state.busy = true;
  redraw();
  try {
    const answer = await api("POST", "/api/sam/predict",
                             JSON.stringify({image: state.imageId, points: state.points, box: state.box}));
    state.candidates = {masks: answer.masks.map(decodeRle), scores: answer.scores, coco: answer.coco};
    state.selected = answer.scores.indexOf(Math.max(...answer.scores));
    state.lastDecoderMs = answer.decoder_ms;
    $("latency").textContent = `decoder: ${answer.decoder_ms} ms`;
    say("");
  } catch (e) {
    say(e.message, "error");
    undo(false);  // the prompt that failed is not kept
  } finally {
    state.busy = false;
  }
  updateCandidates();
  redraw();
}

function updateCandidates() {
  const box = $("candidates");
  box.textContent = "";
  const c = state.candidates;
  $("download-png").disabled = $("download-rle").disabled = !c;
  if (!c) return;
  c.scores.forEach((score, i) => {
    const button = document.createElement("button");
    button.textContent = `${i + 1}: ${score.toFixed(3)}`;
    button.className = i === state.selected ? "selected" : "";
    button.addEventListener("click", () => { state.selected = i; updateCandidates(); redraw(); });
    box.appendChild(button);
  });
}

function undo(again = true) {
  const last = state.history.pop();
  if (last === "point") state.points.pop(); else if (last) state.box = last.box;
  if (again) segment();
}

$("undo").addEventListener("click", () => undo());
$("clear").addEventListener("click", () => {
  Object.assign(state, {points: [], box: null, history: [], candidates: null, everything: null});
  updateCandidates();
  redraw();
});

$("everything").addEventListener("click", async () => {
  if (!state.ready) { say(state.imageId ? "the image is still being encoded" : "open an image first", "error"); return; }
  progress("segmenting everything…");
  try {
    const answer = await api("POST", "/api/sam/everything", JSON.stringify({image: state.imageId}));
    // distinct colours: hues spaced by the golden angle
    state.everything = answer.masks.map((m, i) => ({mask: decodeRle(m.rle), colour: hsv(i * 0.618034 % 1, 0.85, 1)}));
    state.candidates = null;
    updateCandidates();
    say(`${answer.masks.length} masks in ${(answer.ms / 1000).toFixed(1)} s`);
  } catch (e) {
    say(e.message, "error");
  }
  progress(null);
  redraw();
});

function hsv(h, s, v) {
  const f = (n) => { const k = (n + h * 6) % 6; return Math.round(255 * (v - v * s * Math.max(0, Math.min(k, 4 - k, 1)))); };
  return [f(5), f(3), f(1)];
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

$("download-png").addEventListener("click", () => {
  const mask = state.candidates.masks[state.selected];
  const out = document.createElement("canvas");
  out.width = state.width;
  out.height = state.height;
  const c = out.getContext("2d");
  const pixels = c.createImageData(state.width, state.height);
  for (let i = 0; i < mask.length; i++) {
    const v = mask[i] ? 255 : 0;
    pixels.data.set([v, v, v, 255], 4 * i);
  }
  c.putImageData(pixels, 0, 0);
  out.toBlob((blob) => download(blob, "mask.png"), "image/png");
});

$("download-rle").addEventListener("click", () => {
  const c = state.candidates;
  const record = {segmentation: c.coco[state.selected], predicted_iou: c.scores[state.selected],
                  point_coords: state.points, box: state.box};
  download(new Blob([JSON.stringify(record)], {type: "application/json"}), "mask.json");
});

// ---- Florence-2 ---------------------------------------------------------------------------------

const CUSTOM = "custom…";

function setUpTasks(tasks) {
  const select = $("task");
  for (const t of [...tasks.map((t) => t.task), CUSTOM]) {
    const option = document.createElement("option");
    option.value = option.textContent = t;
    select.appendChild(option);
  }
  const takesText = Object.fromEntries(tasks.map((t) => [t.task, t.takes_text]));
  const update = () => {
    const custom = select.value === CUSTOM;
    $("custom-task").hidden = !custom;
    $("task-text").disabled = !(custom || takesText[select.value]);
    if ($("task-text").disabled) $("task-text").value = "";
  };
  select.addEventListener("change", update);
  select.value = "<OD>";
  update();
}

$("run").addEventListener("click", async () => {
  if (!state.imageId) { say("open an image first", "error"); return; }
  if (state.busy) { say("wait for the current request to finish", "error"); return; }
  const task = $("task").value === CUSTOM ? $("custom-task").value.trim() : $("task").value;
  const text = $("task-text").disabled ? null : $("task-text").value;
  state.busy = true;
  progress(`running ${task}…`);
  try {
    const answer = await api("POST", "/api/florence/run", JSON.stringify({image: state.imageId, task, text}));
    const value = answer.result[answer.task];
    state.drawn = shapesOf(value);
    $("answer").textContent = typeof value === "string" ? value : formatAnswer(value);
    say(`${task}: ${(answer.ms / 1000).toFixed(1)} s`);
  } catch (e) {
    say(e.message, "error");
  }
  state.busy = false;
  progress(null);
  redraw();
});

// A post-processed dict, one line per list item: {"bboxes": [[...], ...], "labels": [...]}.
function formatAnswer(value) {
  return Object.entries(value).map(([key, items]) => Array.isArray(items)
    ? `${key}:\n` + items.map((item, i) => `  ${i}: ${JSON.stringify(item)}`).join("\n")
    : `${key}: ${JSON.stringify(items)}`).join("\n");
}

// The shapes of a post-processed answer, as `miniflorence.__main__.draw_results` draws them.
function shapesOf(value) {
  const drawn = {boxes: [], quads: [], polygons: []};
  if (typeof value !== "object" || value === null) return drawn;
  const boxLabels = value.labels || value.bboxes_labels || [];
  (value.bboxes || []).forEach((b, i) => drawn.boxes.push([...b, boxLabels[i] || ""]));
  (value.quad_boxes || []).forEach((q, i) => drawn.quads.push([...q, (value.labels || [])[i] || ""]));
  const polyLabels = value.labels || value.polygons_labels || [];
  (value.polygons || []).forEach((polys, i) => polys.forEach((flat) => drawn.polygons.push([flat, polyLabels[i] || ""])));
  return drawn;
}

function drawFlorence(drawn) {
  ctx.lineWidth = Math.max(2, Math.max(canvas.width, canvas.height) / 400);
  drawn.boxes.forEach(([x0, y0, x1, y1, text], i) => {
    strokeBox([x0, y0, x1, y1], COLOURS[i % COLOURS.length]);
    label(text, Math.min(x0, x1), Math.min(y0, y1), COLOURS[i % COLOURS.length]);
  });
  drawn.quads.forEach((q, i) => {
    path(q.slice(0, 8), COLOURS[i % COLOURS.length]);
    label(q[8], q[0], q[1], COLOURS[i % COLOURS.length]);
  });
  drawn.polygons.forEach(([flat, text], i) => {
    path(flat, COLOURS[i % COLOURS.length]);
    label(text, flat[0], flat[1], COLOURS[i % COLOURS.length]);
  });
}

function path(flat, colour) {
  if (flat.length < 4) return;
  ctx.beginPath();
  ctx.moveTo(flat[0], flat[1]);
  for (let k = 2; k + 1 < flat.length; k += 2) ctx.lineTo(flat[k], flat[k + 1]);
  ctx.closePath();
  ctx.strokeStyle = colour;
  ctx.stroke();
}

// ---- start --------------------------------------------------------------------------------------

(async () => {
  try {
    state.info = await api("GET", "/api/info");
  } catch (e) {
    say(e.message, "error");
    return;
  }
  const sam = state.info.family === "sam";
  $("family").textContent = sam ? "· Segment Anything" : "· Florence-2";
  document.title = sam ? "minivision · SAM" : "minivision · Florence-2";
  $("model-name").textContent = state.info.model || "";
  $("sam-panel").hidden = !sam;
  $("florence-panel").hidden = sam;
  if (!sam) setUpTasks(state.info.tasks);
  addPhotoButtons(state.info.photos || []);
  say("open an image to start");
})();
