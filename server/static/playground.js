// Framewise playground: upload or name a video, ask, stream the answer, and show the frames the model saw
// (the API's `framewise.return_frames = "thumbnails"`). Vanilla JS, no build step, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: localStorage.getItem("framewise.apiKey") || "", model: null, url: null, job: null, abort: null };

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

// ---- errors: the API's OpenAI-style body {"error": {message, code, ...}} -------------------------------
function showError(err) {
  const box = $("error");
  box.hidden = false;
  box.replaceChildren();
  const code = document.createElement("code");
  code.className = "error-code";
  code.textContent = err.code || "error";
  const msg = document.createElement("span");
  msg.className = "error-message";
  msg.textContent = " " + (err.message || String(err));
  box.append(code, msg);
  setStatus("failed");
}

function clearError() { $("error").hidden = true; $("error").replaceChildren(); }

async function apiError(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return { code: body.error.code, message: body.error.message, status: resp.status };
  } catch (_) { /* not JSON */ }
  return { code: `http_${resp.status}`, message: resp.statusText, status: resp.status };
}

function setStatus(text) { $("status").textContent = text ? `(${text})` : ""; }

// ---- API key and model ---------------------------------------------------------------------------------
async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (resp.status === 401) {
    $("key-form").hidden = false;
    $("model-name").textContent = "this server needs an API key";
    return false;
  }
  if (!resp.ok) { showError(await apiError(resp)); return false; }
  const body = await resp.json();
  state.model = body.data[0] && body.data[0].id;
  $("model-name").textContent = state.model ? `model: ${state.model}` : "no model";
  $("key-form").hidden = !state.key;
  return true;
}

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  state.key = $("api-key").value.trim();
  localStorage.setItem("framewise.apiKey", state.key);
  clearError();
  if (!(await loadModels())) showError({ code: "invalid_api_key", message: "the server refused this API key" });
});

// ---- picking a video: upload (file input or drop) -> file id, or a URL ------------------------------------
async function upload(file) {
  clearError();
  $("upload-status").textContent = `uploading ${file.name} (${(file.size / 1e6).toFixed(2)} MB)…`;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = !file.type.startsWith("video/");
  const form = new FormData();
  form.append("file", file);
  form.append("purpose", "vision");
  const resp = await fetch("/v1/files", { method: "POST", headers: headers(), body: form });
  if (!resp.ok) {
    $("upload-status").textContent = "upload failed";
    showError(await apiError(resp));
    return;
  }
  const obj = await resp.json();
  state.url = obj.id;
  state.isImage = file.type.startsWith("image/");
  $("url").value = obj.id;
  $("upload-status").textContent = `uploaded ${obj.filename} as ${obj.id} (${obj.bytes} bytes)`;
}

$("file").addEventListener("change", () => { if ($("file").files[0]) upload($("file").files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
});
$("url").addEventListener("input", () => {
  state.url = $("url").value.trim() || null;
  state.isImage = /^data:image\/|\.(jpe?g|png|webp|gif|bmp)(\?.*)?$/i.test(state.url || "");
});

// ---- the request ----------------------------------------------------------------------------------------
function number(id) { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); }

function requestBody() {
  const video = { url: state.url };
  for (const [key, id] of [["num_frames", "num-frames"], ["fps", "fps"], ["start", "start"], ["end", "end"]]) {
    if (number(id) !== undefined) video[key] = number(id);
  }
  const part = state.isImage ? { type: "image_url", image_url: { url: state.url } } : { type: "video_url", video_url: video };
  const extra = $("extra").value.trim() ? JSON.parse($("extra").value) : {};
  return {
    model: state.model,
    messages: [{ role: "user", content: [part, { type: "text", text: $("question").value }] }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: number("max-tokens"),
    temperature: number("temperature"),
    framewise: { return_frames: "thumbnails" },
    ...extra,  // the researcher's own fields win (seed, top_k, ignore_eos, ...)
  };
}

// ---- server-sent events over fetch + ReadableStream -----------------------------------------------------
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const event = { comments: [], data: [], event: null };
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(":")) event.comments.push(line.slice(1).trim());
        else if (line.startsWith("data:")) event.data.push(line.slice(5).replace(/^ /, ""));
        else if (line.startsWith("event:")) event.event = line.slice(6).trim();
      }
      yield event;
    }
  }
}

// ---- rendering ------------------------------------------------------------------------------------------
function stat(name, value) {
  const div = document.createElement("div");
  div.dataset.stat = name;
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  div.append(dt, dd);
  const old = $("stats").querySelector(`[data-stat="${name}"]`);
  if (old) old.replaceWith(div); else $("stats").append(div);
}

function renderMedia(media) {
  const box = $("media");
  box.replaceChildren();
  media.forEach((m, i) => {
    const item = document.createElement("div");
    item.className = "media-item";
    const meta = document.createElement("div");
    meta.className = "meta";
    const parts = m.type === "video"
      ? [`video ${i + 1}: ${m.frames} frames`, `source ${m.duration_s} s`, `${m.source_fps} fps`, m.codec,
        `fetch ${m.fetch_ms} ms`, `decode ${m.decode_ms} ms`, m.cache_hit ? "frame cache hit" : "decoded"]
      : [`image ${i + 1}: ${m.width}×${m.height}`, `fetch ${m.fetch_ms} ms`, `decode ${m.decode_ms} ms`];
    if (m.thumbnails_omitted) parts.push(`${m.thumbnails_omitted} thumbnails omitted (response bound)`);
    meta.textContent = parts.join(" · ");
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    (m.thumbnails || []).forEach((src, k) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = src;
      img.dataset.media = String(i);
      img.dataset.frame = String(k);
      if (m.timestamps) img.dataset.timestamp = String(m.timestamps[k]);
      img.alt = m.timestamps ? `frame at ${m.timestamps[k]} s` : "image";
      const cap = document.createElement("figcaption");
      cap.textContent = m.timestamps ? `#${k} · ${m.timestamps[k].toFixed(3)} s` : "image";
      fig.append(img, cap);
      thumbs.append(fig);
    });
    item.append(meta, thumbs);
    box.append(item);
  });
  const shown = media.map(({ thumbnails, ...rest }) => ({ ...rest, thumbnails: (thumbnails || []).length }));
  $("raw").textContent += "\n\nframewise.media (thumbnails counted):\n" + JSON.stringify(shown, null, 2);
}

// ---- a queued completion: follow its job's progress events; cancel ----------------------------------------
async function followJob(id) {
  state.job = id;
  $("job").hidden = false;
  $("job-id").textContent = id;
  $("cancel-button").hidden = false;
  const list = $("job-events");
  list.replaceChildren();
  const began = performance.now();
  try {
    const resp = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, { headers: headers() });
    if (!resp.ok) { showError(await apiError(resp)); return; }
    for await (const ev of sseEvents(resp)) {
      if (!ev.data.length) continue;
      const data = JSON.parse(ev.data.join("\n"));
      const li = document.createElement("li");
      li.dataset.stage = data.stage;
      const extra = data.tokens !== undefined ? ` · ${data.tokens} tokens`
        : data.frames_total !== undefined ? ` · ${data.frames_done}/${data.frames_total} frames` : "";
      li.textContent = `${((performance.now() - began) / 1000).toFixed(1)} s  ${data.stage}${extra}`;
      const last = list.lastElementChild;
      if (last && last.dataset.stage === data.stage && data.stage === "generating") last.replaceWith(li);
      else list.append(li);
      setStatus(`job ${data.stage}`);
      if (["done", "failed", "cancelled"].includes(data.stage)) break;
    }
  } finally {
    $("cancel-button").hidden = true;
  }
}

$("cancel-button").addEventListener("click", async () => {
  if (!state.job) return;
  const resp = await fetch(`/v1/jobs/${encodeURIComponent(state.job)}`, { method: "DELETE", headers: headers() });
  if (!resp.ok) showError(await apiError(resp));
});

$("stop-button").addEventListener("click", () => { if (state.abort) state.abort.abort(); });

// ---- ask ----------------------------------------------------------------------------------------------
async function ask() {
  clearError();
  if (!state.url) { showError({ code: "no_video", message: "choose a file, drop one, or type a URL first" }); return; }
  if (!state.model && !(await loadModels())) return;
  $("answer").textContent = "";
  $("stats").replaceChildren();
  $("media").replaceChildren();
  $("job").hidden = true;
  state.job = null;
  let body;
  try { body = requestBody(); } catch (e) { showError({ code: "invalid_json", message: `extra request fields: ${e.message}` }); return; }
  $("raw").textContent = "request:\n" + JSON.stringify(body, null, 2);
  $("ask-button").disabled = true;
  $("stop-button").hidden = false;
  document.body.dataset.state = "running";
  setStatus("sending");
  state.abort = new AbortController();
  const sent = performance.now();
  let first = null, finished = false;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
      signal: state.abort.signal,
    });
    if (!resp.ok) { showError(await apiError(resp)); return; }
    setStatus("streaming");
    for await (const ev of sseEvents(resp)) {
      for (const c of ev.comments) {
        const m = /^queued as (\S+?),/.exec(c);
        if (m && !state.job) { setStatus("queued as a job"); followJob(m[1]); }
      }
      if (!ev.data.length) continue;
      const data = ev.data.join("\n");
      if (data === "[DONE]") { finished = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) { showError(chunk.error); return; }
      if (chunk.framewise && chunk.framewise.media) {
        renderMedia(chunk.framewise.media);
        if (chunk.framewise.job_id) stat("job", chunk.framewise.job_id);
      }
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        if (choice.delta && choice.delta.content) {
          if (first === null) { first = performance.now(); stat("TTFT (client)", `${(first - sent).toFixed(0)} ms`); }
          $("answer").textContent += choice.delta.content;
        }
        if (choice.finish_reason) stat("finish", choice.finish_reason);
      }
      if (chunk.usage) {
        stat("prompt tokens", chunk.usage.prompt_tokens);
        stat("completion tokens", chunk.usage.completion_tokens);
        stat("video frames", chunk.usage.video_frames);
      }
    }
    const total = performance.now() - sent;
    stat("total", `${(total / 1000).toFixed(2)} s`);
    if (finished) setStatus("done");
    else showError({ code: "stream_ended", message: "the stream ended without [DONE]" });
  } catch (e) {
    showError(e.name === "AbortError" ? { code: "stopped", message: "stopped by you" } : { code: "network_error", message: String(e) });
  } finally {
    $("ask-button").disabled = false;
    $("stop-button").hidden = true;
    document.body.dataset.state = finished ? "done" : "failed";
  }
}

$("ask-button").addEventListener("click", ask);
if (state.key) $("api-key").value = state.key;
loadModels();
