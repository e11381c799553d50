// The chat page: keeps the conversation as OpenAI messages, streams each answer over SSE (fetch + ReadableStream).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], pending: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error(await errorMessage(r));
    state.model = (await r.json()).data[0].id;
    $("model").textContent = "model: " + state.model;
    showError("");
  } catch (e) {
    $("model").textContent = "model: unknown";
    showError("Cannot list models: " + e.message);
  }
}

function addEntry(role, text, images) {
  const li = document.createElement("li");
  li.className = role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "InternVL";
  li.append(label);
  for (const src of images || []) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "attached image";
    li.append(img);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  $("log").append(li);
  li.scrollIntoView({ block: "end" });
  return body;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function renderPreviews() {
  const box = $("previews");
  box.replaceChildren();
  state.pending.forEach((src, i) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src;
    img.alt = `attached image ${i + 1}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = `Remove image ${i + 1}`;
    remove.onclick = () => { state.pending.splice(i, 1); renderPreviews(); };
    fig.append(img, remove);
    box.append(fig);
  });
}

// Parse "data: ..." events out of the SSE byte stream and hand each JSON payload to onEvent.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.controller) return;
  showError("");
  const images = state.pending.slice();
  const content = [{ type: "text", text: question }];
  for (const url of images) content.push({ type: "image_url", image_url: { url } });
  const userMessage = { role: "user", content };
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.messages, userMessage);

  const asked = addEntry("user", question, images);
  const out = addEntry("assistant", "", []);
  out.parentElement.setAttribute("aria-busy", "true");
  $("question").value = "";
  state.pending = [];
  renderPreviews();
  setBusy(true);
  state.controller = new AbortController();
  let answer = "";
  let failed = false;
  try {
    const body = {
      model: state.model || undefined, messages, stream: true,
      max_tokens: Number($("max-tokens").value) || undefined,
      temperature: Number($("temperature").value),
    };
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        out.textContent = answer;
      }
    });
  } catch (e) {
    failed = true;
    if (e.name === "AbortError") out.textContent = answer + " [stopped]";
    else showError(e.message);
  } finally {
    out.parentElement.removeAttribute("aria-busy");
    state.controller = null;
    setBusy(false);
    $("question").focus();
  }
  if (!failed || answer) {
    state.messages.push(userMessage, { role: "assistant", content: answer });
  } else {  // nothing came back: take the turn out and give the question and images back for a retry
    asked.parentElement.remove();
    out.parentElement.remove();
    $("question").value = question;
    state.pending = images.concat(state.pending);
    renderPreviews();
  }
}

function init() {
  $("ask").addEventListener("submit", send);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) $("ask").requestSubmit();
    if (e.key === "Enter" && !e.shiftKey) e.preventDefault();
  });
  $("images").addEventListener("change", async (e) => {
    try {
      for (const file of e.target.files) state.pending.push(await readAsDataURL(file));
    } catch (err) {
      showError(err.message);
    }
    e.target.value = "";
    renderPreviews();
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    state.pending = [];
    $("log").replaceChildren();
    renderPreviews();
    showError("");
  });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
