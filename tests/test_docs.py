"""The documentation runs: every code block of README.md and docs/*.md, and every link between them.

* Each ```python block runs as it stands, in a fresh namespace. Where a block is a fragment (it uses a
  ``model`` or a ``loader`` the reader already has), the page's preamble below defines it, tiny and on
  the CPU; where a page says what a block prints or does, a check below asserts it. A block that cannot
  run says so in its fence (```python no-run) and is listed in ``NO_RUN`` with why.
* ```bash lines are checked where that is cheap: a ``make`` target exists, a ``pip`` extra is declared,
  a ``gradguard`` command line parses with the real parser, an example's ``--flag`` is one it takes.
* ```yaml blocks load, and each ``class_path`` imports and takes its ``init_args``.
* ```text blocks are output shown to the reader, not code.
* Every relative link points to a file that exists, and every ``#anchor`` to a heading of that file.
* The README's comparison with Lightning's ``SpikeDetection`` holds for the installed Lightning.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import re
import shlex
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml  # type: ignore[import-untyped]
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import FaultNet, trainer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "yaml", "text"}

# Blocks that cannot run, each with why (page, heading) -> reason. Keep it short: a block that cannot
# run is a block that can go stale.
NO_RUN: dict[tuple[str, str], str] = {}

# Blocks run by another test, which reads them from this page under this heading.
RUN_ELSEWHERE = {
    ("docs/why-did-it-break.md", "Reproducing a bad step from a dump"): "tests/detectors/test_detection.py",
}

# Pages the README's map may link before they exist (none now).
TO_BE_WRITTEN: set[str] = set()


# ------------------------------------------------------------------------------ reading the pages
@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    info: str  # the fence's info string: "python", "python no-run", "bash", ...
    heading: str  # the nearest heading above it, without its #s
    code: str

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.page, self.heading)


def _blocks(page: Path) -> list[Block]:
    found: list[Block] = []
    body: list[str] = []
    fence: str | None = None  # the open fence's info string; None outside a fence
    heading, start = "", 0
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None and line.startswith("```"):
            fence, start, body = line[3:].strip(), n, []
        elif fence is not None and line.startswith("```"):
            found.append(Block(page.relative_to(ROOT).as_posix(), start, fence, heading, "\n".join(body) + "\n"))
            fence = None
        elif fence is not None:
            body.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    assert fence is None, f"{page}: a fence opened at line {start} is never closed"
    return found


BLOCKS = [b for page in PAGES for b in _blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def _id(block: Block) -> str:
    return f"{block.page}:{block.line}"


def test_the_docs_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/options.md", "docs/distributed.md", "docs/plain-pytorch-and-fabric.md"} <= names
    assert len(PYTHON) >= 10 and any(b.lang == "bash" for b in BLOCKS)


def test_every_fence_names_its_language() -> None:
    unnamed = [f"{_id(b)} ({b.info!r})" for b in BLOCKS if b.lang not in LANGUAGES]
    assert unnamed == [], f"give each fence one of {sorted(LANGUAGES)}"


def test_the_blocks_that_do_not_run_are_few_and_each_says_why() -> None:
    marked = {b.key for b in PYTHON if "no-run" in b.info.split()}
    assert marked == set(NO_RUN)
    assert len(NO_RUN) <= 3
    for key in RUN_ELSEWHERE:  # each names a block that exists, once
        assert [b.key for b in PYTHON].count(key) == 1, key


# ------------------------------------------------------------------------------ the python blocks
def _tiny_loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    """Three batches of 8 for a 16 -> 1 regression; the second batch holds a NaN, so that a loop
    shown in the docs meets a poisoned step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 16, generator=g), torch.randn(24, 1, generator=g)
    x[9, 3] = math.nan
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The quick start's ``model`` is a small MLP; its ``Trainer`` runs 3 steps on the CPU, logging each."""

    class TinyTrainer(pl.Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            tiny: dict[str, Any] = dict(
                max_steps=3,
                accelerator="cpu",
                devices=1,
                log_every_n_steps=1,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=tmp_path,
            )
            super().__init__(*args, **{**tiny, **kwargs})

    monkeypatch.setattr(pl, "Trainer", TinyTrainer)
    return {"model": FaultNet()}


def _plain_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    logged: list[dict[str, float]] = []
    return {
        "model": model,
        "loader": _tiny_loader(),
        "loss_fn": nn.functional.mse_loss,
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2),
        "writer_log": logged.append,
    }


def _metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return {"h": torch.randn(2, 5, 3, requires_grad=True)}


def _alerts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("GRADGUARD_WEBHOOK_URL", "https://hooks.example.invalid/T0/B0/XXXX")  # never called
    paged: list[str] = []
    return {"page_the_on_call_person": paged.append, "_paged": paged}


PREAMBLES: dict[str, Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]] = {
    "README.md": _readme,
    "docs/plain-pytorch-and-fabric.md": _plain_loop,
    "docs/metrics.md": _metrics,
    "docs/detection-and-alerts.md": _alerts,
}


def _check_quick_start(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    from lightning_gradguard.tensorboard.eventfile import find_runs, read_run

    (run,) = find_runs(tmp_path / "lightning_logs")
    scalars = read_run(run).scalars
    assert {f"gradguard/layer/{name}" for name in ("l0", "l1", "l2")} <= set(scalars)
    assert [step for step, _ in scalars["gradguard/total_norm"]] == [0, 1, 2]


def _check_validation(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    assert "`vanish_patience`" in out and "but got 0" in out


def _check_functional(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    assert out == "0.125 1.0\n"  # what the block's comment says it prints


def _check_rollback(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    guard = scope["guard"]
    assert repr(guard.rollback_options).startswith("Rollback(every=100, keep=2")
    assert guard.skip_spikes == 6.0


def _check_tbptt(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    module = scope["TBPTT"]()
    module.hidden = (torch.zeros(1),)
    module.on_gradguard_rollback(None)
    assert module.hidden is None


def _check_track_timesteps(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    assert scope["h"].shape == (2, 5, 3)  # returned as it came: nothing was armed


def _check_one_skip(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    guard = scope["guard"]
    assert [(e.kind, e.step, e.origin) for e in guard.events] == [("nonfinite", 1, "loss")]
    assert guard.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in scope["model"].parameters())


def _check_plain_loop(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    _check_one_skip(scope, out, tmp_path)
    assert out.startswith("GradGuard summary: 3 optimizer steps guarded")


def _check_replay(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    _check_one_skip(scope, out, tmp_path)
    assert out == "data or numerics\n"


def _check_pager(scope: dict[str, Any], out: str, tmp_path: Path) -> None:
    """The notifier protocol the page shows is the one the guard calls: one page for a NaN step."""
    from lightning_gradguard import GuardCore

    model = nn.Linear(3, 1)
    core = GuardCore(model, alert_handlers=[scope["Pager"]()])
    loss = model(torch.ones(2, 3)).sum() * math.nan
    core.observe_loss(loss)
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core.step(torch.optim.SGD(model.parameters(), lr=0.1))
    (page,) = scope["_paged"]
    assert "non-finite" in page


CHECKS: dict[tuple[str, str], Callable[[dict[str, Any], str, Path], None]] = {
    ("README.md", "Quick start"): _check_quick_start,
    ("docs/options.md", "Validation"): _check_validation,
    ("docs/clipping.md", "The functional forms"): _check_functional,
    ("docs/nan-guard-and-recovery.md", "Recovering a run"): _check_rollback,
    ("docs/nan-guard-and-recovery.md", "State the guard cannot see"): _check_tbptt,
    ("docs/metrics.md", "Per-timestep gradient norms"): _check_track_timesteps,
    ("docs/plain-pytorch-and-fabric.md", "A plain loop"): _check_plain_loop,
    ("docs/plain-pytorch-and-fabric.md", "A Fabric loop"): _check_one_skip,
    ("docs/plain-pytorch-and-fabric.md", "Replaying a step in your own loop"): _check_replay,
    ("docs/detection-and-alerts.md", "Your own"): _check_pager,
}


def test_each_check_names_one_block() -> None:
    keys = [b.key for b in PYTHON]
    assert [key for key in CHECKS if keys.count(key) != 1] == []


@pytest.mark.parametrize("block", PYTHON, ids=_id)
def test_the_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.key in NO_RUN:
        pytest.skip(NO_RUN[block.key])
    if block.key in RUN_ELSEWHERE:  # that test reads this page, under this heading
        runner = (ROOT / RUN_ELSEWHERE[block.key]).read_text(encoding="utf-8")
        assert block.page in runner and block.heading in runner
        return
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    scope = PREAMBLES[block.page](tmp_path, monkeypatch) if block.page in PREAMBLES else {}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as out:
        warnings.simplefilter("ignore")  # a NaN step's warning is what the block shows, not a failure
        exec(compile(block.code, _id(block), "exec"), scope)  # a NameError here is what a reader would get
    if block.key in CHECKS:
        CHECKS[block.key](scope, out.getvalue(), tmp_path)


# ------------------------------------------------------------------------------ the bash blocks
def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def _extras() -> set[str]:
    """The extras pyproject.toml declares (read by hand: tomllib is Python 3.11+, the package 3.10+)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", section, re.M))


def _parse_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``gradguard ARGS`` parsed by the command's own parser; nothing runs."""
    from lightning_gradguard import cli

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def spy(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise Parsed(original(self, args, namespace))

    with monkeypatch.context() as m, contextlib.redirect_stderr(io.StringIO()) as err:
        m.setattr(argparse.ArgumentParser, "parse_args", spy)
        try:
            status = cli.main(argv)
        except Parsed as parsed:
            return parsed.args[0]  # type: ignore[no-any-return]
    raise AssertionError(f"`gradguard {shlex.join(argv)}` does not parse (exit {status}): {err.getvalue()}")


# Commands a bash block may show that this test does not run, each with why.
NOT_CHECKED = {
    "git": "clones the repository from its URL",
    "tensorboard": "serves the dashboard",
}


def _check_shell(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not line.split() or line.split()[0] in NOT_CHECKED:  # before shlex: "<this repository's URL>"
        return
    words = shlex.split(line, comments=True)
    if not words:
        return
    if words[0] == "make":
        assert set(words[1:]) <= _make_targets(), line
    elif words[:2] == ["pip", "install"]:
        for arg in words[2:]:
            m = re.search(r"\[([\w,-]+)\]", arg)
            assert m is None or set(m.group(1).split(",")) <= _extras(), line
    elif words[0] == "gradguard":
        _parse_cli(words[1:], monkeypatch)
    elif words[:3] == ["python", "-m", "lightning_gradguard"]:
        _parse_cli(words[3:], monkeypatch)
    elif words[0] == "python":
        script = ROOT / words[1]
        assert script.is_file(), line
        source = script.read_text(encoding="utf-8")
        flags = [w.split("=")[0] for w in words[2:] if w.startswith("--")]
        assert [f for f in flags if f'"{f}"' not in source] == [], line
    else:
        raise AssertionError(f"a command this test does not know: {line!r} (check it, or add it to NOT_CHECKED)")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=_id)
def test_the_bash_block_is_what_the_tools_take(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    for line in block.code.splitlines():
        _check_shell(line, monkeypatch)


def test_the_bash_checks_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (
        "make demoo",
        'pip install ".[plots]"',
        "gradguard report runs/ --fail-on explodin",
        "gradguard replay d.pt",  # --model is required
        "python examples/vanishing_gradients.py --markdwn",
        "curl https://example.invalid",
    ):
        with pytest.raises(AssertionError):
            _check_shell(bad, monkeypatch)
    assert _parse_cli(["report", "runs/", "--fail-on", "exploding", "spiky"], monkeypatch).fail_on == [
        "exploding",
        "spiky",
    ]


# ------------------------------------------------------------------------------ the yaml blocks
def _class_paths(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if "class_path" in node:
            yield node["class_path"], node.get("init_args") or {}
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "yaml"], ids=_id)
def test_the_yaml_block_names_classes_that_take_its_arguments(block: Block) -> None:
    found = list(_class_paths(yaml.safe_load(block.code)))
    assert found
    for path, init_args in found:
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert set(init_args) <= set(inspect.signature(cls).parameters), path
    # the excerpt is the example config's (which tests/integrations/test_ecosystem.py runs)
    example = yaml.safe_load((ROOT / "examples" / "cli_config.yaml").read_text())
    assert [p for p, _ in found] == [p for p, _ in _class_paths(example)]


# ------------------------------------------------------------------------------ links
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    text = re.sub(r"`[^`]*`", "", text)  # code spans hold brackets that are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_and_anchor_resolves() -> None:
    broken = []
    for page in PAGES:
        for link in _links(page):
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            name = target.relative_to(ROOT).as_posix() if target.is_relative_to(ROOT) else str(target)
            if not target.exists():
                if name not in TO_BE_WRITTEN:
                    broken.append(f"{page.name}: {link}")
                continue
            if anchor and anchor not in _anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert broken == []


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    assert _slug("`gradguard report`: the same, in a terminal") == "gradguard-report-the-same-in-a-terminal"
    assert _slug("Skipping on the device: no host read on a healthy step") == (
        "skipping-on-the-device-no-host-read-on-a-healthy-step"
    )
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[x](#a-title) [y](#nope) `[z](not-a-link.md)`\n\n```text\n# no heading\n```\n")
    assert _links(page) == ["#a-title", "#nope"]
    assert _anchors(page) == {"a-title"}


_NAMED_FILE = re.compile(r"`((?:tests|examples|benchmarks|docs|lightning_gradguard)/[\w./-]*\w)(?:::(\w+))?")


def test_every_file_and_test_the_docs_name_exists() -> None:
    """`tests/x.py`, `examples/y.py`, `tests/x.py::test_z` in the prose: a renamed file leaves none stale."""
    missing = []
    for page in PAGES:
        for path, test in _NAMED_FILE.findall(page.read_text(encoding="utf-8")):
            target = ROOT / path
            if not target.exists() and path not in TO_BE_WRITTEN:
                missing.append(f"{page.name}: {path}")
            elif test and f"def {test}(" not in target.read_text(encoding="utf-8"):
                missing.append(f"{page.name}: {path}::{test}")
    assert missing == []
    assert _NAMED_FILE.findall("see `tests/nope.py::test_x` and `examples/a.py`") == [
        ("tests/nope.py", "test_x"),
        ("examples/a.py", ""),
    ]


def test_the_readme_maps_every_page_and_stays_short() -> None:
    readme = ROOT / "README.md"
    linked = {(readme.parent / link.partition("#")[0]).resolve() for link in _links(readme)}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []
    assert ROOT / "docs" / "writing-a-component.md" in linked
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 300  # a newcomer reads it whole


# ------------------------------------------------------------------------------ the SpikeDetection comparison
def test_the_spike_detection_comparison_holds_for_the_installed_lightning(tmp_path: Path) -> None:
    """What the README says of Lightning's SpikeDetection: it watches the loss after the optimizer step,
    raises, and writes the batch and the one before to skip_batches.json; a NaN loss is a spike under the
    default ``finite_only=True`` and no spike with ``False``."""
    from lightning_fabric.utilities.spike import TrainingSpikeException
    from pytorch_lightning.callbacks import SpikeDetection

    assert "on_train_batch_end" in vars(SpikeDetection) and "on_before_optimizer_step" not in vars(SpikeDetection)

    # A finite spike (the loss x100 at step 5): raised there, after that step's update.
    model = FaultNet({5: ("loss", 100.0)})
    with pytest.raises(TrainingSpikeException, match="batch 5"):
        trainer([SpikeDetection()], default_root_dir=tmp_path).fit(model)
    assert json.loads((tmp_path / "skip_batches.json").read_text()) == [4, 5]
    before_step_5 = model.snapshots[5][0]["l0.weight"]
    assert not torch.equal(model.l0.weight.detach(), before_step_5)  # the spiking update is in the weights

    # A NaN loss: a spike under the default, raised after the NaN update; not seen with finite_only=False.
    model = FaultNet({3: ("loss", math.nan)})
    with pytest.raises(TrainingSpikeException, match="batch 3"):
        trainer([SpikeDetection()], default_root_dir=tmp_path).fit(model)
    assert not torch.isfinite(model.l0.weight).all()
    model = FaultNet({3: ("loss", math.nan)})
    trainer([SpikeDetection(finite_only=False)], default_root_dir=tmp_path).fit(model)
    assert not torch.isfinite(model.l0.weight).all()
