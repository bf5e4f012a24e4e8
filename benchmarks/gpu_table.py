"""The one table of benchmarks/gpu_check.sh, from the JSON/CSV files its bench runs wrote into OUT.

usage: python benchmarks/gpu_table.py OUT DEVICE PRESET SIZE SECONDS [VIT]  (prints markdown; also OUT/gpu_check.md)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def _load(out: Path, pattern: str) -> dict:
    found = sorted(out.glob(pattern))
    if not found:
        raise SystemExit(f"gpu_table: no {pattern} in {out}; a bench step failed (see {out}/log-*.txt).")
    return json.loads(found[-1].read_text())


def rows(out: Path, device: str, preset: str, size: int, vit: str = "uni_v1") -> list[tuple[str, str]]:
    table: list[tuple[str, str]] = []
    first = None
    for backbone in ("densenet121", vit):
        for source, label in (("patches", "PNGs"), ("slides", "slides")):
            b = _load(out, f"bench-{preset}-{backbone}-{size}px-{source}-{device}.json")
            first = first or b
            if source == "patches":
                table.append((f"{backbone} bare forward, batch {b['batch_size']} / best batch "
                              f"{b['best_forward_batch']} ({b['precision']})",
                              f"{b['backbone_forward_img_s']:,} / {b['best_forward_img_s']:,} img/s"))
            table.append((f"extract {backbone} from {label} ({b['decode_workers']} workers, batch {b['batch_size']})",
                          f"{b['extraction_img_s']:,} img/s = {b['extraction_over_best']} of the best forward"))
    feed = pd.DataFrame(_load(out, f"feed-{preset}-{size}px-{device}.json")["rows"])
    for source, part in feed.groupby("source", sort=False):
        table.append((f"feed alone from {source} (no encoder), img/s by decode workers",
                      ", ".join(f"{w}: {r:,.0f}" for w, r in zip(part["workers"], part["img_s"]))))
    b = _load(out, f"bench-{preset}-densenet121-{size}px-patches-{device}.json")
    table.append(("store epoch vs the old way (online frozen CNN)",
                  f"{b['epoch_s_feature_store']} s vs {b['epoch_s_old_way']} s ({b['epoch_speedup']}x)"))
    table.append((f"head step, {b['batch_cases']} cases: vectorised / nested loop / projector floor",
                  f"{b['fwd_bwd_ms_vectorised']} / {b['fwd_bwd_ms_nested_loop']} / {b['fwd_bwd_ms_projector_floor']} ms"
                  f" ({b['vectorised_speedup']}x the loop, {b['head_step_over_projector_floor']}x the floor)"))
    scale = pd.read_csv(out / "scale" / "scale.csv")
    for name, part in scale.groupby("scale", sort=False):
        bounded = part[part["reading"] != "whole store in memory"].iloc[0]
        memory = part[part["reading"] == "whole store in memory"]
        ratio = f" = {bounded['epoch_s'] / memory['epoch_s'].iloc[0]:.2f}x in memory" if len(memory) else ""
        table.append((f"{name} ({bounded['patches']:,} patches): epoch bounded ({bounded['reading']}) vs in memory",
                      f"{bounded['epoch_s']:.2f} s vs {memory['epoch_s'].iloc[0]:.2f} s{ratio}; peak RSS "
                      f"{bounded['peak_rss_mb']:.0f} MB" if len(memory) else f"{bounded['epoch_s']:.2f} s"))
    return [("device", str(first["device"]))] + table


def main() -> None:
    out, device, preset, size, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    vit = sys.argv[6] if len(sys.argv) > 6 else "uni_v1"
    lines = [f"| figure ({preset} preset, {size} px, random weights; {seconds} s in all) | measured |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows(out, device, preset, size, vit)]
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
