"""LoRA: low-rank adapters wrapped around the model's projections, from outside the model.

``apply_lora`` freezes every parameter of a ``GPT`` and replaces the targeted ``Projection`` of
every block with a ``LoRAProjection`` holding the original layer as ``base``::

    y = base(x) + dropout(x) @ A @ B * (alpha / rank)        A: (in, rank), B: (rank, out)

Only A and B train. B starts at zero, so a fresh adapter leaves the model's outputs exactly as
they were; A starts as peft (and Microsoft's loralib) initialise it: uniform in
[-1/sqrt(in), 1/sqrt(in)], which is ``kaiming_uniform_(a=sqrt(5))`` of an (rank, in)
``nn.Linear`` weight. A is stored (in, rank) like the projections' (in, out), so that bound is set
explicitly rather than through ``kaiming_uniform_`` (which would take its fan-in from the wrong
dimension of this layout).

Names: the adapter of ``h.3.attn.c_attn`` is ``h.3.attn.c_attn.lora_A`` / ``.lora_B``
(``adapter_state``); while wrapped, the base weight reads ``h.3.attn.c_attn.base.weight``.
``merge_lora`` folds W + A B * scale back into plain projections, so a merged model has the
plain names again and is saved, quantized and exported like any other.

A LoRA checkpoint refers to its base by ``base_fingerprint``: sha256 over the names, dtypes,
shapes and bytes of the base's tensors, so loading an adapter onto a different base is refused
rather than silently producing nonsense.

DDP and torch.compile: frozen parameters get no gradient hooks and need no
``find_unused_parameters`` (every adapter is used in every forward); DDP's start-up broadcast
gives every rank rank 0's A even when ranks initialised it differently (checked under torchrun
with 2 gloo processes: adapters equal after steps on different data, base unchanged); the
gradient all-reduce carries the adapters only. The forward is plain tensor
code with no data-dependent Python, so it compiles without graph breaks (tested with
``torch._dynamo.explain``). Apply LoRA before wrapping the model in DDP or compiling it, and
merge on the unwrapped module.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .model import Projection
from .errors import UserError
from .frozen import FrozenPacks

# option value -> the projection's path inside each block h.N
TARGETS = {"qkv": "attn.c_attn", "attn-out": "attn.c_proj", "mlp-in": "mlp.c_fc",
           "mlp-out": "mlp.c_proj"}
ADAPTER_TENSORS = ("lora_A", "lora_B")


class LoRAProjection(nn.Module):
    """``base(x) + dropout(x) @ lora_A @ lora_B * scale`` around a float ``Projection``.

    ``lora_A`` (in, rank) is initialised uniform in +-1/sqrt(in) (see the module docstring),
    ``lora_B`` (rank, out) zero; both on the base weight's device and dtype. ``scale`` is
    alpha / rank. The base is not frozen here (``apply_lora`` does that for the whole model).
    """

    def __init__(self, base: Projection, rank: int, alpha: float, dropout: float = 0.0, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_settings(base, rank, alpha, dropout)
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(base.n_in, rank, device=weight.device,
                                               dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(rank, base.n_out, device=weight.device,
                                               dtype=weight.dtype))
        # Identity when off: no dropout kernel (and no RNG use) in the compiled graph
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.packs = FrozenPacks()  # the frozen base's products, when ``use_packs`` turns them on
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.base.n_in)
        with torch.no_grad():
            if self.lora_A.device.type != "meta":
                self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def delta(self) -> torch.Tensor:
        """The weight update A B * scale, (in, out), computed in float32 or wider."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_A.to(dtype) @ self.lora_B.to(dtype)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packs.product(x.reshape(-1, x.size(-1)), self.base.weight, self.base.bias)
        y = self.base(x) if packed is None else packed.view(*x.shape[:-1], self.base.n_out)
        flat = self.dropout(x).reshape(-1, x.size(-1))  # (B*T, in)
        # (B*T, rank) first: two thin products, never the (in, out) update
        update = (flat @ self.lora_A) @ self.lora_B * self.scale  # (B*T, out)
        return y + update.view(y.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class FrozenHead(nn.Linear):
    """The output matrix of a model with adapters: the same ``nn.Linear`` (its weight is the
    same, tied parameter, under the same name) whose products go through ``FrozenPacks`` when
    ``use_packs`` turns them on. ``merge_lora`` puts the plain ``nn.Linear`` back."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.train(linear.training)
        self.packs = FrozenPacks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packs.product(x.reshape(-1, x.size(-1)), self.weight.t(), self.bias)
        return super().forward(x) if packed is None else packed.view(*x.shape[:-1], -1)

    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)


def use_packs(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Turn the packed products of a LoRA model's frozen weights on for products computed in
    ``dtype`` (see ``kernels.FrozenPacks``), or off with None (which frees them)."""
    for m in model.modules():
        if isinstance(m, (LoRAProjection, FrozenHead)):
            m.packs.release()
            m.packs.dtype = dtype


def packed_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What ``use_packs`` holds once every frozen product has run: two copies of each packed
    weight in the compute ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * size * sum(m.base.weight.numel() if isinstance(m, LoRAProjection)
                          else m.weight.numel() for m in model.modules()
                          if isinstance(m, (LoRAProjection, FrozenHead)))


def check_settings(base: Projection, rank: int, alpha: float, dropout: float) -> None:
    """UserErrors for settings (or a layer) that LoRA cannot use."""
    if base.weight is None:
        raise UserError("LoRA needs a model with float weights, and this one is quantized; "
                        "load it without --quantize")
    if rank < 1:
        raise UserError(f"the LoRA rank must be at least 1, not {rank}")
    if not alpha > 0:
        raise UserError(f"the LoRA alpha must be positive, not {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"the LoRA dropout must be in [0, 1), not {dropout}")
    width = min(base.weight.shape)
    if rank > width:
        raise UserError(f"a LoRA rank of {rank} is more than the {width} inputs or outputs of "
                        f"the projections it adapts, where adapters train more than the "
                        f"weights; give a rank up to {width} (4-64 is usual), or leave LoRA out "
                        "to train every weight")


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    module = root
    for name in parents:
        module = getattr(module, name)
    return module, leaf


def check_targets(targets: Iterable[str]) -> list[str]:
    """The targets in ``TARGETS`` order, each once; an unknown one is a UserError."""
    targets = list(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise UserError(f"unknown LoRA target{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}; choose from {', '.join(TARGETS)}")
    if not targets:
        raise UserError(f"LoRA needs at least one target; choose from {', '.join(TARGETS)}")
    return [t for t in TARGETS if t in targets]


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: Iterable[str] = tuple(TARGETS), *,
               generator: torch.Generator | None = None) -> list[str]:
    """Freeze every parameter of ``model`` (a plain ``GPT``) and wrap the ``targets``
    projections of every block in ``LoRAProjection``s, in place. Returns the wrapped modules'
    names (``h.0.attn.c_attn``, ...) in block order. A model that already has adapters is
    refused."""
    if any(isinstance(m, LoRAProjection) for m in model.modules()):
        raise UserError("this model already has LoRA adapters; merge them (merge_lora) first")
    targets = check_targets(targets)
    if not isinstance(getattr(model, "h", None), nn.ModuleList):
        raise TypeError("apply LoRA to the plain GPT module (unwrap DDP / torch.compile first)")
    sites = [f"h.{i}.{TARGETS[t]}" for i in range(len(model.h)) for t in targets]
    for name in sites:  # everything is checked before the model is touched
        base = model.get_submodule(name)
        if not isinstance(base, Projection):  # e.g. quantize.prepare's int8/chunked layers
            kind = type(base).__name__
            raise UserError(f"LoRA wraps the model's float projections, but {name} is "
                            f"{'an' if kind[:1] in 'AEIOU' else 'a'} {kind} (a model prepared "
                            "for inference); load it without --quantize")
        check_settings(base, rank, alpha, dropout)
    model.requires_grad_(False)
    for name in sites:
        parent, leaf = _parent(model, name)
        base = getattr(parent, leaf)
        adapter = LoRAProjection(base, rank, alpha, dropout, generator=generator)
        adapter.train(base.training)  # a new module is in training mode: keep the model's
        setattr(parent, leaf, adapter)
    if type(getattr(model, "lm_head", None)) is nn.Linear:
        model.lm_head = FrozenHead(model.lm_head)
    return sites


def lora_modules(model: nn.Module) -> dict[str, LoRAProjection]:
    """The model's adapters by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAProjection)}


def adapter_settings(model: nn.Module) -> dict:
    """What rebuilds the same adapters on a base (``apply_lora(model, **settings)``): rank,
    alpha, dropout and targets, for a LoRA checkpoint's metadata."""
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(adapters.values()))
    paths = {name.split(".", 2)[2] for name in adapters}
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {"rank": first.rank, "alpha": first.alpha, "dropout": dropout,
            "targets": [t for t, path in TARGETS.items() if path in paths]}


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (W + A B * scale, rounded once to the weight's
    dtype) and put the plain ``Projection`` back, in place. Returns the merged modules' names.
    Parameters stay frozen as ``apply_lora`` left them (``model.requires_grad_()`` to train all)."""
    merged = []
    for name, module in lora_modules(model).items():
        base = module.base
        with torch.no_grad():
            delta = module.delta()
            base.weight.copy_((base.weight.to(delta.dtype) + delta).to(base.weight.dtype))
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, base)
        merged.append(name)
    if isinstance(getattr(model, "lm_head", None), FrozenHead):
        model.lm_head = model.lm_head.plain()
    return merged


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, detached, under stable names (``h.N.<path>.lora_A`` / ``_B``)
    that do not depend on how the base is wrapped. Pass the unwrapped model."""
    return {f"{name}.{t}": getattr(module, t).detach()
            for name, module in lora_modules(model).items() for t in ADAPTER_TENSORS}


def load_adapter(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model that ``apply_lora`` prepared with the same settings.
    Strict: missing, unexpected or mis-shaped tensors are a UserError that names them."""
    own = adapter_state(model)
    missing = [n for n in own if n not in tensors]
    unexpected = [n for n in tensors if n not in own]
    shapes = [f"{n} {tuple(tensors[n].shape)} (expected {tuple(own[n].shape)})"
              for n in own if n in tensors and tensors[n].shape != own[n].shape]
    problems = [f"{label}: {_names(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                if names]
    if problems:
        raise UserError(f"the adapter does not fit this model's LoRA layers "
                        f"({'; '.join(problems)}); was it made with other LoRA settings?")
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            for t in ADAPTER_TENSORS:
                getattr(module, t).copy_(tensors[f"{name}.{t}"])


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def trainable_parameters(model: nn.Module, every: bool = False) -> int:
    """Parameters that will train (requires_grad; ``every``: all, adapters and frozen), each
    counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()
                                   if every or p.requires_grad}.values())


# ----------------------------------------------------------------------------- base identity

def _base_name(name: str) -> str | None:
    """A state-dict name as the unwrapped base has it; None for adapter tensors."""
    parts = name.split(".")
    if parts[-1] in ADAPTER_TENSORS:
        return None
    return ".".join(p for p in parts if p != "base")


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    # hashlib releases the GIL over large buffers, so threads hash tensors in parallel
    return hashlib.sha256(memoryview(data.numpy())).digest()


def base_fingerprint(state: Mapping[str, torch.Tensor], *, workers: int = 8) -> str:
    """sha256 of a base model's tensors: ``checkpoint.model_tensors(model)`` of the loaded base
    (or the checkpoint file's tensors: the same names), before any dtype change.

    Names are sorted; for each, its name, dtype and shape and the sha256 of its bytes (in
    memory order, little-endian) go into the outer sha256, so the result is independent of
    dict order and each tensor is hashed in parallel with the others. Adapter tensors are
    skipped and the ``base`` component of wrapped names dropped, so a model with adapters has
    its base's fingerprint. Returns ``"sha256:<hex>"``.
    """
    named = {}
    for name, tensor in state.items():
        base = _base_name(name)
        if base is not None:
            if base in named:
                raise ValueError(f"two tensors are named {base!r} once unwrapped")
            named[base] = tensor
    names = sorted(named)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(_tensor_digest, (named[n] for n in names)))
    outer = hashlib.sha256()
    for name, digest in zip(names, digests):
        tensor = named[name]
        outer.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0"
                     f"{list(tensor.shape)}\0".encode())
        outer.update(digest)
    return f"sha256:{outer.hexdigest()}"


def check_base(expected: str, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse a base whose tensors are not the ones the adapter at ``where`` was trained on."""
    actual = base_fingerprint(state)
    if actual != expected:
        raise UserError(f"{where} was trained on a different base model (fingerprint "
                        f"{expected[:19]}..., this base {actual[:19]}...); load the base it "
                        "names in its metadata")
