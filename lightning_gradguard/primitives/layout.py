"""Which layer a parameter belongs to, and the order in which layers run.

A *layer* is the module that directly owns parameters, named by its qualified name
(``encoder.rnn``). Two refinements:

* a multi-layer or bidirectional ``nn.RNN``/``nn.LSTM``/``nn.GRU`` is split per stacked layer and
  direction: ``encoder.rnn.l0``, ``encoder.rnn.l1``, ``encoder.rnn.l0_reverse``;
* parameters registered on the root module are named by the parameter's own name.

With ``group_by="parameter"`` every parameter is its own layer, under its full name. A tied parameter
(the same tensor registered twice, e.g. an embedding shared with the output layer) is attributed to
the first name ``named_parameters()`` gives it, and counted once. Parameters handed to the optimizer
but not registered in the model are named ``unregistered.g<group>.p<index>``.

The forward order is recorded once, on the first forward pass after :meth:`LayerMap.watch`, with
forward pre-hooks that remove themselves after that pass. It lets the guard name the *origin* of a
non-finite gradient (the non-finite layer nearest the loss) at no cost on healthy steps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LayerMap", "OptimizerLayout", "layer_name_of", "strip_wrappers"]

_RNN_SUFFIX = re.compile(r"_(l\d+(?:_reverse)?)$")


def layer_name_of(module_name: str, module: nn.Module, param_name: str) -> str:
    """The layer name of parameter ``param_name`` owned directly by ``module`` at ``module_name``.

    Example::

        >>> from torch import nn
        >>> layer_name_of("enc.rnn", nn.LSTM(4, 4, num_layers=2), "weight_hh_l1")
        'enc.rnn.l1'
        >>> layer_name_of("fc", nn.Linear(2, 2), "bias")
        'fc'
        >>> layer_name_of("", nn.Linear(2, 2), "scale")
        'scale'
    """
    if not module_name:
        return param_name
    if isinstance(module, nn.RNNBase):
        match = _RNN_SUFFIX.search(param_name)
        if match:
            return f"{module_name}.{match.group(1)}"
    return module_name


_WRAPPERS = frozenset(
    {"_orig_mod", "_forward_module", "_original_module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
)


def strip_wrappers(name: str) -> str:
    """Drop the segments that wrappers insert (``torch.compile``'s ``_orig_mod``, Fabric's
    ``_forward_module``/``_original_module``, FSDP1's ``_fsdp_wrapped_module``, activation
    checkpointing's ``_checkpoint_wrapped_module``), so that layer names stay the user's.

    Example::

        >>> strip_wrappers("_orig_mod.encoder._orig_mod.rnn")
        'encoder.rnn'
        >>> strip_wrappers("_forward_module.0")
        '0'
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


@dataclass
class OptimizerLayout:
    """How one optimizer's parameters map onto layers (built once per optimizer)."""

    params: list[Tensor]
    param_layer: list[int]
    layer_names: list[str]
    forward_rank: list[int]
    param_names: list[str] = field(default_factory=list)
    layer_seen: list[bool] = field(default_factory=list)  # ran in the recorded forward pass
    all_owners: list[int] = field(default_factory=list)  # range(len(params)), built once
    signature: tuple[tuple[int, int], ...] = ()
    plain: bool | None = None  # every gradient a dense, non-DTensor tensor (learned on the first step)
    single_group: bool | None = None  # every gradient on one device with one dtype (learned likewise)
    _subsets: dict[tuple[int, ...], tuple[list[Tensor], list[int], list[str]]] = field(default_factory=dict)
    _index_cache: dict[tuple[object, str], tuple[Tensor, list[int], Tensor]] = field(default_factory=dict)
    reduction_cache: dict[object, object] = field(default_factory=dict)  # sharded layouts: masks per group
    shard_groups: dict[int, tuple[object, ...]] = field(default_factory=dict)  # DTensor params: their groups
    forward_names: list[str] | None = None  # every layer in forward order, once the order is final

    def index(self, owners: Sequence[int], device: torch.device) -> tuple[Tensor, list[int], Tensor]:
        """(layer id of each owner's gradient, the sorted layer ids present, those ids as a tensor),
        the tensors on ``device``, cached per subset: no host-to-device copy on later steps."""
        key = ("all" if len(owners) == len(self.params) else tuple(owners), str(device))
        cached = self._index_cache.get(key)
        if cached is None:
            layer_of = [self.param_layer[i] for i in owners]
            present = sorted(set(layer_of))
            cached = (
                torch.tensor(layer_of, dtype=torch.int64, device=device),
                present,
                torch.tensor(present, dtype=torch.int64, device=device),
            )
            if len(self._index_cache) > 8:
                self._index_cache.clear()
            self._index_cache[key] = cached
        return cached

    def unused(self, layer_ids: Sequence[int]) -> list[str]:
        """The layers, other than ``layer_ids``, whose parameters require grad (sorted names)."""
        with_grad = set(layer_ids)
        if len(with_grad) >= len(self.layer_names):
            return []
        return sorted(
            {
                self.layer_names[self.param_layer[i]]
                for i, p in enumerate(self.params)
                if p.requires_grad and self.param_layer[i] not in with_grad
            }
        )

    def subset(self, owners: Sequence[int]) -> tuple[list[Tensor], list[int], list[str]]:
        """(params, layer ids, parameter names) of the parameters at ``owners`` (cached per subset)."""
        if len(owners) == len(self.params):
            return self.params, self.param_layer, self.param_names
        key = tuple(owners)
        cached = self._subsets.get(key)
        if cached is None:
            cached = (
                [self.params[i] for i in key],
                [self.param_layer[i] for i in key],
                [self.param_names[i] for i in key],
            )
            if len(self._subsets) > 8:  # changing graphs: keep the cache small
                self._subsets.clear()
            self._subsets[key] = cached
        return cached


class LayerMap:
    """Names parameters by layer and records the forward order of layers.

    Args:
        group_by: ``"layer"`` or ``"parameter"``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> lm = LayerMap("layer")
        >>> lm.watch(model)
        >>> _ = model(torch.zeros(1, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> lm.layout(opt).layer_names
        ['0', '2']
    """

    def __init__(self, group_by: str = "layer") -> None:
        self.group_by = group_by
        self._names: dict[int, tuple[str, str, int, str]] = {}
        self._order: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._layouts: dict[int, OptimizerLayout] = {}

    # ------------------------------------------------------------------ model
    def watch(self, model: nn.Module) -> None:
        """Name every parameter of ``model`` and start recording the forward order."""
        self.unwatch()
        self._names.clear()
        self._order.clear()
        self._layouts.clear()
        declared = 0
        for raw_name, module in model.named_modules(remove_duplicate=True):
            module_name = strip_wrappers(raw_name)
            own = list(module.named_parameters(recurse=False))
            for param_name, param in own:
                if id(param) in self._names:
                    continue  # tied: first owner wins
                full = f"{module_name}.{param_name}" if module_name else param_name
                layer = full if self.group_by == "parameter" else layer_name_of(module_name, module, param_name)
                self._names[id(param)] = (layer, module_name, declared, full)
                declared += 1
            if own and module_name:
                self._handles.append(module.register_forward_pre_hook(self._make_recorder(module_name)))

    def names(self) -> tuple[list[str], list[str]]:
        """The watched model's layer names and parameter names (``head.weight``), in declaration order."""
        named = sorted(self._names.values(), key=lambda entry: entry[2])
        return list(dict.fromkeys(layer for layer, *_ in named)), [full for *_, full in named]

    def _make_recorder(self, module_name: str):  # type: ignore[no-untyped-def]
        def record(_module: nn.Module, _args: object) -> None:
            if module_name not in self._order:
                self._order.append(module_name)

        return record

    def freeze_order(self) -> None:
        """Stop recording the forward order (called after every optimizer step; acts once)."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._layouts.clear()  # forward ranks are final now

    def unwatch(self) -> None:
        """Remove every hook this map registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def recording(self) -> bool:
        """Whether the forward order is still being recorded."""
        return bool(self._handles)

    # -------------------------------------------------------------- optimizer
    def layout(self, optimizer: torch.optim.Optimizer) -> OptimizerLayout:
        """The (cached) layer layout of ``optimizer``'s parameters.

        The cache is keyed on each parameter group's list object and length, which
        ``add_param_group`` and replacing a group's parameters change; checking it costs one tuple
        per group, not a pass over the parameters.
        """
        signature = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        cached = self._layouts.get(id(optimizer))
        if cached is not None and cached.signature == signature:
            return cached
        params = [p for group in optimizer.param_groups for p in group["params"]]
        layout = self._build(optimizer.param_groups, params)
        layout.signature = signature
        self._layouts[id(optimizer)] = layout
        return layout

    def _build(self, param_groups: Sequence[dict[str, object]], params: list[Tensor]) -> OptimizerLayout:
        layer_index: dict[str, int] = {}
        layer_module: dict[str, tuple[str, int]] = {}
        param_layer: list[int] = []
        param_names: list[str] = []
        seen: set[int] = set()
        flat = 0
        for g, group in enumerate(param_groups):
            group_params: list[Tensor] = group["params"]  # type: ignore[assignment]
            for i, p in enumerate(group_params):
                info = self._names.get(id(p))
                if info is None:
                    name = full = f"unregistered.g{g}.p{i}"
                    module_name, declared = "", 10**9 + flat
                else:
                    name, module_name, declared, full = info
                param_names.append(full)
                if id(p) in seen:
                    name = f"{name}.duplicate{flat}"
                seen.add(id(p))
                if name not in layer_index:
                    layer_index[name] = len(layer_index)
                    layer_module[name] = (module_name, declared)
                param_layer.append(layer_index[name])
                flat += 1
        names = list(layer_index)
        order = {m: r for r, m in enumerate(self._order)}
        unseen = len(order)

        def rank_key(name: str) -> tuple[int, int]:
            module_name, declared = layer_module[name]
            # Layers not seen in the recorded forward pass (root parameters, unused branches,
            # unregistered tensors) go after the recorded ones, in declaration order.
            return (order.get(module_name, unseen), declared)

        ranked = sorted(names, key=rank_key)
        forward_rank = [0] * len(names)
        for r, name in enumerate(ranked):
            forward_rank[layer_index[name]] = r
        seen_layers = [layer_module[n][0] in order for n in names]
        return OptimizerLayout(
            params, param_layer, names, forward_rank, param_names, seen_layers, list(range(len(params)))
        )

    def ordered(self, layout: OptimizerLayout, layer_ids: Iterable[int]) -> list[int]:
        """``layer_ids`` sorted in forward order."""
        return sorted(set(layer_ids), key=lambda i: layout.forward_rank[i])

    def forward_names(self, layout: OptimizerLayout) -> list[str]:
        """All layer names of ``layout`` in forward order (sorted once the order is final)."""
        if layout.forward_names is not None:
            return layout.forward_names
        names = [layout.layer_names[i] for i in self.ordered(layout, range(len(layout.layer_names)))]
        if not self.recording:
            layout.forward_names = names
        return names

    def __getstate__(self) -> dict[str, object]:
        # Hook handles and cached layouts refer to live tensors and modules: not part of a pickle.
        state = self.__dict__.copy()
        state["_handles"] = []
        state["_layouts"] = {}
        return state
