// slapgen studio: a client of the service's public HTTP API only (templates, render, adapters,
// jobs, info, ratings, campaigns). No framework, no CDN: this file, the page and its stylesheet are all there is.
"use strict";

const $ = (id) => document.getElementById(id);
const CRITERIA = [
  ["motion_accuracy", "Motion accuracy"],
  ["impact_realism", "Impact realism"],
  ["prompt_adherence", "Prompt adherence"],
  ["overall", "Overall"],
];
const HISTORY_KEY = "slapgen-studio-history";
const HISTORY_ENTRIES = 50; // settings of this many runs are kept (localStorage)
const KEPT_VIDEOS = 20; // the newest this many history videos are kept in this browser (IndexedDB)
// condition: the TIC-FT condition image {dataUrl, source} or null; videos: history entry id -> object URL
const state = { info: null, templates: [], adapters: [], runningTask: null, pair: null, condition: null, videos: new Map() };

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}
class Cancelled extends Error {}

// ---------- HTTP ----------

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new ApiError(message, response.status);
  }
  return body;
}

const postJson = (path, body) =>
  api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Submit a job and follow it to the end: onProgress(step, total, etaSeconds, finishing), finishing once its
// denoising is done (the video is being decoded; it can no longer be canceled). Resolves to the mp4 (a Blob);
// rejects with Cancelled when someone cancels it, ApiError when it fails.
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
      if (jobState === "finishing") onProgress(total, total, null, true);
      if (jobState === "canceled") throw new Cancelled(progress.error || "canceled");
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
  // A completed job's mp4 is served from the results folder even in the moment before BentoML stores it.
  const response = await fetch(`/jobs/get?task_id=${encodeURIComponent(taskId)}`);
  if (!response.ok) throw new ApiError(`could not fetch the video (${response.status})`);
  return await response.blob();
}

const runJobToUrl = async (body, onProgress) => URL.createObjectURL(await runJob(body, onProgress));

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

// The seed of the next run: the one in the form, unless "New seed every run" asks for a fresh one (which
// then shows in the form, so every run's seed is one the user can see and reuse).
function seedForRun() {
  if ($("seed-each-run").checked) newSeed();
  return Number($("seed").value);
}

// The TIC-FT layout of an adapter ("c1b1t1"), or null for the base model and plain adapters.
const ticftLayout = (adapter) => (state.adapters.find((a) => a.name === adapter) || {}).ticft_layout || null;

// An empty number field is left out of the body, so the service uses the model's default: Number("") is 0,
// and "num_inference_steps must be greater than or equal to 1, got 0" came for a field nobody typed in.
function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

// The request body the form describes, for one system (adapter name or null for the base model). A TIC-FT
// adapter gets the condition image (the service says so when there is none), and its frame count comes
// from its layout (the service fills it in).
function requestBody(system = { adapter: $("adapter").value || null, scale: Number($("adapter-scale").value) }, seed = null) {
  const body = Object.fromEntries(Object.entries({
    num_frames: numberField("num-frames"),
    num_inference_steps: numberField("steps"),
    guidance_scale: numberField("guidance"),
    seed: seed === null ? numberField("seed") : seed,
    width: numberField("width"),
    height: numberField("height"),
  }).filter(([, value]) => value !== undefined));
  const layout = system.adapter ? ticftLayout(system.adapter) : null;
  if (layout) {
    delete body.num_frames;
    if (state.condition) body.condition_image = state.condition.dataUrl;
    if ($("include-condition-frames").checked) body.include_condition_frames = true;
  }
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
  const frames = body.num_frames ? `${body.num_frames} frames`
    : body.condition_image || body.include_condition_frames || ticftLayout(body.adapter)
      ? `condition image${body.include_condition_frames ? " (whole clip)" : ""}` : "default frames";
  const or = (value) => value ?? "default"; // a field left empty: the model's default
  return `${system} · ${what} · seed ${or(body.seed)} · ${frames} · ${or(body.num_inference_steps)} steps · ` +
    `guidance ${or(body.guidance_scale)} · ${or(body.width)}×${or(body.height)}`;
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

// What of the caption the model reads: the server counts its text tokens against the model's limit.
function tokensLine(rendered) {
  if (rendered.cut) {
    return `⚠ ${rendered.tokens} tokens: the model reads the first ${rendered.max_tokens} and never sees “${rendered.cut}”`;
  }
  return `${rendered.tokens} of the ${rendered.max_tokens} tokens the model reads`;
}

let renderTimer = null;
function renderCaption() {
  clearTimeout(renderTimer);
  renderTimer = setTimeout(async () => {
    try {
      const rendered = await postJson("/prompts/render", { template: $("template").value, slots: slotValues() });
      $("rendered").value = rendered.prompt;
      $("rendered").textContent = rendered.prompt;
      $("rendered-tokens").textContent = tokensLine(rendered);
    } catch (error) {
      $("rendered").textContent = `⚠ ${error.message}`;
      $("rendered-tokens").textContent = "";
    }
  }, 120);
}

function fillSystems() {
  const adapters = state.adapters.filter((a) => !a.error).map((a) => a.name);
  // An adapter the service cannot serve (another model's, a broken file) is not offered, and said so: it vanished
  // without a word (a walk-through's find), though GET /adapters lists it with its sentence.
  const unusable = state.adapters.filter((a) => a.error);
  $("adapters-unusable").textContent = unusable.length
    ? `Not offered, since the service cannot serve ${unusable.length === 1 ? "it" : "them"}: ` +
      unusable.map((a) => `${a.name} (${a.error})`).join("; ") + "."
    : "";
  $("adapters-unusable").hidden = !unusable.length;
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
  showConditionFields();
}

// The adapters again when the page is back in view: one uploaded meanwhile (by curl, another tab) was offered only
// after a reload. One request at a time.
let adaptersLoading = false;
async function refreshAdapters() {
  if (adaptersLoading || document.hidden || !document.body.dataset.ready) return;
  adaptersLoading = true;
  try {
    state.adapters = (await api("/adapters")).adapters;
    fillSystems();
  } catch (error) {
    // the next focus tries again; the page keeps the list it has
  } finally {
    adaptersLoading = false;
  }
}

// ---------- the TIC-FT condition image ----------

const anyTicft = () => state.adapters.some((a) => !a.error && a.ticft_layout);

function showConditionFields() {
  const layout = ticftLayout($("adapter").value);
  $("condition-fields").hidden = !layout;
  $("num-frames").disabled = Boolean(layout);
  if (layout) {
    $("condition-about").textContent = `${$("adapter").value} is a TIC-FT adapter (layout ${layout}): it animates the ` +
      "condition image, which is resized and centre-cropped to the output size; the frame count comes from the layout.";
  }
  for (const button of document.querySelectorAll(".use-frame")) button.hidden = !anyTicft();
}

function setCondition(dataUrl, source) {
  state.condition = dataUrl ? { dataUrl, source } : null;
  $("condition-figure").hidden = !dataUrl;
  $("condition-preview").src = dataUrl || "";
  $("condition-source").textContent = source || "";
  if (!dataUrl) $("condition-file").value = "";
}

// What the service would refuse at Generate (its limits from /info) is said when the file is picked: a photo
// too large, or a file named .png that is no image, waited for a Generate to be refused.
async function conditionFileProblem(file) {
  const limits = state.info.limits;
  const mib = (bytes, round) => (round(bytes / 1024 ** 2 * 10) / 10).toFixed(1); // a byte over never reads as equal
  if (!["image/png", "image/jpeg"].includes(file.type) || !(await isPngOrJpeg(file))) {
    return `${file.name} is not a PNG or JPEG image`;
  }
  if (file.size > limits.max_image_bytes) {
    return `${file.name} is ${mib(file.size, Math.ceil)} MiB; a condition image may be at most ` +
      `${mib(limits.max_image_bytes, Math.floor)} MiB`;
  }
  const size = await imageSize(file);
  if (!size) return `${file.name} could not be decoded as a PNG or JPEG image`;
  if (size.width * size.height > limits.max_image_pixels) {
    return `${file.name} is ${size.width}x${size.height} pixels; a condition image may have at most ` +
      `${limits.max_image_pixels.toLocaleString("en")} pixels`;
  }
  return "";
}

// What a file is, from its first bytes (its name, and so its type, may say otherwise): PNG's signature or JPEG's
// start-of-image marker, the formats the service decodes.
async function isPngOrJpeg(file) {
  const head = [...new Uint8Array(await file.slice(0, 4).arrayBuffer())];
  const starts = (bytes) => bytes.every((byte, index) => head[index] === byte);
  return starts([0x89, 0x50, 0x4e, 0x47]) || starts([0xff, 0xd8, 0xff]);
}

// An image's size, read from its header by an <img> that is never painted (so its pixels are not decoded: a
// small file of a huge image is said, not unpacked); null when it does not load.
function imageSize(file) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file), image = new Image();
    const done = (size) => { URL.revokeObjectURL(url); resolve(size); };
    image.onload = () => done({ width: image.naturalWidth, height: image.naturalHeight });
    image.onerror = () => done(null);
    image.src = url;
  });
}

async function readConditionFile() {
  const file = $("condition-file").files[0];
  if (!file) return;
  $("generate-error").textContent = "";
  const problem = await conditionFileProblem(file);
  if ($("condition-file").files[0] !== file) return; // another file was picked meanwhile: its own call says
  if (problem) {
    $("generate-error").textContent = problem;
    setCondition(null);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => setCondition(reader.result, file.name);
  reader.onerror = () => { $("generate-error").textContent = `could not read ${file.name}`; };
  reader.readAsDataURL(file);
}

// The frame a video shows now, as a PNG, becomes the condition image; a plain adapter (or the base model)
// gives way to the first TIC-FT adapter, since only those take one.
async function useFrameOf(video, label) {
  if (video.readyState < 2) { $("generate-error").textContent = "that video has no frame to use yet"; return; }
  video.pause();
  await showFrame(video);
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  setCondition(canvas.toDataURL("image/png"), `frame at ${video.currentTime.toFixed(2)} s of ${label}`);
  if (!ticftLayout($("adapter").value)) {
    const first = state.adapters.find((a) => !a.error && a.ticft_layout);
    if (first) $("adapter").value = first.name;
  }
  showConditionFields();
  selectTab("tab-generate");
  $("condition-fields").scrollIntoView({ block: "nearest" });
}

const systemOf = (value) => ({ adapter: value === "base" ? null : value, scale: Number($("adapter-scale").value) });

// ---------- Generate ----------

const FINISHING = "finishing… (decoding the video; too late to cancel)";

function setProgress(step, total, eta, finishing = false) {
  $("progress").max = total;
  $("progress").value = step;
  if (finishing) {
    $("progress-text").textContent = FINISHING;
    $("cancel").disabled = true; // the service would answer 409: the job will complete
    return;
  }
  const etaText = eta === null || eta === undefined ? "" : eta > 0.5 ? ` · about ${Math.ceil(eta)} s left` : "";
  $("progress-text").textContent = `step ${step} of ${total}${etaText}`;
}

async function generate(event) {
  event.preventDefault();
  $("generate-error").textContent = "";
  const body = requestBody(undefined, seedForRun());
  $("generate").disabled = true;
  $("cancel").disabled = false;
  setProgress(0, body.num_inference_steps ?? 1, null); // the job's progress says its steps
  $("progress-text").textContent = "queued…";
  try {
    const video = await runJob(body, setProgress);
    const url = URL.createObjectURL(video);
    showResult(url);
    await addHistory(body, video, url);
  } catch (error) {
    if (error instanceof Cancelled) {
      $("progress-text").textContent = `canceled: ${error.message}`;
    } else { // refused or failed: nothing is queued any more ("queued…" stayed beside the error)
      setProgress(0, 1, null);
      $("progress-text").textContent = "";
      $("generate-error").textContent = error.message;
    }
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
    // 409: it went finishing between two polls; it will complete, which is no error of the user's.
    if (error instanceof ApiError && error.status === 409) $("progress-text").textContent = FINISHING;
    else $("generate-error").textContent = error.message;
  }
}

// Chromium paints nothing (a black canvas) from a video that has not yet played or seeked: seeking to where
// it is makes it decode the frame there.
function showFrame(video) {
  return new Promise((resolve) => {
    video.addEventListener("seeked", () => resolve(), { once: true });
    video.currentTime = video.currentTime; // eslint-disable-line no-self-assign
  });
}

// ---------- History: settings in localStorage, videos (the newest KEPT_VIDEOS) in IndexedDB ----------

function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]"); } catch { return []; }
}

let videoDb = null;
function openVideoDb() {
  videoDb = videoDb || new Promise((resolve, reject) => {
    const request = indexedDB.open("slapgen-studio", 1);
    request.onupgradeneeded = () => request.result.createObjectStore("videos");
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return videoDb;
}

// One IndexedDB transaction on the videos store: work(store) queues requests and returns one of them (resolves
// to its result once the transaction is done) or a value its requests fill in (resolves to that value).
async function videoStore(mode, work) {
  const db = await openVideoDb();
  return new Promise((resolve, reject) => {
    const transaction = db.transaction("videos", mode);
    const result = work(transaction.objectStore("videos"));
    transaction.oncomplete = () => resolve(result instanceof IDBRequest ? result.result : result);
    transaction.onerror = () => reject(transaction.error);
    transaction.onabort = () => reject(transaction.error || new Error("the browser refused to store the video"));
  });
}

// Why an entry has no video: set for this visit when the browser would not store one.
const notKept = new Map();
const conditions = new Map(); // history entry id -> its condition image (data URL), when kept

async function addHistory(body, video, url) {
  const id = `${Date.now()}-${Math.random().toString(36).slice(2)}`;
  // The condition image goes with the video (it can be MBs); the settings list stays small.
  const { condition_image: condition, ...settings } = body;
  const entries = loadHistory();
  entries.unshift({ id, body: settings, at: new Date().toISOString(), condition: Boolean(condition) });
  localStorage.setItem(HISTORY_KEY, JSON.stringify(entries.slice(0, HISTORY_ENTRIES)));
  state.videos.set(id, url);
  try {
    await videoStore("readwrite", (store) => store.put({ video, condition: condition || null }, id));
    const keep = new Set(entries.slice(0, KEPT_VIDEOS).map((entry) => entry.id));
    const stored = await videoStore("readonly", (store) => store.getAllKeys());
    await videoStore("readwrite", (store) => { for (const key of stored) if (!keep.has(key)) store.delete(key); });
    for (const [key, oldUrl] of state.videos) if (!keep.has(key)) { URL.revokeObjectURL(oldUrl); state.videos.delete(key); }
  } catch (error) {
    notKept.set(id, `this browser would not store it (${error.message || error}), so it is gone after a reload`);
  }
  renderHistory();
}

// On start: object URLs for the videos this browser kept, and a clear word on the ones it did not.
async function loadHistoryVideos() {
  const entries = loadHistory();
  try {
    const records = await videoStore("readonly", (store) => {
      const found = {};
      for (const entry of entries.slice(0, KEPT_VIDEOS)) {
        if (entry.id) store.get(entry.id).onsuccess = (event) => { found[entry.id] = event.target.result; };
      }
      return found;
    });
    for (const [id, record] of Object.entries(records)) {
      if (record) { state.videos.set(id, URL.createObjectURL(record.video)); conditions.set(id, record.condition); }
    }
  } catch (error) {
    for (const entry of entries) notKept.set(entry.id, `this browser cannot keep videos (${error.message || error})`);
  }
  const missing = entries.filter((entry) => !state.videos.has(entry.id)).length;
  $("history-note").hidden = missing === 0;
  $("history-note").textContent = missing === 0 ? "" :
    `${missing === entries.length ? "The videos below are" : `${missing} of the ${entries.length} videos below ` +
      (missing === 1 ? "is" : "are")} gone ` +
    `(made in an earlier session that did not keep them, or older than the newest ${KEPT_VIDEOS}, which this browser ` +
    "keeps). Their settings are kept: “Use these settings” makes one again.";
}

function renderHistory() {
  const list = $("history");
  list.innerHTML = "";
  loadHistory().forEach((entry) => {
    const item = document.createElement("li");
    const title = document.createElement("p");
    title.textContent = `${new Date(entry.at).toLocaleString()} · ${describeBody(entry.body)}`;
    const code = document.createElement("code");
    code.textContent = JSON.stringify(entry.body);
    item.append(title, code);
    const url = state.videos.get(entry.id);
    if (url) {
      const video = document.createElement("video");
      video.src = url; video.controls = true; video.muted = true; video.loop = true; video.playsInline = true;
      video.addEventListener("loadeddata", () => showFrame(video), { once: true }); // its first frame, not black
      const link = document.createElement("a");
      link.href = url; link.download = `slapgen-${entry.body.seed}.mp4`; link.textContent = "Download mp4";
      const useFrame = document.createElement("button");
      useFrame.type = "button"; useFrame.className = "use-frame"; useFrame.hidden = !anyTicft();
      useFrame.textContent = "Use this frame as the condition image";
      useFrame.addEventListener("click", () => useFrameOf(video, `the video of seed ${entry.body.seed}`));
      item.append(video, link, useFrame);
      if (notKept.has(entry.id)) {
        const warning = document.createElement("p");
        warning.className = "note";
        warning.textContent = `Download it if you want to keep it: ${notKept.get(entry.id)}.`;
        item.append(warning);
      }
    } else {
      const gone = document.createElement("p");
      gone.className = "note";
      gone.textContent = `Video gone: ${notKept.get(entry.id) || "not kept from an earlier session (this browser " +
        `keeps the newest ${KEPT_VIDEOS})`}. The settings above make it again.`;
      item.append(gone);
    }
    const again = document.createElement("button");
    again.type = "button"; again.textContent = "Use these settings";
    again.addEventListener("click", () => applyBody(entry.body, entry.id));
    item.append(again);
    list.append(item);
  });
}

function applyBody(body, historyId = null) {
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
    ["seed", "seed"], ["width", "width"], ["height", "height"]]) if (body[key] !== undefined) $(id).value = body[key];
  $("include-condition-frames").checked = Boolean(body.include_condition_frames);
  if (historyId && conditions.get(historyId)) setCondition(conditions.get(historyId), "the condition image of that run");
  showConditionFields();
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
  const seed = seedForRun();
  const a = $("compare-a").value, b = $("compare-b").value;
  $("compare-run").disabled = true;
  $("compare-play").disabled = true;
  try {
    for (const [side, system] of [["a", a], ["b", b]]) {
      $(`compare-${side}-label`).textContent = `${side.toUpperCase()}: ${system === "base" ? "base model" : system}`;
      const url = await runJobToUrl(requestBody(systemOf(system), seed), (step, total) => {
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
  const seed = seedForRun();
  // Shuffle the sides so position says nothing about the system.
  const sides = Math.random() < 0.5 ? [first, second] : [second, first];
  try {
    const urls = [];
    for (const [index, system] of sides.entries()) {
      urls.push(await runJobToUrl(requestBody(systemOf(system), seed), (step, total) => {
        $("rate-status").textContent = `seed ${seed} · video ${index + 1} of 2: step ${step} of ${total}`;
      }));
    }
    const prompt = requestBody(systemOf(first), seed);
    state.pair = { left: sides[0], right: sides[1], seed, prompt: await promptText(prompt) };
    $("rate-video-left").src = urls[0];
    $("rate-video-right").src = urls[1];
    $("rate-pair").hidden = false;
    $("rating-form").hidden = false;
    $("rating-form").reset();
    $("rate-status").textContent = `seed ${seed}: which is better? Rate every criterion.`;
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
const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

// What the rater did: pairs rated, on how many criteria (the service stores one verdict per criterion).
function ratedText(summary) {
  const pairs = summary.rated_pairs, criteria = summary.criteria_rated;
  if (pairs === 0) return "No ratings yet.";
  const each = summary.ratings === pairs * criteria ? ` on ${plural(criteria, "criterion", "criteria")}`
    : ` (${plural(summary.ratings, "verdict", "verdicts")} over ${plural(criteria, "criterion", "criteria")})`;
  return `${plural(pairs, "pair", "pairs")} rated${each}.`;
}

// Rows with fewer prompts than the service's minimum (`small_sample`) get a warning and no interval: from a
// prompt or two the bootstrap interval collapses to a point ("100% – 100%") that says nothing.
function smallSampleText(summary) {
  const fewest = new Map(); // "first vs second" -> its fewest rated prompts over criteria
  for (const row of summary.pairs.filter((r) => r.small_sample)) {
    const pair = row.systems.join(" vs ");
    fewest.set(pair, Math.min(row.units, fewest.get(pair) ?? Infinity));
  }
  if (!fewest.size) return "";
  const pairs = [...fewest].map(([pair, units]) => `${pair} (${plural(units, "rated prompt", "rated prompts")})`);
  const minimum = summary.min_prompts_for_interval;
  return `Small sample: ${pairs.join(", ")} ${pairs.length === 1 ? "has" : "have"} fewer than ${minimum} rated ` +
    `prompts. Win rates from so few prompts are not evidence either way, so no 95% interval is shown until ` +
    `${minimum} prompts are rated.`;
}

// The summary is of the served model's ratings (each rating records its model); the others are counted here, so a
// store shared with a server of another model, or ratings stored before ratings named their model, never look lost.
function otherModelsText(summary) {
  const parts = summary.other_models.map(({ model, ratings }) => model === null
    ? `${plural(ratings, "verdict", "verdicts")} stored before ratings recorded their model (if ${summary.model} ` +
      `made them, \`slapgen ratings assign-model ${summary.model}\` counts them here)`
    : `${plural(ratings, "verdict", "verdicts")} of ${model}`);
  return parts.length ? `Not counted above (not ${summary.model}'s): ${parts.join("; ")}. ratings.csv has every rating ` +
    `with its model.` : "";
}

async function loadSummary() {
  const summary = await api("/ratings/summary");
  $("summary-count").textContent = `${summary.model}: ${ratedText(summary)}`;
  $("summary-other-models").textContent = otherModelsText(summary);
  $("summary-other-models").hidden = !$("summary-other-models").textContent;
  $("summary-warning").textContent = smallSampleText(summary);
  $("summary-warning").hidden = !$("summary-warning").textContent;
  const body = $("summary-table").querySelector("tbody");
  body.innerHTML = "";
  const labels = [...$("summary-table").querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of summary.pairs) {
    const tr = document.createElement("tr");
    if (row.small_sample) tr.className = "small-sample";
    const interval = row.small_sample ? `none yet (needs ${summary.min_prompts_for_interval} prompts)`
      : `${pct(row.low)} – ${pct(row.high)}`;
    [row.systems[0], row.systems[1], row.criterion.replace(/_/g, " "), pct(row.rate), String(row.units), interval,
      `${row.wins} / ${row.ties} / ${row.losses}`, row.sign_test_p.toFixed(3)].forEach((text, index) => {
      const td = document.createElement("td");
      td.textContent = text;
      td.dataset.label = labels[index]; // the column's name, shown beside the value when rows stack on a phone
      tr.append(td);
    });
    body.append(tr);
  }
}

// ---------- Campaigns: blind pairs of existing videos, the rater's verdicts, the live leaderboard ----------

const RATER_KEY = "slapgen-studio-rater";
const VERDICT_KEYS = { "1": "left", "2": "right", "=": "tie" };
const VERDICT_LABELS = [["left", "Left"], ["tie", "Tie"], ["right", "Right"]];
// name: the campaign being rated; pair: the pair shown (GET .../pair); verdicts: criterion -> left|right|tie;
// current: the criterion the keys apply to; busy: a submit is on its way; asked: the newest pair request
// (an older answer that arrives late is dropped).
const campaign = { name: null, pair: null, verdicts: {}, current: 0, busy: false, asked: 0 };

const campaignUrl = (name, rest = "") => `/campaigns/${encodeURIComponent(name)}${rest}`;
const raterName = () => $("campaign-rater").value.trim();
const fixed = (x) => { const text = x.toFixed(2); return text === "-0.00" ? "0.00" : text; };

async function loadCampaigns() {
  const { campaigns } = await api("/campaigns");
  const list = $("campaign-list");
  list.innerHTML = "";
  $("campaigns-note").textContent = campaigns.length ? "" :
    "No campaign yet: `slapgen campaign create NAME --from EVAL_DIR` makes one from eval videos.";
  for (const entry of campaigns) {
    const item = document.createElement("li");
    if (entry.name === campaign.name) item.className = "chosen";
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "campaign-pick";
    pick.dataset.campaign = entry.name;
    pick.textContent = entry.name === campaign.name ? `Rating ${entry.name}` : `Rate ${entry.name}`;
    pick.addEventListener("click", () => chooseCampaign(entry.name));
    const about = document.createElement("span");
    about.className = "campaign-about";
    const budget = entry.budget === null ? " (no budget)" : ` of a budget of ${entry.budget}`;
    about.textContent = `${plural(entry.systems, "system", "systems")} · ${plural(entry.items, "prompt and seed", "prompts and seeds")} · ` +
      `${entry.criteria.join(", ")} · ${plural(entry.ratings, "rating", "ratings")}${budget} · ${plural(entry.raters, "rater", "raters")}`;
    item.append(pick, about);
    if (entry.budget) {
      const bar = document.createElement("progress");
      bar.max = entry.budget; bar.value = Math.min(entry.ratings, entry.budget);
      bar.setAttribute("aria-label", `${entry.name}: ratings toward its budget`);
      item.append(bar);
    }
    list.append(item);
  }
}

async function chooseCampaign(name) {
  $("campaign-error").textContent = "";
  if (!raterName()) {
    $("campaign-error").textContent = "enter your name first: each rater gets their own pairs";
    $("campaign-rater").focus();
    return;
  }
  localStorage.setItem(RATER_KEY, raterName());
  campaign.name = name;
  $("campaign-rating").hidden = false;
  $("campaign-title").textContent = name;
  $("campaign-csv").href = campaignUrl(name, "/verdicts.csv");
  $("campaign-csv").download = `${name}-verdicts.csv`;
  for (const button of document.querySelectorAll(".campaign-pick")) {
    const chosen = button.dataset.campaign === name;
    button.textContent = `${chosen ? "Rating" : "Rate"} ${button.dataset.campaign}`;
    button.parentElement.classList.toggle("chosen", chosen);
  }
  await Promise.all([loadPair(), refreshBoard()]);
}

// The rater's next pair (or the one they have open: the service gives it again until it is answered).
async function loadPair(keepError = false) {
  if (!campaign.name) return;
  const asked = ++campaign.asked;
  if (!keepError) $("campaign-error").textContent = "";
  $("campaign-status").textContent = "loading a pair…";
  let pair;
  try {
    pair = await api(`${campaignUrl(campaign.name, "/pair")}?rater=${encodeURIComponent(raterName())}`);
  } catch (error) {
    if (asked !== campaign.asked) return;
    showPair(null);
    $("campaign-status").textContent = "";
    $("campaign-error").textContent = error.message;
    return;
  }
  if (asked !== campaign.asked) return;
  if (pair.pair_id === null) { // nothing left for this rater: the service says so in words
    showPair(null);
    $("campaign-status").textContent = `No pair left for you: ${pair.message}.`;
    return;
  }
  showPair(pair);
  $("campaign-status").textContent = `Which is better? Judge every criterion (${pair.criteria.length}).`;
}

function showPair(pair) {
  campaign.pair = pair;
  campaign.verdicts = {};
  campaign.current = 0;
  $("campaign-pair").hidden = !pair;
  $("campaign-pair").dataset.pairId = pair ? pair.pair_id : "";
  for (const side of ["left", "right"]) {
    const video = $(`campaign-video-${side}`);
    if (pair) video.src = pair[side].video;
    else { video.removeAttribute("src"); video.load(); }
  }
  if (!pair) { $("campaign-criteria").innerHTML = ""; return; }
  $("campaign-prompt").textContent = `“${pair.prompt}” · seed ${pair.seed}`;
  buildVerdictButtons(pair.criteria);
  playInSync($("campaign-video-left"), $("campaign-video-right"));
}

function buildVerdictButtons(criteria) {
  const container = $("campaign-criteria");
  container.innerHTML = "";
  criteria.forEach((criterion, index) => {
    const group = document.createElement("fieldset");
    group.className = "criterion verdict";
    group.dataset.criterion = criterion;
    const legend = document.createElement("legend");
    const name = document.createElement("span");
    name.textContent = criterion.replace(/_/g, " ");
    const marker = document.createElement("span");
    marker.className = "keys-marker";
    marker.textContent = "keys";
    legend.append(name, marker);
    group.append(legend);
    const buttons = document.createElement("div");
    buttons.className = "verdict-buttons";
    for (const [choice, label] of VERDICT_LABELS) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.choice = choice;
      button.textContent = label;
      button.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-label", `${criterion.replace(/_/g, " ")}: ${label}`);
      button.addEventListener("click", () => giveVerdict(index, choice));
      buttons.append(button);
    }
    group.append(buttons);
    container.append(group);
  });
  markCurrent();
}

function markCurrent() {
  const groups = [...$("campaign-criteria").querySelectorAll(".verdict")];
  groups.forEach((group, index) => {
    const current = index === campaign.current;
    group.classList.toggle("current", current);
    if (current) group.setAttribute("aria-current", "true"); else group.removeAttribute("aria-current");
    const chosen = campaign.verdicts[group.dataset.criterion];
    for (const button of group.querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.dataset.choice === chosen));
      button.disabled = campaign.busy;
    }
  });
}

// A verdict on one criterion (a click, a tap or a key); the keys move on to the next criterion without one,
// and once every criterion has one the verdicts go to the service.
function giveVerdict(index, choice) {
  if (!campaign.pair || campaign.busy) return;
  const criteria = campaign.pair.criteria;
  campaign.verdicts[criteria[index]] = choice;
  const open = criteria.findIndex((criterion) => !(criterion in campaign.verdicts));
  campaign.current = open === -1 ? index : open;
  markCurrent();
  if (open === -1) submitVerdicts();
}

async function submitVerdicts() {
  const pair = campaign.pair;
  campaign.busy = true;
  markCurrent();
  $("campaign-status").textContent = "sending…";
  let answered = false;
  try {
    await postJson(campaignUrl(campaign.name, "/ratings"),
                   { pair_id: pair.pair_id, rater: pair.rater, verdicts: { ...campaign.verdicts } });
    answered = true;
    $("campaign-error").textContent = "";
  } catch (error) {
    $("campaign-error").textContent = error.message;
    // Answered already (another tab) or gone: this pair can take no verdict, so the next one comes. Any
    // other error keeps the pair and its verdicts, to send again by giving a verdict again.
    answered = error instanceof ApiError && (error.status === 409 || error.status === 404);
    if (!answered) $("campaign-status").textContent = "Not saved; change a verdict (or give one again) to retry.";
  } finally {
    campaign.busy = false;
    markCurrent();
  }
  if (answered) {
    await Promise.all([loadPair(true), refreshBoard(), loadCampaigns().catch(() => {})]);
  }
}

function campaignKeys(event) {
  if ($("view-campaigns").hidden || !campaign.pair || campaign.busy) return;
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  // Typing a name (or anything else) is not rating.
  const target = event.target;
  if (target.closest("input, textarea, select, [contenteditable]") || target.isContentEditable) return;
  const choice = VERDICT_KEYS[event.key];
  if (!choice) return;
  event.preventDefault();
  giveVerdict(campaign.current, choice);
}

async function refreshBoard() {
  if (!campaign.name) return;
  const name = campaign.name;
  $("board-note").textContent = "updating…";
  try {
    const board = await api(campaignUrl(name, "/leaderboard"));
    if (name !== campaign.name) return;
    renderBoard(board);
    $("board-note").textContent = `${plural(board.systems.length, "system", "systems")} · ` +
      `${plural(board.raters.length, "rater", "raters")} so far · updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("board-note").textContent = error.message;
  }
}

function renderBoard(board) {
  const container = $("campaign-board");
  container.innerHTML = "";
  for (const [criterion, result] of Object.entries(board.criteria)) {
    const section = document.createElement("section");
    section.className = "board";
    section.dataset.criterion = criterion;
    const title = document.createElement("h3");
    title.textContent = criterion.replace(/_/g, " ");
    const stateLine = document.createElement("p");
    stateLine.className = `board-state ${result.done ? "done" : "open"}`;
    stateLine.textContent = result.done ? `Done: ${result.why}.` : `${result.why[0].toUpperCase()}${result.why.slice(1)}.`;
    section.append(title, stateLine);
    if (result.winner) {  // once done: the winner and the LoRA file that serves it
      const winnerLine = document.createElement("p");
      winnerLine.className = "board-winner";
      winnerLine.textContent = `${result.winner.sentence[0].toUpperCase()}${result.winner.sentence.slice(1)}.`;
      section.append(winnerLine);
    }
    section.append(stoppingBars(criterion, result));
    const counts = document.createElement("p");
    counts.className = "board-counts";
    counts.textContent = `${plural(result.ratings, "rating", "ratings")} on ${plural(result.prompts, "prompt", "prompts")}` +
      (result.inter_rater_alpha === null || result.inter_rater_alpha === undefined ? "" :
        ` · agreement between raters (Krippendorff's alpha) ${fixed(result.inter_rater_alpha)}`);
    section.append(counts, standingsTable(criterion, result.standings));
    if (result.metric_summary) {
      const metrics = document.createElement("p");
      metrics.className = "hint";
      metrics.textContent = result.metric_summary;
      section.append(metrics);
    }
    container.append(section);
  }
}

// Progress toward the stopping rule: the top system beating the second in 95% of bootstrap resamples and its
// direct comparisons with the second (one per item) reaching their evidence (a test that checking after every rating does not
// fool), or the budget of ratings, whichever comes first.
function stoppingBars(criterion, result) {
  const wrap = document.createElement("div");
  wrap.className = "stop-bars";
  const bar = (label, max, value, text) => {
    const row = document.createElement("div");
    const caption = document.createElement("span");
    caption.textContent = `${label}: ${text}`;
    const progress = document.createElement("progress");
    progress.max = max; progress.value = Math.min(value, max);
    progress.setAttribute("aria-label", `${criterion}: ${label}`);
    row.append(caption, progress);
    wrap.append(row);
  };
  bar("Separation", 0.95, result.top_beats_second,
      `the top system beats the second in ${pct(result.top_beats_second)} of resamples (95% needed)`);
  const duel = result.head_to_head;
  if (duel) {  // on a log scale (evidence multiplies with each item); no progress while the top system trails
    const toward = duel.wins > duel.losses ? Math.log(Math.max(duel.evidence, 1)) : 0;
    bar("Direct comparisons", Math.log(duel.evidence_needed), toward,
        `${duel.top} won ${duel.wins} of ${duel.wins + duel.losses} items against ${duel.second} ` +
        `(evidence ${duel.evidence.toFixed(1)}, ${duel.evidence_needed} needed)`);
  }
  if (result.budget !== null && result.budget !== undefined) {
    bar("Budget", result.budget, result.ratings, `${result.ratings} of ${result.budget} ratings`);
  }
  return wrap;
}

function standingsTable(criterion, standings) {
  const wrap = document.createElement("div");
  wrap.className = "table-wrap";
  const table = document.createElement("table");
  table.className = "standings";
  const caption = document.createElement("caption");
  caption.textContent = `${criterion.replace(/_/g, " ")}: Bradley-Terry log-strength (mean 0), 95% interval (the wider of a bootstrap over prompts and the fit's own)`;
  const head = document.createElement("thead");
  head.innerHTML = '<tr><th scope="col">Rank</th><th scope="col">System</th>' +
    '<th scope="col">Strength (95% interval)</th><th scope="col">Comparisons</th></tr>';
  const body = document.createElement("tbody");
  for (const standing of standings) {
    const row = document.createElement("tr");
    for (const text of [String(standing.rank), standing.system,
      `${fixed(standing.strength)} (${fixed(standing.low)} to ${fixed(standing.high)})`, String(standing.comparisons)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
  table.append(caption, head, body);
  wrap.append(table);
  return wrap;
}

function setUpCampaigns() {
  $("campaign-rater").value = localStorage.getItem(RATER_KEY) || "";
  // A new name is a new rater: their own pairs, so the pair shown is asked again.
  $("campaign-rater").addEventListener("change", () => {
    if (!raterName()) return;
    localStorage.setItem(RATER_KEY, raterName());
    if (campaign.name && !(campaign.pair && campaign.pair.rater === raterName())) loadPair();
  });
  $("campaigns-refresh").addEventListener("click", () => loadCampaigns().catch((error) => {
    $("campaigns-note").textContent = error.message;
  }));
  $("board-refresh").addEventListener("click", refreshBoard);
  linkVideos($("campaign-video-left"), $("campaign-video-right"));
  document.addEventListener("keydown", campaignKeys);
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
  if (id === "tab-campaigns") loadCampaigns().catch((error) => { $("campaigns-note").textContent = error.message; });
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
  $("adapter").addEventListener("change", showConditionFields);
  $("condition-file").addEventListener("change", readConditionFile);
  $("condition-clear").addEventListener("click", () => setCondition(null));
  $("result-use-frame").addEventListener("click", () => useFrameOf($("result-video"), "the last video"));
  $("template").addEventListener("change", showSlots);
  $("slots").addEventListener("input", renderCaption);
  $("slots").addEventListener("change", renderCaption);
  for (const radio of document.querySelectorAll('input[name="prompt-source"]')) radio.addEventListener("change", togglePromptSource);
  $("compare-form").addEventListener("submit", compare);
  $("compare-play").addEventListener("click", () => playInSync($("compare-video-a"), $("compare-video-b")));
  $("pair-form").addEventListener("submit", newPair);
  $("rating-form").addEventListener("submit", saveRating);
  $("summary-refresh").addEventListener("click", () => loadSummary());
  window.addEventListener("focus", refreshAdapters);
  document.addEventListener("visibilitychange", refreshAdapters);
  setUpCampaigns();
  try {
    const [info, templates, adapters] = await Promise.all([api("/info"), api("/templates"), api("/adapters")]);
    state.info = info; state.templates = templates.templates; state.adapters = adapters.adapters;
    $("model-info").textContent = `model ${info.model} (${info.family}) · ${info.dtype} · ${info.device}` +
      `${info.compiled ? " · compiled" : ""} · quantization ${info.quantization}`;
    fillSettings(info);
    fillTemplates(state.templates);
    fillSystems();
    await loadHistoryVideos();
    renderHistory();
    document.body.dataset.ready = "true";
  } catch (error) {
    $("model-info").textContent = `cannot reach the service: ${error.message}`;
  }
}

start();
