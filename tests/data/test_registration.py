"""`stainmil register` on a tiled serial cohort: one transform per IHC slice, a verdict and reason for each,
resumable, an unreadable slide named and the others registered."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stainmil.data.register_cohort import register_cohort
from stainmil.data.registration import read_pair
from stainmil.pipeline import tile_cohort
from tests.conftest import made_once, slide_config

REGISTERED = ("register.max_side=192", "register.nonrigid=false")  # coarse and affine on small thumbnails


@pytest.fixture(scope="session")
def registered_tiles(serial_cohort, tmp_path_factory) -> Path:
    """The serial cohort tiled and registered (:data:`REGISTERED`) once per test run, shared by every worker: a test
    copies it into its own folder, where tile and register then resume (read it, never write into it)."""
    def build(folder: Path) -> None:
        config = slide_config(serial_cohort, folder, *REGISTERED)
        tile_cohort(config)
        register_cohort(config)

    return made_once(tmp_path_factory, "registered_tiles", build) / "tiles"


def tiled_and_registered(registered_tiles: Path, config):
    """``config``'s tile folder as a copy of the shared registered one; ``tile`` and ``register`` resume there."""
    import shutil

    shutil.copytree(registered_tiles, config.tile.out_dir)
    tile_cohort(config)
    return register_cohort(config)


def trained_and_analysed(config, tmp_path):
    """Extract, split, train, evaluate and analyse (test cases) ``config``'s tiled cohort: (run folder, analysis)."""
    from stainmil.analysis.analyze import write_analysis
    from stainmil.data.cohort import load_manifest
    from stainmil.evaluate.evaluation import evaluate_run
    from stainmil.features.extract import extract_features
    from stainmil.pipeline import split_cohort
    from stainmil.train.trainer import train

    extract_features(config, load_manifest(config))
    split_cohort(config)
    config = config.with_overrides({"train.runs_dir": str(tmp_path / "runs")})
    run = train(config).run_dir
    evaluate_run(run)
    return run, write_analysis(run, "test")


def test_register_every_ihc_slice_resumably_and_name_failures(serial_cohort, registered_tiles, tmp_path):
    """Every IHC slice registered onto its case's H&E slice, a vanished slide named, nothing registered twice, a
    damaged transform redone. Starts from the shared registration with cases 1, 2 and 6 not yet registered (as after
    a crash): those are registered here, the rest resume."""
    import shutil

    config = slide_config(serial_cohort, tmp_path, *REGISTERED)
    shutil.copytree(registered_tiles, config.tile.out_dir)
    for case in ("1", "2", "6"):
        for done in (tmp_path / "tiles" / "registration" / "transforms").glob(f"case{case}_*.h5"):
            done.unlink()
    tile_cohort(config)
    tiles = tmp_path / "tiles" / "tiles.csv"
    table = pd.read_csv(tiles, dtype=str)
    table.loc[(table["case"] == "6") & (table["stain"] == "melan"), "slide"] = str(tmp_path / "gone.tiff")
    table.to_csv(tiles, index=False)  # case 6's Melan-A slide has vanished since tiling
    result = register_cohort(config)
    assert len(result.table) == 11 and set(result.table["stain"]) == {"melan", "sox10"}
    assert (result.table["fixed_stain"] == "he").all() and (result.table["candidates"] == 1).all()
    assert list(result.errors) == ["case 6 melan slice 0 -> he slice 0"] and "gone.tiff" in result.errors[
        "case 6 melan slice 0 -> he slice 0"]
    assert (result.table["verdict"] != "failed").sum() >= 6  # coarse and affine only here: the orchestration
    report = (result.out_dir / "register_report.txt").read_text()
    assert "gone.tiff" in report and "aligned" in report
    transform, attrs = read_pair(result.table["transform"].iloc[0])
    assert transform.affine.shape == (3, 3) and attrs["case"] == result.table["case"].iloc[0]
    assert attrs["moving_mpp"] == attrs["fixed_mpp"] == 0.25
    stamps = {p: os.stat(p).st_mtime_ns for p in (result.out_dir / "transforms").glob("*.h5")}
    again = register_cohort(config)  # resumes: nothing registered twice
    assert {p: os.stat(p).st_mtime_ns for p in (result.out_dir / "transforms").glob("*.h5")} == stamps
    pd.testing.assert_frame_equal(again.table, result.table)
    damaged = Path(result.table["transform"].iloc[1])  # a crash or a bad copy: resumed, it is found and redone
    damaged.write_bytes(damaged.read_bytes()[:200])
    redone = register_cohort(config)
    assert f"{damaged.name} was damaged" in (result.out_dir / "register_report.txt").read_text()
    assert [p for p in redone.pairs if p.get("redone")][0]["transform"] == str(damaged)
    pd.testing.assert_frame_equal(redone.table.drop(columns=["seconds"]), result.table.drop(columns=["seconds"]))


def test_pairs_registered_in_two_processes_equal_those_registered_one_by_one(serial_cohort, registered_tiles,
                                                                             tmp_path, capsys):
    """``register.workers=2`` (``register --workers 2``): the pairs of cases 3, 4 and 5 registered in two worker
    processes give the very transforms and verdicts the shared registration made one pair after another."""
    import shutil

    config = slide_config(serial_cohort, tmp_path, *REGISTERED, "register.workers=2")
    shutil.copytree(registered_tiles, tmp_path / "tiles")
    redo = sorted((tmp_path / "tiles" / "registration" / "transforms").glob("case[345]_*.h5"))
    assert len(redo) == 6
    for path in redo:
        path.unlink()
    tile_cohort(config)
    result = register_cohort(config)
    assert "6 job(s) in 2 processes" in capsys.readouterr().out  # the 6 done ones read back here
    for path in redo:
        (mine, attrs), (shared, before) = read_pair(path), read_pair(registered_tiles / "registration" /
                                                                     "transforms" / path.name)
        assert attrs["verdict"] == before["verdict"] and attrs["reason"] == before["reason"], path.name
        if shared is not None:
            for part in ("affine", "u", "v"):
                np.testing.assert_array_equal(getattr(mine, part), getattr(shared, part), err_msg=path.name)
    table = pd.read_csv(registered_tiles / "registration" / "registrations.csv", dtype={"case": str, "slice": str})
    pd.testing.assert_frame_equal(result.table.drop(columns=["seconds", "transform"]).astype(str),
                                  table.drop(columns=["seconds", "transform"]).astype(str))


def test_analysis_maps_ihc_attention_onto_the_he_patches(serial_cohort, registered_tiles, tmp_path):
    config = slide_config(serial_cohort, tmp_path, *REGISTERED, "split.method=holdout", "split.val_fraction=0.34",
                          "split.test_fraction=0.34", "train.max_epochs=2")
    registered = tiled_and_registered(registered_tiles, config)
    run, result = trained_and_analysed(config, tmp_path)
    per_case = pd.read_csv(result.out_dir / "colocated_cases.csv", dtype={"case": str})
    tested = set(result.tables.cases["case"])
    assert set(per_case["case"]) == tested and set(per_case["stain"]) == {"melan", "sox10"}
    aligned = per_case[per_case["verdict"] == "aligned"]
    assert len(aligned) and (aligned["landed"] > 0.5).all() and aligned["overlap"].between(0, 1).all()
    assert aligned["landed"].mean() > 0.7  # most IHC attention lands on H&E patches (edges and torn pieces: not)
    per_patch = pd.read_csv(result.out_dir / "colocated.csv", dtype={"case": str})
    he = result.tables.patches[(result.tables.patches["stain"] == "he")
                               & result.tables.patches["case"].isin(aligned["case"])]
    assert len(per_patch) == len(he) and (per_patch["stain"] == "he").all()
    for stain in set(aligned["stain"]):
        assert per_patch[f"{stain}_patches"].sum() > 0
    assert set(registered.table["case"]) >= tested
    # QuPath: the aligned IHC slices' attention also drawn on their H&E slide, in its level-0 pixels
    from stainmil.analysis.qupath import export_folder
    from stainmil.slides.reader import Slide

    exported = export_folder(run, "test")
    on_he = [p for p in exported.files if "__on_he_slice" in p.name]
    assert len(on_he) == len(aligned)
    index = pd.read_csv(exported.out_dir / "index.csv", dtype={"case": str})
    for path in on_he:
        collection = json.loads(path.read_text())
        row = index[index["file"] == path.name].iloc[0]
        width, height = Slide(row["image"]).dimensions
        ring = np.array([f["geometry"]["coordinates"][0] for f in collection["features"]]).reshape(-1, 2)
        assert row["coordinates"].startswith("level-0 pixels of the he slide")
        assert (ring > -64).all() and (ring[:, 0] < width + 64).all() and (ring[:, 1] < height + 64).all()
    # the report: each H&E slice with the registered IHC attention on it, in viewers that pan and zoom together
    from stainmil.analysis.report import build_report
    from tests.analysis.test_report import opened

    html = build_report(run, result)
    text = html.read_text()
    assert "attention mapped onto it" in text
    with opened(html) as (page, errors):
        linked = page.evaluate("""() => {
            const groups = {};
            document.querySelectorAll('figure.viewer').forEach(f => (groups[f.dataset.link] ||= []).push(f.id));
            return Object.values(groups).filter(g => g.length > 1)[0];
        }""")
        assert linked and len(linked) >= 2
        page.click(f"#{linked[0]} .zoom-in")
        zooms = [page.eval_on_selector(f"#{v} .stage", "s => s.dataset.zoom") for v in linked]
        assert float(zooms[0]) > 1 and len(set(zooms)) == 1  # the registered viewers followed the H&E one
        page.click(f"#{linked[-1]} .zoom-reset")
        assert {page.eval_on_selector(f"#{v} .stage", "s => s.dataset.zoom") for v in linked} == {"1.000"}
        assert not errors, errors


def test_the_aligned_model_trains_predicts_and_explains_on_registered_slices(serial_cohort, registered_tiles,
                                                                             tmp_path):
    """Registered slices place each IHC patch on an H&E patch; `model.architecture: aligned` trains on those
    places, is evaluated, analysed and predicts new cases; without a registration it says what to run."""
    from stainmil.analysis.analyze import write_analysis
    from stainmil.data.cohort import load_manifest
    from stainmil.data.registration import patch_alignment
    from stainmil.errors import ConfigError
    from stainmil.evaluate.evaluation import evaluate_run
    from stainmil.features.extract import extract_features
    from stainmil.pipeline import predict_as_new, split_cohort
    from stainmil.train.checkpoint import load_checkpoint
    from stainmil.train.trainer import train

    config = slide_config(serial_cohort, tmp_path, *REGISTERED, "split.method=holdout", "split.val_fraction=0.34",
                          "split.test_fraction=0.34", "train.max_epochs=2", "model.architecture=aligned")
    registered = tiled_and_registered(registered_tiles, config).table
    manifest = load_manifest(config)
    hidden = config.paths.registration_dir.rename(tmp_path / "hidden")
    with pytest.raises(ConfigError, match="stainmil register"):  # tiled, not registered: it says what to run
        patch_alignment(config, manifest)
    hidden.rename(config.paths.registration_dir)
    alignment = patch_alignment(config, manifest)
    stains = manifest["stain"].to_numpy()
    assert (alignment.anchor[stains == "he"] == np.flatnonzero(stains == "he")).all()
    aligned = registered[registered["verdict"] == "aligned"]
    assert len(aligned) >= 4
    for reg in aligned.itertuples():
        rows = np.flatnonzero((manifest["case"] == reg.case) & (manifest["stain"] == reg.stain)
                              & (manifest["slice"] == reg.slice))
        he_rows = np.flatnonzero((manifest["case"] == reg.case) & (stains == "he"))
        placed = alignment.anchor[rows] >= 0
        assert placed.mean() > 0.6 and np.isin(alignment.anchor[rows][placed], he_rows).all()
    unaligned = registered[registered["verdict"] != "aligned"]
    for reg in unaligned.itertuples():
        rows = (manifest["case"] == reg.case) & (manifest["stain"] == reg.stain) & (manifest["slice"] == reg.slice)
        assert (alignment.anchor[rows.to_numpy()] == -1).all()

    extract_features(config, manifest)
    split_cohort(config)
    config = config.with_overrides({"train.runs_dir": str(tmp_path / "runs")})
    run = train(config).run_dir
    from stainmil.config import load_config
    assert load_config(run / "config.yaml").model.architecture == "aligned"
    evaluation = evaluate_run(run)
    assert evaluation.predictions["prob_1"].between(0, 1).all() and len(evaluation.predictions) == 6
    analysis = write_analysis(run, "test")
    patches = analysis.tables.patches
    from stainmil.analysis.report import build_report
    assert "attention mapped onto it" in build_report(run, analysis).read_text()
    per_case = patches.groupby("case")["effective_attention"].sum()
    assert np.allclose(per_case, 1, atol=1e-4)
    assert (patches["effective_attention"] > 0).all()  # IHC slices keep their own attention beside the places
    assert "place_gate" in load_checkpoint(run / "checkpoints" / "best.pth")["model"]
    predictions = pd.read_csv(predict_as_new(config, run, tmp_path / "new") / "predictions.csv")
    assert len(predictions) > 0 and predictions["prob_1"].between(0, 1).all()
    # registered again (other verdicts): the run's patches would move, so it says so instead of evaluating
    registered_file = tmp_path / "tiles" / "registration" / "registrations.csv"
    original = registered_file.read_text()
    table = pd.read_csv(registered_file, dtype=str)
    table["verdict"] = "failed"
    table.to_csv(registered_file, index=False)
    from stainmil.errors import DataError
    with pytest.raises(DataError, match="other registrations"):
        evaluate_run(run)
    registered_file.write_text(original)
    assert len(evaluate_run(run).predictions) == 6


SCANNER_NAMES = {"he": ["HE", "H&E"], "melan": ["MelanA", "Melan-A"], "sox10": ["SOX10", "Sox10"]}


def scanner_named(serial_cohort, folder, stains=("he", "melan", "sox10")):
    """The serial cohort's slides as a scanner/LIS export names them: ``C0003_H&E_S0.tiff`` (leading zeros, stains
    spelled each way by turns)."""
    folder.mkdir()
    for path in sorted((serial_cohort / "slides").rglob("*.tiff")):
        case, stain = path.parent.parent.name.removeprefix("case"), path.parent.name
        if stain in stains:
            spelling = SCANNER_NAMES[stain][int(case) % 2]
            (folder / f"C{int(case):04d}_{spelling}_S{path.stem.removeprefix('slice')}.tiff").symlink_to(path)
    return folder


def test_stains_named_as_scanners_write_them_register_align_and_explain(serial_cohort, tmp_path):
    """Slides called HE, H&E, SOX10, MelanA, Melan-A with leading-zero case ids: registered onto the H&E slices,
    the aligned model trains on them, co-located attention and the QuPath export on the H&E slide follow."""
    from stainmil.analysis.qupath import export_folder
    from stainmil.data.cohort import load_manifest
    from stainmil.data.registration import patch_alignment

    slides = scanner_named(serial_cohort, tmp_path / "export")
    assert {p.name.split("_")[1] for p in slides.iterdir()} == {"HE", "H&E", "MelanA", "Melan-A", "SOX10", "Sox10"}
    config = slide_config(serial_cohort, tmp_path, f"tile.slices_dir={slides}",
                          r"tile.filename_pattern=C(?P<case>\d+)_(?P<stain>[^_]+)_S(?P<slice>\d+)",
                          "register.reference_stain=H&E", "register.max_side=192", "register.nonrigid=false",
                          "split.method=holdout", "split.val_fraction=0.34", "split.test_fraction=0.34",
                          "train.max_epochs=2", "model.architecture=aligned")
    tile_cohort(config)
    assert set(pd.read_csv(tmp_path / "tiles" / "tiles.csv", dtype=str)["stain"]) == {
        "HE", "H&E", "MelanA", "Melan-A", "SOX10", "Sox10"}  # tiles.csv keeps what the files say
    registered = register_cohort(config).table
    assert len(registered) == 12 and set(registered["stain"]) == {"melan", "sox10"}
    assert (registered["fixed_stain"] == "he").all() and set(registered["case"]) == {str(c) for c in range(1, 7)}
    assert (registered["verdict"] == "aligned").sum() >= 4
    manifest = load_manifest(config)
    assert set(manifest["stain"]) == {"he", "melan", "sox10"}
    placed = patch_alignment(config, manifest).anchor
    assert (placed[(manifest["stain"] != "he").to_numpy()] >= 0).mean() > 0.3  # IHC patches found their places
    run, analysis = trained_and_analysed(config, tmp_path)
    per_case = pd.read_csv(analysis.out_dir / "colocated_cases.csv", dtype={"case": str})
    assert set(per_case["stain"]) <= {"melan", "sox10"} and (per_case["verdict"] == "aligned").any()
    assert per_case.loc[per_case["verdict"] == "aligned", "landed"].gt(0.5).all()
    on_he = [p for p in export_folder(run, "test").files if "__on_he_slice" in p.name]
    assert len(on_he) == (per_case["verdict"] == "aligned").sum()


def test_register_says_what_it_looked_for_when_it_registers_nothing(serial_cohort, tmp_path):
    """IHC slides but no H&E slide in any case: one sentence naming the stain looked for and those found, a
    non-zero exit, no registrations.csv that would look finished."""
    from typer.testing import CliRunner

    from stainmil.cli import app
    from stainmil.config import dump_config
    from stainmil.errors import DataError

    slides = scanner_named(serial_cohort, tmp_path / "export", stains=("melan", "sox10"))
    config = slide_config(serial_cohort, tmp_path, f"tile.slices_dir={slides}",
                          r"tile.filename_pattern=C(?P<case>\d+)_(?P<stain>[^_]+)_S(?P<slice>\d+)")
    tile_cohort(config)
    with pytest.raises(DataError, match=r"looked for he slices .*found the stains \['melan', 'sox10'\]"):
        register_cohort(config)
    out = tmp_path / "tiles" / "registration"
    assert not (out / "registrations.csv").exists() and "case 1 has no he slice" in (
        out / "register_report.txt").read_text()
    result = CliRunner().invoke(app, ["register", "--config", str(dump_config(config, tmp_path / "c.yaml"))])
    assert result.exit_code != 0 and "no slice registered" in result.output
    config = config.with_overrides({"register.reference_stain": "CD3"})
    with pytest.raises(Exception, match="register.reference_stain 'CD3'"):
        register_cohort(config)


@pytest.mark.slow
def test_an_outline_carried_onto_an_ihc_section_lands_within_the_landmark_error(serial_demo):
    """A region drawn on the H&E, carried through the pair's registration onto the IHC section (flipped, warped):
    its centroid lies where the same region is on that section, within the pair's own landmark error."""
    import shapely
    from shapely.geometry import Polygon

    from stainmil.data.registration import carry_geometry

    demo = json.loads((serial_demo / "demo_result.json").read_text())
    table = pd.read_csv(os.path.join(demo["tiles"], "registration", "registrations.csv"), dtype=str)
    aligned = table[table["verdict"] == "aligned"]
    assert len(aligned) >= 2
    slices = serial_demo / "cohort" / "slices"
    for row in aligned.head(4).itertuples(index=False):
        def landmarks(stain, slice_id, case=row.case):
            found = pd.read_csv(slices / f"case{case}" / stain / f"slice{slice_id}_landmarks.csv").set_index("id")
            return found[["x", "y"]].astype(float) * 2  # slice px -> level-0 px of the 2x-upsampled slide
        fixed, moving = landmarks(row.fixed_stain, row.fixed_slice), landmarks(row.stain, row.slice)
        common = fixed.index.intersection(moving.index)
        transform, attrs = read_pair(row.transform)
        mapped = transform.fixed_to_moving(fixed.loc[common].to_numpy() * attrs["fixed_mpp"]) / attrs["moving_mpp"]
        errors = np.hypot(*(mapped - moving.loc[common].to_numpy()).T)
        # a region: the outline through the section's outermost landmarks, as a pathologist draws round a lesion
        hull = shapely.convex_hull(shapely.MultiPoint(fixed.loc[common].to_numpy()))
        ids = [common[np.argmin(np.hypot(*(fixed.loc[common].to_numpy() - v).T))] for v in hull.exterior.coords[:-1]]
        true_place = Polygon(moving.loc[ids].to_numpy())           # the same vertices on the IHC section
        carried = carry_geometry(Polygon(fixed.loc[ids].to_numpy()), row.transform)
        assert carried.is_valid and carried.area == pytest.approx(true_place.area, rel=0.25)
        miss = shapely.distance(carried.centroid, true_place.centroid)
        assert miss <= np.quantile(errors, 0.9) + 2.0, (row.case, row.stain, miss, np.quantile(errors, 0.9))
        # densified: the carried outline follows the field between vertices, more points than the drawing
        assert shapely.get_num_coordinates(carried) > len(ids) + 1


@pytest.mark.slow
def test_one_he_outline_scores_every_stain_through_the_registration(serial_demo, tmp_path):
    """analysis.truth_from_reference: with outlines only on the H&E, the aligned IHC slides are scored against the
    carried outline (close to their own), the doubtful and failed ones are named and left out."""
    import shutil

    from stainmil.analysis.truth import patch_truth
    from stainmil.config import load_config

    demo = json.loads((serial_demo / "demo_result.json").read_text())
    run = demo["run"]
    config = load_config(os.path.join(run, "config.yaml"))
    own = Path(config.analysis.truth.split("case{case}")[0])
    he_only = tmp_path / "he_only"
    for path in own.glob("case*/he/*.geojson"):
        target = he_only / path.relative_to(own)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    patches = pd.read_csv(os.path.join(run, "attention", "patches.csv"), dtype={"case": str, "slice": str,
                                                                                "patch": str})
    carried_config = config.with_overrides({"analysis.truth": str(he_only / "case{case}" / "{stain}" /
                                                                  "slice{slice}.geojson"),
                                            "analysis.truth_from_reference": True})
    carried = patch_truth(carried_config, patches)
    reference = patch_truth(config, patches).table.set_index(["case", "stain", "slice", "patch"])
    sources = set(carried.table["truth_source"])
    assert "outline" in sources and any(s.startswith("carried from he slice") for s in sources)
    table = pd.read_csv(os.path.join(demo["tiles"], "registration", "registrations.csv"), dtype=str)
    analysed = set(zip(patches["case"], patches["stain"], patches["slice"]))
    not_aligned = [r for r in table.itertuples() if r.verdict != "aligned" and (r.case, r.stain, r.slice) in analysed]
    for r in not_aligned:
        assert any(f"case {r.case} {r.stain} slice {r.slice}" in n and r.verdict in n for n in carried.notes)
    ihc = carried.table[carried.table["truth_source"] != "outline"].set_index(["case", "stain", "slice", "patch"])
    agree = (ihc["lesion_fraction"] > 0) == (reference.loc[ihc.index, "lesion_fraction"] > 0)
    assert carried.carried >= 2 and agree.mean() > 0.8
