// Small DOM helpers shared by the pages.

/** Create an element: el("li", {class: "x", text: "…"}, child, …). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const errorBox = () => document.getElementById("error");

/** Show an API error (its own message) in the alert banner. */
export function showError(err) {
  const box = errorBox();
  box.textContent = err && err.message ? err.message : String(err);
  if (err && err.code) box.dataset.code = err.code;
  box.hidden = false;
}

export function clearError() {
  const box = errorBox();
  box.hidden = true;
  box.textContent = "";
  delete box.dataset.code;
}

/** Run an async action for a form: busy button, errors shown, never an unhandled rejection. */
export async function guarded(button, action) {
  clearError();
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

export function fixed(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

/** Let a drop zone put a dropped file into its file input. */
/** "1 face", "3 faces": a count with its noun. */
export function count(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

export function dropZones(root = document) {
  root.querySelectorAll("[data-drop]").forEach((zone) => {
    const input = document.getElementById(zone.dataset.drop);
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer.files.length) {
        input.files = e.dataTransfer.files;
        input.dispatchEvent(new Event("change"));
      }
    });
  });
}

/** Save bytes or text as a file. */
export function download(name, data, type) {
  const url = URL.createObjectURL(new Blob([data], { type }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
