// ferkit serve page: upload a photo, POST it to /api/predict, draw the faces and one bar chart per face.
"use strict";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];
const $ = (id) => document.getElementById(id);
let classNames = [];

function colour(label) {
  const i = classNames.indexOf(label);
  return i < 0 ? "#999" : PALETTE[i % PALETTE.length];
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", Boolean(isError));
}

async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  classNames = info.class_names;
  const faces = {detect: "detected by " + info.detector, none: "inputs are face crops",
    auto: "small images taken as face crops, photos detected by " + info.detector}[info.faces];
  $("model-info").textContent = `model ${info.model} · ${info.class_names.length} expressions · faces: ${faces}`;
  if (info.warning) {
    $("domain-warning").textContent = "Warning: " + info.warning;
    $("domain-warning").hidden = false;
  }
  $("limits").textContent = `${info.accepted.join(", ").toUpperCase()} · up to ` +
    `${+(info.max_bytes / 1048576).toFixed(1)} MiB`;
}

function drawFaces(img, result) {
  const canvas = $("canvas");
  canvas.width = result.width;
  canvas.height = result.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const side = Math.max(result.width, result.height);
  const line = Math.max(1, Math.round(side / 300));
  const fontPx = Math.max(10, Math.round(side / 24));
  ctx.font = `bold ${fontPx}px system-ui, sans-serif`;
  result.faces.forEach((f, k) => {
    const [x0, y0, x1, y1] = f.box;
    const c = colour(f.label);
    ctx.lineWidth = line;
    ctx.strokeStyle = c;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const text = `${k + 1} ${f.label}`;
    const h = Math.round(fontPx * 1.4);
    const ty = y0 - h >= 0 ? y0 - h : y1;
    ctx.fillStyle = c;
    ctx.fillRect(x0, ty, ctx.measureText(text).width + fontPx * 0.6, h);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x0 + fontPx * 0.3, ty + fontPx * 1.05);
  });
}

function faceCard(f, k) {
  const li = document.createElement("li");
  li.className = "face";
  li.style.setProperty("--c", colour(f.label));
  const h = document.createElement("h2");
  h.innerHTML = `Face ${k + 1}: <span class="label"></span> <span class="score"></span>`;
  h.querySelector(".label").textContent = f.label;
  h.querySelector(".score").textContent = f.score == null ? "" : `(detector ${f.score.toFixed(2)})`;
  li.appendChild(h);
  Object.entries(f.probs).sort((a, b) => b[1] - a[1]).forEach(([name, p]) => {
    const row = document.createElement("div");
    row.className = "bar" + (name === f.label ? " top" : "");
    row.dataset.label = name;
    row.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span>' +
                    '<span class="value"></span>';
    row.querySelector(".name").textContent = name;
    row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".fill").style.background = colour(name);
    row.querySelector(".value").textContent = `${(100 * p).toFixed(1)}%`;
    li.appendChild(row);
  });
  return li;
}

async function upload(file) {
  if (!file) return;
  setStatus(`analysing ${file.name} …`);
  document.body.dataset.state = "busy";
  $("result").hidden = true;
  let response, payload;
  try {
    response = await fetch("/api/predict", {
      method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"}});
    payload = await response.json();
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(`${response.status}: ${payload.error}`, true);
    document.body.dataset.state = "error";
    return;
  }
  const img = new Image();
  const show = (preview) => {
    if (preview) drawFaces(img, payload);
    $("stage").hidden = !preview;
    $("faces").replaceChildren(...payload.faces.map(faceCard));
    $("result").hidden = false;
    const n = payload.faces.length;
    const note = preview ? "" : " · (this browser cannot preview the format)";
    setStatus(n ? `${n} face${n > 1 ? "s" : ""} · ${payload.elapsed_ms} ms${note}` : payload.message, n === 0);
    document.body.dataset.state = "done";
    URL.revokeObjectURL(img.src);
  };
  img.onload = () => show(true);
  img.onerror = () => show(false);
  img.src = URL.createObjectURL(file);
}

window.addEventListener("DOMContentLoaded", () => {
  loadInfo().catch((e) => setStatus(`cannot reach the server: ${e}`, true));
  $("file").addEventListener("change", (e) => upload(e.target.files[0]));
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => upload(e.dataTransfer.files[0]));
});
