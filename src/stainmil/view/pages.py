"""The JSON the viewer's pages read, built from a source's tables as plain functions (tested without a server):
the case list, one case's slices with their overlays, registration links and outline routes.

Case ids stay text (``007`` stays ``007``); numbers that are not known are ``null``, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.analysis.heatmaps import colour_legends, hex_colour, patch_colours
from stainmil.view.folder import SlideEntry, patch_positions_of
from stainmil.view.source_state import SourceState

PATCH_FIELDS = ["patch", "x", "y", "effective_attention", "relative_attention", "patch_prob", "rank_in_case",
                "patch_weight"]
LESION_COLUMNS = ["attention_lesion_auc", "attention_topk_precision", "attention_pointing"]  # cases.csv, with a truth


def case_list(state: SourceState, source_names: list[str], folder_notes: list[str]) -> dict:
    """Every case of the source: label, prediction, probabilities, stain weights, registration verdicts and
    lesion measures, plus the class names and notes the list page shows."""
    source = state.source
    names = state.class_names
    readable = [n.replace("_", "-") for n in names]
    cases = source.table("cases")
    predictions = source.table("predictions")
    if cases.empty:
        cases = source.table("patches")[["case"]].drop_duplicates()
    registrations = state.registrations
    verdicts: dict[str, list[str]] = {}
    if registrations is not None:
        for row in registrations.itertuples(index=False):
            verdicts.setdefault(str(row.case), []).append(f"{row.stain} {row.slice}: {row.verdict}")
    prob_columns = [f"prob_{k}" for k in range(len(names))]
    by_case = predictions.set_index("case") if "case" in predictions.columns and len(predictions) else None
    stain_columns = [c for c in cases.columns if c.startswith("stain_weight_")]
    lesion_columns = [c for c in LESION_COLUMNS if c in cases.columns]
    rows = []
    for row in cases.to_dict("records"):
        case = str(row["case"])
        label, pred = int_or_none(row.get("label")), int_or_none(row.get("pred"))
        probs = None
        if by_case is not None and case in by_case.index and all(c in by_case.columns for c in prob_columns):
            found = by_case.loc[case]
            found = found.iloc[0] if isinstance(found, pd.DataFrame) else found
            probs = [float(found[c]) for c in prob_columns]
        prob = float_or_none(row.get("prob"))
        rows.append({
            "case": case,
            "label": readable[label] if label is not None and 0 <= label < len(names) else "",
            "pred": readable[pred] if pred is not None and 0 <= pred < len(names) else "",
            "prob": prob if prob is not None else (max(probs) if probs else None),
            "probs": probs,
            "error": error_kind(label, pred, readable),
            "split": "" if pd.isna(row.get("split", "")) else str(row.get("split", "")),
            "stains": {c[len("stain_weight_"):]: float_or_none(row[c]) for c in stain_columns},
            "registration": "; ".join(verdicts.get(case, [])),
            **{c: float_or_none(row.get(c)) for c in lesion_columns},
        })
    positive = readable[-1] if len(readable) == 2 else ""
    return {"source": source.name, "sources": source_names, "classes": readable,
            "positive": positive, "prob_label": f"P({positive})" if positive else "P(predicted class)",
            "cases": rows, "lesion_columns": lesion_columns, "notes": folder_notes + state.notes}


def case_page(state: SourceState, case: str, listing: dict,
              entry_of: Callable[[tuple[str, str, str], pd.DataFrame], SlideEntry],
              transform_id: Callable[[Path], int]) -> dict | None:
    """One case: each slice with its patches (places, weights, colours), its slide number (``entry_of`` numbers
    a slice), its registration link (``transform_id`` numbers a transform file) and outline route; None when the
    source has no patch of ``case``."""
    patches = state.source.table("patches")
    part = patches[patches["case"] == case]
    if part.empty:
        return None
    slices = state.source.table("slices")
    info = next((r for r in listing["cases"] if r["case"] == case), {"case": case})
    out_slices = []
    for (stain, slice_id), rows in part.groupby(["stain", "slice"], sort=False):
        entry = entry_of((case, stain, slice_id), rows)
        rows = rows.sort_values("rank_in_case") if "rank_in_case" in rows.columns else rows
        side = rows["size0"].to_numpy(float) if "size0" in rows.columns else np.full(len(rows), entry.side)
        fields = {f: rows[f].to_numpy() for f in PATCH_FIELDS if f in rows.columns}
        if entry.kind == "mosaic":
            xs, ys, _ = patch_positions_of(rows)
            fields["x"], fields["y"] = xs, ys
        weights = slices[(slices["case"] == case) & (slices["stain"] == stain) & (slices["slice"] == slice_id)] \
            if not slices.empty else slices
        colours = {value: [hex_colour(c) for c in patch_colours(rows[value].to_numpy(float), value)]
                   for value in ("relative_attention", "patch_prob") if value in rows.columns}
        out_slices.append({
            "id": entry.id, "stain": stain, "slice": slice_id, "kind": entry.kind, "problem": entry.problem,
            "name": entry.path.name if entry.path is not None and entry.kind == "slide" else "",
            "reference": state.canonical(stain) == state.reference,
            "slice_weight": float_or_none(weights["slice_weight"].iloc[0]) if len(weights) else None,
            "stain_weight": float_or_none(weights["stain_weight"].iloc[0]) if len(weights) else None,
            "patches": {**{k: [jsonable(v) for v in values] for k, values in fields.items()},
                        "size": [float(s) for s in side], "colour": colours},
            "mask": entry.mask is not None and entry.mask.is_file(),
            "annotations": any(a is not None for a in entry.annotations),
            "outline": "own" if entry.truth is not None else "",
            "link": None,
        })
    link_slices(state, case, out_slices, transform_id)
    outline_routes(state, out_slices)
    return {"source": state.source.name, "case": info, "slices": out_slices, "notes": state.notes,
            "colour_scales": colour_legends(listing["prob_label"])}


def link_slices(state: SourceState, case: str, slices: list[dict], transform_id: Callable[[Path], int]) -> None:
    """Each IHC slice's registration onto its H&E slice (``slice["link"]``): the transform's number, or why the
    viewers are not linked."""
    registrations = state.registrations
    by_key = {(state.canonical(s["stain"]), s["slice"]): s for s in slices}
    for s in slices:
        if s["reference"]:
            continue
        if registrations is None:
            s["link"] = {"linked": False, "why": "not registered (run `stainmil register` on the tiled slides)"}
            continue
        found = registrations[(registrations["case"] == case)
                              & (registrations["stain"] == state.canonical(s["stain"]))
                              & (registrations["slice"] == s["slice"])]
        if found.empty:
            s["link"] = {"linked": False, "why": "no registration for this slice"}
            continue
        row = found.iloc[0]
        fixed = by_key.get((str(row["fixed_stain"]), str(row["fixed_slice"])))
        link = {"linked": False, "verdict": str(row["verdict"]), "fixed": fixed["id"] if fixed else None,
                "fixed_name": f"{row['fixed_stain']} slice {row['fixed_slice']}",
                "why": str(row.get("reason", "") or "")}
        if fixed is None:
            link["why"] = f"its {link['fixed_name']} is not in this analysis"
        elif row["verdict"] != "aligned":
            link["why"] = f"registration {row['verdict']}: {link['why']}"
        elif not Path(row["transform"]).is_file():
            link["why"] = f"transform file {row['transform']} is missing; re-run `stainmil register`"
        else:
            link.update(linked=True, transform=transform_id(Path(row["transform"])), why="")
        s["link"] = link


def outline_routes(state: SourceState, slices: list[dict]) -> None:
    """Each slice's pathologist outline: "own" (its analysis.truth file), "carried" (none of its own; its
    reference slice's, through an aligned link), "not carried" (the reference has one, the link is not aligned:
    /api/outline says why) or "" (none to show)."""
    if not state.truth_outlines:
        return
    owners = {s["id"] for s in slices if s["outline"] == "own"}
    outlined_references = [s for s in slices if s["reference"] and s["id"] in owners]
    for s in slices:
        if s["outline"] or s["reference"]:
            continue
        link = s["link"] or {}
        if link.get("fixed") in owners:
            s["outline"] = "carried" if link.get("linked") else "not carried"
        elif link.get("fixed") is None and outlined_references:
            s["outline"] = "not carried"


def error_kind(label: int | None, pred: int | None, names: list[str]) -> str:
    """right / false negative / false positive (two classes) / wrong; '' without a label or prediction."""
    if label is None or pred is None or label < 0:
        return ""
    if label == pred:
        return "right"
    if len(names) == 2:
        return "false negative" if label == 1 else "false positive"
    return "wrong"


def int_or_none(value) -> int | None:
    number = float_or_none(value)
    return None if number is None else int(number)


def float_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    return value
