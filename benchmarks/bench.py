"""Cost of dmm_wrap relative to the frozen backbone it wraps, as ratios measured side by side in one run.

Ratios (lower is better; absolute times are printed too, but only the ratios are comparable across machines):

1. fit overhead  = `fit` hooked at --layer over N batches (stats_batches=1), from the moment it starts reading the
                   loader to its end / the backbone's forward alone (torch.no_grad) over the same N batches.
2. early exit    = the same `fit` hooked at --early-layer / the full backbone forward over the same batches.
3. stream memory = memory `fit` holds above its starting point on a stream 10x longer / on 1x, each in a fresh
                   subprocess: the peak, over every batch read and the end of fit, of the bytes in use (glibc's heap,
                   mallinfo2, on CPU; torch.cuda.memory_allocated on CUDA) minus the bytes in use before fit.
                   `stream_memory_control` is the same ratio with every feature deliberately cached: it must be
                   flagged (above the target), which shows the measurement can see a cache.
4. inference     = DebiasedEncoder(x) and inference_module()(x) / the backbone truncated at --layer alone.
5. whole fit call at the default stats_batches (32, more than N: the statistics pre-pass covers the whole stream)
                 = everything `fit(...)` does, setup and statistics included, hooked at --layer / the backbone's
                   forward over the same N batches; and hooked at --early-layer / the same full forward.

Every stream is an IterableDataset that draws random batches on the fly (re-seeded on each pass, so every
measurement sees the same batches); nothing is precomputed. Timings are interleaved over --repeats rounds and the
median of each is used. `--clock cpu` times this process's CPU time instead of elapsed time, for a machine shared
with other jobs (run it with OMP_NUM_THREADS=1).

Example:
    python benchmarks/bench.py                                   # ResNet-18, 96x96, batch 128, CPU
    python benchmarks/bench.py --device cuda --arch resnet50 --image-size 224 --batch-size 128
    python benchmarks/bench.py --smoke --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dmm_wrap import Attribute, DebiasedEncoder, FitConfig, HeadConfig, create_backbone
from dmm_wrap.inference import truncate_backbone

TARGETS = {"fit_overhead": ("<=", 1.10), "early_exit": ("<", 1.0), "stream_memory": ("<=", 1.05),
           "stream_memory_control": (">", 1.05),
           "inference_overhead": ("<=", 1.05), "inference_module_overhead": ("<=", 1.05),
           "fit_call_default_stats": ("<=", 1.10), "early_exit_call_default_stats": ("<", 1.0),
           "fit_call_aligned": ("<=", 1.10)}
DEFAULT_STATS_BATCHES = FitConfig().stats_batches
ALIGNED_FIT = {k: getattr(FitConfig.aligned(), k) for k in ("align_weight", "align_every", "lam", "lr")}
"""The options FitConfig.aligned() sets (with HeadConfig.aligned() heads): the alignment term's cost."""
ATTRIBUTES = [Attribute("site", "categorical", num_classes=3)]


class RandomBatches(torch.utils.data.IterableDataset):
    """`batches` random (inputs [B, 3, S, S], attrs [B, 1]) batches, drawn on the fly; each pass repeats the same ones.

    `pass_starts` records when each pass began. With `input_size` given and one epoch, fit iterates the loader once:
    its statistics pre-pass reads the first `stats_batches` batches of that pass, and training takes their features.
    """

    def __init__(self, batches: int, batch_size: int, image_size: int, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.batches, self.batch_size, self.image_size, self.seed = batches, batch_size, image_size, seed
        self.clock = clock
        self.pass_starts: list[float] = []
        self.probe: Callable[[], None] | None = None  # called before each batch is drawn (memory sampling)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.pass_starts.append(self.clock())
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.batches):
            if self.probe is not None:
                self.probe()
            x = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=gen)
            b = torch.randint(0, 3, (self.batch_size, 1), generator=gen).float()
            yield x, b


@dataclass
class Setup:
    args: argparse.Namespace
    device: torch.device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        """Seconds on the clock chosen with --clock: elapsed time, or this process's CPU time."""
        return time.process_time() if self.args.clock == "cpu" else time.perf_counter()

    def backbone(self) -> nn.Module:
        return create_backbone(f"torchvision:{self.args.arch}").to(self.device).eval()

    def encoder(self, backbone: nn.Module, layer: str, head: HeadConfig | None = None) -> DebiasedEncoder:
        s = self.args.image_size
        return DebiasedEncoder(backbone, layer, ATTRIBUTES, input_size=(3, s, s),
                               **vars(head or HeadConfig())).to(self.device)

    def stream(self, batches: int) -> RandomBatches:
        return RandomBatches(batches, self.args.batch_size, self.args.image_size, clock=self.now)

    def fit(self, model: DebiasedEncoder, stream: RandomBatches, **options: Any) -> tuple[float, float]:
        """(seconds from the start of the last pass over `stream`, whole fit call seconds) of one fit over `stream`,
        stats_batches=1 unless given."""
        options.setdefault("stats_batches", 1)
        self.sync()
        t0 = self.now()
        model.fit(stream, epochs=1, progress=False, device=str(self.device), **options)
        self.sync()
        t1 = self.now()
        return t1 - stream.pass_starts[-1], t1 - t0

    def forward(self, fn: Callable[[Tensor], Any], stream: RandomBatches, mode: Callable[[], Any]) -> float:
        """Seconds to run `fn` on every batch of `stream` under `mode` (no_grad / inference_mode)."""
        self.sync()
        t0 = self.now()
        with mode():
            for x, _ in stream:
                fn(x.to(self.device, non_blocking=True))
        self.sync()
        return self.now() - t0


def measure_times(setup: Setup) -> dict[str, list[float]]:
    """Interleaved timings (seconds) of every measured configuration, one entry per repeat."""
    args = setup.args
    backbone = setup.backbone()
    fit_model = setup.encoder(backbone, args.layer)
    early_model = setup.encoder(backbone, args.early_layer)
    aligned_model = setup.encoder(backbone, args.layer, HeadConfig.aligned())
    module = fit_model.inference_module()
    trunk, _ = truncate_backbone(backbone, args.layer, fit_model.backbone_spec)
    trunk.eval()
    early_trunk, _ = truncate_backbone(backbone, args.early_layer, fit_model.backbone_spec)
    early_trunk.eval()
    stream = setup.stream(args.batches)
    checkpoints = tempfile.mkdtemp(prefix="dmm_wrap-bench-")
    runs: dict[str, Callable[[], float | tuple[float, float]]] = {
        "backbone_full": lambda: setup.forward(backbone, stream, torch.no_grad),
        "fit": lambda: setup.fit(fit_model, stream),
        "fit_checkpoint_every_step": lambda: setup.fit(fit_model, stream, checkpoint_every=1,
                                                       checkpoint_dir=tempfile.mkdtemp(dir=checkpoints)),
        "fit_early": lambda: setup.fit(early_model, stream),
        "fit_default_stats": lambda: setup.fit(fit_model, stream, stats_batches=DEFAULT_STATS_BATCHES),
        "fit_early_default_stats": lambda: setup.fit(early_model, stream, stats_batches=DEFAULT_STATS_BATCHES),
        "fit_aligned": lambda: setup.fit(aligned_model, stream, stats_batches=DEFAULT_STATS_BATCHES, **ALIGNED_FIT),
        "trunk": lambda: setup.forward(trunk, stream, torch.inference_mode),
        "trunk_early": lambda: setup.forward(early_trunk, stream, torch.no_grad),
        "encoder_forward": lambda: setup.forward(fit_model, stream, torch.inference_mode),
        "inference_module": lambda: setup.forward(module, stream, torch.inference_mode),
    }
    times: dict[str, list[float]] = {}
    try:
        for run in runs.values():  # warm-up: allocator, oneDNN primitive caches, lazy CUDA init
            run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                out = run()
                if isinstance(out, tuple):
                    times.setdefault(name, []).append(out[0])
                    times.setdefault(name + "_call", []).append(out[1])
                else:
                    times.setdefault(name, []).append(out)
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return times


def head_step_breakdown(setup: Setup, layer: str, rounds: int = 5) -> dict[str, float]:
    """Milliseconds per batch of each part of a training step at `layer`, on one fixed batch (medians).

    Mirrors `dmm_wrap.train.loop.Trainer.step` (FitConfig defaults: 3 estimator steps, one h_theta step, loss
    recording every step) so the fit overhead can be attributed; it is not used by the ratios.
    """
    cfg = FitConfig()
    model = setup.encoder(setup.backbone(), layer)
    heads = model.heads
    assert heads is not None
    heads.train()
    x, b = next(iter(setup.stream(1)))
    x, b = x.to(setup.device), b.to(setup.device)
    opt_h = torch.optim.Adam(heads.h.parameters(), lr=cfg.lr, foreach=True)
    opt_est = torch.optim.Adam(heads.estimator_parameters(), lr=cfg.estimator_lr, foreach=True)
    parts: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        setup.sync()
        t1 = setup.now()
        parts.setdefault(name, []).append(1000 * (t1 - t0))
        return t1

    for _ in range(rounds + 1):
        setup.sync()
        t = setup.now()
        with torch.no_grad():
            z = model.extractor(x).float()
        t = tick("backbone to layer", t)
        z_std = heads.normalize(z)
        z_tilde = heads.h(z_std)
        t = tick("h_theta forward", t)
        for _ in range(cfg.estimator_steps):
            est = heads.estimator_losses(z_std, z_tilde, b, cfg.nll_reduction)
            opt_est.zero_grad(set_to_none=True)
            (est.q_nll + est.m_nll).backward()
            opt_est.step()
        t = tick(f"{cfg.estimator_steps} estimator steps (q, m_phi)", t)
        losses = heads.theta_losses(z_std, z_tilde, b, cfg.lam, cfg.nll_reduction)
        opt_h.zero_grad(set_to_none=True)
        losses.total.backward(inputs=list(heads.h.parameters()))
        torch.nn.utils.clip_grad_norm_(heads.h.parameters(), cfg.grad_clip, foreach=True)
        opt_h.step()
        t = tick("h_theta step", t)
        torch.stack([losses.total, losses.debias, losses.retain, est.q_nll]).tolist()
        tick("loss recording", t)
    return {name: statistics.median(v[1:]) for name, v in parts.items()}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_in_use() -> int:
    """Bytes this process has allocated and not freed (glibc mallinfo2: heap plus mmapped blocks).

    Unlike the RSS it counts only live allocations, not the ~1 GB of libraries and freed-but-kept pages, so a cache
    of a few MB moves it by as much. Falls back to the resident set size where glibc's mallinfo2 is missing.
    """
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def memory_child(setup: Setup, batches: int, cache_features: bool = False) -> dict[str, float]:
    """Memory one fit over `batches` batches holds above its start (see ratio 3); run in a fresh process.

    `cache_features`: the negative control, a fit whose feature extractor keeps every feature it returns.
    """
    model = setup.encoder(setup.backbone(), setup.args.layer)
    stream = setup.stream(batches)
    stream.batch_size = setup.args.memory_batch_size
    cache: list[Tensor] = []
    if cache_features:
        extract = model.extractor.forward

        def caching(x: Tensor) -> Tensor:
            z = extract(x)
            cache.append(z)
            return z

        model.extractor.forward = caching
    cuda = setup.device.type == "cuda"
    in_use = torch.cuda.memory_allocated if cuda else heap_in_use
    gc.collect()
    setup.sync()
    base = in_use()
    samples = [base]
    stream.probe = lambda: samples.append(in_use())
    setup.fit(model, stream)
    setup.sync()
    samples.append(in_use())
    peak = max(samples)
    return {"base_mb": base / 2**20, "peak_mb": peak / 2**20, "held_mb": (peak - base) / 2**20,
            "cached_batches": len(cache)}


def measure_memory(argv: list[str], batches: int, cache_features: bool = False) -> dict[str, float]:
    """`memory_child` in a fresh subprocess, so that each measurement starts from the same state."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-child", str(batches)]
    if cache_features:
        cmd.append("--memory-cache-features")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); for tests, not for numbers")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", default="resnet18", help="torchvision architecture name")
    p.add_argument("--batches", type=int, default=None, help="N, batches per timed pass (default 6; smoke 2)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128; smoke 4")
    p.add_argument("--image-size", type=int, default=None, help="default 96; smoke 32")
    p.add_argument("--layer", default="avgpool", help="hooked layer of ratios 1, 3 and 4")
    p.add_argument("--early-layer", default="layer3", help="hooked layer of ratio 2")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 3; smoke 1)")
    p.add_argument("--memory-batches", type=int, default=None,
                   help="length of the 1x stream of ratio 3; the long one is 10x (default 3; smoke 2)")
    p.add_argument("--memory-batch-size", type=int, default=None,
                   help="batch size of the streams of ratio 3 (default: --batch-size; smoke 128), large enough that "
                        "a cache of the stream's features is visible next to the heads' own memory")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (time.process_time), steadier on a machine "
                        "shared with other jobs. Use cpu with OMP_NUM_THREADS=1 (threads waiting at a barrier "
                        "spin), and on CPU only")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-cache-features", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = ({"batches": 2, "batch_size": 4, "image_size": 32, "repeats": 1, "memory_batches": 2,
                 "memory_batch_size": 128} if args.smoke
                else {"batches": 6, "batch_size": 128, "image_size": 96, "repeats": 3, "memory_batches": 3})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory_batch_size is None:
        args.memory_batch_size = args.batch_size
    return args


def ratio_rows(times: dict[str, list[float]], mem: dict[int, dict[str, float]], args: argparse.Namespace,
               mem_control: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    med = {k: statistics.median(v) for k, v in times.items()}
    short, long = mem[args.memory_batches], mem[10 * args.memory_batches]
    short_c, long_c = mem_control[args.memory_batches], mem_control[10 * args.memory_batches]
    rows = [
        ("fit_overhead", f"fit @{args.layer} from its first batch read / backbone forward (no_grad)", med["fit"],
         med["backbone_full"]),
        ("early_exit", f"fit @{args.early_layer} from its first batch read / full backbone forward", med["fit_early"],
         med["backbone_full"]),
        ("fit_call_default_stats", f"whole fit call @{args.layer}, stats_batches={DEFAULT_STATS_BATCHES} / backbone "
         "forward", med["fit_default_stats_call"], med["backbone_full"]),
        ("early_exit_call_default_stats", f"whole fit call @{args.early_layer}, stats_batches={DEFAULT_STATS_BATCHES}"
         " / full backbone forward", med["fit_early_default_stats_call"], med["backbone_full"]),
        ("fit_call_aligned", f"whole fit call @{args.layer} with FitConfig.aligned() / HeadConfig.aligned() "
         "(alignment target fitted on the pre-pass sample; no refit within N < align_every steps) / backbone forward",
         med["fit_aligned_call"], med["backbone_full"]),
        ("stream_memory", f"memory held above the start of fit, {10 * args.memory_batches} / {args.memory_batches} "
         "batches", long["held_mb"], short["held_mb"]),
        ("stream_memory_control", "the same with every feature cached (negative control: must be flagged)",
         long_c["held_mb"], short_c["held_mb"]),
        ("inference_overhead", f"DebiasedEncoder(x) / backbone truncated @{args.layer}", med["encoder_forward"],
         med["trunk"]),
        ("inference_module_overhead", f"inference_module()(x) / backbone truncated @{args.layer}",
         med["inference_module"], med["trunk"]),
        ("early_exit_vs_trunk", f"fit @{args.early_layer} from its first batch read / backbone truncated "
         f"@{args.early_layer}", med["fit_early"], med["trunk_early"]),
        ("fit_call_overhead", f"whole fit call @{args.layer}, stats_batches=1 / backbone forward", med["fit_call"],
         med["backbone_full"]),
        ("checkpoint_every_step", f"fit @{args.layer} writing a checkpoint after every step / fit without",
         med["fit_checkpoint_every_step"], med["fit"]),
    ]
    out = []
    for key, what, num, den in rows:
        value = num / den
        op, target = TARGETS.get(key, (None, None))
        met = None if op is None else {"<=": value <= target, "<": value < target, ">": value > target}[op]
        unit = "MB" if key.startswith("stream_memory") else "s"
        out.append({"name": key, "what": what, "ratio": value, "numerator": num, "denominator": den, "unit": unit,
                    "target": None if op is None else f"{op} {target}", "met": met})
    return out


def _without_json(argv: list[str]) -> list[str]:
    """`argv` less its --json option, for the memory subprocesses."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch.")
    if args.device == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time, which misses the GPU's work; use --clock wall on cuda.")
    torch.manual_seed(0)
    setup = Setup(args, torch.device(args.device))
    if args.memory_child is not None:
        print(json.dumps(memory_child(setup, args.memory_child, args.memory_cache_features)))
        return {}
    parent_argv = _without_json(argv)
    started = time.perf_counter()
    times = measure_times(setup)
    breakdown = {layer: head_step_breakdown(setup, layer) for layer in (args.layer, args.early_layer)}
    lengths = (args.memory_batches, 10 * args.memory_batches)
    mem = {n: measure_memory(parent_argv, n) for n in lengths}
    mem_control = {n: measure_memory(parent_argv, n, cache_features=True) for n in lengths}
    rows = ratio_rows(times, mem, args, mem_control)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv == sys.argv[1:] else shlex.join(["bench.py", *argv]),
        "machine": machine(setup.device),
        "settings": {k: v for k, v in vars(args).items()
                     if k not in ("json", "memory_child", "memory_cache_features")},
        "ratios": {r["name"]: r["ratio"] for r in rows},
        "rows": rows,
        "times_s": times,
        "memory_mb": {str(k): v for k, v in mem.items()},
        "memory_control_mb": {str(k): v for k, v in mem_control.items()},
        "step_breakdown_ms": breakdown,
        "bench_seconds": time.perf_counter() - started,
    }
    print_report(result)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"date:     {result['date']}")
    print(f"command:  {result['command']}")
    print(f"machine:  {m['platform']} | python {m['python']} | torch {m['torch']} | {m['threads']} threads | "
          f"CPU {m['cpu']} ({m['cpu_count']} cores)" + (f" | GPU {m['gpu']}" if "gpu" in m else ""))
    s = result["settings"]
    print(f"settings: {s['arch']} {s['image_size']}x{s['image_size']} batch {s['batch_size']} on {s['device']}, "
          f"N={s['batches']} batches, {s['repeats']} interleaved repeats (medians), {s['clock']} clock, memory streams "
          f"{s['memory_batches']} vs {10 * s['memory_batches']} batches of {s['memory_batch_size']}")
    print()
    print(f"{'ratio':<29} {'value':>7}  {'target':>7}  {'met':>4}  {'numerator':>11}  {'denominator':>11}  what")
    for r in result["rows"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        value = f"{r['ratio']:.3f}" if math.isfinite(r["ratio"]) else str(r["ratio"])
        print(f"{r['name']:<29} {value:>7}  {r['target'] or '-':>7}  {met:>4}  "
              f"{r['numerator']:>9.3f}{r['unit']:>2}  {r['denominator']:>9.3f}{r['unit']:>2}  {r['what']}")
    print("\nrepeat spread (max - min) / median:", ", ".join(
        f"{k} {(max(v) - min(v)) / statistics.median(v):.1%}" for k, v in result["times_s"].items()))
    print("\nper-batch cost of one training step, one fixed batch (ms, medians):")
    for layer, parts in result["step_breakdown_ms"].items():
        print(f"  @{layer}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in parts.items()))
    for label, key in (("memory", "memory_mb"), ("memory, features cached", "memory_control_mb")):
        print(f"\n{label} (MB in use): " + ", ".join(
            f"{n} batches: before fit {v['base_mb']:.1f}, peak {v['peak_mb']:.1f}, held {v['held_mb']:.2f}"
            for n, v in result[key].items()))
    print(f"\n(benchmark took {result['bench_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
