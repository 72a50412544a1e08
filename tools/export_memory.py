"""Peak host memory of `dream-export export` on a random-weight LLaVA checkpoint of a chosen size.

    python -m tools.export_memory --out /tmp/mem --hidden 2048 --layers 22 --intermediate 5632

Builds a llava-hf layout checkpoint (the tests' tiny CLIP tower and tokenizer, so a small vocabulary, and a
Llama decoder of the given size, saved in fp16 as Hub checkpoints are) and a random DREAM draft for it, then runs the export
in a child process and reads the child's peak resident set size from the kernel (getrusage), so the
figure covers everything the export holds, the exporter's own copies included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(out: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> int:
    import torch
    from transformers import AutoConfig

    from dream_export.draft.config import DraftConfig
    from dream_export.draft.model import Draft, init_weights
    from dream_export.draft.train import save_draft
    from tests import tiny_vlms

    text = dict(tiny_vlms.TEXT)
    text.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                num_attention_heads=heads, num_key_value_heads=kv_heads)
    tiny_vlms.TEXT.clear()
    tiny_vlms.TEXT.update(text)
    torch.set_default_dtype(torch.float16)  # build at the size a Hub checkpoint is stored in
    target = tiny_vlms.build_tiny_vlm("llava", out / "target")
    torch.set_default_dtype(torch.float32)
    cfg = AutoConfig.from_pretrained(target)
    n_params = sum(
        Path(f).stat().st_size for f in (out / "target").glob("*.safetensors")) // 2  # fp16: 2 bytes each
    draft = Draft(DraftConfig.from_target(cfg.get_text_config()))
    init_weights(draft)
    save_draft(draft.eval(), out / "draft", record={})
    return n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not (a.out / "target" / "config.json").exists():
        n = build(a.out, a.hidden, a.layers, a.intermediate, a.heads, a.kv_heads)
    else:
        n = sum(Path(f).stat().st_size for f in (a.out / "target").glob("*.safetensors")) // 2
    cmd = [sys.executable, "-m", "dream_export.cli", "export", str(a.out / "target"), "--draft", str(a.out / "draft"),
           "-o", str(a.out / "bundle"), "--kv-capacity", "256", "--max-tree", "32", "--dtype", a.dtype]
    t0 = time.time()
    rc = subprocess.run(cmd).returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    res = {"target_params": n, "peak_rss_bytes": peak, "bytes_per_param": peak / n, "seconds": time.time() - t0,
           "returncode": rc, "dtype": a.dtype}
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
