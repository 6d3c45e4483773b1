"""The checkpoint spec of a traced graph: its submodules and its nodes, as plain values.

A traced module compressed chain by chain (:mod:`rankshrink.models.graph`) is an
``fx.GraphModule``: neither the user's class (its widths changed) nor a sequential chain. Its spec
lists each submodule the graph calls (a chain as a sequential spec, anything else as a layer spec)
and each node: its op, its target and its arguments, with references to earlier nodes by name.

Loading never imports anything by name: a ``call_function`` target must be one of the functions
a traced forward may call (:data:`~rankshrink.models.graph.GRAPH_FUNCTIONS`), looked up in that
table by its qualified name; a ``call_method`` target one of
:data:`~rankshrink.models.graph.GRAPH_METHODS`; a ``call_module`` target a listed submodule.
Anything else is refused in one line, like every other malformed checkpoint.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from rankshrink.errors import InputError
from rankshrink.models.graph import GRAPH_FUNCTIONS, GRAPH_METHODS, qualified

SPEC_TYPE = "graph"
_FUNCTIONS = {qualified(fn): fn for fn in GRAPH_FUNCTIONS}
_OPS = ("placeholder", "call_module", "call_function", "call_method", "output")
_MAX_NODES = 10_000  # a forged spec cannot make the loader build an unbounded graph


def graph_spec(gm: fx.GraphModule, describe: Callable[[nn.Module], dict[str, Any]]) -> dict[str, Any]:
    """The spec of ``gm``; ``describe`` gives a submodule's spec.

    Raises:
        InputError: a node calls something a spec cannot name (not produced by tracing).
    """
    modules: dict[str, Any] = {}
    nodes: list[dict[str, Any]] = []
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    # in the module's own order, the order of its state_dict (and so of its fingerprint)
    for name, _ in gm.named_modules():
        if name in called:
            modules[name] = describe(gm.get_submodule(name))
    for node in gm.graph.nodes:
        if node.op not in _OPS:
            raise InputError(f"cannot describe graph node {node.name} ({node.op})")
        target = str(node.target)
        if node.op == "call_function":
            target = qualified(node.target)
            if target not in _FUNCTIONS:
                raise InputError(f"cannot describe graph node {node.name}: it calls {target}")
        nodes.append(
            {
                "name": node.name,
                "op": node.op,
                "target": target,
                "args": _encode(node.args),
                "kwargs": _encode(dict(node.kwargs)),
            }
        )
    return {"type": SPEC_TYPE, "modules": modules, "nodes": nodes}


def build_graph(
    spec: dict[str, Any], build: Callable[[dict[str, Any]], nn.Module]
) -> fx.GraphModule:
    """The ``fx.GraphModule`` a graph spec describes (weights uninitialised); ``build`` builds a
    submodule from its spec.

    Raises:
        InputError: the spec is malformed or names a target outside the tables.
    """
    modules, nodes = spec.get("modules"), spec.get("nodes")
    if not isinstance(modules, dict) or not isinstance(nodes, list) or not nodes:
        raise InputError("graph spec needs a 'modules' dict and a 'nodes' list")
    if len(nodes) > _MAX_NODES:
        raise InputError(f"graph spec has {len(nodes)} nodes; at most {_MAX_NODES}")
    root = nn.Module()
    for name, part in modules.items():
        _install(root, name, build(part))
    graph = fx.Graph()
    made: dict[str, fx.Node] = {}
    for entry in nodes:
        node = _node(graph, entry, made, modules)
        made[node.name] = node
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph)
    except Exception as exc:  # fx raises plain RuntimeErrors and AttributeErrors
        raise InputError(f"graph spec does not form a valid graph: {str(exc)[:120]}") from None
    # GraphModule registers submodules in call order; the spec lists them in the saved module's
    # order, which is its state_dict's order and so its fingerprint's (rankshrink.onnx.provenance)
    order = list(dict.fromkeys(name.split(".")[0] for name in modules))
    ordered = {k: gm._modules[k] for k in order if k in gm._modules}
    gm._modules = type(gm._modules)({**ordered, **gm._modules})
    return gm


def _node(
    graph: fx.Graph, entry: Any, made: dict[str, fx.Node], modules: dict[str, Any]
) -> fx.Node:
    if not isinstance(entry, dict) or entry.get("op") not in _OPS:
        raise InputError(f"graph spec: a node must be a dict with an op in {_OPS}")
    op, target, name = entry["op"], entry.get("target"), entry.get("name")
    if not isinstance(target, str) or not isinstance(name, str) or name in made:
        raise InputError(f"graph spec: node {name!r:.40} needs a unique name and a target")
    args, kwargs = _decode(entry.get("args", []), made), _decode(entry.get("kwargs", {}), made)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise InputError(f"graph spec: node {name} has malformed arguments")
    # fx writes keyword names into the generated forward as code: identifiers only
    bad = [k for k in kwargs if not k.isidentifier() or keyword.iskeyword(k)]
    if bad:
        raise InputError(f"graph spec: node {name} has keyword {bad[0]!r:.40}, not an identifier")
    if op == "call_function" and target == "builtins.getattr" and args[1:] != ("shape",):
        raise InputError(f"graph spec: node {name} reads an attribute other than .shape")
    if op == "placeholder":
        # fx writes the name into the forward's signature: only a plain identifier is safe
        if not target.isidentifier() or keyword.iskeyword(target):
            raise InputError(f"graph spec: input name {target!r:.40} is not an identifier")
        node = graph.placeholder(target)
    elif op == "output":
        node = graph.output(args[0] if args else None)
    elif op == "call_module":
        if target not in modules:
            raise InputError(f"graph spec: node {name} calls {target!r:.40}, not a listed module")
        node = graph.call_module(target, args, kwargs)
    elif op == "call_function":
        if target not in _FUNCTIONS:
            raise InputError(f"graph spec: node {name} calls {target!r:.60}, which is not allowed")
        node = graph.call_function(_FUNCTIONS[target], args, kwargs)
    else:
        if target not in GRAPH_METHODS:
            raise InputError(f"graph spec: node {name} calls .{target:.40}(), which is not allowed")
        node = graph.call_method(target, args, kwargs)
    node.name = name
    return node


def _install(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` below ``root``, making the parents."""
    parts = name.split(".")
    if not all(p.isidentifier() or p.isdigit() for p in parts):
        raise InputError(f"graph spec: bad module name {name!r:.40}")
    parent = root
    for part in parts[:-1]:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(parts[-1], module)


def _encode(value: Any) -> Any:
    """Arguments as plain values: a node as ``{"node": name}``, tuples and lists tagged."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple | list):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise InputError(f"cannot describe a graph argument of type {type(value).__name__}")


def _decode(value: Any, made: dict[str, fx.Node]) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        (tag, inner), = value.items()
        if tag == "node" and isinstance(inner, str) and inner in made:
            return made[inner]
        if tag in ("tuple", "list") and isinstance(inner, list):
            items = [_decode(v, made) for v in inner]
            return tuple(items) if tag == "tuple" else items
        if tag == "dict" and isinstance(inner, dict):
            return {str(k): _decode(v, made) for k, v in inner.items()}
        if tag == "dtype" and isinstance(inner, str) and isinstance(getattr(torch, inner, None), torch.dtype):
            return getattr(torch, inner)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise InputError(f"graph spec: cannot read the argument {value!r:.60}")
