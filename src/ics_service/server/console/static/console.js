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
  // The review page, from the keyboard: each control carries the key that works it
  // (data-key); Enter outside a field accepts. In a field, keys type as usual; Escape
  // leaves it, and Enter in the name field does not send the form.
  function reviewKeys() {
    if (!document.querySelector("[data-review]")) return;
    document.addEventListener("keydown", function (ev) {
      if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
      const target = ev.target;
      if (target instanceof HTMLInputElement) {
        if (ev.key === "Escape") target.blur();
        if (ev.key === "Enter" && target.id === "reviewer") {
          ev.preventDefault();
          target.blur();
        }
        return;
      }
      const key = ev.key === "Enter" ? "a" : ev.key;
      const el = document.querySelector('[data-key="' + CSS.escape(key) + '"]');
      if (!el) return;
      ev.preventDefault();
      if (el instanceof HTMLInputElement) el.focus();
      else el.click();
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-progress-url]").forEach(watch);
    reviewKeys();
  });
})();
