"""The Lightning and Hugging Face Trainer callbacks in real (CPU) training runs of those frameworks.

Each run's hook pushes over loopback HTTP to a receiver that feeds the exporter's own ingest code
(parse_body -> IngestStore -> TrainingCollector), so what is checked is what /metrics would show.
Skipped where the framework is not installed (the `test` extra installs both).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from torch import nn
from torch.nn import functional as F

import exporter.hook as gpu_hook
from exporter.collectors.training import TrainingCollector
from exporter.ingest.store import IngestStore
from exporter.ingest.validate import IngestError, parse_body
from harness.support import parse_metrics

pytestmark = pytest.mark.slow


class IngestReceiver:
    """Loopback HTTP server running the exporter's ingest validation and store."""

    def __init__(self) -> None:
        self.store = IngestStore()
        store = self.store

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    store.submit(parse_body(body))
                    status = 202
                except IngestError as err:
                    status = err.status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        registry = CollectorRegistry()
        registry.register(TrainingCollector(self.store, "test-host"))
        return parse_metrics(generate_latest(registry).decode())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[IngestReceiver]:
    gpu_hook.stop(flush=False)  # another test's monitor must not be reused
    r = IngestReceiver()
    yield r
    gpu_hook.stop(flush=False)
    r.close()


def value(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    found = [v for lab, v in m.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_lightning_callback_reports_steps_samples_loss_and_oom(receiver: IngestReceiver) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from exporter.hook.lightning import GpuExporterCallback

    class Tiny(L.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self, oom_at: int | None = None) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)
            self.oom_at = oom_at

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == self.oom_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. (test)")
            x, y = batch
            return F.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(model: Any, cb: Any) -> None:
        data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8)
        trainer = L.Trainer(
            max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
        )  # fmt: skip
        trainer.fit(model, data)

    cb = GpuExporterCallback(job="lit", url=receiver.url, interval=0.05)
    fit(Tiny(), cb)
    gpu_hook.stop(flush=True)
    m = receiver.metrics()
    who = {"training_job": "lit", "rank": "0", "world_size": "1"}
    assert value(m, "training_info", **who, framework="lightning", device="cpu") == 1
    assert value(m, "training_steps_total", **who) == 12  # two epochs of 8 batches, cut at max_steps
    assert value(m, "training_samples_total", **who) == 12 * 8
    assert 0 < value(m, "training_loss", **who) < 100

    cb2 = GpuExporterCallback(job="lit-oom", url=receiver.url, interval=0.05)
    with pytest.raises(torch.OutOfMemoryError):
        fit(Tiny(oom_at=3), cb2)
    gpu_hook.stop(flush=True)
    m = receiver.metrics()
    assert value(m, "training_steps_total", training_job="lit-oom") == 3
    assert value(m, "training_cuda_oom_total", training_job="lit-oom") == 1
    assert value(m, "training_cuda_oom_last_requested_bytes", training_job="lit-oom") == 2 * (1 << 30)


def test_hf_trainer_callback_reports_steps_samples_and_logged_loss(receiver: IngestReceiver, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from exporter.hook.hf import GpuExporterCallback

    class Regressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            out = self.layer(x)
            return {"loss": F.mse_loss(out, labels), "logits": out}

    data = [{"x": torch.randn(4), "labels": torch.randn(1)} for _ in range(64)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    cb = GpuExporterCallback(job="hf", url=receiver.url, interval=0.05)
    Trainer(model=Regressor(), args=args, train_dataset=data, callbacks=[cb]).train()
    gpu_hook.stop(flush=True)
    m = receiver.metrics()
    who = {"training_job": "hf", "rank": "0", "local_rank": "0", "world_size": "1"}
    assert value(m, "training_info", **who, framework="hf") == 1
    assert value(m, "training_steps_total", **who) == 6  # optimizer steps, accumulation included
    assert value(m, "training_samples_total", **who) == 6 * 4 * 2
    assert 0 < value(m, "training_loss", **who) < 100  # from the Trainer's own log step
