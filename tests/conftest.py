import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# Tiny models: one thread is as fast and avoids oversubscription stalls on small shared machines.
torch.set_num_threads(1)

# TransformerLens' bridge pip-installs torchvision when a processor needs it; torchvision must never
# be installed next to the CPU torch (it replaces torch). Make any such install fail fast instead.
os.environ["PIP_NO_INDEX"] = "1"
os.environ["UV_OFFLINE"] = "1"
