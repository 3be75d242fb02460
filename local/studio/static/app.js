// Kennel studio: one page over the local state folder. Plain JS, no build step, nothing fetched
// from elsewhere. Every piece of data reaches the DOM as text (el() / textContent), never as HTML.
"use strict";

const LIVE = new Set(["Executing", "Starting", "Stopping"]);
const POLL_MS = 2000;
let generation = 0; // bumped on every navigation: pending polls of an older view stop
let wholeLog = null; // { key: "execution/step", size, text, truncated } once the user opened that whole log

// --- DOM helpers ---------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function badge(status) {
  const text = status || "NotStarted";
  return el("span", { className: `badge s-${text.replace(/[^A-Za-z]/g, "")}`, "data-status": text }, text);
}

function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function kv(pairs) {
  return el("dl", { className: "kv" },
    pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function when(iso) {
  if (!iso) return "-";
  const date = new Date(iso);
  return isNaN(date) ? String(iso) : date.toLocaleString();
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 90) return `${value.toFixed(1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

function number(value) {
  if (typeof value !== "number") return value === null || value === undefined ? "-" : String(value);
  return Number.isInteger(value) ? String(value) : value.toPrecision(4);
}

function jsonBlock(value) {
  return el("pre", { className: "json" }, JSON.stringify(value, null, 2));
}

function notice(message, isError) {
  const box = document.getElementById("notice");
  box.textContent = message;
  box.className = isError ? "error" : "";
  box.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { box.hidden = true; }, isError ? 15000 : 8000);
}

// --- API -------------------------------------------------------------------------------------------

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Kennel-Studio": "1" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ Error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(data.Error || `${response.status} ${response.statusText}`);
  return data;
}

// --- router ----------------------------------------------------------------------------------------

const view = () => document.getElementById("view");

async function route() {
  const mine = ++generation;
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const page = parts[0] || "executions";
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("active", link.dataset.nav === page);
  }
  try {
    if (page === "pipeline") await showPipeline(parts[1], mine);
    else if (page === "executions" && parts[1]) await showExecution(parts[1], parts[2], mine);
    else if (page === "models") await showModels(mine);
    else if (page === "endpoints") await showEndpoints(mine);
    else await showExecutions(mine);
  } catch (error) {
    if (mine === generation) view().replaceChildren(el("p", { className: "failure" }, error.message));
  }
}

function render(mine, ...children) {
  if (mine !== generation) return false;
  view().replaceChildren(...children.flat(2).filter(Boolean));
  return true;
}

// --- the DAG -----------------------------------------------------------------------------------------

const NODE_W = 150, NODE_H = 46, GAP_X = 56, GAP_Y = 26, PAD = 16;

function drawDag(graph, statuses, selected, onPick) {
  if (graph.Error) return el("p", { className: "failure" }, `cannot draw the DAG: ${graph.Error}`);
  const byLayer = new Map();
  for (const node of graph.Nodes) {
    if (!byLayer.has(node.Layer)) byLayer.set(node.Layer, []);
    byLayer.get(node.Layer).push(node);
  }
  const rows = Math.max(1, ...[...byLayer.values()].map((nodes) => nodes.length));
  const layers = Math.max(1, byLayer.size);
  const width = PAD * 2 + layers * NODE_W + (layers - 1) * GAP_X;
  const height = PAD * 2 + rows * NODE_H + (rows - 1) * GAP_Y + 14;
  const place = new Map();
  for (const [layer, nodes] of byLayer) {
    const top = PAD + ((rows - nodes.length) * (NODE_H + GAP_Y)) / 2;
    nodes.forEach((node, i) => place.set(node.Name, {
      x: PAD + layer * (NODE_W + GAP_X), y: top + i * (NODE_H + GAP_Y),
    }));
  }
  // Its natural size in pixels, shrunk to fit (app.css): a DAG of one or two steps is not blown up.
  const picture = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": "pipeline DAG" },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
      markerHeight: 7, orient: "auto-start-reverse" }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#9aa4af" }))));
  for (const edge of graph.Edges) {
    if (edge.Implied) continue; // a branch edge the step's in-branch predecessor already shows
    const a = place.get(edge.From), b = place.get(edge.To);
    if (!a || !b) continue;
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
    const bend = Math.max(30, (x2 - x1) / 2);
    picture.append(svg("path", {
      class: `edge ${edge.Kind}`, "marker-end": "url(#arrow)", "data-from": edge.From, "data-to": edge.To,
      d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`,
    }, svg("title", {}, `${edge.From} → ${edge.To} (${edge.Kind})`)));
    if (edge.Kind === "if" || edge.Kind === "else") {
      picture.append(svg("text", { class: "edge-label", x: x2 - 40, y: y2 - 6 }, edge.Kind === "if" ? "if true" : "else"));
    }
  }
  for (const node of graph.Nodes) {
    const at = place.get(node.Name);
    const status = statuses ? (statuses[node.Name] || "NotStarted") : null;
    const classes = ["node", status ? `st-${status}` : "", node.Name === selected ? "selected" : ""].join(" ");
    const group = svg("g", {
      class: classes, "data-step": node.Name, "data-status": status || "", tabindex: 0,
      transform: `translate(${at.x} ${at.y})`,
      onclick: () => onPick && onPick(node.Name),
      onkeydown: (event) => { if (event.key === "Enter" && onPick) onPick(node.Name); },
    },
    svg("title", {}, `${node.Name} (${node.Type})${status ? `: ${status}` : ""}`),
    svg("rect", { width: NODE_W, height: NODE_H, rx: 6 }),
    svg("text", { x: 10, y: 19 }, node.Name),
    svg("text", { class: "type", x: 10, y: 35 }, status ? `${node.Type} · ${status}` : node.Type));
    picture.append(group);
  }
  return el("div", { className: "dag card" }, picture,
    el("div", { className: "legend muted" },
      el("span", {}, "— data (Get / JsonGet)"), el("span", {}, "- - DependsOn"),
      el("span", {}, "green: if true branch"), el("span", {}, "red: else branch")));
}

// --- pipeline ----------------------------------------------------------------------------------------

async function showPipeline(name, mine) {
  const overview = await api("/api/overview");
  const names = overview.Pipelines.map((p) => p.Name);
  if (!names.length) {
    render(mine, el("h1", {}, "Pipeline"), el("p", {}, "No pipeline stored yet: run `kennel upsert` or `kennel run`."));
    return;
  }
  const chosen = names.includes(name) ? name : names[0];
  const pipeline = await api(`/api/pipelines/${encodeURIComponent(chosen)}`);
  const picker = names.length > 1 ? el("p", {}, "Pipelines: ",
    names.map((n) => el("a", { href: `#/pipeline/${encodeURIComponent(n)}` }, n, " "))) : null;
  render(mine,
    el("h1", {}, `Pipeline ${pipeline.Name}`), picker,
    drawDag(pipeline, null, null, null),
    el("h2", {}, "Parameters"),
    table(["Name", "Type", "Default"], pipeline.Parameters.map((p) =>
      el("tr", { "data-parameter": p.Name }, el("td", {}, p.Name), el("td", {}, p.Type), el("td", {}, number(p.DefaultValue)))),
    { id: "parameters" }));
}

// --- executions -------------------------------------------------------------------------------------

async function showExecutions(mine) {
  const executions = await api("/api/executions");
  const rows = executions.map((e) => el("tr", {
    className: "clickable", "data-execution": e.ExecutionId,
    onclick: () => { location.hash = `#/executions/${encodeURIComponent(e.ExecutionId)}`; },
  },
  el("td", {}, el("a", { href: `#/executions/${encodeURIComponent(e.ExecutionId)}` }, e.ExecutionId)),
  el("td", {}, e.PipelineName), el("td", {}, badge(e.Status)), el("td", {}, when(e.StartTime)),
  el("td", {}, seconds(e.DurationSeconds)),
  el("td", { className: "muted" }, Object.entries(e.Parameters || {}).map(([k, v]) => `${k}=${v}`).join("  "))));
  const shown = render(mine, el("h1", {}, "Executions"),
    executions.length ? table(["Execution", "Pipeline", "Status", "Started", "Duration", "Parameters"], rows, { id: "executions" })
      : el("p", {}, "No executions yet: start one with `kennel run`."));
  if (shown && executions.some((e) => LIVE.has(e.Status))) {
    setTimeout(() => { if (mine === generation) showExecutions(mine).catch(() => {}); }, POLL_MS * 2);
  }
}

async function showExecution(id, step, mine, shownSignature) {
  const execution = await api(`/api/executions/${encodeURIComponent(id)}`);
  const statuses = Object.fromEntries(Object.entries(execution.Steps).map(([n, s]) => [n, s.Status]));
  const signature = JSON.stringify([execution.Status, statuses]);
  const poll = () => setTimeout(() => {
    if (mine !== generation) return;
    showExecution(id, step, mine, signature).catch((error) => notice(error.message, true));
  }, POLL_MS);
  if (signature === shownSignature) {
    // Nothing changed status: keep the page as it is (open sections, scroll), refresh a live step's log.
    const detail = document.getElementById("step-detail");
    if (step && detail && LIVE.has(statuses[step])) await showStep(id, step, detail, mine);
    if (LIVE.has(execution.Status)) poll();
    return;
  }
  for (const skipped of execution.SkippedSteps || []) statuses[skipped] = statuses[skipped] || "NotStarted";
  const pick = (name) => { location.hash = `#/executions/${encodeURIComponent(id)}/${encodeURIComponent(name)}`; };
  const stepRows = execution.Nodes.map((node) => {
    const record = execution.Steps[node.Name];
    const skipped = (execution.SkippedSteps || []).includes(node.Name);
    return el("tr", { className: "clickable", "data-step": node.Name, onclick: () => pick(node.Name) },
      el("td", {}, node.Name), el("td", {}, node.Type),
      el("td", {}, record ? badge(record.Status) : badge("NotStarted"), skipped ? el("span", { className: "muted" }, " branch not taken") : null,
        record && record.CacheHit ? el("span", { className: "muted" }, " (cached)") : null),
      el("td", {}, record ? when(record.StartTime) : "-"),
      el("td", {}, record ? seconds(record.DurationSeconds) : "-"));
  });
  const detail = el("div", { id: "step-detail", className: "grow" });
  const shown = render(mine,
    el("h1", {}, "Execution ", el("span", { id: "execution-id" }, execution.ExecutionId), " ", badge(execution.Status)),
    kv([["Pipeline", el("a", { href: `#/pipeline/${encodeURIComponent(execution.PipelineName)}` }, execution.PipelineName)],
      ["Started", when(execution.StartTime)], ["Ended", when(execution.EndTime)],
      ["Duration", seconds(execution.DurationSeconds)],
      ["Parameters", Object.entries(execution.Parameters || {}).map(([k, v]) => `${k}=${v}`).join("  ")]]),
    execution.FailureReason ? el("p", { className: "failure", id: "execution-failure" }, execution.FailureReason) : null,
    drawDag(execution, statuses, step, pick),
    el("div", { className: "row" },
      el("div", { className: "grow" }, el("h2", {}, "Steps"),
        table(["Step", "Type", "Status", "Started", "Duration"], stepRows, { id: "steps" })),
      detail));
  if (!shown) return;
  if (step) await showStep(id, step, detail, mine);
  if (LIVE.has(execution.Status)) poll();
}

// --- one step ----------------------------------------------------------------------------------------

async function showStep(id, name, container, mine) {
  let step;
  try {
    step = await api(`/api/executions/${encodeURIComponent(id)}/steps/${encodeURIComponent(name)}`);
  } catch (error) {
    container.replaceChildren(el("h2", {}, name), el("p", { className: "muted" }, error.message));
    return;
  }
  if (mine !== generation) return;
  const sections = [
    el("h2", {}, `Step ${step.Name} `, badge(step.Status)),
    kv([["Type", step.Type], ["Started", when(step.StartTime)], ["Ended", when(step.EndTime)],
      ["Duration", seconds(step.DurationSeconds)], ["Attempts", step.AttemptCount], ["Job", step.JobName],
      ["Cache", step.CacheHit ? `reused from ${step.CacheHit.SourcePipelineExecutionArn || "an earlier run"}` : null]]),
    step.FailureReason ? el("p", { className: "failure", id: "step-failure" }, step.FailureReason) : null,
    conditionsSection(step), metricsSection(step), trialsSection(step), evaluationSection(step),
    rulesSection("Debugger rules", "debug-rules", step.DebugRules),
    rulesSection("Profiler rules", "profiler-rules", step.ProfilerRules),
    step.ProfilerReportUrl ? el("p", {}, el("a", { href: step.ProfilerReportUrl, target: "_blank", rel: "noopener", id: "profiler-report" }, "Profiler report")) : null,
    plotsSection(step), logSection(step, `${id}/${name}`),
    el("details", {}, el("summary", {}, step.ArgumentsResolved ? "Arguments (resolved)" : "Arguments (as defined)"), jsonBlock(step.Arguments)),
    el("details", {}, el("summary", {}, "Properties"), jsonBlock(step.Properties)),
  ];
  container.replaceChildren(...sections.flat(2).filter(Boolean));
}

function conditionsSection(step) {
  if (!Array.isArray(step.Conditions) || !step.Conditions.length) return null;
  return [el("h3", {}, "Conditions"), table(["Condition", "Left", "Right", "Outcome"], step.Conditions.map((c) =>
    el("tr", {}, el("td", {}, c.Type), el("td", {}, number(c.LeftValue)), el("td", {}, number(c.RightValue)),
      el("td", {}, String(c.Outcome)))), { id: "conditions" })];
}

function metricsSection(step) {
  if (!step.Metrics || !step.Metrics.length) return null;
  return [el("h3", {}, "Metrics"), table(["Metric", "Value"], step.Metrics.map((m) =>
    el("tr", {}, el("td", {}, m.Name), el("td", {}, number(m.Value)))), { id: "metrics" })];
}

function trialsSection(step) {
  if (!step.Trials) return null;
  const names = [...new Set(step.Trials.flatMap((t) => Object.keys(t.HyperParameters)))].sort();
  const objective = (step.Trials.find((t) => t.ObjectiveName) || {}).ObjectiveName || "objective";
  const rows = step.Trials.map((t) => el("tr", { className: t.Best ? "best" : "", "data-trial": t.TrainingJobName },
    el("td", {}, t.Best ? "★ best " : "", t.TrainingJobName), el("td", {}, badge(t.Status)),
    names.map((n) => el("td", {}, number(Number(t.HyperParameters[n]) || t.HyperParameters[n]))),
    el("td", {}, number(t.Objective)), el("td", { className: "muted" }, t.FailureReason || (t.EarlyStopped ? "early-stopped" : ""))));
  return [el("h3", {}, `Trials (${step.Trials.length})`),
    table(["Trial", "Status", ...names, objective, ""], rows, { id: "trials" })];
}

function evaluationSection(step) {
  const report = step.Evaluation;
  if (!report || !report.ConfusionMatrix) return null;
  const { Labels: labels, Counts: counts } = report.ConfusionMatrix;
  const peak = Math.max(1, ...counts.flat());
  const rows = counts.map((row, i) => el("tr", {}, el("th", {}, labels[i]), row.map((count, j) => {
    const cell = el("td", { title: `actual ${labels[i]}, predicted ${labels[j]}: ${count}` }, String(count));
    const hue = i === j ? "31, 143, 78" : "198, 40, 40";
    cell.style.backgroundColor = `rgba(${hue}, ${count ? 0.12 + 0.78 * (count / peak) : 0})`;
    if (count / peak > 0.55) cell.style.color = "#fff";
    return cell;
  })));
  return [el("h3", {}, "Confusion matrix (rows: actual, columns: predicted)"),
    el("div", { className: "heat-wrap" }, el("table", { className: "heat", id: "confusion-matrix" },
      el("thead", {}, el("tr", {}, el("th", {}, ""), labels.map((l) => el("th", { className: "rot" }, l)))),
      el("tbody", {}, rows)))];
}

function rulesSection(title, id, rules) {
  if (!rules || !rules.length) return null;
  return [el("h3", {}, title), table(["Rule", "Status", "Details"], rules.map((r) =>
    el("tr", { "data-rule": r.RuleConfigurationName }, el("td", {}, r.RuleConfigurationName), el("td", {}, badge(r.RuleEvaluationStatus)),
      el("td", {}, r.StatusDetails || ""))), { id })];
}

function plotsSection(step) {
  if (!step.Plots || !step.Plots.length) return null;
  return [el("h3", {}, "Plots"), el("div", { className: "plots" },
    step.Plots.map((p) => el("figure", {}, el("img", { src: p.Url, alt: p.Name, loading: "lazy" }), el("figcaption", { className: "muted" }, p.Name))))];
}

function logSection(step, key) {
  if (!step.Log) return el("p", { className: "muted" }, "No log for this step.");
  const pre = el("pre", { id: "log" }, step.Log.Text);
  const showWhole = (log) => {
    pre.textContent = log.text;
    pre.id = "whole-log";
    whole.replaceWith(el("span", { className: "muted" }, log.truncated ? "the last 16 MB of the log" : "the whole log"));
  };
  // Once opened, the whole log stays open while the page refreshes a live step; it is fetched
  // again only when the log has grown.
  const loadWhole = async () => {
    whole.disabled = true;
    try {
      if (!wholeLog || wholeLog.key !== key || wholeLog.size !== step.Log.Size) {
        const log = await api(`${step.LogUrl}?whole=1`);
        wholeLog = { key, size: log.Size, text: log.Text, truncated: log.Truncated };
      }
      showWhole(wholeLog);
    } catch (error) { notice(error.message, true); whole.disabled = false; }
  };
  const whole = el("button", { type: "button", id: "whole-log-button", onclick: loadWhole }, "Whole log");
  const more = step.Log.Truncated ? whole : el("span", { className: "muted" }, "(the whole log)");
  const heading = el("h3", {}, "Log ", more);
  if (step.Log.Truncated && wholeLog && wholeLog.key === key) loadWhole();
  return [heading, pre];
}

// --- models ------------------------------------------------------------------------------------------

async function showModels(mine) {
  const [groups, overview] = await Promise.all([api("/api/registry"), api("/api/overview")]);
  if (!groups.length) {
    render(mine, el("h1", {}, "Model registry"), el("p", {}, "No model package registered yet: a successful run registers one."));
    return;
  }
  // Approve / Reject only in the group whose packages the endpoint serves (as `kennel approve`).
  const decided = overview.ModelPackageGroup;
  const note = (name) => el("p", { className: "muted not-decided" },
    `Decisions are made in group ${decided} (served by endpoint ${overview.EndpointName}); use the registry's own tools for ${name}.`);
  render(mine, el("h1", {}, "Model registry"), groups.map((group) => el("section", { className: "card", "data-group": group.Name },
    el("h2", {}, `Group ${group.Name}`),
    group.Name === decided ? null : note(group.Name),
    table(["Version", "Status", "Registered", "Metrics", "Execution", "History", group.Name === decided ? "Decide" : ""],
      group.Packages.map((p) => packageRow(group.Name, p, group.Name === decided)), { className: "packages" }))));
}

function packageRow(group, p, decidable) {
  const reason = el("input", { type: "text", placeholder: "reason (recorded with the decision)", "aria-label": "reason", className: "reason" });
  const decide = (verb) => async (event) => {
    const buttons = event.target.parentElement.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    notice(verb === "approve" ? `Approving version ${p.Version}: the endpoint starts (this can take a minute)…` : `Rejecting version ${p.Version}…`);
    try {
      const result = await api(`/api/registry/${verb}`, { Group: group, Version: p.Version, Reason: reason.value });
      notice(result.Message);
      route();
    } catch (error) {
      // A refusal can still have changed the registry (approved, then the deployment failed):
      // show the package as it now is.
      notice(error.message, true);
      buttons.forEach((b) => { b.disabled = false; });
      route();
    }
  };
  const metrics = Object.entries(p.Metrics || {}).filter(([k]) => ["loss", "accuracy", "top_5_accuracy", "macro_f1"].includes(k))
    .map(([k, v]) => `${k} ${number(v)}`).join(", ");
  return el("tr", { "data-version": p.Version },
    el("td", {}, String(p.Version)), el("td", {}, badge(p.Status), p.ApprovalDescription ? el("div", { className: "muted" }, p.ApprovalDescription) : null),
    el("td", {}, when(p.CreationTime)), el("td", {}, metrics || "-"),
    el("td", {}, p.ExecutionId ? el("a", { href: `#/executions/${encodeURIComponent(p.ExecutionId)}` }, p.ExecutionId) : "-"),
    el("td", {}, el("ol", {}, p.History.map((h) => el("li", {}, `${when(h.Time)}: ${h.FromStatus || "registered"} → ${h.ToStatus}${h.Reason ? ` (${h.Reason})` : ""}`)))),
    el("td", {}, decidable ? [reason, " ",
      el("button", { type: "button", className: "primary approve", onclick: decide("approve") }, "Approve"), " ",
      el("button", { type: "button", className: "danger reject", onclick: decide("reject") }, "Reject")] : null));
}

// --- endpoints ---------------------------------------------------------------------------------------

async function showEndpoints(mine) {
  const [endpoints, overview] = await Promise.all([api("/api/endpoints"), api("/api/overview")]);
  const names = [...new Set([...endpoints.map((e) => e.Name), overview.EndpointName])];
  const rows = endpoints.map((e) => el("tr", { "data-endpoint": e.Name },
    el("td", {}, e.Name), el("td", {}, badge(e.Status)), el("td", { className: "package" }, e.ModelPackageVersion ? `version ${e.ModelPackageVersion}` : "-"),
    el("td", {}, e.Url || "-"), el("td", {}, when(e.LastModifiedTime)), el("td", { className: "muted" }, e.FailureReason || "")));
  const file = el("input", { type: "file", id: "image", accept: "image/*" });
  const endpoint = el("select", { id: "endpoint" }, names.map((n) => el("option", { value: n }, n)));
  const results = el("div", { id: "predictions" });
  const send = el("button", { type: "submit", className: "primary" }, "Predict");
  const form = el("form", {
    className: "card", id: "predict-form",
    onsubmit: async (event) => {
      event.preventDefault();
      if (!file.files.length) { notice("Choose an image first.", true); return; }
      send.disabled = true;
      try {
        const image = await readBase64(file.files[0]);
        const answer = await api(`/api/endpoints/${encodeURIComponent(endpoint.value)}/invoke`, { Image: image, TopK: 3 });
        const predictions = answer.Answer.predictions || [];
        results.replaceChildren(el("h3", {}, `Predicted for ${file.files[0].name}`),
          table(["Label", "Probability"], predictions.map((p) => el("tr", { className: "prediction" },
            el("td", { className: "label" }, p.label), el("td", {}, `${(100 * p.probability).toFixed(1)} %`)))));
      } catch (error) {
        results.replaceChildren(el("p", { className: "failure" }, error.message));
      } finally { send.disabled = false; }
    },
  }, el("h2", {}, "Try an endpoint"), el("p", {}, "Endpoint ", endpoint, " image ", file, " ", send), results);
  render(mine, el("h1", {}, "Endpoints"),
    endpoints.length ? table(["Name", "Status", "Package", "URL", "Changed", "Detail"], rows, { id: "endpoints" })
      : el("p", {}, "No endpoint yet: approving a model package deploys one."),
    form);
  if (endpoints.some((e) => ["Creating", "Updating"].includes(e.Status))) {
    setTimeout(() => { if (mine === generation) showEndpoints(mine).catch(() => {}); }, POLL_MS);
  }
}

function readBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`cannot read ${blob.name}`));
    reader.readAsDataURL(blob);
  });
}

// --- start -------------------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", async () => {
  try {
    const overview = await api("/api/overview");
    document.getElementById("home").textContent = `state: ${overview.Home}`;
  } catch (error) { notice(error.message, true); }
  route();
});
