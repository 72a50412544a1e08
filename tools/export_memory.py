"""Peak host memory of `dream-export export` on a random-weight LLaVA checkpoint of a chosen size.

    python -m tools.export_memory --out /tmp/mem --hidden 2048 --layers 22 --intermediate 5632

Builds a llava-hf layout checkpoint (the tests' tiny CLIP tower and tokenizer, so a small vocabulary, and a
Llama decoder of the given size, saved in bf16 as Hub checkpoints are) and a random DREAM draft for it, then
runs the export in a child process and reads the child's memory from the kernel: its high-water resident
set (VmHWM) when the export has written the bundle, and again at the end of the check that follows
(parity and lint, unless --skip-check), so the figures cover everything the process holds, the
exporter's own copies included. That figure counts the clean file-backed pages of the memory-mapped
checkpoint too, which the kernel reclaims under pressure instead of failing; the peak of anonymous memory
(sampled, RssAnon) is what must fit in RAM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def build(out: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> None:
    """Save a random-weight bf16 LLaVA target of the given decoder size and a random DREAM draft for it."""
    import torch
    from transformers import AutoConfig

    from dream_export.draft.config import DraftConfig
    from dream_export.draft.model import Draft, init_weights
    from dream_export.draft.train import save_draft
    from tests import tiny_vlms

    tiny_vlms.TEXT.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                          num_attention_heads=heads, num_key_value_heads=kv_heads)
    torch.set_default_dtype(torch.bfloat16)  # build at the size a Hub checkpoint is stored in
    target = tiny_vlms.build_tiny_vlm("llava", out / "target")
    torch.set_default_dtype(torch.float32)
    draft = Draft(DraftConfig.from_target(AutoConfig.from_pretrained(target).get_text_config()))
    init_weights(draft)
    save_draft(draft.eval(), out / "draft", record={})


def target_params(target: Path) -> int:
    """Parameters stored in a checkpoint directory's safetensors files (read from their headers)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(target.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def _status(pid: int, field: str) -> int:
    """A size field of /proc/PID/status in bytes (0 once the process has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _hwm(pid: int) -> int:
    """The process's resident high-water mark (VmHWM: anonymous and file-backed pages)."""
    return _status(pid, "VmHWM")


class AnonPeak(threading.Thread):
    """Samples the child's anonymous resident memory (RssAnon: what it cannot hand back without swap, unlike
    the clean pages of a memory-mapped checkpoint) every 50 ms; the kernel keeps no high-water mark of it."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, _status(self.pid, "RssAnon"))


def measure(cmd: list[str]) -> dict:
    """Run `cmd` (an export), echoing its output; peak RSS when the bundle is written and overall."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    anon = AnonPeak(proc.pid)
    anon.start()
    export_peak, export_anon, export_s = None, None, None
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith("exported bundle to"):
            export_peak, export_anon, export_s = _hwm(proc.pid), anon.peak, time.time() - t0
    # wait4's ru_maxrss is the exact overall figure (VmHWM is gone with the process)
    _, status, usage = os.wait4(proc.pid, 0)
    anon.stop.set()
    return {"returncode": os.waitstatus_to_exitcode(status), "export_peak_rss_bytes": export_peak,
            "export_peak_anon_bytes": export_anon, "export_seconds": export_s,
            "overall_peak_rss_bytes": usage.ru_maxrss * 1024, "overall_peak_anon_bytes": anon.peak,
            "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-check", action="store_true", help="measure the export alone (no parity and lint)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not (a.out / "target" / "config.json").exists():
        build(a.out, a.hidden, a.layers, a.intermediate, a.heads, a.kv_heads)
    n = target_params(a.out / "target")
    cmd = [sys.executable, "-m", "dream_export.cli", "export", str(a.out / "target"), "--draft", str(a.out / "draft"),
           "-o", str(a.out / "bundle"), "--kv-capacity", "256", "--max-tree", "32", "--dtype", a.dtype]
    res = {"target_params": n, "dtype": a.dtype, **measure(cmd + (["--skip-check"] if a.skip_check else []))}
    for k in ("export", "overall"):
        for what in ("rss", "anon"):
            if res[f"{k}_peak_{what}_bytes"]:
                res[f"{k}_{what}_bytes_per_param"] = round(res[f"{k}_peak_{what}_bytes"] / n, 3)
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
