"""MPO: the three losses and the running reward shift against hand computation, and the objective on a tiny model
(zero rewards at step 0, the margin grows with training, LoRA's reference is the base with adapters disabled)."""

from __future__ import annotations

import math

import pytest
import torch
from datafiles import write_pairs
from refmodels import tiny_checkpoint

from internvl.errors import DataError, TrainingError
from internvl.mpo.losses import MPOArgs, RunningMean, bco_pair_loss, nll_loss, sigmoid_loss
from internvl.mpo.objective import MPOObjective, sequence_logps, train_mpo
from internvl.train.args import TrainArgs

FAST = {"num_workers": 0, "threads": 1, "grad_checkpoint": False, "max_seq_length": 256, "tensorboard": False,
        "log_every": 1, "save_every": 0, "seed": 3}  # fmt: skip


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


# ---- losses -------------------------------------------------------------------------------------------

PC, PR, RC, RR = [-12.0, -30.5, -7.25], [-15.0, -29.0, -9.0], [-13.0, -30.0, -8.0], [-14.0, -31.0, -8.5]


def test_sigmoid_and_bco_pair_losses_match_hand_computation():
    beta, delta = 0.1, 0.037
    t = [torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)]
    dpo = sigmoid_loss(*t, beta)
    bco = bco_pair_loss(*t, beta, delta)
    for i, (pc, pr, rc, rr) in enumerate(zip(PC, PR, RC, RR)):
        assert dpo[i].item() == pytest.approx(-log_sigmoid(beta * ((pc - pr) - (rc - rr))), rel=1e-12)
        expected = -log_sigmoid(beta * (pc - rc) - delta) - log_sigmoid(-(beta * (pr - rr) - delta))
        assert bco[i].item() == pytest.approx(expected, rel=1e-12)


def test_nll_is_one_token_mean_over_every_chosen_answer_of_the_micro_batch():
    """TRL's "sft" term: cross-entropy over all chosen tokens at once. Answers of 4 and 1 tokens with log-prob sums
    -12 and -2: (12 + 2) / (4 + 1) = 2.8, where the mean of the per-answer means would be (3 + 2) / 2 = 2.5."""
    logps, tokens = torch.tensor([-12.0, -2.0]), torch.tensor([4.0, 1.0])
    assert nll_loss(logps, tokens).item() == pytest.approx(2.8, rel=1e-7)
    assert nll_loss(torch.tensor([-12.0, -3.0]), tokens).item() == pytest.approx(3.0, rel=1e-7)


def test_running_mean_is_trl_running_moments_mean():
    """delta after each update = the mean of all batch means so far (TRL RunningMoments, count from 1e-24);
    an update from two ranks counts two batch means."""
    r = RunningMean()
    batches = [
        [0.2, -0.1, 0.4, 0.1],
        [0.5, 0.3],
        [-0.6, 0.0, 0.2, 0.2],
    ]  # rewards (chosen and rejected) per batch
    means = []
    for rewards in batches:
        means.append(sum(rewards) / len(rewards))
        assert r.update(means[-1], 1) == pytest.approx(sum(means) / len(means), abs=1e-15)
    assert r.update(0.3 + 0.9, 2) == pytest.approx((sum(means) + 1.2) / 5, abs=1e-15)
    assert r.update(0.0, 0) == pytest.approx((sum(means) + 1.2) / 5, abs=1e-15)  # no contribution: unchanged
    assert RunningMean().update(0.7, 1) == 0.7 + (0.7 - 0.0) * 0  # 0.7 * 1 / (1e-24 + 1) is 0.7 exactly


def test_mpo_total_loss_with_weights_and_delta_sequence():
    """Per pair 0.8 DPO + 0.2 BCO(delta) + 1.0 NLL (answers of 5 tokens each), delta updated before use."""
    beta, w = 0.1, (0.8, 0.2, 1.0)
    running, means = RunningMean(), []
    for step in range(3):
        pc, pr = [x + step for x in PC], [x - step for x in PR]
        rewards = [beta * (a - b) for a, b in zip(pc, RC)] + [beta * (a - b) for a, b in zip(pr, RR)]
        means.append(sum(rewards) / len(rewards))
        delta = running.update(means[-1], 1)
        assert delta == pytest.approx(sum(means) / len(means), abs=1e-15)
        hand = [w[0] * -log_sigmoid(beta * ((a - b) - (c - d)))
                + w[1] * (-log_sigmoid(beta * (a - c) - delta) - log_sigmoid(-(beta * (b - d) - delta)))
                + w[2] * -a / 5 for a, b, c, d in zip(pc, pr, RC, RR)]  # fmt: skip
        t = [torch.tensor(v, dtype=torch.float64) for v in (pc, pr, RC, RR)]
        ours = (w[0] * sigmoid_loss(*t, beta) + w[1] * bco_pair_loss(*t, beta, delta)
                + w[2] * nll_loss(t[0], torch.full((3,), 5.0, dtype=torch.float64)))  # fmt: skip
        # equal lengths: the token mean of the micro-batch is the mean of the per-pair terms
        assert ours.mean().item() == pytest.approx(sum(hand) / 3, rel=1e-12)


def test_mpo_args_are_checked():
    assert MPOArgs(loss_weights="1,0,0.5").loss_weights == (1.0, 0.0, 0.5)
    for bad in ("1,2", "a,b,c", "0,0,0", "-1,0,1"):
        with pytest.raises(TrainingError, match="loss_weights"):
            MPOArgs(loss_weights=bad)
    with pytest.raises(TrainingError, match="beta"):
        MPOArgs(beta=0)


# ---- the objective on a tiny model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("mpo") / "model")


def prepared_objective(model, pairs, tmp_path, **options):
    """(objective, first batch, prepared) through the real stages, without the loop."""
    objective, micro, prepared = prepared_step(model, pairs, tmp_path, **options)
    return objective, micro[0], prepared


def prepared_step(model, pairs, tmp_path, **options):
    """(objective, the micro-batches of the first step, prepared) through the real stages, without the loop."""
    from internvl.mpo.data import pair_data
    from internvl.train.dist import DistContext
    from internvl.train.run import prepare_model

    args = TrainArgs.from_dict({**FAST, "model": str(model), "data": str(pairs), "out": str(tmp_path / "o"),
                                "batch_size": 7, **options})  # fmt: skip
    ctx = DistContext()
    prepared = prepare_model(args, ctx, log=lambda _m: None)
    objective = MPOObjective(MPOArgs())
    objective.attach(prepared)
    source = pair_data(args, prepared, ctx, objective)
    objective.setup(prepared.model, ctx.device)
    ((micro, _, _),) = [next(source.source(None))]
    return objective, micro, prepared


def chosen_nll(policy, batch):
    """By hand: -(sum of the chosen rows' log-prob sums) / (their token count)."""
    n = batch.num_samples // 2
    logps, _ = sequence_logps(policy, batch)
    return (-logps[:n].sum() / sum(batch.sample_tokens[:n])).item()


def test_step_zero_rewards_are_zero_and_losses_are_log2(model, pairs, tmp_path):
    objective, batch, prepared = prepared_objective(model, pairs, tmp_path)
    assert batch.num_samples == 14 and objective.normalizer(batch) == 1  # one micro-batch, one share
    out = objective(prepared.model, batch)
    m = {k: (s.item() / n) for k, (s, n) in out.metrics.items()}
    assert m["rewards/chosen"] == m["rewards/rejected"] == m["rewards/margins"] == m["rewards/delta"] == 0
    assert m["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["loss/bco_pair"] == pytest.approx(2 * math.log(2), abs=1e-6)
    # the NLL is one token mean over all the chosen rows' tokens (their lengths differ here)
    nll = chosen_nll(prepared.model, batch)
    assert len(set(batch.sample_tokens[:7])) > 1 and m["nll_loss"] == pytest.approx(nll, rel=1e-5)
    assert out.loss_sum.item() == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2) + nll, rel=1e-5)


def test_micro_batches_weigh_the_same_as_in_trl(model, pairs, tmp_path):
    """7 pairs, 4 per micro-batch, 2 micro-batches a step: micro-batches of 4 and 3 pairs. The step's loss is
    the mean of the two micro-batch losses (TRL divides each by the accumulation steps), each 1.2 log 2 (rewards
    are 0 at step 0) plus its own chosen-token mean; not a mean over the 7 pairs."""
    options = {"batch_size": 4, "grad_accum": 2, "max_steps": 1, "warmup_steps": 0}
    _, micro, prepared = prepared_step(model, pairs, tmp_path, **options)
    assert [b.num_samples // 2 for b in micro] == [4, 3]
    nll = [chosen_nll(prepared.model, b) for b in micro]
    want = 1.2 * math.log(2) + (nll[0] + nll[1]) / 2
    args = TrainArgs.from_dict({**FAST, "model": str(model), "data": str(pairs), "out": str(tmp_path / "run"),
                                "lr": 1e-3, **options})  # fmt: skip
    (row,) = train_mpo(args, MPOArgs(), log=lambda _m: None).history
    assert row["loss"] == pytest.approx(want, rel=1e-5)
    per_pair = 1.2 * math.log(2) + (nll[0] * 4 + nll[1] * 3) / 7  # what weighing by pairs would give
    assert abs(want - per_pair) > 1e-4


def test_lora_reference_is_the_base_with_adapters_disabled(model, pairs, tmp_path):
    from internvl.checkpoint.io import load_model
    from internvl.tokenizer import Tokenizer

    objective, batch, prepared = prepared_objective(model, pairs, tmp_path, lora_r=4, lr=1e-2)
    policy = prepared.model
    base, _ = load_model(model, dtype="fp32", image_token_id=Tokenizer.from_dir(model).image_context_id)
    base_logps = sequence_logps(base.eval(), batch)[0]
    ref0 = objective.reference.logps(policy, batch)
    assert torch.allclose(ref0, base_logps, atol=1e-5)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert any("mlp1" in n for n, p in policy.named_parameters() if p.requires_grad)  # trained in full
    before = sequence_logps(policy.eval(), batch)[0]
    policy.train()
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        objective(policy, batch).loss_sum.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.requires_grad for p in trainable)  # restored after the reference pass
    after = sequence_logps(policy.eval(), batch)[0]
    assert not torch.allclose(before, after, atol=1e-3)  # the policy moved
    assert torch.allclose(objective.reference.logps(policy, batch), ref0, atol=1e-5)  # the reference did not
    assert policy.training is False  # the caller's mode is kept


def test_training_increases_the_margin(model, pairs, tmp_path):
    args = TrainArgs.from_dict({**FAST, "model": str(model), "data": str(pairs), "out": str(tmp_path / "run"),
                                "batch_size": 7, "max_steps": 6, "lr": 2e-3, "warmup_steps": 0,
                                "lr_scheduler": "constant"})  # fmt: skip
    result = train_mpo(args, MPOArgs(), log=lambda _m: None)
    rows = result.history
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-6) and rows[0]["loss"] > 0
    margins = [r["rewards/margins"] for r in rows]
    assert margins[-1] > 0.5 and margins[-1] == max(margins) and rows[-1]["rewards/accuracies"] > 0.5
    assert rows[-1]["logps/chosen"] > rows[0]["logps/chosen"]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_bad_pair_rows_name_file_and_line(model, tmp_path):
    good = {"question": "q", "chosen": "a", "rejected": "b"}
    meta = write_pairs(tmp_path, [good, {"question": "q", "chosen": "a"}])
    args = TrainArgs.from_dict({**FAST, "model": str(model), "data": str(meta), "out": str(tmp_path / "o")})
    with pytest.raises(DataError, match=r"pairs.jsonl:2: a preference row needs the string key 'rejected'"):
        train_mpo(args, log=lambda _m: None)
    meta = write_pairs(tmp_path, [good, {**good, "image": "missing.png"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: missing image file"):
        train_mpo(args, log=lambda _m: None)
