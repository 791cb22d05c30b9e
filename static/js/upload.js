// Upload page: send DICOM files to POST /api/v1/instances/ a few per request, with one
// overall progress bar (bytes) and one result line per file from the API's answer.
(() => {
  "use strict";

  const form = document.getElementById("upload-form");
  if (!form) return;

  // Small batches keep each request short, so progress moves steadily and one failed
  // request loses little; two in flight keep the server busy without a long queue.
  const BATCH_FILES = 8;
  const BATCH_BYTES = 32 * 1024 * 1024;
  const PARALLEL = 2;

  const endpoint = form.dataset.endpoint;
  const maxBytes = Number(form.dataset.maxBytes) || Infinity;
  const dropzone = form.querySelector("[data-dropzone]");
  const status = document.querySelector("[data-status]");
  const progress = status.querySelector("[data-progress]");
  const progressText = status.querySelector("[data-progress-text]");
  const summary = status.querySelector("[data-summary]");
  const results = status.querySelector("[data-results]");

  const queue = [];
  const inflight = new Map(); // XMLHttpRequest → bytes of its files sent so far
  const counts = { stored: 0, duplicate: 0, rejected: 0, failed: 0 };
  let totalFiles = 0;
  let doneFiles = 0;
  let totalBytes = 0;
  let doneBytes = 0;
  let active = 0;

  function studyUrl(uid) {
    // The page renders the URL of study "0.0" (a UID in form): swap in the real one.
    return form.dataset.studyUrl.replace("/0.0/", "/" + encodeURIComponent(uid) + "/");
  }

  // The cookie is current even if another tab logged in again since this page loaded.
  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : form.querySelector("[name=csrfmiddlewaretoken]").value;
  }

  function addFiles(items) {
    if (!items.length) return;
    status.hidden = false;
    for (const item of items) {
      item.row = resultRow(item.path);
      totalFiles += 1;
      totalBytes += item.file.size;
      if (item.file.size > maxBytes) {
        // The server would refuse it (413) only after the browser sent it all.
        finish(item, { outcome: "rejected", error: `${formatBytes(item.file.size)} is over the upload limit of ${formatBytes(maxBytes)}` });
      } else {
        queue.push(item);
      }
    }
    render();
    pump();
  }

  function pump() {
    while (active < PARALLEL && queue.length) {
      const batch = takeBatch();
      active += 1;
      send(batch).then(() => {
        active -= 1;
        pump();
        render();
      });
    }
  }

  function takeBatch() {
    const batch = [queue.shift()];
    let bytes = batch[0].file.size;
    const limit = Math.min(BATCH_BYTES, maxBytes);
    while (queue.length && batch.length < BATCH_FILES && bytes + queue[0].file.size <= limit) {
      bytes += queue[0].file.size;
      batch.push(queue.shift());
    }
    return batch;
  }

  function send(batch) {
    return new Promise((resolve) => {
      const data = new FormData();
      batch.forEach((item) => data.append("file", item.file, item.file.name));
      const bytes = batch.reduce((sum, item) => sum + item.file.size, 0);
      const xhr = new XMLHttpRequest(); // fetch() cannot report upload progress
      xhr.open("POST", endpoint);
      xhr.responseType = "json";
      xhr.setRequestHeader("Accept", "application/json");
      xhr.setRequestHeader("X-CSRFToken", csrfToken());
      xhr.upload.onprogress = (event) => {
        if (!event.lengthComputable) return;
        inflight.set(xhr, (bytes * event.loaded) / event.total);
        render();
      };
      const done = (answer) => {
        inflight.delete(xhr);
        // Entries come back in the order the files were sent.
        batch.forEach((item, index) => finish(item, answer(index)));
        resolve();
      };
      xhr.onload = () => {
        const body = xhr.response;
        const entries = body && Array.isArray(body.results) ? body.results : null;
        const error = (body && body.error) || `the server answered ${xhr.status} ${xhr.statusText}`.trim();
        done((index) => (entries && entries[index]) || { outcome: "failed", error });
      };
      xhr.onerror = () => done(() => ({ outcome: "failed", error: "the upload did not reach the server" }));
      batch.forEach((item) => setOutcome(item.row, "uploading"));
      inflight.set(xhr, 0);
      xhr.send(data);
    });
  }

  function finish(item, result) {
    const outcome = result.outcome in counts ? result.outcome : "failed";
    counts[outcome] += 1;
    doneFiles += 1;
    doneBytes += item.file.size;
    setOutcome(item.row, outcome);
    const detail = item.row.querySelector(".detail");
    if (result.study_instance_uid) {
      const link = document.createElement("a");
      link.href = studyUrl(result.study_instance_uid);
      link.textContent = "Open study";
      detail.append(link);
    }
    if (result.error) {
      const text = document.createElement("span");
      text.className = "error-text";
      text.textContent = result.error;
      detail.append(text);
    }
  }

  function resultRow(path) {
    const row = document.createElement("li");
    row.innerHTML = '<span class="name"></span><span class="outcome"></span><span class="detail"></span>';
    row.querySelector(".name").textContent = path;
    setOutcome(row, "queued");
    results.append(row);
    return row;
  }

  function setOutcome(row, outcome) {
    row.className = `result ${outcome}`;
    row.querySelector(".outcome").textContent = outcome;
  }

  function render() {
    const sent = doneBytes + [...inflight.values()].reduce((sum, bytes) => sum + bytes, 0);
    progress.value = totalBytes ? sent / totalBytes : 1;
    progressText.textContent = `${doneFiles} of ${totalFiles} files · ${formatBytes(sent)} of ${formatBytes(totalBytes)}`;
    const parts = [`${counts.stored} stored`, `${counts.duplicate} duplicate`, `${counts.rejected} rejected`];
    if (counts.failed) parts.push(`${counts.failed} failed`);
    summary.textContent = parts.join(" · ");
  }

  function formatBytes(bytes) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(unit && value < 10 ? 1 : 0)} ${units[unit]}`;
  }

  // --- choosing files ------------------------------------------------------------------

  // Folders hold housekeeping files (.DS_Store, ._x) that are never DICOM.
  const isHidden = (path) => path.split("/").some((part) => part.startsWith("."));

  form.querySelectorAll("input[type=file]").forEach((input) => {
    input.addEventListener("change", () => {
      const items = [...input.files]
        .map((file) => ({ file, path: file.webkitRelativePath || file.name }))
        .filter((item) => !(item.file.webkitRelativePath && isHidden(item.path)));
      input.value = ""; // so choosing the same files again fires change again
      addFiles(items);
    });
  });

  // Drop: folders are walked with the File System entries API.
  async function dropped(dataTransfer) {
    // Entries must be taken now: the items are emptied once the drop event returns.
    const entries = [...dataTransfer.items]
      .filter((item) => item.kind === "file")
      .map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
    if (!entries.some(Boolean)) return [...dataTransfer.files].map((file) => ({ file, path: file.name }));
    const items = [];
    for (const entry of entries) if (entry) await walk(entry, items);
    return items;
  }

  async function walk(entry, items) {
    const path = entry.fullPath.replace(/^\//, "");
    if (entry.isFile) {
      if (isHidden(path)) return;
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      items.push({ file, path });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      // readEntries answers in chunks (about 100 at a time) until it answers none.
      for (;;) {
        const chunk = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!chunk.length) break;
        for (const child of chunk) await walk(child, items);
      }
    }
  }

  dropzone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropzone.classList.add("is-over");
  });
  dropzone.addEventListener("dragleave", (event) => {
    if (!dropzone.contains(event.relatedTarget)) dropzone.classList.remove("is-over");
  });
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("is-over");
    dropped(event.dataTransfer).then(addFiles, (error) => window.alert(`Cannot read the dropped files: ${error}`));
  });
  // A drop that misses the zone must not navigate away from the page (and the uploads).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  window.addEventListener("beforeunload", (event) => {
    if (active || queue.length) event.preventDefault();
  });
})();
