"""The viewer's page JSON as plain functions, without a server or a browser."""

import pandas as pd

from stainmil.config import Config
from stainmil.view.folder import SlideEntry, Source
from stainmil.view.pages import case_list, case_page, error_kind, float_or_none
from stainmil.view.source_state import SourceState


def _source(tmp_path) -> Source:
    """A source of two cases: 007 (H&E + SOX10, the SOX10 slice registered) and 010 (H&E only, unlabelled)."""
    attention = tmp_path / "run" / "attention"
    attention.mkdir(parents=True)
    rows = [("007", "HE", "0", 0, 0.5, 0.9), ("007", "HE", "0", 1, 0.5, 0.1),
            ("007", "SOX10", "0", 0, 1.0, 0.8), ("010", "HE", "1", 0, 1.0, float("nan"))]
    pd.DataFrame([{"case": c, "stain": st, "slice": sl, "patch": p, "patch_index": p, "x": 100 * p, "y": 0,
                   "path": f"/slides/{c}_{st}.svs", "level": 0, "size0": 224, "effective_attention": a,
                   "relative_attention": a * 2, "patch_prob": prob, "rank_in_case": p + 1}
                  for c, st, sl, p, a, prob in rows]).to_csv(attention / "patches.csv", index=False)
    pd.DataFrame([{"case": "007", "label": 1, "pred": 0, "prob": 0.4, "stain_weight_he": 0.7,
                   "attention_lesion_auc": 0.8},
                  {"case": "010", "label": float("nan"), "pred": 1, "prob": float("nan"), "stain_weight_he": 1.0,
                   "attention_lesion_auc": float("nan")}]).to_csv(attention / "cases.csv", index=False)
    pd.DataFrame([{"case": "007", "prob_0": 0.6, "prob_1": 0.4}, {"case": "010", "prob_0": 0.2, "prob_1": 0.8}]) \
        .to_csv(tmp_path / "run" / "predictions.csv", index=False)
    return Source(0, ".", tmp_path / "run", None)


def _state(tmp_path) -> SourceState:
    state = SourceState(_source(tmp_path))
    state.__dict__["config"] = Config()  # as a run's config.yaml reads (HE, H&E -> he)
    return state


def test_the_case_list_keeps_ids_as_text_and_never_sends_nan(tmp_path):
    listing = case_list(_state(tmp_path), ["."], ["a folder note"])
    cases = {row["case"]: row for row in listing["cases"]}
    assert list(cases) == ["007", "010"] and listing["classes"] == ["benign", "high-grade"]
    assert cases["007"]["label"] == "high-grade" and cases["007"]["error"] == "false negative"
    assert cases["010"]["label"] == "" and cases["010"]["error"] == ""
    assert cases["010"]["prob"] == 0.8  # no prob in cases.csv: the predicted class's probability
    assert cases["010"]["attention_lesion_auc"] is None and listing["lesion_columns"] == ["attention_lesion_auc"]
    assert listing["notes"] == ["a folder note"] and listing["prob_label"] == "P(high-grade)"


def test_a_case_page_links_what_is_registered_and_says_why_not_otherwise(tmp_path):
    state = _state(tmp_path)
    transform = tmp_path / "pair.h5"
    transform.write_bytes(b"")
    state.__dict__["registrations"] = pd.DataFrame([  # as read_registrations gives it
        {"case": "007", "stain": "sox10", "slice": "0", "fixed_stain": "he", "fixed_slice": "0", "verdict": "aligned",
         "reason": "", "transform": str(transform)}])
    numbered: dict = {}

    def entry_of(key, rows):
        return numbered.setdefault(key, SlideEntry(len(numbered), 0, *key, kind="slide", path=None))

    listing = case_list(state, ["."], [])
    page = case_page(state, "007", listing, entry_of, lambda path: 5)
    by_stain = {s["stain"]: s for s in page["slices"]}
    assert by_stain["HE"]["reference"] and by_stain["HE"]["link"] is None  # HE is the cohort's he
    assert by_stain["SOX10"]["link"] == {"linked": True, "verdict": "aligned", "fixed": by_stain["HE"]["id"],
                                         "fixed_name": "he slice 0", "why": "", "transform": 5}
    assert page["case"]["case"] == "007" and by_stain["HE"]["patches"]["x"] == [0, 100]
    state.registrations.loc[0, "verdict"] = "doubtful"
    state.registrations.loc[0, "reason"] = "coverage 80% < 90%"
    page = case_page(state, "007", listing, entry_of, lambda path: 5)
    link = next(s["link"] for s in page["slices"] if s["stain"] == "SOX10")
    assert not link["linked"] and link["why"] == "registration doubtful: coverage 80% < 90%"
    assert case_page(state, "999", listing, entry_of, lambda path: 5) is None


def test_small_helpers():
    assert error_kind(2, 1, ["a", "b", "c"]) == "wrong" and error_kind(1, 1, ["a", "b"]) == "right"
    assert float_or_none("x") is None and float_or_none(float("nan")) is None and float_or_none("0.5") == 0.5
