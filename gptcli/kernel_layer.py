"""The layer inference runs its products through: ``KernelLinear`` holds a projection's stored
weights, the buffers of its kernels' layouts and the kernels chosen per number of rows
(``kernels.py`` defines the kernels, ``tuning.py`` chooses them); and ``product``, the one
operator through which a compiled CPU step calls a layer's kernel. A ``traced`` layer
(``--kernel inductor``) runs a kernel made of plain operators instead, which a compiled step
traces, so that inductor, freezing the weights, puts its own products in their place."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .hardware import in_huge_pages
from .kernels import KERNELS, Kernel

STORED = {"int8": ("qweight", "scale")}  # what a mode's checkpoints hold besides the bias
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> KernelLinear


@torch.library.custom_op("gptcli::product", mutates_args=())
def product(x: torch.Tensor, layer: int, n_out: int) -> torch.Tensor:
    """Layer ``layer``'s (an id) kernel on ``x`` (M, in): one operator to a compiled CPU step,
    which does not look inside (dynamo cannot trace fbgemm's packed weights)."""
    m = _LAYERS[layer]
    return m.for_rows(x.size(0)).run(x, m).contiguous()  # as the fake's (some return views)


product.register_fake(lambda x, layer, n_out: x.new_empty(x.size(0), n_out))


# inductor's settings for a step with traced layers: the weights frozen in as constants (so it
# packs them once) and its C++ GEMM templates autotuned against ATen's products, quietly (its
# autotuning tables are not for the user's terminal)
FROZEN = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
          "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def frozen_compile(model: nn.Module):
    """``model`` compiled (symbolic shapes) with inductor's ``FROZEN`` settings in force at every
    call: it compiles at the calls (each new shape), and ``torch.compile``'s own ``options``
    did not freeze here (gpt2 float32 decoding at 29 tokens/s, against 61 with this)."""
    import torch._inductor.config as inductor_config

    compiled, frozen = torch.compile(model, dynamic=True), inductor_config.patch(FROZEN)

    def step(*args, **kwargs):  # one patch object, entered per call: ~16 µs (a new one: 33)
        with frozen:
            return compiled(*args, **kwargs)
    return step


class KernelLinear(nn.Module):
    """A projection for inference: its stored weights (int8: ``qweight``, ``scale``; saved in
    checkpoints, with ``bias``), the buffers of its kernels' layout (made at load, never saved)
    and the kernels chosen per number of rows (``kernels``; other counts: ``for_rows``)."""

    def __init__(self, mode: str, n_in: int, n_out: int, bias: torch.Tensor | None,
                 **stored: torch.Tensor) -> None:
        super().__init__()
        self.mode, self.n_in, self.n_out = mode, n_in, n_out
        self.register_buffer("bias", bias)
        for name, tensor in stored.items():
            self.register_buffer(name, tensor)
        self.kernel: Kernel | None = None
        self.kernels: dict[int, Kernel] = {}
        self.packed_bytes = 0  # bytes a product reads outside tensors (fbgemm's fp16 copy)
        self.traced = False  # a compiled step traces its kernel (--kernel inductor)
        self._packed: list[str] = []  # the names ``use`` packed
        self._huge: dict[str, int] = {}  # buffer name -> address ``into_huge_pages`` moved it to
        _LAYERS[id(self)] = self

    @classmethod
    def from_storage(cls, mode: str, storage: dict) -> KernelLinear:
        """The layer for ``storage`` (see the module docstring; int4 adds ``n_out``, the rows
        of ``q4`` before padding), with no kernel yet."""
        if "weight" in storage:
            n_in, n_out = storage["weight"].shape
        elif "qweight" in storage:
            n_out, n_in = storage["qweight"].shape
        else:
            n_in, n_out = storage["q4"].size(1), storage["n_out"]
        return cls(mode, n_in, n_out, storage.get("bias"),
                   **{k: storage[k] for k in STORED.get(mode, ())})

    def use(self, chosen: dict[int, Kernel], threads: int, storage: dict) -> None:
        """Run ``chosen[rows]`` (other row counts: ``for_rows``), packing their layout; an
        earlier choice's layouts go (their memory with them). Packed first: a kernel that fails
        to pack leaves the layer as it was."""
        packed: dict = {}
        size = 0  # bytes a product reads outside tensors
        for kernel in {k.name: k for k in chosen.values()}.values():
            layout = dict(kernel.pack(storage, threads))
            size += layout.pop("packed_bytes", 0)
            packed.update(layout)  # (kernels may share a layout's name)
        for name in dict.fromkeys(self._packed):
            delattr(self, name)
        self.kernels = dict(chosen)
        self.kernel = next(iter(chosen.values()))
        self.packed_bytes, self._packed = size, list(packed)
        for name, value in packed.items():
            if isinstance(value, torch.Tensor) or value is None:
                self.register_buffer(name, value, persistent=False)
            else:
                setattr(self, name, value)

    def into_huge_pages(self) -> None:
        """Move this layer's large CPU buffers (its stored weights and its kernels' layouts)
        into memory backed by huge pages where the OS allows (``hardware.in_huge_pages``);
        ``prepare`` calls it once its kernels are final. A buffer already moved stays put (a
        model prepared again)."""
        for name, tensor in list(self._buffers.items()):
            if tensor is not None and tensor.device.type == "cpu" and \
                    tensor.layout is torch.strided and tensor.data_ptr() != self._huge.get(name):
                self._buffers[name] = moved = in_huge_pages(tensor)
                self._huge[name] = moved.data_ptr()

    def __setstate__(self, state: dict) -> None:  # a copy (deepcopy) is a layer of its own
        super().__setstate__(state)
        _LAYERS[id(self)] = self

    def for_rows(self, rows: int) -> Kernel:
        """The kernel chosen for ``rows`` rows, else for the most rows chosen for below it
        (a prompt's many rows: the one chosen for prompts, ``tuning.PROMPT_ROWS``, where there
        is one, else the batch's), else the first."""
        kernel = self.kernels.get(rows)
        if kernel is None:
            below = [m for m in self.kernels if m < rows]
            kernel = self.kernels[max(below)] if below else self.kernel
        # an int8 model as loaded, before prepare chose its kernels, runs the stored layout
        return kernel or KERNELS["int8-intmm2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))  # (M, in)
        if not self.traced and torch.compiler.is_compiling() and x.device.type == "cpu":
            y = product(flat, id(self), self.n_out)
        else:
            y = self.for_rows(flat.size(0)).run(flat, self)
        return y.view(*x.shape[:-1], self.n_out)

    def extra_repr(self) -> str:
        chosen = ", ".join(f"{m} rows: {k.name}" for m, k in self.kernels.items())
        return f"{self.mode}, in={self.n_in}, out={self.n_out}, {chosen or 'no kernel yet'}"
