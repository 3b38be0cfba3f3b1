"""What `mechsink inspect` shows: every site with its shape for one input, and the TokenMap."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from .errors import MechsinkError


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise MechsinkError(f"image not found: {path}")
    except Exception as e:  # PIL raises many types for corrupt files
        raise MechsinkError(f"cannot read image {path}: {type(e).__name__}: {e}".splitlines()[0])


def inspect_model(model, image: str | Path | None = None, prompt: str | None = None) -> dict:
    from .data.images import test_image
    img = open_image(image) if image is not None else test_image()
    batch = model.prepare([img], [prompt])
    names = model.site_names()
    acts = model.run(batch, read=names)
    tm = batch.token_map
    return {
        "model": model.name,
        "family": model.adapter.family,
        "vit_layers": model.n_vit_layers,
        "llm_layers": model.n_llm_layers,
        "prompt": batch.prompts[0],
        "sites": names,
        "shapes": {n: list(acts[n].shape) for n in names},
        "token_map": tm.records() if len(tm.llm_tokens) else [
            {"llm_pos": -1, "tile": int(r.tile), "row": int(r.row), "col": int(r.col), "image": int(r.image),
             "role": "image", "sample": int(r.sample)} for r in tm.patches.itertuples(index=False)],
        "special": tm.special.to_dict(orient="records"),
        "grids": [{"sample": k[0], "image": k[1], "tile": k[2], "rows": v[0], "cols": v[1]} for k, v in tm.grids.items()],
    }
