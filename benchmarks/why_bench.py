"""What "why did it break?" costs: the RNG state kept per step, a replay, and ``track_updates``.

On ``bench.py``'s model (a), the 2-layer LSTM language model (Adam, batch 32 x 64), measured side by
side in one process:

* ``capture_rng()`` and ``keep_attributes()`` per step (the per-step costs of ``replay=True``: the
  RNG state, and references to the module's attributes so that a replay starts from the state the
  step began with), against the median step; the attributes of a ``LightningModule`` wrapping the
  model (its ``__dict__`` holds Lightning's own fields too) as well as of the bare model;
* one replay attribution of a step (``attribute``: a finite replay is confirmed by a second one, so
  this is the time of the two replays a transient verdict takes);
* ``GuardCore.step`` on a logging step with and without ``track_updates`` (interleaved), and the
  copy of the parameters on the step before a logging step.

    cd benchmarks && ../.venv/bin/python why_bench.py      # writes RESULTS-why.md
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
from timestep_overhead import LM  # model (a) (this folder)
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard import GuardCore
from lightning_gradguard.core.attribution import attribute, keep_attributes
from lightning_gradguard.dump import capture_rng


def median_ms(fn: object, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = LM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randint(0, 1000, (32, 64)), torch.randint(0, 1000, (32, 64))
    loss_fn = nn.CrossEntropyLoss()

    def loss() -> torch.Tensor:
        return loss_fn(model(x).flatten(0, 1), y.flatten())

    def step() -> None:
        opt.zero_grad()
        loss().backward()
        opt.step()

    for _ in range(3):
        step()
    step_ms = median_ms(step, 15)
    rng_ms = median_ms(capture_rng, 200)
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.hidden = None  # a carried state, as in truncated BPTT

    lightning_module = Module()
    attrs_ms = median_ms(lambda: keep_attributes(model), 2000)
    attrs_pl_ms = median_ms(lambda: keep_attributes(lightning_module), 2000)
    params = list(model.parameters())
    replay_ms = median_ms(lambda: attribute(loss, params, model=model, rng=capture_rng()), 5)
    plain = GuardCore(model, log_every_n_steps=1, track_timesteps=False)
    tracked = GuardCore(model, log_every_n_steps=1, track_timesteps=False, track_updates=True)
    opt.zero_grad()
    loss().backward()
    times: dict[str, list[float]] = {"guard": [], "guard + track_updates": []}
    for _ in range(30):  # interleaved; tracked copies the weights each time (every step logs)
        for name, guard in (("guard", plain), ("guard + track_updates", tracked)):
            t0 = time.perf_counter()
            guard.step(opt)
            times[name].append(time.perf_counter() - t0)
    logged = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    copy_ms = median_ms(lambda: [p.detach().clone() for p in params], 20)
    lines = [
        "# Why did it break? Its cost (benchmarks/why_bench.py)",
        "",
        f"{dt.date.today()}, torch {torch.__version__}, CPU, 2 threads; model (a), the 2-layer LSTM LM "
        f"({sum(p.numel() for p in params) / 1e6:.1f} M parameters), Adam; median training step {step_ms:.1f} ms.",
        "",
        "| what | time | of a step |",
        "|---|---|---|",
        f"| `capture_rng()`, every step with `replay=True` | {rng_ms * 1e3:.1f} µs | {rng_ms / step_ms:.3%} |",
        f"| `keep_attributes()` of the model, every step with `replay=True` | {attrs_ms * 1e3:.2f} µs | "
        f"{attrs_ms / step_ms:.4%} |",
        f"| the same of a LightningModule ({len(vars(lightning_module))} attributes) | {attrs_pl_ms * 1e3:.2f} µs | "
        f"{attrs_pl_ms / step_ms:.4%} |",
        f"| one replay attribution (two replays: a transient verdict) | {replay_ms:.1f} ms | "
        f"{replay_ms / step_ms:.2f}x |",
        f"| `GuardCore.step`, logging step | {logged['guard']:.2f} ms | {logged['guard'] / step_ms:.2%} |",
        f"| the same with `track_updates` | {logged['guard + track_updates']:.2f} ms | "
        f"{logged['guard + track_updates'] / step_ms:.2%} |",
        f"| the copy of the parameters on the step before a logging step | {copy_ms:.2f} ms | "
        f"{copy_ms / step_ms:.2%} |",
        "",
        f"`track_updates` at the default cadence (a logging step every 50): "
        f"{(logged['guard + track_updates'] - logged['guard'] + copy_ms) / 50 / step_ms:.2%} of the step time, "
        "amortized; most of it is the per-layer median of √v (an exact median over every element).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(__file__).with_name("RESULTS-why.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
