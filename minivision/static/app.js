// The page of `python -m minisam.app` and `python -m miniflorence.app`: plain JavaScript, no build
// step, nothing fetched from anywhere but this server. The server says which model family it has
// (GET /api/info) and the page shows that family's panel. app.js: what both panels share (opening an
// image, requests and messages, drawing); sam.js and florence.js: each panel's own controls.
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
// Settles once GET /api/info has answered (true) or failed (false): an image opened in the first moments,
// before the page knows its server, waits for it instead of being lost.
let pageStarted;
const started = new Promise((resolve) => { pageStarted = resolve; });
let drag = null;  // SAM: the mouse drag under way, {x0, y0, x1, y1, moved, negative}

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
  if (!(await started)) return;  // the message of the failed start stays on the page
  if (state.busy) { say("wait for the current request to finish", "error"); return; }
  if (blob.type && !blob.type.startsWith("image/")) {
    say(`${name} is not an image (${blob.type}): choose a JPEG, PNG, ... file`, "error");
    return;
  }
  if (blob.size > state.info.max_upload) {
    const mib = (n) => (n / 2 ** 20).toFixed(1);
    say(`${name} is ${mib(blob.size)} MiB; this server takes at most ${mib(state.info.max_upload)} MiB ` +
        "(start it with a larger --max-upload-mb)", "error");
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

// ---- start --------------------------------------------------------------------------------------

window.addEventListener("load", async () => {  // after sam.js and florence.js
  try {
    state.info = await api("GET", "/api/info");
  } catch (e) {
    say(e.message, "error");
    pageStarted(false);
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
  pageStarted(true);
});
