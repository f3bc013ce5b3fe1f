"""CUDA-only checks, run once on a GPU machine (not part of ``make test``).

1. Host syncs per ``GuardCore.step`` (and the optimizer's step), counted with
   ``torch.cuda.set_sync_debug_mode("warn")``, for every clipper, on logging and non-logging steps,
   under ``on_nonfinite="skip"`` and ``"warn"``, with SGD and with ``AdamW(fused=True)`` (a NaN step
   skipped on the device: the target is 0 syncs on healthy non-logging steps).
2. A real fp16 ``torch.amp.GradScaler`` loop on CUDA: an injected overflow is left to the scaler
   (``amp_overflow``, no skip, no NaN in the weights), and the guard's NormClip on unscaled
   gradients equals ``clip_grad_norm_``.
3. The same in Lightning with ``precision="16-mixed"`` on the GPU.
4. FSDP1 (Lightning's FSDPStrategy), which refuses CPU: tests/integrations/test_model_parallel.py -k fsdp1,
   and a rollback under it: tests/integrations/test_rollback_distributed.py -k fsdp1.
5. Recovery on CUDA: host syncs of a snapshot (pinned, asynchronous: the target is 0) and of a
   healthy step with ``skip_spikes`` and ``AdamW(fused=True)`` (0); a snapshot's copy time against
   the step time; a rollback on the GPU restores the weights and the moments bit for bit.
6. Hugging Face's Trainer with GradGuardCallback: fp16 (accelerate's GradScaler), and accelerate's FSDP2
   under torchrun (the Trainer applies FSDP only on an accelerator): benchmarks/hf_bench.py --gpu-checks.

    PYTHONPATH=. python benchmarks/gpu_checks.py > gpu_checks.txt
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gradguard import AGC, AutoClip, GradGuard, GuardCore, LayerNormClip, NormClip, ValueClip, ZClip


def count_syncs(fn: Any) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.LSTM(128, 64, batch_first=True)).cuda()


def sync_table() -> None:
    print("== host syncs per GuardCore.step (CUDA) ==")
    clippers: dict[str, Any] = {
        "none": lambda: None,
        "NormClip": lambda: NormClip(1.0),
        "ValueClip": lambda: ValueClip(0.1),
        "LayerNormClip": lambda: LayerNormClip(1.0),
        "AGC": lambda: AGC(0.01),
        "AutoClip": lambda: AutoClip(10.0),
        "ZClip": lambda: ZClip(warmup_steps=3),
    }
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).cuda()
    x = torch.randn(32, 64, device="cuda")
    optimizers: dict[str, Any] = {
        "SGD": lambda: torch.optim.SGD(net.parameters(), lr=0.0),
        # fused: a NaN step is skipped on the device (optimizer.found_inf): target 0 syncs off logging steps
        "AdamW(fused)": lambda: torch.optim.AdamW(net.parameters(), lr=0.0, fused=True),
    }
    for opt_name, make_opt in optimizers.items():
        for policy in ("skip", "warn"):
            for name, make in clippers.items():
                guard = GuardCore(net, clip=make(), on_nonfinite=policy, log_every_n_steps=5, track_timesteps=False)
                opt = make_opt()
                counts: dict[str, list[int]] = {"non-logging": [], "logging": []}
                for step in range(12):
                    opt.zero_grad()
                    net(x).pow(2).mean().backward()
                    n = count_syncs(functools.partial(guard.step, opt))
                    n += count_syncs(opt.step)
                    if step >= 2:
                        counts["logging" if guard.is_logging_step(step) else "non-logging"].append(n)
                nl, lg = counts["non-logging"], counts["logging"]
                print(
                    f"optimizer={opt_name:<12} policy={policy:<5} clip={name:<14} syncs/step (guard + "
                    f"optimizer.step): non-logging {sum(nl) / len(nl):.2f} (max {max(nl)}), logging "
                    f"{sum(lg) / len(lg):.2f} (max {max(lg)})"
                )
    # as tests/core/test_host_reads.py: any sync of a healthy non-logging step raises, where it is made
    guard = GuardCore(net, clip=NormClip(1.0), log_every_n_steps=None, track_timesteps=False)
    opt = torch.optim.AdamW(net.parameters(), lr=0.0, fused=True)
    try:
        for step in range(6):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            torch.cuda.set_sync_debug_mode("error" if step >= 2 else "default")
            guard.step(opt)
            opt.step()
            torch.cuda.set_sync_debug_mode("default")
        print("AdamW(fused) policy=skip: 4 non-logging steps under set_sync_debug_mode('error'): no sync")
    except RuntimeError as err:
        print(f"AdamW(fused) policy=skip: a sync under set_sync_debug_mode('error'): {err}")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def amp_plain_loop() -> None:
    print("== fp16 GradScaler on CUDA, plain loop ==")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).cuda()
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    guard = GuardCore(net, clip=NormClip(0.5), log_every_n_steps=1, track_timesteps=False)
    x = torch.randn(64, 16, device="cuda")
    for step in range(6):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = net(x).pow(2).mean() * (1e6 if step == 3 else 1.0)
        guard.observe_loss(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if step == 0:  # reference: the guard's clip equals clip_grad_norm_ on the unscaled grads
            for p, q in zip(net.parameters(), ref.parameters(), strict=True):
                q.grad = p.grad.detach().clone()
            ref_total = nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        report = guard.step(opt, scaler=scaler)
        if step == 0:
            pairs = zip(net.parameters(), ref.parameters(), strict=True)
            same = all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=0) for p, q in pairs)
            total = report.metrics["gradguard/total_norm"]
            print(f"step 0: total {total:.6g} vs clip_grad_norm_ {ref_total.item():.6g}; clipped grads equal: {same}")
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        print(
            f"step {step}: amp_overflow={report.amp_overflow} skipped={report.skipped} "
            f"scale {scale_before:g} -> {scaler.get_scale():g} event={report.event.kind if report.event else None}"
        )
    print("weights finite:", all(bool(torch.isfinite(p).all()) for p in net.parameters()))


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.net(batch[0]).pow(2).mean()
        return loss * 1e8 if self.global_step == 4 else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def amp_lightning() -> None:
    print("== Lightning precision='16-mixed' on CUDA ==")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 16)), batch_size=8)
    guard = GradGuard(clip=NormClip(1.0), log_every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=8, accelerator="gpu", devices=1, precision="16-mixed", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, callbacks=[guard],
    )
    model_ = Tiny()
    trainer.fit(model_, data)
    kinds = [(e.kind, e.step) for e in guard.events]
    print("events:", kinds, "skipped:", guard.skipped_steps, "amp overflows:", guard.core.amp_overflow_steps)
    print("weights finite:", all(bool(torch.isfinite(p).all()) for p in model_.parameters()))


def fsdp1() -> None:
    """Lightning's FSDPStrategy (FSDP1, CUDA only): the guard's total and per-layer norms against the
    whole gradients (summon_full_params), its global clip, with use_orig_params True and False."""
    import subprocess
    import sys
    from pathlib import Path

    print("== FSDP1 (tests/integrations/test_model_parallel.py -k fsdp1) ==")
    root = Path(__file__).resolve().parents[1]
    tests = ["tests/integrations/test_model_parallel.py", "tests/integrations/test_rollback_distributed.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", "fsdp1"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-2000:])


def recovery() -> None:
    """Snapshots and the device spike skip on CUDA: syncs, copy time, an exact rollback."""
    import time

    from lightning_gradguard import Rollback

    print("== recovery on CUDA ==")
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    guard = GuardCore(net, rollback=Rollback(every=1000, keep=2, skip_file=False), skip_spikes=6.0,
                      spike_warmup=5, log_every_n_steps=None, track_timesteps=False)  # fmt: skip
    guard.prepare(net, [opt])
    x = torch.randn(256, 1024, device="cuda")

    def one(step: int) -> None:
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        guard.step(opt, step=step)
        opt.step()

    print("syncs, first step (takes the first snapshot):", count_syncs(lambda: one(0)))
    for s in range(1, 10):
        one(s)
    print("syncs, healthy non-logging step with skip_spikes + fused AdamW:", count_syncs(lambda: one(10)))
    rec = guard.recovery
    assert rec is not None
    print("syncs, one snapshot (pinned, non_blocking):", count_syncs(lambda: rec.capture(11)))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(20):
        one(12 + s)
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 20 * 1e3
    t0 = time.perf_counter()
    snap = rec.capture(40)
    torch.cuda.synchronize()
    copy_ms = (time.perf_counter() - t0) * 1e3
    print(f"snapshot {snap.nbytes / 2**20:.0f} MiB: copy {copy_ms:.2f} ms (synchronized), step {step_ms:.2f} ms")
    weights = [p.detach().clone() for p in net.parameters()]
    moments = [opt.state[p]["exp_avg_sq"].clone() for p in net.parameters()]
    for s in range(5):
        one(41 + s)
    guard.rollback()
    exact = all(torch.equal(a, p) for a, p in zip(weights, net.parameters(), strict=True)) and all(
        torch.equal(m, opt.state[p]["exp_avg_sq"]) for m, p in zip(moments, net.parameters(), strict=True)
    )
    print("rollback restores weights and moments bit for bit:", exact)


def hf_trainer() -> None:
    """Hugging Face's Trainer on the GPU (fp16, FSDP2): benchmarks/hf_bench.py --gpu-checks."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().with_name("hf_bench.py")
    proc = subprocess.run([sys.executable, str(script), "--gpu-checks"], capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:], proc.stderr[-2000:] if proc.returncode else "")


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), "lightning", pl.__version__)
    sync_table()
    amp_plain_loop()
    amp_lightning()
    recovery()
    fsdp1()
    hf_trainer()
    print("done", math.pi > 3)


if __name__ == "__main__":
    main()
