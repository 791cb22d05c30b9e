// Precedent comparison: two viewers (static/js/viewer.js) side by side, with one shared
// toolbar. While "Linked" is on, window/level, zoom and pan on either image apply to the
// other. Plain JS, no dependencies.
(() => {
  "use strict";

  const linked = new WeakSet();

  function setUp(root) {
    if (linked.has(root) || !window.PrecedentViewer) return;
    linked.add(root);
    window.PrecedentViewer.init(root);
    const viewers = [...root.querySelectorAll("[data-viewer]")]
      .map((el) => window.PrecedentViewer.get(el))
      .filter(Boolean);
    const linkToggle = root.querySelector("[data-compare-link]");
    let syncing = false;

    const isLinked = () => !linkToggle || linkToggle.checked;
    const others = (viewer) => viewers.filter((other) => other !== viewer);
    // Applying a change to the other viewer makes it report the change too: ignore that echo.
    const sync = (fn) => {
      if (syncing || !isLinked()) return;
      syncing = true;
      try {
        fn();
      } finally {
        syncing = false;
      }
    };

    // Zoom and pan: the same zoom (relative to fit), and the same relative point of the
    // image at the centre of each pane, so images of different sizes stay in register.
    function matchView(target, source) {
      if (!source.baseWidth || !target.baseWidth || !target.layer) return;
      const u = (source.stage.clientWidth / 2 - source.layer.offsetLeft - source.tx) / (source.scale * source.baseWidth);
      const v = (source.stage.clientHeight / 2 - source.layer.offsetTop - source.ty) / (source.scale * source.baseHeight);
      target.scale = source.scale;
      target.tx = target.stage.clientWidth / 2 - target.layer.offsetLeft - u * target.scale * target.baseWidth;
      target.ty = target.stage.clientHeight / 2 - target.layer.offsetTop - v * target.scale * target.baseHeight;
      target.applyTransform();
    }

    root.addEventListener("viewer:view", (event) => {
      const source = event.detail.viewer;
      sync(() => others(source).forEach((target) => matchView(target, source)));
    });

    // Window/level: the same change, measured in window widths, so two images with
    // different grey ranges (an 8-bit film, a 16-bit DICOM) move together; images with
    // the same window get the same values.
    root.addEventListener("viewer:window", (event) => {
      const { viewer: source, drag, start, window: next, final } = event.detail;
      if (!start || !next) return;
      sync(() =>
        others(source).forEach((target) => {
          if (!target.applied) return; // a VOI LUT or colour image has no window to move
          if (!target.linkedDrag || target.linkedDrag.drag !== drag) {
            target.linkedDrag = { drag, base: target.custom || target.applied };
          }
          const base = target.linkedDrag.base;
          target.custom = {
            center: base.center + ((next.center - start.center) / start.width) * base.width,
            width: Math.max(1, base.width * (next.width / start.width)),
          };
          target.showWindow(target.custom);
          if (final) target.load();
          else target.previewWindow(target.custom);
        }),
      );
    });

    const on = (selector, type, fn) => {
      const el = root.querySelector(selector);
      if (el) el.addEventListener(type, fn);
      return el;
    };

    on("[data-compare-preset]", "change", (event) => {
      viewers.forEach((viewer) => {
        viewer.preset = event.target.value;
        viewer.custom = null;
        viewer.load();
      });
    });
    root.querySelectorAll("[data-compare-tool]").forEach((button) => {
      button.addEventListener("click", () => {
        viewers.forEach((viewer) => viewer.setTool(button.dataset.compareTool));
        root.querySelectorAll("[data-compare-tool]").forEach((other) => {
          other.setAttribute("aria-pressed", String(other === button));
        });
      });
    });
    const act = (action) => {
      // With the panes unlinked the buttons act on both, each on its own.
      const targets = isLinked() ? viewers.slice(0, 1) : viewers;
      if (action === "zoom-in") targets.forEach((viewer) => viewer.zoomBy(1.25));
      if (action === "zoom-out") targets.forEach((viewer) => viewer.zoomBy(0.8));
      if (action === "reset") viewers.forEach((viewer) => viewer.reset());
    };
    root.querySelectorAll("[data-compare-action]").forEach((button) => {
      button.addEventListener("click", () => act(button.dataset.compareAction));
    });
    on("[data-compare-findings]", "change", (event) => {
      root.querySelectorAll("[data-overlay]").forEach((overlay) => {
        overlay.style.display = event.target.checked ? "" : "none";
      });
    });
    on("[data-compare-link]", "change", (event) => {
      if (event.target.checked && viewers.length > 1) sync(() => matchView(viewers[1], viewers[0]));
    });
    on("[data-compare-close]", "click", () => close(root));
    root.querySelectorAll("[data-compare-step]").forEach((button) => {
      const next = neighbour(root, Number(button.dataset.compareStep));
      button.disabled = !next;
      button.addEventListener("click", () => step(root, Number(button.dataset.compareStep)));
    });
    root.focus({ preventScroll: true });
  }

  function close(root) {
    root.querySelectorAll("[data-viewer]").forEach((el) => {
      const viewer = window.PrecedentViewer && window.PrecedentViewer.get(el);
      if (viewer) viewer.dispose();
    });
    const slot = root.parentElement;
    root.remove();
    document.body.classList.remove("has-compare");
    if (slot) {
      // Back to the result that was opened, so the reader can go on down the list.
      const opener = slot.openedFrom;
      if (opener && document.body.contains(opener)) opener.focus({ preventScroll: false });
    }
  }

  // The result card before or after the one this comparison was opened from.
  function neighbour(root, offset) {
    const slot = root.parentElement;
    const card = slot && slot.openedFrom && slot.openedFrom.closest && slot.openedFrom.closest("[data-hit]");
    if (!card || !document.body.contains(card)) return null;
    const sibling = offset < 0 ? card.previousElementSibling : card.nextElementSibling;
    return sibling && sibling.matches("[data-hit]") ? sibling.querySelector(".hit-image") : null;
  }

  function step(root, offset) {
    const link = neighbour(root, offset);
    if (link) link.click(); // its hx-get replaces this comparison in the slot
  }

  function init(scope) {
    const roots =
      scope.matches && scope.matches("[data-compare]") ? [scope] : scope.querySelectorAll("[data-compare]");
    roots.forEach((root) => {
      if (root.classList.contains("compare-overlay")) document.body.classList.add("has-compare");
      setUp(root);
    });
  }

  // Remember which result opened the comparison, to return focus to it.
  document.addEventListener("htmx:beforeRequest", (event) => {
    const slot = document.getElementById("compare-slot");
    if (slot && event.detail.target === slot) slot.openedFrom = event.detail.elt;
  });

  document.addEventListener("keydown", (event) => {
    const root = document.querySelector("#compare-slot [data-compare]");
    if (!root || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.target.matches && event.target.matches("input, select, textarea")) return;
    if (event.key === "Escape") {
      event.preventDefault();
      close(root);
    } else if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
      event.preventDefault();
      step(root, event.key === "ArrowLeft" ? -1 : 1);
    }
  });

  document.addEventListener("htmx:load", (event) => init(event.detail.elt));
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", () => init(document));
  } else {
    init(document);
  }
})();
