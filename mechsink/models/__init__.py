"""Opening models: a registry from HF architecture names to declarative adapters."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import MechsinkError, UnsupportedModel
from .base import Adapter, Batch, BlockParts, Model

# One module per architecture family; each exports ADAPTERS (or ADAPTER).
FAMILIES = ("llava", "llava_next", "qwen2_vl", "llava_onevision", "gemma3", "encoders")


def adapters() -> dict[str, Adapter]:
    """HF architecture class name -> adapter."""
    table: dict[str, Adapter] = {}
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"{__name__}.{fam}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{fam}":
                continue
            raise
        for ad in getattr(mod, "ADAPTERS", None) or [mod.ADAPTER]:
            for arch in ad.architectures:
                table[arch] = ad
    return table


def adapter_for(architecture: str) -> Adapter:
    table = adapters()
    if architecture not in table:
        raise UnsupportedModel(f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(table))}")
    return table[architecture]


def wrap(hf, processor, name: str | None = None, source: str | None = None) -> Model:
    """A Model around an HF module you already built."""
    arch = type(hf).__name__
    return Model(hf, processor, adapter_for(arch), name or arch, source)


# The zoo sits above the models layer; it is found by name, never imported from here.
ZOO = "mechsink.testing"


def load(model: str | os.PathLike, *, device: str | None = None, dtype=None, device_map: str | dict | None = None,
         attn_implementation: str | None = None, **kw) -> Model:
    """Open a model by zoo name (``tiny-llava``, ``planted-llava``, ``toy-llava``, ...), by a
    directory written with ``save_pretrained``, or by a Hugging Face id.

    ``device_map="auto"`` spreads a large model over the available GPUs (accelerate)."""
    testing = importlib.import_module(ZOO)
    check_device(device)
    name = str(model)
    if name in testing.ZOO:
        if name.startswith("twin-") and dtype is not None:   # full-width weights: built in their dtype, not cast
            return _place(testing.build(name, dtype=dtype, **kw), device, None)
        m = testing.build(name, **kw)
        return _place(m, device, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        _check_folder(path)
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
    except OSError as e:
        raise MechsinkError(f"cannot open model {name!r}: not a zoo name ({', '.join(testing.ZOO)}), "
                            f"not a save_pretrained folder, and the hub is unreachable or has no such id") from e
    except ValueError as e:            # e.g. a model_type transformers does not know
        raise MechsinkError(f"cannot open model {name!r}: {_first_line(e)}") from None
    archs = getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "Model")]
    adapter = adapter_for(archs[0])
    cls = getattr(transformers, archs[0])
    load_kw = {}
    if dtype is not None:
        load_kw["dtype"] = _dtype(dtype)
    if device_map is not None:
        load_kw["device_map"] = device_map
        if device_map == "auto":
            load_kw.update(_rank_memory())
    if attn_implementation is not None:
        load_kw["attn_implementation"] = attn_implementation
    try:   # safetensors only: a pickled checkpoint is never unpickled (it can run code)
        hf = cls.from_pretrained(name, use_safetensors=True, **load_kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise MechsinkError(f"cannot load the weights of {name!r}: {_first_line(e)} (mechsink reads safetensors "
                            f"weights only, never pickled .bin/.pt files)") from None
    if adapter.processor_loader is not None:
        processor = adapter.processor_loader(name)
    elif adapter.vision_only:
        processor = transformers.AutoImageProcessor.from_pretrained(name)
    else:
        processor = transformers.AutoProcessor.from_pretrained(name)
    m = Model(hf, processor, adapter, path.name if path.is_dir() else name, source=str(path.resolve()) if path.is_dir() else name)
    return m if device_map is not None else _place(m, device, None)


def _rank_memory() -> dict:
    """``max_memory`` for ``device_map="auto"`` under torchrun: this rank's share of the node's GPUs
    (free memory of each), so that every rank spreads its copy of the model over its own GPUs."""
    import torch

    from ..distributed import local_gpus
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1 or not torch.cuda.is_available():
        return {}
    return {"max_memory": {g: torch.cuda.mem_get_info(g)[0] for g in local_gpus(torch.cuda.device_count())}}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _check_folder(path: Path) -> None:
    """A local model folder that cannot be opened safely fails here in one line."""
    import json
    cfg = path / "config.json"
    if not cfg.is_file():
        raise MechsinkError(f"{path} is a directory without config.json; expected a save_pretrained folder")
    try:
        d = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MechsinkError(f"{cfg} is not valid JSON ({_first_line(e)}); re-save the model with save_pretrained") from None
    if not isinstance(d, dict):
        raise MechsinkError(f"{cfg} is not a model config (expected a JSON object)")
    if d.get("auto_map"):
        raise MechsinkError(f"{path} asks to run its own Python code (auto_map in config.json); mechsink never runs "
                            f"remote or folder code: use a model transformers implements natively")


def check_device(device) -> None:
    """Fail in one line, before anything is built, when ``device`` cannot be used by this torch."""
    if device is None:
        return
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MechsinkError(f"unknown device {device!r}: use cpu, cuda, cuda:1, mps ...") from e
    if d.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise MechsinkError(f"device {device!r} asked for, but this torch {torch.__version__} is a CPU-only build; "
                                f"install a CUDA build of torch (https://pytorch.org/get-started/locally/)")
        if not torch.cuda.is_available():
            raise MechsinkError(f"device {device!r} asked for, but torch sees no CUDA device (driver or CUDA_VISIBLE_DEVICES?)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise MechsinkError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise MechsinkError(f"device {device!r} asked for, but MPS is not available on this machine")


def _dtype(dtype):
    import torch
    if isinstance(dtype, str):
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    return dtype


def _place(m: Model, device, dtype) -> Model:
    if dtype is not None:
        m.hf.to(_dtype(dtype))
    if device is not None:
        m.hf.to(device)
    return m


__all__ = ["Adapter", "Batch", "BlockParts", "Model", "adapter_for", "adapters", "check_device", "load", "wrap"]
