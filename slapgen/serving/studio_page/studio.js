// slapgen studio: a client of the service's public HTTP API only (templates, render, adapters,
// jobs, info, ratings). No framework, no CDN: this file, the page and its stylesheet are all there is.
"use strict";

const $ = (id) => document.getElementById(id);
const CRITERIA = [
  ["motion_accuracy", "Motion accuracy"],
  ["impact_realism", "Impact realism"],
  ["prompt_adherence", "Prompt adherence"],
  ["overall", "Overall"],
];
const HISTORY_KEY = "slapgen-studio-history";
const state = { info: null, templates: [], adapters: [], runningTask: null, pair: null };

class ApiError extends Error {}
class Cancelled extends Error {}

// ---------- HTTP ----------

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new ApiError(message);
  }
  return body;
}

const postJson = (path, body) =>
  api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Submit a job and follow it to the end: onProgress(step, total, etaSeconds). Resolves to an object URL
// of the mp4; rejects with Cancelled when someone cancels it, ApiError when it fails.
async function runJob(body, onProgress) {
  const { task_id: taskId } = await postJson("/jobs/submit", body);
  state.runningTask = taskId;
  let firstStepAt = null;
  let firstStep = 0;
  try {
    for (;;) {
      await sleep(150);
      let progress;
      try {
        progress = await api(`/jobs/progress?task_id=${encodeURIComponent(taskId)}`);
      } catch (error) {
        continue; // not on the board yet
      }
      const { state: jobState, step, total_steps: total } = progress;
      if (jobState === "running" && step > 0) {
        if (firstStepAt === null) { firstStepAt = performance.now(); firstStep = step; }
        const done = step - firstStep;
        const eta = done > 0 ? ((performance.now() - firstStepAt) / 1000 / done) * (total - step) : null;
        onProgress(step, total, eta);
      }
      if (jobState === "canceled") throw new Cancelled(progress.error || "cancelled");
      if (jobState === "failed") throw new ApiError(progress.error || "the job failed");
      if (jobState === "completed") {
        onProgress(total, total, 0);
        return await fetchResult(taskId);
      }
    }
  } finally {
    state.runningTask = null;
  }
}

async function fetchResult(taskId) {
  // The job board says completed a moment before BentoML's task store has the result.
  for (let tries = 0; tries < 200; tries++) {
    const status = await api(`/jobs/status?task_id=${encodeURIComponent(taskId)}`);
    if (status.status === "completed") break;
    await sleep(100);
  }
  const response = await fetch(`/jobs/get?task_id=${encodeURIComponent(taskId)}`);
  if (!response.ok) throw new ApiError(`could not fetch the video (${response.status})`);
  return URL.createObjectURL(await response.blob());
}

// ---------- the shared form ----------

function promptSource() {
  return document.querySelector('input[name="prompt-source"]:checked').value;
}

function slotValues() {
  const values = {};
  for (const field of $("slots").querySelectorAll("[data-slot]")) {
    if (field.value.trim() !== "") values[field.dataset.slot] = field.value;
  }
  return values;
}

// The request body the form describes, for one system (adapter name or null for the base model).
function requestBody(system = { adapter: $("adapter").value || null, scale: Number($("adapter-scale").value) }, seed = null) {
  const body = {
    num_frames: Number($("num-frames").value),
    num_inference_steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    seed: seed === null ? Number($("seed").value) : seed,
    width: Number($("width").value),
    height: Number($("height").value),
  };
  if (promptSource() === "template") {
    body.template = $("template").value;
    body.slots = slotValues();
  } else {
    body.prompt = $("prompt").value;
  }
  if (system.adapter) {
    body.adapter = system.adapter;
    body.adapter_scale = system.scale;
  }
  return body;
}

function describeBody(body) {
  const system = body.adapter ? `${body.adapter} × ${body.adapter_scale}` : "base model";
  const what = body.template ? `template ${body.template}` : "own prompt";
  return `${system} · ${what} · seed ${body.seed} · ${body.num_frames} frames · ${body.num_inference_steps} steps · ` +
    `guidance ${body.guidance_scale} · ${body.width}×${body.height}`;
}

function fillSettings(info) {
  const limits = info.limits;
  const frames = $("num-frames");
  frames.innerHTML = "";
  for (let n = 1; n <= limits.max_num_frames; n += limits.frame_step) frames.add(new Option(String(n), String(n)));
  frames.value = String(limits.defaults.num_frames);
  $("steps").max = limits.max_inference_steps;
  $("steps").value = limits.defaults.num_inference_steps;
  $("guidance").max = limits.max_guidance_scale;
  $("guidance").value = limits.defaults.guidance_scale;
  $("adapter-scale").max = limits.max_adapter_scale;
  for (const [id, max, value] of [["width", limits.max_width, limits.defaults.width], ["height", limits.max_height, limits.defaults.height]]) {
    $(id).max = max; $(id).step = limits.size_multiple; $(id).min = limits.size_multiple; $(id).value = value;
  }
  $("prompt").maxLength = limits.max_prompt_chars;
  newSeed();
}

function newSeed() {
  $("seed").value = Math.floor(Math.random() * 2 ** 31);
}

function fillTemplates(templates) {
  const select = $("template");
  select.innerHTML = "";
  for (const template of templates) select.add(new Option(template.title, template.name));
  showSlots();
}

function showSlots() {
  const template = state.templates.find((t) => t.name === $("template").value);
  const container = $("slots");
  container.innerHTML = "";
  if (!template) return;
  for (const [name, slot] of Object.entries(template.slots)) {
    const wrap = document.createElement("div");
    const id = `slot-${name}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = `${name.replace(/_/g, " ")} (${slot.description})`;
    let field;
    if (slot.kind === "choice") {
      field = document.createElement("select");
      for (const choice of slot.choices) field.add(new Option(choice, choice));
      field.value = slot.default;
    } else {
      field = document.createElement("input");
      field.placeholder = slot.default;
      field.maxLength = 200;
    }
    field.id = id;
    field.dataset.slot = name;
    wrap.append(label, field);
    container.append(wrap);
  }
  renderCaption();
}

let renderTimer = null;
function renderCaption() {
  clearTimeout(renderTimer);
  renderTimer = setTimeout(async () => {
    try {
      const rendered = await postJson("/prompts/render", { template: $("template").value, slots: slotValues() });
      $("rendered").value = rendered.prompt;
      $("rendered").textContent = rendered.prompt;
    } catch (error) {
      $("rendered").textContent = `⚠ ${error.message}`;
    }
  }, 120);
}

function fillSystems() {
  const adapters = state.adapters.filter((a) => !a.error).map((a) => a.name);
  const main = $("adapter");
  const previous = main.value;
  main.innerHTML = "";
  main.add(new Option("base model", ""));
  for (const name of adapters) main.add(new Option(name, name));
  main.value = adapters.includes(previous) ? previous : "";
  for (const select of document.querySelectorAll(".system-select")) {
    const before = select.value;
    select.innerHTML = "";
    select.add(new Option("base model", "base"));
    for (const name of adapters) select.add(new Option(name, name));
    select.value = before && [...select.options].some((o) => o.value === before) ? before : "base";
  }
  // Sensible pairs by default: base against the first adapter.
  for (const id of ["compare-b", "rate-b"]) if ($(id).value === "base" && adapters.length) $(id).value = adapters[0];
}

const systemOf = (value) => ({ adapter: value === "base" ? null : value, scale: Number($("adapter-scale").value) });

// ---------- Generate ----------

function setProgress(step, total, eta) {
  $("progress").max = total;
  $("progress").value = step;
  const etaText = eta === null || eta === undefined ? "" : eta > 0.5 ? ` · about ${Math.ceil(eta)} s left` : "";
  $("progress-text").textContent = `step ${step} of ${total}${etaText}`;
}

async function generate(event) {
  event.preventDefault();
  $("generate-error").textContent = "";
  const body = requestBody();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  setProgress(0, body.num_inference_steps, null);
  $("progress-text").textContent = "queued…";
  try {
    const url = await runJob(body, setProgress);
    showResult(url);
    addHistory(body, url);
    newSeed();
  } catch (error) {
    if (error instanceof Cancelled) $("progress-text").textContent = `cancelled: ${error.message}`;
    else $("generate-error").textContent = error.message;
  } finally {
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

function showResult(url) {
  $("result").hidden = false;
  $("result-video").src = url;
  $("result-download").href = url;
  $("result-video").play().catch(() => {});
}

async function cancelJob() {
  if (!state.runningTask) return;
  $("cancel").disabled = true;
  try {
    await api(`/jobs/cancel?task_id=${encodeURIComponent(state.runningTask)}`, { method: "POST" });
    $("progress-text").textContent = "cancelling…";
  } catch (error) {
    $("generate-error").textContent = error.message;
  }
}

function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]"); } catch { return []; }
}

function addHistory(body, url) {
  const entries = loadHistory();
  entries.unshift({ body, at: new Date().toISOString() });
  localStorage.setItem(HISTORY_KEY, JSON.stringify(entries.slice(0, 50)));
  renderHistory(url);
}

// Videos live as object URLs for this visit; the settings (enough to reproduce each one) persist.
const historyUrls = [];
function renderHistory(newUrl = null) {
  if (newUrl) historyUrls.unshift(newUrl);
  const list = $("history");
  list.innerHTML = "";
  loadHistory().forEach((entry, index) => {
    const item = document.createElement("li");
    const title = document.createElement("p");
    title.textContent = `${new Date(entry.at).toLocaleString()} · ${describeBody(entry.body)}`;
    const code = document.createElement("code");
    code.textContent = JSON.stringify(entry.body);
    item.append(title, code);
    const url = historyUrls[index];
    if (url) {
      const video = document.createElement("video");
      video.src = url; video.controls = true; video.muted = true; video.loop = true;
      const link = document.createElement("a");
      link.href = url; link.download = `slapgen-${entry.body.seed}.mp4`; link.textContent = "Download mp4";
      item.append(video, link);
    }
    const again = document.createElement("button");
    again.type = "button"; again.textContent = "Use these settings";
    again.addEventListener("click", () => applyBody(entry.body));
    item.append(again);
    list.append(item);
  });
}

function applyBody(body) {
  const source = body.template ? "template" : "text";
  document.querySelector(`input[name="prompt-source"][value="${source}"]`).checked = true;
  togglePromptSource();
  if (body.template) {
    $("template").value = body.template;
    showSlots();
    for (const [name, value] of Object.entries(body.slots || {})) {
      const field = $(`slot-${name}`);
      if (field) field.value = value;
    }
    renderCaption();
  } else {
    $("prompt").value = body.prompt;
  }
  $("adapter").value = body.adapter || "";
  $("adapter-scale").value = body.adapter_scale ?? 1;
  for (const [id, key] of [["num-frames", "num_frames"], ["steps", "num_inference_steps"], ["guidance", "guidance_scale"],
    ["seed", "seed"], ["width", "width"], ["height", "height"]]) $(id).value = body[key];
  selectTab("tab-generate");
}

function togglePromptSource() {
  const fromTemplate = promptSource() === "template";
  $("template-fields").hidden = !fromTemplate;
  $("text-fields").hidden = fromTemplate;
}

// ---------- Compare ----------

async function compare(event) {
  event.preventDefault();
  $("compare-error").textContent = "";
  const seed = Number($("seed").value);
  const a = $("compare-a").value, b = $("compare-b").value;
  $("compare-run").disabled = true;
  $("compare-play").disabled = true;
  try {
    for (const [side, system] of [["a", a], ["b", b]]) {
      $(`compare-${side}-label`).textContent = `${side.toUpperCase()}: ${system === "base" ? "base model" : system}`;
      const url = await runJob(requestBody(systemOf(system), seed), (step, total) => {
        $("compare-status").textContent = `${side.toUpperCase()} (${system}): step ${step} of ${total}`;
      });
      $(`compare-video-${side}`).src = url;
    }
    $("compare-status").textContent = `seed ${seed}: ${a} vs ${b}`;
    $("compare-play").disabled = false;
    playInSync($("compare-video-a"), $("compare-video-b"));
  } catch (error) {
    $("compare-error").textContent = error.message;
  } finally {
    $("compare-run").disabled = false;
  }
}

function playInSync(first, second) {
  first.currentTime = 0;
  second.currentTime = 0;
  first.play().catch(() => {});
  second.play().catch(() => {});
}

// Keep the pair in step: what one video does, the other follows.
function linkVideos(first, second) {
  const follow = (leader, follower) => {
    leader.addEventListener("play", () => { if (follower.paused) follower.play().catch(() => {}); });
    leader.addEventListener("pause", () => { if (!follower.paused) follower.pause(); });
    leader.addEventListener("seeked", () => {
      if (Math.abs(follower.currentTime - leader.currentTime) > 0.05) follower.currentTime = leader.currentTime;
    });
  };
  follow(first, second);
  follow(second, first);
}

// ---------- Blind rating ----------

function buildCriteria() {
  const container = $("criteria");
  for (const [key, label] of CRITERIA) {
    const group = document.createElement("fieldset");
    group.className = "criterion";
    const legend = document.createElement("legend");
    legend.textContent = label;
    group.append(legend);
    for (const choice of ["left", "right", "tie"]) {
      const option = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio"; input.name = `criterion-${key}`; input.value = choice; input.required = true;
      option.append(input, document.createTextNode(choice === "tie" ? " Tie" : ` ${choice[0].toUpperCase()}${choice.slice(1)} is better`));
      group.append(option);
    }
    container.append(group);
  }
}

async function newPair(event) {
  event.preventDefault();
  $("rate-error").textContent = "";
  $("rate-reveal").textContent = "";
  const first = $("rate-a").value, second = $("rate-b").value;
  if (first === second) { $("rate-error").textContent = "pick two different systems"; return; }
  $("pair-new").disabled = true;
  $("rating-form").hidden = true;
  $("rate-pair").hidden = true;
  const seed = Math.floor(Math.random() * 2 ** 31);
  // Shuffle the sides so position says nothing about the system.
  const sides = Math.random() < 0.5 ? [first, second] : [second, first];
  try {
    const urls = [];
    for (const [index, system] of sides.entries()) {
      urls.push(await runJob(requestBody(systemOf(system), seed), (step, total) => {
        $("rate-status").textContent = `video ${index + 1} of 2: step ${step} of ${total}`;
      }));
    }
    const prompt = requestBody(systemOf(first), seed);
    state.pair = { left: sides[0], right: sides[1], seed, prompt: await promptText(prompt) };
    $("rate-video-left").src = urls[0];
    $("rate-video-right").src = urls[1];
    $("rate-pair").hidden = false;
    $("rating-form").hidden = false;
    $("rating-form").reset();
    $("rate-status").textContent = "Which is better? Rate every criterion.";
    playInSync($("rate-video-left"), $("rate-video-right"));
  } catch (error) {
    $("rate-error").textContent = error.message;
  } finally {
    $("pair-new").disabled = false;
  }
}

async function promptText(body) {
  if (!body.template) return body.prompt;
  return (await postJson("/prompts/render", { template: body.template, slots: body.slots })).prompt;
}

async function saveRating(event) {
  event.preventDefault();
  if (!state.pair) return;
  const choices = {};
  for (const [key] of CRITERIA) {
    const picked = document.querySelector(`input[name="criterion-${key}"]:checked`);
    if (!picked) { $("rate-error").textContent = `rate "${key.replace(/_/g, " ")}" too`; return; }
    choices[key] = picked.value;
  }
  const scale = Number($("adapter-scale").value);
  const side = (system) => (system === "base" ? { adapter: null } : { adapter: system, adapter_scale: scale });
  try {
    await postJson("/ratings", {
      left: side(state.pair.left), right: side(state.pair.right), prompt: state.pair.prompt, seed: state.pair.seed,
      choices, rater: $("rater").value,
    });
    $("rate-error").textContent = "";
    $("rate-reveal").textContent = `Saved. Left was ${state.pair.left}, right was ${state.pair.right}.`;
    $("rating-form").hidden = true;
    state.pair = null;
  } catch (error) {
    $("rate-error").textContent = error.message;
  }
}

// ---------- Summary ----------

const pct = (x) => `${(100 * x).toFixed(0)}%`;

async function loadSummary() {
  const summary = await api("/ratings/summary");
  $("summary-count").textContent = `${summary.ratings} ratings stored`;
  const body = $("summary-table").querySelector("tbody");
  body.innerHTML = "";
  for (const row of summary.pairs) {
    const tr = document.createElement("tr");
    for (const text of [row.systems[0], row.systems[1], row.criterion.replace(/_/g, " "), pct(row.rate),
      `${pct(row.low)} – ${pct(row.high)}`, `${row.wins} / ${row.ties} / ${row.losses}`, row.sign_test_p.toFixed(3)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    body.append(tr);
  }
}

// ---------- tabs (arrow keys move between them, as a tablist should) ----------

function selectTab(id) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.id === id;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
    if (selected) tab.focus();
  }
  if (id === "tab-summary") loadSummary().catch((error) => { $("summary-count").textContent = error.message; });
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => selectTab(tab.id));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (step) selectTab(tabs[(index + step + tabs.length) % tabs.length].id);
    });
  });
}

// ---------- start ----------

async function start() {
  setUpTabs();
  buildCriteria();
  linkVideos($("compare-video-a"), $("compare-video-b"));
  linkVideos($("rate-video-left"), $("rate-video-right"));
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancelJob);
  $("random-seed").addEventListener("click", newSeed);
  $("template").addEventListener("change", showSlots);
  $("slots").addEventListener("input", renderCaption);
  $("slots").addEventListener("change", renderCaption);
  for (const radio of document.querySelectorAll('input[name="prompt-source"]')) radio.addEventListener("change", togglePromptSource);
  $("compare-form").addEventListener("submit", compare);
  $("compare-play").addEventListener("click", () => playInSync($("compare-video-a"), $("compare-video-b")));
  $("pair-form").addEventListener("submit", newPair);
  $("rating-form").addEventListener("submit", saveRating);
  $("summary-refresh").addEventListener("click", () => loadSummary());
  try {
    const [info, templates, adapters] = await Promise.all([api("/info"), api("/templates"), api("/adapters")]);
    state.info = info; state.templates = templates.templates; state.adapters = adapters.adapters;
    $("model-info").textContent = `model ${info.model} · ${info.dtype} · ${info.device}` +
      `${info.compiled ? " · compiled" : ""} · quantization ${info.quantization}`;
    fillSettings(info);
    fillTemplates(state.templates);
    fillSystems();
    renderHistory();
    document.body.dataset.ready = "true";
  } catch (error) {
    $("model-info").textContent = `cannot reach the service: ${error.message}`;
  }
}

start();
