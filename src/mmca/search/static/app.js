"use strict";
// The search page: plain DOM, no build step. Talks to the JSON API of `mmca serve`.
const $ = (id) => document.getElementById(id);
let lastQuery = "";
let heat = null; // {tokens, weights, grid}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

async function api(path, options) {
  const res = await fetch(path, options);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const msg = body && body.error ? body.error : `request failed (${res.status})`;
    throw new Error(body && body.hint ? `${msg} — ${body.hint}` : msg);
  }
  return body;
}

function postJSON(path, data) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });
}

async function loadInfo() {
  try {
    const info = await api("/api/info");
    $("info").textContent = `${info.images} images · ${info.captions} captions · checkpoint ${info.checkpoint.sha256.slice(0, 12)}`;
  } catch (e) { $("info").textContent = "index unavailable"; showError(e.message); }
}

function card(item, onClick) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.id = item.id;
  const img = document.createElement("img");
  img.src = `/api/image/${item.id}`;
  img.alt = item.name;
  img.loading = "lazy";
  div.appendChild(img);
  if (item.score !== undefined) {
    const s = document.createElement("div");
    s.className = "score";
    s.textContent = `${item.score.toFixed(4)} · ${item.name}`;
    div.appendChild(s);
  }
  div.addEventListener("click", () => onClick(item, div));
  return div;
}

$("text-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const query = $("query").value;
  const k = parseInt($("k").value, 10) || 10;
  $("text-status").textContent = "searching…";
  try {
    const out = await postJSON("/api/search", { query, k });
    lastQuery = query;
    const grid = $("results");
    grid.replaceChildren(...out.results.map((r) => card(r, openHeatmap)));
    $("text-status").textContent = `${out.results.length} images in ${out.ms.toFixed(0)} ms (cross unit on ${out.pair_passes} pairs)`;
  } catch (e) { $("text-status").textContent = ""; showError(e.message); }
});

async function openHeatmap(item, div) {
  document.querySelectorAll("#results .card").forEach((c) => c.classList.remove("selected"));
  div.classList.add("selected");
  try {
    heat = await postJSON("/api/heatmap", { query: lastQuery, image: item.id });
    $("heat-img").src = `/api/image/${item.id}`;
    $("heat-score").textContent = `${item.name} · S = ${heat.score.toFixed(4)}`;
    const words = $("words");
    const buttons = [];
    const all = document.createElement("button");
    all.textContent = "all words";
    all.dataset.token = "-1";
    buttons.push(all);
    heat.tokens.forEach((t, i) => {
      const b = document.createElement("button");
      b.textContent = t;
      b.dataset.token = String(i);
      buttons.push(b);
    });
    buttons.forEach((b) => b.addEventListener("click", () => selectWord(parseInt(b.dataset.token, 10))));
    words.replaceChildren(...buttons);
    $("heatmap-section").hidden = false;
    selectWord(-1);
  } catch (e) { showError(e.message); }
}

function selectWord(index) {
  document.querySelectorAll("#words button").forEach((b) => b.classList.toggle("active", parseInt(b.dataset.token, 10) === index));
  let w;
  if (index >= 0) {
    w = heat.weights[index];
  } else {
    const rows = heat.weights.filter((_, i) => !/^\[(CLS|SEP)\]$/.test(heat.tokens[i]));
    const use = rows.length ? rows : heat.weights;
    w = use[0].map((_, j) => use.reduce((a, r) => a + r[j], 0) / use.length);
  }
  drawHeat(w);
}

function drawHeat(w) {
  const canvas = $("heat-canvas");
  const ctx = canvas.getContext("2d");
  const side = heat.grid || Math.round(Math.sqrt(w.length));
  const cell = canvas.width / side;
  const max = Math.max(...w) || 1;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let r = 0; r < side; r++) {
    for (let c = 0; c < side; c++) {
      const v = w[r * side + c] / max;            // 1 = the most attended region
      ctx.fillStyle = `rgba(0, 0, 0, ${(0.75 * (1 - v)).toFixed(3)})`;  // dim what is not attended
      ctx.fillRect(c * cell, r * cell, cell, cell);
      ctx.fillStyle = `rgba(255, 80, 0, ${(0.45 * v).toFixed(3)})`;
      ctx.fillRect(c * cell, r * cell, cell, cell);
    }
  }
  canvas.dataset.drawn = "1";
}

function showCaptions(out) {
  const list = $("captions");
  list.replaceChildren(...out.results.map((r) => {
    const li = document.createElement("li");
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = r.score.toFixed(4);
    li.appendChild(s);
    li.appendChild(document.createTextNode(r.text));
    return li;
  }));
  $("image-status").textContent = `${out.results.length} captions in ${out.ms.toFixed(0)} ms`;
}

$("image-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("upload").files[0];
  if (!file) { showError("choose an image file first"); return; }
  const form = new FormData();
  form.append("file", file);
  form.append("k", "5");
  $("image-status").textContent = "searching…";
  try {
    $("query-image").src = URL.createObjectURL(file);
    $("query-image-wrap").hidden = false;
    showCaptions(await api("/api/search_image", { method: "POST", body: form }));
  } catch (e) { $("image-status").textContent = ""; showError(e.message); }
});

$("pick-btn").addEventListener("click", async () => {
  const box = $("gallery");
  if (!box.hidden) { box.hidden = true; return; }
  try {
    const out = await api("/api/gallery?offset=0&limit=120");
    box.replaceChildren(...out.items.map((it) => card(it, pickGallery)));
    box.hidden = false;
  } catch (e) { showError(e.message); }
});

async function pickGallery(item) {
  $("image-status").textContent = "searching…";
  try {
    $("query-image").src = `/api/image/${item.id}`;
    $("query-image-wrap").hidden = false;
    showCaptions(await postJSON("/api/search_gallery", { image: item.id, k: 5 }));
  } catch (e) { $("image-status").textContent = ""; showError(e.message); }
}

loadInfo();
