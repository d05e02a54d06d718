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
    s.title = item.name; // the whole name on hover; the card shows what fits
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
    showKnownCaptions();
    selectWord(-1);
  } catch (e) { showError(e.message); }
}

function selectWord(index) {
  document.querySelectorAll("#words button").forEach((b) => b.classList.toggle("active", parseInt(b.dataset.token, 10) === index));
  let w, label;
  if (index >= 0) {
    w = heat.weights[index];
    label = `"${heat.tokens[index]}"`;
  } else {
    // the encoder's start and end tokens ([CLS]/[SEP], <s>/</s>) are always first and last
    const rows = heat.weights.filter((_, i) => i > 0 && i < heat.weights.length - 1);
    const use = rows.length ? rows : heat.weights;
    w = use[0].map((_, j) => use.reduce((a, r) => a + r[j], 0) / use.length);
    label = "all words";
  }
  drawHeat(w, label);
}

// A perceptual dark-to-bright ramp (black, purple, red, orange, pale yellow), as in `inferno`.
const RAMP = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function rampColour(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  return RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
}

const pct = (v) => `${(100 * v).toFixed(2)}%`;
const TOP_REGIONS = 3;
const FLAT_SPREAD = 0.25; // (max - min) / max below this: the map says little

function drawHeat(w, label) {
  const canvas = $("heat-canvas");
  const ctx = canvas.getContext("2d");
  const side = heat.grid || Math.round(Math.sqrt(w.length));
  const cell = canvas.width / side;
  const lo = Math.min(...w), hi = Math.max(...w);
  const span = hi - lo || 1;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  // contrast per map: the least attended region is dark, the most attended bright
  for (let r = 0; r < side; r++) {
    for (let c = 0; c < side; c++) {
      const t = (w[r * side + c] - lo) / span;
      const [R, G, B] = rampColour(t);
      ctx.fillStyle = `rgba(${R}, ${G}, ${B}, ${(0.35 + 0.3 * (1 - t)).toFixed(3)})`;
      ctx.fillRect(c * cell, r * cell, cell, cell);
    }
  }
  ctx.strokeStyle = "rgba(255, 255, 255, 0.35)"; // the region grid
  ctx.lineWidth = 1;
  for (let i = 1; i < side; i++) {
    ctx.beginPath(); ctx.moveTo(i * cell, 0); ctx.lineTo(i * cell, canvas.height); ctx.stroke();
    ctx.beginPath(); ctx.moveTo(0, i * cell); ctx.lineTo(canvas.width, i * cell); ctx.stroke();
  }
  const top = w.map((v, j) => [v, j]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, TOP_REGIONS).map((x) => x[1]);
  ctx.strokeStyle = "#fff"; // the most attended regions outlined
  ctx.lineWidth = 2.5;
  top.forEach((j) => ctx.strokeRect((j % side) * cell + 1.5, Math.floor(j / side) * cell + 1.5, cell - 3, cell - 3));
  canvas.dataset.top = top.join(",");
  canvas.dataset.drawn = "1";
  // the colour bar gives the real attention range of this map
  $("heat-min").textContent = pct(lo);
  $("heat-max").textContent = pct(hi);
  $("heat-label").textContent = `attention of ${label} per region`;
  const mass = w.reduce((a, v) => a + v, 0);
  const flat = (hi - lo) / (hi || 1) < FLAT_SPREAD;
  $("heat-flat").hidden = !flat;
  $("heat-flat").textContent = flat
    ? `Nearly uniform: every region gets ${pct(lo)}–${pct(hi)} of this attention, so the model does not point at a part of the photo for ${label}.`
    : "";
  $("heat-mass").textContent = `${pct(mass)} of the attention goes to the photo's ${w.length} regions (the rest to the sentence's own words); outlined: the ${TOP_REGIONS} most attended regions.`;
}

function showKnownCaptions() {
  const list = $("known-captions");
  list.replaceChildren(...heat.captions.map((t) => {
    const li = document.createElement("li");
    li.textContent = t;
    return li;
  }));
  $("known-wrap").hidden = heat.captions.length === 0;
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
