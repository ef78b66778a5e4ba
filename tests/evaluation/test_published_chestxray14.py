"""CheXNet's Table 1 on ChestX-ray14 as package data, and the side-by-side rows for a multi-label run."""

from __future__ import annotations

import pytest

from medtransfer.evaluation.published import chestxray14_comparison, chestxray14_section, published_chestxray14

CHEXNET = {
    "Atelectasis": 0.8094, "Cardiomegaly": 0.9248, "Effusion": 0.8638, "Infiltration": 0.7345, "Mass": 0.8676,
    "Nodule": 0.7802, "Pneumonia": 0.7680, "Pneumothorax": 0.8887, "Consolidation": 0.7901, "Edema": 0.8878,
    "Emphysema": 0.9371, "Fibrosis": 0.8047, "Pleural Thickening": 0.8062, "Hernia": 0.9164,
}


def test_the_table_is_package_data_with_chexnets_figures():
    table = published_chestxray14()
    assert table.findings == tuple(CHEXNET) and table.official_test_images == 25596
    by_source = {s["source"]: s for s in table.sources}
    assert by_source["Rajpurkar et al. 2017 (CheXNet)"]["auroc"] == CHEXNET
    assert by_source["Wang et al. 2017"]["auroc"]["Atelectasis"] == 0.716
    assert by_source["Yao et al. 2017"]["auroc"]["Hernia"] == 0.914
    assert all(set(s["auroc"]) == set(CHEXNET) for s in table.sources)
    assert "arXiv:1711.05225" in table.table and "different test set" in table.note


def test_rows_match_nih_names_and_are_labelled_a_different_test_set():
    block = {"n": 800, "findings": {"Pleural_Thickening": {"auc": 0.81, "auc_ci": [0.75, 0.86]},
                                    "cardiomegaly": {"auc": 0.9}, "Lung Lesion": {"auc": 0.7}, "Hernia": {"n_known": 5}}}
    found = chestxray14_comparison(block)
    assert [r["finding"] for r in found.rows] == ["Pleural_Thickening", "cardiomegaly", "Hernia"]
    first = found.rows[0]
    assert first["published_name"] == "Pleural Thickening" and first["auc"] == 0.81 and first["auc_ci"] == [0.75, 0.86]
    assert first["Rajpurkar et al. 2017 (CheXNet)"] == 0.8062 and first["Wang et al. 2017"] == 0.708
    assert found.rows[2]["auc"] is None  # no AUC on this run's data: shown as a dash
    assert found.unmatched == ["Lung Lesion"] and not found.official_test_split
    assert found.label.startswith("Different test set")
    section = chestxray14_section(block)
    assert "Different test set" in section and "0.8062" in section and "Lung Lesion" in section


def test_the_official_split_is_said_only_when_the_caller_says_so():
    block = {"n": 25596, "findings": {"Mass": {"auc": 0.85}}}
    assert "size of the official test split" in chestxray14_comparison(block).label
    official = chestxray14_comparison(block, official_test_split=True)
    assert official.official_test_split and "official test split" in official.label
    assert not official.label.startswith("Different test set")


@pytest.mark.parametrize("block", [{"n": 10, "auc": 0.9}, {"findings": {"Foo": {"auc": 0.5}}}, {"findings": {}}])
def test_no_rows_for_single_label_blocks_or_other_findings(block):
    assert chestxray14_comparison(block) is None and chestxray14_section(block) == ""
