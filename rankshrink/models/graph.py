"""Ordinary ``nn.Module`` models: trace the forward with torch.fx and find its Linear chains.

Users write models as classes (``self.fc2(F.relu(self.fc1(x)))``, residual MLPs with LayerNorm),
not as ``nn.Sequential``. :func:`trace` captures the forward as an ``fx.Graph``, refuses any op the
fold cannot carry, and rewrites the graph so that every maximal *chain* — Linear → (elementwise
activation / dropout / BatchNorm1d)* → Linear → … with each intermediate value used exactly once
— is one ``nn.Sequential`` submodule ``chain0``, ``chain1``, ... The chain machinery
(:mod:`rankshrink.models.chain`, factorization, folding) then works on each submodule, and the
rest of the graph (residual adds, LayerNorm, reshapes) stays as it was written.

A chain's ends touch the residual stream or the model's input/output, so the chain rules that
protect a whole model's first columns and last rows (SPEC §3) are exactly right per chain.
BatchNorm1d in a chain is folded as the sequential path folds it, assuming ``(N, C)`` activations.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from rankshrink.errors import UnsupportedModelError
from rankshrink.nn.indexed import IndexedLinear

SUPPORTED_TEXT = (
    "Linear, elementwise activations, residual add/sub, LayerNorm, BatchNorm1d, dropout,"
    " flatten/reshape"
)

#: Modules that may sit between two Linears of a chain (elementwise, or eval-mode affine).
CHAIN_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus,
    nn.Identity, nn.Dropout, nn.BatchNorm1d,
)  # fmt: skip
#: Modules allowed outside chains.
#: (IndexedLinear: a layer rankshrink folded into index form, in a saved graph it compressed)
OTHER_MODULES = (nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.Flatten, IndexedLinear)


class _Tracer(fx.Tracer):
    """torch's tracer, with rankshrink's own folded layers kept whole (their forward gathers)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, IndexedLinear) or super().is_leaf_module(m, module_qualified_name)


class _NotConstant(Exception):
    """A functional's parameter is computed in the graph, so it has no module form."""


def _param(node: fx.Node, pos: int, name: str, default: Any) -> Any:
    """Argument ``name`` of a call (positional ``pos`` or keyword), which must be a constant."""
    value = node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)
    if isinstance(value, fx.Node):
        raise _NotConstant(name)
    return value


# Functional activations (torch., F. and Tensor-method forms) -> their module form in a chain.
_PLAIN: dict[type[nn.Module], tuple[Callable[..., Any], ...]] = {
    nn.ReLU: (F.relu, F.relu_, torch.relu, torch.relu_),
    nn.Tanh: (torch.tanh, F.tanh),
    nn.Sigmoid: (torch.sigmoid, F.sigmoid),
    nn.SiLU: (F.silu,),
}
_FUNCTIONS: dict[Callable[..., Any], Callable[[fx.Node], nn.Module]] = {
    **{fn: (lambda n, cls=cls: cls()) for cls, fns in _PLAIN.items() for fn in fns},
    F.leaky_relu: lambda n: nn.LeakyReLU(float(_param(n, 1, "negative_slope", 0.01))),
    F.gelu: lambda n: nn.GELU(approximate=str(_param(n, 1, "approximate", "none"))),
    F.elu: lambda n: nn.ELU(float(_param(n, 1, "alpha", 1.0))),
    F.softplus: lambda n: nn.Softplus(_param(n, 1, "beta", 1.0), _param(n, 2, "threshold", 20.0)),
    F.dropout: lambda n: nn.Dropout(float(_param(n, 1, "p", 0.5))),
    torch.dropout: lambda n: nn.Dropout(float(_param(n, 1, "p", 0.5))),
}
_METHODS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu_": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}  # fmt: skip
_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
#: Allowed outside chains: residual add/sub, reshapes, softmax; mul/div only by a constant.
_OTHER_FUNCTIONS = {
    operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
    torch.flatten, torch.reshape, operator.getitem, *_SOFTMAX_FUNCTIONS,
}  # fmt: skip
_SCALE_FUNCTIONS = {operator.mul, operator.imul, operator.truediv, torch.mul, torch.div}
_OTHER_METHODS = {"add", "sub", "flatten", "reshape", "view", "size", "contiguous", "softmax",
                  "log_softmax"}  # fmt: skip
_SCALE_METHODS = {"mul", "div"}
#: Every function and Tensor method a traced forward may call: all a saved graph may name.
GRAPH_FUNCTIONS = (*_FUNCTIONS, *_OTHER_FUNCTIONS, *_SCALE_FUNCTIONS, getattr)
GRAPH_METHODS = (*_METHODS, *_OTHER_METHODS, *_SCALE_METHODS)


@dataclass
class TracedModel:
    """A model's forward as a GraphModule whose Linear chains are ``nn.Sequential`` submodules."""

    module: fx.GraphModule
    chains: list[str]  # the chain submodules' names, in graph order

    def as_sequential(self) -> nn.Sequential | None:
        """The equivalent flat ``nn.Sequential`` when the forward is one chain, else ``None``.

        Recognized: input → optional flatten → one chain → optional Softmax/LogSoftmax → output.

        Returns:
            A new ``nn.Sequential`` (copies of the modules) or ``None``.
        """
        body = [n for n in self.module.graph.nodes if n.op not in ("placeholder", "output")]
        inputs = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            return None
        prev, stage, out = inputs[0], 0, []
        for node in body:  # a path: each node reads only the previous one, its only user
            if node.all_input_nodes != [prev] or len(prev.users) != 1:
                return None
            edge = _edge_module(self.module, node)
            if stage == 0 and isinstance(edge, nn.Flatten):
                mods, stage = [edge], 1
            elif stage <= 1 and node.op == "call_module" and node.target in self.chains:
                mods, stage = list(self.module.get_submodule(str(node.target))), 2
            elif stage == 2 and isinstance(edge, (nn.Softmax, nn.LogSoftmax)):
                mods, stage = [edge], 3
            else:
                return None
            out += [copy.deepcopy(m) for m in mods]
            prev = node
        output = next(n for n in self.module.graph.nodes if n.op == "output")
        if stage < 2 or output.args[0] is not prev:
            return None
        return nn.Sequential(*out).eval()


def trace(model: nn.Module) -> TracedModel:
    """Trace ``model``'s forward and rewrite a copy so that each Linear chain is one submodule.

    The model is traced in eval mode (``F.dropout(x, p, self.training)`` records
    ``training=False``); the returned GraphModule is in eval mode and computes exactly what
    ``model`` computes.

    Args:
        model: any ``nn.Module``; not modified.

    Returns:
        The rewritten GraphModule and the names of its chain submodules, in graph order.

    Raises:
        UnsupportedModelError: the forward does not trace with torch.fx (data-dependent control
            flow), calls an op outside the allowlist, or calls no ``nn.Linear``.
    """
    name = type(model).__name__
    try:
        root = copy.deepcopy(model).eval()
        gm = fx.GraphModule(root, _Tracer().trace(root), name)
    except Exception as exc:  # TraceError, TypeError, ...: the user's forward, not our bug
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(
            f"rankshrink cannot trace {name}'s forward with torch.fx ({first}); write it without"
            " data-dependent control flow, or save it as nn.Sequential"
        ) from None
    for node in gm.graph.nodes:
        _check_supported(gm, node, name)
    chains = _find_chains(gm)
    if not chains:
        raise UnsupportedModelError(f"rankshrink cannot compress {name}: it calls no nn.Linear")
    calls = [_rewrite(gm, members, mods, k) for k, (members, mods) in enumerate(chains)]
    gm.delete_all_unused_submodules()  # the originals now live inside the chains
    # Name the chains only now, so that a user's own ``chain0`` that a chain absorbed (or the
    # chains of an already traced module) no longer takes the name.
    names = [_rename(gm, call, f"chain{k}") for k, call in enumerate(calls)]
    gm.graph.lint()
    gm.recompile()
    return TracedModel(gm.eval(), names)


def _check_supported(gm: fx.GraphModule, node: fx.Node, name: str) -> None:
    if node.op in ("placeholder", "output", "get_attr"):
        return
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, (nn.Linear, *CHAIN_MODULES, *OTHER_MODULES)):
            return
        what = f"{type(mod).__name__} (self.{node.target})"
    elif node.op == "call_function":
        target = node.target
        if target in _FUNCTIONS or target in _OTHER_FUNCTIONS:
            return
        if target is getattr and node.args[1:] == ("shape",):  # x.shape (then [0] or a reshape)
            return
        if target in _SCALE_FUNCTIONS:
            if _tensor_operands(node) <= 1:
                return
            what = f"{qualified(target)} of two tensors"
        else:
            what = qualified(target)
    else:  # call_method
        method = str(node.target)
        if method in _METHODS or method in _OTHER_METHODS:
            return
        if method in _SCALE_METHODS and _tensor_operands(node) <= 1:
            return
        what = f"Tensor.{method}" + (" of two tensors" if method in _SCALE_METHODS else "")
    raise UnsupportedModelError(
        f"rankshrink cannot compress {name}: its forward calls {what} (node {node.name}), which"
        f" the fold does not handle; supported: {SUPPORTED_TEXT}"
    )


def _tensor_operands(node: fx.Node) -> int:
    """Graph values among a call's arguments, counting repeats (``x * x`` has two)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return len(found)


def qualified(target: Any) -> str:
    module = getattr(target, "__module__", None) or "torch"
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    return f"{module}.{getattr(target, '__name__', repr(target))}"


def _stateful_shared(gm: fx.GraphModule) -> set[str]:
    """Modules with weights called at several sites: a chain copy would untie them, so they stay."""
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    return {t for t, c in calls.items() if c > 1 and gm.get_submodule(t).state_dict()}


def _find_chains(gm: fx.GraphModule) -> list[tuple[list[fx.Node], list[nn.Module]]]:
    """Every maximal chain, in graph order: its nodes and (copies of) their modules.

    A Linear that an earlier chain reaches belongs to that chain; in graph order the earlier
    chain's first Linear always comes first, so each chain found here is maximal.
    """
    shared = _stateful_shared(gm)
    chains: list[tuple[list[fx.Node], list[nn.Module]]] = []
    taken: set[fx.Node] = set()
    for start in gm.graph.nodes:
        first = None if start in taken else _element(gm, start, None, shared)
        if not isinstance(first, nn.Linear):
            continue
        members, mods = [start], [first]
        while len(members[-1].users) == 1:  # an intermediate value read once: the chain goes on
            nxt = next(iter(members[-1].users))
            mod = _element(gm, nxt, members[-1], shared)
            if mod is None:
                break
            members.append(nxt)
            mods.append(mod)
        taken.update(members)
        chains.append((members, mods))
    return chains


def _element(
    gm: fx.GraphModule, node: fx.Node, prev: fx.Node | None, shared: set[str]
) -> nn.Module | None:
    """The module ``node`` is as a chain element reading ``prev`` (any input: None), or None."""
    if prev is not None and (node.args[:1] != (prev,) or _tensor_operands(node) != 1):
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        ok = isinstance(mod, (nn.Linear, *CHAIN_MODULES)) and str(node.target) not in shared
        return copy.deepcopy(mod) if ok and len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_method" and str(node.target) in _METHODS:
        return _METHODS[str(node.target)]()
    build = _FUNCTIONS.get(node.target) if node.op == "call_function" else None  # type: ignore
    try:
        return None if build is None else build(node)
    except _NotConstant:
        return None


def _rewrite(gm: fx.GraphModule, members: list[fx.Node], mods: list[nn.Module], k: int) -> fx.Node:
    """Replace the chain ``members`` by one call of a new ``nn.Sequential`` submodule."""
    name = f"_rankshrink_chain{k}"  # provisional: see _rename
    gm.add_submodule(name, nn.Sequential(*mods))
    first, last = members[0], members[-1]
    with gm.graph.inserting_after(last):
        call = gm.graph.create_node("call_module", name, (first.args[0],), name=f"chain{k}")
    last.replace_all_uses_with(call)
    for node in reversed(members):
        gm.graph.erase_node(node)
    return call


def _rename(gm: fx.GraphModule, call: fx.Node, name: str) -> str:
    """Move the submodule ``call`` runs to ``name`` (``_`` appended while an attribute has it)."""
    while hasattr(gm, name):
        name += "_"
    module = gm.get_submodule(str(call.target))
    delattr(gm, str(call.target))
    gm.add_submodule(name, module)
    call.target = name
    return name


def _edge_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """``node`` as an ``nn.Flatten``, ``nn.Softmax`` or ``nn.LogSoftmax`` (module, function or
    method form, constant arguments), or ``None``."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        edge = isinstance(mod, (nn.Flatten, nn.Softmax, nn.LogSoftmax))
        return copy.deepcopy(mod) if edge else None
    # a method's arguments are laid out as the torch function's: x.flatten(1) = torch.flatten(x, 1)
    fn = node.target if node.op == "call_function" else getattr(torch, str(node.target), None)
    try:
        if fn is torch.flatten:  # torch.flatten's start_dim defaults to 0, nn.Flatten's to 1
            return nn.Flatten(_param(node, 1, "start_dim", 0), _param(node, 2, "end_dim", -1))
        if fn in _SOFTMAX_FUNCTIONS and len(node.args) <= 2 and node.kwargs.get("dtype") is None:
            log = fn in (F.log_softmax, torch.log_softmax)
            return (nn.LogSoftmax if log else nn.Softmax)(_param(node, 1, "dim", None))
    except _NotConstant:
        pass
    return None
