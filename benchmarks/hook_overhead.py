"""Host overhead of the training hook: µs per step, step-time ratio, and (``--cuda``) device syncs.

Three measurements, each with and without the hook in the same process, alternating blocks so drift
(other work on the machine, CPU frequency) hits both sides alike; figures are medians:

1. micro: a tiny step (one in-place add on a small tensor) repeated many times, so the hook's own
   cost (``with mon.step(samples=...)`` + ``mon.observe_loss(...)``) is visible. The sender thread runs
   and pushes to a loopback receiver meanwhile, as in a real job.
2. workload: the sample workload (``workload.train``, CPU) alternately with and without the hook;
   step-time ratio = median seconds per step with / without.
3. ``--cuda``: the micro loop on the GPU with a CUDA loss tensor under
   ``torch.cuda.set_sync_debug_mode("error")``, plus the sender's payload build (allocator stats, OOM
   observer) on the training thread: any synchronising call the hook makes raises and fails the run.

    python benchmarks/hook_overhead.py [--blocks 60 --block-steps 2000 --workload-rounds 20] [--cuda]

Prints figures; exits 1 only when ``--cuda`` caught a synchronisation (or CUDA is missing).
Targets (issue 3): <= 10 µs per step, <= 0.5 % step time, zero syncs.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make exporter/ and workload/ importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import exporter.hook as gpu_hook  # noqa: E402


class _Sink(BaseHTTPRequestHandler):
    """Accepts the hook's pushes (202) and discards them: a stand-in for the exporter."""

    pushes = 0  # counted from the server's threads; read for the report only

    def do_POST(self) -> None:
        _Sink.pushes += 1
        self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_sink() -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sink", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def micro(blocks: int, block_steps: int, url: str, device: str, push_interval: float) -> dict[str, float]:
    """Median µs per tiny step without / with the hook (alternating blocks in one process)."""
    x = torch.zeros(16, device=device)
    loss = x.sum()  # a 0-d tensor, as a loop passes it: on CPU the hook reads it every step
    mon = gpu_hook.start(job="hook-overhead", url=url, interval=push_interval, loss_every=10)
    pushes_before = _Sink.pushes

    def plain() -> None:
        for _ in range(block_steps):
            x.add_(1.0)

    def hooked() -> None:
        step = mon.step
        observe = mon.observe_loss
        for _ in range(block_steps):
            with step(samples=8):
                x.add_(1.0)
            observe(loss)

    runs: dict[str, list[float]] = {"without": [], "with": []}
    pairs: list[float] = []
    for i in range(blocks + 2):
        order: list[tuple[str, Callable[[], None]]] = [("without", plain), ("with", hooked)]
        if i % 2:
            order.reverse()
        per: dict[str, float] = {}
        for name, body in order:
            t0 = time.perf_counter()
            body()
            if device == "cuda":
                torch.cuda.synchronize()  # outside the hook; both sides pay it alike
            per[name] = (time.perf_counter() - t0) / block_steps * 1e6
        if i >= 2:  # the first pairs warm up caches and the allocator
            for name in runs:
                runs[name].append(per[name])
            pairs.append(per["with"] - per["without"])
    steps_recorded = mon.steps
    gpu_hook.stop(flush=True)
    return {
        "without_us": statistics.median(runs["without"]),
        "with_us": statistics.median(runs["with"]),
        "overhead_us": statistics.median(pairs),
        "overhead_p90_us": statistics.quantiles(pairs, n=10)[-1] if len(pairs) >= 10 else max(pairs),
        "steps_recorded": float(steps_recorded),
        "pushes": float(_Sink.pushes - pushes_before),
    }


def workload(rounds: int, steps: int, url: str, push_interval: float) -> dict[str, float]:
    """Median seconds per step of the sample workload (CPU) without / with the hook, alternating."""
    from workload.train import build_parser, train

    base = ["--device", "cpu", "--log-every", "0", "--steps", str(steps), "--exporter-url", url]
    base += ["--push-interval", str(push_interval)]
    per_step: dict[str, list[float]] = {"without": [], "with": []}
    ratios: list[float] = []
    train(build_parser().parse_args([*base, "--steps", "20", "--no-hook"]), 0, 1)  # warm-up
    for i in range(rounds):
        order = ["without", "with"] if i % 2 == 0 else ["with", "without"]
        got: dict[str, float] = {}
        for name in order:
            args = build_parser().parse_args(base + (["--no-hook"] if name == "without" else []))
            result = train(args, 0, 1)
            got[name] = result.seconds / max(1, result.steps)
            per_step[name].append(got[name])
        ratios.append(got["with"] / got["without"])
    return {
        "without_ms": statistics.median(per_step["without"]) * 1e3,
        "with_ms": statistics.median(per_step["with"]) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_best": min(per_step["with"]) / min(per_step["without"]),  # least disturbed run each side
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def cuda_sync_check(steps: int, url: str) -> str | None:
    """Run the hooked loop on CUDA under sync debug mode "error"; None if no sync, else the error."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    x = torch.zeros(1 << 20, device="cuda")
    mon = gpu_hook.start(job="hook-sync-check", url=url, interval=0.05, loss_every=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(steps):
            with mon.step(samples=8):
                x.mul_(1.0001)
                loss = x.mean()
            mon.observe_loss(loss)  # CUDA tensor: async copy + event, never .item() on the device
            if i % 50 == 0:
                mon.build_payload()  # what the sender does, here on the training thread under "error"
    except RuntimeError as exc:
        return f"synchronising call on the training thread: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    payload = mon.build_payload()
    gpu_hook.stop(flush=True)
    if mon.loss is None:
        return "the hook never read the CUDA loss (async sampler produced nothing)"
    print(
        f"cuda: {steps} hooked steps under set_sync_debug_mode('error'): no synchronisation; "
        f"loss sampled {mon.loss:.6g}; allocator stats pushed: "
        f"{sorted(k for k in payload['gauges'] if k.startswith('cuda_memory'))}"
    )
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=60, help="alternating micro blocks per side")
    p.add_argument("--block-steps", type=int, default=2000, help="tiny steps per micro block")
    p.add_argument("--workload-rounds", type=int, default=20, help="alternating workload runs per side")
    p.add_argument("--workload-steps", type=int, default=200, help="steps per workload run")
    p.add_argument("--push-interval", type=float, default=1.0, help="hook push period (the default is 1 s)")
    p.add_argument("--cuda", action="store_true", help="also run the micro loop on CUDA and check for syncs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier figures)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    server, url = start_sink()

    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, push interval {args.push_interval}s")
    m = micro(args.blocks, args.block_steps, url, "cpu", args.push_interval)
    print(
        f"micro (CPU, {args.blocks} blocks x {args.block_steps} steps per side): "
        f"without {m['without_us']:.2f} µs/step, with hook {m['with_us']:.2f} µs/step, "
        f"overhead median {m['overhead_us']:.2f} µs/step (p90 of blocks {m['overhead_p90_us']:.2f}); "
        f"{int(m['steps_recorded'])} steps recorded, {int(m['pushes'])} pushes delivered"
    )
    w = workload(args.workload_rounds, args.workload_steps, url, args.push_interval)
    print(
        f"workload (sample multi-task model, CPU, {args.workload_rounds} runs x {args.workload_steps} steps "
        f"per side): without {w['without_ms']:.3f} ms/step, with hook {w['with_ms']:.3f} ms/step, "
        f"ratio median {w['ratio']:.4f} (pairs {w['ratio_min']:.4f}..{w['ratio_max']:.4f}; "
        f"best run / best run {w['ratio_best']:.4f}); "
        f"micro overhead / step time = {m['overhead_us'] / (w['without_ms'] * 1e3) * 100:.4f} %"
    )
    status = 0
    if args.cuda:
        error = cuda_sync_check(2000, url)
        if error is not None:
            print(f"cuda: FAILED: {error}")
            status = 1
    server.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
