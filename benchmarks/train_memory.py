"""Where a training process's memory goes: resident memory (total, anonymous, file-backed) sampled every second while
``stainmil train`` runs a config, with marks when the cohort is loaded and each epoch starts and ends.

    python benchmarks/train_memory.py CONFIG.yaml OUT.jsonl

One JSON line per sample or mark (MB from /proc/self/status: VmRSS, VmHWM = the peak so far, RssAnon, RssFile);
the marks are printed too. Used on the scale stores of ``stainmil bench scale`` (docs/performance.md).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from stainmil.config import load_config
from stainmil.train import trainer


def status() -> dict[str, int]:
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    started, lock = time.perf_counter(), threading.Lock()
    log = out.open("w")

    def write(mark: str = "") -> None:
        row = {"t": round(time.perf_counter() - started, 1), **({"mark": mark} if mark else {}), **status()}
        with lock:
            log.write(json.dumps(row) + "\n")
            log.flush()
        if mark:
            print(json.dumps(row), flush=True)

    def poll() -> None:
        while True:
            write()
            time.sleep(1.0)

    def marked(function, before: str, after: str):
        def wrapper(*args, **kwargs):
            if before:
                write(before)
            result = function(*args, **kwargs)
            write(after)
            return result
        return wrapper

    threading.Thread(target=poll, daemon=True).start()
    trainer.load_cohort = marked(trainer.load_cohort, "", "cohort loaded")
    trainer.run_epoch = marked(trainer.run_epoch, "epoch start", "epoch end")
    trainer.evaluate_loss = marked(trainer.evaluate_loss, "", "validated")
    write("start")
    trainer.train(config)
    write("done")


if __name__ == "__main__":
    main()
