"""Border evidence: the share of a heatmap's mass in the outer band and the corners, and its flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medtransfer.errors import ConfigError
from medtransfer.explain.border import band_masks, border_shares, summarise


def test_band_and_corner_masks_cover_the_stated_areas():
    edge, corners = band_masks(100, 100, 0.1)
    assert edge.mean() == pytest.approx(1 - 0.8**2) and corners.mean() == pytest.approx(4 * 0.1**2)
    assert edge[0, 50] and edge[50, 95] and not edge[10, 50] and corners[95, 3] and not corners[0, 50]
    with pytest.raises(ConfigError, match="--band: got 0.5"):
        band_masks(10, 10, 0.5)


def test_shares_of_uniform_central_corner_and_empty_maps():
    maps = np.zeros((4, 50, 50))
    maps[0] = 1.0  # uniform: the shares are the area shares
    maps[1, 20:30, 20:30] = 0.7  # all in the middle
    maps[2, :5, :5] = 1.0  # all in one corner
    maps[2, 25, 25] = -3.0  # negative values carry no evidence
    edge, corner = border_shares(maps, 0.1)
    assert edge == pytest.approx([0.36, 0.0, 1.0, 0.0]) and corner == pytest.approx([0.04, 0.0, 1.0, 0.0])


def test_summary_flags_images_above_twice_the_band_area():
    block = summarise(np.array([0.36, 0.72, 0.73, 0.9]), np.array([0.04, 0.1, 0.2, 0.3]))
    assert block["flag_above"] == pytest.approx(0.72) and block["n_flagged"] == 2 and block["flagged_fraction"] == 0.5
    assert block["mean_band_share"] == pytest.approx(0.6775) and block["mean_corner_share"] == pytest.approx(0.16)


def test_captions_name_images_by_their_shareable_names_unless_the_run_keeps_identifiers(tmp_path, monkeypatch):
    from medtransfer.artifacts import load_model
    from medtransfer.data.discover import discover
    from medtransfer.explain.border import write_border_evidence
    from tests.tiny_runs import fake_home, kermany_set, local_needles, tiny_run, write_test_predictions

    home = fake_home(tmp_path, monkeypatch)
    records = discover(kermany_set(home / "xr", splits={"test": 2}))
    run = tiny_run(home / "runs" / "demo", records)
    write_test_predictions(run)
    saved = load_model(run)

    shared = write_border_evidence(run, saved, worst=4)  # config.yaml: keep_identifiers false
    kept = write_border_evidence(run, saved, worst=4, keep_names=True)

    patients = {r.patient_id for r in records}
    captions = [item["caption"] for item in shared["gallery"]]
    assert len(captions) == 4 and all(caption.startswith("pid-") for caption in captions)
    assert not [c for c in captions for needle in (*patients, *local_needles(tmp_path, home)) if needle in c]
    assert sorted(item["caption"].split(":")[0] for item in kept["gallery"]) == sorted(Path(r.path).name for r in records)
