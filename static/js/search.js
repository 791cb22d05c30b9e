// Precedent search page: what htmx attributes alone cannot say. Plain JS, no dependencies.
(() => {
  "use strict";

  const SWAP_ERRORS = new Set([400, 404, 413, 422]);

  // The server answers bad input with 400/404 and the message in the partial: show it
  // where the results (or the comparison, or the feedback buttons) would have gone.
  document.addEventListener("htmx:beforeSwap", (event) => {
    const { xhr, target } = event.detail;
    if (!SWAP_ERRORS.has(xhr.status) || !target) return;
    if (target.closest("#search-results, #compare-slot, [data-feedback]") || target.matches("[data-feedback]")) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  // While the query is an uploaded image, a filter change sends the image again with
  // the new filters (the upload form includes the filter form); an image query uses
  // the filter form's own GET, whose URL can be shared.
  document.addEventListener("htmx:confirm", (event) => {
    const form = event.detail.elt;
    if (!form || form.id !== "search-form") return;
    const mode = document.querySelector("#search-results [data-query-mode]");
    const upload = document.getElementById("upload-form");
    const input = upload && upload.querySelector("[data-upload-input]");
    if (mode && mode.dataset.queryMode === "upload" && input && input.files.length) {
      event.preventDefault();
      window.htmx.trigger(upload, "submit");
    }
  });

  // The server does not keep an upload, so the browser shows its own copy beside the results.
  let previewUrl = null;
  function showUploadPreview(scope) {
    const img = scope.querySelector && scope.querySelector("[data-upload-preview]");
    const input = document.querySelector("[data-upload-input]");
    if (!img || !input || !input.files.length) return;
    const file = input.files[0];
    if (!/^image\/(png|jpeg)$/.test(file.type)) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    img.src = previewUrl;
    img.hidden = false;
    const placeholder = scope.querySelector("[data-upload-placeholder]");
    if (placeholder) placeholder.hidden = true;
  }

  // A verdict given in the comparison shows on the result's card too, and the reverse:
  // the reply that replaces the clicked form also replaces its twins. (Before the swap:
  // afterwards htmx reports the request on whatever ancestor is left.)
  document.addEventListener("htmx:beforeSwap", (event) => {
    const form = event.detail.elt;
    if (!form.matches || !form.matches("[data-feedback]") || event.detail.xhr.status !== 200) return;
    if (!form.dataset.key) return;
    document.querySelectorAll("[data-feedback]").forEach((other) => {
      if (other === form || other.dataset.key !== form.dataset.key) return;
      const template = document.createElement("template");
      template.innerHTML = event.detail.xhr.responseText.trim();
      const fresh = template.content.firstElementChild;
      if (!fresh) return;
      other.replaceWith(fresh);
      window.htmx.process(fresh);
    });
  });

  document.addEventListener("htmx:load", (event) => showUploadPreview(event.detail.elt));
})();
