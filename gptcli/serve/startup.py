"""What `gpt serve` checks before it loads a model, so that a setting it cannot serve with is one
sentence (exit 2) at once rather than an error in uvicorn's log or an allocation that runs for
minutes and fails: the address (``check_address``) and the memory ``--max-batch`` needs
(``check_batch``).

Why ``--max-batch`` costs memory up front: the scheduler's engine keeps one KV cache for every
row it may decode (``KVCache.for_model``: keys and values of each layer, for the whole context,
allocated whole and zeroed when the server starts, so that a request joining the batch
allocates nothing), and on a CPU the kernels are chosen by measuring them at ``--max-batch``
rows (``quantize.prepare``). Both grow with it: a tiny model at ``--max-batch 100000`` zeroes
2.5 GB before it answers, and at 100,000,000 it ran out of memory measuring kernels.
"""

from __future__ import annotations

import os

from ..errors import UserError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def check_address(host: str, port: int) -> str:
    """Fail with one sentence now, not in uvicorn's log, when the address cannot be used, naming
    the option at fault: --host for a name that does not resolve or an address this machine
    does not have, else --port (one in use, or below 1024 without the right). Returns the
    address as a URL has it (``[::1]:8000``)."""
    import errno
    import os
    import socket

    from ..errors import os_error_reason

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds it
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    instead = "pick another --host (an address of this machine such as 127.0.0.1, or 0.0.0.0 " \
              "for all of them)"
    try:
        socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {where}: {host!r} is not an address or a host name "
                        f"that resolves ({(e.strerror or str(e)).lower()}); {instead}") from None
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"cannot listen on {where}: {host} is not an address of this "
                            f"machine; {instead}") from None
        # (the system's words alone: socket's message repeats the address)
        reason = os.strerror(e.errno).lower() if e.errno else os_error_reason(e)
        raise UserError(f"cannot listen on {where}: {reason}; pick another --port (or stop "
                        "what uses it)") from None
    return where


def batch_memory(config, rows: int, element_size: int, weight_bytes: int) -> tuple[int, int]:
    """(bytes for ``rows`` rows, bytes per row): the model's weights, and per row its KV cache
    (the exact shape ``KVCache.for_model`` allocates) and four float32 copies of its logits
    (the step's logits and the sampling's work on them, as ``generate_memory_estimate``
    counts)."""
    cache = 2 * config.n_layer * config.n_head * config.context_length * config.head_size
    per_row = cache * element_size + 4 * 4 * config.vocab_size
    return weight_bytes + rows * per_row, per_row


def check_batch(path: str | os.PathLike, rows: int, device: str, dtype: str,
                quantize: str | None, draft: str | os.PathLike | None = None) -> None:
    """Refuse, from the checkpoint's header and before anything is allocated, a ``--max-batch``
    whose memory (``batch_memory``; with a ``draft`` model, its weights and cache rows too)
    exceeds what the device has available, naming the largest that fits. A header that cannot
    be read is left to ``load_model`` to report."""
    import torch

    from ..devices import resolve_device, resolve_dtype
    from ..hardware import available_memory

    dev = resolve_device(device)
    size = torch.empty((), dtype=resolve_dtype(dtype, dev)).element_size()
    models = [_header(p, size, quantize) for p in (path, draft) if p is not None]
    if models[0] is None:
        return
    models = [m for m in models if m is not None]  # (a draft's unread header: the model's)
    weights, per_row = (sum(m[i] for m in models) for i in (1, 2))
    need = weights + rows * per_row
    available = available_memory(dev)
    if available is None and dev.type == "cpu":  # (macOS): more than all of it never fits
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    if available is None or need <= available:
        return
    fits = (available - weights) // per_row
    instead = f"try --max-batch {fits} or less" if fits >= 1 else "try a smaller model"
    both = " (the model's and the draft's)" if draft is not None else ""
    raise UserError(f"--max-batch {rows} needs about {amount(need)} ({amount(per_row)} per "
                    f"sequence for its KV cache{both} over a context of "
                    f"{models[0][0].context_length} and its logits, plus the weights); "
                    f"{dev.type} has {amount(available)} available: {instead}")


def _header(path: str | os.PathLike, size: int, quantize: str | None):
    """(config, weight bytes, bytes per row) from a checkpoint's header; None where it cannot
    be read."""
    from ..adapters import is_adapter
    from ..checkpoint import parse_metadata, read_safetensors

    try:
        _, metadata = read_safetensors(path, tensors=False)
        config, _ = parse_metadata(path, {**metadata, "format": "gptcli/1"}
                                   if is_adapter(metadata) else metadata)
    except UserError:
        return None
    weights = config.num_params() * (1 if quantize or metadata.get("quantization") else size)
    return config, weights, batch_memory(config, 1, size, 0)[1]


def amount(size: int) -> str:
    """Bytes in words: ``2.4 GiB``, ``24.0 KiB``."""
    unit, name = next((u, n) for u, n in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB"), (1, "B"))
                      if size >= u or u == 1)
    return f"{size / unit:,.1f} {name}"
