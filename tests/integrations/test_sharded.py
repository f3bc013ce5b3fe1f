"""Sharded gradients (FSDP-style flat views, DTensor) on 2 CPU processes: global norms, one decision.

Lightning's FSDPStrategy refuses CPU accelerators ("The strategy `fsdp` requires a GPU
accelerator"), so this test drives ``torch.distributed`` (gloo) directly with the shard layout FSDP
uses, and checks every number against the unsharded reference computed here.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_gradguard import ZClip
from lightning_gradguard.clip import ClipContext
from tests.shard_run import SHAPES, full_grads

SCRIPT = Path(__file__).resolve().parents[1] / "shard_run.py"
LAYERS = {"enc": ["enc.weight", "enc.bias"], "dec": ["dec.weight", "dec.bias"], "scale": ["scale"]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("shards")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), str(port)],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("sharded run hung: the ranks disagreed on a collective")
        if p.returncode != 0:
            errors.append(err[-4000:])
    assert not errors, "\n".join(errors)
    return [json.loads((out / f"shard{r}.json").read_text()) for r in (0, 1)]


def reassemble(ranks: list[dict[str, Any]], rows: str, step: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in SHAPES.items():
        pieces = [torch.tensor(r["flat"][rows][step]["shards"][name]) for r in ranks]
        out[name] = torch.cat(pieces).reshape(shape)
    return out


def test_global_norms_equal_the_unsharded_reference(ranks: list[dict[str, Any]]) -> None:
    grads = full_grads(0)
    total = torch.nn.utils.get_total_norm(list(grads.values())).item()
    for r in ranks:
        m = r["flat"]["norm"][0]["metrics"]
        assert m["gradguard/total_norm"] == pytest.approx(total, rel=1e-6)
        for layer, members in LAYERS.items():
            ref = torch.nn.utils.get_total_norm([grads[k] for k in members]).item()
            assert m[f"gradguard/layer/{layer}"] == pytest.approx(ref, rel=1e-6)
    assert ranks[0]["flat"]["norm"][0]["metrics"] == ranks[1]["flat"]["norm"][0]["metrics"]


def test_norm_clip_on_shards_equals_clip_grad_norm(ranks: list[dict[str, Any]]) -> None:
    grads = full_grads(0)
    params = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in grads.items()}
    for k, p in params.items():
        p.grad = grads[k].clone()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    got = reassemble(ranks, "norm", 0)
    for k, p in params.items():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-6, atol=1e-7)


def test_layer_clip_on_shards_equals_per_layer_reference(ranks: list[dict[str, Any]]) -> None:
    grads = full_grads(0)
    got = reassemble(ranks, "layer", 0)
    for members in LAYERS.values():
        params = [torch.nn.Parameter(torch.zeros_like(grads[k])) for k in members]
        for p, k in zip(params, members, strict=True):
            p.grad = grads[k].clone()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for p, k in zip(params, members, strict=True):
            torch.testing.assert_close(got[k], p.grad, rtol=1e-6, atol=1e-7)


def test_zclip_on_shards_takes_the_unsharded_decisions(ranks: list[dict[str, Any]]) -> None:
    ref = ZClip(warmup_steps=5)
    for step in range(15):
        grads = full_grads(step)
        flat_ref = [g.clone() for g in grads.values()]
        out = ref.clip_(ClipContext.of(flat_ref))
        m0, m1 = (r["flat"]["zclip"][step]["metrics"] for r in ranks)
        assert m0 == m1  # one decision on both ranks
        assert m0["gradguard/clip_coef"] == pytest.approx(out.coef.item(), rel=1e-6)
        got = reassemble(ranks, "zclip", step)
        for k, g in zip(SHAPES, flat_ref, strict=True):
            torch.testing.assert_close(got[k], g, rtol=1e-6, atol=1e-7)
    assert ranks[0]["flat"]["zclip"][12]["metrics"]["gradguard/clip_coef"] < 1.0  # the spike


def test_dtensor_gradients_are_measured_globally(ranks: list[dict[str, Any]]) -> None:
    full = {k: torch.tensor(v) for k, v in ranks[0]["dtensor"]["full"].items()}
    total = torch.nn.utils.get_total_norm(list(full.values())).item()
    for r in ranks:
        m = r["dtensor"]["metrics"]
        assert m["gradguard/total_norm"] == pytest.approx(total, rel=1e-6)
        for layer in ("0", "1"):
            ref = torch.nn.utils.get_total_norm([full[f"{layer}.weight"], full[f"{layer}.bias"]]).item()
            assert m[f"gradguard/layer/{layer}"] == pytest.approx(ref, rel=1e-6)
        coef = min(1.0, 1.0 / (total + 1e-6))
        for k, v in r["dtensor"]["clipped"].items():
            torch.testing.assert_close(torch.tensor(v), full[k] * coef, rtol=1e-6, atol=1e-7)
    assert not math.isnan(total)


def test_a_parameter_outside_a_ranks_shard_without_gradient_lines_up(ranks: list[dict[str, Any]]) -> None:
    """FSDP1 (use_orig_params=True) leaves .grad None on the rank that holds none of a tensor."""
    assert any(len(r["flat"]["none"][0]["shards"]) < len(SHAPES) for r in ranks)  # some grad was None
    for r in ranks:
        assert r["flat"]["none"][0]["metrics"] == r["flat"]["norm"][0]["metrics"]
