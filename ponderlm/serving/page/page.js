// The page at GET /: a prompt completed by this server, each token shaded by its ponder depth.
// Plain JS, no dependencies. Requests go to this origin only (the Content-Security-Policy says so);
// the API key travels as the browser's Basic credentials, which it sends with same-origin fetches.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  // location.origin never holds the user:password of a URL typed with them (fetch refuses those)
  const url = (path) => new URL(path, location.origin).href;

  let info = null; // /page/info: model, method, max_depth, tau, flops_per_depth
  let running = null; // the AbortController of the request in flight
  const sum = { tokens: 0, depth: 0, flops: 0 };

  // depth d of 0..K: a blue from pale (no extra pass) to dark (K passes), text colour for contrast
  function colours(d) {
    const K = Math.max(info.max_depth, 1);
    const t = Math.min(d, K) / K;
    const light = 95 - 62 * t;
    return { bg: `hsl(${215 + 15 * t}, 75%, ${light}%)`, fg: light > 58 ? "#111" : "#fff" };
  }

  function flopsText(x) {
    if (x === null || x === undefined || !Number.isFinite(x)) return "–";
    const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [size, unit] of units) {
      if (x >= size) return `${(x / size).toPrecision(4)} ${unit}FLOPs`;
    }
    return `${x.toPrecision(4)} FLOPs`;
  }

  function status(text, error = false) {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  }

  function shade(el, d) {
    const c = colours(d);
    el.className = "tok";
    el.dataset.depth = String(d);
    el.style.backgroundColor = c.bg;
    el.style.color = c.fg;
  }

  async function errorText(r) {
    try {
      const body = await r.json();
      return body.error && body.error.message ? body.error.message : `HTTP ${r.status}`;
    } catch {
      return `HTTP ${r.status}`;
    }
  }

  async function loadInfo() {
    const r = await fetch(url("/page/info"), { cache: "no-store" });
    if (!r.ok) throw new Error(await errorText(r));
    info = await r.json();
    $("model").textContent = `${info.model}: ${info.method}, up to K = ${info.max_depth} extra passes per token, tau ${info.tau}`;
    const legend = $("legend");
    legend.replaceChildren();
    for (let d = 0; d <= info.max_depth; d++) {
      const li = document.createElement("li");
      const swatch = document.createElement("span");
      shade(swatch, d);
      swatch.textContent = String(d);
      const flops = info.flops_per_depth ? info.flops_per_depth[d] : null;
      li.append(swatch, ` ${flopsText(flops)}`);
      li.dataset.flops = flops === null ? "" : String(flops);
      legend.append(li);
    }
  }

  function showStats() {
    $("n-tokens").textContent = String(sum.tokens);
    const mean = sum.tokens ? sum.depth / sum.tokens : null;
    $("mean-depth").textContent = mean === null ? "–" : mean.toFixed(2);
    $("mean-depth").dataset.value = mean === null ? "" : String(mean);
    const perToken = sum.tokens && info.flops_per_depth ? sum.flops / sum.tokens : null;
    $("flops-depth").textContent = flopsText(perToken);
    $("flops-depth").dataset.value = perToken === null ? "" : String(perToken);
  }

  // one streamed choice: its text split into its tokens (logprobs.tokens names each one), one element each
  function addChunk(choice) {
    const depths = choice.ponder_depths || [];
    const text = choice.text || "";
    const out = $("out");
    if (!depths.length) {
      if (text) out.append(text);
      return;
    }
    const names = ((choice.logprobs && choice.logprobs.tokens) || []).slice(0, depths.length);
    // tokens that are parts of one character are named U+FFFD: then the last one holds the text
    const pieces = names.join("") === text ? names : depths.map((_, i) => (i === depths.length - 1 ? text : ""));
    depths.forEach((d, i) => {
      const span = document.createElement("span");
      shade(span, d);
      span.title = `depth ${d}`;
      span.textContent = pieces[i];
      out.append(span);
      sum.tokens += 1;
      sum.depth += d;
      if (info.flops_per_depth) sum.flops += info.flops_per_depth[d];
    });
    showStats();
  }

  function showUsage(usage) {
    const per = usage.completion_tokens ? usage.completion_flops / usage.completion_tokens : null;
    $("flops-server").textContent = flopsText(per);
    $("flops-server").dataset.value = per === null ? "" : String(per);
  }

  // server-sent events: "data: {json}" blocks separated by a blank line, "data: [DONE]" last
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          onData(JSON.parse(data));
        }
      }
      if (done) return;
    }
  }

  async function generate(event) {
    event.preventDefault();
    if (!info || running) return;
    $("out").replaceChildren();
    Object.assign(sum, { tokens: 0, depth: 0, flops: 0 });
    showStats();
    $("flops-server").textContent = "–";
    $("flops-server").dataset.value = "";
    const body = {
      model: info.model,
      prompt: $("prompt").value,
      max_tokens: Number($("max-tokens").value),
      temperature: Number($("temperature").value),
      stream: true,
      stream_options: { include_usage: true },
      logprobs: 0, // each chunk names its tokens: the text splits into them exactly
    };
    running = new AbortController();
    $("generate").disabled = true;
    $("stop").disabled = false;
    status("Generating…");
    try {
      const r = await fetch(url("/v1/completions"), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: running.signal,
      });
      if (!r.ok) throw new Error(await errorText(r));
      let failed = null;
      await readEvents(r, (obj) => {
        if (obj.error) failed = obj.error.message;
        if (obj.usage) showUsage(obj.usage);
        if (obj.choices && obj.choices.length) addChunk(obj.choices[0]);
      });
      if (failed) throw new Error(failed);
      status(`Done: ${sum.tokens} tokens.`);
      $("out").dataset.done = "1";
    } catch (e) {
      status(e.name === "AbortError" ? "Stopped." : `Error: ${e.message}`, e.name !== "AbortError");
    } finally {
      running = null;
      $("generate").disabled = false;
      $("stop").disabled = true;
    }
  }

  $("ask").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => running && running.abort());
  loadInfo().then(
    () => {
      $("generate").disabled = false;
    },
    (e) => status(`Cannot reach the server: ${e.message}`, true),
  );
})();
