"""The compressed artifact: one safetensors file, no pickle.

Layout (documented in docs/artifact.md):
- tensors: one per state entry ``name``. A float entry is one uint8 tensor, the
  concatenation of its *parts*: ``values`` (all values, or only the nonzeros in a
  sparse layout; float32, float16, int8 codes, 4/2/1-bit codes packed into uint8,
  or one sign bit per nonzero for ternary codes stored sparse), the positions of a
  sparse layout as ``mask`` (packed bitmask) or ``gaps`` and ``gaps_low``
  (Rice-coded runs of zeros, after ``rows``, a bitmask of the rows with a nonzero,
  where skipping the empty rows is smaller), and ``scale`` (per-output-channel
  float32 scales, for 8/4/2/1 bits). Clustered tensors have ``centroids`` (float32)
  and, in ``values``, the cluster indices packed at ceil(log2 k) bits, or a
  canonical Huffman bitstream of them with ``code_lengths`` (one uint8 length per
  centroid). Integer buffers are stored as they are (``raw`` in the header).
- metadata ``netshrink``: JSON with the format version, each entry's shape,
  encoding (defaults left out), its parts (name, dtype and bytes, in the order they
  are stored; left out for the common single float32 ``values`` part), for a sparse
  layout the layout that decoding needs, and the recipe that produced the model;
  zlib-compressed and written in base85 (``read_header`` gives it back; in JSON a
  base85 string needs no escaping, so it costs 1.25 bytes a byte, base64 1.33).
  On a Deep Compression LeNet-5 the header was 1.7 KB of JSON, most of it repeated
  key names, and 4% of the file; compressed, a third of that.

One stored tensor per entry rather than one per part: safetensors' own header
spends about 80 bytes per tensor, which on a compressed LeNet-5 (some 20 parts)
was 1.7 KB, 4% of Deep Compression's 44 KB.

Loading rebuilds the model from its factory, resizes layers whose shapes
changed (structured pruning removes channels) and loads the decoded weights. A
shape may differ only when a step of the artifact's recipe changes shapes
(``Technique.reshapes``); otherwise the model's code changed since the artifact
was written, and loading refuses it, naming the tensors.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .encoding import Layout, TensorEncoding, decode_tensor, encode_tensor, plan_layout

# 2: per-tensor layouts, ternary sign bits; 3: one stored tensor per state entry; 4: compressed header, float16 parts
FORMAT = "netshrink-artifact/4"
PLAIN_PARTS = [["values", "float32", None]]  # an entry's parts when the header lists none: its float32 values


def pack_parts(parts: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, list[list[Any]]]:
    """The parts of entry ``name`` (``encode_tensor``'s tensors, keyed ``name.part``) as one uint8 tensor, and the
    list of (part, dtype, bytes) that splits it again."""
    blobs, listed = [], []
    for key, tensor in parts.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)
        blobs.append(raw)
        listed.append([key[len(name) + 1 :], str(tensor.dtype).removeprefix("torch."), raw.numel()])
    return torch.cat(blobs) if blobs else torch.zeros(0, dtype=torch.uint8), listed


def unpack_parts(name: str, blob: torch.Tensor, listed: list[list[Any]]) -> dict[str, torch.Tensor]:
    """Inverse of ``pack_parts``: the parts keyed ``name.part``, each 1-D in its own dtype."""
    out, offset = {}, 0
    for part, dtype, size in listed:
        size = blob.numel() - offset if size is None else size
        out[f"{name}.{part}"] = blob[offset : offset + size].clone().view(getattr(torch, dtype))
        offset += size
    return out


class ArtifactEntry(BaseModel):
    """One state entry in the header: what decoding it needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: list[int]
    encoding: TensorEncoding = TensorEncoding()
    parts: list[tuple[str, str, int]] | None = None  # (part, dtype, bytes) in stored order; None: plain float32 values
    layout: Layout = Layout()  # for a sparse layout: positions, nonzeros, rice_k, rows
    raw: bool = False  # an integer buffer, stored as it is
    same_as: str | None = None  # a tensor tied to an earlier entry (input and output embeddings): stored once, under that entry


class ArtifactHeader(BaseModel):
    """The artifact's ``netshrink`` metadata, typed: the source of truth for decoding it and rebuilding its model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str
    entries: dict[str, ArtifactEntry]
    recipe: dict[str, Any]  # the pipeline as applied, as JSON

    def encodings(self) -> dict[str, TensorEncoding]:
        """The storage plan the artifact was written under (what the ONNX export needs to store weights as the trial did)."""
        return {name: entry.encoding for name, entry in self.entries.items() if not entry.raw and entry.encoding != TensorEncoding()}


@dataclass
class LoadedArtifact:
    """A loaded artifact: the model rebuilt from it, the recipe that made it, its storage plan and header."""

    model: nn.Module
    pipeline: Any  # Pipeline (imported lazily: the pipeline module imports the registry, which imports this one)
    encodings: dict[str, TensorEncoding]
    header: ArtifactHeader


def encode_state(model: nn.Module, encodings: dict[str, TensorEncoding]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and per-entry metadata that store ``model``'s state under ``encodings``."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    seen: dict[tuple, str] = {}  # (storage, offset, shape, dtype) -> the first entry holding that tensor
    for name, value in model.state_dict().items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() and identity in seen:
            entries[name] = {"shape": list(value.shape), "same_as": seen[identity]}
            continue
        seen[identity] = name
        encoding = encodings.get(name, TensorEncoding())
        entry: dict[str, Any] = {"shape": list(value.shape), "encoding": encoding.model_dump(exclude_defaults=True)}
        if value.is_floating_point():
            layout = plan_layout(value, encoding)
            tensors[name], listed = pack_parts(encode_tensor(name, value, encoding, layout), name)
            if [part for part, dtype, _ in listed] != ["values"] or listed[0][1] != "float32":
                entry["parts"] = listed
            if layout.positions != "dense":  # what decoding needs; a dense entry needs nothing
                entry["layout"] = layout.model_dump(include={"positions", "nonzeros", "rice_k", "rows"}, exclude_defaults=True)
        else:
            tensors[name] = value.detach().cpu().contiguous()
            entry["raw"] = True  # an integer buffer, stored as it is
        entries[name] = entry
    return tensors, entries


def save_artifact(path: str | os.PathLike, model: nn.Module, encodings: dict[str, TensorEncoding], recipe: str) -> int:
    """Write the artifact and return its size in bytes (the file's size, as the OS reports it)."""
    tensors, entries = encode_state(model, encodings)
    header = {"format": FORMAT, "entries": entries, "recipe": json.loads(recipe)}
    packed = base64.b85encode(zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)).decode("ascii")
    save_file(tensors, os.fspath(path), metadata={"netshrink": packed})
    return os.path.getsize(path)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The artifact's ``netshrink`` metadata as JSON (still untyped: ``read_parts`` checks its format and validates it)."""
    with safe_open(os.fspath(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "netshrink" not in metadata:
        raise ValueError(f"{path}: not a netshrink artifact (no 'netshrink' metadata)")
    text = metadata["netshrink"]
    if text.startswith("{"):  # formats 3 and older wrote the JSON as it is
        return json.loads(text)
    try:
        return json.loads(zlib.decompress(base64.b85decode(text)))
    except (ValueError, zlib.error) as error:
        raise ValueError(f"{path}: its 'netshrink' metadata is neither JSON nor compressed JSON ({error})") from None


def read_parts(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ArtifactHeader]:
    """Every stored part keyed ``entry.part`` (an integer buffer under its entry's name), and the artifact header."""
    raw_header = read_header(path)
    if raw_header.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported artifact format {raw_header.get('format')!r}, expected {FORMAT!r} (written by another netshrink version)")
    header = ArtifactHeader.model_validate(raw_header)
    stored = load_file(os.fspath(path))
    parts: dict[str, torch.Tensor] = {}
    for name, entry in header.entries.items():
        if entry.same_as is not None:
            continue  # a tied tensor: its first entry holds it
        if entry.raw:
            parts[name] = stored[name]
        else:
            parts.update(unpack_parts(name, stored[name], [list(part) for part in entry.parts] if entry.parts else PLAIN_PARTS))
    return parts, header


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ArtifactHeader]:
    """Decoded float state dict and the artifact header."""
    parts, header = read_parts(path)
    state = {
        name: decode_tensor(name, parts, tuple(entry.shape), entry.encoding, entry.layout)
        for name, entry in header.entries.items()
        if entry.same_as is None
    }
    state.update({name: state[entry.same_as] for name, entry in header.entries.items() if entry.same_as is not None})
    return state, header


# What each stored part is for (see the module docstring); anything else is values.
PART_OF_SUFFIX = {"mask": "positions", "gaps": "positions", "gaps_low": "positions", "rows": "positions", "values": "values",
                  "scale": "codebooks", "centroids": "codebooks", "code_lengths": "codebooks"}


def byte_breakdown(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Where an artifact's bytes go: per state entry, its ``positions``, ``values`` and ``codebooks`` (scales,
    centroids, Huffman tables); plus ``header``: safetensors' own header with netshrink's metadata (shapes,
    encodings, layouts, the recipe). The parts add up to the file's size."""
    import struct

    with open(path, "rb") as handle:
        header_length = struct.unpack("<Q", handle.read(8))[0]
    stored, header = read_parts(path)
    parts: dict[str, dict[str, int]] = {name: {"positions": 0, "values": 0, "codebooks": 0} for name in header.entries}
    for key, tensor in stored.items():
        entry, _, suffix = key.rpartition(".")
        if key in parts:  # an integer buffer stored as it is
            entry, suffix = key, "values"
        parts[entry][PART_OF_SUFFIX[suffix]] += tensor.numel() * tensor.element_size()
    parts["header"] = {"header": 8 + header_length}
    return parts


def shape_mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(tensor name, stored shape, model's shape) for every tensor of ``model`` whose stored shape differs."""
    current = model.state_dict()
    return [
        (name, tuple(stored.shape), tuple(current[name].shape))
        for name, stored in state.items()
        if name in current and stored.shape != current[name].shape
    ]


def resize_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``model``'s tensors the shapes in ``state`` and fix the layer attributes that depend on them.

    Structured pruning changes channel counts; the pruned architecture is fully
    described by the stored shapes, so no pickled module is needed.
    """
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        changed = False
        depthwise = isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups == module.in_channels == module.out_channels
        for tensor_name, current in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            stored = state.get(prefix + tensor_name)
            if stored is None or stored.shape == current.shape:
                continue
            replacement = torch.empty(stored.shape, dtype=current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(module, tensor_name, nn.Parameter(replacement, requires_grad=current.requires_grad))
            else:
                module.register_buffer(tensor_name, replacement)
            changed = True
        if changed:
            _sync_layer_attributes(module_name, module, depthwise)


def _sync_layer_attributes(name: str, module: nn.Module, depthwise: bool) -> None:
    """The attributes of ``module`` that follow its tensors' shapes, set from its resized tensors.

    A layer of PyTorch's that netshrink does not know is refused by name: its attributes would keep
    the old sizes. A module of the user's own is left as it is (its tensors are its state).
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = module.weight.shape[0]
        if depthwise:  # channel pruning removes a depthwise conv's channels together with its groups
            module.groups = module.out_channels
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif type(module).__module__.startswith("torch.nn"):
        raise ValueError(
            f"{name!r}: its stored tensors have other shapes than the {type(module).__name__} built now, and netshrink does not know "
            "which of its attributes follow them; it cannot be loaded resized"
        )


def load_artifact(path: str | os.PathLike, model: nn.Module) -> LoadedArtifact:
    """Load an artifact into ``model`` (a fresh instance of the original architecture).

    Structural steps of the stored recipe (those whose technique has ``rebuild``)
    are replayed first, then layers are resized to the stored shapes, if a step
    of the recipe changes shapes; ``ValueError`` naming the tensors if none does,
    and if the recipe was written under other rules than this netshrink's.
    """
    from .pipeline import Pipeline
    from .registry import REGISTRY

    state, header = read_artifact(Path(path))
    unknown = [step.get("kind") for step in header.recipe.get("steps", []) if step.get("kind") not in REGISTRY]
    if unknown:
        raise ValueError(f"{path}: its recipe has a step {unknown[0]!r}, which is no technique of this netshrink ({', '.join(REGISTRY)})")
    try:
        pipeline = Pipeline.from_recipe(json.dumps(header.recipe))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    reshaping = []
    for step in pipeline.steps:
        technique = REGISTRY[step.kind]
        model = technique.rebuild(model, step) or model
        if technique.reshapes(step):
            reshaping.append(step.kind)
    mismatched = shape_mismatches(model, state)
    if mismatched and not reshaping:
        listed = "; ".join(f"{name}: {stored} stored, {current} built" for name, stored, current in mismatched[:5])
        raise ValueError(
            f"{path}: the model built now does not have the artifact's tensor shapes ({listed}), and no step of the "
            "artifact's recipe changes shapes: the model's code or arguments changed since the artifact was written"
        )
    resize_to_state(model, state)
    model.load_state_dict(state, strict=True)
    return LoadedArtifact(model=model.eval(), pipeline=pipeline, encodings=header.encodings(), header=header)
