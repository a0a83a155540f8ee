"""``python AdaFaceFeature.py gallery ...``: build, search, export, import and list galleries.

    gallery build DIR [--gallery NAME] [--labels CSV]   enroll a folder: a sub-folder per person, or
                                                        person names in file names (alice_1.jpg -> alice)
    gallery identify IMG... [--top-k K] [--threshold T] [--json]
    gallery export FILE / gallery import FILE           .npz or .parquet
    gallery list                                        galleries with counts and the model that filled them
    gallery reembed NAME [--batch N]                    re-embed the stored crops with this model, then switch
    gallery audit [--gallery G] [--identity I] [--action A] [--limit N] [--json]
                                                        the audit trail of gallery writes, newest first

The store is ``--url`` or ``ADAFACE_GALLERY_URL``; the model options (``--weights``, ``--arch``,
``--device``, ``--align``) are those of the other commands. ``build`` is resumable: a photo
whose sha256 the gallery already holds is skipped before any work, and each photo is committed
as it is enrolled, so an interrupted build continues where it stopped. A gallery filled by
another model than the one loaded is refused (exit status 2, ``model_mismatch``); ``reembed``
is resumable too (the vectors made so far are kept in the store). Writes are recorded in the
audit trail as made by ``cli:<user>`` (the login name) from ``local``.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import datetime, timezone
from contextlib import closing
from pathlib import Path

import numpy as np

from adaface.options import DEFAULT_TOP_K

from gallery.galleries import Galleries, decide, photo_sha256
from gallery.ann import SearchParams
from gallery.audit import ACTIONS, MAX_EVENTS, Actor
from gallery.open import open_store
from gallery.reembed import BATCH as REEMBED_BATCH
from gallery.reembed import crop_png, reembed
from gallery.store import NewFace
from gallery.transfer import export_gallery, import_gallery

from .embed import model_overrides
from .files import list_images
from .labels import person_from_path, read_labels
from .registry import command

DEFAULT_GALLERY = "default"
def _url(args, ctx) -> str:
    """The store: ``--url``, or the settings' (``ADAFACE_GALLERY_URL``), relative paths resolved."""
    settings = ctx.settings(**({"gallery_url": args.url} if args.url else {}))
    return settings.gallery_store_url()


def _actor() -> Actor:
    """Who the audit trail records for this command's writes: ``cli:<login name>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):       # no passwd entry (a container's arbitrary uid)
        user = f"uid{os.getuid()}"
    return Actor(f"cli:{user}", "local")


def _print_error(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


# -- gallery build -------------------------------------------------------------------------------

def cmd_build(args, ctx) -> int:
    from tqdm import tqdm
    if args.faces == "all":
        return _print_error(ValueError("build enrolls one face per photo: use --faces largest or score"))
    folder = Path(args.dir)
    if not folder.is_dir():
        return _print_error(ValueError(f"{folder} is not a folder"))
    labels = read_labels(Path(args.labels)) if args.labels else None
    keep_crops = ctx.settings().store_crops
    store = open_store(_url(args, ctx))
    try:
        actor = _actor()
        store.ensure_gallery(args.gallery, actor)
        done = store.photo_hashes(args.gallery)
        paths = list_images(folder)
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
            if extractor is None:
                extractor = ctx.extractor(**model_overrides(args))
                store.check_model(args.gallery, extractor.identity)  # model_mismatch before any work
            try:
                faces = extractor.embed_image(data, faces=args.faces, align_mode=args.align)
            except (OSError, ValueError) as exc:
                failed.append(f"{rel}: {exc}")
                continue
            if not faces:
                no_face.append(rel)
                continue
            crop = crop_png(faces[0].crop) if keep_crops and faces[0].crop is not None else None
            store.enroll(args.gallery, person_from_path(path, folder, labels),
                         [NewFace(faces[0].embedding, faces[0].norm, sha, crop)], model=extractor.identity,
                         actor=actor)
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
    per_face = galleries.identify(args.gallery, np.stack([f.embedding for f in faces]), args.top_k,
                                  exact=args.exact, model=extractor.identity)
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


def _search(ctx) -> SearchParams:
    """The in-memory search as the settings configure it."""
    settings = ctx.settings()
    return SearchParams(ann_min_faces=settings.ann_min_faces, nprobe=settings.ann_nprobe)


def cmd_identify(args, ctx) -> int:
    import orjson
    threshold = ctx.settings().identify_threshold if args.threshold is None else args.threshold
    galleries = Galleries(open_store(_url(args, ctx)), _search(ctx))
    status = 0
    try:
        galleries.store.get_gallery(args.gallery)
        extractor = ctx.extractor(**model_overrides(args))
        galleries.store.check_model(args.gallery, extractor.identity)  # model_mismatch: exit 2
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

def cmd_export(args, ctx) -> int:
    with closing(open_store(_url(args, ctx))) as store:
        count = export_gallery(store, args.gallery, Path(args.file))
    print(f"wrote {count} faces of gallery {args.gallery} to {args.file}")
    return 0


def cmd_import(args, ctx) -> int:
    from tqdm import tqdm
    with closing(open_store(_url(args, ctx))) as store, tqdm(desc=f"gallery {args.gallery}", unit="face") as bar:
        added, existing = import_gallery(store, args.gallery, Path(args.file), progress=bar.update, actor=_actor())
    print(f"imported {added} faces into gallery {args.gallery} ({existing} were already there)")
    return 0


def cmd_list(args, ctx) -> int:
    with closing(open_store(_url(args, ctx))) as store:
        for g in store.list_galleries():
            model = g.model.name if g.model else "no model yet"
            print(f"{g.name}\t{g.identities} identities\t{g.faces} faces\t{model}")
    return 0


# -- gallery reembed -----------------------------------------------------------------------------

def cmd_reembed(args, ctx) -> int:
    from tqdm import tqdm
    name = args.name or args.gallery
    with closing(open_store(_url(args, ctx))) as store:
        before = store.get_gallery(name).model
        extractor = ctx.extractor(**model_overrides(args))
        with tqdm(desc=f"re-embed {name}", unit="face") as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()
            result = reembed(store, name, extractor.identity, extractor.embed_crops, progress, args.batch, _actor())
    if not result.switched:
        print(f"gallery {name} is already on {result.model.name}: nothing to do")
        return 0
    print(f"gallery {name}: {result.faces} faces now embedded by {result.model.name} "
          f"(was {before.name if before else 'no model recorded'}); {result.embedded_now} embedded in this run")
    if result.left_out:
        print(f"{len(result.left_out)} faces had no stored crop and were removed:")
        for face_id, identity in result.left_out:
            print(f"  face {face_id} of {identity}")
    return 0


# -- gallery audit -------------------------------------------------------------------------------

def cmd_audit(args, ctx) -> int:
    with closing(open_store(_url(args, ctx))) as store:
        events = store.audit_events([args.gallery] if args.gallery else None, args.identity, args.action,
                                    args.before, args.limit)
    for e in events:
        if args.json:
            print(json.dumps(e.to_dict()))
            continue
        when = datetime.fromtimestamp(e.at, timezone.utc).isoformat(timespec="seconds")
        who = f"{e.actor}@{e.address}" if e.address else e.actor
        what = f"{e.gallery}/{e.identity}" if e.identity else e.gallery
        faces = f" faces {','.join(map(str, e.face_ids))}" if e.face_ids else ""
        detail = f" {json.dumps(e.detail, sort_keys=True)}" if e.detail else ""
        print(f"{e.id}\t{when}\t{who}\t{e.action}\t{what}{faces}{detail}")
    return 0


# -- argument parsing ----------------------------------------------------------------------------

@command("gallery")
def register(sub, parents) -> None:
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--url", help="gallery store (default: ADAFACE_GALLERY_URL)")
    store.add_argument("--gallery", default=DEFAULT_GALLERY, help=f"gallery name (default: {DEFAULT_GALLERY})")
    model = parents.model
    gallery = sub.add_parser("gallery", help="build, search, export and import galleries")
    actions = gallery.add_subparsers(dest="action", required=True)
    p = actions.add_parser("build", parents=[model, store], help="enroll a folder of photos, resumably")
    p.add_argument("dir")
    p.add_argument("--labels", help="CSV (image,identity) naming who each photo shows")
    p.set_defaults(run=cmd_build)
    p = actions.add_parser("identify", parents=[model, store], help="who is in each photo")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--threshold", type=float, help="match threshold (default: ADAFACE_IDENTIFY_THRESHOLD)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument("--exact", action="store_true", help="exhaustive float32 search instead of the index's")
    p.set_defaults(run=cmd_identify)
    p = actions.add_parser("export", parents=[store], help="write the gallery to .npz or .parquet")
    p.add_argument("file")
    p.set_defaults(run=cmd_export)
    p = actions.add_parser("import", parents=[store], help="enroll faces from .npz or .parquet")
    p.add_argument("file")
    p.set_defaults(run=cmd_import)
    p = actions.add_parser("list", parents=[store], help="list galleries with their model")
    p.set_defaults(run=cmd_list)
    p = actions.add_parser("reembed", parents=[model, store],
                           help="re-embed a gallery's stored crops with this model, resumably, then switch it")
    p.add_argument("name", nargs="?", help="the gallery (default: --gallery)")
    p.add_argument("--batch", type=int, default=REEMBED_BATCH, help=f"crops per forward (default {REEMBED_BATCH})")
    p.set_defaults(run=cmd_reembed)
    p = actions.add_parser("audit", help="the audit trail of gallery writes, newest first")
    p.add_argument("--url", help="gallery store (default: ADAFACE_GALLERY_URL)")
    p.add_argument("--gallery", help="only this gallery's rows (default: every gallery)")
    p.add_argument("--identity", help="only rows about this identity name")
    p.add_argument("--action", choices=sorted(ACTIONS), help="only this kind of write")
    p.add_argument("--before", type=int, help="only rows older than this row id")
    p.add_argument("--limit", type=int, default=100, help=f"rows (default 100, at most {MAX_EVENTS})")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.set_defaults(run=cmd_audit)
