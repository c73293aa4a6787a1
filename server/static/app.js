// twinserve playground: vanilla JS, no dependencies, same-origin requests only.
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k in node) node[k] = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  };

  const state = {
    model: null,       // model id for requests (from /v1/stats or /v1/models)
    mode: null,        // serving mode (lowrank, backbone, ...)
    experts: [],       // expert names, in the artifact's order
    controllers: [],   // AbortControllers of in-flight requests
    statsBusy: false,
  };

  const ui = {
    form: $("#form"),
    prompt: $("#prompt"),
    promptLabel: $("#prompt-label"),
    endpointHint: $("#endpoint-hint"),
    maxTokens: $("#max-tokens"),
    temperature: $("#temperature"),
    temperatureOut: $("#temperature-out"),
    expert: $("#expert"),
    compareExpert: $("#compare-expert"),
    apiKey: $("#api-key"),
    sliders: $("#sliders"),
    sliderList: $("#slider-list"),
    slidersReset: $("#sliders-reset"),
    send: $("#send"),
    stop: $("#stop"),
    compare: $("#compare"),
    formError: $("#form-error"),
    examples: $("#examples"),
    badge: $("#model-badge"),
    results: $("#results"),
    panelA: $("#panel-a"),
    panelB: $("#panel-b"),
    liveAuto: $("#live-auto"),
    liveStatus: $("#live-status"),
    shareBars: $("#share-bars"),
    shareWindow: $("#share-window"),
  };

  // ------------------------------------------------------------------ helpers

  function authHeaders(extra = {}) {
    const headers = { ...extra };
    const key = ui.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async function errorMessage(res) {
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) return `${res.status}: ${body.error.message}`;
      return `${res.status}: ${JSON.stringify(body)}`;
    } catch {
      return `${res.status} ${res.statusText || "error"}`;
    }
  }

  async function getJSON(url, auth = false) {
    const res = await fetch(url, { headers: auth ? authHeaders() : {}, cache: "no-store" });
    if (!res.ok) throw new Error(await errorMessage(res));
    return res.json();
  }

  const fmt = {
    weight: (w) => (w >= 0.9995 ? "1.000" : w.toFixed(3)),
    ms: (s) => (s == null ? "–" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`),
    num: (x, d = 2) => (x == null ? "–" : Number(x).toFixed(d)),
  };

  function kind() {
    return ui.form.elements.kind.value === "chat" ? "chat" : "completion";
  }

  function showError(msg) {
    ui.formError.textContent = msg || "";
    ui.formError.hidden = !msg;
  }

  // ------------------------------------------------------------------ experts and controls

  async function loadModel() {
    let experts = null;
    try {
      const stats = await getJSON("/v1/stats", true);
      state.model = stats.model;
      state.mode = stats.mode;
      experts = stats.experts;
      renderStats(stats);
    } catch {
      /* fall back to /v1/models below */
    }
    if (!experts) {
      try {
        const models = await getJSON("/v1/models", true);
        const ids = models.data.map((m) => m.id);
        state.model = ids.find((id) => !id.includes(":")) || (ids[0] || "").split(":")[0];
        experts = ids.filter((id) => id.startsWith(`${state.model}:`)).map((id) => id.slice(state.model.length + 1));
      } catch (err) {
        ui.badge.textContent = "offline";
        ui.badge.classList.add("warn");
        showError(`Could not load the model list (${err.message}). Set the API key if the server needs one.`);
        return;
      }
    }
    state.experts = experts;
    ui.badge.textContent = state.mode ? `${state.model} · ${state.mode}` : state.model;
    ui.badge.classList.remove("warn");
    buildExpertControls();
  }

  function buildExpertControls() {
    const { experts } = state;
    // routing picker: auto, pin one, custom weights
    ui.expert.replaceChildren(el("option", { value: "", textContent: "router (auto)" }));
    const group = el("optgroup", { label: "Pin one expert" });
    for (const name of experts) group.append(el("option", { value: `pin:${name}`, textContent: `pin: ${name}` }));
    ui.expert.append(group, el("option", { value: "custom", textContent: "custom weights…" }));

    ui.compareExpert.replaceChildren(...experts.map((name) => el("option", { value: name, textContent: `pinned ${name}` })));
    if (experts.length > 1) ui.compareExpert.value = experts[experts.length > 4 ? 4 : 1];

    ui.sliderList.replaceChildren(...experts.map((name, i) => {
      const id = `w-${i}`;
      const out = el("output", { id: `${id}-out`, htmlFor: id, textContent: "0.00" });
      const input = el("input", { type: "range", id, min: "0", max: "1", step: "0.05", value: "0",
                                  dataset: { expert: name } });
      input.addEventListener("input", () => { out.textContent = Number(input.value).toFixed(2); });
      return el("div", { class: "slider" }, el("label", { htmlFor: id, textContent: name }), input, out);
    }));

    ui.examples.replaceChildren(el("span", { class: "muted", textContent: "Try:" }),
      ...experts.slice(0, 6).map((name) => {
        const b = el("button", { type: "button", class: "chip", textContent: `${name} hello=` });
        b.addEventListener("click", () => { ui.prompt.value = b.textContent; ui.prompt.focus(); });
        return b;
      }));

    const panels = [ui.panelA, ui.panelB];
    for (const p of panels) renderBars(p, null);
  }

  function routingChoice() {
    const v = ui.expert.value;
    if (v.startsWith("pin:")) return { type: "pin", expert: v.slice(4) };
    if (v === "custom") {
      const experts = {};
      for (const input of ui.sliderList.querySelectorAll("input[type=range]")) experts[input.dataset.expert] = Number(input.value);
      return { type: "weights", experts };
    }
    return { type: "auto" };
  }

  function routingTag(choice) {
    if (choice.type === "pin") return `pinned: ${choice.expert}`;
    if (choice.type === "weights") return "custom weights";
    return "routed";
  }

  function buildBody(choice, stream = true) {
    const prompt = ui.prompt.value;
    const maxTokens = Math.max(1, Math.min(4096, parseInt(ui.maxTokens.value, 10) || 16));
    const body = {
      model: state.model,
      max_tokens: maxTokens,
      temperature: Number(ui.temperature.value),
      stream,
      stream_options: { include_usage: true },
    };
    if (kind() === "chat") body.messages = [{ role: "user", content: prompt }];
    else body.prompt = prompt;
    if (choice.type === "pin") body.twin = { expert: choice.expert };
    else if (choice.type === "weights") body.twin = { experts: choice.experts };
    return body;
  }

  // ------------------------------------------------------------------ streaming

  // POST and parse the SSE stream; calls onChunk(obj) per data event. Resolves when [DONE] arrives.
  async function streamSSE(url, body, signal, onChunk) {
    const res = await fetch(url, {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(body),
      signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    if (!res.body) throw new Error("this browser cannot stream responses");
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message || "stream error");
        onChunk(obj);
      }
    }
  }

  function panelParts(panel) {
    const q = (role) => panel.querySelector(`[data-role="${role}"]`);
    return {
      tag: q("tag"), status: q("status"), output: q("output"), bars: q("bars"), top: q("top"),
      entropy: q("entropy"), fallback: q("fallback"), routerMs: q("router-ms"), source: q("source"), tokens: q("tokens"),
    };
  }

  function setStatus(panel, text, cls) {
    const p = panelParts(panel);
    p.status.textContent = text;
    p.status.className = `small ${cls || "muted"}`;
  }

  function renderBars(panel, routing) {
    const p = panelParts(panel);
    const weights = (routing && routing.weights) || {};
    const names = state.experts.length ? state.experts : Object.keys(weights);
    const top = routing && !routing.fallback ? routing.top_expert : null;
    p.bars.replaceChildren(...names.map((name) => {
      const w = Number(weights[name] || 0);
      const fill = el("span", { class: "fill" });
      fill.style.width = `${Math.max(0, Math.min(1, w)) * 100}%`;
      const li = el("li", { class: name === top ? "top" : "", dataset: { expert: name, weight: String(w) } },
        el("span", { class: "name", textContent: name }),
        el("span", { class: "track", "aria-hidden": "true" }, fill),
        el("span", { class: "value", textContent: routing ? fmt.weight(w) : "–" }));
      return li;
    }));
    panel.dataset.routed = routing ? "1" : "";
  }

  function renderRouting(panel, routing) {
    const p = panelParts(panel);
    const top = routing.top_expert || "none";
    p.top.textContent = routing.fallback && routing.top_expert ? `(${top})` : top;
    p.top.title = routing.fallback && routing.top_expert ? `router's best guess ${top}, not used (fallback)` : top;
    p.entropy.textContent = fmt.num(routing.entropy, 3);
    const mass = Object.values(routing.weights || {}).reduce((a, b) => a + Number(b), 0);
    p.fallback.textContent = !routing.fallback ? "no"
      : routing.source === "uniform" ? "yes · uniform"
      : mass === 0 ? "yes · backbone" : "yes";
    p.fallback.title = !routing.fallback ? ""
      : routing.source === "uniform" ? "the artifact has no router: uniform expert weights"
      : mass === 0 ? "router not confident: the backbone answered alone" : "router fallback";
    p.fallback.className = routing.fallback ? "warn-text" : "";
    p.routerMs.textContent = routing.router_ms != null ? `${fmt.num(routing.router_ms, 1)} ms` : "–";
    p.source.textContent = routing.source || "–";
    renderBars(panel, routing);
  }

  function resetPanel(panel, tag) {
    const p = panelParts(panel);
    p.tag.textContent = tag;
    p.output.replaceChildren();
    for (const k of ["top", "entropy", "fallback", "routerMs", "source", "tokens"]) { p[k].textContent = "–"; p[k].className = ""; }
    renderBars(panel, null);
    panel.dataset.state = "running";
    panel.setAttribute("aria-busy", "true");
    setStatus(panel, "waiting…");
  }

  async function runInto(panel, choice) {
    const url = kind() === "chat" ? "/v1/chat/completions" : "/v1/completions";
    const body = buildBody(choice);
    const controller = new AbortController();
    state.controllers.push(controller);
    resetPanel(panel, routingTag(choice));
    const p = panelParts(panel);
    const t0 = performance.now();
    let ttft = null;
    let finish = null;
    let usage = null;
    let text = "";
    try {
      await streamSSE(url, body, controller.signal, (chunk) => {
        if (chunk.twin && chunk.twin.routing) renderRouting(panel, chunk.twin.routing);
        if (chunk.usage) usage = chunk.usage;
        const choice0 = chunk.choices && chunk.choices[0];
        if (!choice0) return;
        const piece = choice0.text != null ? choice0.text : (choice0.delta && choice0.delta.content) || "";
        if (piece) {
          if (ttft == null) ttft = performance.now() - t0;
          text += piece;
          p.output.textContent = text;
          setStatus(panel, "streaming…", "accent-text");
        }
        if (choice0.finish_reason) finish = choice0.finish_reason;
      });
      const total = performance.now() - t0;
      const bits = ["done"];
      if (usage) p.tokens.textContent = `${usage.prompt_tokens} → ${usage.completion_tokens}`;
      if (ttft != null) bits.push(`TTFT ${Math.round(ttft)} ms`);
      bits.push(`${Math.round(total)} ms`);
      if (finish) bits.push(finish);
      setStatus(panel, bits.join(" · "), "ok-text");
      if (!text) p.output.replaceChildren(el("span", { class: "placeholder", textContent: "(empty completion)" }));
      panel.dataset.state = "done";
    } catch (err) {
      const aborted = err && err.name === "AbortError";
      setStatus(panel, aborted ? "stopped" : `error: ${err.message}`, aborted ? "muted" : "error-text");
      if (!aborted) showError(err.message);
      panel.dataset.state = aborted ? "stopped" : "error";
    } finally {
      panel.setAttribute("aria-busy", "false");
      state.controllers = state.controllers.filter((c) => c !== controller);
    }
  }

  function validate() {
    if (!state.model) { showError("The model list has not loaded yet."); return false; }
    if (!ui.prompt.value.trim()) { showError("Type a prompt first."); ui.prompt.focus(); return false; }
    return true;
  }

  async function withBusy(fn) {
    showError("");
    if (!validate()) return;
    ui.send.disabled = ui.compare.disabled = true;
    ui.stop.disabled = false;
    try {
      await fn();
    } finally {
      ui.send.disabled = ui.compare.disabled = false;
      ui.stop.disabled = true;
      refreshStats();
    }
  }

  function send() {
    return withBusy(async () => {
      ui.panelB.hidden = true;
      ui.results.classList.remove("compare");
      $("#panel-a-title").textContent = "Output";
      await runInto(ui.panelA, routingChoice());
    });
  }

  function compare() {
    return withBusy(async () => {
      const pinned = ui.compareExpert.value || state.experts[0];
      ui.panelB.hidden = false;
      ui.results.classList.add("compare");
      $("#panel-a-title").textContent = "Routed";
      $("#panel-b-title").textContent = `Pinned · ${pinned}`;
      // both requests at once: the engine batches them, each row with its own expert weights
      await Promise.all([runInto(ui.panelA, { type: "auto" }), runInto(ui.panelB, { type: "pin", expert: pinned })]);
    });
  }

  function stop() {
    for (const c of state.controllers) c.abort();
  }

  // ------------------------------------------------------------------ live stats

  function renderStats(s) {
    const set = (id, v) => { $(id).textContent = v; };
    set("#kpi-rps", fmt.num(s.requests_per_s, 2));
    set("#kpi-ttft50", fmt.ms(s.ttft_p50_s));
    set("#kpi-ttft99", fmt.ms(s.ttft_p99_s));
    set("#kpi-batch", s.running_batch_size ?? "–");
    set("#kpi-queue", s.queue_depth ?? "–");
    set("#kpi-e2e50", fmt.ms(s.e2e_p50_s));
    ui.shareWindow.textContent = s.routing_window_s ? `(last ${Math.round(s.routing_window_s)} s)` : "";
    const share = s.routing_share || {};
    const names = Object.keys(share).sort((a, b) => share[b] - share[a]);
    if (!names.length) {
      ui.shareBars.replaceChildren(el("li", { class: "muted small empty", textContent: "no requests yet" }));
    } else {
      ui.shareBars.replaceChildren(...names.map((name) => {
        const fill = el("span", { class: "fill" });
        fill.style.width = `${Math.max(0, Math.min(1, share[name])) * 100}%`;
        return el("li", { class: name === "(fallback)" ? "fallback" : "", dataset: { expert: name, share: String(share[name]) } },
          el("span", { class: "name", textContent: name }),
          el("span", { class: "track", "aria-hidden": "true" }, fill),
          el("span", { class: "value", textContent: `${Math.round(share[name] * 100)}%` }));
      }));
    }
    ui.liveStatus.textContent = `updated ${new Date().toLocaleTimeString()} · window ${Math.round(s.window_s || 60)} s`;
  }

  async function refreshStats() {
    if (state.statsBusy) return;
    state.statsBusy = true;
    try {
      const s = await getJSON("/v1/stats", true);
      if (!state.experts.length && s.experts) {
        state.model = s.model; state.mode = s.mode; state.experts = s.experts;
        ui.badge.textContent = `${s.model} · ${s.mode}`;
        ui.badge.classList.remove("warn");
        buildExpertControls();
        showError("");
      }
      renderStats(s);
    } catch (err) {
      ui.liveStatus.textContent = `stats unavailable: ${err.message}`;
    } finally {
      state.statsBusy = false;
    }
  }

  // ------------------------------------------------------------------ wiring

  function syncKind() {
    const chat = kind() === "chat";
    ui.promptLabel.textContent = chat ? "User message" : "Prompt";
    ui.endpointHint.textContent = chat ? "POST /v1/chat/completions" : "POST /v1/completions";
  }

  ui.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.compare.addEventListener("click", () => compare());
  ui.stop.addEventListener("click", stop);
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      if (ui.send.disabled) return;
      if (e.shiftKey) compare(); else send();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controllers.length) stop(); });
  for (const r of ui.form.elements.kind) r.addEventListener("change", syncKind);
  ui.temperature.addEventListener("input", () => { ui.temperatureOut.textContent = Number(ui.temperature.value).toFixed(2); });
  ui.expert.addEventListener("change", () => { ui.sliders.hidden = ui.expert.value !== "custom"; });
  ui.slidersReset.addEventListener("click", () => {
    for (const input of ui.sliderList.querySelectorAll("input[type=range]")) {
      input.value = "0";
      input.dispatchEvent(new Event("input"));
    }
  });
  ui.apiKey.value = sessionStorage.getItem("twinserve.apiKey") || "";
  ui.apiKey.addEventListener("change", () => {
    sessionStorage.setItem("twinserve.apiKey", ui.apiKey.value.trim());
    if (!state.experts.length) loadModel();
  });

  setInterval(() => {
    if (ui.liveAuto.checked && !document.hidden) refreshStats();
  }, 3000);
  ui.liveAuto.addEventListener("change", () => { if (ui.liveAuto.checked) refreshStats(); });

  syncKind();
  ui.temperatureOut.textContent = Number(ui.temperature.value).toFixed(2);
  loadModel();
})();
