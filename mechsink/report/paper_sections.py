"""The seed paper's remaining analyses as report sections: relevance maps, word decoding and
DIYSink (a dual projector routed by a rule). Each runs on the distinct images (relevance, decoding)
or questions (DIYSink) of the report's data, adds captioned figures and tables, records every number
shown and adds its line to the findings. Recipes in ``configs/paper/`` select them with
``ReportConfig.sections``."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .context import ReportConfig, _Ctx, _num, _subset


def _image_batches(ctx: _Ctx, config: ReportConfig, n: int, answers=False):
    """The first ``n`` distinct images and this rank's chunks of them (all chunks without torchrun;
    the sections merge what the ranks made with ``distributed.gather``, in chunk order)."""
    from ..batching import batches
    from .findings import unique_images
    samples = unique_images(list(_subset(ctx, config.limit)))[:n]
    return samples, batches(ctx.model, samples, config.batch_size, answers=answers, shard=True)


def _numbered(parts) -> list[pd.DataFrame]:
    """Per-chunk frames (their ``sample`` counted in the chunk) with ``sample`` counted over all the
    chunks' samples, in chunk order: (frame, samples in the chunk) pairs."""
    out, offset = [], 0
    for frame, n in parts:
        out.append(frame.assign(sample=frame["sample"] + offset))
        offset += n
    return out


def _relevance(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..analyses import RelevanceConfig, RelevanceMaps, relevance_maps
    from ..distributed import fail_together, gather
    from ..sinks import detect
    from ..stats import compare_paired
    from . import findings
    from .figures import relevance_figure
    m = ctx.model
    rep.section(f"Relevance maps ({m.name})")
    parts, first = [], None                     # (chunk number, (rows, maps)); the figure shows rank 0's first chunk
    cfg = RelevanceConfig(layer=-1, direction="row", tokens="image")
    samples, chunks = _image_batches(ctx, config, min(config.limit, 32))
    with fail_together():
        for chunk in chunks:
            rm = relevance_maps(m, chunk.batch, detect(m, chunk.batch, ctx.causal_spec), config=cfg)
            first = first or (rm, chunk.batch.images)
            parts.append((chunk.number, (rm.frame, rm.maps, chunk.batch.size)))
    parts = gather(parts)
    res = RelevanceMaps(pd.concat(_numbered([(f, n) for f, _, n in parts]), ignore_index=True), cfg, {},
                        maps=np.concatenate([x for _, x, _ in parts]))
    t = res.table().assign(token_set=lambda d: d["token_set"].map(ctx.name))
    per = res.frame.groupby(["sample", "is_sink"])["spread"].mean().unstack().dropna()
    c = compare_paired(per[True].to_numpy(), per[False].to_numpy(), n_boot=1000, method="percentile",
                       seed=config.seed) if len(per) >= 2 and {True, False} <= set(per.columns) else None
    rep.text(f"Each token's attention over the patches of its image in the last ViT layer (`direction=\"row\"`: "
             f"where it gathers from). Spread = entropy / log(n): 1 = uniform, 0 = one patch. {len(samples)} "
             f"images, each once." + (f" Spread of the {ctx.label} minus the other tokens, per image: "
                                       f"{c.diff.mean:.3g} [{c.diff.ci_low:.3g}, {c.diff.ci_high:.3g}], "
                                       f"p = {c.p_value:.3g} over {c.n} images." if c is not None else ""))
    if first is not None:                       # a rank with no chunk of its own draws nothing (it writes nothing)
        fig = relevance_figure(first[0], first[1], per_set=3, names=(ctx.label, ctx.name("nonsinks")))
        rep.figure(fig, f"Relevance maps: attention of {ctx.label} tokens (top row) and other tokens (bottom row) "
                        f"over their image in the last ViT layer; brighter = more attention, the marker is the token "
                        f"itself.")
    rep.table(t, f"Spread numbers of the {ctx.label} and the other tokens, 95 % bootstrap CI over tokens.", index=False)
    for r in t.itertuples(index=False):
        _num(rep, f"{ctx.key}.relevance.{r.token_set}.{r.measure}", r.mean)
    if c is not None:
        findings.add(ctx.findings, f"{ctx.key}.findings.relevance", m.name,
                     f"spread of the {ctx.label}' attention minus the other tokens'", effect=c.diff.mean,
                     ci=(c.diff.ci_low, c.diff.ci_high), p=c.p_value, n_images=c.n, n_questions=c.n,
                     verdict=findings.NOT_TESTABLE if ctx.fallback else findings.verdict_of(c.p_value, c.diff.mean))


def _decoding(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..analyses import decode_isolated
    from ..distributed import fail_together, gather
    from ..sinks import detect
    from . import findings
    m = ctx.model
    rep.section(f"Word decoding ({m.name})")
    parts = []                                  # (chunk number, (rows, answers)): merged over torchrun ranks
    samples, chunks = _image_batches(ctx, config, min(config.limit, 16))
    with fail_together():
        for chunk in chunks:
            res = decode_isolated(m, chunk.batch, detect(m, chunk.batch, ctx.causal_spec), tokens="image", k=3)
            parts.append((chunk.number, (res.frame, [s.answer for s in chunk.samples])))
    parts = gather(parts)
    labels = [a for _, answers in parts for a in answers]
    from ..analyses.decoding import decoding_summary
    words = pd.concat(_numbered([(f, len(answers)) for f, answers in parts]), ignore_index=True)
    have = all(lab is not None for lab in labels)
    t = decoding_summary(words, labels if have else None, top=1)
    t = t.assign(token_set=t["token_set"].map(ctx.name))
    rep.text(f"One visual token kept visible at a time (attention to every other visual token knocked out in every "
             f"LLM layer); its top-3 next-token words at the last prompt position. {len(samples)} images, each "
             f"with its first question.")
    rep.table(t, "Per token set: tokens decoded, most frequent top-1 words and, with answers, how often the top-1 "
                 "word is the answer (Wilson 95 % CI over tokens).", index=False)
    for r in t.to_dict("records"):
        _num(rep, f"{ctx.key}.decoding.{r['token_set']}.n_tokens", r["n_tokens"])
        for k in ("label_rate", "ci_low", "ci_high"):
            if k in r:
                _num(rep, f"{ctx.key}.decoding.{r['token_set']}.{k}", r[k])
    c = None
    if have:
        from ..stats import compare_paired
        lab = np.array([str(x).strip().lower() for x in labels])
        top = words[words["rank"] == 0]
        hit = top.assign(hit=top["word"].str.strip().str.lower().to_numpy() == lab[top["sample"].to_numpy()])
        per = hit.groupby(["sample", "is_sink"])["hit"].mean().unstack()
        if {True, False} <= set(per.columns):
            per = per.dropna()
            if len(per) >= 2:
                c = compare_paired(per[True].to_numpy(float), per[False].to_numpy(float), n_boot=1000,
                                   method="percentile", seed=config.seed)
    if c is not None:
        from .sections import _comparison_finding
        _comparison_finding(ctx, "decoding", f"rate of decoding the answer from one {ctx.label} token minus from "
                                             f"one other token (per image)", c)
    else:
        findings.add(ctx.findings, f"{ctx.key}.findings.decoding", m.name, "no answers or no sinks to compare",
                     n_images=len(samples), n_questions=len(samples))


def _diysink(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..interventions import DualProjector, RuleRouter, evaluate_dual, train_dual
    from .findings import counts, image_of
    from .sections import _comparison_finding
    m = ctx.model
    rep.section(f"DIYSink: a dual projector ({m.name})")
    samples = list(_subset(ctx, config.limit))
    images = list(dict.fromkeys(image_of(s) for s in samples))
    train_imgs = set(images[: len(images) // 2])                   # images never shared by train and test
    train = [s for s in samples if image_of(s) in train_imgs]
    test = [s for s in samples if image_of(s) not in train_imgs]
    from ..interventions.dual import DIYSinkError
    from .findings import add
    try:
        dual = DualProjector.from_model(m, ctx.causal_spec)
        log = train_dual(m, dual, train, stage=1, epochs=1, lr=1e-5, batch_size=config.batch_size)
    except DIYSinkError as e:
        rep.text(f"Not testable on this model: {e}")
        add(ctx.findings, f"{ctx.key}.findings.diysink", m.name, "the dual projector cannot be built here",
            n_images=len(images), n_questions=len(samples), note=str(e).split(":")[0])
        return
    plain = evaluate_dual(m, dual, test, batch_size=config.batch_size)
    routed = evaluate_dual(m, dual, test, weights=RuleRouter(), batch_size=config.batch_size)
    n_img, n_q = counts(test)
    rep.text(f"Two copies of the projector, one for the {ctx.label} and one for the other tokens, trained one "
             f"epoch (stage 1) on {len(train)} questions of half the images; evaluated on {n_q} questions of the "
             f"other {n_img} images with equal weights and with the rule router. Final training loss "
             f"{float(log['loss'].iloc[-1]):.3g}.")
    rows = []
    for name, res in (("equal weights", plain), ("rule router", routed)):
        t = res.table(())
        rows.append({"weights": name, **t.iloc[0].to_dict()})
    tab = pd.DataFrame(rows)
    rep.table(tab, "Accuracy (Wilson 95 % CI over questions) of the dual projector with each weighting.", index=False)
    for r in tab.to_dict("records"):
        _num(rep, f"{ctx.key}.diysink.{r['weights'].replace(' ', '_')}.accuracy", r["accuracy"])
    a = routed.frame.set_index("id")["correct"].astype(float)
    b = plain.frame.set_index("id")["correct"].astype(float).reindex(a.index)
    if len(a) >= 2:
        from ..stats import compare_paired
        img = {s.id: image_of(s) for s in test}
        c = compare_paired(a.to_numpy(), b.to_numpy(), units=[img[i] for i in a.index], alternative="two-sided",
                           n_boot=1000, method="percentile", seed=config.seed)
        _comparison_finding(ctx, "diysink", "accuracy with the rule router minus equal weights", c, two_sided=True)
