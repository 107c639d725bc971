"""Structured pruning of whole hidden units, found from the model's code (no I/O).

A *unit group* is one hidden unit's weights in every tensor that touches it: the rows it owns in its
producer (a ``Linear`` output feature; an ``LSTM``/``GRU`` hidden unit: its row in every gate of
``weight_ih``/``weight_hh`` and the biases) and the columns it feeds in its consumers (the next
``Linear``'s input column, the next ``LSTM``/``GRU`` layer's ``weight_ih`` column, and for a recurrent
layer its own ``weight_hh`` column). Removing the unit zeros all of them together, so the network
computes exactly what a network without that unit computes.

Which producer feeds which consumer is read from a ``torch.fx`` trace of the model: a producer's
output may pass through element-wise ops (activations, dropout, the ``[0]`` of an RNN's output) to
``Linear``/``LSTM``/``GRU`` consumers; anything else that uses it (a residual add, a reshape, a
concatenation, the model output) makes its units not removable, and they are left alone. That is the
"where the model structure allows it" of the issue. Bidirectional and ``proj_size`` RNNs keep
their own units (they may still lose input columns), and a module called more than once is left alone.

Unit score (our choice): the L2 norm of the unit's incoming rows plus that of its outgoing columns,
each divided by the RMS unit norm of its tensor so that tensors of different scale weigh alike; the
lowest-scoring ``fraction`` of each group's units is removed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

#: element-wise callables a unit's value may pass through between producer and consumer
_ELEMENTWISE_FUNCS = {
    torch.relu, torch.sigmoid, torch.tanh, F.relu, F.gelu, F.silu, F.elu, F.leaky_relu, F.sigmoid, F.tanh,
    F.dropout, torch.nn.functional.hardtanh, F.relu6,
}  # fmt: skip
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity, nn.ReLU6, nn.Hardtanh,
)  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_RNN = (nn.LSTM, nn.GRU)


@dataclass
class UnitGroup:
    """The hidden units of one producer and every tensor they touch.

    Attributes:
        name: the producer (``"fc1"``, or ``"lstm.l0"`` for one RNN layer).
        size: number of units.
        rows: ``{tensor name: gates}``: the unit ``j`` owns rows ``g * size + j`` for ``g < gates``.
        cols: tensor names whose column ``j`` the unit feeds.
    """

    name: str
    size: int
    rows: dict[str, int] = field(default_factory=dict)
    cols: list[str] = field(default_factory=list)


def _gates(module: nn.Module) -> int:
    return 4 if isinstance(module, nn.LSTM) else 3


def _consumers(node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[str] | None:
    """Module names of the Linear/RNN consumers of ``node``'s value (as their input), or None when
    the value escapes anywhere else (a residual add, a reshape, the model output...)."""
    found: list[str] = []
    stack = [(node, u) for u in node.users]
    while stack:
        value, user = stack.pop()
        only_input = user.args[:1] == (value,) and value not in user.args[1:] and value not in user.kwargs.values()
        if user.op == "call_module":
            mod = modules[user.target]
            if isinstance(mod, (nn.Linear, *_RNN)) and only_input:
                found.append(user.target)
                continue
            if isinstance(mod, _ELEMENTWISE_MODULES) and only_input:
                stack.extend((user, u) for u in user.users)
                continue
            return None
        if user.op == "call_function" and user.target in _ELEMENTWISE_FUNCS and only_input:
            stack.extend((user, u) for u in user.users)
            continue
        if user.op == "call_method" and user.target in _ELEMENTWISE_METHODS and only_input:
            stack.extend((user, u) for u in user.users)
            continue
        return None
    return found


def find_unit_groups(model: nn.Module) -> list[UnitGroup]:
    """The removable unit groups of ``model`` (see the module docstring). Needs ``torch.fx`` to trace
    the model; a model it cannot trace has no removable groups (an empty list)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable code: nothing is provably removable
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    shared = {t for t, n in calls.items() if n > 1}  # a module called twice: its units serve two paths
    groups: list[UnitGroup] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in shared:
            continue
        mod = modules[node.target]
        if isinstance(mod, nn.Linear):
            users = _consumers(node, modules)
            if not users or any(n in shared for n in users):
                continue
            g = UnitGroup(node.target, mod.out_features, rows={f"{node.target}.weight": 1})
            if mod.bias is not None:
                g.rows[f"{node.target}.bias"] = 1
            if _attach(g, users, modules, mod.out_features):
                groups.append(g)
        elif isinstance(mod, _RNN):
            if mod.bidirectional or getattr(mod, "proj_size", 0):
                continue
            items = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
            out_nodes = [u for u in items if u.args[1] == 0]
            if len(items) != len(node.users) or any(u.users for u in items if u.args[1] != 0):
                continue  # the final hidden state is used: its units escape
            users = [_consumers(o, modules) for o in out_nodes]
            if any(u is None for u in users) or any(n in shared for u in users for n in u):
                continue
            last_users = [n for u in users for n in u]
            gates, h = _gates(mod), mod.hidden_size
            for k in range(mod.num_layers):
                g = UnitGroup(f"{node.target}.l{k}", h)
                for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    if hasattr(mod, f"{part}_l{k}"):
                        g.rows[f"{node.target}.{part}_l{k}"] = gates
                g.cols.append(f"{node.target}.weight_hh_l{k}")
                if k + 1 < mod.num_layers:
                    g.cols.append(f"{node.target}.weight_ih_l{k + 1}")
                    groups.append(g)
                elif last_users and _attach(g, last_users, modules, h):
                    groups.append(g)
    return groups


def _attach(g: UnitGroup, users: list[str], modules: dict[str, nn.Module], size: int) -> bool:
    for name in users:
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            if mod.in_features != size:
                return False
            g.cols.append(f"{name}.weight")
        else:
            if mod.input_size != size or getattr(mod, "proj_size", 0):
                return False
            g.cols.append(f"{name}.weight_ih_l0")
            if mod.bidirectional:
                g.cols.append(f"{name}.weight_ih_l0_reverse")
    return True


def unit_scores(g: UnitGroup, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Score of each unit of ``g`` (low = removed first)."""
    score = torch.zeros(g.size, dtype=torch.float64)
    for name, gates in g.rows.items():
        t = params[name].detach().double()
        per_unit = t.reshape(gates, g.size, -1).pow(2).sum((0, 2)).sqrt()
        score += per_unit / per_unit.pow(2).mean().sqrt().clamp_min(1e-30)
    for name in g.cols:
        t = params[name].detach().double()
        per_unit = t.pow(2).sum(0).sqrt()
        score += per_unit / per_unit.pow(2).mean().sqrt().clamp_min(1e-30)
    return score


def masks_for(groups: list[UnitGroup], params: dict[str, torch.Tensor], removed: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Element keep-masks of every tensor the ``removed`` units (indices per group name) touch."""
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        if not removed.get(g.name):
            continue
        keep_units = torch.ones(g.size, dtype=torch.bool)
        keep_units[removed[g.name]] = False
        for name, gates in g.rows.items():
            t = params[name]
            m = keep_units.repeat(gates).reshape(-1, *([1] * (t.dim() - 1))).expand_as(t)
            masks[name] = masks.get(name, torch.ones_like(t, dtype=torch.bool)) & m
        for name in g.cols:
            t = params[name]
            m = keep_units.reshape(1, -1).expand_as(t)
            masks[name] = masks.get(name, torch.ones_like(t, dtype=torch.bool)) & m
    return masks


def unit_masks(model: nn.Module, fraction: float, groups: list[UnitGroup] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Element keep-masks removing the lowest-scoring ``fraction`` of each group's units.

    Returns:
        ``(masks, removed)``: a bool mask per touched tensor (shapes of the tensors), and the removed
        unit indices per group name.
    """
    groups = find_unit_groups(model) if groups is None else groups
    params = dict(model.named_parameters())
    removed: dict[str, list[int]] = {}
    for g in groups:
        n_remove = min(int(fraction * g.size), g.size - 1)  # keep at least one unit
        if n_remove > 0:
            removed[g.name] = torch.topk(unit_scores(g, params), n_remove, largest=False).indices.sort().values.tolist()
    return masks_for(groups, params, removed), removed
