// The imgindex page: plain DOM, no build step, nothing fetched but this service's API.
// Every text from the API goes in through textContent, never as HTML.
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
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function count(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

function authHeaders() {
  const token = $("token").value.trim();
  if (token) localStorage.setItem("imgindex-token", token);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// ---- tabs -------------------------------------------------------------------

for (const tab of document.querySelectorAll("button.tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll("button.tab")) {
      other.classList.toggle("active", other === tab);
      $(`tab-${other.dataset.tab}`).hidden = other !== tab;
    }
    showError("");
    if (tab.dataset.tab === "duplicates") loadDuplicates(0);
  });
}

// ---- health and indexes -----------------------------------------------------

let health = null;

async function refreshHealth() {
  try {
    health = await api("/health");
    const cluster = health.cluster ? `, cluster: ${health.cluster.reason}` : "";
    $("health").textContent =
      `${count(health.indexes, "index", "indexes")}, ` +
      `${count(health.builds_running, "build", "builds")} running${cluster}`;
    $("token-label").hidden = !health.token_required;
    $("build-off").hidden = health.builds_allowed;
    $("build-start").disabled = !health.builds_allowed;
    showDashboard(health.cluster);
  } catch (e) {
    $("health").textContent = `service unreachable: ${e.message}`;
  }
}

function showDashboard(cluster) {
  const box = $("dashboard");
  box.textContent = "";
  if (cluster && cluster.dashboard) {
    box.append("Dask dashboard: ",
      el("a", { href: cluster.dashboard, target: "_blank", id: "dashboard-link", text: cluster.dashboard }));
  } else {
    box.textContent = "The Dask dashboard's link appears once a build has started the cluster.";
  }
}

async function loadIndexes() {
  const data = await api("/api/indexes");
  for (const select of [$("index-select"), $("dup-index")]) {
    const chosen = select.value;
    select.textContent = "";
    for (const index of data.indexes) {
      if (select.id === "dup-index" && !index.duplicates) continue;
      const label = index.error ? `${index.name} (unreadable)` : `${index.name} (${index.count} images)`;
      select.append(el("option", { value: index.name, text: label }));
    }
    if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  }
  describeIndex(data.indexes);
  updateSearchButton();
}

function describeIndex(indexes) {
  const index = indexes.find((i) => i.name === $("index-select").value);
  $("index-info").textContent = index && !index.error
    ? `${index.model}, ${index.dim}-d, ${index.index_key}, updated ${index.updated}`
    : indexes.length ? "" : "No index yet: build one.";
}

// ---- search -----------------------------------------------------------------

let queryFile = null;

function setQuery(file) {
  queryFile = file;
  const preview = $("query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  updateSearchButton();
  search();
}

function updateSearchButton() {
  $("search-button").disabled = !queryFile || !$("index-select").value;
}

$("query-file").addEventListener("change", (e) => {
  if (e.target.files.length) setQuery(e.target.files[0]);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) setQuery(e.dataTransfer.files[0]);
});
$("search-button").addEventListener("click", () => search());
$("index-select").addEventListener("change", () => { loadIndexes(); if (queryFile) search(); });

async function search() {
  const index = $("index-select").value;
  if (!queryFile || !index) return;
  const form = new FormData();
  form.append("image", queryFile, queryFile.name);
  form.append("k", $("k").value);
  form.append("turns", $("turns").checked ? "true" : "false");
  $("search-status").textContent = "searching…";
  showError("");
  try {
    const result = await api(`/api/indexes/${encodeURIComponent(index)}/search`, { method: "POST", body: form });
    showHits(result);
    $("search-status").textContent = `${result.hits.length} hits in ${(result.seconds * 1000).toFixed(0)} ms`;
  } catch (e) {
    $("results").textContent = "";
    $("search-status").textContent = "";
    showError(e.message);
  }
}

function showHits(result) {
  const list = $("results");
  list.textContent = "";
  for (const hit of result.hits) {
    const name = hit.relpath || hit.path;
    list.append(el("li", { class: "hit", "data-rank": hit.rank, "data-path": name },
      el("a", { href: hit.image, target: "_blank" },
        el("img", { src: hit.thumbnail, alt: name, loading: "lazy" })),
      el("div", {},
        el("span", { class: "rank", text: `#${hit.rank} ` }),
        el("span", { class: "score", text: hit.score.toFixed(4) })),
      el("div", { class: "path", text: name })));
  }
}

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
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ datasets, rebuild: $("build-rebuild").checked }),
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
    await api(`/api/builds/${id}`, { method: "DELETE", headers: authHeaders() });
    await refreshBuilds();
  } catch (e) {
    showError(e.message);
  }
}

function datasetLine(d) {
  const total = d.total || 0;
  let share = total ? d.done / total : (d.state === "done" ? 1 : 0);
  let words = `${d.name}: ${d.state}`;
  if (total) words += `, ${d.done} of ${total} images`;
  if (d.failed) words += `, ${d.failed} failed`;
  if (d.images_per_second) words += `, ${d.images_per_second} images/s`;
  if (d.step) words += `; index: ${d.step.name} ${d.step.done}/${d.step.total}`;
  if (d.error) words += `: ${d.error}`;
  if (d.state === "done") share = 1;
  const percent = Math.round(share * 100);
  return el("div", { class: "dataset" },
    el("div", { text: `${words} (${percent} %)` }),
    el("div", { class: "bar", role: "progressbar", "aria-valuenow": percent, "data-dataset": d.name },
      Object.assign(el("div"), { style: `width: ${percent}%` })));
}

async function refreshBuilds() {
  let data;
  try {
    data = await api("/api/builds");
  } catch (e) {
    return;
  }
  const list = $("builds");
  list.textContent = "";
  for (const build of data.builds.slice().reverse()) {
    const running = build.state === "starting" || build.state === "running";
    const item = el("li", { class: `build state-${build.state}`, "data-build": build.id },
      el("div", { class: "head" },
        el("span", { class: "state", text: build.state }),
        el("span", { class: "muted", text: `build ${build.id}, started ${build.started}` })));
    if (running) {
      const stop = el("button", { text: "Cancel" });
      stop.addEventListener("click", () => cancelBuild(build.id));
      item.querySelector(".head").append(stop);
    }
    for (const d of build.datasets) item.append(datasetLine(d));
    if (build.error) item.append(el("div", { class: "error", text: build.error }));
    list.append(item);
    if (build.cluster) showDashboard(build.cluster);
    if (!running && watched.delete(build.id)) { loadIndexes(); refreshHealth(); }
  }
}

// ---- duplicates -------------------------------------------------------------

const PAGE = 10;

async function loadDuplicates(offset) {
  const index = $("dup-index").value;
  const box = $("dup-groups");
  box.textContent = "";
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
    `${report.images_in_groups} of ${report.images} images in ${report.groups} groups; ` +
    `${report.removable} could be removed (keeper first: ${report.keeper_rule})`;
  for (const [n, group] of report.page.entries()) {
    const members = el("div", { class: "members" });
    for (const [i, m] of group.members.entries()) {
      const base = `/api/indexes/${encodeURIComponent(index)}/images/${m.id}`;
      const size = m.width ? `${m.width}×${m.height}` : "size unknown";
      members.append(el("div", { class: i === 0 ? "member keeper" : "member" },
        el("a", { href: base, target: "_blank" }, el("img", { src: `${base}/thumbnail`, alt: m.path, loading: "lazy" })),
        el("div", { text: `${i === 0 ? "keep: " : ""}${m.path}` }),
        el("div", { class: "muted", text: size })));
    }
    box.append(el("div", { class: "group" },
      el("div", { text: `group ${offset + n + 1}: ${group.members.length} images` }), members));
  }
  const pages = Math.max(1, Math.ceil(report.groups / PAGE));
  $("dup-page").textContent = `page ${Math.floor(offset / PAGE) + 1} of ${pages}`;
  $("dup-prev").disabled = offset === 0;
  $("dup-next").disabled = offset + PAGE >= report.groups;
  $("dup-prev").onclick = () => loadDuplicates(Math.max(0, offset - PAGE));
  $("dup-next").onclick = () => loadDuplicates(offset + PAGE);
}
$("dup-index").addEventListener("change", () => loadDuplicates(0));

// ---- start --------------------------------------------------------------------

$("token").value = localStorage.getItem("imgindex-token") || "";
refreshHealth();
loadIndexes().catch((e) => showError(e.message));
loadDatasets().catch(() => {});
refreshBuilds();
setInterval(refreshBuilds, 700);
setInterval(refreshHealth, 5000);
