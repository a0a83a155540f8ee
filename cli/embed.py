"""``embed IMG...``, ``compare IMG...`` and ``embed-dir DIR --out FILE``."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from adaface.options import EMBEDDING_SIZE

from .files import list_images, save_vectors
from .registry import command


def model_overrides(args) -> dict:
    """The model options given on the command line (``--weights``, ``--arch``, ``--device``)."""
    return {k: v for k, v in (("weights", args.weights), ("arch", args.arch), ("device", args.device))
            if v is not None}


def embed_path(extractor, path: Path, args) -> list:
    """The faces of one photo file, with the command's ``--faces`` and ``--align``."""
    return extractor.embed_image(path.read_bytes(), faces=args.faces, align_mode=args.align)


def cmd_embed(args, ctx) -> int:
    import orjson
    extractor = ctx.extractor(**model_overrides(args))
    status = 0
    for name in args.images:
        record = {"image": name}
        try:
            faces = embed_path(extractor, Path(name), args)
            record["faces"] = [f.to_dict() for f in faces]
            if not faces:
                record["error"] = "no face found"
                status = 1
        except (OSError, ValueError) as exc:
            record["error"] = str(exc)
            status = 1
        sys.stdout.buffer.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return status


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarities of N unit embeddings (N×512) -> N×N."""
    return embeddings @ embeddings.T


def cmd_compare(args, ctx) -> int:
    extractor = ctx.extractor(**model_overrides(args))
    names, vectors = [], []
    for name in args.images:
        faces = embed_path(extractor, Path(name), args)
        if not faces:
            print(f"{name}: no face found", file=sys.stderr)
            return 1
        names.append(Path(name).name)
        vectors.append(faces[0].embedding)
    sims = cosine_matrix(np.stack(vectors))
    width = max(len(n) for n in names)
    print(" " * width + "".join(f"{n[:9]:>10}" for n in names))
    for name, row in zip(names, sims):
        print(f"{name:<{width}}" + "".join(f"{v:10.4f}" for v in row))
    return 0


def cmd_embed_dir(args, ctx) -> int:
    from tqdm import tqdm
    extractor = ctx.extractor(**model_overrides(args))
    folder = Path(args.dir)
    paths = list_images(folder)
    names, vectors, norms, skipped = [], [], [], []
    for path in tqdm(paths, desc="embedding", unit="img"):
        try:
            faces = embed_path(extractor, path, args)
        except (OSError, ValueError) as exc:
            skipped.append(f"{path.relative_to(folder)}: {exc}")
            continue
        if not faces:
            skipped.append(f"{path.relative_to(folder)}: no face found")
        for face in faces:
            names.append(str(path.relative_to(folder)))
            vectors.append(face.embedding)
            norms.append(face.norm)
    matrix = np.stack(vectors) if vectors else np.zeros((0, EMBEDDING_SIZE), np.float32)
    save_vectors(Path(args.out), names, matrix, np.asarray(norms, np.float32))
    print(f"wrote {len(names)} embeddings from {len(paths)} images to {args.out}")
    for line in skipped:
        print(f"skipped {line}")
    return 0


@command("embed")
def register_embed(sub, parents) -> None:
    p = sub.add_parser("embed", parents=[parents.model], help="print each image's faces as JSON lines")
    p.add_argument("images", nargs="+")
    p.set_defaults(run=cmd_embed)


@command("compare")
def register_compare(sub, parents) -> None:
    p = sub.add_parser("compare", parents=[parents.model], help="print the cosine-similarity matrix")
    p.add_argument("images", nargs="+")
    p.set_defaults(run=cmd_compare)


@command("embed-dir")
def register_embed_dir(sub, parents) -> None:
    p = sub.add_parser("embed-dir", parents=[parents.model], help="embed a folder into a vector file")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="output .npz or .parquet")
    p.set_defaults(run=cmd_embed_dir)
