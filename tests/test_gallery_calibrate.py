"""Calibration arithmetic on score sets whose answers are known."""
import numpy as np
import pytest

from gallery import calibrate


def test_auc_counts_ordered_pairs_and_ties():
    assert calibrate.roc_auc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert calibrate.roc_auc(np.array([0.1]), np.array([0.9])) == 0.0
    assert calibrate.roc_auc(np.array([0.5, 0.9]), np.array([0.5, 0.1])) == pytest.approx(0.875)


def test_eer_and_tar_at_far_on_separable_and_overlapping_scores():
    rng = np.random.default_rng(0)
    genuine = rng.normal(0.6, 0.1, 5000)
    impostor = rng.normal(0.0, 0.1, 100_000)
    eer, threshold = calibrate.equal_error(genuine, impostor)
    assert eer < 0.005 and 0.2 < threshold < 0.4                     # crossing near the midpoint 0.3
    for target in calibrate.FAR_TARGETS:
        entry = calibrate.tar_at_far(genuine, impostor, target)
        assert entry["measurable"] and entry["measured_far"] <= target
        # one step lower would accept more impostors than allowed
        assert np.sum(impostor >= np.nextafter(entry["threshold"], -np.inf)) > target * len(impostor)
    entry = calibrate.tar_at_far(genuine, impostor[:50], 1e-3)
    assert not entry["measurable"] and entry["measured_far"] == 0.0


def test_report_suggests_by_impostor_count_and_plots(tmp_path):
    rng = np.random.default_rng(1)
    scores = calibrate.Scores(rng.normal(0.6, 0.1, 300), rng.normal(0.0, 0.1, 2000))
    result = calibrate.report(scores)
    assert result["suggestion_basis"] == "threshold at FAR 1e-3"
    assert result["suggested_verify_threshold"] == round(result["tar_at_far"][1]["threshold"], 4)
    small = calibrate.report(calibrate.Scores(scores.genuine, scores.impostor[:50]))
    assert small["suggestion_basis"].startswith("EER")
    out = calibrate.plot(scores, result, tmp_path / "roc.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "suggested ADAFACE_VERIFY_THRESHOLD=" in calibrate.format_report(result)
    with pytest.raises(ValueError):
        calibrate.report(calibrate.Scores(np.array([0.5]), np.array([])))


def test_pairs_from_csv_and_folder(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image_a,image_b,same_person\na.jpg,b.jpg,yes\na.jpg,c.jpg,no\nb.jpg,c.jpg,1\n")
    assert calibrate.read_pairs(path) == [("a.jpg", "b.jpg", True), ("a.jpg", "c.jpg", False), ("b.jpg", "c.jpg", True)]
    path.write_text("image_a,image_b,same_person\na.jpg,b.jpg,maybe\n")
    with pytest.raises(ValueError):
        calibrate.read_pairs(path)
    pairs = calibrate.folder_pairs({"a1": "a", "a2": "a", "b1": "b"})
    assert sorted(pairs) == [("a1", "a2", True), ("a1", "b1", False), ("a2", "b1", False)]
    vectors = {"a1": np.array([1.0, 0.0]), "a2": np.array([0.8, 0.6]), "b1": None}
    scores = calibrate.score_pairs(pairs, vectors.get)
    assert scores.genuine.tolist() == [pytest.approx(0.8)] and scores.impostor.size == 0
    assert scores.skipped == ["b1: no face found"]
