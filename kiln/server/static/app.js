// kiln playground: a chat client for the server's own /v1/chat/completions (streamed SSE), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  system: $("system"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
  apiKey: $("api-key"), apiKeyField: $("api-key-field"), messages: $("messages"), empty: $("empty"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), form: $("composer"), newChat: $("new-chat"),
  modelName: $("model-name"), dot: $("status-dot"),
};
let model = null;
let history = []; // {role, content} of the conversation so far (system prompt excluded)
let controller = null; // aborts the reply in flight

// ------------------------------------------------------------------------------------------ settings

for (const [input, out] of [[ui.temperature, "temperature-value"], [ui.topP, "top-p-value"]]) {
  const show = () => { $(out).textContent = Number(input.value).toFixed(2); };
  input.addEventListener("input", show);
  show();
}
ui.apiKey.value = localStorage.getItem("kiln-api-key") || "";
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem("kiln-api-key", ui.apiKey.value);
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (ui.apiKey.value) h.Authorization = `Bearer ${ui.apiKey.value}`;
  return h;
}

// The server was started with --api-key and this one is missing or wrong: show the field and ask for it.
// Returns true when a new key was entered (the caller retries once with it).
function askForKey() {
  ui.apiKeyField.classList.remove("hidden");
  setStatus("API key needed", "bad");
  const key = window.prompt("This server needs an API key (its --api-key):", ui.apiKey.value);
  if (!key || key === ui.apiKey.value) return false;
  ui.apiKey.value = key;
  localStorage.setItem("kiln-api-key", key);
  return true;
}

// fetch, with the key sent; a 401 asks for the key and retries once.
async function authorizedFetch(url, options = {}) {
  const response = await fetch(url, { ...options, headers: headers() });
  if (response.status !== 401 || !askForKey()) return response;
  return fetch(url, { ...options, headers: headers() });
}

async function loadModel() {
  try {
    const response = await authorizedFetch("/v1/models");
    if (response.status === 401) return; // still no valid key: the field stays open
    const body = await response.json();
    model = body.data[0].id;
    setStatus(`${model} · ${body.data[0].max_model_len} ctx`, "ok");
  } catch (error) {
    setStatus("server unreachable", "bad");
  }
}

function setStatus(text, kind) {
  ui.modelName.textContent = text;
  ui.dot.className = `dot ${kind}`;
}

// -------------------------------------------------------------------------------------------- render

function addMessage(role, text = "") {
  ui.empty.classList.add("hidden");
  const wrap = document.createElement("div");
  wrap.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  wrap.append(label, bubble);
  ui.messages.append(wrap);
  scrollDown();
  return { wrap, bubble };
}

function addNote(wrap, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  wrap.append(note);
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function setMetrics({ ttft, tps, tokens, finish }) {
  if (ttft !== undefined) $("m-ttft").textContent = ttft === null ? "–" : `${(ttft * 1000).toFixed(0)} ms`;
  if (tps !== undefined) $("m-tps").textContent = tps === null ? "–" : tps.toFixed(1);
  if (tokens !== undefined) $("m-tokens").textContent = tokens;
  if (finish !== undefined) $("m-finish").textContent = finish;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

// ------------------------------------------------------------------------------------------ stream

// Yields each SSE event's data (the JSON text, or "[DONE]") as it arrives.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant");
  reply.wrap.classList.add("streaming");
  const messages = ui.system.value.trim()
    ? [{ role: "system", content: ui.system.value.trim() }, ...history]
    : [...history];
  controller = new AbortController();
  setBusy(true);
  setMetrics({ ttft: null, tps: null, tokens: 0, finish: "…" });
  const start = performance.now();
  let first = null;
  let tokens = 0;
  let content = "";
  let finish = null;
  try {
    const response = await authorizedFetch("/v1/chat/completions", {
      method: "POST",
      signal: controller.signal,
      body: JSON.stringify({
        model, messages, stream: true, stream_options: { include_usage: true },
        temperature: Number(ui.temperature.value), top_p: Number(ui.topP.value),
        max_tokens: Number(ui.maxTokens.value) || undefined,
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices) {
        if (choice.delta.content) {
          const now = performance.now();
          if (first === null) first = now;
          tokens += 1;
          content += choice.delta.content;
          reply.bubble.textContent = content;
          scrollDown();
          const seconds = (now - first) / 1000;
          setMetrics({ ttft: (first - start) / 1000, tps: seconds > 0 ? (tokens - 1) / seconds : null, tokens });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    setMetrics({ tokens, finish: finish || "–" });
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
      setMetrics({ finish });
      addNote(reply.wrap, "stopped");
    } else {
      reply.wrap.classList.add("error");
      reply.bubble.textContent = error.message;
      setMetrics({ finish: "error" });
    }
  } finally {
    reply.wrap.classList.remove("streaming");
    controller = null;
    setBusy(false);
  }
  if (content) history.push({ role: "assistant", content });
  else if (!reply.wrap.classList.contains("error")) history.pop(); // nothing came back: let the user retry
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => controller && controller.abort());
ui.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  ui.messages.querySelectorAll(".message").forEach((node) => node.remove());
  ui.empty.classList.remove("hidden");
  setMetrics({ ttft: null, tps: null, tokens: "–", finish: "–" });
});

// ------------------------------------------------------------------------------------ server stats

function metricValue(text, name) {
  const match = text.match(new RegExp(`^${name}\\{[^}]*\\} ([0-9.e+-]+)$`, "m"));
  return match ? Number(match[1]) : null;
}

async function pollServer() {
  try {
    const text = await (await fetch("/metrics")).text();
    const running = metricValue(text, "kiln:num_requests_running");
    const waiting = metricValue(text, "kiln:num_requests_waiting");
    const kv = metricValue(text, "kiln:kv_cache_usage_perc");
    $("s-running").textContent = running ?? "–";
    $("s-waiting").textContent = waiting ?? "–";
    $("s-kv").textContent = kv === null ? "–" : `${(kv * 100).toFixed(1)}%`;
    $("s-kv-bar").style.width = `${Math.min((kv || 0) * 100, 100)}%`;
  } catch (error) {
    setStatus("server unreachable", "bad");
  }
}

loadModel();
pollServer();
setInterval(pollServer, 2000);
