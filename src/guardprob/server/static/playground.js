// The playground: one conversation to POST /v1/classify, and the answer drawn as bars.
// Everything the server sends (category names, the verdict, error messages) is written as
// text (textContent), never parsed as markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const overrides = new Map(); // category id -> threshold typed on this page
  let last = null; // the last answer, redrawn when a threshold changes

  const fixed = (x) => (typeof x === "number" ? x.toFixed(4) : "n/a");
  const percent = (x) => `${Math.min(Math.max(x, 0), 1) * 100}%`;

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
    status.setAttribute("role", isError ? "alert" : "status");
  }

  // A 0..1 track: the proven interval shaded, the estimate as a bar, the threshold as a line.
  function drawBar(bar, p, lower, upper, threshold) {
    bar.replaceChildren();
    const interval = element("span", "interval");
    interval.style.left = percent(lower);
    interval.style.width = percent(Math.max(upper - lower, 0));
    const fill = element("span", "fill");
    fill.style.width = percent(p);
    bar.append(interval, fill);
    if (threshold !== undefined) {
      const marker = element("span", "marker");
      marker.style.left = percent(threshold);
      bar.append(marker);
    }
  }

  function describe(name, p, lower, upper, threshold, flagged) {
    let text = `${name}: probability ${fixed(p)}, between ${fixed(lower)} and ${fixed(upper)}`;
    if (threshold !== undefined) text += `; threshold ${fixed(threshold)}; ${flagged ? "flagged" : "not flagged"}`;
    return text;
  }

  function thresholdOf(row) {
    return overrides.has(row.id) ? overrides.get(row.id) : row.threshold;
  }

  function categoryRow(row) {
    const threshold = thresholdOf(row);
    const flagged = row.score >= threshold;
    const tr = element("tr", flagged ? "flagged" : "");
    tr.dataset.id = row.id;
    tr.dataset.p = String(row.p);
    tr.dataset.lower = String(row.lower);
    tr.dataset.upper = String(row.upper);
    tr.dataset.threshold = String(threshold);
    tr.dataset.flagged = String(flagged);

    const name = element("th");
    name.scope = "row";
    name.append(element("span", "id", row.id), element("span", "name", row.name));

    const value = element("td");
    const bar = element("span", "bar");
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", describe(row.name, row.p, row.lower, row.upper, threshold, flagged));
    drawBar(bar, row.p, row.lower, row.upper, threshold);
    const numbers = element("span", "value", `${fixed(row.p)} [${fixed(row.lower)}, ${fixed(row.upper)}]`);
    if (row.calibrated !== null && row.calibrated !== undefined) numbers.textContent += ` calibrated ${fixed(row.calibrated)}`;
    value.append(bar, numbers);

    const cell = element("td");
    const input = element("input");
    input.type = "number";
    input.min = "0";
    input.max = "1";
    input.step = "0.01";
    input.value = String(threshold);
    input.id = `threshold-${row.id}`;
    input.setAttribute("aria-label", `Threshold for ${row.id} ${row.name}`);
    input.addEventListener("change", () => {
      const t = Number(input.value);
      if (input.value === "" || !(t >= 0 && t <= 1)) {
        setStatus(`A threshold is a probability between 0 and 1; ${row.id} keeps ${fixed(thresholdOf(row))}.`, true);
        input.value = String(thresholdOf(row));
        return;
      }
      overrides.set(row.id, t);
      $("reset-thresholds").disabled = false;
      render(last);
      document.getElementById(`threshold-${row.id}`).focus();
    });
    cell.append(input);
    if (overrides.has(row.id)) cell.append(element("span", "hint", ` (server: ${fixed(row.threshold)})`));

    tr.append(name, value, cell, element("td", "flag", flagged ? "yes" : "no"));
    return tr;
  }

  function render(answer) {
    $("p-unsafe").textContent = `${fixed(answer.p_unsafe)} [${fixed(answer.p_unsafe_lower)}, ${fixed(answer.p_unsafe_upper)}]`;
    const pBar = $("p-unsafe-bar");
    pBar.dataset.p = String(answer.p_unsafe);
    pBar.setAttribute("aria-label", describe("P(unsafe)", answer.p_unsafe, answer.p_unsafe_lower, answer.p_unsafe_upper));
    drawBar(pBar, answer.p_unsafe, answer.p_unsafe_lower, answer.p_unsafe_upper);
    $("verdict").textContent = answer.verdict;
    $("used-method").textContent = answer.method;
    $("nodes").textContent = String(answer.expanded_nodes);
    $("calls").textContent = String(answer.model_calls);
    $("time").textContent = `${(answer.timing.total_ms / 1000).toFixed(2)} s on the server` +
      (answer.complete === false ? " (stopped early: bounds as reached)" : "");
    $("category-rows").replaceChildren(...Object.values(answer.categories).map(categoryRow));
    $("results").hidden = false;
  }

  function request() {
    const user = $("user").value;
    const assistant = $("assistant").value;
    const body = { messages: [{ role: "user", content: user }] };
    if (assistant.trim()) body.messages.push({ role: "assistant", content: assistant });
    if ($("method").value) body.method = $("method").value;
    if ($("eps").value !== "") body.eps = Number($("eps").value);
    return body;
  }

  async function score(event) {
    event.preventDefault();
    if (!$("user").value.trim()) {
      setStatus("Write a user message to score.", true);
      $("user").focus();
      return;
    }
    const headers = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    $("score").disabled = true;
    setStatus("Scoring…");
    try {
      const response = await fetch("/v1/classify", { method: "POST", headers, body: JSON.stringify(request()) });
      const answer = await response.json().catch(() => null);
      if (!response.ok) {
        const message = answer && answer.error ? answer.error.message : `HTTP ${response.status}`;
        const hint = response.status === 401 ? " Enter the server's API key above." : "";
        setStatus(`The server answered ${response.status}: ${message}${hint}`, true);
        return;
      }
      last = answer;
      render(answer);
      setStatus(`Scored: P(unsafe) ${fixed(answer.p_unsafe)}, verdict ${JSON.stringify(answer.verdict)}.`);
    } catch (error) {
      setStatus(`The request failed: ${error.message}`, true);
    } finally {
      $("score").disabled = false;
    }
  }

  async function describeServer() {
    try {
      const response = await fetch("/health");
      if (!response.ok) return;
      const health = await response.json();
      $("server").textContent = `Model ${health.model}, taxonomy ${health.taxonomy}, method ${health.method}; ` +
        "each score is one POST /v1/classify on this server.";
    } catch (error) {
      // the page works without it
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("score-form").addEventListener("submit", score);
    $("reset-thresholds").addEventListener("click", () => {
      overrides.clear();
      $("reset-thresholds").disabled = true;
      if (last) render(last);
    });
    describeServer();
  });
})();
