"""``python AdaFaceFeature.py gallery ...`` and ``python AdaFaceFeature.py calibrate ...``.

    gallery build DIR [--gallery NAME] [--labels CSV]   enroll a folder: a sub-folder per person, or
                                                        person names in file names (alice_1.jpg -> alice)
    gallery identify IMG... [--top-k K] [--threshold T] [--json]
    gallery export FILE / gallery import FILE           .npz or .parquet
    gallery list                                        galleries with identity and face counts
    calibrate PAIRS.csv [--images DIR] | calibrate DIR  ROC AUC, EER, TAR at FAR; PNG plot; threshold

The store is ``--url`` or ``ADAFACE_GALLERY_URL``; the model options (``--weights``, ``--arch``,
``--device``, ``--align``) are those of the other commands. ``build`` is resumable: a photo
whose sha256 the gallery already holds is skipped before any work, and each photo is committed
as it is enrolled, so an interrupted build continues where it stopped.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from contextlib import closing
from pathlib import Path

import numpy as np

from config import Settings

from . import calibrate as calibration
from .errors import GalleryError, StoreUrlError
from .galleries import Galleries, decide, photo_sha256
from .store import NewFace, open_store
from .transfer import export_gallery, import_gallery

DEFAULT_GALLERY = "default"
#: "alice_1", "alice-02", "alice 3", "alice (4)" -> "alice"
NUMBER_SUFFIX = re.compile(r"(?:[ _-]+\d+|\s*\(\d+\))$")


def person_from_path(path: Path, folder: Path, labels: dict | None = None) -> str:
    """Who a photo shows: its label if given, else its first sub-folder under ``folder``, else its
    file name without a trailing number."""
    rel = path.relative_to(folder)
    if labels:
        for key in (rel.as_posix(), path.name):
            if key in labels:
                return labels[key]
    if len(rel.parts) > 1:
        return rel.parts[0]
    return NUMBER_SUFFIX.sub("", path.stem) or path.stem


def read_labels(csv_path: Path) -> dict:
    """{image: identity} from a CSV with a header row (image, identity)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    return {r[0].strip(): r[1].strip() for r in rows[1:] if len(r) >= 2 and r[0].strip()}


def _url(args) -> str:
    return args.url or Settings.from_env().gallery_url


def _extractor(args):
    from AdaFaceFeature import _extractor as make
    return make(args)


def _images(folder: Path) -> list:
    from AdaFaceFeature import _list_images
    return _list_images(folder)


def _print_error(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


# -- gallery build -------------------------------------------------------------------------------

def cmd_build(args) -> int:
    from tqdm import tqdm
    if args.faces == "all":
        return _print_error(ValueError("build enrolls one face per photo: use --faces largest or score"))
    folder = Path(args.dir)
    if not folder.is_dir():
        return _print_error(ValueError(f"{folder} is not a folder"))
    labels = read_labels(Path(args.labels)) if args.labels else None
    store = open_store(_url(args))
    try:
        store.ensure_gallery(args.gallery)
        done = store.photo_hashes(args.gallery)
        paths = _images(folder)
        extractor = None
        added = already = 0
        no_face, failed = [], []
        for path in tqdm(paths, desc=f"gallery {args.gallery}", unit="photo"):
            rel = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            sha = photo_sha256(data)
            if sha in done:
                already += 1
                continue
            extractor = extractor or _extractor(args)
            try:
                faces = extractor.embed_image(data, faces=args.faces, align_mode=args.align)
            except (OSError, ValueError) as exc:
                failed.append(f"{rel}: {exc}")
                continue
            if not faces:
                no_face.append(rel)
                continue
            store.enroll(args.gallery, person_from_path(path, folder, labels),
                         [NewFace(faces[0].embedding, faces[0].norm, sha)])
            done.add(sha)
            added += 1
        gallery = store.get_gallery(args.gallery)
    finally:
        store.close()
    print(f"gallery {gallery.name}: enrolled {added} photos, {already} already enrolled; "
          f"{gallery.identities} identities, {gallery.faces} faces")
    if no_face:
        print(f"no face found in {len(no_face)} photos (skipped):")
        for rel in no_face:
            print(f"  {rel}")
    for line in failed:
        print(f"could not read {line}")
    return 0


# -- gallery identify ----------------------------------------------------------------------------

def _identify_record(galleries: Galleries, extractor, name: str, args, threshold: float) -> dict:
    faces = extractor.embed_image(Path(name).read_bytes(), faces=args.faces, align_mode=args.align)
    if not faces:
        return {"image": name, "error": "no face found"}
    per_face = galleries.identify(args.gallery, np.stack([f.embedding for f in faces]), args.top_k)
    out = []
    for face, candidates in zip(faces, per_face):
        decision, best = decide(candidates, threshold)
        out.append({"box": None if face.box is None else np.round(face.box, 1), "norm": face.norm,
                    "decision": decision, "identity": best.identity if best else None,
                    "similarity": candidates[0].similarity if candidates else None,
                    "candidates": [c.to_dict() for c in candidates]})
    return {"image": name, "faces": out}


def _text_line(record: dict) -> str:
    if "error" in record:
        return f"{record['image']}: {record['error']}"
    parts = []
    for face in record["faces"]:
        shown = ", ".join(f"{c['identity']} {c['similarity']:.3f}" for c in face["candidates"][:3])
        parts.append(f"{face['identity'] or 'unknown'} [{shown}]")
    return f"{record['image']}: " + "; ".join(parts)


def cmd_identify(args) -> int:
    import orjson
    threshold = Settings.from_env().identify_threshold if args.threshold is None else args.threshold
    galleries = Galleries.open(_url(args))
    status = 0
    try:
        galleries.store.get_gallery(args.gallery)
        extractor = _extractor(args)
        for name in args.images:
            try:
                record = _identify_record(galleries, extractor, name, args, threshold)
            except (OSError, ValueError) as exc:
                record = {"image": name, "error": str(exc)}
            status = 1 if "error" in record else status
            if args.json:
                sys.stdout.buffer.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
            else:
                print(_text_line(record))
            sys.stdout.flush()
    finally:
        galleries.close()
    return status


# -- export, import, list ------------------------------------------------------------------------

def cmd_export(args) -> int:
    with closing(open_store(_url(args))) as store:
        count = export_gallery(store, args.gallery, Path(args.file))
    print(f"wrote {count} faces of gallery {args.gallery} to {args.file}")
    return 0


def cmd_import(args) -> int:
    from tqdm import tqdm
    with closing(open_store(_url(args))) as store, tqdm(desc=f"gallery {args.gallery}", unit="face") as bar:
        added, existing = import_gallery(store, args.gallery, Path(args.file), progress=bar.update)
    print(f"imported {added} faces into gallery {args.gallery} ({existing} were already there)")
    return 0


def cmd_list(args) -> int:
    with closing(open_store(_url(args))) as store:
        for g in store.list_galleries():
            print(f"{g.name}\t{g.identities} identities\t{g.faces} faces")
    return 0


# -- calibrate -----------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    import orjson
    from tqdm import tqdm
    source = Path(args.source)
    if source.is_dir():
        labels = read_labels(Path(args.labels)) if args.labels else None
        photos = {p.relative_to(source).as_posix(): person_from_path(p, source, labels) for p in _images(source)}
        pairs, image_dir = calibration.folder_pairs(photos), source
    else:
        pairs, image_dir = calibration.read_pairs(source), Path(args.images) if args.images else source.parent
    extractor = _extractor(args)

    def embed(name: str):
        faces = extractor.embed_image((image_dir / name).read_bytes(), faces="largest", align_mode=args.align)
        return faces[0].embedding if faces else None

    names = {n for a, b, _ in pairs for n in (a, b)}
    with tqdm(total=len(names), desc="embedding", unit="photo") as bar:
        scores = calibration.score_pairs(pairs, embed, progress=bar.update)
    result = calibration.report(scores)
    out = Path(args.out) if args.out else Path(source.stem + "_calibration.png")
    result["plot"] = str(calibration.plot(scores, result, out))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    else:
        print(calibration.format_report(result))
        print(f"plot: {result['plot']}")
    return 0


# -- argument parsing ----------------------------------------------------------------------------

def _guarded(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except (GalleryError, StoreUrlError) as exc:
            return _print_error(exc)
    return run


def add_commands(sub, common) -> None:
    """Add ``gallery`` and ``calibrate`` to AdaFaceFeature.py's subcommands (``common``: the model options)."""
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--url", help="gallery store (default: ADAFACE_GALLERY_URL)")
    store.add_argument("--gallery", default=DEFAULT_GALLERY, help=f"gallery name (default: {DEFAULT_GALLERY})")
    gallery = sub.add_parser("gallery", help="build, search, export and import galleries")
    actions = gallery.add_subparsers(dest="action", required=True)
    p = actions.add_parser("build", parents=[common, store], help="enroll a folder of photos, resumably")
    p.add_argument("dir")
    p.add_argument("--labels", help="CSV (image,identity) naming who each photo shows")
    p.set_defaults(func=_guarded(cmd_build))
    p = actions.add_parser("identify", parents=[common, store], help="who is in each photo")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threshold", type=float, help="match threshold (default: ADAFACE_IDENTIFY_THRESHOLD)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.set_defaults(func=_guarded(cmd_identify))
    p = actions.add_parser("export", parents=[store], help="write the gallery to .npz or .parquet")
    p.add_argument("file")
    p.set_defaults(func=_guarded(cmd_export))
    p = actions.add_parser("import", parents=[store], help="enroll faces from .npz or .parquet")
    p.add_argument("file")
    p.set_defaults(func=_guarded(cmd_import))
    p = actions.add_parser("list", parents=[store], help="list galleries")
    p.set_defaults(func=_guarded(cmd_list))
    p = sub.add_parser("calibrate", parents=[common], help="ROC, EER and thresholds from labelled pairs")
    p.add_argument("source", help="pairs CSV (image_a,image_b,same_person) or a folder of labelled photos")
    p.add_argument("--images", help="folder the CSV's image names are in (default: the CSV's folder)")
    p.add_argument("--labels", help="with a folder: CSV (image,identity) naming who each photo shows")
    p.add_argument("--out", help="PNG plot path (default: <name>_calibration.png)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_guarded(cmd_calibrate))
