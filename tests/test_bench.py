import pytest
import torch

from stainmil.model import nested_reference as reference
from tests.model.test_hierarchical import model_for, random_bags


@pytest.mark.parametrize("attention,identity", [("tanh", "none"), ("gated", "none"), ("tanh", "embedding")])
def test_vectorised_forward_equals_the_old_nested_loops(attention, identity):
    bags = random_bags(n_cases=8)
    model = model_for(bags, attention, stain_identity=identity).double().eval()
    batch = bags.batch(bags.case_ids)
    batch.features = batch.features.double()
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, reference.nested_forward(model, batch), atol=1e-10)


def test_bench_runs_end_to_end_on_the_tiny_preset(tmp_path):
    from stainmil.bench import run_bench

    figures = run_bench(tmp_path, "tiny", "cpu", old_cases=2, rounds=1, log=lambda *_: None)
    for key in ("backbone_forward_img_s", "extraction_img_s", "extraction_over_forward", "epoch_s_feature_store",
                "epoch_s_old_way", "epoch_s_online_finetune_1_block", "epoch_speedup", "vectorised_speedup",
                "train_peak_rss_mb_store", "train_peak_rss_mb_online_finetune", "process_peak_rss_mb",
                "fwd_bwd_ms_projector_floor", "head_step_over_projector_floor"):
        assert figures[key] > 0, key
    assert figures["max_abs_logit_difference"] < 1e-5
    assert list(tmp_path.glob("bench-tiny-densenet121-32px-patches-cpu.json"))


def test_bench_extraction_from_slides_with_a_vit(tmp_path):
    from stainmil.bench import run_bench

    figures = run_bench(tmp_path, "tiny", "cpu", rounds=1, backbone_name="kaiko_vits16", slides=True,
                        extraction_only=True, log=lambda *_: None)
    assert figures["encoder"] == "kaiko_vits16" and "slides" in figures["patch_source"]
    assert figures["extraction_img_s"] > 0 and figures["backbone_forward_img_s"] > 0
    assert "epoch_s_feature_store" not in figures


def test_scale_bench_trains_bounded_and_in_memory_in_fresh_processes(tmp_path):
    from stainmil.bench_scale import run_scale

    table = run_scale(tmp_path, scales=(1, 2), cache_mb=1, epochs=1, memory_up_to=1, base_cases=6,
                      log=lambda *_: None)
    assert list(table["scale"]) == ["1x", "1x", "2x"]  # 2x is past memory_up_to: bounded only
    assert list(table["reading"]) == ["cache 1 MB", "whole store in memory", "cache 1 MB"]
    assert (table["epoch_s"] > 0).all() and (table["peak_rss_mb"] > 100).all()
    assert table["patches"].iloc[2] > table["patches"].iloc[0] and (tmp_path / "scale.md").is_file()
