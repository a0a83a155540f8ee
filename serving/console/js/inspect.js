// Inspect: every face of a photo with its box, landmarks, aligned crop, quality and score.
import { postPhoto, query } from "./api.js";
import { download, el, fixed, guarded } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const LANDMARKS = ["left eye", "right eye", "nose", "left mouth corner", "right mouth corner"];

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function area(box) {
  return (box[2] - box[0]) * (box[3] - box[1]);
}

/** Index of the face the original endpoints embed (faces=largest: the largest box), or -1. */
export function largestFace(faces) {
  let best = -1;
  faces.forEach((f, i) => {
    if (f.box && (best < 0 || area(f.box) > area(faces[best].box))) best = i;
  });
  return best;
}

/** The photo with a numbered box and five landmarks per face, drawn in image pixels. */
function figure(src, answer, picked) {
  const overlay = svg("svg", { viewBox: `0 0 ${answer.width} ${answer.height}`, role: "img",
                               "aria-label": `${answer.faces.length} faces marked` });
  const size = Math.max(answer.width, answer.height);
  answer.faces.forEach((face, i) => {
    if (!face.box) return;
    const [x1, y1, x2, y2] = face.box;
    overlay.append(svg("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1, class: i === picked ? "picked" : "",
                                 "data-face": i + 1 }));
    for (const [x, y] of face.landmarks || []) {
      overlay.append(svg("circle", { cx: x, cy: y, r: Math.max(2, size / 250), class: "landmark" }));
    }
    const label = svg("text", { x: x1 + 2, y: Math.max(y1 - 4, size / 40), "font-size": Math.max(12, size / 40) });
    label.textContent = String(i + 1);
    overlay.append(label);
  });
  return el("div", { class: "figure" }, el("img", { src, alt: "the photo inspected" }), overlay);
}

function littleEndian(vector) {
  const buffer = new ArrayBuffer(vector.length * 4);
  const view = new DataView(buffer);
  vector.forEach((v, i) => view.setFloat32(i * 4, v, true));
  return buffer;
}

function faceCard(face, i, picked, model) {
  const n = i + 1;
  const rows = [["quality", fixed(face.norm, 2)], ["detection score", fixed(face.score, 4)],
                ["box", face.box ? face.box.map((v) => Math.round(v)).join(", ") : "aligned input"]];
  const facts = el("dl", { class: "facts" });
  for (const [k, v] of rows) facts.append(el("dt", { text: k }), el("dd", { text: v, "data-fact": k }));
  if (face.landmarks) {
    facts.append(el("dt", { text: "landmarks" }),
                 el("dd", { text: face.landmarks.map((p, j) => `${LANDMARKS[j]} ${Math.round(p[0])},${Math.round(p[1])}`).join("; ") }));
  }
  const json = () => download(`face-${n}.json`, JSON.stringify({ model, embedding: face.embedding }), "application/json");
  const bytes = () => download(`face-${n}.f32`, littleEndian(face.embedding), "application/octet-stream");
  return el("li", { class: "face", "data-face": n },
    el("h3", { text: `Face ${n}` }, i === picked ? el("span", { class: "tag", text: " picked by the original endpoints" }) : null),
    face.crop ? el("img", { class: "crop", src: "data:image/png;base64," + face.crop, alt: `aligned 112×112 crop of face ${n}` }) : null,
    facts,
    el("button", { type: "button", class: "secondary", onclick: json, text: "Embedding as JSON" }),
    el("button", { type: "button", class: "secondary", onclick: bytes, text: "Embedding as float32" }));
}

function render(target, src, answer) {
  const picked = largestFace(answer.faces);
  target.replaceChildren(
    el("p", { class: "summary", text: `${answer.faces.length} face${answer.faces.length === 1 ? "" : "s"} in a ` +
      `${answer.width}×${answer.height} image (${answer.model}). The yellow box is the face the original ` +
      "endpoints (faces=largest) would embed." }),
    src ? figure(src, answer, picked) : null,
    el("ul", { class: "faces" }, ...answer.faces.map((f, i) => faceCard(f, i, picked, answer.model))));
}

export function setUp() {
  const form = document.getElementById("inspect-form");
  const target = document.getElementById("inspect-result");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = document.getElementById("inspect-file").files[0];
    const pasted = document.getElementById("inspect-b64").value.trim();
    const photo = file || pasted;
    if (!photo) {
      target.replaceChildren(el("p", { text: "Choose a photo or paste base64 first." }));
      return;
    }
    guarded(form.querySelector("button[type=submit]"), async () => {
      target.replaceChildren(el("p", { text: "Detecting and embedding…" }));
      const path = "/v1/embed" + query({ faces: form.querySelector("#inspect-faces").value,
                                         align: form.querySelector("#inspect-align").value,
                                         min_face_size: form.querySelector("#inspect-min-size").value, crops: "true" });
      try {
        const answer = await postPhoto(path, photo);
        const src = file ? URL.createObjectURL(file) : "data:image/png;base64," + pasted.replace(/\s+/g, "");
        render(target, src, answer);
      } catch (err) {
        target.replaceChildren();
        throw err;
      }
    });
  });
}
