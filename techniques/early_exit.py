"""Early exits (dynamic computation): small classifiers part-way through the network.

BranchyNet (Teerapittayanon et al., 2016): an exit head after a chosen layer
classifies the sample from the features computed so far; at inference a sample
leaves at the first exit whose confidence (top softmax probability) reaches
``threshold``, so easy samples skip the rest of the network. All exits, the
final one included, are trained together on the sum of their losses.

The model is cut at *cut points*: places in its ``torch.fx`` graph where a single
tensor carries everything the rest of the network needs (after ``pool1`` in
LeNet-5; never inside a residual block, where the skip tensor is live too). The
segments between cuts become ``fx.GraphModule``s; the structure follows from the
model's code and the recipe alone, so ``rebuild`` recreates it without pickle.
A cut is named by the layer it follows (``pool1``; ``stem`` or ``stem.2`` after
the last layer of ``stem``) or, after a function call, by its fx node name
(``relu``, ``add``).

An exit head pools its feature map to at most 4 positions per spatial axis
(average pooling, so it exports to plain ONNX) and classifies with one linear
layer: 4x4x20 + bias -> 10 classes after LeNet-5's ``pool1`` is 3,210 parameters.
In a transformer, whose features are tokens (batch, tokens, width) of a width a
LayerNorm normalises, an exit head averages the tokens and classifies their mean.

Transformers are cut between blocks: attention modules are single layers to the
tracer (``attention.is_attention``), and ``nn.TransformerEncoder`` is traced as the
sequence of its layers (called without masks), so an exit can follow any of them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field
from torch import fx, nn

from .attention import is_attention, normalises_last_axis
from .base import APPLIED, CompressionContext, Stage, Technique, TechniqueConfig
from .block_exits import BlockExitNet, TokenHead, hidden_states, stack_cut_points
from .inputs import ExitLogits, call, logits_of

HEAD_POSITIONS = 4  # pooled positions per spatial axis of an exit head's input


def _split_names(value: Any) -> Any:
    """``"pool1+pool2"`` -> ``("pool1", "pool2")``: one string per placement, so a space can list placements as choices."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split("+") if part.strip())
    return value


class EarlyExitConfig(TechniqueConfig):
    kind: Literal["early_exit"] = "early_exit"
    after: Annotated[tuple[str, ...], BeforeValidator(_split_names, json_schema_input_type=str | list[str])] = Field(
        (),
        description="cut points followed by an exit head, in forward order ('pool1+pool2' for two); "
        "empty: one exit at the middle cut point",
    )
    threshold: float = Field(0.9, gt=0.0, lt=1.0, description="a sample leaves at the first exit whose top softmax probability reaches this")
    pooling: tuple[Literal["spatial", "tokens", "cls"], ...] | None = Field(
        None, json_schema_extra=APPLIED, description="per exit head, how it pools its features, written when applied"
    )


class ExitHead(nn.Module):
    """Average-pool to at most 4 positions per spatial axis (or average the tokens), flatten, one linear classifier."""

    def __init__(self, in_features: int, num_classes: int, tokens: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.tokens = tokens

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The flattened head input: a (batch, features) tensor."""
        return pooled(features, self.tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(features))


def pooled(features: torch.Tensor, tokens: bool) -> torch.Tensor:
    """An exit head's input: the mean token of (batch, tokens, width) features, or the spatially pooled map."""
    if tokens:
        return features.mean(dim=1)
    spatial = features.shape[2:]
    if spatial:
        kernel = [math.ceil(size / HEAD_POSITIONS) for size in spatial]
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(spatial)]
        features = pool(features, kernel, kernel, ceil_mode=True)
    return torch.flatten(features, 1)


class EarlyExitNet(nn.Module):
    """``segments[0] -> heads[0] ... segments[-1]``: the original network cut in pieces, with exits between them.

    In training mode ``forward`` returns every exit's logits (a tuple, the final
    exit last), so the loss can sum over them. In eval mode it runs the real exit
    logic: each sample leaves at the first confident exit, and only the samples
    still inside the network are carried on to the next segment.
    """

    def __init__(self, segments: list[nn.Module], heads: list[ExitHead], cut_names: tuple[str, ...], threshold: float) -> None:
        super().__init__()
        if len(segments) != len(heads) + 1:
            raise ValueError(f"need one segment more than exit heads, got {len(segments)} segments and {len(heads)} heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.cut_names = cut_names
        self.threshold = threshold

    def all_outputs(self, inputs: torch.Tensor) -> ExitLogits:
        """Every exit's logits, the final exit's last."""
        outputs = []
        features = inputs
        for segment, head in zip(self.segments, self.heads):
            features = segment(features)
            outputs.append(head(features))
        outputs.append(self.segments[-1](features))
        return ExitLogits(outputs)

    def exit_forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the index of the exit each sample left at (``len(heads)`` = the final one)."""
        batch = inputs.shape[0]
        remaining = torch.arange(batch, device=inputs.device)
        exits = torch.full((batch,), len(self.heads), dtype=torch.long, device=inputs.device)
        logits: torch.Tensor | None = None
        features = inputs
        for index, (segment, head) in enumerate(zip(self.segments, self.heads)):
            features = segment(features)
            exit_logits = head(features)
            if logits is None:
                logits = exit_logits.new_empty((batch, exit_logits.shape[1]))
            confident = F.softmax(exit_logits, dim=1).amax(dim=1) >= self.threshold
            logits[remaining[confident]] = exit_logits[confident]
            exits[remaining[confident]] = index
            remaining, features = remaining[~confident], features[~confident]
            if remaining.numel() == 0:
                return logits, exits
        final = self.segments[-1](features)
        if logits is None:
            return final, exits
        logits[remaining] = final
        return logits, exits

    def forward(self, inputs: torch.Tensor):
        if self.training:
            return self.all_outputs(inputs)
        return self.exit_forward(inputs)[0]



class _Tracer(fx.Tracer):
    """fx's tracer, with attention modules as single layers and ``nn.TransformerEncoder`` as the sequence of its layers."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return is_attention(module) or super().is_leaf_module(module, qualified_name)

    def call_module(self, module: nn.Module, forward, args, kwargs):
        if isinstance(module, nn.TransformerEncoder) and len(args) == 1 and not kwargs:
            prefix = self.path_of_module(module)
            features = args[0]
            for index, layer in enumerate(module.layers):
                features = self.create_proxy("call_module", f"{prefix}.layers.{index}", (features,), {})
            if module.norm is not None:
                features = self.create_proxy("call_module", f"{prefix}.norm", (features,), {})
            return features
        return super().call_module(module, forward, args, kwargs)


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    except Exception as error:  # fx raises many types for untraceable code
        raise ValueError(
            f"early exits need a model that torch.fx can trace (no Python control flow on tensor values): {type(error).__name__}: {error}"
        ) from None


def _scopes(node: fx.Node) -> list[str]:
    """The modules whose forward pass ``node`` runs inside, outermost first (fx's ``nn_module_stack``)."""
    return [path for path in (node.meta.get("nn_module_stack") or {}) if path]


def _names(node: fx.Node, later_modules: list[str], module_calls: dict[str, int], later_scopes: set[str] | None = None) -> list[str]:
    """Names of a cut after ``node``, outermost first: ``conv2`` as well as ``conv2.1`` once separable made conv2 a pair.

    A module path names the cut when the node is its last call (no later node calls
    into it), so names stay valid when an architecture technique replaced the layer.
    A function call (a residual ``add``) is named by the modules it ends, when it is
    the last node computed inside them (``blocks.1`` after a transformer block), then
    by its fx node name.
    """
    ended = [scope for scope in _scopes(node) if scope not in (later_scopes or set())]
    if node.op != "call_module":
        return ended + [node.name]
    parts = str(node.target).split(".")
    names = []
    for length in range(1, len(parts) + 1):
        path = ".".join(parts[:length])
        if module_calls[str(node.target)] == 1 and not any(later == path or later.startswith(path + ".") for later in later_modules):
            names.append(path)
    # a module called more than once (a ResNet block's one ReLU) is named by the modules whose last call it is (``layer2``)
    return names or [scope for scope in ended if scope != str(node.target)] + [node.name]


def cut_points(graph_module: fx.GraphModule) -> dict[fx.Node, list[str]]:
    """Cut points in forward order, with their names: nodes whose value is the only one the rest of the graph reads.

    Constants and parameters (``get_attr``) do not count: a segment refers to them
    itself. The node that feeds the output directly is no cut point (an exit there
    would duplicate the final one).
    """
    nodes = list(graph_module.graph.nodes)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"early exits need a model with exactly one input, this one has {len(placeholders)}")
    position = {node: index for index, node in enumerate(nodes)}
    last_use = {node: max((position[user] for user in node.users), default=position[node]) for node in nodes}
    finals = set(nodes[-1].all_input_nodes)
    module_calls: dict[str, int] = {}
    for node in nodes:
        if node.op == "call_module":
            module_calls[str(node.target)] = module_calls.get(str(node.target), 0) + 1
    found: dict[fx.Node, list[str]] = {}
    for node in nodes[:-1]:
        if node.op not in ("call_module", "call_function", "call_method") or node in finals:
            continue
        if _modified_in_place(graph_module, node):
            continue  # an exit head reading it would see it changed by the next segment (a residual sum before its inplace ReLU)
        if all(last_use[earlier] <= position[node] for earlier in nodes[: position[node]] if earlier.op != "get_attr"):
            later = [str(n.target) for n in nodes[position[node] + 1 :] if n.op == "call_module"]
            later_scopes = {scope for n in nodes[position[node] + 1 :] for scope in _scopes(n)}
            found[node] = _names(node, later, module_calls, later_scopes)
    return found


def _modified_in_place(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a user of ``node`` overwrites it: ``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.add_(...)``."""
    for user in node.users:
        if user.args[:1] != (node,):
            continue
        if user.op == "call_module" and getattr(graph_module.get_submodule(str(user.target)), "inplace", False):
            return True
        if user.kwargs.get("inplace") is True:
            return True
        name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
        if user.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__"):
            return True
    return False


def resolve_cuts(available: dict[fx.Node, list[str]], after: tuple[str, ...]) -> list[fx.Node]:
    """The cut points ``after`` names, checked and in forward order; empty -> the middle cut point."""
    nodes = list(available)
    if not nodes:
        raise ValueError("this model has no cut point for an early exit (no place where a single tensor carries the whole state)")
    if not after:
        return [nodes[(len(nodes) - 1) // 2]]
    by_name = {name: node for node, names in available.items() for name in names}
    unknown = [name for name in after if name not in by_name]
    if unknown:
        listed = ", ".join(names[0] for names in available.values())
        raise ValueError(f"early_exit.after: {', '.join(map(repr, unknown))} is not a cut point of this model; cut points: {listed}")
    chosen = sorted({by_name[name] for name in after}, key=nodes.index)
    if len(chosen) != len(after):
        raise ValueError(f"early_exit.after names a cut point twice: {'+'.join(after)}")
    return chosen


def exit_points(model: nn.Module) -> list[str]:
    """Every name usable in ``after`` for ``model``, in forward order (for messages and validation): cut points of its
    fx graph, or the blocks of its block stack when torch.fx cannot trace it."""
    if trace_error(model) is not None:
        return stack_cut_points(model)
    return [name for names in cut_points(trace(model)).values() for name in names]


def split(graph_module: fx.GraphModule, cuts: list[fx.Node]) -> list[fx.GraphModule]:
    """The graph cut after each node in ``cuts``: one GraphModule per segment, each with one input."""
    nodes = list(graph_module.graph.nodes)
    boundaries = [nodes.index(cut) for cut in cuts]
    starts = [0] + [b + 1 for b in boundaries]
    ends = boundaries + [len(nodes) - 1]
    segments = []
    for index, (start, end) in enumerate(zip(starts, ends)):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if index > 0:
            env[nodes[start - 1]] = graph.placeholder("features")

        def lookup(node: fx.Node) -> fx.Node:
            if node not in env:  # a parameter or constant read in this segment
                env[node] = graph.node_copy(node, lookup)
            return env[node]

        for node in nodes[start : end + 1]:
            if node.op == "get_attr":
                continue  # copied where used
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], lookup))
                continue
            env[node] = graph.node_copy(node, lookup)
        if nodes[end].op != "output":
            graph.output(env[nodes[end]])
        segments.append(fx.GraphModule(graph_module, graph, class_name=f"Segment{index}"))
    return segments


def shared_parameters(segments: list[fx.GraphModule]) -> list[str]:
    """Modules used by more than one segment (the artifact cannot store one tensor under two names)."""
    seen: dict[int, str] = {}
    shared = []
    for index, segment in enumerate(segments):
        for name, parameter in list(segment.named_parameters()) + list(segment.named_buffers()):
            if id(parameter) in seen and seen[id(parameter)] != f"{index}":
                shared.append(name)
            seen.setdefault(id(parameter), f"{index}")
    return shared


def build_exits(model: nn.Module, config: EarlyExitConfig) -> EarlyExitNet:
    """Cut ``model`` at ``config.after`` and add exit heads of placeholder size 1 x 1 (``apply`` sizes them, loading resizes them)."""
    traced = trace(model)
    available = cut_points(traced)
    cuts = resolve_cuts(available, config.after)
    segments = split(traced, cuts)
    shared = shared_parameters(segments)
    if shared:
        raise ValueError(f"early exits cannot cut here: layers used on both sides of a cut ({', '.join(shared)})")
    pooling = config.pooling or ("spatial",) * len(cuts)
    heads = [ExitHead(1, 1, tokens=kind == "tokens") for kind in pooling]
    return EarlyExitNet(segments, heads, tuple(available[cut][0] for cut in cuts), config.threshold)


class EarlyExit(Technique):
    summary = 'early exits: classifier heads at cut points, a sample leaving at the first confident one (saves time, not bytes)'
    config_type: ClassVar[type[TechniqueConfig]] = EarlyExitConfig
    stage: ClassVar[Stage] = Stage.DYNAMIC
    default_space: ClassVar[dict[str, Any]] = {"threshold": {"low": 0.5, "high": 0.99}}

    def inapplicable(self, model: nn.Module) -> str | None:
        """Why no exit can be placed in ``model``: torch.fx cannot trace it, and it has no stack of blocks either."""
        error = trace_error(model)
        if error is not None and not stack_cut_points(model):
            return f"{error}, and it has no stack of blocks (an nn.ModuleList of layers of one type) to place exits between; remove early_exit from the space"
        return None

    def resolve(self, model: nn.Module, config: EarlyExitConfig, ctx: CompressionContext) -> EarlyExitConfig:
        """The cut points by the names they resolved to (the middle one, when ``after`` is empty)."""
        if trace_error(model) is not None:
            return config.model_copy(update={"after": resolve_block_cuts(stack_cut_points(model), config.after)})
        available = cut_points(trace(model))
        return config.model_copy(update={"after": tuple(available[cut][0] for cut in resolve_cuts(available, config.after))})

    def apply(self, model: nn.Module, config: EarlyExitConfig, ctx: CompressionContext) -> nn.Module:
        if trace_error(model) is not None:
            return self._between_blocks(model, config, ctx)
        if not isinstance(ctx.example_inputs, torch.Tensor):
            raise ValueError("early exits cut a model that takes one input tensor; this one takes several (a tuple or dict of inputs)")
        exits = build_exits(model, config)
        with torch.no_grad():
            classes = model.eval()(ctx.example_inputs).shape[1]
            features = ctx.example_inputs
            heads = []
            for segment in exits.segments[:-1]:
                features = segment(features)
                if not isinstance(features, torch.Tensor) or features.dim() < 2:
                    raise ValueError(f"early exits need a batch of features at each cut point, got {type(features).__name__}")
                tokens = features.dim() == 3 and normalises_last_axis(model, features.shape[-1])
                heads.append(ExitHead(pooled(features, tokens).shape[1], classes, tokens=tokens))
        exits.heads = nn.ModuleList(heads)
        # the layers that must keep their output size (the classes) under channel pruning, under their new names;
        # by their leaf layers, since fx re-creates the containers (a low-rank Sequential) around them
        kept = {id(leaf) for name, module in model.named_modules() if name in ctx.protected_modules for leaf in module.modules()}
        ctx.protected_modules = frozenset(
            [name for name, module in exits.named_modules() if id(module) in kept]
            + [f"heads.{index}.linear" for index in range(len(heads))]
        )
        return exits

    def _between_blocks(self, model: nn.Module, config: EarlyExitConfig, ctx: CompressionContext) -> BlockExitNet:
        """Exits after blocks of the model's block stack (``block_exits``), each classifying the first token."""
        widths: dict[str, int] = {}
        hooks = [
            model.get_submodule(name).register_forward_hook(lambda _m, _i, output, name=name: widths.__setitem__(name, _width(output)))
            for name in config.after
        ]
        try:
            with torch.no_grad():
                classes = logits_of(call(model.eval(), ctx.example_inputs)).shape[1]
        finally:
            for hook in hooks:
                hook.remove()
        heads = [TokenHead(widths[name], classes, pooling="cls") for name in config.after]
        ctx.protected_modules = frozenset([f"model.{name}" for name in ctx.protected_modules] + [f"heads.{index}.linear" for index in range(len(heads))])
        return BlockExitNet(model, config.after, heads, config.threshold)

    def record(self, model: nn.Module, config: EarlyExitConfig, ctx: CompressionContext) -> EarlyExitConfig:
        """How each exit head pools its features (a replay builds the same heads)."""
        if isinstance(model, BlockExitNet):
            return config.model_copy(update={"pooling": tuple(head.pooling for head in model.heads)})
        return config.model_copy(update={"pooling": tuple("tokens" if head.tokens else "spatial" for head in model.heads)})

    def reshapes(self, config: EarlyExitConfig) -> bool:
        """``rebuild`` makes heads of placeholder size; loading gives them their stored sizes."""
        return True

    def rebuild(self, model: nn.Module, config: EarlyExitConfig) -> nn.Module:
        """The same cuts and heads, with placeholder head sizes that loading resizes to the stored ones."""
        if trace_error(model) is not None:
            cuts = resolve_block_cuts(stack_cut_points(model), config.after)
            pooling = config.pooling or ("cls",) * len(cuts)
            return BlockExitNet(model, cuts, [TokenHead(1, 1, pooling=kind) for kind in pooling], config.threshold)
        return build_exits(model, config)


def has_exits(model: nn.Module) -> bool:
    """Whether ``model`` is a model with early exits (cut into segments, or with exits between its blocks)."""
    return isinstance(model, (EarlyExitNet, BlockExitNet))


def trace_error(model: nn.Module) -> str | None:
    """Why torch.fx cannot trace ``model`` (and early exits cannot cut it into segments), or None."""
    try:
        trace(model)
    except ValueError as error:
        return str(error)
    return None


def resolve_block_cuts(names: list[str], after: tuple[str, ...]) -> tuple[str, ...]:
    """The blocks ``after`` names, checked and in forward order; empty -> the middle block."""
    if not names:
        raise ValueError("this model has no stack of blocks to place an early exit between")
    if not after:
        return (names[(len(names) - 1) // 2],)
    unknown = [name for name in after if name not in names]
    if unknown:
        raise ValueError(f"early_exit.after: {', '.join(map(repr, unknown))} is not a cut point of this model; cut points: {', '.join(names)}")
    if len(set(after)) != len(after):
        raise ValueError(f"early_exit.after names a cut point twice: {'+'.join(after)}")
    return tuple(sorted(after, key=names.index))


def _width(output) -> int:
    hidden = hidden_states(output)
    if hidden.dim() != 3:
        raise ValueError(f"early exits between blocks read (batch, tokens, width) hidden states; this block gave shape {tuple(hidden.shape)}")
    return hidden.shape[-1]
