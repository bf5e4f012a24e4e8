"""Registration of serial sections with a known answer: landmark error within the goals, flips found, the
transform invertible, pairs from other cases and empty glass failed."""

import numpy as np
import pandas as pd

from stainmil.slides.register import read_section, register_sections
from stainmil.slides.transform import PairTransform
from stainmil.slides.write import write_pyramidal_tiff

SPACING = 0.5  # µm per thumbnail pixel (slides at 0.25 µm/px level 0)


def landmarks_um(cohort, case, stain):
    """Landmarks of a section in level-0 µm (slice px at 0.5 µm/px; pixel centres)."""
    table = pd.read_csv(cohort / "slices" / f"case{case}" / stain / "slice0_landmarks.csv").set_index("id")
    return (table[["x", "y"]] + 0.5) * 0.5


def section(cohort, case, stain):
    return read_section(cohort / "slides" / f"case{case}" / stain / "slice0.tiff", SPACING)


def test_transform_round_trips_both_directions():
    rng = np.random.default_rng(0)
    angle = 0.7
    affine = np.array([[np.cos(angle), -np.sin(angle), 30], [np.sin(angle), np.cos(angle), -12], [0, 0, 1]])
    affine = affine @ np.diag([-1.0, 1, 1])  # with a flip
    u = np.stack([np.sin(np.mgrid[0:64, 0:64][k] / 9) * 1.5 for k in (0, 1)])
    from stainmil.slides.transform import invert_field

    transform = PairTransform(affine, u, invert_field(u, 1.0), 1.0, True)
    points = rng.uniform(5, 60, (50, 2))
    back = transform.moving_to_fixed(transform.fixed_to_moving(points))
    assert np.abs(back - points).max() < 0.05


def test_serial_sections_register_within_the_landmark_goals(serial_cohort):
    errors, verdicts, flips = [], [], []
    for case in (1, 2, 3):
        fixed = section(serial_cohort, case, "he")
        truth_fixed = landmarks_um(serial_cohort, case, "he")
        for stain in ("melan", "sox10"):
            result = register_sections(fixed, section(serial_cohort, case, stain))
            truth = landmarks_um(serial_cohort, case, stain)
            ids = truth.index.intersection(truth_fixed.index)
            mapped = result.transform.moving_to_fixed(truth.loc[ids].to_numpy())
            errors += list(np.linalg.norm(mapped - truth_fixed.loc[ids].to_numpy(), axis=1))
            verdicts.append(result.quality.verdict)
            flips.append(result.transform.flipped)
            assert result.seconds < 30
    assert np.median(errors) <= 25 and np.percentile(errors, 90) <= 60, (np.median(errors), np.percentile(errors, 90))
    assert verdicts.count("aligned") >= 4 and any(flips)  # sections mounted the other way up are found


def test_pairs_from_other_cases_and_empty_glass_fail(serial_cohort, tmp_path):
    failed = [register_sections(section(serial_cohort, case, "he"), section(serial_cohort, case % 6 + 1, stain))
              .quality.verdict for case, stain in ((1, "sox10"), (2, "melan"), (4, "sox10"))]
    assert failed == ["failed"] * 3
    glass = write_pyramidal_tiff(tmp_path / "glass.tiff", np.full((512, 512, 3), 242, np.uint8), mpp=0.25, tile=64)
    result = register_sections(section(serial_cohort, 1, "he"), read_section(glass, SPACING))
    assert result.quality.verdict == "failed" and "no tissue" in result.quality.reason and result.transform is None


def test_the_same_pair_registers_to_the_same_transform_every_time(serial_cohort):
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    fixed, moving = section(serial_cohort, 3, "he"), section(serial_cohort, 3, "melan")
    first, second = register_sections(fixed, moving), register_sections(fixed, moving)
    assert np.array_equal(first.transform.affine, second.transform.affine)
    assert np.array_equal(first.transform.u, second.transform.u)
    assert first.quality == second.quality
    # the screening's fits side by side on three threads (each fit still on one): the very same transform
    threaded = register_sections(fixed, moving, threads=3)
    assert np.array_equal(threaded.transform.affine, first.transform.affine)
    assert np.array_equal(threaded.transform.u, first.transform.u) and threaded.quality == first.quality
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads  # the caller's setting is restored
