"""``calibrate PAIRS.csv [--images DIR]`` or ``calibrate DIR``: ROC AUC, EER, TAR at FAR, a PNG
plot and a threshold, from labelled photos (see :mod:`gallery.calibrate`)."""
from __future__ import annotations

import sys
from pathlib import Path

from gallery import calibrate as calibration

from .embed import model_overrides
from .files import list_images
from .labels import person_from_path, read_labels
from .registry import command


def cmd_calibrate(args, ctx) -> int:
    import orjson
    from tqdm import tqdm
    source = Path(args.source)
    if source.is_dir():
        labels = read_labels(Path(args.labels)) if args.labels else None
        photos = {p.relative_to(source).as_posix(): person_from_path(p, source, labels) for p in list_images(source)}
        pairs, image_dir = calibration.folder_pairs(photos), source
    else:
        pairs, image_dir = calibration.read_pairs(source), Path(args.images) if args.images else source.parent
    extractor = ctx.extractor(**model_overrides(args))

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


@command("calibrate")
def register(sub, parents) -> None:
    p = sub.add_parser("calibrate", parents=[parents.model], help="ROC, EER and thresholds from labelled pairs")
    p.add_argument("source", help="pairs CSV (image_a,image_b,same_person) or a folder of labelled photos")
    p.add_argument("--images", help="folder the CSV's image names are in (default: the CSV's folder)")
    p.add_argument("--labels", help="with a folder: CSV (image,identity) naming who each photo shows")
    p.add_argument("--out", help="PNG plot path (default: <name>_calibration.png)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(run=cmd_calibrate)
