// The SAM panel of the page (see app.js): prompts from the mouse, candidates, segment everything, downloads.
"use strict";

// ---- SAM: prompts from the mouse ----------------------------------------------------------------

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

