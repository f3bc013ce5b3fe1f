"""The package's shape: a core that imports no framework, subpackages that do not import each other,
options declared once and documented as declared, every module in ARCHITECTURE.md."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lightning_gradguard
from lightning_gradguard import GradGuard, GuardCore

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_gradguard"
FRAMEWORKS = (
    "pytorch_lightning", "lightning", "lightning_fabric", "tensorboard", "matplotlib", "torch.distributed.tensor",
)  # fmt: skip


def _loaded_after(code: str) -> list[str]:
    probe = f"""
import sys, json
{code}
frameworks = {FRAMEWORKS!r}
print(json.dumps(sorted(m for m in sys.modules if m in frameworks or m.split(".")[0] in frameworks[:5])))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


_PLAIN_STEP = """
import torch
model = torch.nn.Linear(3, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # torch itself loads torch.distributed.tensor here
model(torch.randn(4, 3)).sum().backward()
"""


@pytest.mark.parametrize(
    ("code", "torch_alone"),
    [
        ("import lightning_gradguard.core", "import torch"),
        ("from lightning_gradguard import GuardCore, NormClip, ZClip, AutoClip, AGC, functional", "import torch"),
        # a whole guarded step of a plain PyTorch loop: nothing loaded beyond what torch loads for it
        (
            _PLAIN_STEP
            + "from lightning_gradguard import GuardCore, NormClip\n"
            + "GuardCore(model, clip=NormClip(1.0), log_every_n_steps=1).step(optimizer)\n",
            _PLAIN_STEP,
        ),
    ],
)
def test_the_core_and_the_clippers_load_no_framework(code: str, torch_alone: str) -> None:
    assert set(_loaded_after(code)) <= set(_loaded_after(torch_alone))
    assert not {"pytorch_lightning", "lightning", "lightning_fabric", "tensorboard", "matplotlib"} & set(
        _loaded_after(code)
    )


def test_gradguard_loads_lightning_only_when_asked_for() -> None:
    assert "pytorch_lightning" in _loaded_after("from lightning_gradguard import GradGuard")
    assert lightning_gradguard.GradGuard is GradGuard


# ------------------------------------------------------------------------------ the import graph
def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PACKAGE / parts[1]).is_dir() else "(top)"


def _imports() -> dict[str, set[str]]:
    """Each subpackage (or ``(top)`` for the top-level modules) -> the subpackages its modules import,
    at module level or inside functions."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        source = _subpackage(module) if module != "lightning_gradguard" else "(top)"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("lightning_gradguard.") and (PACKAGE / name.split(".")[1]).is_dir():
                    target = name.split(".")[1]
                    if target != source:
                        graph.setdefault(source, set()).add(target)
    return graph


def test_no_two_subpackages_import_each_other() -> None:
    graph = _imports()
    assert graph, "no import found: the test reads nothing"
    pairs = {(a, b) for a, targets in graph.items() for b in targets if a in graph.get(b, set())}
    assert pairs == set()
    # and no longer cycle either: a topological order exists
    order: list[str] = []
    todo = {node: set(targets) - {"(top)"} for node, targets in graph.items()}
    while todo:
        ready = sorted(n for n, t in todo.items() if not (t & set(todo)))
        assert ready, f"an import cycle among {sorted(todo)}"
        order += ready
        for n in ready:
            del todo[n]


def test_shared_primitives_sit_below_every_stage() -> None:
    graph = _imports()
    assert graph.get("primitives", set()) == set()
    assert "integrations" not in set().union(*(t for s, t in graph.items() if s != "(top)"))
    assert {"tensorboard", "cli", "integrations", "health"}.isdisjoint(graph["core"])


# ------------------------------------------------------------------------------ options, declared once
def _readme_options() -> dict[str, tuple[str, str]]:
    text = (ROOT / "docs" / "options.md").read_text()
    section = text[text.index("## Options and defaults") :]
    section = section[: section.index("\n## ", 5)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \| (.+?) \| (.+?) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def _default(cell: str) -> Any:
    if cell == "—":
        return inspect.Parameter.empty
    if cell.strip("`") == "Checkpoints()":  # the one default that is an object (a frozen dataclass: equal by value)
        from lightning_gradguard import Checkpoints

        return Checkpoints()
    return ast.literal_eval(cell.strip("`"))


def _defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}


def test_the_readme_options_table_is_the_signatures() -> None:
    rows = _readme_options()
    core = _defaults(GuardCore)
    guard = {name: default for name, default in core.items() if name not in ("model", "sharded", "process_group")}
    guard.update(_defaults(GradGuard))
    assert set(rows) == set(core) | set(guard)
    for name, (in_core, in_guard) in rows.items():
        assert _default(in_core) == core.get(name, inspect.Parameter.empty), name
        assert _default(in_guard) == guard.get(name, inspect.Parameter.empty), name


def test_gradguard_takes_the_core_options_as_the_core_declares_them() -> None:
    guard = GradGuard(vanish_threshold=1e-6, spike_zscore=None, max_events=7)
    assert isinstance(guard, GuardCore) and guard.core is guard
    assert (guard.vanish_threshold, guard.spike_zscore, guard.max_events) == (1e-6, None, 7)
    with pytest.raises(ValueError, match="`vanish_patience`"):
        GradGuard(vanish_patience=0)
    with pytest.raises(TypeError, match="sets `sharded` itself"):
        GradGuard(sharded=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'vanish_treshold'"):
        GradGuard(vanish_treshold=1e-6)


def test_every_lightning_hook_is_marked_override() -> None:
    from pytorch_lightning.callbacks import Callback

    hooks = [name for name in vars(GradGuard) if hasattr(Callback, name) and not name.startswith("_")]
    assert {"setup", "on_fit_start", "on_before_optimizer_step", "state_dict", "teardown"} <= set(hooks)
    for name in hooks:
        attr = vars(GradGuard)[name]
        fn = attr.fget if isinstance(attr, property) else attr
        assert getattr(fn, "__override__", False), name


# ------------------------------------------------------------------------------ the tree, documented
def test_architecture_lists_every_module() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    modules = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*") if p.suffix in (".py", ".js")]
    missing = [m for m in modules if f"`{m}`" not in text and not m.endswith("__init__.py")]
    assert missing == []


def test_the_tests_mirror_the_package() -> None:
    for sub in (p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")):
        assert (ROOT / "tests" / sub).is_dir(), sub


def test_the_repository_refers_to_no_file_outside_itself() -> None:
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    outside = ("LIGHTNING" + "_NOTES", "../" + "shared", "STYLE" + ".md", "SEED" + ".md")
    found = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".js", ".toml", ".cfg", ".sh", ".txt", ".yaml") or name in ("Makefile",):
            text = path.read_text(errors="replace")
            found += [f"{name}: {o}" for o in outside if o in text]
    assert found == []
