"""Threshold calibration: score labelled pairs, then ROC AUC, EER and TAR at fixed FARs.

Input is a pairs CSV (``image_a,image_b,same_person``; same_person is yes/no, true/false or 1/0)
or a folder of labelled photos (a sub-folder per person, or person names in the file names such
as ``alice_1.jpg``; every pair of photos is scored). Each photo is embedded once (its largest
face); a pair's score is the cosine similarity of the two embeddings.

For a threshold t, TAR(t) is the share of genuine (same-person) pairs scoring >= t and FAR(t)
the share of impostor pairs scoring >= t. The threshold reported for a FAR target is the lowest
one whose measured FAR does not exceed it; a target below 1 / (impostor pairs) cannot be
measured and is marked so. The suggested ``ADAFACE_VERIFY_THRESHOLD`` is the threshold at
FAR 1e-3 when there are at least 1,000 impostor pairs, else at FAR 1e-2 with at least 100,
else the EER threshold.
"""
from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

FAR_TARGETS = (1e-2, 1e-3, 1e-4)
YES = {"yes", "y", "true", "t", "1", "same", "genuine"}
NO = {"no", "n", "false", "f", "0", "different", "impostor"}


@dataclass
class Scores:
    """Similarities of genuine and impostor pairs (float64 arrays), and what was left out."""

    genuine: np.ndarray
    impostor: np.ndarray
    skipped: list = field(default_factory=list)


def read_pairs(csv_path: Path) -> list:
    """(image_a, image_b, same) triples from a pairs CSV with a header row."""
    pairs = []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or len(header) < 3:
            raise ValueError(f"{csv_path}: expected a header like image_a,image_b,same_person")
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            label = row[2].strip().lower()
            if label not in YES | NO:
                raise ValueError(f"{csv_path}:{line}: same_person must be yes/no, true/false or 1/0; got {row[2]!r}")
            pairs.append((row[0].strip(), row[1].strip(), label in YES))
    if not pairs:
        raise ValueError(f"{csv_path}: no pairs")
    return pairs


def folder_pairs(labels: dict) -> list:
    """Every pair of labelled photos ({path: person}) as (a, b, same)."""
    items = sorted(labels.items())
    return [(a, b, pa == pb) for (a, pa), (b, pb) in itertools.combinations(items, 2)]


def score_pairs(pairs: list, embed: Callable[[str], Optional[np.ndarray]], progress=None) -> Scores:
    """Embed each image once with ``embed(name) -> unit vector or None`` and score every pair."""
    names = sorted({n for a, b, _ in pairs for n in (a, b)})
    vectors, skipped = {}, []
    for name in names:
        try:
            vec = embed(name)
        except (OSError, ValueError) as exc:
            vec = None
            skipped.append(f"{name}: {exc}")
        else:
            if vec is None:
                skipped.append(f"{name}: no face found")
        if vec is not None:
            vectors[name] = np.asarray(vec, np.float64)
        if progress is not None:
            progress(1)
    genuine, impostor = [], []
    for a, b, same in pairs:
        if a in vectors and b in vectors:
            (genuine if same else impostor).append(float(vectors[a] @ vectors[b]))
    return Scores(np.array(genuine), np.array(impostor), skipped)


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """P(genuine score > impostor score) + P(equal) / 2 (the Mann-Whitney form of the AUC)."""
    imp = np.sort(impostor)
    below = np.searchsorted(imp, genuine, side="left")
    at_or_below = np.searchsorted(imp, genuine, side="right")
    return float(np.sum(below + 0.5 * (at_or_below - below)) / (len(genuine) * len(impostor)))


def roc_curve(genuine: np.ndarray, impostor: np.ndarray) -> tuple:
    """(thresholds descending, FAR, TAR) at every distinct score."""
    thresholds = np.unique(np.concatenate([genuine, impostor]))[::-1]
    g, i = np.sort(genuine), np.sort(impostor)
    tar = (len(g) - np.searchsorted(g, thresholds, side="left")) / len(g)
    far = (len(i) - np.searchsorted(i, thresholds, side="left")) / len(i)
    return thresholds, far, tar


def equal_error(genuine: np.ndarray, impostor: np.ndarray) -> tuple:
    """(EER, threshold): where FAR and FRR = 1 - TAR are closest; the EER is their mean there."""
    thresholds, far, tar = roc_curve(genuine, impostor)
    frr = 1 - tar
    k = int(np.argmin(np.abs(far - frr)))
    return float((far[k] + frr[k]) / 2), float(thresholds[k])


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, target: float) -> dict:
    """The lowest threshold whose FAR is at most ``target``, with the TAR there."""
    imp = np.sort(impostor)[::-1]
    allowed = int(np.floor(target * len(imp)))
    # accept at most `allowed` impostors: the threshold sits just above the next one
    threshold = float(np.nextafter(imp[allowed], np.inf)) if allowed < len(imp) else float(imp[-1])
    far = float(np.mean(impostor >= threshold))
    tar = float(np.mean(genuine >= threshold))
    return {"far": target, "tar": tar, "threshold": threshold, "measured_far": far,
            "measurable": len(imp) * target >= 1}


def report(scores: Scores) -> dict:
    """Every number the command prints, as a dict (JSON-ready)."""
    g, i = scores.genuine, scores.impostor
    if len(g) == 0 or len(i) == 0:
        raise ValueError(f"need both genuine and impostor pairs; got {len(g)} genuine, {len(i)} impostor")
    eer, eer_threshold = equal_error(g, i)
    at_far = [tar_at_far(g, i, t) for t in FAR_TARGETS]
    if len(i) >= 1000:
        suggested, basis = at_far[1]["threshold"], "threshold at FAR 1e-3"
    elif len(i) >= 100:
        suggested, basis = at_far[0]["threshold"], "threshold at FAR 1e-2 (fewer than 1,000 impostor pairs)"
    else:
        suggested, basis = eer_threshold, "EER threshold (fewer than 100 impostor pairs)"
    return {"pairs": int(len(g) + len(i)), "genuine_pairs": int(len(g)), "impostor_pairs": int(len(i)),
            "skipped": scores.skipped, "auc": roc_auc(g, i), "eer": eer, "eer_threshold": eer_threshold,
            "tar_at_far": at_far,
            "genuine_mean": float(g.mean()), "impostor_mean": float(i.mean()),
            "suggested_verify_threshold": round(float(suggested), 4), "suggestion_basis": basis}


def plot(scores: Scores, result: dict, out: Path) -> Path:
    """PNG: the two score histograms (with the suggested threshold) and the ROC (log FAR)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = np.linspace(-1, 1, 81)
    left.hist(scores.impostor, bins=bins, alpha=0.6, density=True, label=f"different people ({len(scores.impostor)})")
    left.hist(scores.genuine, bins=bins, alpha=0.6, density=True, label=f"same person ({len(scores.genuine)})")
    left.axvline(result["suggested_verify_threshold"], color="k", linestyle="--",
                 label=f"suggested threshold {result['suggested_verify_threshold']:.3f}")
    left.set_xlabel("cosine similarity")
    left.set_ylabel("density")
    left.set_title("Score distributions")
    left.legend(fontsize=8)
    _, far, tar = roc_curve(scores.genuine, scores.impostor)
    floor = 1.0 / (10 * len(scores.impostor))
    right.plot(np.maximum(far, floor), tar, drawstyle="steps-post")
    for entry in result["tar_at_far"]:
        right.axvline(entry["far"], color="grey", linestyle=":", linewidth=0.8)
    right.set_xscale("log")
    right.set_xlim(floor, 1)
    right.set_ylim(0, 1.01)
    right.set_xlabel("false accept rate")
    right.set_ylabel("true accept rate")
    right.set_title(f"ROC (AUC {result['auc']:.4f}, EER {result['eer']:.4f})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_report(result: dict) -> str:
    lines = [f"pairs: {result['pairs']} ({result['genuine_pairs']} same person, {result['impostor_pairs']} different)",
             f"ROC AUC: {result['auc']:.4f}",
             f"EER: {result['eer']:.4f} at threshold {result['eer_threshold']:.4f}"]
    for entry in result["tar_at_far"]:
        note = "" if entry["measurable"] else "  (not measurable: too few impostor pairs)"
        lines.append(f"TAR at FAR {entry['far']:g}: {entry['tar']:.4f} at threshold {entry['threshold']:.4f}{note}")
    lines.append(f"suggested ADAFACE_VERIFY_THRESHOLD={result['suggested_verify_threshold']} "
                 f"({result['suggestion_basis']})")
    for line in result["skipped"]:
        lines.append(f"skipped {line}")
    return "\n".join(lines)
