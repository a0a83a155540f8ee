// Compare: two photos, their cosine similarity, and where it sits against the threshold.
import { json } from "./api.js";
import { el, fixed, guarded } from "./ui.js";

const percent = (cosine) => `${Math.min(100, Math.max(0, (cosine + 1) * 50)).toFixed(1)}%`;   // -1..1 → 0..100%

function scale(similarity, threshold) {
  const bar = el("div", { class: "scale", role: "img",
                          "aria-label": `similarity ${fixed(similarity)} against threshold ${fixed(threshold)} on a scale from -1 to 1` });
  bar.style.setProperty("--t", percent(threshold));
  const mark = (cls, value, text) => {
    const m = el("div", { class: "mark " + cls }, el("span", { text }));
    m.style.left = percent(value);
    return m;
  };
  bar.append(mark("threshold", threshold, `threshold ${fixed(threshold)}`), mark("score", similarity, `score ${fixed(similarity)}`));
  return el("div", {}, bar, el("p", { class: "hint", text: "Scale: cosine similarity from −1 to 1; right of the threshold is the same person." }));
}

function preview(input, img) {
  input.addEventListener("change", () => {
    if (input.files[0]) {
      img.src = URL.createObjectURL(input.files[0]);
      img.alt = "preview of " + input.files[0].name;
      img.hidden = false;
    }
  });
}

export function setUp() {
  const form = document.getElementById("compare-form");
  const target = document.getElementById("compare-result");
  preview(document.getElementById("compare-a"), document.getElementById("compare-a-preview"));
  preview(document.getElementById("compare-b"), document.getElementById("compare-b-preview"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = new FormData();
    body.append("image1", document.getElementById("compare-a").files[0]);
    body.append("image2", document.getElementById("compare-b").files[0]);
    guarded(form.querySelector("button[type=submit]"), async () => {
      target.replaceChildren(el("p", { text: "Comparing…" }));
      try {
        const answer = await json("/v1/verify", { method: "POST", body });
        target.replaceChildren(
          el("p", { class: "verdict " + (answer.same_person ? "same" : "different"), id: "compare-verdict",
                    text: answer.same_person ? "Same person" : "Not the same person" }),
          el("p", {}, "Cosine similarity ", el("strong", { id: "compare-similarity", text: fixed(answer.similarity, 4) }),
             ` (threshold ${fixed(answer.threshold)}; qualities ${answer.faces.map((f) => fixed(f.norm, 2)).join(" and ")})`),
          scale(answer.similarity, answer.threshold));
      } catch (err) {
        target.replaceChildren();
        throw err;
      }
    });
  });
}
