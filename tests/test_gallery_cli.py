"""The gallery command line: build (resumable after kill -9), identify, export/import, calibrate.

The deepface cases run on ``../shared/facedata/deepface`` with synthetic IR-18 weights, detecting
on copies shrunk to 320 pixels to keep the run short; with synthetic weights the scores mean
nothing, but each photo's nearest stored face must be that photo itself.
"""
import csv
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import AdaFaceFeature
from conftest import FACEDATA, REPO, require_shared
from cli.labels import person_from_path
from test_gallery_support import crop_png, grey_png

MODEL_ENV = {"ADAFACE_WEIGHTS": "synthetic", "ADAFACE_ARCH": "ir_18", "ADAFACE_DEVICE": "cpu",
             "ADAFACE_DETECT_MAX_SIDE": "320", "ADAFACE_MIN_FACE_SIZE": "40"}
DEEPFACE = FACEDATA / "deepface"


@pytest.fixture
def model_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("ADAFACE_")]:
        monkeypatch.delenv(key)
    for key, value in MODEL_ENV.items():
        monkeypatch.setenv(key, value)


def _cli(capsys, *argv) -> str:
    status = AdaFaceFeature.main(list(argv))
    out = capsys.readouterr().out
    assert status == 0, out
    return out


def _faces_per_photo(db: Path) -> dict:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT i.name, f.photo_sha256 FROM adaface_faces f "
                            "JOIN adaface_identities i ON i.id = f.identity_id").fetchall()
    counts = {}
    for row in rows:
        counts[row] = counts.get(row, 0) + 1
    return counts


def test_person_names_from_paths(tmp_path):
    for name, person in [("alice_1.jpg", "alice"), ("alice-02.png", "alice"), ("bob (3).jpg", "bob"),
                         ("img1.jpg", "img1"), ("Carol Smith_4.jpg", "Carol Smith"), ("7.jpg", "7")]:
        assert person_from_path(tmp_path / name, tmp_path) == person
    assert person_from_path(tmp_path / "dave" / "x_1.jpg", tmp_path) == "dave"
    assert person_from_path(tmp_path / "x_1.jpg", tmp_path, {"x_1.jpg": "erin"}) == "erin"


def test_build_resumes_after_kill_9_without_duplicates(tmp_path, model_env):
    photos = tmp_path / "photos"
    photos.mkdir()
    total = 120
    for i in range(total):
        (photos / f"person{i % 40}_{i}.png").write_bytes(crop_png(1000 + i))
    (photos / "empty_room_1.png").write_bytes(grey_png())
    db = tmp_path / "g.db"
    cmd = [sys.executable, "AdaFaceFeature.py", "gallery", "build", str(photos), "--url", f"sqlite:///{db}"]
    env = {**os.environ, "ADAFACE_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    enrolled, deadline = 0, time.monotonic() + 180
    while enrolled < 10 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if db.exists():
            try:
                enrolled = sum(_faces_per_photo(db).values())
            except sqlite3.OperationalError:
                pass
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    enrolled = sum(_faces_per_photo(db).values())
    assert 0 < enrolled < total, "the first build should have been killed midway"
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"enrolled {total - enrolled} photos, {enrolled} already enrolled" in second.stdout
    assert "no face found in 1 photos" in second.stdout and "empty_room_1.png" in second.stdout
    assert "gallery" in second.stderr and "photo" in second.stderr          # the tqdm bar
    counts = _faces_per_photo(db)
    assert len(counts) == total and set(counts.values()) == {1}
    assert {name for name, _ in counts} == {f"person{i}" for i in range(40)}


def test_export_import_and_list(tmp_path, model_env, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"p{i % 3}_{i}.png").write_bytes(crop_png(i))
    src, dst = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    _cli(capsys, "gallery", "build", str(photos), "--url", src, "--gallery", "team")
    for fmt in ("npz", "parquet"):
        out = _cli(capsys, "gallery", "export", str(tmp_path / f"team.{fmt}"), "--url", src, "--gallery", "team")
        assert "wrote 6 faces" in out
        out = _cli(capsys, "gallery", "import", str(tmp_path / f"team.{fmt}"), "--url", dst, "--gallery", fmt)
        assert "imported 6 faces" in out
    out = _cli(capsys, "gallery", "list", "--url", dst)
    assert "npz\t3 identities\t6 faces" in out and "parquet\t3 identities\t6 faces" in out
    out = _cli(capsys, "gallery", "identify", str(photos / "p1_4.png"), "--url", dst, "--gallery", "parquet",
               "--json")
    face = json.loads(out)["faces"][0]
    assert face["identity"] == "p1" and face["similarity"] > 0.999
    assert AdaFaceFeature.main(["gallery", "identify", str(photos / "p1_4.png"), "--url", dst,
                                "--gallery", "missing"]) == 2


def test_deepface_gallery_identifies_every_photo_as_itself(tmp_path, model_env, capsys):
    require_shared()
    url = f"sqlite:///{tmp_path}/deepface.db"
    out = _cli(capsys, "gallery", "build", str(DEEPFACE), "--url", url, "--gallery", "deepface",
               "--labels", str(DEEPFACE / "identities.csv"))
    with open(DEEPFACE / "identities.csv") as f:
        labels = {row["image"]: row["identity"] for row in csv.DictReader(f)}
    assert f"enrolled {len(labels)} photos" in out and f"{len(set(labels.values()))} identities" in out
    images = sorted(DEEPFACE / name for name in labels)
    out = _cli(capsys, "gallery", "identify", *map(str, images), "--url", url, "--gallery", "deepface",
               "--json", "--top-k", "3")
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == len(images)
    for path, record in zip(images, records):
        best = record["faces"][0]["candidates"][0]
        assert best["photo_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), record
        assert best["similarity"] > 0.999 and best["identity"] == labels[path.name]
        assert record["faces"][0]["decision"] == "match"


def test_calibrate_on_deepface_pairs(tmp_path, model_env, capsys):
    require_shared()
    plot = tmp_path / "calibration.png"
    out = _cli(capsys, "calibrate", str(DEEPFACE / "pairs.csv"), "--out", str(plot), "--json")
    report = json.loads(out)
    assert report["pairs"] + 0 > 0 and report["genuine_pairs"] > 0 and report["impostor_pairs"] > 0
    assert 0.0 <= report["auc"] <= 1.0 and 0.0 <= report["eer"] <= 1.0
    assert [e["far"] for e in report["tar_at_far"]] == [1e-2, 1e-3, 1e-4]
    for entry in report["tar_at_far"]:
        assert {"tar", "threshold", "measured_far", "measurable"} <= set(entry)
        assert entry["measured_far"] <= entry["far"] or not entry["measurable"]
    assert -1.0 <= report["suggested_verify_threshold"] <= 1.0 and report["suggestion_basis"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
