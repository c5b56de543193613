"""``train.ema_decay``: the moving average of the weights, its checkpoints and its resume."""

from __future__ import annotations

import pytest
import torch

from mugato_ray.checkpoints import TRAIN_MODEL_KEY, read_state
from mugato_ray.config import ConfigError
from mugato_ray.learner import Learner, restore
from mugato_ray.model import load_model
from mugato_ray.weight_average import WeightAverage, decay_at
from tests.test_learner import LAYOUT, TASK, checkpoint_after, fresh_learner, make_cfg
from tests.test_model import VOCAB, make_batch


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_decay_warms_up_then_holds():
    assert decay_at(0.99, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first step nearly replaces it
    assert decay_at(0.99, 90) == pytest.approx(91 / 100)
    assert decay_at(0.99, 10_000) == 0.99


def test_update_is_the_exponential_average_of_the_weights_it_saw():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, 0.5)
    want = params(model)
    for step in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model, step)
        d = decay_at(0.5, step)
        want = {k: d * want[k] + (1 - d) * v for k, v in params(model).items()}
    got = params(average.model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got[k], model.state_dict()[k])  # the average lags the weights
    assert not any(p.requires_grad for p in average.model.parameters())


def test_learner_acts_with_the_average_and_trains_the_weights(tmp_path):
    batch = make_batch(LAYOUT, [1, 1], seed=11)
    plain = fresh_learner(make_cfg(tmp_path), seed=3)
    averaged = fresh_learner(make_cfg(tmp_path, "train.ema_decay=0.9"), seed=3)
    assert plain.acting_model is plain.raw_model and plain.average is None
    for step in range(6):
        plain.step(step, lambda task: batch)
        averaged.step(step, lambda task: batch)
    # The average does not change the training itself ...
    for (name, p), q in zip(plain.raw_model.named_parameters(), averaged.raw_model.parameters()):
        assert torch.equal(p, q), name
    # ... and what the run acts with is the average, not the last weights.
    assert averaged.acting_model is not averaged.raw_model
    moved = [n for n, p in averaged.acting_model.named_parameters()
             if not torch.equal(p, dict(averaged.raw_model.named_parameters())[n])]
    assert moved


def test_a_checkpoint_holds_the_average_and_resumes_training_exactly(tmp_path):
    cfg = make_cfg(tmp_path, "train.ema_decay=0.9")
    batch = make_batch(LAYOUT, [1, 1], seed=11)
    ckpt = tmp_path / "ckpt"
    learner = checkpoint_after(cfg, 4, ckpt, batch)
    trained = params(learner.raw_model)
    acting = load_model(ckpt / "model.pt").state_dict()  # what evaluation and export read
    assert all(torch.equal(v, learner.acting_model.state_dict()[k]) for k, v in acting.items())
    assert TRAIN_MODEL_KEY in read_state(ckpt)

    state = restore(cfg, VOCAB, ckpt, rank=0)
    assert all(torch.equal(v, trained[k]) for k, v in state.model.state_dict().items())
    resumed = Learner(state.model, state.optimizer, cfg, {TASK: LAYOUT}, average=state.average)
    for step in (4, 5):
        learner.step(step, lambda task: batch)
        resumed.step(step, lambda task: batch)
    for a, b in ((learner.raw_model, resumed.raw_model), (learner.acting_model, resumed.acting_model)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name

    # Without the option, the run goes on training from the training weights, not from the average.
    plain = restore(make_cfg(tmp_path), VOCAB, ckpt, rank=0)
    assert plain.average is not None  # handed over, and ignored by a Learner without train.ema_decay
    assert Learner(plain.model, plain.optimizer, make_cfg(tmp_path), {TASK: LAYOUT}, average=plain.average).average is None
    assert all(torch.equal(v, trained[k]) for k, v in plain.model.state_dict().items())
    assert any(not torch.equal(v, trained[k]) for k, v in acting.items())


def test_training_weights_that_do_not_fit_the_model_are_refused_naming_state_pt(tmp_path):
    cfg = make_cfg(tmp_path, "train.ema_decay=0.9")
    ckpt = tmp_path / "ckpt"
    checkpoint_after(cfg, 1, ckpt, make_batch(LAYOUT, [1, 1], seed=11))
    state = read_state(ckpt)
    state[TRAIN_MODEL_KEY] = {"not_a_weight": torch.zeros(2)}
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt: its 'train_model' does not fit the model"):
        restore(cfg, VOCAB, ckpt, rank=0)


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_a_decay_outside_zero_to_one_is_refused_by_name(tmp_path, value):
    with pytest.raises(ConfigError, match="train.ema_decay"):
        make_cfg(tmp_path, f"train.ema_decay={value}")
