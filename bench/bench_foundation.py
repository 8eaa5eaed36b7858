"""Foundation benchmark: training throughput and 1000-step sampling time per U-Net preset.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_foundation.py [--presets tiny small] [--threads 1 2]

Writes bench/results/foundation_<device>.json and .md. Sampling cost per denoising step is
constant, so the 1000-step time is measured over ``--sample-steps`` steps and scaled by
1000 / sample-steps (stated in the results). The machine's load average is recorded: numbers
taken while other processes run are not comparable with those of an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from attribution.ddpm import build_unet, default_device, draw_t_eps, linear_schedule, predict_eps, q_sample

RESOLUTION = {"tiny": (16, 1), "small": (32, 3), "ho-cifar10": (32, 3)}


def train_throughput(preset: str, device, batch: int = 64, steps: int = 20) -> float:
    size, ch = RESOLUTION[preset]
    unet = build_unet(preset, size, ch).to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    s = linear_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, ch, size, size, device=device)

    def step():
        t, eps = draw_t_eps(batch, (ch, size, size), s.T, g, device)
        loss = (predict_eps(unet, q_sample(s, x0, t, eps), t) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def sampling_seconds_per_1000(preset: str, device, batch: int = 16, steps: int = 50) -> float:
    size, ch = RESOLUTION[preset]
    unet = build_unet(preset, size, ch).to(device).eval()
    x = torch.randn(batch, ch, size, size, device=device)
    t = torch.full((batch,), 500, device=device)
    for _ in range(3):
        predict_eps(unet, x, t)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = predict_eps(unet, x, t)
    _sync(device)
    return (time.perf_counter() - t0) / steps * 1000


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = default_device()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for preset in args.presets:
            train_steps = 20 if preset == "tiny" else 5
            rows.append({
                "preset": preset,
                "threads": threads,
                "params": sum(p.numel() for p in build_unet(preset, *RESOLUTION[preset]).parameters()),
                "resolution": RESOLUTION[preset][0],
                "train_examples_per_s": round(train_throughput(preset, device, steps=train_steps), 1),
                "sample_1000_steps_batch16_s": round(sampling_seconds_per_1000(preset, device, steps=args.sample_steps), 1),
            })
            print(rows[-1], flush=True)
    result = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
        "sampling_note": f"1000-step time = measured time of {args.sample_steps} denoising steps x {1000 // args.sample_steps}",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"foundation_{device.type}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = ["| preset | params | res | threads | train ex/s (batch 64) | 1000-step sampling, batch 16 (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params']:,} | {r['resolution']} | {r['threads']} | "
                     f"{r['train_examples_per_s']} | {r['sample_1000_steps_batch16_s']} |")
    (out / f"{name}.md").write_text("\n".join(lines) + f"\n\nDevice {device}, load average at end "
                                    f"{result['load_average_at_end']}.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
