"""GradGuard under Lightning's ModelParallelStrategy (FSDP2, tensor parallel) on 2 CPU processes (gloo).

Every number the guard reports must be the full, unsharded value on both ranks: a reference callback
listed before the guard computes the per-layer and total norms with ``DTensor.full_tensor()``
(tests/mp_run.py). Lightning's FSDPStrategy (FSDP1) needs CUDA; on CPU the core's flat-view layout
(FSDP1's) is tested in tests/integrations/test_sharded.py.
The per-timestep profiles are the whole data-parallel batch's: each rank's profile gathered and
combined (``timesteps.combine_profiles``), checked against the all-gathered ∂L/∂h of every rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import launch

SCRIPT = Path(__file__).resolve().parents[1] / "mp_run.py"
MAX_NORM = 0.05


def run(out: Path, mode: str, *extra: str) -> list[dict[str, Any]]:
    """Run tests/mp_run.py in ``mode``; the JSON of each rank."""
    proc = launch(SCRIPT, str(out), mode, *extra)
    assert proc.returncode == 0, proc.stderr[-6000:]
    count = torch.cuda.device_count() if mode.startswith("fsdp1") else {"plain": 1, "2d": 4}.get(mode, 2)
    ranks = range(count)
    return [json.loads((out / f"{mode}{r}.json").read_text()) for r in ranks]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mp")


@pytest.fixture(scope="module")
def plain(out: Path) -> dict[str, Any]:
    (single,) = run(out, "plain")
    return single


@pytest.mark.parametrize("mode", ["fsdp2", "tp", "2d"])
def test_reported_norms_are_the_full_unsharded_ones_on_every_rank(out: Path, mode: str, plain: dict[str, Any]) -> None:
    ranks = run(out, mode)
    for r in ranks:
        assert r["after"].keys() == r["reference"].keys() and len(r["after"]) == 6
        for step, ref in r["reference"].items():
            metrics = r["after"][step]["metrics"]
            for key, value in ref.items():
                if key.startswith("timestep/"):  # the whole batch's per-timestep norms, every rank
                    assert r["after"][step]["timesteps"]["rnn"] == pytest.approx(value, rel=1e-5), (step, key)
                    continue
                assert metrics[key] == pytest.approx(value, rel=1e-5), (mode, step, key)
            # clipping is global: the full gradient the optimizer gets has the clipped norm
            assert r["after"][step]["clipped_total"] <= MAX_NORM * (1 + 1e-5)
            assert metrics["gradguard/total_norm_clipped"] == pytest.approx(MAX_NORM, rel=1e-5)
    assert all(r["after"] == ranks[0]["after"] for r in ranks)  # identical on every rank, profiles included
    if mode == "fsdp2":
        assert all("timestep/rnn" in ref for ref in ranks[0]["reference"].values())
    # the guard's collective: one small all-reduce per step and mesh dimension (the flags ride in it)
    dims = 2 if mode == "2d" else 1
    assert all(r["collectives"] == 6 * dims for r in ranks), [r["collectives"] for r in ranks]
    if mode == "fsdp2":  # the names of the same model unsharded; the LSTM still tracked
        assert ranks[0]["layers"] == ranks[1]["layers"] == plain["layers"] == ["embed", "rnn.l0", "head"]
        assert ranks[0]["timesteps"] == plain["timesteps"] == ["rnn"]
    else:  # "2d": 4 processes, FSDP2 over 2 data-parallel ranks x tensor parallel over 2
        assert all(r["layers"] == ["l0", "l1", "l2"] for r in ranks)


def test_a_nan_on_one_rank_skips_the_step_on_both(out: Path) -> None:
    ranks = run(out, "nan")
    for r in ranks:
        assert r["events"] == [["nonfinite", 3, "head", ["embed", "rnn.l0", "head"], "skipped"]]
        step = r["after"]["3"]
        assert step["skipped"] and step["weights_after"] == step["weights"]  # full weights bit-identical
        assert r["after"]["4"]["opt_steps"] == step["opt_steps"]  # optimizer state did not move
        assert r["state"]["skipped_steps"] == 1
    assert ranks[0]["after"]["5"]["weights"] == ranks[1]["after"]["5"]["weights"]
    assert (out / "handler-nan.txt").read_text() == "nonfinite 3\n"  # rank zero tells it, once


def test_raise_and_stop_on_one_rank_are_one_decision(out: Path) -> None:
    raised = run(out, "nan_raise")  # a rank that did not raise would hang the other (the run's timeout)
    assert [r["step"] for r in raised] == [3, 3]
    assert all("origin 'head'" in r["error"] and "Raising." in r["error"] for r in raised)
    stopped = run(out, "nan_stop")
    for r in stopped:
        assert r["events"] == [
            ["nonfinite", 3, "head", ["embed", "rnn.l0", "head"], "stopped"],
            ["stopped", 3, "head", ["embed", "rnn.l0", "head"], "stopped"],  # the guard's stop is an event
        ]
        assert r["global_step"] == 4  # the skipped step 3 counts; training stopped after it, on both


def test_resume_from_a_distributed_checkpoint_makes_identical_decisions(out: Path) -> None:
    full = run(out, "save")
    ckpt = out / "ckpt" / "epoch=5-step=6.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").exists()  # Lightning's distributed checkpoint format
    resumed = run(out, "resume", str(ckpt))
    for a, b in zip(full, resumed, strict=True):
        assert sorted(b["after"]) == ["6", "7", "8", "9"]
        for step in b["after"]:
            assert b["after"][step]["metrics"] == a["after"][step]["metrics"], step
        assert b["state"] == a["state"] and b["clip_state"] == a["clip_state"]
        assert b["state"]["steps"] == 10 and len(b["clip_state"]["buffer"]) == 0 and b["clip_state"]["mean"] > 0


def test_agc_clips_rows_of_shard0_weights_and_refuses_split_units(out: Path) -> None:
    from lightning_gradguard import AGC
    from lightning_gradguard.clip import ClipContext

    ranks = run(out, "agc")
    for r in ranks:
        for step, params in r["full_before"].items():
            names = [n for n in params if "bias" not in n]
            weights = [torch.nn.Parameter(torch.tensor(params[n][0])) for n in names]
            grads = [torch.tensor(params[n][1]) for n in names]
            AGC(0.01).clip_(ClipContext.of(grads, params=weights))  # the reference: AGC on the whole tensors
            for n, g in zip(names, grads, strict=True):
                assert torch.tensor(r["after"][step]["grads"][n]) == pytest.approx(g, rel=1e-5, abs=1e-9), (step, n)
    assert ranks[0]["after"] == ranks[1]["after"]
    assert any(row["metrics"].get("gradguard/clipped_units", 0) > 0 for row in ranks[0]["after"].values())
    refused = run(out, "agc_refused")
    for r in refused:
        assert "AGC cannot clip `embed.bias`" in r["error"] and "Shard(dim=0)" in r["error"]


def test_deepspeed_is_refused_at_setup_with_the_alternatives() -> None:
    from types import SimpleNamespace

    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from lightning_gradguard import GradGuard

    class DeepSpeedStrategy:  # what Lightning's strategy is called; deepspeed itself is not installed here
        pass

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(), gradient_clip_val=None)
    with pytest.raises(MisconfigurationException, match="DeepSpeed owns and partitions the gradients") as info:
        GradGuard().setup(trainer, None, "fit")  # type: ignore[arg-type]
    assert "strategy='fsdp'" in str(info.value) and "ModelParallelStrategy" in str(info.value)


def test_fabric_sharded_example(tmp_path: Path) -> None:
    example = SCRIPT.parents[1] / "examples" / "fabric_sharded.py"
    proc = launch(example, "--steps", "20", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"fabric{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # one decision, the same numbers, on both ranks
    assert r0["events"] == [["nonfinite", 10, "loss"]] and r0["skipped"] == 1  # the NaN was on rank 1 only
    for row in r0["rows"]:  # the whole gradient after the guard: clipped globally to max_norm 1.0
        total = row["metrics"]["gradguard/total_norm"]
        assert row["clipped_whole"] == pytest.approx(min(total, 1.0), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy (FSDP1) needs CUDA")
@pytest.mark.parametrize("mode", ["fsdp1", "fsdp1_flat"])
def test_fsdp1_norms_and_clipping_are_global(out: Path, mode: str) -> None:  # pragma: no cover - CUDA only
    """FSDP1 with use_orig_params=True (original parameters: layer names) and False (flat parameters)."""
    ranks = run(out, mode)
    for r in ranks:
        for step, ref in r["reference"].items():
            metrics = r["after"][step]["metrics"]
            assert metrics["gradguard/total_norm"] == pytest.approx(ref["gradguard/total_norm"], rel=1e-5)
            assert r["after"][step]["clipped_total"] <= MAX_NORM * (1 + 1e-5)
            if mode == "fsdp1":
                for key, value in ref.items():
                    if key.startswith("gradguard/layer/"):
                        assert metrics[key] == pytest.approx(value, rel=1e-5), (step, key)
    assert all(r["after"] == ranks[0]["after"] for r in ranks)
