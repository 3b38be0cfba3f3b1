"""`mechsink selfcheck`: the known-answer checks, on the device and dtype you will use.

Each check has an answer fixed by construction, so a failure means the toolkit (or the device,
its kernels, the dtype) does not do what it claims there:

- ``planted detection``: the planted-sink LLaVA's sinks (patches 0, 14, 21, norm ~300 against
  2-6) found with the published rule (norm >= 100 at ``vit.out``): precision = recall = 1.
- ``planted ablation``: zeroing the planted sinks hurts the answer more than zeroing matched
  random patches (permutation p < 0.01), while on the null twin -- whose sinks are exchangeable
  with any other patch by construction -- the same test does not fire (p > 0.01).
- ``self-patching``: patching a run with its own activations, at every site kind and token set,
  changes the metric by nothing (<= a dtype-dependent tolerance).
- ``TransformerLens``: logits and every LLM block's residual stream of ``tiny-llava`` agree with
  TransformerLens' bridge on the same weights.
- ``twin end to end``: ``twin-llava-1.5-7b`` (full width, cut depth, real tokenizer) gives the
  processor's 576 image tokens, reads ``▁Yes``/``▁No`` for the yes/no metric, detects, ablates
  and patches with finite numbers, and its eager and default attention agree (max |Δ logit|,
  the parity a report records).

The planted and TransformerLens checks run in float32 (their weights are exact in it); the twin
checks run in the requested dtype. On a CPU the whole run takes about a minute.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

TWIN = "twin-llava-1.5-7b"


@dataclass
class Check:
    name: str
    passed: bool
    value: str
    expected: str
    seconds: float
    dtype: str


def _tol(dtype: str) -> float:
    return 1e-5 if dtype == "float32" else 2e-2


def _planted(device: str, n: int = 24):
    import mechsink
    from mechsink.zoo import planted as P
    images, rows = P.load_eval(limit=n)
    prompts = [r["prompt"] for r in rows]
    answers = [r["planted_label"] for r in rows]
    out = {}
    for name in ("planted-llava", "planted-llava-null"):
        m = mechsink.load(name, device=device)
        out[name] = (m, [m.prepare(images[i:i + 8], prompts[i:i + 8], answers=answers[i:i + 8]) for i in range(0, n, 8)])
    return out, P


def check_detection(ctx) -> tuple[bool, str, str]:
    from mechsink.sinks import SinkSpec, detect
    m, batches = ctx["planted"]["planted-llava"]
    P = ctx["P"]
    tp = fp = fn = 0
    for b in batches:
        s = detect(m, b, SinkSpec.preset("llava-1.5")).patches
        truth = s["patch"].isin(P.PLANTED_SINKS).to_numpy()
        got = s["is_sink"].to_numpy()
        tp += int((got & truth).sum())
        fp += int((got & ~truth).sum())
        fn += int((~got & truth).sum())
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return prec == 1.0 and rec == 1.0, f"P={prec:.3f} R={rec:.3f} ({tp} sinks)", "P=1 R=1"


def check_ablation(ctx) -> tuple[bool, str, str]:
    from mechsink.ablation import AblationConfig, ablate
    from mechsink.sinks import SinkSpec
    spec = SinkSpec.preset("llava-1.5")
    cfg = AblationConfig(site="proj.out", mode="zero", metric="logprob", n_draws=8, seed=0, n_boot=500, n_perm=2000)
    p = {}
    for name, (m, batches) in ctx["planted"].items():
        p[name] = float(ablate(m, batches, cfg, sinks=spec).summary()["p_value"])
    ok = p["planted-llava"] < 0.01 and p["planted-llava-null"] > 0.01
    return ok, f"p planted={p['planted-llava']:.4f}, p null={p['planted-llava-null']:.4f}", "planted < 0.01 < null"


def check_self_patching(ctx) -> tuple[bool, str, str]:
    from mechsink.patching import PatchConfig, patch
    from mechsink.sinks import SinkSpec
    m, batches = ctx["planted"]["planted-llava"]
    b = batches[0]
    sites = ("vit.embed", "vit.blocks.1.hook_resid_mid", "vit.out", "proj.out", "llm.embed",
             "llm.blocks.0.hook_attn_out", f"llm.blocks.{m.n_llm_layers - 1}.hook_resid_post")
    res = patch(m, b, b, PatchConfig(sites=sites, selections=("sinks", "random", "image"), metric="logprob", n_draws=2),
                sinks=SinkSpec.preset("llava-1.5"))
    f = res.frame
    d = float(np.abs(f["patched"] - f["base"]).max())
    return d <= _tol("float32"), f"max |patched - base| = {d:.2e} over {len(f)} runs", f"<= {_tol('float32'):g}"


def check_transformer_lens(ctx) -> tuple[bool, str, str]:
    import copy
    import mechsink
    from mechsink.lens import no_torchvision_install
    from mechsink.testing import test_image
    from transformer_lens.model_bridge import TransformerBridge
    m = mechsink.load("tiny-llava", device=ctx["device"])
    b = m.prepare([test_image(48), test_image(48, seed=1)], ["what is this ?", "is there a cat in this picture ?"])
    sites = [f"llm.blocks.{l}.hook_resid_post" for l in range(m.n_llm_layers)]
    ours = m.run(b, read=sites)
    hf = copy.deepcopy(m.hf)
    hf.config.architectures = [type(hf).__name__]
    tok = copy.deepcopy(m.processor.tokenizer)
    tok.init_kwargs.update(name_or_path="tiny-llava", add_bos_token=True)
    with no_torchvision_install():
        br = TransformerBridge.boot_transformers("tiny-llava", hf_model=hf, tokenizer=tok, device=ctx["device"])
    extra = {k: v for k, v in b.inputs.items() if k != "input_ids"}
    logits, cache = br.run_with_cache(b.inputs["input_ids"], **extra)
    mask = b.inputs["attention_mask"].bool()
    d = float((logits.detach() - ours["llm.logits"]).abs()[mask].max())
    for l, s in enumerate(sites):
        d = max(d, float((cache[f"blocks.{l}.hook_resid_post"].detach() - ours[s]).abs()[mask].max()))
    tol = 1e-4
    return d <= tol, f"max |Δ| = {d:.2e} (logits, {len(sites)} residual streams)", f"<= {tol:g}"


def check_twin(ctx) -> tuple[bool, str, str]:
    import mechsink
    from mechsink.metrics import Metric
    from mechsink.sinks import SinkSpec, detect
    from mechsink.testing import test_image
    from mechsink.tokens import ROLE
    m = mechsink.load(TWIN, device=ctx["device"], dtype=ctx["dtype"])
    tok = m.processor.tokenizer
    images = [test_image(336, seed=i) for i in range(2)]
    b = m.prepare(images, ["Is there a cat in the image?"] * 2, answers=["Yes", "No"])
    n_img = int((b.inputs["input_ids"][0] == m.hf.config.image_token_id).sum())
    n_map = int((b.token_map.roles[0] == ROLE["image"]).sum())
    metric = Metric("logit_diff")
    t = metric.targets(m, b)
    read = metric.to_dict()["tokens_read"]
    own = tok(m.format_prompt("Is there a cat in the image?") + " Yes", add_special_tokens=False)["input_ids"][-1]
    problems = []
    if not n_img == n_map == 576:
        problems.append(f"image tokens {n_img}/{n_map} != 576")
    if own not in t.candidates[0].tolist() or "▁Yes" not in read["yes"]:
        problems.append(f"yes tokens {read['yes']} miss the model's own {tok.convert_ids_to_tokens([own])}")
    sinks = detect(m, b, SinkSpec(rule="topk", params={"k": 3}))
    if int(sinks.patches["is_sink"].sum()) != 6:
        problems.append("top-3 detection did not give 3 sinks per image")
    from mechsink.ablation import AblationConfig, ablate
    from mechsink.patching import PatchConfig, patch
    abl = ablate(m, [b], AblationConfig(site="proj.out", metric=metric, n_draws=2, n_boot=200, n_perm=200), sinks=sinks)
    vals = abl.frame.loc[abl.frame["valid"], ["value", "clean", "effect"]].to_numpy()
    if not np.isfinite(vals).all():
        problems.append("ablation values are not finite")
    pr = patch(m, b, b, PatchConfig(sites=("proj.out",), selections=("sinks", "image"), metric=metric, n_draws=1),
               sinks=sinks).frame
    dp = float(np.abs(pr["patched"] - pr["base"]).max())
    if not dp <= _tol(ctx["dtype"]) * 10:
        problems.append(f"self-patching moved the metric by {dp:.2e}")
    parity = attention_parity(m, b)
    if not (math.isfinite(parity) and parity <= (1e-3 if ctx["dtype"] == "float32" else 1.0)):
        problems.append(f"eager vs default attention differ by {parity:.3g}")
    value = (f"576 tokens, yes={'/'.join(read['yes'])}, |Δ| self-patch {dp:.1e}, eager-vs-{m.hf.config._attn_implementation} "
             f"parity {parity:.2e}")
    return not problems, "; ".join(problems) or value, "576 tokens, ▁Yes read, finite, parity small"


def attention_parity(model, batch) -> float:
    """max |Δ logit| between eager attention and the model's own implementation on one batch."""
    from mechsink.models.attention import parity
    return parity(model, batch)


CHECKS: list[tuple[str, Callable, bool]] = [   # name, function, runs in the requested dtype
    ("planted detection", check_detection, False),
    ("planted ablation vs null", check_ablation, False),
    ("self-patching identity", check_self_patching, False),
    ("TransformerLens agreement", check_transformer_lens, False),
    ("twin end to end", check_twin, True),
]


def selfcheck(device: str | None = None, dtype: str = "float32", only: list[str] | None = None) -> list[Check]:
    """Run the checks; one Check per row (a check that raises fails with its error as the value)."""
    from mechsink.models import check_device
    check_device(device)
    names = [n for n, _, _ in CHECKS]
    bad = [n for n in only or [] if n not in names]
    if bad:
        from mechsink.errors import MechsinkError
        raise MechsinkError(f"unknown check(s) {bad}; checks: {', '.join(names)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        from mechsink.errors import MechsinkError
        raise MechsinkError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    device = device or "cpu"
    ctx = {"device": device, "dtype": dtype}
    rows = []
    for name, fn, uses_dtype in CHECKS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            if fn in (check_detection, check_ablation, check_self_patching) and "planted" not in ctx:
                ctx["planted"], ctx["P"] = _planted(device)
            ok, value, expected = fn(ctx)
        except Exception as e:   # a check that cannot run has failed
            ok, value, expected = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200], "runs"
        rows.append(Check(name, bool(ok), value, expected, time.perf_counter() - t0, dtype if uses_dtype else "float32"))
    return rows


def table(rows: list[Check], device: str | None) -> str:
    lines = [f"mechsink selfcheck on {device or 'cpu'}", ""]
    w = max(len(r.name) for r in rows)
    for r in rows:
        lines.append(f"  {'PASS' if r.passed else 'FAIL'}  {r.name:{w}s}  {r.seconds:6.1f} s  {r.dtype:8s}  {r.value}"
                     + ("" if r.passed else f"  (expected {r.expected})"))
    n_fail = sum(not r.passed for r in rows)
    lines += ["", f"{len(rows) - n_fail}/{len(rows)} passed in {sum(r.seconds for r in rows):.1f} s"]
    return "\n".join(lines)


def as_dicts(rows: list[Check]) -> list[dict]:
    return [asdict(r) for r in rows]
