"""Planted-sink LLaVA models: hand-set weights with known answers for every analysis.

Images are 48x48 px: a 6x6 grid of 8x8 patches. Every patch has an iid uniform random colour and
an iid random *stripe texture* (alternate pixel columns are brightened/darkened by the same amount,
so the texture has zero patch mean and says nothing about the colour). The question is "what
color is the corner ?"; the answer (``planted_label``) is the strongest channel of patch 0's mean
colour: red, green or blue.

Both models share one ViT. Its weights create sinks at ``PLANTED_SINKS`` = patches 0, 14, 21:

- embedding: dims read the patch's mean colour and its stripe texture (conv weights), a one-hot
  position code and a sink flag (+1 at the planted patches, -1 elsewhere; position embedding);
- layer 0 attention: every token attends to itself through its position code, except that the
  flag moves sink queries onto patch 0, so the label dims hold the corner colour at sinks and the
  token's own colour elsewhere;
- layer 0 MLP: one GELU neuron reads the flag and writes ``massive`` (300) into the massive dim at
  sinks only, so sinks have ViT norm ~300 against 2-6 for every other patch; layer 1 is a no-op.

The projector is the identity (GELU kept in its linear regime by a +50 bias that linear_2 removes).

- ``planted-llava``: the last prompt token attends to the tokens with a large massive dim (the
  sinks), reads their label dims and writes the corner colour into the answer logits. Accuracy is
  100 %; zeroing the three sinks makes attention uniform over tokens whose label dims are their own
  colours, which are independent of the answer, so accuracy drops to chance (1/3).
- ``planted-llava-null``: uniform attention (query 0) reading every token's own stripe texture.
  Textures are iid across patches and independent of the answer, so the answer logits are pure
  noise (accuracy ~1/3) and removing the sinks has exactly the effect distribution of removing any
  other three patches: the null for calibrating sink-vs-random ablation statistics. (Reading
  colours instead would not do: sink patch 0 *is* the answer patch, so removing the sinks would
  lower the correct answer's logit more than removing random patches, t ~ -7.5 on the eval set.)

Every LayerNorm/RMSNorm is linear: eps is huge (1e8) and the weight is sqrt(eps), so RMSNorm(x) = x
and LayerNorm(x) = x - mean(x); the ViT keeps its residual stream zero-mean with a balance dim, so
LayerNorm is the identity too. Rotary embeddings act only on the slowest rotary pair of the LLM head,
with rope_theta = 1e12, where they are the identity for any prompt length. Weights are fully
determined (``seed`` is accepted for the zoo signature and ignored). float32 is the intended dtype.

    python -m mechsink.zoo.planted write-eval     # the bundled eval set -> planted_eval/
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import transformers as tf
from PIL import Image

from ..errors import MechsinkError
from .tiny import WORDS, llava_processor

EVAL_DIR = Path(__file__).resolve().parent / "planted_eval"
PLANTED_SINKS = (0, 14, 21)      # row-major patch indices: (0, 0), (2, 2), (3, 3)
LABEL_PATCH = 0                  # "the corner": its colour is the answer
COLORS = ("red", "green", "blue")
PROMPT = "what color is the corner ?"
IMAGE, PATCH = 48, 8
GRID = IMAGE // PATCH            # 6 patches a side, 36 in all
N_PATCHES = GRID * GRID

# Residual-stream layout, shared by the ViT, the projector and the LLM (hidden size 64).
D = 64
COLOR = [0, 1, 2]                # patch mean R, G, B (pixels in [0, 1])
TEXTURE = [3, 4, 5]              # stripe contrast per channel
POS = 6                          # one-hot position codes: POS = CLS, POS + 1 + p = patch p
FLAG = POS + 1 + N_PATCHES       # 43: +1 at planted sinks, -1 elsewhere
MASSIVE = FLAG + 1               # 44
LABEL = [45, 46, 47]             # colour the token attended to in ViT layer 0
TEXT = 48                        # 1 in every text-token embedding (the LLM query reads it)
ANSWER = [49, 50, 51]            # LLM layer-0 attention output, read by the LM head
BALANCE = 63                     # minus the sum of the ViT writes, keeping LayerNorm input zero-mean

EPS = 1e8                        # LayerNorm / RMSNorm eps; weight sqrt(EPS) makes them linear
MASSIVE_VALUE = 300.0
FLAG_GAIN = 10.0                 # sink neuron pre-activation: +10 at sinks (GELU = 10), -10 elsewhere (GELU ~ 0)
SELF_SCORE = 30.0                # ViT layer 0 attention logit of a token on itself
SINK_SCORE = 50.0                # ... of a sink query on patch 0 (20 nats above itself)
PROJ_BIAS = 50.0                 # keeps the projector GELU linear for inputs above about -40
LLM_SINK_SCORE = 25.0            # LLM attention logit of a text query on a sink (0 on every other token)
ANSWER_GAIN = 10.0               # planted: answer logit = 10 * colour channel
NULL_GAIN = 150.0                # null: answer logit = 150 * mean stripe texture (std about 1)
WORD_OFFSET = 5.0                # colour words beat the rest of the vocabulary at text positions
ROPE_THETA = 1e12
STRIPE = 0.08                    # texture amplitude ~ U[-0.08, 0.08]; colours ~ U[0.1, 0.9]
MARGIN = 0.03                    # the corner's strongest channel leads the next by at least this


class PlantedError(MechsinkError):
    """The planted models' arguments or bundled eval set are invalid."""


# ------------------------------------------------------------------------------------- model
def _processor() -> tf.LlavaProcessor:
    proc = llava_processor(IMAGE, PATCH, words=(*WORDS, *COLORS, "USER:", "ASSISTANT:"))
    # Pixels reach the conv as value / 255 in [0, 1]: the conv weights are written for that.
    proc.image_processor.do_normalize = False
    return proc


def _configs(vocab_size: int, image_token_id: int) -> tf.LlavaConfig:
    vc = tf.CLIPVisionConfig(hidden_size=D, intermediate_size=D, num_hidden_layers=2, num_attention_heads=1,
                             image_size=IMAGE, patch_size=PATCH, projection_dim=D, hidden_act="gelu",
                             layer_norm_eps=EPS)
    tc = tf.LlamaConfig(hidden_size=D, intermediate_size=D, num_hidden_layers=2, num_attention_heads=1,
                        num_key_value_heads=1, head_dim=D, vocab_size=vocab_size, max_position_embeddings=512,
                        rms_norm_eps=EPS, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    return tf.LlavaConfig(vision_config=vc, text_config=tc, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          image_token_id=image_token_id)


def _vit_weights(vt, sinks: Sequence[int], massive: float) -> None:
    """Embedding and layer 0 of the CLIP vision tower (vt = model.model.vision_tower)."""
    emb = vt.embeddings
    conv = emb.patch_embedding.weight                      # [D, 3, PATCH, PATCH]
    stripe = torch.tensor([1.0 if x % 2 == 0 else -1.0 for x in range(PATCH)])  # sign per pixel column
    for c in range(3):
        conv[COLOR[c], c] = 1.0 / PATCH ** 2               # patch mean of channel c
        conv[TEXTURE[c], c] = stripe / PATCH ** 2          # zero-mean column contrast of channel c
        conv[BALANCE, c] = -(1.0 + stripe) / PATCH ** 2
    pos = emb.position_embedding.weight                    # [1 + 36, D]
    flag = torch.full((1 + N_PATCHES,), -1.0)
    flag[[1 + p for p in sinks]] = 1.0
    for t in range(1 + N_PATCHES):
        pos[t, POS + t] = 1.0
        pos[t, FLAG] = flag[t]
        pos[t, BALANCE] = -(1.0 + flag[t])

    attn = vt.encoder.layers[0].self_attn                  # one head of size D; logits scaled by 1/sqrt(D)
    codes = torch.arange(POS, POS + 1 + N_PATCHES)
    alpha = math.sqrt(SELF_SCORE * math.sqrt(D))           # code gain: alpha^2 / sqrt(D) = SELF_SCORE
    beta = SINK_SCORE * math.sqrt(D) / alpha               # sink pull: alpha * beta / sqrt(D) = SINK_SCORE
    attn.q_proj.weight[codes, codes] = alpha
    attn.k_proj.weight[codes, codes] = alpha
    target = POS + 1 + LABEL_PATCH
    attn.q_proj.weight[target, FLAG] = beta / 2            # flag +-1 -> query on patch 0 of beta at sinks, 0 elsewhere
    attn.q_proj.bias[target] = beta / 2
    attn.v_proj.weight[COLOR, COLOR] = 1.0
    attn.out_proj.weight[LABEL, COLOR] = 1.0
    attn.out_proj.weight[BALANCE, COLOR] = -1.0

    mlp = vt.encoder.layers[0].mlp
    mlp.fc1.weight[0, FLAG] = FLAG_GAIN
    mlp.fc2.weight[MASSIVE, 0] = massive / FLAG_GAIN       # GELU(10) = 10 -> massive at sinks


def _llm_weights(model, tok, null: bool) -> None:
    lm = model.model.language_model
    emb = lm.embed_tokens.weight                            # [vocab, D]
    emb[:, TEXT] = 1.0
    emb[[tok.pad_token_id, tok.convert_tokens_to_ids("<image>")]] = 0.0
    attn = lm.layers[0].self_attn
    q = D // 2 - 1                                          # slowest rotary pair (q, q + D/2): rotation ~ 0
    if null:
        attn.v_proj.weight[COLOR, TEXTURE] = 1.0            # own stripe texture, with uniform attention (q = 0)
        attn.o_proj.weight[ANSWER, COLOR] = NULL_GAIN
    else:
        attn.q_proj.weight[q, TEXT] = 1.0
        attn.k_proj.weight[q, MASSIVE] = LLM_SINK_SCORE * math.sqrt(D) / MASSIVE_VALUE
        attn.v_proj.weight[COLOR, LABEL] = 1.0
        attn.o_proj.weight[ANSWER, COLOR] = ANSWER_GAIN
    head = model.lm_head.weight                             # [vocab, D]
    for k, word in enumerate(COLORS):
        i = tok.convert_tokens_to_ids(word)
        head[i, ANSWER[k]] = 1.0
        head[i, TEXT] = WORD_OFFSET


def _build(null: bool, seed: int = 0, *, sinks: Sequence[int] = PLANTED_SINKS, massive: float = MASSIVE_VALUE):
    sinks = tuple(int(p) for p in sinks)
    if not sinks or any(not 0 <= p < N_PATCHES for p in sinks) or len(set(sinks)) != len(sinks):
        raise PlantedError(f"sinks must be distinct patch indices in 0..{N_PATCHES - 1}, got {sinks}")
    if massive < 0:
        raise PlantedError(f"massive must be >= 0, got {massive}")
    proc = _processor()
    tok = proc.tokenizer
    cfg = _configs(len(tok), tok.convert_tokens_to_ids("<image>"))
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for mod in model.modules():                         # linear norms: x / sqrt(eps) * sqrt(eps)
            if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
                mod.weight.fill_(math.sqrt(EPS))
        _vit_weights(model.model.vision_tower, sinks, massive)
        proj = model.model.multi_modal_projector
        proj.linear_1.weight.copy_(torch.eye(D))
        proj.linear_1.bias.fill_(PROJ_BIAS)
        proj.linear_2.weight.copy_(torch.eye(D))
        proj.linear_2.bias.fill_(-PROJ_BIAS)
        _llm_weights(model, tok, null)
    return model, proc


def planted_llava(seed: int = 0, **kw):
    """(hf model, processor) whose answer is read from the planted sinks."""
    return _build(False, seed, **kw)


def planted_llava_null(seed: int = 0, **kw):
    """(hf model, processor) with the same ViT sinks and an LLM that ignores them."""
    return _build(True, seed, **kw)


BUILDERS = {"planted-llava": planted_llava, "planted-llava-null": planted_llava_null}


# ------------------------------------------------------------------------------------ images
def make_image(rng: np.random.Generator) -> Image.Image:
    """One planted image: iid colour + stripe texture per patch, the corner's colour with a clear
    strongest channel (margin MARGIN, so the label is never a near-tie)."""
    colors = rng.uniform(0.1, 0.9, size=(N_PATCHES, 3))
    while True:
        s = np.sort(colors[LABEL_PATCH])
        if s[2] - s[1] >= MARGIN:
            break
        colors[LABEL_PATCH] = rng.uniform(0.1, 0.9, size=3)
    stripes = rng.uniform(-STRIPE, STRIPE, size=(N_PATCHES, 3))
    sign = np.where(np.arange(PATCH) % 2 == 0, 1.0, -1.0)[None, :, None]        # [1, x, 1]
    tiles = colors[:, None, None, :] + stripes[:, None, None, :] * sign        # [36, y=1, x, 3]
    tiles = np.broadcast_to(tiles, (N_PATCHES, PATCH, PATCH, 3))
    grid = tiles.reshape(GRID, GRID, PATCH, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(IMAGE, IMAGE, 3)
    return Image.fromarray(np.rint(grid * 255).astype(np.uint8), "RGB")


def _patches(image: Image.Image) -> np.ndarray:
    """Pixels in [0, 1] grouped by patch: [36, PATCH (y), PATCH (x), 3], row-major patches."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if a.shape[:2] != (IMAGE, IMAGE):
        raise PlantedError(f"planted images are {IMAGE}x{IMAGE} px, got {a.shape[1]}x{a.shape[0]}")
    return a.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(N_PATCHES, PATCH, PATCH, 3)


def patch_colors(image: Image.Image) -> np.ndarray:
    """Mean colour of every patch, [36, 3] in [0, 1] (what the ViT's colour dims read)."""
    return _patches(image).mean(axis=(1, 2))


def patch_textures(image: Image.Image) -> np.ndarray:
    """Stripe contrast of every patch, [36, 3]: the patch mean of pixel * (+1 on even, -1 on odd
    columns). It is what the ViT's texture dims read, and all that the null model's answer reads."""
    sign = np.where(np.arange(PATCH) % 2 == 0, 1.0, -1.0)[None, None, :, None]
    return (_patches(image) * sign).mean(axis=(1, 2))


def label_of(image: Image.Image) -> str:
    """The planted label: the strongest channel of the corner patch's mean colour."""
    return COLORS[int(np.argmax(patch_colors(image)[LABEL_PATCH]))]


def write_eval(out: Path = EVAL_DIR, n: int = 256, seed: int = 0) -> Path:
    """Write the evaluation set (images/NNNN.png + samples.jsonl) deterministically."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        img = make_image(rng)
        rel = f"images/{i:04d}.png"
        img.save(out / rel)
        colors = patch_colors(img)
        label = label_of(img)
        rows.append({"id": f"{i:04d}", "image": rel, "prompt": PROMPT, "answer": label, "question_type": "global",
                     "planted_label": label, "planted_sinks": list(PLANTED_SINKS),
                     "patch_labels": [COLORS[k] for k in colors.argmax(axis=1)]})
    tmp = out / "samples.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "samples.jsonl")
    return out


def load_eval(limit: int | None = None, root: Path = EVAL_DIR) -> tuple[list[Image.Image], list[dict]]:
    """(images, rows) of the bundled eval set, in file order."""
    path = Path(root) / "samples.jsonl"
    if not path.exists():
        raise PlantedError(f"{path} is missing; run `python -m mechsink.zoo.planted write-eval`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    images = []
    for r in rows:
        with Image.open(Path(root) / r["image"]) as im:
            images.append(im.convert("RGB"))
    return images, rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mechsink.zoo.planted", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-eval", help="write the bundled eval set")
    w.add_argument("--out", type=Path, default=EVAL_DIR)
    w.add_argument("-n", type=int, default=256)
    w.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = write_eval(args.out, args.n, args.seed)
    print(f"wrote {args.n} samples to {out}")


if __name__ == "__main__":
    main()
