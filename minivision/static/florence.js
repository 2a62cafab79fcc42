// The Florence-2 panel of the page (see app.js): tasks, running one, drawing the answer.
"use strict";

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

