"""scripts/distill_study.py --preset=quick: every code path of the study at tiny shapes (a
teacher trained to early stopping, every method, two seeds, statistics, plots and the report),
run twice into two workdirs: the two runs give the same numbers, to the last bit."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from helpers import persistent_compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_study():
    spec = importlib.util.spec_from_file_location(
        "distill_study", os.path.join(REPO, "scripts", "distill_study.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def numbers(results_path) -> dict:
    """Every cached result without its wall time and its paths, by label."""
    with open(results_path) as f:
        data = json.load(f)
    drop = ("seconds", "hf_dir")
    return {v["label"]: {k: x for k, x in v.items() if k not in drop} for v in data.values()}


def test_quick_study_twice_gives_identical_numbers_and_a_full_report(tmp_path):
    """The quick preset in full (two seeds: the statistics, plots and report), then again in a
    fresh workdir for seed 0's block-by-block students (a second teacher trained to early
    stopping, then block, head and end-to-end stages at two widths, computed from nothing):
    every number the two runs share is identical."""
    study = load_study()
    with persistent_compile_cache(str(tmp_path / "jit_cache"), fast_compile=True):
        ra = study.main(["--preset=quick", f"--workdir={tmp_path / 'a'}"])
        rb = study.main(["--preset=quick", "--seeds=1", "--methods=bbb",
                         f"--workdir={tmp_path / 'b'}"])
    a = tmp_path / "a"
    first, second = numbers(a / "results.json"), numbers(tmp_path / "b" / "results.json")
    # The teacher, then 2 seeds x (2 half-width + 6 shallow-student methods); the second run:
    # the teacher and seed 0's block-by-block students (every stage kind, both widths).
    assert len(first) == 1 + 2 * (2 + 6) and len(second) == 1 + 2
    assert second == {label: first[label] for label in second}
    assert ra["code_version"] == rb["code_version"]
    report = (a / "distillation_study.md").read_text()
    for claim in study.CLAIMS.values():
        assert f"**{claim}?**" in report
    assert "not measured" not in report
    for png in ("curves", "cka"):
        assert (a / f"distillation_study_tiny_{png}.png").stat().st_size > 10_000
    # The shallow student at the teacher's width: DistilGPT2's initialisation starts from the
    # teacher's blocks, so it ends closer to the teacher than training from scratch.
    cells = ra["cells"]["tiny"]["vanilla 1x32"]
    assert all(x["val_loss"] < y["val_loss"]
               for x, y in zip(cells["distilgpt2"], cells["scratch"]))
    half = ra["cells"]["tiny"]["vanilla 2x16"]["bbb"]
    assert all(set(x["head_init"]) == {"fold", "plain"} for x in half)
    assert all(len(x["cka"]) == 2 and all(0 <= c <= 1 for c in x["cka"]) for x in half)
