// Galleries: list, create, delete; identities with crop thumbnails; enroll, identify, rename, delete.
import { imageUrl, json, postPhoto, query } from "./api.js";
import { count, el, fixed, guarded } from "./ui.js";

let current = null;            // the gallery shown
const urls = [];               // object URLs of thumbnails, freed when the view changes

const enc = encodeURIComponent;
const base = () => `/v1/galleries/${enc(current)}`;

function freeThumbnails() {
  while (urls.length) URL.revokeObjectURL(urls.pop());
}

async function thumbnail(faceId, label) {
  const img = el("img", { class: "thumb", alt: label });
  try {
    const url = await imageUrl(`${base()}/faces/${faceId}/crop`);
    urls.push(url);
    img.src = url;
  } catch (err) {
    img.alt = `${label} (no stored crop: ${err.message})`;
  }
  return img;
}

async function listGalleries() {
  const answer = await json("/v1/galleries");
  const list = document.getElementById("gallery-list");
  list.replaceChildren(...answer.galleries.map((g) => el("li", { "data-gallery": g.name },
    el("button", { type: "button", class: "secondary", text: g.name, "aria-label": `open gallery ${g.name}`,
                   onclick: () => guarded(null, () => open(g.name)) }),
    el("span", { class: "hint", text: `${count(g.identities, "identity", "identities")}, ${count(g.faces, "face", "faces")}` }),
    el("button", { type: "button", class: "danger", text: "Delete", "aria-label": `delete gallery ${g.name}`,
                   onclick: () => remove(g.name) }))));
  if (!answer.galleries.length) list.append(el("li", { class: "hint", text: "No galleries yet." }));
}

function remove(name) {
  if (!window.confirm(`Delete gallery ${name} with every identity, face and crop in it? This cannot be undone.`)) return;
  guarded(null, async () => {
    await json(`/v1/galleries/${enc(name)}`, { method: "DELETE" });
    if (current === name) {
      current = null;
      document.getElementById("gallery-detail").hidden = true;
    }
    await listGalleries();
  });
}

async function open(name) {
  current = name;
  document.getElementById("gallery-current").textContent = name;
  document.getElementById("gallery-detail").hidden = false;
  document.getElementById("identify-result").replaceChildren();
  await listIdentities();
}

function renameForm(identity) {
  const input = el("input", { value: identity.name, "aria-label": `new name for ${identity.name}`, autocomplete: "off" });
  const form = el("form", { class: "rename" }, input, el("button", { type: "submit", class: "secondary", text: "Rename" }));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!input.value || input.value === identity.name) return;
    guarded(form.querySelector("button"), async () => {
      await json(`${base()}/identities/${enc(identity.name)}`, {
        method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name: input.value }) });
      await listIdentities();
    });
  });
  return form;
}

async function identityItem(summary) {
  const identity = await json(`${base()}/identities/${enc(summary.name)}`);
  const thumbs = el("div", { class: "thumbs" });
  for (const face of identity.faces) {
    const del = el("button", { type: "button", class: "danger", text: "Delete",
                               "aria-label": `delete face ${face.id} of ${identity.name}` });
    del.addEventListener("click", () => {
      if (!window.confirm(`Delete face ${face.id} of ${identity.name} and its crop?`)) return;
      guarded(del, async () => {
        await json(`${base()}/faces/${face.id}`, { method: "DELETE" });
        await listIdentities();
      });
    });
    thumbs.append(el("figure", { "data-face": face.id },
      await thumbnail(face.id, `face ${face.id} of ${identity.name}`),
      el("figcaption", { text: `#${face.id} · quality ${fixed(face.norm, 1)}` }), del));
  }
  const delIdentity = el("button", { type: "button", class: "danger", text: "Delete identity",
                                     "aria-label": `delete identity ${identity.name}` });
  delIdentity.addEventListener("click", () => {
    if (!window.confirm(`Delete ${identity.name} with ${count(identity.face_count, "face", "faces")} and their crops?`)) return;
    guarded(delIdentity, async () => {
      await json(`${base()}/identities/${enc(identity.name)}`, { method: "DELETE" });
      await listIdentities();
    });
  });
  return el("li", { "data-identity": identity.name },
    el("strong", { text: identity.name }), el("span", { class: "hint", text: ` ${count(identity.face_count, "face", "faces")}` }),
    thumbs, renameForm(identity), delIdentity);
}

async function listIdentities() {
  freeThumbnails();
  const list = document.getElementById("identity-list");
  const answer = await json(`${base()}/identities${query({ limit: 100 })}`);
  const items = [];
  for (const identity of answer.identities) items.push(await identityItem(identity));
  list.replaceChildren(...items);
  if (!items.length) list.append(el("li", { class: "hint", text: "No identities: enroll some photos." }));
}

async function enroll(form) {
  const name = document.getElementById("enroll-name").value.trim();
  const files = [...document.getElementById("enroll-files").files];
  const progress = document.getElementById("enroll-progress");
  const status = document.getElementById("enroll-status");
  progress.max = files.length;
  progress.value = 0;
  progress.hidden = false;
  const failed = [];
  let added = 0;
  for (const file of files) {         // one request per photo: progress, and a bad photo stops nothing
    status.textContent = `Enrolling ${file.name} (${progress.value + 1} of ${files.length})…`;
    try {
      const answer = await postPhoto(`${base()}/identities/${enc(name)}/faces`, file);
      added += answer.added;
    } catch (err) {
      if (err.status === 401 || err.status === 403) throw err;
      failed.push(`${file.name}: ${err.message}`);
    }
    progress.value += 1;
  }
  status.textContent = `${added} of ${files.length} photos enrolled for ${name}.` +
    (failed.length ? ` Not enrolled: ${failed.join("; ")}` : "");
  form.reset();
  await listIdentities();
  await listGalleries();
}

async function identify() {
  const file = document.getElementById("identify-file").files[0];
  const target = document.getElementById("identify-result");
  target.replaceChildren(el("p", { text: "Identifying…" }));
  try {
    const answer = await postPhoto(`${base()}/identify${query({ top_k: 5 })}`, file);
    const blocks = [];
    for (const [i, face] of answer.faces.entries()) {
      const rows = [];
      for (const c of face.candidates) {
        rows.push(el("tr", {}, el("td", {}, await thumbnail(c.face_id, `matched crop of ${c.identity}`)),
                     el("td", { text: c.identity }), el("td", { text: fixed(c.similarity, 4) })));
      }
      blocks.push(el("div", { class: "identified", "data-decision": face.decision },
        el("p", { class: "verdict " + (face.decision === "match" ? "same" : "different"),
                  text: `Face ${i + 1}: ${face.decision === "match" ? face.identity : "unknown"} ` +
                        `(best ${fixed(face.similarity, 4)}, threshold ${fixed(answer.threshold)})` }),
        el("table", {}, el("caption", { text: `top ${answer.top_k} candidates` }),
           el("thead", {}, el("tr", {}, el("th", { text: "crop" }), el("th", { text: "identity" }), el("th", { text: "similarity" }))),
           el("tbody", {}, ...rows))));
    }
    target.replaceChildren(...blocks);
  } catch (err) {
    target.replaceChildren();
    throw err;
  }
}

export function setUp() {
  const create = document.getElementById("gallery-create");
  create.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("gallery-name");
    guarded(create.querySelector("button"), async () => {
      const created = await json("/v1/galleries", { method: "POST", headers: { "Content-Type": "application/json" },
                                                    body: JSON.stringify({ name: input.value.trim() }) });
      input.value = "";
      await listGalleries();
      await open(created.name);
    });
  });
  const enrollForm = document.getElementById("enroll-form");
  enrollForm.addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(enrollForm.querySelector("button"), () => enroll(enrollForm));
  });
  const identifyForm = document.getElementById("identify-form");
  identifyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(identifyForm.querySelector("button"), identify);
  });
}

export function show() {
  return guarded(null, listGalleries);
}

