// Precedent viewer: one frame rendered by the server as PNG, shown with window/level,
// zoom, pan, frame scrolling, a ground-truth overlay and the models' detection boxes and
// segmentation masks (from the overlays API). Plain JS, no dependencies.
(() => {
  "use strict";

  const MIN_SCALE = 0.1;
  const MAX_SCALE = 40;
  const viewers = new WeakMap();

  class Viewer {
    constructor(root) {
      this.root = root;
      this.stage = root.querySelector("[data-stage]");
      this.layer = root.querySelector("[data-layer]");
      this.image = root.querySelector("[data-image]");
      this.overlay = root.querySelector("[data-overlay]");
      this.message = root.querySelector("[data-message]");
      this.presetSelect = root.querySelector("[data-preset]");
      this.slider = root.querySelector("[data-frame-slider]");
      this.frameReadout = root.querySelector("[data-frame-readout]");
      this.wlReadout = root.querySelector("[data-wl-readout]");
      this.zoomReadout = root.querySelector("[data-zoom-readout]");
      // Each viewer brings its own filter, so two viewers on one page (the search
      // comparison) preview their own windows.
      const filter = root.querySelector("filter[id]");
      this.filterId = filter ? filter.id : "viewer-wl-filter";
      this.filterFuncs = filter ? filter.querySelectorAll("feComponentTransfer > *") : [];
      // The Box tool: a rectangle drawn on the image, in image pixels, for "Find similar lesions".
      this.selectionRect = root.querySelector("[data-selection-rect]");
      this.findLesions = root.querySelector("[data-find-lesions]");
      this.selection = null;
      // Model output, drawn in image pixels like the findings so it follows zoom and pan.
      this.overlaysUrl = root.dataset.overlaysUrl;
      this.detections = root.querySelector("[data-detections]");
      this.masks = root.querySelector("[data-masks]");

      this.previewUrl = root.dataset.previewUrl;
      this.frames = Number(root.dataset.frames) || 1;
      this.rows = Number(root.dataset.rows) || 0;
      this.columns = Number(root.dataset.columns) || 0;
      this.size = Number(root.dataset.size) || 2048;
      // MONOCHROME1 is inverted after windowing, which flips the drag preview's map.
      this.inverted = root.dataset.photometric === "MONOCHROME1";
      this.grey = root.dataset.photometric.startsWith("MONOCHROME");

      // A page may open another frame first (the search compares the frame it embedded).
      this.frame = Math.min(this.frames, Math.max(1, Math.round(Number(root.dataset.frame)) || 1));
      this.preset = this.presetSelect ? this.presetSelect.value : "default";
      this.custom = null; // {center, width} chosen by dragging; null follows the preset
      this.applied = null; // the window the displayed image was rendered with
      this.scale = 1;
      this.tx = 0;
      this.ty = 0;
      this.tool = "wl";
      this.drag = null;
      this.request = null; // AbortController of the image being fetched
      this.objectUrl = null;

      this.bind();
      this.fit();
      this.load();
      this.loadOverlays();
    }

    bind() {
      const on = (el, type, fn, opts) => el && el.addEventListener(type, fn, opts);
      on(this.presetSelect, "change", () => {
        this.preset = this.presetSelect.value;
        this.custom = null;
        this.load();
      });
      on(this.slider, "input", () => this.setFrame(Number(this.slider.value)));
      on(this.root.querySelector("[data-findings-toggle]"), "change", (e) => {
        // An <svg> has no `hidden` property (that is HTMLElement's): hide it with CSS.
        this.overlay.style.display = e.target.checked ? "" : "none";
      });
      on(this.root.querySelector("[data-detections-toggle]"), "change", (e) => {
        if (this.detections) this.detections.style.display = e.target.checked ? "" : "none";
      });
      on(this.root.querySelector("[data-masks-toggle]"), "change", (e) => {
        if (this.masks) this.masks.hidden = !e.target.checked;
      });
      this.root.querySelectorAll("[data-tool]").forEach((button) =>
        on(button, "click", () => this.setTool(button.dataset.tool)),
      );
      on(this.root.querySelector('[data-action="reset"]'), "click", () => this.reset());
      on(this.root.querySelector('[data-action="zoom-in"]'), "click", () => this.zoomBy(1.25));
      on(this.root.querySelector('[data-action="zoom-out"]'), "click", () => this.zoomBy(0.8));

      on(this.stage, "pointerdown", (e) => this.pointerDown(e));
      on(this.stage, "pointermove", (e) => this.pointerMove(e));
      on(this.stage, "pointerup", (e) => this.pointerUp(e));
      on(this.stage, "pointercancel", (e) => this.pointerUp(e));
      // Not passive: the wheel must zoom the image, not scroll the page.
      on(this.stage, "wheel", (e) => this.wheel(e), { passive: false });
      on(this.root, "keydown", (e) => this.key(e));

      if (this.stage) {
        this.resizeObserver = new ResizeObserver(() => this.fit());
        this.resizeObserver.observe(this.stage);
      }
      // htmx fires this on elements it removes: stop watching and free the image.
      on(this.root, "htmx:beforeCleanupElement", (e) => {
        if (e.target === this.root) this.dispose();
      });
    }

    dispose() {
      if (this.resizeObserver) this.resizeObserver.disconnect();
      if (this.request) this.request.abort();
      if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
    }

    // --- image loading -------------------------------------------------------------

    url() {
      const params = new URLSearchParams({ frame: this.frame, preset: this.preset, size: this.size });
      if (this.custom) {
        params.set("wc", round(this.custom.center));
        params.set("ww", round(this.custom.width));
      }
      return `${this.previewUrl}?${params}`;
    }

    async load() {
      if (!this.image) return;
      // Frames and windows can change faster than the server renders: only the
      // latest request may reach the screen.
      if (this.request) this.request.abort();
      const controller = new AbortController();
      this.request = controller;
      this.root.classList.add("is-loading");
      try {
        const response = await fetch(this.url(), { credentials: "same-origin", signal: controller.signal });
        if (!response.ok) throw new Error(await errorMessage(response));
        const blob = await response.blob();
        const objectUrl = URL.createObjectURL(blob);
        // Decode off-screen first, so the old image (and its drag preview) stays
        // until the new one can replace it in one paint.
        const probe = new Image();
        probe.src = objectUrl;
        await probe.decode();
        if (controller.signal.aborted) {
          URL.revokeObjectURL(objectUrl);
          return;
        }
        this.image.src = objectUrl;
        this.image.style.filter = "";
        if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
        this.objectUrl = objectUrl;
        this.applied = windowFrom(response.headers);
        this.showWindow(this.applied);
        this.showMessage("");
        if (!this.rows || !this.columns) {
          this.rows = probe.naturalHeight;
          this.columns = probe.naturalWidth;
          this.fit();
        }
      } catch (error) {
        if (error.name === "AbortError") return;
        // Keep showing what is on screen: the image and the window it was rendered with.
        this.image.style.filter = "";
        this.showWindow(this.applied);
        this.showMessage(error.message || String(error));
      } finally {
        if (this.request === controller) {
          this.request = null;
          this.root.classList.remove("is-loading");
        }
      }
    }

    // --- model overlays: detector boxes and segmentation masks ------------------------

    async loadOverlays() {
      if (!this.overlaysUrl || !this.layer || (!this.detections && !this.masks)) return;
      let data;
      try {
        const response = await fetch(this.overlaysUrl, { credentials: "same-origin" });
        if (!response.ok) return; // no overlays is not an error worth a message over the image
        data = await response.json();
      } catch {
        return;
      }
      const boxes = (data.boxes || []).filter((box) => String(box.source).startsWith("model:"));
      this.drawDetections(boxes);
      this.drawMasks(data.masks || []);
    }

    drawDetections(boxes) {
      if (!this.detections) return;
      const ns = "http://www.w3.org/2000/svg";
      this.detections.replaceChildren();
      boxes.forEach((box) => {
        const group = document.createElementNS(ns, "g");
        group.setAttribute("class", "detection");
        const rect = document.createElementNS(ns, "rect");
        rect.setAttribute("x", String(box.x0));
        rect.setAttribute("y", String(box.y0));
        rect.setAttribute("width", String(box.x1 - box.x0));
        rect.setAttribute("height", String(box.y1 - box.y0));
        rect.style.stroke = box.colour;
        const text = document.createElementNS(ns, "text");
        text.setAttribute("x", String(box.x0));
        text.setAttribute("y", String(box.y1));
        text.setAttribute("dy", "1.1em");
        text.style.fill = box.colour;
        text.textContent = `${box.label} ${Number(box.score).toFixed(2)}`;
        const title = document.createElementNS(ns, "title");
        title.textContent = `${box.label}, score ${Number(box.score).toFixed(3)} (${box.source})`;
        group.append(rect, text, title);
        this.detections.append(group);
      });
      const label = this.root.querySelector("[data-detections-label]");
      const text = this.root.querySelector("[data-detections-text]");
      if (text) text.textContent = `Detections (${boxes.length})`;
      if (label) label.hidden = boxes.length === 0;
    }

    drawMasks(masks) {
      if (!this.masks) return;
      this.masks.replaceChildren();
      masks.forEach((mask) => {
        const img = document.createElement("img");
        img.src = mask.url;
        img.alt = "";
        img.draggable = false;
        img.dataset.label = mask.label;
        img.title = `${mask.label} (${mask.source})`;
        this.masks.append(img);
      });
      const label = this.root.querySelector("[data-masks-label]");
      const text = this.root.querySelector("[data-masks-text]");
      if (text) text.textContent = `Masks (${masks.map((m) => m.label).join(", ")})`;
      if (label) label.hidden = masks.length === 0;
    }

    showMessage(text) {
      clearTimeout(this.hintTimer);
      if (!this.message) return;
      this.message.textContent = text;
      this.message.hidden = !text;
    }

    // A passing remark, not an error: it goes away by itself.
    hint(text) {
      this.showMessage(text);
      clearTimeout(this.hintTimer);
      this.hintTimer = setTimeout(() => this.showMessage(""), 4000);
    }

    showWindow(window) {
      if (!this.wlReadout) return;
      if (window) this.wlReadout.textContent = `C ${round(window.center)} W ${round(window.width)}`;
      else this.wlReadout.textContent = this.grey ? "VOI LUT from the file" : "Colour: no window";
    }

    setFrame(frame) {
      const next = Math.min(this.frames, Math.max(1, frame));
      if (next === this.frame) return;
      this.frame = next;
      if (this.slider) this.slider.value = String(next);
      if (this.frameReadout) this.frameReadout.textContent = `${next} / ${this.frames}`;
      this.load();
    }

    setTool(tool) {
      this.tool = tool;
      if (this.stage) this.stage.dataset.tool = tool;
      // Buttons only: the stage carries data-tool too (for its cursor).
      this.root.querySelectorAll("button[data-tool]").forEach((button) => {
        button.setAttribute("aria-pressed", String(button.dataset.tool === tool));
      });
    }

    reset() {
      this.scale = 1;
      this.tx = 0;
      this.ty = 0;
      this.applyTransform();
      if (this.custom) {
        this.custom = null;
        this.load();
      }
    }

    // --- geometry: the layer is fitted to the stage, then zoomed and panned ----------

    fit() {
      if (!this.layer || !this.columns || !this.rows) return;
      const width = this.stage.clientWidth;
      const height = this.stage.clientHeight;
      const fitScale = Math.min(width / this.columns, height / this.rows);
      this.baseWidth = this.columns * fitScale;
      this.baseHeight = this.rows * fitScale;
      this.layer.style.width = `${this.baseWidth}px`;
      this.layer.style.height = `${this.baseHeight}px`;
      this.layer.style.left = `${(width - this.baseWidth) / 2}px`;
      this.layer.style.top = `${(height - this.baseHeight) / 2}px`;
      this.applyTransform();
    }

    applyTransform() {
      if (!this.layer) return;
      this.layer.style.transform = `translate(${this.tx}px, ${this.ty}px) scale(${this.scale})`;
      if (this.baseWidth) this.layer.style.setProperty("--px", `${this.columns / (this.baseWidth * this.scale)}px`);
      if (this.zoomReadout) this.zoomReadout.textContent = `${Math.round(this.scale * 100)}%`;
      this.emit("view");
    }

    // Tells listeners (the search comparison links two viewers) what changed.
    emit(name, detail = {}) {
      this.root.dispatchEvent(new CustomEvent(`viewer:${name}`, { bubbles: true, detail: { viewer: this, ...detail } }));
    }

    // Zoom keeping the image point under (x, y) in stage pixels where it is.
    zoomBy(factor, x = this.stage.clientWidth / 2, y = this.stage.clientHeight / 2) {
      const scale = Math.min(MAX_SCALE, Math.max(MIN_SCALE, this.scale * factor));
      const originX = this.layer.offsetLeft;
      const originY = this.layer.offsetTop;
      const localX = (x - originX - this.tx) / this.scale;
      const localY = (y - originY - this.ty) / this.scale;
      this.tx = x - originX - localX * scale;
      this.ty = y - originY - localY * scale;
      this.scale = scale;
      this.applyTransform();
    }

    // --- mouse ---------------------------------------------------------------------

    pointerDown(event) {
      if (!this.layer || (event.button !== 0 && event.button !== 1)) return;
      const pan = event.button === 1 || event.shiftKey || this.tool === "pan";
      if (!pan && this.tool === "box") {
        this.startBox(event);
        return;
      }
      if (!pan && !this.applied) {
        this.hint(
          this.grey
            ? "The file's VOI LUT has no window to adjust: choose Auto or Full, then drag."
            : "Colour images have no window to adjust.",
        );
        return;
      }
      event.preventDefault();
      this.stage.setPointerCapture(event.pointerId);
      this.root.focus({ preventScroll: true });
      this.drag = {
        mode: pan ? "pan" : "wl",
        x: event.clientX,
        y: event.clientY,
        tx: this.tx,
        ty: this.ty,
        window: this.custom || this.applied,
        moved: false,
      };
      this.stage.classList.add(pan ? "is-panning" : "is-windowing");
    }

    pointerMove(event) {
      const drag = this.drag;
      if (!drag) return;
      const dx = event.clientX - drag.x;
      const dy = event.clientY - drag.y;
      drag.moved = drag.moved || Math.abs(dx) + Math.abs(dy) > 2;
      if (!drag.moved) return;
      if (drag.mode === "box") {
        drag.end = this.imagePoint(event);
        this.drawSelection(boxBetween(drag.start, drag.end));
        return;
      }
      if (drag.mode === "pan") {
        this.tx = drag.tx + dx;
        this.ty = drag.ty + dy;
        this.applyTransform();
        return;
      }
      // Sensitivity follows the starting width, so a narrow brain window and a wide
      // lung window both take about one stage width of travel to double.
      const step = Math.max(drag.window.width, 2) / Math.max(this.stage.clientWidth, 200);
      this.custom = {
        center: drag.window.center + dy * step,
        width: Math.max(1, drag.window.width + dx * step),
      };
      this.showWindow(this.custom);
      this.previewWindow(this.custom);
      this.emit("window", { drag, start: drag.window, window: this.custom, final: false });
    }

    pointerUp(event) {
      const drag = this.drag;
      if (!drag) return;
      this.drag = null;
      if (this.stage.hasPointerCapture(event.pointerId)) this.stage.releasePointerCapture(event.pointerId);
      this.stage.classList.remove("is-panning", "is-windowing");
      if (drag.mode === "box") {
        const box = drag.moved && drag.end ? boxBetween(drag.start, drag.end) : null;
        // A click, or a box under one image pixel, clears the selection.
        this.setSelection(box && box[2] - box[0] >= 1 && box[3] - box[1] >= 1 ? box : null);
        return;
      }
      if (drag.mode === "wl" && drag.moved) {
        this.load();
        this.emit("window", { drag, start: drag.window, window: this.custom, final: true });
      }
    }

    // --- the Box tool ----------------------------------------------------------------

    startBox(event) {
      if (!this.selectionRect || !this.columns || !this.rows) return;
      event.preventDefault();
      this.stage.setPointerCapture(event.pointerId);
      this.root.focus({ preventScroll: true });
      const start = this.imagePoint(event);
      this.drag = { mode: "box", x: event.clientX, y: event.clientY, start, end: null, moved: false };
    }

    // The image pixel under the pointer, clamped to the image. The layer is only
    // translated and scaled, so its on-screen box maps linearly onto the image.
    imagePoint(event) {
      const rect = this.layer.getBoundingClientRect();
      const x = ((event.clientX - rect.left) / rect.width) * this.columns;
      const y = ((event.clientY - rect.top) / rect.height) * this.rows;
      return { x: Math.min(this.columns, Math.max(0, x)), y: Math.min(this.rows, Math.max(0, y)) };
    }

    drawSelection(box) {
      if (!this.selectionRect) return;
      if (!box) {
        this.selectionRect.setAttribute("display", "none");
        return;
      }
      const [x0, y0, x1, y1] = box;
      this.selectionRect.setAttribute("x", String(x0));
      this.selectionRect.setAttribute("y", String(y0));
      this.selectionRect.setAttribute("width", String(x1 - x0));
      this.selectionRect.setAttribute("height", String(y1 - y0));
      this.selectionRect.setAttribute("display", "inline");
    }

    setSelection(box) {
      this.selection = box;
      this.drawSelection(box);
      const link = this.findLesions;
      if (link) {
        if (box) {
          const url = new URL(link.dataset.href, window.location.href);
          url.searchParams.set("box", box.join(","));
          link.href = url.pathname + url.search;
          link.removeAttribute("aria-disabled");
          link.title = `Find lesions similar to the box ${box[0]},${box[1]}–${box[2]},${box[3]} (image pixels)`;
        } else {
          link.removeAttribute("href");
          link.setAttribute("aria-disabled", "true");
          link.title = "Draw a box on the image with the Box tool first";
        }
      }
      this.emit("selection", { box });
    }

    // Instant feedback while dragging: map the displayed grey values linearly from the
    // applied window to the new one. Values clipped by the applied window cannot come
    // back; the exact render on release restores them.
    previewWindow(target) {
      const from = this.applied;
      if (!from || !this.filterFuncs.length) return;
      let slope = from.width / target.width;
      let intercept = (from.center - from.width / 2 - target.center + target.width / 2) / target.width;
      if (this.inverted) intercept = 1 - slope - intercept;
      this.filterFuncs.forEach((func) => {
        func.setAttribute("slope", String(slope));
        func.setAttribute("intercept", String(intercept));
      });
      this.image.style.filter = `url(#${this.filterId})`;
    }

    wheel(event) {
      if (!this.layer) return;
      event.preventDefault();
      const delta = event.deltaY || event.deltaX;
      if ((event.shiftKey || event.ctrlKey) && this.frames > 1) {
        this.setFrame(this.frame + Math.sign(delta));
        return;
      }
      const rect = this.stage.getBoundingClientRect();
      this.zoomBy(Math.exp(-delta * 0.0015), event.clientX - rect.left, event.clientY - rect.top);
    }

    key(event) {
      if (!this.layer || event.target.matches("input, select, textarea") || event.altKey || event.metaKey) return;
      const actions = {
        ArrowUp: () => this.setFrame(this.frame - 1),
        ArrowDown: () => this.setFrame(this.frame + 1),
        PageUp: () => this.setFrame(this.frame - 10),
        PageDown: () => this.setFrame(this.frame + 10),
        Home: () => this.setFrame(1),
        End: () => this.setFrame(this.frames),
        "+": () => this.zoomBy(1.25),
        "=": () => this.zoomBy(1.25),
        "-": () => this.zoomBy(0.8),
        r: () => this.reset(),
      };
      if (this.selection) actions.Escape = () => this.setSelection(null);
      const action = actions[event.key];
      if (!action) return;
      event.preventDefault();
      action();
    }
  }

  // Whole image pixels that cover the dragged rectangle, corners in either order.
  function boxBetween(a, b) {
    return [
      Math.floor(Math.min(a.x, b.x)),
      Math.floor(Math.min(a.y, b.y)),
      Math.ceil(Math.max(a.x, b.x)),
      Math.ceil(Math.max(a.y, b.y)),
    ];
  }

  function round(value) {
    return Math.abs(value) >= 100 ? Math.round(value) : Math.round(value * 10) / 10;
  }

  function windowFrom(headers) {
    const center = parseFloat(headers.get("X-Window-Center"));
    const width = parseFloat(headers.get("X-Window-Width"));
    return Number.isFinite(center) && Number.isFinite(width) ? { center, width } : null;
  }

  // The API answers errors as JSON {"error": "..."}; anything else gets its status line.
  async function errorMessage(response) {
    if (response.status === 401 || response.status === 403) return "Your session has ended: log in again.";
    try {
      const body = await response.json();
      if (body && body.error) return body.error;
    } catch {
      // not JSON: fall through to the status line
    }
    return `The server answered ${response.status} ${response.statusText}`.trim();
  }

  function init(scope) {
    const roots = scope.matches && scope.matches("[data-viewer]") ? [scope] : scope.querySelectorAll("[data-viewer]");
    roots.forEach((root) => {
      if (!viewers.has(root)) viewers.set(root, new Viewer(root));
    });
  }

  // Mark the chosen thumbnail at once; htmx swaps only the viewer, not the list.
  document.addEventListener("click", (event) => {
    const thumb = event.target.closest && event.target.closest("[data-thumb]");
    if (!thumb || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
    document.querySelectorAll("[data-thumb][aria-current]").forEach((el) => el.removeAttribute("aria-current"));
    thumb.setAttribute("aria-current", "true");
  });

  // A thumbnail that cannot be rendered says so instead of showing a broken image.
  document.addEventListener(
    "error",
    (event) => {
      const thumb = event.target.closest && event.target.closest("[data-thumb]");
      if (thumb && event.target.tagName === "IMG") thumb.classList.add("failed");
    },
    true,
  );

  // For pages that drive viewers from outside (static/js/compare.js).
  window.PrecedentViewer = { init, get: (root) => viewers.get(root) };

  document.addEventListener("htmx:load", (event) => init(event.detail.elt));
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", () => init(document));
  } else {
    init(document);
  }
})();
