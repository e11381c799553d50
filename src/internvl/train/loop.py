"""The training loop shared by fine-tuning, training from scratch and preference optimization.

One optimizer step: take the step's micro-batches, all-reduce their normalizer mass (one small collective,
which also carries a stop request), run forward/backward on each micro-batch with loss = objective sum x
world size / global mass (FSDP averages gradients over ranks), clip, AdamW step with the scheduled rate.
Two ranks with the same global batch therefore compute the same loss and gradients as one.

Host synchronization happens only at that all-reduce and when metrics are logged. SIGINT / SIGTERM stop the
run after the current step with a checkpoint; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .collate import Batch
from .dist import DistContext, is_sharded, set_gradient_sync
from .metrics import MetricsLog
from .objective import Objective
from .optim import lr_factor


@dataclass
class LoopConfig:
    total_steps: int
    warmup_steps: int
    lr: float
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    log_every: int = 10
    save_every: int = 0
    stop_after: int = 0  # end the run after this step (a checkpoint is written), the schedule unchanged
    compute_dtype: torch.dtype = torch.float32


@dataclass
class LoopResult:
    step: int
    interrupted: bool = False
    paused: bool = False  # ended at LoopConfig.stop_after, before the last step
    last_loss: float | None = None
    history: list[dict] = field(default_factory=list)


# (micro-batches of the step, data position after the step, epoch) from a data position (None: the start)
BatchSource = Callable[[dict | None], Iterator[tuple[list[Batch], dict, float]]]


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
                 source: BatchSource, ctx: DistContext, config: LoopConfig, metrics: MetricsLog,
                 save: Callable[[int, dict], None] | None = None):  # fmt: skip
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.source, self.ctx, self.cfg, self.metrics, self.save = source, ctx, config, metrics, save
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._stop = False
        self._signals = 0

    # ---- signals -----------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._signals += 1
        if self._signals > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop = True

    @contextlib.contextmanager
    def _handle_signals(self):
        old = {}
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: no handlers
            pass
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def request_stop(self) -> None:
        self._stop = True

    # ---- loop --------------------------------------------------------------------------------------

    def _autocast(self):
        if self.cfg.compute_dtype != torch.float32 and not is_sharded(self.model):
            return torch.autocast(self.ctx.device.type, dtype=self.cfg.compute_dtype)
        return contextlib.nullcontext()

    def fit(self, start_step: int = 0, data_state: dict | None = None) -> LoopResult:
        from tqdm import tqdm

        cfg, ctx, dev = self.cfg, self.ctx, self.ctx.device
        self.model.train()
        result = LoopResult(step=start_step)
        bar = tqdm(total=cfg.total_steps, initial=start_step, disable=not ctx.is_main, unit="step",
                   dynamic_ncols=True, desc="train")  # fmt: skip
        window = _Window(dev)
        step, saved_at = start_step, start_step
        batches = self.source(data_state)
        with self._handle_signals():
            while step < cfg.total_steps:
                if (
                    cfg.stop_after and step >= cfg.stop_after
                ):  # also when resumed at or past it: nothing to do
                    result.paused = True
                    break
                micro, next_state, epoch = next(batches)
                mass = sum(self.objective.normalizer(b) for b in micro)
                flags = ctx.all_reduce(torch.tensor([mass, float(self._stop)], dtype=torch.float64))
                if flags[1] > 0:
                    result.interrupted = True
                    break
                lr = cfg.lr * lr_factor(step, cfg.total_steps, cfg.warmup_steps, cfg.scheduler)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                total_mass = float(flags[0])
                if total_mass > 0:
                    grad_norm = self._step(micro, total_mass, window)
                    window.grad_norm = grad_norm
                self.optimizer.zero_grad(set_to_none=True)
                window.add_step(micro, lr, epoch)
                step += 1
                data_state = next_state
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    row = window.flush(step, ctx)
                    result.history.append(row)
                    result.last_loss = row["loss"]
                    self.metrics.log(row)
                    extra = {k.split("/")[-1]: f"{row[k]:.3g}" for k in getattr(self.objective, "bar_metrics", ())
                             if row.get(k) is not None}  # fmt: skip
                    bar.set_postfix(
                        loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}", **extra
                    )
                if self.save and cfg.save_every and (step % cfg.save_every == 0 or step == cfg.total_steps):
                    self.save(step, data_state)
                    saved_at = step
        batches.close()  # stops the loader workers
        if (
            (result.interrupted or result.paused) and self.save and saved_at != step
        ):  # a stop leaves a checkpoint
            self.save(step, data_state)
        bar.close()
        result.step = step
        return result

    def _step(self, micro: list[Batch], total_mass: float, window: _Window) -> torch.Tensor:
        scale = self.ctx.world_size / total_mass
        last = len(micro) - 1
        for k, batch in enumerate(micro):
            set_gradient_sync(self.model, k == last)
            batch = batch.to(self.ctx.device)
            with self._autocast():
                out = self.objective(self.model, batch)
            (out.loss_sum * scale).backward()
            window.add_micro(out, total_mass)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        return norm


class _Window:
    """Metrics accumulated on the device between two logged steps (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()
        self.start = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.extra: dict[str, list] = {}
        self.steps = 0
        self.tokens = 0
        self.samples = 0
        self.grad_norm = None
        self.lr = 0.0
        self.epoch = 0.0

    def add_micro(self, out, total_mass: float) -> None:
        self.loss += out.loss_sum.detach().double() / total_mass
        for k, (s, n) in out.metrics.items():
            acc = self.extra.setdefault(k, [torch.zeros((), dtype=torch.float64, device=self.device), 0.0])
            acc[0] += s.detach().double()
            acc[1] += n

    def add_step(self, micro: list[Batch], lr: float, epoch: float) -> None:
        self.steps += 1
        self.tokens += sum(b.num_tokens for b in micro)
        self.samples += sum(b.num_samples for b in micro)
        self.lr, self.epoch = lr, epoch

    def flush(self, step: int, ctx: DistContext) -> dict:
        names = sorted(self.extra)
        vec = torch.stack(
            [
                self.loss,
                torch.tensor(float(self.tokens), dtype=torch.float64, device=self.device),
                torch.tensor(float(self.samples), dtype=torch.float64, device=self.device),
            ]
            + [self.extra[k][0] for k in names]
            + [torch.tensor(self.extra[k][1], dtype=torch.float64, device=self.device) for k in names]
        )
        vec = ctx.all_reduce(vec).cpu().tolist()
        now = time.perf_counter()
        elapsed = max(now - self.t0, 1e-9)
        row = {"step": step, "epoch": round(self.epoch, 4), "loss": vec[0] / max(self.steps, 1), "lr": self.lr,
               "tokens": vec[1], "tokens_per_s": vec[1] / elapsed, "samples": vec[2],
               "elapsed_s": now - self.start}  # fmt: skip
        for i, k in enumerate(names):
            count = vec[3 + len(names) + i]
            row[k] = vec[3 + i] / count if count else None
        if self.grad_norm is not None:
            g = self.grad_norm
            row["grad_norm"] = float(g.full_tensor() if hasattr(g, "full_tensor") else g)
        self.t0 = now
        self._reset()
        return row
