"""The bundled toy LVLM: a tiny LLaVA trained from scratch on Fashion-MNIST scenes.

An 84x84 grayscale canvas holds 1-4 Fashion-MNIST items, one per cell of a 2x2 grid, each at one of
3x3 patch-aligned offsets inside its 42x42 cell, on a black background (about 80 % of the patches). A CLIP-style ViT (patch 7 -> 12x12 = 144 patches, CLS
dropped before the projector) feeds a small Llama through the LLaVA projector. Questions come in three
types, each answered with one word: ``presence`` (POPE-style yes/no with similar-class negatives),
``global`` (item count, most common kind) and ``local`` (what sits in a given corner cell).

    python -m mechsink.zoo.toy make-eval   # held-out evaluation set -> toy_llava/eval/
    python -m mechsink.zoo.toy train       # from scratch -> toy_llava/ (+ training_log.json)
    python -m mechsink.zoo.toy evaluate    # accuracy per question type -> toy_llava/metrics.json
    python -m mechsink.zoo.toy norms       # ViT token-norm statistics -> toy_llava/norm_stats.json

Training images draw items from the Fashion-MNIST train split, evaluation images from the test split
(and other seeds), so no evaluation image or item is seen in training.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mechsink.errors import MechsinkError
from mechsink.zoo.toy_scenes import (  # noqa: F401  (the toy's public names live here too)
    ANSWERS, CANVAS, CELL, CLASS_NAMES, CLASSES, CORNERS, EVAL_DIR, FASHION_DIR, GRID, ITEM, JITTER, MEAN, NUMBERS,
    OBJECT_PIXEL, PATCH, QUESTION_TYPES, SIMILAR, STD, TOY_DIR, Scene, ToyError, ask, dialogue, load_fashion,
    make_split, render, sample_scene, vocabulary)
from mechsink.zoo.vocab import IMAGE_TOKEN, word_tokenizer

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if message['role'] == 'user' %}USER:{% else %}ASSISTANT:{% endif -%}"
    "{%- if message['content'] is string %} {{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' %} <image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %} ASSISTANT:{% endif -%}"
)


# -------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ToyConfig:
    vit_hidden: int = 64
    vit_layers: int = 4
    vit_heads: int = 4
    llm_hidden: int = 64
    llm_layers: int = 3
    llm_heads: int = 4
    vision_feature_layer: int = -1


def build_processor():
    """LlavaProcessor with the word-level tokenizer, an 84px CLIP image processor and the chat template."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tok = word_tokenizer(vocabulary())
    tok.chat_template = CHAT_TEMPLATE
    improc = CLIPImageProcessorPil(size={"shortest_edge": CANVAS}, crop_size={"height": CANVAS, "width": CANVAS},
                                   image_mean=[MEAN] * 3, image_std=[STD] * 3)
    return LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_model(cfg: ToyConfig, tokenizer):
    """An untrained LlavaForConditionalGeneration of the toy shape."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=cfg.vit_hidden, intermediate_size=4 * cfg.vit_hidden,
                              num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads,
                              image_size=CANVAS, patch_size=PATCH, num_channels=3, hidden_act="gelu",
                              projection_dim=cfg.vit_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.llm_hidden, intermediate_size=3 * cfg.llm_hidden,
                       num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
                       num_key_value_heads=cfg.llm_heads, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=GRID * GRID, vision_feature_layer=cfg.vision_feature_layer,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config)


def load_toy(path: str | Path = TOY_DIR, device: str = "cpu"):
    """(model, processor) of the bundled toy LVLM, loaded offline, model in eval mode."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    if not (path / "config.json").exists():
        raise ToyError(f"no toy model at {path}: run `python -m mechsink.zoo.toy train --out {path}`")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, LlavaProcessor.from_pretrained(path)


def load_eval_samples(path: str | Path = EVAL_DIR / "samples.jsonl", limit: int | None = None) -> list[dict]:
    """Rows of the evaluation set, each with `image` made an absolute path."""
    path = Path(path)
    if not path.exists():
        raise ToyError(f"no evaluation set at {path}: run `python -m mechsink.zoo.toy make-eval`")
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row["image"] = str(path.parent / row["image"])
                rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def pixels(canvases: np.ndarray) -> torch.Tensor:
    """Canvases uint8 (B, 84, 84) -> pixel_values float (B, 3, 84, 84), exactly as the processor makes them."""
    x = (torch.from_numpy(np.array(canvases, dtype=np.uint8)).float() / 255.0 - MEAN) / STD
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


# ----------------------------------------------------------------------------------- training
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Batcher:
    """Turns scenes + questions into padded LLaVA training tensors.

    Each image carries `turns` question/answer turns ("USER: <image> q1 ASSISTANT: a1 USER: q2 ...");
    the first turn is exactly the single-turn evaluation prompt, later turns reuse the same ViT pass."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id = tokenizer.pad_token_id

    def ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in self.tok(text, add_special_tokens=False)["input_ids"]:
            ids.extend([i] * (GRID * GRID) if i == self.image_id else [i])
        return ids

    def encode(self, dialogues: list[list[dict]]) -> dict[str, torch.Tensor]:
        """dialogues[b] = list of question dicts. Returns input_ids/attention_mask (B, T) right-padded and
        `answer_pos` (B, K) = position of each answer token (-1 where the dialogue has fewer turns)."""
        seqs, positions = [], []
        for turns in dialogues:
            ids: list[int] = []
            pos = []
            for k, q in enumerate(turns):
                head = f"USER: {IMAGE_TOKEN} {q['prompt']} ASSISTANT:" if k == 0 else f"USER: {q['prompt']} ASSISTANT:"
                ids += self.ids(head)
                pos.append(len(ids))
                ids += self.ids(q["answer"])
            seqs.append(ids)
            positions.append(pos)
        width, k = max(map(len, seqs)), max(map(len, positions))
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        answer_pos = torch.full((len(seqs), k), -1, dtype=torch.long)
        for b, (s, p) in enumerate(zip(seqs, positions)):
            input_ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = 1
            answer_pos[b, :len(p)] = torch.tensor(p)
        return {"input_ids": input_ids, "attention_mask": mask, "answer_pos": answer_pos}


def answer_logits(model, batch: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits predicting each answer token: (B, K, vocab); rows with answer_pos -1 are junk."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixel_values)
    pos = (batch["answer_pos"] - 1).clamp(min=0)
    return torch.gather(out.logits, 1, pos[..., None].expand(-1, -1, out.logits.shape[-1]))


@torch.no_grad()
def accuracy_by_type(model, batcher: Batcher, canvases: np.ndarray, questions: list[list[dict]],
                     batch_size: int = 64) -> dict[str, float]:
    """Single-turn greedy accuracy per question type (right padding keeps positions exact)."""
    model.eval()
    hits: dict[str, list[int]] = {t: [] for t in QUESTION_TYPES}
    flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        batch = {k: v.to(model.device) for k, v in batcher.encode([[q] for _, q in chunk]).items()}
        logits = answer_logits(model, batch, pixels(canvases[[i for i, _ in chunk]]).to(model.device))[:, 0]
        pred = logits.argmax(-1).tolist()
        for (_, q), p in zip(chunk, pred):
            hits[q["question_type"]].append(int(batcher.tok.convert_ids_to_tokens(p) == q["answer"]))
    model.train()
    return {t: float(np.mean(h)) for t, h in hits.items() if h}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 2400
    batch_images: int = 32
    turns: int = 6
    lr: float = 2e-3
    warmup_frac: float = 0.05
    curriculum_frac: float = 0.3
    min_lr_frac: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    log_every: int = 25
    val_every: int = 200
    val_images: int = 200


def item_count_weights(step: int, tc: TrainConfig) -> np.ndarray:
    """Curriculum over the item count: single items first (a clean what-is-this signal for the ViT),
    moving linearly to the uniform 1-4 of the evaluation set by `curriculum_frac` of training."""
    t = min(1.0, step / max(1.0, tc.curriculum_frac * tc.steps))
    return (1 - t) * np.array([1.0, 0, 0, 0]) + t * np.full(4, 0.25)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up then cosine decay to min_lr_frac * lr."""
    warm = max(1, int(tc.warmup_frac * tc.steps))
    if step < warm:
        return tc.lr * (step + 1) / warm
    t = (step - warm) / max(1, tc.steps - warm)
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(out: Path = TOY_DIR, tc: TrainConfig = TrainConfig(), mc: ToyConfig = ToyConfig(),
          minutes: float | None = None, device: str = "cpu", threads: int = 1) -> dict:
    """Train the toy LVLM from scratch; save model, processor and training_log.json into `out`.

    The schedule is fixed by `tc.steps` (reproducible); `minutes` is a wall-clock cap that stops early
    and still saves. Returns the training log."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on --device cuda
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(Path(out), tc, mc, minutes, device, threads)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(out: Path, tc: TrainConfig, mc: ToyConfig, minutes: float | None, device: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    seed_everything(tc.seed)
    pools = load_fashion("train")
    processor = build_processor()
    batcher = Batcher(processor.tokenizer)
    model = build_model(mc, processor.tokenizer).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.98))
    # Validation: held-out items (test split) and a seed no training or evaluation draw uses.
    val_canvases, _, val_questions = make_split(10_000 + tc.seed, tc.val_images, load_fashion("t10k"))
    rng = np.random.default_rng(tc.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log: dict = {"model_config": asdict(mc), "train_config": asdict(tc), "device": device, "threads": threads,
                 "minutes_cap": minutes, "n_params": n_params, "torch": torch.__version__,
                 "records": [], "validation": []}
    print(f"toy-llava: {n_params / 1e6:.2f}M parameters, {tc.steps} steps", flush=True)
    t0, window = time.time(), {"loss": [], **{t: [] for t in QUESTION_TYPES}}
    step = 0
    for step in range(tc.steps):
        if minutes is not None and time.time() - t0 > 60 * minutes:
            log["stopped_early_at_step"] = step
            print(f"wall-clock cap of {minutes} min reached at step {step}", flush=True)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        scenes = [sample_scene(rng, pools, item_count_weights(step, tc)) for _ in range(tc.batch_images)]
        dialogues = [dialogue(s, tc.turns, rng) for s in scenes]
        batch = {k: v.to(device) for k, v in batcher.encode(dialogues).items()}
        pv = pixels(np.stack([render(s, pools) for s in scenes])).to(device)
        logits = answer_logits(model, batch, pv)
        target = torch.full(batch["answer_pos"].shape, -100, dtype=torch.long)
        for b, d in enumerate(dialogues):  # a rare dialogue may have fewer turns: those slots stay ignored
            target[b, :len(d)] = torch.tensor(processor.tokenizer.convert_tokens_to_ids([q["answer"] for q in d]))
        target = target.to(device)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()

        pred = logits.detach().argmax(-1)
        window["loss"].append(loss.item())
        for b, d in enumerate(dialogues):
            for k, q in enumerate(d):
                window[q["question_type"]].append(int(pred[b, k] == target[b, k]))
        if (step + 1) % tc.log_every == 0:
            rec = {"step": step + 1, "elapsed_s": round(time.time() - t0, 1), "lr": lr_at(step, tc),
                   "loss": float(np.mean(window["loss"])), "grad_norm": float(grad_norm),
                   "train_acc": {t: float(np.mean(window[t])) for t in QUESTION_TYPES}}
            log["records"].append(rec)
            print(json.dumps(rec), flush=True)
            window = {k: [] for k in window}
        if (step + 1) % tc.val_every == 0 or step + 1 == tc.steps:
            acc = accuracy_by_type(model, batcher, val_canvases, val_questions)
            log["validation"].append({"step": step + 1, "elapsed_s": round(time.time() - t0, 1), "acc": acc})
            print(json.dumps({"validation": log["validation"][-1]}), flush=True)
            _save(model, processor, log, out, t0)  # finished work is never lost
    log["steps_done"] = step + 1 if "stopped_early_at_step" not in log else log["stopped_early_at_step"]
    log["final_validation"] = accuracy_by_type(model, batcher, val_canvases, val_questions)
    _save(model, processor, log, out, t0)
    return log


def _save(model, processor, log: dict, out: Path, t0: float) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log["wall_s"] = round(time.time() - t0, 1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tmp = out / "training_log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    tmp.replace(out / "training_log.json")


# --------------------------------------------------------------------------------- evaluation
def make_eval(out: Path = EVAL_DIR, n_images: int = 800, seed: int = 20_000) -> Path:
    """Write `n_images` PNG canvases and samples.jsonl (one question of each type per image)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    canvases, scenes, questions = make_split(seed, n_images, load_fashion("t10k"))
    lines = []
    for i, (canvas, scene, qs) in enumerate(zip(canvases, scenes, questions)):
        rel = f"images/{i:04d}.png"
        Image.fromarray(canvas, mode="L").save(out / rel, optimize=True)
        labels = {"n_items": len(scene.classes), "majority_class": scene.majority,
                  "top_left": scene.cells[0] or "nothing", "classes": sorted(set(scene.classes)),
                  "cells": [c or "nothing" for c in scene.cells]}
        for q in qs:
            lines.append(json.dumps({"id": f"{i:04d}-{q['question_type']}", "image": rel, **q, **labels}))
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return out / "samples.jsonl"


def predict(model, processor, rows: list[dict], batch_size: int = 64) -> list[str]:
    """Greedy one-word answer for each eval row, through the processor and the chat template."""
    tok = processor.tokenizer
    preds: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        enc = [processor(text=processor.apply_chat_template(
                   [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
                   add_generation_prompt=True),
                   images=Image.open(r["image"]), return_tensors="pt") for r in chunk]
        lengths = [e["input_ids"].shape[1] for e in enc]
        ids = torch.full((len(enc), max(lengths)), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, e in enumerate(enc):  # right padding: positions stay those of an unpadded prompt
            ids[b, :lengths[b]] = e["input_ids"][0]
            mask[b, :lengths[b]] = 1
        pv = torch.cat([e["pixel_values"] for e in enc]).to(model.device, model.dtype)
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           pixel_values=pv).logits
        last = logits[torch.arange(len(enc)), torch.tensor(lengths) - 1]
        preds += tok.convert_ids_to_tokens(last.argmax(-1).tolist())
    return preds


def evaluate(path: Path = TOY_DIR, samples: Path = EVAL_DIR / "samples.jsonl", limit: int | None = None,
             write: bool = True) -> dict:
    """Accuracy per question type (and subtype) against the majority-answer baseline; writes metrics.json."""
    model, processor = load_toy(path)
    rows = load_eval_samples(samples, limit)
    preds = predict(model, processor, rows)
    metrics: dict = {"n_samples": len(rows), "n_images": len({r["image"] for r in rows}), "by_type": {},
                     "by_subtype": {}}
    for key, field in (("by_type", "question_type"), ("by_subtype", "subtype")):
        for group in sorted({r[field] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r[field] == group]
            answers = [rows[i]["answer"] for i in idx]
            majority = max(set(answers), key=answers.count)
            metrics[key][group] = {"n": len(idx),
                                   "accuracy": float(np.mean([preds[i] == rows[i]["answer"] for i in idx])),
                                   "majority_baseline": answers.count(majority) / len(idx)}
    metrics["accuracy"] = float(np.mean([p == r["answer"] for p, r in zip(preds, rows)]))
    if write:
        (Path(path) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


@torch.no_grad()
def norm_stats(path: Path = TOY_DIR, samples: Path = EVAL_DIR / "samples.jsonl", ratio: float = 3.0,
               write: bool = True) -> dict:
    """ViT token norms on the distinct eval images, per layer (hidden_states[0] = embeddings).

    Per layer: median over images of max/median patch-token norm, the fraction of images with a patch
    token above `ratio` x the image's median, and where those tokens sit (background/object patch,
    border/interior of the 12x12 grid) next to the base rates of those places. CLS is left out of the
    patch statistics and reported on its own."""
    model, processor = load_toy(path)
    images = sorted({r["image"] for r in load_eval_samples(samples)})
    canvases = np.stack([np.asarray(Image.open(p).convert("L")) for p in images])
    # Patch roles from pixels: object if any pixel in the 7x7 patch is lit.
    patch_max = canvases.reshape(len(canvases), GRID, PATCH, GRID, PATCH).max(axis=(2, 4)).reshape(len(canvases), -1)
    is_object = torch.from_numpy(patch_max > OBJECT_PIXEL)
    rc = torch.arange(GRID)
    border = ((rc[:, None] == 0) | (rc[:, None] == GRID - 1) | (rc[None] == 0) | (rc[None] == GRID - 1)).flatten()
    norms = []
    for start in range(0, len(canvases), 100):
        pv = processor.image_processor(images=[Image.fromarray(c) for c in canvases[start:start + 100]],
                                       return_tensors="pt")["pixel_values"]
        hs = model.model.vision_tower(pv.to(model.dtype), output_hidden_states=True).hidden_states
        norms.append(torch.stack([h.norm(dim=-1) for h in hs], 1))  # (B, L+1, 1+144)
    norms = torch.cat(norms)
    n_layers = norms.shape[1] - 1
    feature_layer = model.config.vision_feature_layer % (n_layers + 1)
    layers = []
    for layer in range(n_layers + 1):
        patch = norms[:, layer, 1:]
        med = patch.median(dim=1).values
        rel = patch / med[:, None]
        out = rel > ratio
        n_out = int(out.sum())
        layers.append({
            "layer": layer,
            "feeds_projector": layer == feature_layer,
            "median_patch_norm": float(med.median()),
            "max_over_median": {"median": float(rel.max(1).values.median()),
                                "p90": float(rel.max(1).values.quantile(0.9)),
                                "max": float(rel.max())},
            "cls_over_median": float((norms[:, layer, 0] / med).median()),
            # Content, not sinks: lit object patches against the uniform black background.
            "object_over_background_median": float(patch[is_object].median() / patch[~is_object].median()),
            "frac_images_with_outlier": float(out.any(1).float().mean()),
            "outliers_per_image": float(out.sum(1).float().mean()),
            "n_outlier_tokens": n_out,
            "outlier_on_background": float((out & ~is_object).sum() / max(n_out, 1)),
            "outlier_on_border": float((out & border).sum() / max(n_out, 1)),
        })
    stats = {"n_images": len(images), "ratio": ratio, "object_pixel_threshold": OBJECT_PIXEL,
             "base_rate_background": float((~is_object).float().mean()),
             "base_rate_border": float(border.float().mean()),
             "layers": layers}
    if write:
        (Path(path) / "norm_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


# ----------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mechsink.zoo.toy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from scratch and save into --out")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock cap (stops early, still saves)")
    t.add_argument("--steps", type=int, default=TrainConfig.steps)
    t.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=TOY_DIR)
    e = sub.add_parser("make-eval", help="write the held-out evaluation set")
    e.add_argument("--out", type=Path, default=EVAL_DIR)
    e.add_argument("--images", type=int, default=800)
    for name in ("evaluate", "norms"):
        s = sub.add_parser(name)
        s.add_argument("--model", type=Path, default=TOY_DIR)
        s.add_argument("--samples", type=Path, default=EVAL_DIR / "samples.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 1))
    try:
        if args.cmd == "train":
            log = train(args.out, TrainConfig(seed=args.seed, steps=args.steps), minutes=args.minutes,
                        device=args.device, threads=args.threads)
            print(json.dumps({"final_validation": log["final_validation"], "wall_s": log["wall_s"]}))
        elif args.cmd == "make-eval":
            print(make_eval(args.out, args.images))
        elif args.cmd == "evaluate":
            print(json.dumps(evaluate(args.model, args.samples), indent=1))
        else:
            print(json.dumps(norm_stats(args.model, args.samples), indent=1))
    except MechsinkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
