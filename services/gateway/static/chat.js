// The chat page: talks to /v1/chat/completions and posts thumbs to /v1/feedback.
// Plain JS, no build step. Each answer carries its response id; the thumbs use it.
"use strict";

const messages = [];  // the conversation sent with each request: [{role, content}]
const log = document.getElementById("log");
const statusLine = document.getElementById("status");
const keyInput = document.getElementById("api-key");

fetch("/ui/config").then((r) => r.json()).then((cfg) => {
  if (cfg.dev_api_key && !keyInput.value) keyInput.value = cfg.dev_api_key;
}).catch(() => {});

function headers() {
  return { "Content-Type": "application/json", "Authorization": "Bearer " + keyInput.value.trim() };
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = (role === "user" ? "You: " : "Policy: ") + text;
  log.appendChild(div);
  return div;
}

function errorText(body, status) {
  // OpenAI's error object (chat completions) or FastAPI's 422 detail (feedback).
  if (body && body.error && body.error.message) return (body.error.param ? body.error.param + ": " : "") + body.error.message;
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.loc.join(".") + ": " + d.msg).join("; ");
  if (body && body.detail) return String(body.detail);
  return "HTTP " + status;
}

async function sendThumb(responseId, thumb, box) {
  const result = box.querySelector(".result");
  result.textContent = "sending...";
  const res = await fetch("/v1/feedback", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ response_id: responseId, thumb: thumb, idempotency_key: "ui-" + responseId + "-" + thumb }),
  });
  const body = await res.json().catch(() => null);
  if (res.status === 202) {
    result.className = "result sent";
    result.textContent = "thanks (" + thumb + ")";
    box.dataset.feedbackId = body.id;
  } else {
    result.className = "result error";
    result.textContent = "not stored: " + errorText(body, res.status);
  }
}

function addFeedback(turn, responseId) {
  const box = document.createElement("div");
  box.className = "feedback";
  box.dataset.responseId = responseId;
  for (const [thumb, label] of [["up", "\u{1F44D}"], ["down", "\u{1F44E}"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "thumb-" + thumb;
    b.title = "thumbs " + thumb;
    b.textContent = label;
    b.addEventListener("click", () => sendThumb(responseId, thumb, box));
    box.appendChild(b);
  }
  const result = document.createElement("span");
  result.className = "result";
  box.appendChild(result);
  turn.appendChild(box);
}

document.getElementById("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("prompt");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  statusLine.textContent = "";
  messages.push({ role: "user", content: text });
  addTurn("user", text);
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify({ messages: messages }),
  });
  const body = await res.json().catch(() => null);
  if (res.status !== 200) {
    messages.pop();
    statusLine.textContent = errorText(body, res.status);
    return;
  }
  const answer = body.choices[0].message.content;
  messages.push({ role: "assistant", content: answer });
  const turn = addTurn("assistant", answer);
  turn.dataset.responseId = body.id;
  addFeedback(turn, body.id);
});
