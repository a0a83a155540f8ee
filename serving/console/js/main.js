// The console's entry: pages by URL hash, the key dialog, the synthetic-weights banner.
import { call, getKey, onKeyNeeded, onResponse, setKey } from "./api.js";
import * as compare from "./compare.js";
import * as galleries from "./galleries.js";
import * as inspect from "./inspect.js";
import * as status from "./status.js";
import { clearError, dropZones } from "./ui.js";

const PAGES = { inspect, compare, galleries, status };

function route() {
  const name = (location.hash || "#inspect").slice(1);
  const page = PAGES[name] ? name : "inspect";
  for (const key of Object.keys(PAGES)) {
    document.getElementById("page-" + key).hidden = key !== page;
    const link = document.querySelector(`nav a[data-page="${key}"]`);
    if (key === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (status.hide && page !== "status") status.hide();
  clearError();
  document.title = `AdaFace console: ${page}`;
  if (PAGES[page].show) PAGES[page].show();
  return page;
}

/** Open the key dialog; resolves true when the user gave a key. */
function askForKey(reason) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent =
    (reason ? reason + ". " : "") + "The key is kept for this browser tab only.";
  input.value = getKey();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue === "save" && input.value.trim()) {
        setKey(input.value.trim());
        resolve(true);
      } else {
        if (dialog.returnValue === "clear") setKey("");
        resolve(false);
      }
    }, { once: true });
    dialog.showModal();
    input.focus();
  });
}

function watchWeights(response) {
  if (response.headers.get("X-AdaFace-Weights") === "synthetic") {
    document.getElementById("synthetic-banner").hidden = false;
  }
}

function start() {
  onKeyNeeded(askForKey);
  onResponse(watchWeights);
  document.getElementById("key-button").addEventListener("click", () => askForKey(""));
  inspect.setUp();
  compare.setUp();
  galleries.setUp();
  dropZones();
  window.addEventListener("hashchange", () => {
    route();
    document.getElementById("main").focus();
  });
  route();
  call("/readyz").catch(() => {});      // its answer says whether the weights are synthetic
  document.body.dataset.ready = "true";
}

start();
