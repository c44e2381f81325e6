"use strict";
// The vllm_omni playground: a client of this server's public API, nothing more. Every URL is
// relative, so the page works under --root-path. Text from the server is only ever set as
// textContent, never parsed as HTML.

const KEY_STORE = "vllm_omni_api_key";
const ROUTES = {
  generate: "/v1/images/generations", edit: "/v1/images/edits",
  video: "/v1/videos", audio: "/v1/audio/generate",
};
// Request fields the page sets itself, and OpenAI fields whose only accepted value is the default.
const OWN = new Set(["model", "prompt", "input", "stream", "partial_images", "response_format",
  "image", "mask", "input_reference", "lora", "user", "quality", "background", "moderation",
  "style", "input_fidelity", "speed", "stream_format"]);
const SIZES = ["64x64", "128x128", "256x256", "512x512", "768x768", "1024x1024", "1024x768",
  "768x1024"];
const MAX_RANDOM_SEED = 2 ** 32;  // drawn here; within JavaScript's exact integers

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem(KEY_STORE) || "", openapi: null, model: null,
  capabilities: {}, modes: [], mode: null, fields: {} };

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const c of children) node.append(c);
  return node;
}

function authHeaders() {
  return state.key ? { Authorization: "Bearer " + state.key } : {};
}

// A failed answer as the server gave it: OpenAI's {"error": {...}} or its plain text.
async function errorText(resp) {
  const text = await resp.text();
  try {
    const e = JSON.parse(text).error;
    if (e && e.message) {
      return `${resp.status} ${e.code || e.type || ""}${e.param ? ` (${e.param})` : ""}: ${e.message}`;
    }
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}${text ? ": " + text : ""}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

// -- what the server serves ------------------------------------------------------------------
function resolve(schema) {
  while (schema && schema.$ref) {
    schema = state.openapi.components.schemas[schema.$ref.split("/").pop()];
  }
  return schema;
}

function bodySchema(path) {
  const op = state.openapi.paths[path] && state.openapi.paths[path].post;
  if (!op) return null;
  const content = op.requestBody.content;
  return resolve((content["application/json"] || content["multipart/form-data"]).schema);
}

// A property's own type, with Optional's null branch removed.
function propType(prop) {
  const branches = (prop.anyOf || [prop]).map(resolve).filter((b) => b.type !== "null");
  return branches.length === 1 ? branches[0] : { type: "mixed" };
}

async function loadModels() {
  const resp = await fetch("v1/models", { headers: authHeaders() });
  if (resp.status === 401) {
    $("api-key").classList.add("needed");
    showError(await errorText(resp) + " — enter this server's API key above.");
    return false;
  }
  if (!resp.ok) {
    showError(await errorText(resp));
    return false;
  }
  $("api-key").classList.remove("needed");
  showError("");
  const models = (await resp.json()).data;
  state.model = models.find((m) => !m.parent) || models[0];
  state.capabilities = state.model.capabilities || {};
  $("model-name").textContent = state.model.id;
  $("model-task").textContent = state.model.task || "";
  const adapters = models.filter((m) => m.parent);
  const select = $("lora");
  select.replaceChildren(el("option", { value: "", textContent: "none" }),
    ...adapters.map((m) => el("option", { value: m.id, textContent: m.id })));
  $("lora-row").hidden = adapters.length === 0;
  return true;
}

function setupModes() {
  const paths = state.openapi.paths;
  const inputs = state.capabilities.input_images || [0, 0];
  state.modes = [];
  if (paths[ROUTES.video]) state.modes.push("video");
  else if (paths[ROUTES.audio]) state.modes.push("audio");
  else {
    if (inputs[0] === 0) state.modes.push("generate");
    if (inputs[1] > 0 && paths[ROUTES.edit]) state.modes.push("edit");
  }
  const nav = $("modes");
  nav.replaceChildren(...state.modes.map((mode) => el("button", {
    type: "button", textContent: mode, className: "mode", onclick: () => setMode(mode),
  })));
  nav.hidden = state.modes.length < 2;
  setMode(state.modes[0]);
}

function setMode(mode) {
  state.mode = mode;
  for (const b of $("modes").children) b.classList.toggle("active", b.textContent === mode);
  const schema = bodySchema(ROUTES[mode]);
  $("prompt-label").textContent = mode === "audio" ? "Text" : "Prompt";
  const inputs = state.capabilities.input_images || [0, 0];
  const images = mode === "edit" || (mode === "video" && inputs[1] > 0);
  $("images-row").hidden = !images;
  $("images").multiple = inputs[1] > 1;
  $("images-label").textContent = mode === "video"
    ? (inputs[0] ? "Input image (the first frame)" : "Input image (optional first frame)")
    : (inputs[1] > 1 ? `Input images (up to ${inputs[1]})` : "Input image");
  $("previews-row").hidden = !(mode === "generate" || mode === "edit") || !state.capabilities.previews;
  $("run").textContent = mode === "edit" ? "Edit" : "Generate";
  buildFields(schema);
}

function buildFields(schema) {
  const box = $("fields");
  const old = {};
  for (const [name, input] of Object.entries(state.fields)) old[name] = input.value;
  state.fields = {};
  box.replaceChildren();
  for (const [name, prop] of Object.entries(schema.properties)) {
    if (OWN.has(name)) continue;
    const t = propType(prop);
    if (t.type === "object" || t.type === "mixed") continue;
    let input;
    if (t.enum || t.type === "boolean") {
      const choices = t.enum || [true, false];
      input = el("select", {}, el("option", { value: "", textContent: "default" }),
        ...choices.map((c) => el("option", { value: JSON.stringify(c), textContent: String(c) })));
    } else if (t.type === "integer" || t.type === "number") {
      input = el("input", { type: "number", step: t.type === "integer" ? "1" : "any",
        placeholder: "default" });
      if (t.minimum !== undefined) input.min = t.minimum;
      if (t.maximum !== undefined && t.maximum < 1e15) input.max = t.maximum;
      if (name === "seed") { input.placeholder = "random"; input.step = "1"; }
    } else {
      input = el("input", { type: "text", placeholder: t.type === "array" ? "[1, 2]" : "default" });
      if (name === "size") { input.setAttribute("list", "sizes"); input.placeholder = "model default"; }
    }
    input.id = "field-" + name;
    input.dataset.kind = t.enum || t.type === "boolean" ? "json" : t.type;
    if (old[name] !== undefined) input.value = old[name];
    const label = el("label", { title: prop.description || t.description || "" },
      el("span", { textContent: name }), input);
    box.append(label);
    state.fields[name] = input;
  }
  box.append(el("datalist", { id: "sizes" },
    ...SIZES.map((s) => el("option", { value: s }))));
}

// -- a request ---------------------------------------------------------------------------------
// The fields the user set (nothing else is sent: the server's defaults stay the server's).
function collect() {
  const body = {};
  for (const [name, input] of Object.entries(state.fields)) {
    const raw = input.value.trim();
    if (raw === "") continue;
    const kind = input.dataset.kind;
    if (name === "seed") body.seed = raw;  // kept as text: seeds go past 2**53
    else if (kind === "json" || kind === "array") {
      try {
        body[name] = JSON.parse(raw);
      } catch (_) {
        throw new Error(`${name}: not valid JSON (${raw})`);
      }
    }
    else if (kind === "integer" || kind === "number") body[name] = Number(raw);
    else body[name] = raw;
  }
  if (body.seed === undefined) body.seed = String(Math.floor(Math.random() * MAX_RANDOM_SEED));
  const lora = $("lora").value;
  if (lora) body.lora = { name: lora, scale: Number($("lora-scale").value || 1) };
  return body;
}

// JSON with the seed written as the exact integer the user typed.
function toJson(body, indent) {
  const { seed, ...rest } = body;
  const text = JSON.stringify({ ...rest, seed: "\u0000seed" }, null, indent);
  return /^\d+$/.test(seed) ? text.replace('"\\u0000seed"', seed) : text.replace('"\\u0000seed"', JSON.stringify(seed));
}

function shellQuote(s) { return "'" + s.replace(/'/g, "'\\''") + "'"; }

function pyLiteral(body) {
  return toJson(body, 4).replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False")
    .replace(/\bnull\b/g, "None");
}

// The request exactly as sent, as curl and as Python (the key as $OPENAI_API_KEY, never its value).
function snippets(path, body, files, fileField) {
  const url = new URL(path.slice(1), new URL(".", location.href)).href;
  const auth = state.key ? " -H 'Authorization: Bearer '\"$OPENAI_API_KEY\"" : "";
  const pyAuth = state.key ? '"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]' : "";
  if (!files.length) {
    return {
      curl: `curl -s ${shellQuote(url)}${auth} -H 'Content-Type: application/json' \\\n  -d ${shellQuote(toJson(body))}`,
      python: `import os, requests\n\nresp = requests.post(\n    ${JSON.stringify(url)},\n` +
        `    headers={${pyAuth}},\n    json=${pyLiteral(body).replace(/\n/g, "\n    ")},\n)`,
    };
  }
  const form = Object.entries(body).map(([k, v]) => [k, typeof v === "string" ? v : k === "seed" ? v : JSON.stringify(v)]);
  const curlFields = form.map(([k, v]) => ` -F ${shellQuote(`${k}=${v}`)}`).join("")
    + files.map((f) => ` -F ${shellQuote(`${fileField}=@${f.name}`)}`).join("");
  return {
    curl: `curl -s ${shellQuote(url)}${auth}${curlFields}`,
    python: `import os, requests\n\nresp = requests.post(\n    ${JSON.stringify(url)},\n` +
      `    headers={${pyAuth}},\n    data=${JSON.stringify(Object.fromEntries(form), null, 4).replace(/\n/g, "\n    ")},\n` +
      `    files=[${files.map((f) => `(${JSON.stringify(fileField)}, open(${JSON.stringify(f.name)}, "rb"))`).join(", ")}],\n)`,
  };
}

function formData(body, files, fileField) {
  const form = new FormData();
  for (const [k, v] of Object.entries(body)) {
    form.append(k, typeof v === "string" ? v : JSON.stringify(v));
  }
  for (const f of files) form.append(fileField, f, f.name);
  return form;
}

async function post(path, body, files, fileField) {
  const init = { method: "POST", headers: authHeaders() };
  if (files.length) init.body = formData(body, files, fileField);
  else {
    init.headers["Content-Type"] = "application/json";
    init.body = toJson(body);
  }
  return fetch(path.slice(1), init);
}

// Server-sent events from a streamed response: yields {event, data}.
async function* events(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const msg = { event: "message", data: "" };
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event:")) msg.event = line.slice(6).trim();
        else if (line.startsWith("data:")) msg.data += line.slice(5).trim();
      }
      yield msg;
    }
  }
}

async function runImages(mode, body, files, t0) {
  const path = ROUTES[mode];
  const field = files.length > 1 ? "image[]" : "image";
  // A stream carries one image (OpenAI's rule); several come back in one JSON answer.
  const stream = !(body.n > 1);
  if (stream) body.stream = true;
  if (stream && !$("previews-row").hidden && $("previews").checked) body.partial_images = 2;
  const shown = snippets(path, body, files, field);
  const resp = await post(path, body, files, field);
  if (!resp.ok) throw new Error(await errorText(resp));
  if (!stream) {
    const answer = await resp.json();
    for (const item of answer.data) {
      const src = `data:image/${answer.output_format};base64,${item.b64_json}`;
      addResult(el("img", { src, alt: body.prompt || "result" }), body, shown, answer.size, t0);
    }
    return;
  }
  for await (const msg of events(resp)) {
    const data = JSON.parse(msg.data);
    if (msg.event === "error") throw new Error(`${data.error.code || data.error.type}: ${data.error.message}`);
    const src = `data:image/${data.output_format};base64,${data.b64_json}`;
    if (msg.event.endsWith(".partial_image")) {
      $("live").hidden = false;
      $("preview").src = src;
      setStatus(`preview ${data.partial_image_index + 1}`);
    } else if (msg.event.endsWith(".completed")) {
      $("live").hidden = true;
      addResult(el("img", { src, alt: body.prompt || "result" }), body, shown, data.size, t0);
    }
  }
}

async function runVideo(body, files, t0) {
  const shown = snippets(ROUTES.video, body, files, "input_reference");
  const resp = await post(ROUTES.video, body, files, "input_reference");
  if (!resp.ok) throw new Error(await errorText(resp));
  let job = await resp.json();
  const bar = $("progress");
  bar.hidden = false;
  while (job.status === "queued" || job.status === "in_progress") {
    bar.value = job.progress || 0;
    setStatus(`${job.status} ${job.progress || 0}%`);
    await new Promise((r) => setTimeout(r, 250));
    const poll = await fetch(`v1/videos/${encodeURIComponent(job.id)}`, { headers: authHeaders() });
    if (!poll.ok) throw new Error(await errorText(poll));
    job = await poll.json();
  }
  bar.value = 100;
  if (job.status !== "completed") {
    throw new Error(job.error ? `${job.error.code}: ${job.error.message}` : `job ${job.status}`);
  }
  const content = await fetch(`v1/videos/${encodeURIComponent(job.id)}/content`, { headers: authHeaders() });
  if (!content.ok) throw new Error(await errorText(content));
  const src = URL.createObjectURL(await content.blob());
  addResult(el("video", { src, controls: true, loop: true, autoplay: true, muted: true }),
    body, shown, job.size, t0, job.id);
}

async function runAudio(body, t0) {
  const shown = snippets(ROUTES.audio, body, [], "");
  const resp = await post(ROUTES.audio, body, [], "");
  if (!resp.ok) throw new Error(await errorText(resp));
  const src = URL.createObjectURL(await resp.blob());
  const rate = resp.headers.get("X-Sample-Rate");
  addResult(el("audio", { src, controls: true }), body, shown, rate ? `${rate} Hz` : "", t0);
}

function addResult(media, body, shown, size, t0, id) {
  const seconds = ((performance.now() - t0) / 1000).toFixed(2);
  const code = el("pre", { hidden: true, className: "snippet" });
  const show = (which) => () => {
    const same = !code.hidden && code.dataset.which === which;
    code.hidden = same;
    code.dataset.which = which;
    code.textContent = shown[which];
  };
  const card = el("figure", { className: "result" }, media,
    el("figcaption", {},
      el("span", { className: "seed", textContent: `seed ${body.seed}` }),
      el("span", { textContent: [size, `${seconds} s`, id].filter(Boolean).join(" · ") }),
      el("button", { type: "button", textContent: "curl", onclick: show("curl") }),
      el("button", { type: "button", textContent: "Python", onclick: show("python") })),
    code);
  $("gallery").prepend(card);
}

async function run(event) {
  event.preventDefault();
  showError("");
  const button = $("run");
  button.disabled = true;
  $("progress").hidden = true;
  setStatus("running…");
  const t0 = performance.now();
  try {
    const body = collect();
    const prompt = $("prompt").value;
    if (state.mode === "audio") body.input = prompt;
    else if (prompt) body.prompt = prompt;
    const files = $("images-row").hidden ? [] : [...$("images").files];
    if (state.mode === "video") await runVideo(body, files, t0);
    else if (state.mode === "audio") await runAudio(body, t0);
    else await runImages(state.mode, body, files, t0);
    setStatus(`done in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  } catch (e) {
    setStatus("");
    $("live").hidden = true;
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

async function start() {
  const keyBox = $("api-key");
  keyBox.value = state.key;
  const useKey = async (event) => {
    if (event) event.preventDefault();
    state.key = keyBox.value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    if (await loadModels() && !state.mode) setupModes();
  };
  keyBox.addEventListener("change", useKey);
  $("key-form").addEventListener("submit", useKey);
  $("request").addEventListener("submit", run);
  const resp = await fetch("openapi.json");
  if (!resp.ok) {
    showError(await errorText(resp));
    return;
  }
  state.openapi = await resp.json();
  if (await loadModels()) setupModes();
}

document.addEventListener("DOMContentLoaded", start);
