// Progressive enhancement: without JavaScript the form posts every file at once and the server renders the table
// and each result. With it, each image is its own request (a few at a time), rows appear as answers come, a row
// opens its result (markup drawn by the server), columns sort, and the map can be laid over the image.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  const input = document.getElementById("image-input");
  const zone = document.getElementById("drop-zone");
  const preview = document.getElementById("preview");
  const chosen = document.getElementById("chosen");
  const button = document.getElementById("check-button");
  const status = document.getElementById("status");
  const errorBox = document.getElementById("error");
  const resultsBox = document.getElementById("results");
  const tbody = document.querySelector("#results-table tbody");
  const details = document.getElementById("details");
  const maxFiles = Number(form.dataset.maxFiles) || 20;
  const concurrency = Math.max(1, Number(form.dataset.concurrency) || 3);
  const COLUMNS = ["file", "sha256", "label", "score", "faces", "label_by", "provenance", "elapsed_ms", "error"];
  let results = [];      // per file: the server's JSON (or {filename, error})
  let urls = [];         // object URLs to release on the next check

  function showChosen(files) {
    if (!files || !files.length) { preview.hidden = true; chosen.hidden = true; return; }
    if (files.length === 1) {
      preview.src = URL.createObjectURL(files[0]);
      preview.hidden = false;
      chosen.hidden = true;
    } else {
      preview.hidden = true;
      chosen.textContent = files.length + " images chosen" + (files.length > maxFiles
        ? " (more than " + maxFiles + ": only " + maxFiles + " can be checked at once)" : "");
      chosen.hidden = false;
    }
  }
  input.addEventListener("change", () => showChosen(input.files));
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.add("dragover");
  }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.remove("dragover");
  }));
  zone.addEventListener("drop", (e) => {
    if (e.dataTransfer && e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      showChosen(input.files);
    }
  });

  function fail(message) {
    document.getElementById("error-message").textContent = message;
    errorBox.hidden = false;
    status.textContent = "";
  }

  // -- the map over the image ---------------------------------------------------------------------------------
  function wireOverlays(root) {
    root.querySelectorAll(".heatmap-box").forEach((box) => {
      const view = box.querySelector(".map-view");
      const controls = box.querySelector(".map-controls");
      if (!view || !controls || view.classList.contains("overlaid")) { return; }
      const layer = view.querySelector(".map-layer");
      const toggle = controls.querySelector(".overlay-toggle");
      const opacity = controls.querySelector(".overlay-opacity");
      view.classList.add("overlaid");
      controls.hidden = false;
      const apply = () => {
        layer.hidden = !toggle.checked;
        layer.style.opacity = String(Number(opacity.value) / 100);
        opacity.disabled = !toggle.checked;
      };
      toggle.addEventListener("change", apply);
      opacity.addEventListener("input", apply);
      apply();
    });
  }
  wireOverlays(document);

  // -- the table --------------------------------------------------------------------------------------------
  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    return td;
  }

  function addRow(i, r) {
    const tr = document.createElement("tr");
    tr.dataset.index = String(i);
    tr.dataset.file = r.filename || "";
    tr.tabIndex = 0;
    if (r.error) {
      tr.className = "error-row";
      tr.append(cell(""), cell(r.filename || ""));
      const msg = cell(r.error.message, "row-error");
      msg.colSpan = 4;
      tr.append(msg);
      ["label", "score", "faces", "elapsed_ms"].forEach((k) => { tr.dataset[k] = ""; });
    } else {
      const td = document.createElement("td");
      if (r.thumb) {
        const img = document.createElement("img");
        img.className = "thumb"; img.alt = ""; img.src = r.thumb;
        td.append(img);
      }
      const faces = r.faces === null || r.faces === undefined ? "" : String(r.faces.length);
      tr.append(td, cell(r.filename), cell(r.label + (r.label_by === "provenance" ? " (C2PA)" : ""),
        "verdict verdict-" + r.label), cell(Number(r.score).toFixed(3)), cell(faces),
        cell((r.elapsed_ms / 1000).toFixed(1) + " s"));
      tr.dataset.label = r.label;
      tr.dataset.score = String(r.score);
      tr.dataset.faces = faces;
      tr.dataset.elapsed_ms = String(r.elapsed_ms);
      tr.addEventListener("click", () => openResult(i));
      tr.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openResult(i); }
      });
    }
    tbody.append(tr);
  }

  function openResult(i) {
    const r = results[i];
    if (!r || r.error) { return; }
    details.innerHTML = r.html;  // the server's own markup for this result (escaped by its templates)
    wireOverlays(details);
    tbody.querySelectorAll("tr").forEach((tr) => {
      tr.setAttribute("aria-selected", tr.dataset.index === String(i) ? "true" : "false");
    });
  }

  function sortBy(th) {
    const key = th.dataset.key;
    const asc = th.getAttribute("aria-sort") !== "ascending";
    document.querySelectorAll("#results-table th[data-key]").forEach((h) => h.setAttribute("aria-sort", "none"));
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    const numeric = key !== "file" && key !== "label";
    const value = (tr) => {
      const v = tr.dataset[key] || "";
      return v === "" ? null : numeric ? Number(v) : v.toLowerCase();
    };
    const rows = Array.from(tbody.querySelectorAll("tr"));
    rows.sort((a, b) => {
      const x = value(a); const y = value(b);
      if (x === null || y === null) { return (x === null) - (y === null); }  // no value (an error): always last
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    });
    rows.forEach((tr) => tbody.append(tr));
  }
  document.querySelectorAll("#results-table th[data-key] button").forEach((b) => {
    b.addEventListener("click", () => sortBy(b.closest("th")));
  });

  function csvCell(v) {
    let text = v === null || v === undefined ? "" : String(v);
    if (/^[=+\-@\t\r]/.test(text)) { text = "'" + text; }  // shown by a spreadsheet, never run
    return /[",\n\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function updateDownloads() {
    urls.forEach((u) => URL.revokeObjectURL(u));
    const rows = results.filter((r) => r).map((r) => r.row);
    const csv = [COLUMNS.join(",")].concat(rows.map((row) => COLUMNS.map((c) => csvCell(row[c])).join(",")));
    const csvUrl = URL.createObjectURL(new Blob([csv.join("\n") + "\n"], { type: "text/csv" }));
    const jsonUrl = URL.createObjectURL(new Blob([JSON.stringify(rows, null, 1)], { type: "application/json" }));
    urls = [csvUrl, jsonUrl];
    document.getElementById("download-csv").href = csvUrl;
    document.getElementById("download-json").href = jsonUrl;
  }

  // -- sending ----------------------------------------------------------------------------------------------
  async function send(file, i) {
    const data = new FormData();
    data.append("image", file, file.name);
    if (document.getElementById("explain-input").checked) { data.append("explain", "on"); }
    if (document.getElementById("faces-input").checked) { data.append("faces", "on"); }
    try {
      const resp = await fetch(form.action, { method: "POST", body: data, headers: { Accept: "application/json" } });
      let body = null;
      try { body = await resp.json(); } catch (e) { body = null; }
      if (!resp.ok || !body || body.error) {
        const message = body && body.error ? body.error.message : "The site gave an answer the page cannot read.";
        return { filename: file.name, error: { message: message, status: resp.status },
                 row: { file: file.name, error: message } };
      }
      return body;
    } catch (err) {
      return { filename: file.name, error: { message: "The site cannot be reached. Check your connection." },
               row: { file: file.name, error: "the site cannot be reached" } };
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const files = Array.from(input.files || []);
    if (!files.length) { fail("Choose an image file first."); return; }
    if (files.length > maxFiles) {
      fail(files.length + " files is over the limit of " + maxFiles + " per check. Check them in smaller groups.");
      return;
    }
    errorBox.hidden = true;
    button.disabled = true;
    results = new Array(files.length);
    tbody.replaceChildren();
    details.replaceChildren();
    resultsBox.hidden = false;
    const t0 = performance.now();
    let next = 0; let done = 0; let failed = 0; let opened = false;
    status.textContent = "Checking " + files.length + (files.length === 1 ? " image…" : " images…");
    async function worker() {
      while (next < files.length) {
        const i = next++;
        const r = await send(files[i], i);
        results[i] = r;
        done += 1;
        if (r.error) { failed += 1; }
        addRow(i, r);
        if (!opened && !r.error) { openResult(i); opened = true; }
        updateDownloads();
        status.textContent = "Checked " + done + " of " + files.length + "…";
      }
    }
    await Promise.all(Array.from({ length: Math.min(concurrency, files.length) }, worker));
    button.disabled = false;
    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    if (files.length === 1 && failed === 1) {
      resultsBox.hidden = true;
      fail(results[0].error.message);
      return;
    }
    status.textContent = "Checked " + (done - failed) + " of " + files.length + (files.length === 1 ? " image" : " images")
      + (failed ? " (" + failed + " could not be checked: see the table)" : "") + " in " + secs + " s.";
  });
})();
