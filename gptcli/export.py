"""`gpt export`: a gptcli model as a complete Hugging Face GPT-2 folder (weights, config,
tokenizer, model card) or as one GGUF file for llama.cpp and Ollama, and optionally pushed to
the Hub. The maps themselves are ``hf.py`` (names), ``vocab.py`` (tokenizer files), ``card.py``
(README.md), ``gguf.py`` (GGUF); uploads are ``upload.py``.

A folder is written whole into a temporary folder beside ``--out`` and renamed into place, so a
failure leaves no half-written folder (and an existing one, with ``--force``, as it was).

int8 checkpoints are refused, naming the float checkpoint they were made from: that file
exists (`gpt quantize` writes a copy), a dequantized export would pass int8's rounding off as
the model's weights, and a GGUF q8_0 made from it would round twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import adapters
from .errors import UserError, path_error
from .files import make_folder, write_text

FORMATS = ("hf", "gguf")
# --dtype spellings -> the one name used below; which format takes which
DTYPE_NAMES = {"f32": "f32", "float32": "f32", "fp32": "f32", "f16": "f16", "float16": "f16",
               "fp16": "f16", "bf16": "bf16", "bfloat16": "bf16", "q8_0": "q8_0"}
FORMAT_DTYPES = {"hf": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "q8_0")}
# What a folder export writes: with --force only a folder holding nothing else is replaced.
FOLDER_FILES = ("config.json", "generation_config.json", "model.safetensors", "README.md",
                "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                "special_tokens_map.json")


def check_options(fmt: str, dtype: str | None) -> str:
    """The canonical dtype for ``fmt``, or a UserError naming what is allowed."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use hf (a Hugging Face folder) or gguf "
                        "(one file for llama.cpp and Ollama)")
    name = DTYPE_NAMES.get((dtype or "f32").strip().lower())
    if name not in FORMAT_DTYPES[fmt]:
        raise UserError(f"--dtype {dtype} is not a {fmt} export type; use one of: "
                        f"{', '.join(FORMAT_DTYPES[fmt])}")
    return name


def check_out(out: Path, fmt: str, force: bool) -> None:
    """Refuse an --out that would lose something: a file without --force, a folder with files
    without --force, a folder holding files an export does not write even with it."""
    if fmt == "gguf":
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; give the GGUF file's name, like "
                            f"{out / 'model.gguf'}")
        if out.exists() and not force:
            raise UserError(f"--out {out} already exists; pass --force to overwrite it")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to write the Hugging Face model "
                        "into")
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        if present and not force:
            raise UserError(f"--out {out} already has files; pass --force to overwrite them, or "
                            "give an empty or new folder")
        foreign = [n for n in present if n not in FOLDER_FILES]
        if foreign:
            raise UserError(f"--out {out} holds files gpt export does not write "
                            f"({', '.join(foreign[:3])}); give a new or empty folder")


def export_model(model: str | os.PathLike | None, out: str | os.PathLike, *,
                 fmt: str | None = None,
                 dtype: str | None = None, force: bool = False, push_to_hub: str | None = None,
                 private: bool = False, revision: str | None = None, log=None,
                 ) -> dict[str, Any]:
    """What `gpt export` does: find ``model`` (downloading a Hub id when online), check that
    the format can express it, write ``out`` (a folder for ``hf``, a file for ``gguf``; no
    ``fmt``: gguf for a name ending in .gguf, else hf), and upload it to ``push_to_hub`` when
    given. Every refusal comes before anything is written."""
    from .checkpoint import parse_metadata, read_safetensors
    from .hf import to_hf
    from .locate import find_model

    gguf_name = Path(out).suffix.lower() == ".gguf"
    if fmt is None:
        fmt = "gguf" if gguf_name else "hf"
    elif fmt == "hf" and gguf_name:
        raise UserError(f"--out {out} is a GGUF file's name, but --format hf writes a Hugging "
                        "Face folder; leave --format out (or give gguf) for a GGUF file")
    dtype = check_options(fmt, dtype)
    if revision and not push_to_hub:
        raise UserError("--revision is the branch to push to; use it with --push-to-hub")
    if private and not push_to_hub:
        raise UserError("--private makes the --push-to-hub repo private; use it with "
                        "--push-to-hub")
    if push_to_hub:
        from .upload import check_push

        check_push(push_to_hub)  # no token, offline: refused before the model is even found
    out = Path(out)
    check_out(out, fmt, force)
    path = find_model(model, log=log)
    shapes, metadata = read_safetensors(path, tensors=False)
    if adapters.is_adapter(metadata):  # a LoRA run: exported as its base with them merged in
        header = adapters.read_header(path, shapes, metadata)
        config, spec = header.config, header.tokenizer
    else:
        config, spec = parse_metadata(path, metadata)
    if metadata.get("quantization"):
        origin = metadata.get("quantized_from")
        raise UserError(f"{path} is an int8 checkpoint; export the float checkpoint it was made "
                        f"from{f' ({origin})' if origin else ''}")
    if fmt == "gguf":
        from .gguf import check_exportable

        check_exportable(config, spec, dtype)
    else:
        to_hf(config)  # refuse what GPT-2 cannot express, before reading any weights
    target = None
    if push_to_hub:
        from .upload import prepare_push

        target = prepare_push(push_to_hub, private=private, revision=revision)
    start = time.perf_counter()
    net = float_model(path)
    writer = _write_gguf if fmt == "gguf" else _write_folder
    result = writer(net, spec, metadata, path, out, dtype=dtype, repo=push_to_hub)
    result.update(format=fmt, dtype=dtype, model=str(path), tokenizer=spec["type"],
                  parameters=config.num_params(), context_length=config.context_length,
                  seconds=time.perf_counter() - start)
    if target is not None:
        from .upload import push

        files = [out] if fmt == "gguf" else sorted(p for p in out.iterdir() if p.is_file())
        result["pushed"] = push(files, target, log=log)
    return result


def float_model(path: Path):
    """The float model to export from a checkpoint; a LoRA checkpoint's adapters are merged
    into its base's weights here, before any format sees them."""
    from .models import load_weights

    return load_weights(path, merge=True, finite=True)[0]


def _gguf_name(path: Path) -> str:
    from .models import display_name

    return display_name(path)


def _write_gguf(net, spec: dict, metadata: dict, path: Path, out: Path, *, dtype: str,
                repo: str | None) -> dict[str, Any]:
    from .card import chat_jinja
    from .checkpoint import model_tensors
    from .chat import METADATA_KEY
    from .gguf import write_gguf

    info = write_gguf(out, net.config, model_tensors(net), spec, dtype=dtype,
                      name=_gguf_name(path), chat_template=chat_jinja(metadata.get(METADATA_KEY)))
    return {"path": str(Path(info["path"]).resolve()), "files": [out.name],
            "size": info["size"], "tensors": info["tensors"]}


def _write_folder(net, spec: dict, metadata: dict, path: Path, out: Path, *, dtype: str,
                  repo: str | None) -> dict[str, Any]:
    """Every file of the Hugging Face folder, written into a temporary folder beside ``out``,
    then renamed into place (an existing ``out`` is moved aside first and removed after)."""
    out_abs = out.absolute()
    make_folder(out_abs.parent, "write Hugging Face folder to", shown=out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_abs.name}.", suffix=".tmp", dir=out_abs.parent))
    except OSError as e:
        raise path_error(e, "write Hugging Face folder to", out) from None
    old = None
    try:
        _fill_folder(tmp, net, spec, metadata, path, dtype=dtype, repo=repo)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes folders private
        if out_abs.exists():
            old = out_abs.with_name(f"{tmp.name[:-4]}.old")
            os.rename(out_abs, old)
        os.rename(tmp, out_abs)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_abs.exists():
            os.rename(old, out_abs)
        if isinstance(e, OSError):
            raise path_error(e, "write Hugging Face folder to", out) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    weights = out_abs / "model.safetensors"
    return {"path": str(out_abs.resolve()), "files": sorted(p.name for p in out_abs.iterdir()),
            "size": weights.stat().st_size}


def _fill_folder(folder: Path, net, spec: dict, metadata: dict, path: Path, *, dtype: str,
                 repo: str | None) -> None:
    import torch

    from .card import model_card
    from .checkpoint import model_tensors, write_safetensors
    from .convert import GPTCLI_KEY, KEPT
    from .hf import GPT2_VOCAB, to_hf
    from .tokenizer import get_tokenizer
    from .vocab import tokenizer_files

    config = net.config
    eot = get_tokenizer(spec).eot_id if config.vocab_size >= GPT2_VOCAB else None
    hf, tensors = to_hf(config, model_tensors(net), eot_id=eot)
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tensors = {k: v.to(torch_dtype) for k, v in tensors.items()}
    hf["dtype"] = str(torch_dtype).removeprefix("torch.")
    # gptcli's own provenance rides in the weights' metadata, so `--model DIR` gets it back
    kept = {k: _json_value(metadata[k]) for k in KEPT if k in metadata}
    write_safetensors(folder / "model.safetensors", tensors,
                      {"format": "pt", GPTCLI_KEY: json.dumps(kept)}, what="model.safetensors")
    special = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
    texts = {"config.json": _dumps(hf), "generation_config.json": _dumps(special),
             **tokenizer_files(spec, context_length=config.context_length)}
    run, init_meta = _run_settings(path)
    texts["README.md"] = model_card(name=repo or _gguf_name(path), config=config, tokenizer=spec,
                                    metadata=metadata, run=run, repo=repo,
                                    init_metadata=init_meta)
    for name, text in texts.items():
        write_text(folder / name, text, what=name)


def _run_settings(path: Path) -> tuple[dict, dict | None]:
    """The TrainConfig of the run that wrote ``path`` ({} when none), and the metadata of the
    checkpoint it was fine-tuned from, when that is still on disk."""
    from .checkpoint import read_safetensors
    from .runs import RunFolder

    run = RunFolder.holding(path)
    settings = run.train_settings() if run is not None and run.made(path) else {}
    init = settings.get("init_from")
    if init:
        try:
            from .models import resolve_model

            return settings, read_safetensors(resolve_model(init), tensors=False)[1]
        except UserError:
            pass
    return settings, None


def _json_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _dumps(payload) -> str:
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def gguf_usage(path: str, context: int, prompt: str = "The") -> list[str]:
    """How to run a written GGUF file: llama.cpp's non-interactive greedy command (the
    end-of-text token stops it; gptcli's GGUF adds no start token, as gptcli does not) and the
    Ollama Modelfile line. ``-n`` stays well inside the model's ``context``: llama.cpp's gpt2
    stops with an assertion past its last position, where gptcli slides its window."""
    name = Path(path).name
    return ["run it with llama.cpp (greedy, as `gpt generate --temperature 0`):",
            f"  llama-completion -m {path} -p {json.dumps(prompt)} -n {min(64, context // 2)} "
            "--temp 0 -no-cnv --no-display-prompt",
            "  (llama.cpp builds before llama-completion existed: the same flags on llama-cli)",
            "or with Ollama: a file named Modelfile beside it holding the line",
            f"  FROM ./{name}",
            f"  then: ollama create {Path(name).stem} -f Modelfile && ollama run "
            f"{Path(name).stem}"]


def summary(result: dict[str, Any], out: str) -> tuple[str, str]:
    """What `gpt export` prints: the result (stdout) and how to use it (stderr)."""
    done = (f"wrote {', '.join(result['files'])} ({result['parameters']:,} parameters, "
            f"{result['dtype']}, {result['size'] / 1e6:,.1f} MB) to {result['path']}")
    if "pushed" in result:
        done += f"\npushed to {result['pushed']['url']} ({result['pushed']['revision']})"
    if result["format"] == "gguf":
        return done, "\n".join(gguf_usage(out, result["context_length"]))
    use = f"use it with: gpt generate --model {out}"
    if result["tokenizer"] == "gpt2":
        use += f", or AutoModelForCausalLM.from_pretrained({out!r}) in transformers"
    return done, use
