// Progressive enhancement: without JavaScript the form posts and the server renders the verdict.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  const input = document.getElementById("image-input");
  const zone = document.getElementById("drop-zone");
  const preview = document.getElementById("preview");
  const button = document.getElementById("check-button");
  const status = document.getElementById("status");
  const errorBox = document.getElementById("error");
  const result = document.getElementById("result");
  const texts = { fake: "Likely generated or manipulated.", real: "Likely a real photograph.",
                  uncertain: "The detector is not sure." };

  function showPreview(file) {
    if (!file) { preview.hidden = true; return; }
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  }
  input.addEventListener("change", () => showPreview(input.files[0]));
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
      showPreview(input.files[0]);
    }
  });

  function fail(message) {
    result.hidden = true;
    document.getElementById("error-message").textContent = message;
    errorBox.hidden = false;
    status.textContent = "";
  }

  function renderProvenance(r) {
    const box = document.getElementById("provenance-box");
    const p = r.provenance;
    if (!p) { box.hidden = true; return; }
    document.getElementById("provenance-says").replaceChildren();
    const strong = document.createElement("strong");
    strong.textContent = "The file " + p.says + ".";
    document.getElementById("provenance-says").append(strong);
    const c2pa = document.getElementById("provenance-c2pa");
    c2pa.hidden = !p.signed;
    document.getElementById("provenance-signer").textContent = p.signer || "an unreadable signer";
    const validity = document.getElementById("provenance-validity");
    validity.textContent = p.valid ? "valid" : "NOT valid: the file changed after signing, or the manifest is damaged";
    validity.className = p.valid ? "valid" : "invalid";
    document.getElementById("provenance-trust").textContent = !p.valid
      ? "so whoever signed it, its claims do not hold for this file"
      : p.trusted ? "signer trusted by this service" : "signer not on this service's trust list (only a claim)";
    const list = document.getElementById("provenance-evidence");
    list.replaceChildren();
    p.evidence.forEach((f) => {
      const li = document.createElement("li");
      li.textContent = f.fact + " ";
      const src = document.createElement("span");
      src.className = "source";
      src.textContent = "(" + f.source + (f.signed ? ", signed" : ", unsigned") + ")";
      li.append(src); list.append(li);
    });
    p.unreadable.forEach((u) => {
      const li = document.createElement("li");
      li.className = "unreadable"; li.textContent = "Not read: " + u; list.append(li);
    });
    document.getElementById("provenance-label").hidden = r.label_by !== "provenance";
    box.hidden = false;
  }

  function render(r) {
    errorBox.hidden = true;
    renderProvenance(r);
    const verdict = document.getElementById("verdict");
    verdict.textContent = r.label;
    verdict.className = "verdict verdict-" + r.label;
    document.getElementById("verdict-text").textContent = texts[r.label] || "";
    document.getElementById("score-text").textContent = Number(r.score).toFixed(3);
    document.getElementById("score-meter").value = r.score;
    const body = document.querySelector("#experts tbody");
    body.replaceChildren();
    Object.entries(r.experts).forEach(([name, p]) => {
      const tr = document.createElement("tr");
      const a = document.createElement("td"); a.textContent = name;
      const b = document.createElement("td"); b.textContent = Number(p).toFixed(3);
      tr.append(a, b); body.append(tr);
    });
    document.getElementById("model").textContent = r.model;
    document.getElementById("sha256").textContent = r.sha256;
    const link = document.getElementById("report-link");
    link.href = r.report_png;
    link.download = "dfx-report-" + r.sha256.slice(0, 12) + ".png";
    const fb = document.getElementById("faces-box");
    if (r.faces === null || r.faces === undefined) {
      fb.hidden = true;
    } else {
      const fbody = document.querySelector("#faces tbody");
      fbody.replaceChildren();
      r.faces.forEach((f, i) => {
        const tr = document.createElement("tr");
        const a = document.createElement("td"); a.textContent = String(i + 1);
        const b = document.createElement("td"); b.textContent = Number(f.score).toFixed(3);
        const c = document.createElement("td"); c.textContent = f.label; c.className = "verdict-" + f.label;
        tr.append(a, b, c); fbody.append(tr);
      });
      document.getElementById("faces-summary").textContent = r.faces.length
        ? r.faces.length + " face(s); the score is the highest of the whole image (" +
          Number(r.whole_score).toFixed(3) + ") and each face."
        : "No face found: the whole image was scored.";
      const fi = document.getElementById("faces-image");
      if (r.faces_png) { fi.src = r.faces_png; fi.hidden = false; } else { fi.hidden = true; }
      fb.hidden = false;
    }
    const hm = document.getElementById("heatmap-box");
    if (r.heatmap) { document.getElementById("heatmap").src = r.heatmap; hm.hidden = false; } else { hm.hidden = true; }
    result.hidden = false;
    status.textContent = "Checked in " + Math.round(r.elapsed_ms) + " ms.";
    document.getElementById("verdict").focus && result.scrollIntoView({ behavior: "smooth", block: "start" });
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!input.files.length) { fail("Choose an image file first."); return; }
    button.disabled = true;
    status.textContent = "Checking the image…";
    try {
      const resp = await fetch(form.action, { method: "POST", body: new FormData(form),
                                              headers: { Accept: "application/json" } });
      let data = null;
      try { data = await resp.json(); } catch (_) { data = null; }
      if (!resp.ok || !data || data.error) {
        fail(data && data.error ? data.error.message : "The site answered " + resp.status + ".");
      } else {
        render(data);
      }
    } catch (err) {
      fail("The site cannot be reached. Check your connection and try again.");
    } finally {
      button.disabled = false;
    }
  });
})();
