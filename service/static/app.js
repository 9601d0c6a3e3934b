// The imgindex page: plain DOM, no build step, nothing fetched but this service's API.
// Every text from the API goes in through textContent, never as HTML. The token
// lives in an HttpOnly cookie this script cannot read; fetch sends it.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (response.status === 401) {
    throw new Error("This page no longer holds the service's token: open the URL `imgindex serve` printed.");
  }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function count(n, one, many) {
  return `${n.toLocaleString("en")} ${n === 1 ? one : many}`;
}

function ago(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (!Number.isFinite(seconds)) return "at an unknown time";
  const steps = [[60, "second"], [60, "minute"], [24, "hour"], [30, "day"], [12, "month"]];
  let value = Math.max(0, seconds);
  for (const [size, unit] of steps) {
    if (value < size) return value < 1 && unit === "second" ? "just now" : `${count(Math.floor(value), unit, unit + "s")} ago`;
    value /= size;
  }
  return `${count(Math.floor(value), "year", "years")} ago`;
}

function bytes(n) {
  const units = ["bytes", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

const imageBase = (index, id) => `/api/indexes/${encodeURIComponent(index)}/images/${id}`;

// ---- tabs -------------------------------------------------------------------

for (const tab of document.querySelectorAll("button.tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll("button.tab")) {
      other.classList.toggle("active", other === tab);
      $(`tab-${other.dataset.tab}`).hidden = other !== tab;
    }
    showError("");
    if (tab.dataset.tab === "duplicates") loadDuplicates(0);
    if (tab.dataset.tab === "builds") refreshBuilds();
  });
}

// ---- status and indexes -----------------------------------------------------

let status = null;

async function refreshStatus() {
  try {
    status = await api("/api/status");
    const cluster = status.cluster ? `, cluster: ${status.cluster.reason}` : "";
    $("health").textContent =
      `${count(status.indexes, "index", "indexes")}, ` +
      `${count(status.builds_running, "build", "builds")} running${cluster}`;
    $("build-off").hidden = status.builds_allowed;
    $("build-start").disabled = !status.builds_allowed;
    showDashboard(status.cluster);
  } catch (e) {
    $("health").textContent = e.message;
  }
}

function showDashboard(cluster) {
  const box = $("dashboard");
  box.textContent = "";
  if (cluster && cluster.dashboard) {
    box.append("Dask dashboard: ",
      el("a", { href: cluster.dashboard, target: "_blank", rel: "noopener", id: "dashboard-link", text: cluster.dashboard }));
  } else {
    box.textContent = "The Dask dashboard's link appears once a build has started the cluster.";
  }
}

let indexes = [];

async function loadIndexes() {
  const data = await api("/api/indexes");
  indexes = data.indexes;
  for (const select of [$("index-select"), $("dup-index")]) {
    const chosen = select.value;
    select.textContent = "";
    for (const index of indexes) {
      if (select.id === "dup-index" && !index.duplicates) continue;
      const label = index.error ? `${index.name} (unreadable)` : `${index.name} (${count(index.count, "image", "images")})`;
      select.append(el("option", { value: index.name, text: label }));
    }
    if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  }
  describeIndex();
  updateSearchButton();
}

const SEARCH_KIND = {
  flat: "exact search",
  hnsw: "fast approximate search",
  "ivf-flat": "approximate search",
  "ivf-pq": "approximate search, compressed",
};

function describeIndex() {
  const index = indexes.find((i) => i.name === $("index-select").value);
  if (!index) {
    $("index-info").textContent = indexes.length ? "" : "No index yet: build one.";
    return;
  }
  if (index.error) {
    $("index-info").textContent = index.error;
    return;
  }
  const kind = SEARCH_KIND[index.index_kind] || `FAISS ${index.index_key}`;
  const facts = [count(index.count, "image", "images"), kind, `updated ${ago(index.updated)}`];
  // Searching works without the images, but none can be shown.
  if (index.source_found === false) facts.push(`its images are not at ${index.source} (moved? build it from its new place with "moved here" ticked)`);
  $("index-info").textContent = facts.join(" · ");
  $("index-info").title = `${index.model}, ${index.dim}-d vectors, FAISS ${index.index_key}, from ${index.source}`;
}

// ---- search -----------------------------------------------------------------

// What the next search looks for: an uploaded file, or an indexed image.
let query = null;

function setQueryFile(file) {
  query = { file };
  const preview = $("query-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  // A format this browser does not show (HEIC, TIFF): its name instead.
  preview.onerror = () => {
    preview.hidden = true;
    $("query-label").textContent = file.name;
    $("query-label").hidden = false;
  };
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("query-label").hidden = true;
  updateSearchButton();
  search();
}

function setQueryIndexed(index, id, name) {
  query = { index, id, name };
  $("index-select").value = index;
  const preview = $("query-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.onerror = null;
  preview.src = `${imageBase(index, id)}/thumbnail?side=320`;
  preview.hidden = false;
  $("query-label").textContent = `more like ${name}`;
  $("query-label").hidden = false;
  updateSearchButton();
  search();
}

function updateSearchButton() {
  $("search-button").disabled = !query || !$("index-select").value;
}

$("query-file").addEventListener("change", (e) => {
  if (e.target.files.length) setQueryFile(e.target.files[0]);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) setQueryFile(e.dataTransfer.files[0]);
});
$("search-button").addEventListener("click", () => search());
$("index-select").addEventListener("change", () => {
  describeIndex();
  if (query && query.file) search();
  else { query = null; $("query-preview").hidden = true; $("query-label").hidden = true; updateSearchButton(); }
});

async function search() {
  const index = $("index-select").value;
  if (!query || !index) return;
  let options;
  if (query.file) {
    const form = new FormData();
    form.append("image", query.file, query.file.name);
    form.append("k", $("k").value);
    form.append("turns", $("turns").checked ? "true" : "false");
    form.append("copies", $("copies").checked ? "true" : "false");
    options = { method: "POST", body: form };
  } else {
    options = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        id: query.id, k: Number($("k").value), turns: $("turns").checked, copies: $("copies").checked,
      }),
    };
  }
  $("search-status").textContent = "searching…";
  showError("");
  try {
    const result = await api(`/api/indexes/${encodeURIComponent(index)}/search`, options);
    showHits(index, result);
    $("search-status").textContent =
      `${result.hits.length} hits in ${(result.seconds * 1000).toFixed(0)} ms; ` + hitsSummary(result.hits);
  } catch (e) {
    $("results").textContent = "";
    $("search-status").textContent = "";
    showError(e.message);
  }
}

// Below this cosine a hit is another image that looks alike, not the same one
// (the duplicates threshold, imgindex.duplicates.threshold).
const sameImage = () => (status && status.same_image) || 0.5;

// What a hit is to the query, where it was checked (the "copies" box).
const KIND_WORDS = {
  identical: "the same file", copy: "a copy", shot: "another shot of the scene",
  neither: "not a copy", undecided: "undecided",
};

function hitsSummary(hits) {
  if (!hits.some((h) => h.kind)) {
    const same = hits.filter((h) => h.score >= sameImage()).length;
    return `${same} at ${sameImage().toFixed(2)} or more: likely the same image`;
  }
  const copies = hits.filter((h) => ["identical", "copy"].includes(h.kind)).length;
  const shots = hits.filter((h) => h.kind === "shot").length;
  return `${copies} ${copies === 1 ? "copy" : "copies"} of the query, ` +
    `${shots} other ${shots === 1 ? "shot" : "shots"} of its scene`;
}

function showHits(index, result) {
  const list = $("results");
  list.textContent = "";
  const checked = result.hits.some((h) => h.kind);
  let cut = checked;  // checked hits say what they are: no line by score
  for (const hit of result.hits) {
    const name = hit.relpath || hit.path;
    const same = checked ? ["identical", "copy"].includes(hit.kind) : hit.score >= sameImage();
    const faint = checked ? ["neither", "undecided"].includes(hit.kind) : !same;
    if (!same && !cut) {
      cut = true;
      list.append(el("li", { class: "cut", text: `Below ${sameImage().toFixed(2)}: other images that look alike, not the same image` }));
    }
    const thumb = el("img", { src: hit.thumbnail, alt: name, loading: "lazy" });
    const open = el("button", { class: "thumb", title: "Larger, with its details" }, thumb);
    open.addEventListener("click", () => showPreview(index, hit.id, name));
    const like = el("button", { class: "like", text: "More like this" });
    like.addEventListener("click", () => setQueryIndexed(index, hit.id, name));
    const kind = hit.kind ? [el("span", { class: `kind kind-${hit.kind}`, text: ` ${KIND_WORDS[hit.kind] || hit.kind}` })] : [];
    list.append(el("li", { class: same ? "hit same" : faint ? "hit faint" : "hit", "data-rank": hit.rank, "data-path": name, "data-id": hit.id, "data-kind": hit.kind || "" },
      open,
      el("div", {},
        el("span", { class: "rank", text: `#${hit.rank} ` }),
        el("span", { class: "score", text: hit.score.toFixed(4) }),
        ...kind),
      el("div", { class: "path", text: name }),
      like));
  }
}

// ---- the larger preview -------------------------------------------------------

async function showPreview(index, id, name) {
  const base = imageBase(index, id);
  $("preview-image").src = `${base}/thumbnail?side=512`;
  $("preview-image").alt = name;
  $("preview-name").textContent = name;
  $("preview-open").href = base;
  $("preview-download").href = `${base}?download=1`;
  $("preview-like").onclick = () => { $("preview").close(); setQueryIndexed(index, id, name); };
  const facts = $("preview-facts");
  facts.textContent = "";
  $("preview").showModal();
  try {
    const info = await api(`${base}/info`);
    const rows = [
      ["path", info.path],
      ["size", info.width ? `${info.width} × ${info.height} pixels, ${bytes(info.bytes)}` : bytes(info.bytes)],
      ["format", info.format || "unknown"],
      ["modified", `${new Date(info.modified).toLocaleString()} (${ago(info.modified)})`],
    ];
    for (const [term, value] of rows) facts.append(el("dt", { text: term }), el("dd", { text: value }));
  } catch (e) {
    facts.append(el("dd", { class: "error", text: e.message }));
  }
}
$("preview-close").addEventListener("click", () => $("preview").close());

// ---- builds -----------------------------------------------------------------

async function loadDatasets() {
  const data = await api("/api/datasets");
  const list = $("build-datasets");
  list.textContent = "";
  for (const d of data.datasets) {
    list.append(el("li", {}, el("label", {},
      el("input", { type: "checkbox", value: d.path, "data-name": d.name }), ` ${d.name}`)));
  }
}

$("build-start").addEventListener("click", async () => {
  const datasets = [...document.querySelectorAll("#build-datasets input:checked")].map((i) => i.value);
  if (!datasets.length) { showError("Pick at least one dataset folder."); return; }
  showError("");
  try {
    const build = await api("/api/builds", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        datasets,
        rebuild: $("build-rebuild").checked,
        moved: $("build-moved").checked,
      }),
    });
    watched.add(build.id);
    await refreshBuilds();
  } catch (e) {
    showError(e.message);
  }
});

const watched = new Set();

async function cancelBuild(id) {
  try {
    await api(`/api/builds/${id}`, { method: "DELETE" });
    await refreshBuilds();
  } catch (e) {
    showError(e.message);
  }
}

// ``showError``: false where the dataset's summary shows its error instead.
function datasetLine(d, showError = true) {
  const total = d.total || 0;
  let share = total ? d.done / total : (d.state === "done" ? 1 : 0);
  let words = `${d.name}: ${d.state}`;
  if (total) words += `, ${d.done} of ${total} images`;
  if (d.failed) words += `, ${d.failed} failed`;
  if (d.images_per_second) words += `, ${d.images_per_second} images/s`;
  if (d.step) words += `; index: ${d.step.name} ${d.step.done}/${d.step.total}`;
  if (d.error && showError) words += `: ${d.error}`;
  if (d.state === "done") share = 1;
  const percent = Math.round(share * 100);
  const fill = el("div");
  fill.style.width = `${percent}%`;
  return el("div", { class: "dataset" },
    el("div", { text: `${words} (${percent} %)` }),
    el("div", { class: "bar", role: "progressbar", "aria-valuenow": percent, "data-dataset": d.name }, fill));
}

const LISTED_FAILURES = 20;

// What a finished dataset's summary says a person should know.
function outcome(summary) {
  const box = el("div", { class: "outcome", "data-dataset": summary.name });
  if (summary.error) {
    // A dataset that could not be built: its summary is the one-line error.
    box.append(el("div", { class: "error", text: `${summary.name}: not built: ${summary.error}` }));
    return box;
  }
  if (summary.kept) {
    box.append(el("div", { class: "kept", text: `${summary.name}: nothing changed; the index was kept as it was (${summary.indexed} images).` }));
  } else {
    box.append(el("div", { text: `${summary.name}: ${count(summary.indexed, "image", "images")} indexed, ${summary.embedded} embedded now.` }));
  }
  if (summary.moved_from) {
    box.append(el("div", { class: "moved", text: `Moved here from ${summary.moved_from}: the index now reads its images here.` }));
  }
  if (summary.touched) {
    // Copied without their times, restored, touched: read, not embedded.
    box.append(el("div", { class: "touched", text: `${count(summary.touched, "unchanged image", "unchanged images")} had a new modification time (same bytes, checked): ${summary.touched === 1 ? "its vector was" : "their vectors were"} kept.` }));
  }
  const failed = summary.failed || [];
  if (failed.length) {
    const list = el("ul", { class: "failures" });
    for (const f of failed.slice(0, LISTED_FAILURES)) {
      list.append(el("li", {}, el("span", { class: "path", text: f.path }), el("span", { class: "muted", text: ` ${f.reason}` })));
    }
    if (failed.length > LISTED_FAILURES) list.append(el("li", { class: "muted", text: `… and ${failed.length - LISTED_FAILURES} more (build --json lists them all)` }));
    const details = el("details", { class: "failed" },
      el("summary", { text: `${count(failed.length, "file was", "files were")} not indexed: which and why` }), list);
    box.append(details);
  }
  return box;
}

// Builds are polled while one runs, and not while all are over.
let polling = null;

function pollBuilds(on) {
  if (on && polling === null) polling = setInterval(refreshBuilds, 700);
  if (!on && polling !== null) { clearInterval(polling); polling = null; }
}

// A build's item is drawn anew only when the build changed, so a list the
// user opened stays open while others progress.
const drawn = new Map();

function buildItem(build) {
  const running = build.state === "starting" || build.state === "running";
  const item = el("li", { class: `build state-${build.state}`, "data-build": build.id },
    el("div", { class: "head" },
      el("span", { class: "state", text: build.state }),
      el("span", { class: "muted", text: `build ${build.id}, started ${ago(build.started)}` })));
  if (running) {
    const stop = el("button", { text: "Cancel" });
    stop.addEventListener("click", () => cancelBuild(build.id));
    item.querySelector(".head").append(stop);
  }
  const summaries = build.summaries || [];
  const explained = new Set(summaries.filter((s) => s.error).map((s) => s.name));
  for (const d of build.datasets) item.append(datasetLine(d, !explained.has(d.name)));
  for (const s of summaries) item.append(outcome(s));
  if (build.error) item.append(el("div", { class: "error", text: build.error }));
  return item;
}

async function refreshBuilds() {
  let data;
  try {
    data = await api("/api/builds");
  } catch (e) {
    pollBuilds(false);
    return;
  }
  let anyRunning = false;
  const items = [];
  for (const build of data.builds.slice().reverse()) {
    const running = build.state === "starting" || build.state === "running";
    anyRunning = anyRunning || running;
    const key = JSON.stringify(build);
    const before = drawn.get(build.id);
    const item = before && before.key === key ? before.item : buildItem(build);
    drawn.set(build.id, { key, item });
    items.push(item);
    if (build.cluster) showDashboard(build.cluster);
    if (!running && watched.delete(build.id)) { loadIndexes(); refreshStatus(); }
  }
  $("builds").replaceChildren(...items);
  pollBuilds(anyRunning || watched.size > 0);
}

// ---- duplicates -------------------------------------------------------------

const PAGE = 10;

function thumbnailCard(index, id, path, words, extraClass = "") {
  return el("div", { class: `member ${extraClass}`.trim() },
    el("a", { href: imageBase(index, id), target: "_blank", rel: "noopener" },
      el("img", { src: `${imageBase(index, id)}/thumbnail`, alt: path, loading: "lazy" })),
    el("div", { text: path }),
    el("div", { class: "muted", text: words }));
}

async function loadDuplicates(offset) {
  const index = $("dup-index").value;
  const box = $("dup-groups");
  box.textContent = "";
  $("dup-more").textContent = "";
  $("dup-summary").textContent = index ? "" : "No index has a saved report: run `imgindex duplicates INDEX --save`.";
  if (!index) return;
  let report;
  try {
    report = await api(`/api/indexes/${encodeURIComponent(index)}/duplicates?offset=${offset}&limit=${PAGE}`);
  } catch (e) {
    showError(e.message);
    return;
  }
  $("dup-summary").textContent =
    `${report.images_in_groups} of ${report.images} images in ${count(report.groups, "group", "groups")} of copies; ` +
    `${report.removable} could be removed (keeper first: ${report.keeper_rule}). ` +
    (report.shot_groups ?
      `${count(report.shot_groups, "group", "groups")} of other shots of one scene: nothing to remove, pick by hand` :
      "No other shots of one scene.");
  const shown = (groups, label, role, first) => {
    for (const [n, group] of groups.entries()) {
      const members = el("div", { class: "members" });
      // Copies that differ from the keeper in a region (an edit): kept too.
      const edited = new Set(group.edited || []);
      for (const [i, m] of group.members.entries()) {
        const size = m.width ? `${m.width}×${m.height}` : "size unknown";
        const sharp = m.sharpness != null && role === "best" ? `, sharpness ${m.sharpness.toFixed(0)}` : "";
        const note = (group.notes || {})[m.path];
        const edit = note ? `; ${note}` : "";
        const kind = i === 0 ? role : edited.has(m.path) ? "edited" : "";
        members.append(thumbnailCard(index, m.id, `${i === 0 ? first : ""}${m.path}`, size + sharp + edit, kind));
      }
      box.append(el("div", { class: `group ${role === "best" ? "shots" : ""}`.trim() },
        el("div", { text: `${label} ${offset + n + 1}: ${group.members.length} images` }), members));
    }
  };
  shown(report.page, "group", "keeper", "keep: ");
  if (report.shot_page.length) {
    box.append(el("h2", { text: "Other shots of one scene (best first: " + report.best_shot_rule + ")" }));
    shown(report.shot_page, "shots", "best", "best: ");
  }
  const pages = Math.max(1, Math.ceil(Math.max(report.groups, report.shot_groups) / PAGE));
  $("dup-page").textContent = `page ${Math.floor(offset / PAGE) + 1} of ${pages}`;
  $("dup-prev").disabled = offset === 0;
  $("dup-next").disabled = offset + PAGE >= Math.max(report.groups, report.shot_groups);
  $("dup-prev").onclick = () => loadDuplicates(Math.max(0, offset - PAGE));
  $("dup-next").onclick = () => loadDuplicates(offset + PAGE);
  showReportLists(index, report);
}

const SHOWN_PER_LIST = 24;

// The report's other findings: outliers, flagged images, files not indexed.
function showReportLists(index, report) {
  const more = $("dup-more");
  const outliers = report.outliers || [];
  if (outliers.length) {
    const cards = el("div", { class: "members" });
    for (const o of outliers.slice(0, SHOWN_PER_LIST)) {
      cards.append(thumbnailCard(index, o.id, o.path, `nearest other image: cosine ${o.nearest_cosine.toFixed(3)}`));
    }
    more.append(el("section", { class: "group", id: "dup-outliers" },
      el("h2", { text: `Outliers: ${count(outliers.length, "image", "images")} least like any other` }), cards));
  }
  for (const [flag, entry] of Object.entries(report.flagged || {})) {
    if (!entry.count) continue;
    const cards = el("div", { class: "members" });
    entry.images.slice(0, SHOWN_PER_LIST).forEach((path, i) => cards.append(thumbnailCard(index, entry.ids[i], path, flag)));
    more.append(el("section", { class: "group flagged", "data-flag": flag },
      el("h2", { text: `${flag}: ${count(entry.count, "image", "images")}` }),
      el("p", { class: "muted", text: entry.meaning }), cards));
  }
  const broken = report.broken || [];
  if (broken.length) {
    const list = el("ul", { class: "failures" });
    for (const b of broken) list.append(el("li", {}, el("span", { class: "path", text: b.path }), el("span", { class: "muted", text: ` ${b.reason}` })));
    more.append(el("section", { class: "group", id: "dup-broken" },
      el("h2", { text: `Not indexed: ${count(broken.length, "file", "files")}` }), list));
  }
}
$("dup-index").addEventListener("change", () => loadDuplicates(0));

// ---- start --------------------------------------------------------------------

refreshStatus();
loadIndexes().catch((e) => showError(e.message));
loadDatasets().catch(() => {});
refreshBuilds();
setInterval(() => { if (!document.hidden) refreshStatus(); }, 10000);
