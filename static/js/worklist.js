// The worklist takes new arrivals in without losing the reader's place.
//
// The polling bar (#worklist-changes, swapped on its own every few seconds) announces
// studies that arrived or were flagged since the list was drawn. While the reader is at
// the top of the first page and has not touched the page for a few seconds, the list
// refreshes by itself: the new studies appear in their sections, marked. Otherwise the
// bar waits for "Show", so rows never move under a reader who is using the list; "Show"
// keeps the first row in view where it was and marks the arrivals.
(function () {
  "use strict";

  const IDLE_MS = 5000;
  let lastUse = Date.now();
  let pending = null; // what the list held, and where, when a refresh was asked for

  for (const type of ["pointermove", "pointerdown", "keydown", "wheel", "touchstart"]) {
    document.addEventListener(type, () => { lastUse = Date.now(); }, { passive: true, capture: true });
  }

  function rows() {
    return Array.from(document.querySelectorAll("#worklist-results tr.worklist-row"));
  }

  function remember(keepPlace) {
    const all = rows();
    const first = all.find((row) => row.getBoundingClientRect().bottom > 0);
    pending = {
      known: new Set(all.map((row) => row.id)),
      anchor: keepPlace && first ? { id: first.id, top: first.getBoundingClientRect().top } : null,
    };
  }

  // "Show", clicked by the reader (the programmatic click below remembers first).
  document.addEventListener("click", (event) => {
    if (event.isTrusted && event.target.closest("#worklist-changes [data-keep-place]")) remember(true);
  }, true);

  document.body.addEventListener("htmx:afterSwap", (event) => {
    if (!pending || event.detail.target.id !== "worklist-results") return;
    const { known, anchor } = pending;
    pending = null;
    for (const row of rows()) {
      if (!known.has(row.id)) row.classList.add("arrived");
    }
    const row = anchor && document.getElementById(anchor.id);
    if (row) window.scrollBy(0, row.getBoundingClientRect().top - anchor.top);
  });

  function readerAway() {
    const table = document.querySelector("#worklist-results table");
    const atTop = !table || table.getBoundingClientRect().top >= 0;
    const page = new URLSearchParams(window.location.search).get("page");
    const focused = document.activeElement && document.activeElement.closest("#worklist-results, #worklist-filters");
    return atTop && (page === null || page === "1") && !focused && Date.now() - lastUse >= IDLE_MS;
  }

  htmx.onLoad((element) => {
    const bar = element.id === "worklist-changes" ? element : null;
    const show = bar && bar.querySelector("[data-keep-place]");
    if (show && readerAway()) {
      remember(false); // at the top: the arrivals come into view above the first row
      show.click();
    }
  });
})();
