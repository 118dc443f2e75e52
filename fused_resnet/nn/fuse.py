"""fuse(): the fused kernels for any residual network, not only the
ResNets convert() knows.

    model = fused_resnet.fuse(model)          # in place; returns the model
    print(fused_resnet.fuse_report(model))    # what was fused, what was left alone and why

How: torchvision's and timm's ResNet blocks take convert()'s fast path
first. Then every other module's own forward is traced with torch.fx, its
child modules as opaque calls, except plain nn.Sequentials without hooks,
which are traced through so that a chain may cross their boundary (a module
that does not trace, e.g. one with data-dependent control flow, is left as
it is, and its children are still visited: the per-submodule fallback). In
that graph:

  conv -> BN [-> + residual] [-> ReLU]   becomes one fused unit
                                          (nn/paths/units.py: BN folded in
                                          eval, statistics from the conv's
                                          epilogue in training, ...);
  BN [-> + residual] -> ReLU             becomes ops.batch_norm_act (one pass;
                                          pre-activation blocks);
  BN -> ReLU feeding only a unit's conv  becomes that unit's prologue: on the
                                          triton backend in training, with the
                                          "prologue" fusion on, applied as the
                                          conv loads its input (the activation
                                          is never written); elsewhere the
                                          fused BN + ReLU op feeding the conv;
  x + r -> ReLU                          becomes ops.add_relu.

A chain is fused only when every intermediate has that one user, the modules
are plain (nn.Conv2d with zero padding, nn.BatchNorm2d / SyncBatchNorm2d /
torchvision's FrozenBatchNorm2d / timm's BatchNormAct2d with a ReLU, each
with its stock forward) and none has a hook; anything else keeps its eager
code and is listed in the report with the reason. The module keeps its
children, parameters, buffers, state_dict keys, hooks and methods: its class
is swapped for a subclass whose forward is the rewritten graph (one per
train/eval mode when the forward reads self.training), generated as Python
code that looks the children up by name at call time, so
convert_sync_batchnorm() after fuse() and a later `model.layer = ...` are
seen (a Sequential traced through is looked up by its children's paths:
replacing it by one of another structure needs fuse() again). Like torch.fx,
the rewrite specialises a forward to its module's plain attributes (flags,
sizes) at fuse time: call fuse() again after changing them. Fused modules
pickle (the generated code travels with them), deep-copy, run under
torch.compile(fullgraph=True) and torch.export, DDP and synchronised
BatchNorm; torch.jit.script does not compile them (use torch.export).
"""

from __future__ import annotations

import builtins
import importlib
import linecache
import logging
import operator
import types
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import dispatch
from ..backends import bn_modules
from . import swapped
from .chains import run_add_relu, run_bn_act, run_unit, timm_bn_act

__all__ = ["fuse", "fuse_report", "FuseReport"]

log = logging.getLogger("fused_resnet.fuse")

# ------------------------------------------------------------------ report


@dataclass
class FuseReport:
    """What fuse() did: each fused chain (module path, pattern, the modules
    it runs) and each candidate left alone, with the reason."""

    fused: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fuse(): {len(self.converted)} block(s) through convert(), {len(self.fused)} chain(s) fused, "
                 f"{len(self.left_alone)} left alone"]
        lines += [f"  convert  {where}" for where in self.converted]
        lines += [f"  fused    {where or '(root)'}: {pattern}  [{', '.join(mods)}]" for where, pattern, mods in self.fused]
        lines += [f"  left     {where or '(root)'}: {why}" for where, why in self.left_alone]
        return "\n".join(lines)


_reports: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fuse_report(model: nn.Module) -> FuseReport:
    """The report of the last fuse() of model."""
    try:
        return _reports[model]
    except KeyError:
        raise ValueError("fuse_report: this model has not been through fused_resnet.fuse()") from None


# ---------------------------------------------------------- node predicates

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None))
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


class _Graph:
    """One module's traced graph with the questions the matcher asks."""

    def __init__(self, owner: nn.Module, graph: torch.fx.Graph, prefix: str, report: FuseReport):
        self.owner, self.graph, self.prefix, self.report = owner, graph, prefix, report

    def module(self, node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        try:
            return self.owner.get_submodule(node.target)
        except AttributeError:
            return None

    def path(self, node) -> str:
        return f"{self.prefix}{node.target}" if node.op == "call_module" else f"{self.prefix}{node.name}"

    def conv(self, node):
        m = self.module(node)
        return m if m is not None and bn_modules.is_plain_conv(m) and not _has_hooks(m) else None

    def bn(self, node):
        """(module, ends_in_relu) for a BatchNorm node we can fuse, else None."""
        m = self.module(node)
        if m is None or _has_hooks(m):
            return None
        if bn_modules.bn_supported(m):
            return m, False
        act = timm_bn_act(m)
        if act is not None:
            return m, act
        return None

    def why_not_bn(self, node) -> str | None:
        """A reason to report for a BatchNorm node left alone, or None when
        the node is no BatchNorm at all."""
        m = self.module(node)
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).__name__ != "FrozenBatchNorm2d":
            return None
        if _has_hooks(m):
            return f"{self.path(node)} has a hook (fused modules would skip it)"
        if type(m).__name__ == "BatchNormAct2d":
            return f"{self.path(node)}: timm BatchNormAct2d with {type(getattr(m, 'act', None)).__name__} " \
                   "(only ReLU or none is fused)"
        return f"{self.path(node)}: {type(m).__name__} (not a plain BatchNorm2d forward)"

    def relu(self, node) -> bool:
        if node.op == "call_module":
            m = self.module(node)
            return type(m) is nn.ReLU and not _has_hooks(m)
        if node.op == "call_function":
            return node.target in _RELU_FUNCTIONS and len(node.args) == 1
        return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1

    def add_operands(self, node):
        """(a, b) of a plain tensor addition node, else None."""
        if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
            if len(node.args) == 2 and not node.kwargs:
                return node.args
        if node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs:
            return node.args
        return None

    def identity(self, node) -> bool:
        m = self.module(node)
        return type(m) is nn.Identity and not _has_hooks(m)


# ------------------------------------------------------------------ matcher


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _rewrite(g: _Graph, backend_attr: str) -> int:
    """Replace every fusable chain of g's graph by a call; returns how many."""
    graph = g.graph
    for node in list(graph.nodes):
        if g.identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    fused = 0
    chains = []  # (kind, nodes, args)
    consumed: set = set()
    for node in list(graph.nodes):
        if node in consumed:
            continue
        bn_info = g.bn(node)
        if bn_info is None:
            why = g.why_not_bn(node)
            if why is not None:
                g.report.left_alone.append((g.prefix.rstrip("."), why))
            continue
        bn_mod, relu = bn_info
        nodes = [node]
        inp = node.args[0] if node.args else None
        conv_node = inp if (isinstance(inp, torch.fx.Node) and g.conv(inp) is not None
                            and _single_user(inp) is node and inp not in consumed) else None
        tail, residual = node, None
        if not relu:
            user = _single_user(tail)
            operands = g.add_operands(user) if user is not None and user not in consumed else None
            if operands is not None and tail in operands and operands[0] is not operands[1]:
                residual = operands[1] if operands[0] is tail else operands[0]
                nodes.append(user)
                tail = user
                user = _single_user(tail)
            if user is not None and user not in consumed and g.relu(user):
                relu = True
                nodes.append(user)
                tail = user
        if conv_node is None and not relu and residual is None:
            continue  # a lone BatchNorm: nothing to fuse
        if conv_node is not None:
            nodes.insert(0, conv_node)
        consumed.update(nodes)
        chains.append((conv_node, node, residual, relu, nodes, tail))
    # A BN + ReLU whose only user is a unit's conv becomes that unit's prologue.
    by_conv = {c[0]: c for c in chains if c[0] is not None}
    prologue_of = {}
    for conv_node, bn_node, residual, relu, nodes, tail in chains:
        if conv_node is None and relu and residual is None:
            user = _single_user(tail)
            if user in by_conv and user.args and user.args[0] is tail:
                prologue_of[user] = (bn_node, nodes)
    backend_node = None
    # A chain's tail replaced by its fused call: a later chain's residual may
    # be that tail (x = relu(bn1(conv1(x))); relu(bn2(conv2(x)) + x)).
    replaced = {}
    # Residuals a unit may overwrite with its result (oneDNN's sum post-op in
    # inference; the backend decides): fresh tensors, made in this forward
    # by a fused chain or a plain conv, whose only reader is the add.
    tails = {tail for *_, tail in chains}
    for conv_node, bn_node, residual, relu, nodes, tail in chains:
        if conv_node is None and any(bn_node is p[0] for p in prologue_of.values()):
            continue  # merged into its unit below
        fresh = isinstance(residual, torch.fx.Node) and (residual in tails or g.conv(residual) is not None)
        residual = replaced.get(residual, residual)
        owned = fresh and len(residual.users) == 1
        with graph.inserting_before(tail):
            if backend_node is None:
                backend_node = graph.get_attr(backend_attr)
            bn_ref = graph.get_attr(bn_node.target)
            if conv_node is None:
                new = graph.call_function(run_bn_act, (bn_ref, bn_node.args[0], residual, relu, backend_node))
                pattern, mods = "bn" + ("+add" if residual is not None else "") + "+relu", (bn_node.target,)
            else:
                conv_ref = graph.get_attr(conv_node.target)
                pro = prologue_of.get(conv_node)
                x = conv_node.args[0]
                pro_ref = None
                if pro is not None:
                    pro_ref = graph.get_attr(pro[0].target)
                    x = pro[0].args[0]
                new = graph.call_function(run_unit, (conv_ref, bn_ref, x, residual, relu, pro_ref, backend_node, owned))
                pattern = ("bn+relu->" if pro is not None else "") + "conv+bn" + \
                    ("+add" if residual is not None else "") + ("+relu" if relu else "")
                mods = ((pro[0].target,) if pro is not None else ()) + (conv_node.target, bn_node.target)
        tail.replace_all_uses_with(new)
        replaced[tail] = new
        for n in reversed(nodes):
            graph.erase_node(n)
        if conv_node is not None and conv_node in prologue_of:
            for n in reversed(prologue_of[conv_node][1]):
                graph.erase_node(n)
        g.report.fused.append((g.prefix.rstrip("."), pattern, tuple(g.prefix + m for m in mods)))
        fused += 1
    # x + r -> ReLU left over (no BatchNorm before the add).
    for node in list(graph.nodes):
        operands = g.add_operands(node)
        user = _single_user(node) if operands is not None else None
        if user is None or not g.relu(user):
            continue
        with graph.inserting_before(user):
            if backend_node is None:
                backend_node = graph.get_attr(backend_attr)
            new = graph.call_function(run_add_relu, (operands[0], operands[1], backend_node))
        user.replace_all_uses_with(new)
        graph.erase_node(user)
        graph.erase_node(node)
        g.report.fused.append((g.prefix.rstrip("."), "add+relu", ()))
        fused += 1
    graph.lint()
    return fused


# ------------------------------------------------------------------ tracing


def _inlinable(m: nn.Module) -> bool:
    """A plain nn.Sequential without hooks: its forward only chains its
    children, so tracing through it changes nothing but lets a chain cross
    its boundary (a deep stem's last conv inside a Sequential, its BN and
    ReLU in the parent; conv + BN in a Sequential, the add in the parent)."""
    return type(m) is nn.Sequential and not _has_hooks(m)


class _OwnForwardTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call stays one node,
    except plain Sequentials, which are traced through (their children
    become nodes; `inlined` names them). Buffers are proxies too, so an
    in-place update in the forward (a BatchNorm's num_batches_tracked += 1)
    is recorded, not run."""

    def __init__(self):
        super().__init__()
        self.proxy_buffer_attributes = True
        self.inlined: set[str] = set()

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if _inlinable(m):
            self.inlined.add(qualified_name)
            return False
        return True


_BACKEND_ATTR = "_fused_resnet_backend"
# The Sequentials a fused module's forward traces through (paths relative to
# it): a second fuse() leaves them to that forward.
_INLINED_ATTR = "_fused_resnet_inlined"


def _trace_in_mode(module: nn.Module, training: bool) -> tuple[torch.fx.Graph, set[str]]:
    """The graph of module's forward in one mode, and the Sequentials traced
    through (names relative to module)."""
    was = module.training
    module.training = training  # this module only: a Sequential traced through reads no flag
    try:
        tracer = _OwnForwardTracer()
        return tracer.trace(module), tracer.inlined
    finally:
        module.training = was


# ---------------------------------------------------------- generated code


class FusedForward:
    """The rewritten forward of one module as generated Python: source and
    the globals it names, compiled on first use. Pickles as its source and
    the import paths of its globals, so a fused module loads anywhere
    fused_resnet can be imported."""

    def __init__(self, src: str, names: dict[str, tuple]):
        self.src, self.names = src, names
        self._fn = None

    @classmethod
    def from_graph(cls, graph: torch.fx.Graph) -> "FusedForward":
        code = graph.python_code(root_module="self")
        return cls(code.src, {name: _where(obj) for name, obj in code.globals.items() if name != "__builtins__"})

    @property
    def fn(self):
        if self._fn is None:
            namespace = {name: _resolve(spec) for name, spec in self.names.items()}
            # A source file linecache knows, as torch.fx does, so tracebacks
            # and torch.compile see the code.
            filename = f"<fused_resnet forward {abs(hash(self.src)):x}>"
            linecache.cache[filename] = (len(self.src), None, self.src.splitlines(True), filename)
            exec(compile(self.src, filename, "exec"), namespace)  # noqa: S102 - our own generated code
            self._fn = namespace["forward"]
        return self._fn

    def __reduce__(self):
        return FusedForward, (self.src, self.names)

    def __deepcopy__(self, memo):
        return self  # immutable


def _where(obj) -> tuple:
    """How to find a global of the generated code again."""
    if isinstance(obj, types.ModuleType):
        return ("module", obj.__name__)
    if isinstance(obj, (int, float, bool, str, type(None))):
        return ("value", obj)
    if obj is type(None):  # lives in no module
        return ("nonetype",)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    mod = getattr(obj, "__module__", None)
    if mod is None or name is None:
        raise TypeError(f"fuse: cannot name {obj!r} for the generated forward")
    if mod == "builtins":
        return ("builtin", name)
    return ("attr", mod, name)


def _resolve(spec: tuple):
    kind = spec[0]
    if kind == "module":
        return importlib.import_module(spec[1])
    if kind == "value":
        return spec[1]
    if kind == "nonetype":
        return type(None)
    if kind == "builtin":
        return getattr(builtins, spec[1])
    obj = importlib.import_module(spec[1])
    for part in spec[2].split("."):
        obj = getattr(obj, part)
    return obj


class _FusedModule(swapped.PicklableSwap):
    """Mixed in front of a fused module's class (swapped.py): forward runs
    the rewritten graph of the module's mode."""

    def forward(self, *args, **kwargs):
        graphs = self.__dict__["_fused_resnet_forward"]
        return graphs[self.training if len(graphs) == 2 else 0].fn(self, *args, **kwargs)


# ------------------------------------------------------------------ fuse()


def _fast_path_types() -> tuple[type, ...]:
    from . import timm_blocks
    from .blocks import FusedBasicBlock, FusedBottleneck
    from .convert import FusedStemMixin
    from .resnet import ResNet

    return (FusedBasicBlock, FusedBottleneck, ResNet, FusedStemMixin, timm_blocks.FusedTimmBlock)


def _no_own_graph(module: nn.Module) -> bool:
    """Modules whose forward is not worth tracing: leaves (no children),
    already-fused ones, and the fused building blocks of nn.modules."""
    from . import composable

    return (not any(True for _ in module.children()) or isinstance(module, _fast_path_types())
            or isinstance(module, composable.FusedModule)
            or isinstance(module, nn.modules.batchnorm._BatchNorm)  # timm's BatchNormAct2d: a chain link itself
            or type(module).forward is nn.Module.forward)  # containers with no forward (ModuleList, ModuleDict)


def fuse(model: nn.Module, backend: str | None = None, example_input=None) -> nn.Module:
    """Run every conv -> BN [-> add] [-> ReLU] and BN [-> add] -> ReLU chain of
    `model` fused, in place, and return `model` (see the module docstring).

    Args:
        model: any nn.Module.
        backend: None (follow fused_resnet.set_backend) or a backend name, for
            every fused part of this model (fuse() again to change it).
        example_input: optional input (or tuple of inputs); the fused model is
            run on it once in eval mode without gradients and compared with
            the eager forward (numerics criterion), which also folds the
            BatchNorms and warms the kernels. The model's mode is restored.

    fused_resnet.fuse_report(model) says what was fused and what was left
    alone, and why; the report is also logged (logger "fused_resnet.fuse",
    INFO)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() expects an nn.Module, got {type(model).__name__}")
    if backend is not None:
        backend = dispatch.validate(backend)
    reference = _eager_outputs(model, example_input) if example_input is not None else None
    report = FuseReport()
    from .convert import convert

    before = {id(m) for m in model.modules() if isinstance(m, _fast_path_types())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blocks convert() leaves alone are fused below instead
        model = convert(model, backend=backend)
    fast = [name for name, m in model.named_modules() if isinstance(m, _fast_path_types())]
    report.converted = [name or "(root)" for name, m in model.named_modules()
                        if isinstance(m, _fast_path_types()) and id(m) not in before]
    inlined: set[str] = set()  # Sequentials that a fused parent's forward traces through
    for name, module in list(model.named_modules()):
        if any(name.startswith(f"{f}.") or (f == "" and name) for f in fast):
            continue  # inside a block convert() fused: its own paths run it
        if name in inlined:
            continue  # its chains are fused in the parent's graph
        prefix = f"{name}." if name else ""
        if isinstance(module, _FusedModule):
            module.__dict__[_BACKEND_ATTR] = backend  # fused before: a new backend choice
            inlined.update(prefix + n for n in module.__dict__.get(_INLINED_ATTR, ()))
            report.fused.append((name, "fused earlier (backend updated)", ()))
            continue
        if _no_own_graph(module):
            continue
        try:
            (g_eval, in_eval), (g_train, in_train) = _trace_in_mode(module, False), _trace_in_mode(module, True)
        except Exception as exc:  # noqa: BLE001 - any module that does not trace keeps its own forward
            report.left_alone.append((name, f"{type(module).__name__} does not trace with torch.fx "
                                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                                            "its children are fused on their own"))
            continue
        # The report describes the eval graph; the training graph differs only
        # where the forward reads self.training.
        n_eval = _rewrite(_Graph(module, g_eval, prefix, report), _BACKEND_ATTR)
        n_train = _rewrite(_Graph(module, g_train, prefix, FuseReport()), _BACKEND_ATTR)
        if n_eval == 0 and n_train == 0:
            continue
        same = g_eval.python_code("self").src == g_train.python_code("self").src
        forwards = [FusedForward.from_graph(g_eval)] + ([] if same else [FusedForward.from_graph(g_train)])
        module.__dict__["_fused_resnet_forward"] = forwards
        module.__dict__[_BACKEND_ATTR] = backend
        swapped.swap_class(module, _FusedModule)
        module.__dict__[_INLINED_ATTR] = sorted(in_eval | in_train)
        inlined.update(prefix + n for n in module.__dict__[_INLINED_ATTR])
    _reports[model] = report
    log.info("%s", report)
    if reference is not None:
        _check_outputs(model, example_input, reference)
    return model


def _as_args(example_input) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _eager_outputs(model: nn.Module, example_input):
    was = model.training
    try:
        with torch.no_grad():
            return model.eval()(*_as_args(example_input))
    finally:
        model.train(was)


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _check_outputs(model: nn.Module, example_input, want) -> None:
    got = _eager_outputs(model, example_input)
    for a, b in zip(_tensors(got), _tensors(want)):
        if not a.is_floating_point():
            continue
        # Same dtype, same inputs, a different order of the same arithmetic:
        # rounding-level differences (looser for 16-bit types).
        tol = 1e-3 if a.dtype in (torch.float32, torch.float64) else 5e-2
        if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())),
                                                    equal_nan=True):
            raise RuntimeError("fuse(): the fused model's output on example_input differs from the eager model's "
                               f"(max difference {float((a - b).abs().max()):.3g}); please report this model")
