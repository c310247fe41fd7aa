// The live view: every element with data-progress-url polls it while its execution runs
// and updates its bar, counts and status in place (no reload).
"use strict";
(function () {
  const POLL_MS = 1500;
  function update(el, doc) {
    for (const field of el.querySelectorAll("[data-field]")) {
      const name = field.dataset.field;
      if (name === "bar") {
        field.max = Math.max(doc.total, 1);
        field.value = doc.done;
        field.textContent = doc.done + " of " + doc.total;
      } else if (name === "status") {
        field.textContent = doc.status;
        field.className = "status " + doc.status;
      } else if (name === "done" || name === "total" || name in doc) {
        field.textContent = String(doc[name === "done" ? "done" : name]);
      }
    }
  }
  function watch(el) {
    const url = el.dataset.progressUrl;
    async function poll() {
      try {
        const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (!r.ok) return;
        const doc = await r.json();
        update(el, doc);
        if (doc.status !== "RUNNING") return;
      } catch (e) {
        // the server may be restarting: try again
      }
      setTimeout(poll, POLL_MS);
    }
    setTimeout(poll, POLL_MS);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-progress-url]").forEach(watch);
  });
})();
