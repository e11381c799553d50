"""Mixed Preference Optimization (MPO, arXiv 2411.10442): the reference model, the objective, a run (`train_mpo`).

    loss = w1 * DPO sigmoid + w2 * BCO pair + w3 * NLL on the chosen answers     (0.8 / 0.2 / 1.0, beta 0.1)

as the reference `MultimodalDPOTrainer` (TRL <= 0.28 `dpo_loss`, `RunningMoments`, `rpo_alpha`; TRL's "sft" loss
type since). As in TRL, each micro-batch's loss is the mean of its pair losses plus one cross-entropy over all its
chosen answer tokens (a token mean, so a long answer counts more than a short one), and every micro-batch of a
step weighs the same (the trainer divides by the accumulation steps, DDP averages the ranks). A row
`{image | video?, question, chosen, rejected}` gives two one-turn conversations built like fine-tuning rows
(`<image>\\n` prepended when missing); a micro-batch holds the chosen rows then the rejected rows, so one forward
covers both, images repeated. Log-probabilities are sums over the answer tokens. The reference model is a frozen
copy of the policy taken before training, or under LoRA the same model with its adapters disabled (and frozen
copies of the modules LoRA runs train in full). The BCO reward shift delta is resumable state: it rides in the
data position that every checkpoint stores.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError
from ..train.collate import Batch
from ..train.objective import Objective, ObjectiveOutput
from .data import pair_data
from .losses import MPOArgs, RunningMean, bco_pair_loss, nll_loss, sigmoid_loss


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the label tokens' log-probabilities per row [rows], the logits)."""
    out = model(batch.input_ids, pixel_values=batch.pixel_values, positions=batch.positions,
                image_flags=batch.image_flags, seq_ids=batch.seq_ids)  # fmt: skip
    logits = out.logits.flatten(0, 1).index_select(0, batch.sup_index).float()
    targets = batch.targets.flatten().index_select(0, batch.sup_index)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    sums = token_logps.new_zeros(batch.num_samples).index_add(0, batch.sup_sample, token_logps)
    return sums, out.logits


class FrozenReference:
    """A frozen copy of the policy as it is now (frozen parameters are shared, not copied)."""

    def __init__(self, model: nn.Module):
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=shared).eval().requires_grad_(False)
        self.model.set_gradient_checkpointing(False)

    def shard_like(self, policy: nn.Module, dtype: torch.dtype | None) -> None:
        from ..train.dist import is_sharded, shard_model

        if is_sharded(policy):
            shard_model(self.model, dtype)

    @torch.no_grad()
    def logps(self, policy: nn.Module, batch: Batch) -> torch.Tensor:
        return sequence_logps(self.model, batch)[0]


class AdapterReference:
    """LoRA runs: the policy itself with its adapters disabled (what peft's `disable_adapter()` does), in eval
    mode, with frozen copies of the modules trained in full alongside LoRA swapped in."""

    def __init__(self, model: nn.Module, full_modules: list[str]):
        self.frozen = {name: copy.deepcopy(model.get_submodule(name)).eval().requires_grad_(False)
                       for name in full_modules}  # fmt: skip

    def shard_like(self, policy: nn.Module, dtype: torch.dtype | None) -> None:
        pass

    @contextlib.contextmanager
    def _disabled(self, model: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        grads = {p: p.requires_grad for p in model.parameters()}
        originals = {name: model.get_submodule(name) for name in self.frozen}
        training = model.training
        try:
            for layer in layers:
                layer.enable_adapters(False)
            for name, module in self.frozen.items():
                _set_submodule(model, name, module)
            model.eval()
            yield model
        finally:
            model.train(training)
            for name, module in originals.items():
                _set_submodule(model, name, module)
            for layer in layers:
                layer.enable_adapters(True)
            for p, g in grads.items():
                p.requires_grad_(g)

    @torch.no_grad()
    def logps(self, policy: nn.Module, batch: Batch) -> torch.Tensor:
        with self._disabled(policy) as model:
            return sequence_logps(model, batch)[0]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class MPOObjective(Objective):
    """w1 * mean DPO sigmoid + w2 * mean BCO pair + w3 * NLL token mean, per micro-batch; a micro-batch with pairs
    has normalizer mass 1, so the loop averages the micro-batches of a step as TRL does. `attach` (before
    sharding) sets up the reference model."""

    name = "mpo"
    bar_metrics = ("rewards/accuracies", "rewards/margins")

    def __init__(self, args: MPOArgs | None = None):
        self.args = args or MPOArgs()
        self.reference = None
        self.running = RunningMean()
        self._position: dict | None = None
        self._left = 0
        self._host = self._state()

    def attach(self, prepared) -> None:
        """Build the reference from the prepared (not yet sharded) model."""
        if prepared.tune.uses_lora:
            self.reference = AdapterReference(prepared.model, prepared.modules_to_save)
        else:
            self.reference = FrozenReference(prepared.model)
        self._dtype = prepared.compute_dtype if prepared.compute_dtype != torch.float32 else None

    def setup(self, model: nn.Module, device: torch.device) -> None:
        if self.reference is None:
            raise TrainingError("MPOObjective.attach(prepared) must run before training (train_mpo does it)")
        self.reference.shard_like(model, self._dtype)

    def normalizer(self, batch: Batch) -> float:
        return 1.0 if batch.num_samples // 2 else 0.0

    # -- the resumable state: delta (and the settings it depends on) -----------------------------------

    def _state(self) -> dict:
        return {**self.running.state(), "beta": self.args.beta, "loss_weights": list(self.args.loss_weights)}

    def load_state(self, state: dict) -> None:
        for key in ("beta", "loss_weights"):
            now = self._host[key]
            if key in state and state[key] != now:
                raise TrainingError(f"cannot resume: {key} was {state[key]!r}, now {now!r}")
        self.running = RunningMean(float(state["mean"]), float(state["count"]))
        self._host = self._state()

    def track(self, position: dict, micro_steps: int) -> None:
        """The data position of the step about to run: it gets delta as of the end of that step."""
        position["mpo"] = dict(self._host)
        self._position, self._left = position, micro_steps

    def _step_done(self) -> None:
        self._left -= 1
        if self._left == 0 and self._position is not None:
            self._host = self._state()  # one host sync per optimizer step
            self._position["mpo"] = dict(self._host)

    # -- the loss ---------------------------------------------------------------------------------------

    def _update_delta(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
        """delta after adding this micro-batch's mean reward (one value per rank, gathered as TRL does)."""
        n = chosen_rewards.numel()
        rewards = torch.cat([chosen_rewards, rejected_rewards]).double()
        stat = torch.stack([rewards.mean() if n else rewards.new_zeros(()), rewards.new_tensor(float(n > 0))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stat)
        if not isinstance(self.running.mean, torch.Tensor):
            self.running = RunningMean(
                stat.new_tensor(self.running.mean), stat.new_tensor(self.running.count)
            )
        return self.running.update(stat[0], stat[1])

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        beta, (w_dpo, w_bco, w_nll) = self.args.beta, self.args.loss_weights
        n = batch.num_samples // 2
        ref = self.reference.logps(model, batch)
        policy, logits = sequence_logps(model, batch)
        tokens = torch.tensor(batch.sample_tokens[:n], dtype=torch.float32).to(
            policy.device, non_blocking=True
        )
        pc, pr, rc, rr = policy[:n], policy[n:], ref[:n], ref[n:]
        chosen_rewards, rejected_rewards = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        delta = self._update_delta(chosen_rewards, rejected_rewards)
        dpo = sigmoid_loss(pc, pr, rc, rr, beta)
        bco = bco_pair_loss(pc, pr, rc, rr, beta, delta.to(pc.dtype))
        nll = nll_loss(pc, tokens)
        if n == 0:  # an empty micro-batch: keep every parameter in the graph with a zero loss
            loss_sum = logits.sum() * 0.0
        else:
            loss_sum = w_dpo * dpo.mean() + w_bco * bco.mean() + w_nll * nll
        self._step_done()
        d = lambda x: x.detach().sum()
        metrics = {
            "rewards/chosen": d(chosen_rewards), "rewards/rejected": d(rejected_rewards),
            "rewards/accuracies": d((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": d(chosen_rewards - rejected_rewards), "rewards/delta": d(delta * n),
            "logps/chosen": d(pc), "logps/rejected": d(pr),
            "loss/sigmoid": d(dpo), "loss/bco_pair": d(bco),
        }  # fmt: skip
        out = {k: (v, float(n)) for k, v in metrics.items()}
        out["nll_loss"] = (d(-pc), float(sum(batch.sample_tokens[:n])))  # a token mean over the logged steps
        return ObjectiveOutput(loss_sum, out)


def train_mpo(args, mpo: MPOArgs | None = None, log=print):
    """An MPO run: `train(args)` with the pair data and the MPO objective (same loop, checkpoints, resume,
    distribution and final model as fine-tuning)."""
    from ..train.run import train

    if args.data.packing:
        raise TrainingError("MPO trains on padded pairs: --packing is not supported")
    objective = MPOObjective(mpo)

    def data(run_args, prepared, ctx):
        objective.attach(prepared)
        return pair_data(run_args, prepared, ctx, objective)

    return train(args, objective, data, log)
