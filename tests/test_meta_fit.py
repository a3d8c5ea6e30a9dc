"""meta_fit: it learns, it resumes exactly, it takes plain user modules, it fails clearly."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import stat

import pytest
import torch
from safetensors.torch import load_file
from tiny_tasks import TRAIN_X, TRAIN_Y, Counter, make_tiny, tiny, tiny_loader, tiny_model, tiny_sampler
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from learned_optim import CoordinateLSTM, HierarchicalRNN, LearnedOptimizer
from learned_optim.cli import main
from learned_optim.compare import compare
from learned_optim.meta_fit import EVALUATION_SEED_BASE, MetaFitConfig, MetaTrainer, _objective, meta_fit, rollout
from learned_optim.tasks import Task, TaskError, TaskFamily, TaskInstance, get_task


def small_rule(seed: int = 0, **kwargs) -> CoordinateLSTM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CoordinateLSTM(hidden_size=8, **kwargs)


def weights(rule: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rule.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def relative_loss(rule: CoordinateLSTM, family, steps: int = 20, n: int = 4) -> float:
    """Mean over held-out instances of (mean loss over the run) / (initial loss)."""
    scores = []
    for i in range(n):
        losses = rollout(rule, family.sample(EVALUATION_SEED_BASE + i), steps)
        scores.append(sum(losses[1:]) / steps / losses[0])
    return sum(scores) / n


# ---------------------------------------------------------------------------- learning
def test_meta_fit_lowers_meta_loss_on_quadratics():
    family = get_task("quadratic")
    rule = small_rule()
    before = relative_loss(rule, family)
    out = meta_fit(
        rule, "quadratic", steps=20, unroll=5, meta_iterations=60, meta_lr=1e-2, validate_every=0, progress=False
    )
    assert out is rule
    history = rule.meta_fit_history
    assert history.iteration == 60 and len(history.meta_losses) == 60
    assert history.skipped_updates == 0
    early = sum(history.meta_losses[:12]) / 12
    late = sum(history.meta_losses[-12:]) / 12
    assert late < early - 0.5, (early, late)
    # The untrained rule barely moves (ratio ~1); the trained one must at least halve the loss.
    after = relative_loss(rule, family)
    assert before > 0.9
    assert after < 0.5 * before, (before, after)


def test_validation_keeps_best_weights():
    rule = small_rule()
    meta_fit(
        rule, "quadratic", steps=10, unroll=5, meta_iterations=8, meta_lr=1e-2,
        validate_every=2, validation_instances=1, progress=False,
    )  # fmt: skip
    history = rule.meta_fit_history
    assert [it for it, _ in history.validation] == [0, 2, 4, 6, 8]  # 0: the starting rule
    best_it, best = min(history.validation, key=lambda v: v[1])
    assert history.best_iteration == best_it and history.best_validation == best


def test_checkpoint_folders_hold_the_last_and_the_best_weights(tmp_path):
    from learned_optim.weights import load_from_directory

    rule = small_rule()
    start = weights(rule)
    # A meta learning rate this large wrecks the rule: the best weights stay the starting ones.
    meta_fit(
        rule, "quadratic", steps=10, unroll=5, meta_iterations=4, meta_lr=50.0, clip_grad_norm=0.0,
        validate_every=2, validation_instances=2, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False,
    )  # fmt: skip
    assert rule.meta_fit_history.best_iteration == 0 and same_weights(weights(rule), start)
    saved = load_file(str(tmp_path / json.loads((tmp_path / "checkpoint.json").read_text())["weights"]))
    last = {k[len("rule/") :]: v for k, v in saved.items() if k.startswith("rule/")}
    best = {k[len("best/") :]: v for k, v in saved.items() if k.startswith("best/")}
    assert not same_weights(last, best)
    # meta_fit returns the best weights; last/ holds where meta-training ended.
    assert same_weights(weights(load_from_directory(tmp_path / "best")), weights(rule))
    assert same_weights(weights(load_from_directory(tmp_path / "best")), best)
    assert same_weights(weights(load_from_directory(tmp_path / "last")), last)


def test_checkpoint_files_follow_the_umask(tmp_path):
    # safetensors' save_file made the checkpoint's weights 0600: a shared run folder could not
    # be read by others. Every file must get what open() gives under the umask (0644 here).
    old = os.umask(0o022)
    try:
        meta_fit(
            small_rule(), tiny, steps=7, unroll=3, meta_iterations=2, validate_every=1, validation_instances=1,
            checkpoint_dir=tmp_path, progress=False,
        )  # fmt: skip
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert any(p.name.startswith("checkpoint-") and p.suffix == ".safetensors" for p in files)
    assert {p.parent.name for p in files} >= {"last", "best"}
    assert {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        p.relative_to(tmp_path).as_posix(): oct(0o644) for p in files
    }


def test_checkpoint_without_validation_has_no_best_folder(tmp_path):
    meta_fit(
        small_rule(), tiny, steps=7, unroll=3, meta_iterations=2, validate_every=0, checkpoint_dir=tmp_path,
        progress=False,
    )  # fmt: skip
    assert (tmp_path / "last" / "config.json").is_file()
    assert not (tmp_path / "best").exists()


@pytest.mark.parametrize("validate_every", [0, 1])
def test_a_fresh_run_into_a_used_folder_leaves_no_best_of_the_earlier_run(tmp_path, validate_every):
    from learned_optim.weights import load_from_directory

    settings = dict(steps=7, unroll=3, meta_iterations=2, checkpoint_dir=tmp_path, progress=False)
    meta_fit(small_rule(), tiny, validate_every=1, validation_instances=1, **settings)
    assert load_from_directory(tmp_path / "best").config["hidden_size"] == 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wider = CoordinateLSTM(hidden_size=12)
    meta_fit(wider, tiny, validate_every=validate_every, validation_instances=1, **settings)  # resume=False
    assert load_from_directory(tmp_path / "last").config["hidden_size"] == 12
    if validate_every:
        assert same_weights(weights(load_from_directory(tmp_path / "best")), weights(wider))
    else:
        assert not (tmp_path / "best").exists()


def test_a_run_that_only_makes_the_rule_worse_returns_the_starting_rule():
    rule = small_rule()
    start = weights(rule)
    # A meta learning rate this large wrecks the rule at the first update.
    meta_fit(
        rule, "quadratic", steps=10, unroll=5, meta_iterations=4, meta_lr=50.0, clip_grad_norm=0.0,
        validate_every=2, validation_instances=2, progress=False,
    )  # fmt: skip
    history = rule.meta_fit_history
    assert history.best_iteration == 0
    assert all(score > history.best_validation for it, score in history.validation if it > 0)
    assert same_weights(weights(rule), start)


def test_zero_meta_iterations_validates_and_saves_the_starting_rule(tmp_path):
    """``--meta-iterations 0``: a rule continued under a changed non-weight option (here the lr leak) is
    validated and saved, with the usual metadata, and its weights are untouched."""
    start = HierarchicalRNN(agreement_feature=True)
    start.save_pretrained(str(tmp_path / "start"))
    config = json.dumps({**start.config, "lr_leak": 0.05})
    main([
        "meta-fit", "--task", "quadratic", "--rule", "HierarchicalRNN", "--rule-config", config,
        "--init", str(tmp_path / "start"), "--out", str(tmp_path / "out"), "--meta-iterations", "0",
        "--steps", "10", "--unroll", "10", "--validate-every", "1", "--validation-instances", "2", "--quiet",
    ])  # fmt: skip
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["config"]["lr_leak"] == 0.05
    assert saved["metadata"]["meta_iterations"] == 0 and saved["metadata"]["best_iteration"] == 0
    assert math.isfinite(saved["metadata"]["best_validation"])
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert same_weights(out, weights(start))
    rule = small_rule()
    before = weights(rule)
    meta_fit(rule, "quadratic", steps=10, unroll=5, meta_iterations=0, validate_every=0, progress=False)
    assert rule.meta_fit_history.iteration == 0 and same_weights(weights(rule), before)
    with pytest.raises(ValueError, match="meta_iterations"):
        meta_fit(small_rule(), "quadratic", meta_iterations=-1, progress=False)


# ---------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


def test_cosine_meta_lr_decays_from_meta_lr_to_five_percent():
    trainer = MetaTrainer(small_rule(), tiny, _config(10, meta_lr_schedule="cosine"), progress=False)
    rates = [trainer.meta_lr_at(i) for i in range(11)]
    assert rates[0] == pytest.approx(1e-2) and rates[-1] == pytest.approx(5e-4)
    assert all(a > b for a, b in itertools.pairwise(rates))
    trainer.step()
    assert trainer.meta_optimizer.param_groups[0]["lr"] == pytest.approx(rates[0])
    trainer.step()
    assert trainer.meta_optimizer.param_groups[0]["lr"] == pytest.approx(rates[1])
    with pytest.raises(ValueError, match="meta_lr_schedule"):
        MetaFitConfig(meta_lr_schedule="linear").check()


def _config(meta_iterations: int, **overrides) -> MetaFitConfig:
    settings = dict(
        steps=7, unroll=3, meta_iterations=meta_iterations, meta_lr=1e-2, checkpoint_every=4,
        validate_every=2, validation_instances=1, instances=2,
    )  # fmt: skip
    settings.update(overrides)
    return MetaFitConfig(**settings)


@pytest.mark.parametrize(
    "task_factory, overrides",
    [
        (lambda: make_tiny(), {}),  # sampler data, two instances side by side
        (lambda: make_tiny(data=tiny_loader()), {"instances": 1, "random_horizon": True}),  # DataLoader data
        (lambda: make_tiny(), {"meta_lr_schedule": "cosine"}),
        # Each instance's random lr scale must come back from the checkpoint.
        (lambda: make_tiny(), {"lr_scale_range": 10.0, "log_floor": 0.5}),
        # A tuple setting comes back from checkpoint.json as a list and must still match.
        (lambda: make_tiny(), {"validation_lr_scales": (0.5, 2.0)}),
        # BatchNorm's running statistics, which the final loss reads (eval mode), come back too.
        (lambda: make_tiny(name="batchnorm", model=_batchnorm_model), {"meta_loss": "final"}),
        # A loader (or sampler) with its own generator: shared by every instance, it made each
        # instance's batches depend on what the others and validation had drawn.
        (lambda: make_tiny(data=_generator_loader("loader")), {}),
        (lambda: make_tiny(data=_generator_loader("sampler")), {}),
    ],
    ids=[
        "sampler-2-instances",
        "dataloader-random-horizon",
        "cosine-meta-lr",
        "lr-scale-log-floor",
        "val-lr-scales",
        "batchnorm-final",
        "dataloader-own-generator",
        "dataloader-sampler-own-generator",
    ],
)
def test_resume_after_interruption_equals_straight_run(tmp_path, task_factory, overrides):
    total = 12
    base = small_rule()

    straight = copy.deepcopy(base)
    straight_trainer = MetaTrainer(straight, task_factory(), _config(total, **overrides), progress=False)
    straight_trainer.run()

    # Interrupted at iteration 6; the last checkpoint is the one of iteration 4.
    def crash(history):
        if history.iteration == 6:
            raise Interrupt

    first = copy.deepcopy(base)
    with pytest.raises(Interrupt):
        MetaTrainer(first, task_factory(), _config(total, **overrides), tmp_path, progress=False, callback=crash).run()

    resumed = copy.deepcopy(base)  # a fresh process would rebuild the rule from scratch
    trainer = MetaTrainer(resumed, task_factory(), _config(total, **overrides), tmp_path, progress=False)
    trainer.load_checkpoint(tmp_path)
    assert trainer.history.iteration == 4
    # The checkpoint is in the middle of an instance: carried parameters, rule state and
    # a pending minibatch are what is being restored.
    assert trainer.runs
    assert all(0 < run.steps_done < run.horizon for run in trainer.runs)
    assert all(run.pending_batch is not None and run.batches_used > 0 for run in trainer.runs)
    assert any(run.state["h"].abs().sum() > 0 for run in trainer.runs)
    trainer.run()

    assert trainer.history.meta_losses == straight_trainer.history.meta_losses
    assert trainer.history.validation == straight_trainer.history.validation
    assert same_weights(weights(resumed), weights(straight))
    # and the resumed run did learn something (it is not trivially equal to the start)
    assert not same_weights(weights(resumed), weights(base))


def _generator_loader(owner: str) -> DataLoader:
    """A shuffled DataLoader whose ``owner`` ("loader" or "sampler") has its own seeded generator."""
    dataset = TensorDataset(TRAIN_X, TRAIN_Y)
    generator = torch.Generator().manual_seed(0)
    if owner == "loader":
        return DataLoader(dataset, batch_size=16, shuffle=True, generator=generator)
    return DataLoader(dataset, batch_size=16, sampler=RandomSampler(dataset, generator=generator))


@pytest.mark.parametrize("owner", ["loader", "sampler"])
def test_a_dataloader_with_its_own_generator_draws_per_instance_and_leaves_it_alone(owner):
    loader = _generator_loader(owner)
    generator = loader.generator if owner == "loader" else loader.sampler.generator
    before = generator.get_state()
    trainer = MetaTrainer(small_rule(), make_tiny(data=loader), _config(2, validation_instances=2), progress=False)
    first = trainer.validate()
    for _ in range(10):  # another instance draws batches (starting epochs, shuffling) in between
        trainer._new_run(0, 4, 7).instance.next_batch()
    assert trainer.validate() == first  # the same rule scores the same
    # An instance's batches are a function of its seed, whoever drew before.
    a, b = trainer._new_run(0, 5, 7), trainer._new_run(0, 5, 7)
    assert torch.equal(a.instance.next_batch()[0], b.instance.next_batch()[0])
    assert not torch.equal(a.instance.next_batch()[0], trainer._new_run(0, 6, 7).instance.next_batch()[0])
    assert torch.equal(generator.get_state(), before)  # the user's generator is left as it was


def _hierarchical_rule():
    from learned_optim import HierarchicalRNN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return HierarchicalRNN(param_hidden=4, tensor_hidden=4, global_hidden=4, agreement_feature=True)


@pytest.mark.parametrize(
    "make_rule, task_factory, overrides",
    [
        (small_rule, lambda: make_tiny(), {}),
        (small_rule, lambda: make_tiny(), {"meta_grad_fraction": 0.5, "lr_scale_range": 10.0}),
        (small_rule, lambda: make_tiny(), {"second_order": True}),
        (small_rule, lambda: make_tiny(), {"second_order": True, "meta_loss": "final"}),
        (small_rule, lambda: make_tiny(name="dropout", model=_dropout_model), {}),
        # The linear bias before BatchNorm has a gradient of 0 up to rounding, exactly 0 or not
        # by the order of the sums: step_on_zero_grad=False would turn that into a step or none.
        (
            lambda: small_rule(step_on_zero_grad=True),
            lambda: make_tiny(name="batchnorm", model=_batchnorm_model),
            {"meta_loss": "final"},
        ),
        (_hierarchical_rule, lambda: make_tiny(), {"lr_scale_range": 10.0, "meta_loss": "log-ramp"}),
        (_hierarchical_rule, lambda: "problem-set-long", {"instances": 1, "steps": 6, "unroll": 6}),
    ],
    ids=[
        "lstm",
        "lstm-subset-lr-scale",
        "lstm-second-order",
        "lstm-final",
        "lstm-dropout",
        "lstm-batchnorm-final",
        "hrnn-tiny",
        "hrnn-problem-set",
    ],
)
@pytest.mark.parametrize("segment", [1, 2, 4])
def test_gradient_checkpointing_gives_the_same_meta_training(make_rule, task_factory, overrides, segment):
    # Segments that divide the unroll's steps evenly and ones that do not (unroll 3: four
    # losses, steps 0..3); the recomputed segments must use the same batches and random streams.
    runs = {}
    for steps in (0, segment):
        rule = make_rule()
        config = _config(6, validate_every=0, grad_checkpoint_steps=steps, **overrides)
        trainer = MetaTrainer(rule, task_factory(), config, progress=False)
        trainer.run()
        runs[steps] = (trainer.history.meta_losses, weights(rule), [run.steps_done for run in trainer.runs])
    (plain_losses, plain_weights, plain_steps), (losses, checkpointed_weights, steps_done) = runs.values()
    assert steps_done == plain_steps
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert plain_weights.keys() == checkpointed_weights.keys()
    for name, value in plain_weights.items():
        torch.testing.assert_close(checkpointed_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert not same_weights(plain_weights, weights(make_rule()))  # it did train


def test_gradient_checkpointing_keeps_fewer_activations_alive():
    # Peak bytes of the tensors autograd holds for backward over one 40-step unroll and its
    # backward pass: checkpointing every 7 steps holds one segment's at a time.
    def peak_saved_bytes(steps: int) -> int:
        live = peak = 0

        class Held:
            def __init__(self, tensor: torch.Tensor) -> None:
                nonlocal live, peak
                self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
                live += self.size
                peak = max(peak, live)

            def __del__(self) -> None:
                nonlocal live
                live -= self.size

        config = _config(1, steps=40, unroll=40, grad_checkpoint_steps=steps)
        trainer = MetaTrainer(_hierarchical_rule(), make_tiny(), config, progress=False)
        trainer.runs = [trainer._new_run() for _ in range(trainer.config.instances)]
        with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor):
            if steps:
                value = trainer._unroll_checkpointed(trainer.runs)
            else:
                meta_loss = trainer._unroll(trainer.runs)
                value = float(meta_loss.detach())
                meta_loss.backward()
                del meta_loss
        assert math.isfinite(value) and any(p.grad is not None for p in trainer.rule.parameters())
        return peak

    assert peak_saved_bytes(7) * 3 < peak_saved_bytes(0)


def test_bad_gradient_checkpoint_steps_are_rejected():
    with pytest.raises(ValueError, match="grad_checkpoint_steps"):
        _config(2, grad_checkpoint_steps=-1).check()


def test_resume_refuses_a_different_config(tmp_path):
    rule = small_rule()
    MetaTrainer(rule, tiny, _config(2, checkpoint_every=2), tmp_path, progress=False).run()
    other = MetaTrainer(small_rule(), tiny, _config(4, checkpoint_every=2, unroll=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="unroll"):
        other.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        other.load_checkpoint(tmp_path / "elsewhere")


def test_resume_may_turn_on_gradient_checkpointing(tmp_path):
    # The hint after running out of memory: same meta-gradient, so the run continues as it was.
    straight = small_rule()
    straight_trainer = MetaTrainer(straight, tiny, _config(8, checkpoint_every=4, validate_every=0), progress=False)
    straight_trainer.run()
    MetaTrainer(small_rule(), tiny, _config(4, checkpoint_every=4, validate_every=0), tmp_path, progress=False).run()
    resumed = small_rule()
    config = _config(8, checkpoint_every=4, validate_every=0, grad_checkpoint_steps=2)
    trainer = MetaTrainer(resumed, tiny, config, tmp_path, progress=False)
    trainer.load_checkpoint(tmp_path)
    assert trainer.history.iteration == 4
    trainer.run()
    assert trainer.history.meta_losses == pytest.approx(straight_trainer.history.meta_losses, rel=1e-5)
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_of_a_hierarchical_rule_equals_straight_run(tmp_path):
    # Checkpoint tensors are copied on load: unaligned safetensors memory made the resumed
    # HierarchicalRNN run drift by ~1e-8 from the straight one.
    from learned_optim import HierarchicalRNN

    def make():
        torch.manual_seed(0)
        return HierarchicalRNN(param_hidden=4, tensor_hidden=4, global_hidden=4)

    settings = dict(steps=10, unroll=4, meta_iterations=12, validate_every=0, checkpoint_every=4, progress=False)
    straight = meta_fit(make(), "quadratic", **settings)

    def crash(history):
        if history.iteration == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        meta_fit(make(), "quadratic", checkpoint_dir=tmp_path, callback=crash, **settings)
    resumed = meta_fit(make(), "quadratic", checkpoint_dir=tmp_path, resume=True, **settings)
    assert resumed.meta_fit_history.meta_losses == straight.meta_fit_history.meta_losses
    assert same_weights(weights(resumed), weights(straight))


def test_resume_refuses_other_tasks_and_unreadable_checkpoints(tmp_path):
    MetaTrainer(small_rule(), tiny, _config(2, checkpoint_every=2), tmp_path, progress=False).run()
    other_task = MetaTrainer(small_rule(), "quadratic", _config(4, checkpoint_every=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"checkpoint is for tasks \['tiny'\], not \['quadratic'\]"):
        other_task.load_checkpoint(tmp_path)
    # Each save names its own weights file and its hash; checkpoints from before that used one
    # fixed name and had no hash.
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    del meta["weights_sha256"]
    (tmp_path / meta.pop("weights")).rename(tmp_path / "checkpoint.safetensors")
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    trainer = MetaTrainer(small_rule(), tiny, _config(4, checkpoint_every=2), tmp_path, progress=False)
    trainer.load_checkpoint(tmp_path)
    assert trainer.history.iteration == 2
    weights_file = tmp_path / "checkpoint.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"checkpoint is corrupt .* start over without resuming"):
        trainer.load_checkpoint(tmp_path)
    weights_file.unlink()  # missing
    with pytest.raises(ValueError, match=r"checkpoint is corrupt .*FileNotFoundError"):
        trainer.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text("[]")
    with pytest.raises(ValueError, match="checkpoint is corrupt"):
        trainer.load_checkpoint(tmp_path)


def test_resume_refuses_non_finite_or_misshapen_checkpoint_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    MetaTrainer(small_rule(), tiny, _config(2, checkpoint_every=2), tmp_path, progress=False).run()
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    del meta["weights_sha256"]  # as written by hand, or by an older version
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    path = tmp_path / meta["weights"]
    original = load_file(path)
    for key, bad, message in (
        ("rule/output.bias", torch.full((1,), float("nan")), r"the rule weights \['output.bias'\] hold non-finite"),
        ("rule/output.bias", torch.zeros(3), "the rule weights .* expected"),
    ):
        save_file({**original, key: bad}, path)
        trainer = MetaTrainer(small_rule(), tiny, _config(4, checkpoint_every=2), tmp_path, progress=False)
        before = weights(trainer.rule)
        with pytest.raises(ValueError, match=f"checkpoint is corrupt .*{message}"):
            trainer.load_checkpoint(tmp_path)
        assert same_weights(weights(trainer.rule), before)


def test_resume_refuses_weights_damaged_in_place(tmp_path):
    # Zeroed bytes inside the tensor data still parse as safetensors: only the hash that
    # checkpoint.json keeps of the weights file tells them apart.
    MetaTrainer(small_rule(), tiny, _config(2, checkpoint_every=2), tmp_path, progress=False).run()
    weights_file = tmp_path / json.loads((tmp_path / "checkpoint.json").read_text())["weights"]
    data = bytearray(weights_file.read_bytes())
    data[-64:] = bytes(64)
    weights_file.write_bytes(bytes(data))
    trainer = MetaTrainer(small_rule(), tiny, _config(4, checkpoint_every=2), tmp_path, progress=False)
    before = {k: v.clone() for k, v in trainer.rule.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint-.*\.safetensors: not the bytes checkpoint.json was saved with"):
        trainer.load_checkpoint(tmp_path)
    assert same_weights(trainer.rule.state_dict(), before)  # nothing loaded
    assert trainer.history.iteration == 0


@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)),  # wider
        lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1, bias=False)),  # a tensor fewer
    ],
)
def test_resume_refuses_a_task_whose_model_changed(tmp_path, model):
    # The runs under way used to go on training the checkpoint's (old) parameters.
    MetaTrainer(small_rule(), tiny, _config(2, checkpoint_every=2), tmp_path, progress=False).run()
    before = (tmp_path / "checkpoint.json").read_bytes()
    changed = MetaTrainer(
        small_rule(), make_tiny(model=model), _config(4, checkpoint_every=2), tmp_path, progress=False
    )
    with pytest.raises(ValueError, match=r"checkpoint.json: the checkpoint's run.* the task's model changed"):
        changed.load_checkpoint(tmp_path)
    assert (tmp_path / "checkpoint.json").read_bytes() == before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["history"].__setitem__("iteration", "2"), r"history\.iteration is '2'"),
        (lambda m: m["history"].__setitem__("validation", "ab"), r"history\.validation is 'ab'"),
        (lambda m: m["history"].__setitem__("bogus", 1), "history must be an object"),
        (lambda m: m["runs"][0].__setitem__("seed", "x"), r"runs\[0\]\.seed is 'x'"),
        (lambda m: m["runs"][0].pop("horizon"), r"runs\[0\]\.horizon is missing"),
        (lambda m: m["runs"][0].__setitem__("family_index", 3), r"runs\[0\] is out of range"),
        (lambda m: m.__setitem__("rng_state", [1, [2], None]), "rng_state is not a random.Random state"),
        # In range too: the replay of the data stream would run for ever, the others train on
        # silently wrong.
        (lambda m: m["runs"][0].update(batches_used=10**12), r"runs\[0\] is out of range"),
        (lambda m: m["runs"][0].update(horizon=0), r"runs\[0\] is out of range"),
        (lambda m: m["runs"][0].update(lr_scale=-1.0), r"runs\[0\] is out of range"),
        (lambda m: m["history"].update(best_validation=float("nan")), "history.best_validation is out of range"),
        (lambda m: m["history"].update(iteration=-40), "history.iteration is out of range"),
    ],
)
def test_resume_names_an_edited_checkpoint_field(tmp_path, edit, message):
    MetaTrainer(small_rule(), tiny, _config(2, checkpoint_every=2), tmp_path, progress=False).run()
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    edit(meta)
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    trainer = MetaTrainer(small_rule(), tiny, _config(4, checkpoint_every=2), tmp_path, progress=False)
    before = weights(trainer.rule)
    with pytest.raises(ValueError, match=f"checkpoint is corrupt .*TypeError: {message}"):
        trainer.load_checkpoint(tmp_path)
    assert trainer.history.iteration == 0 and same_weights(weights(trainer.rule), before)


def _rule_training(names: list[str] | None) -> HierarchicalRNN:
    torch.manual_seed(0)
    rule = HierarchicalRNN(param_hidden=4, tensor_hidden=4, global_hidden=4)
    for name, p in rule.named_parameters():
        p.requires_grad_(names is None or name in names)
    return rule


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_resume_refuses_other_trainable_rule_parameters(tmp_path, estimator):
    # tbptt went on training the other set silently; PES crashed on a size mismatch.
    settings = dict(checkpoint_every=2, validate_every=0, estimator=estimator, pes_pairs=1)
    config = _config(4, **settings)
    head = ["param_out.weight", "param_out.bias"]
    MetaTrainer(_rule_training(head), tiny, _config(2, **settings), tmp_path, progress=False).run()
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["trained_parameters"] == head
    before = (tmp_path / "checkpoint.json").read_bytes()
    trainer = MetaTrainer(_rule_training(None), tiny, config, tmp_path, progress=False)
    both = r"the rule parameters \['param_out.weight', 'param_out.bias'\], but this rule trains \['param_h0', .*\]"
    with pytest.raises(ValueError, match=both):
        trainer.load_checkpoint(tmp_path)
    assert trainer.history.iteration == 0 and (tmp_path / "checkpoint.json").read_bytes() == before
    MetaTrainer(_rule_training(head), tiny, config, tmp_path, progress=False).load_checkpoint(tmp_path)
    # A checkpoint from before the record resumes; PES still refuses perturbations of another size.
    meta.pop("trained_parameters")
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    MetaTrainer(_rule_training(head), tiny, config, tmp_path, progress=False).load_checkpoint(tmp_path)
    if estimator == "pes":
        with pytest.raises(ValueError, match="perturbations are over 10 rule weights, but this rule trains"):
            MetaTrainer(_rule_training(None), tiny, config, tmp_path, progress=False).load_checkpoint(tmp_path)


def test_resume_refuses_fewer_meta_iterations_than_done(tmp_path):
    MetaTrainer(small_rule(), tiny, _config(4, checkpoint_every=2), tmp_path, progress=False).run()
    trainer = MetaTrainer(small_rule(), tiny, _config(2, checkpoint_every=2), tmp_path, progress=False)
    with pytest.raises(
        ValueError, match=r"at meta-iteration 4, past meta_iterations=2; resume with meta_iterations >= 4"
    ):
        trainer.load_checkpoint(tmp_path)
    # The same length (a finished run resumed again) is fine.
    MetaTrainer(small_rule(), tiny, _config(4, checkpoint_every=2), tmp_path, progress=False).load_checkpoint(tmp_path)


def test_loss_that_is_nan_at_the_initial_parameters_is_refused():
    task = Task(tiny_model, lambda out, y: nn.functional.mse_loss(out, y) * math.nan, tiny_sampler, name="nan-loss")
    with pytest.raises(TaskError, match=r"task 'nan-loss': loss is nan on the first batch at the initial parameters"):
        meta_fit(small_rule(), task, steps=4, unroll=2, meta_iterations=1, progress=False, validate_every=0)


def test_a_run_whose_every_update_was_skipped_warns():
    finite = [True]
    task = Task(
        tiny_model, lambda out, y: nn.functional.mse_loss(out, y) * (1.0 if finite[0] else math.nan), tiny_sampler
    )
    rule = small_rule()
    before = copy.deepcopy(rule.state_dict())
    trainer = MetaTrainer(rule, task, _config(3, validate_every=0), progress=False)
    finite[0] = False  # finite when checked, NaN in training
    with pytest.warns(RuntimeWarning, match="all 3 meta-gradient updates were skipped"):
        trainer.run()
    assert trainer.history.skipped_updates == 3
    assert all(torch.equal(v, before[k]) for k, v in rule.state_dict().items())


def test_meta_fit_resume_flag_continues_from_checkpoint(tmp_path):
    common = dict(steps=7, unroll=3, meta_lr=1e-2, validate_every=0, checkpoint_every=2, progress=False)
    straight = meta_fit(small_rule(), tiny, meta_iterations=7, **common)
    meta_fit(small_rule(), tiny, meta_iterations=5, checkpoint_dir=tmp_path, **common)
    resumed = meta_fit(small_rule(), tiny, meta_iterations=7, checkpoint_dir=tmp_path, resume=True, **common)
    assert resumed.meta_fit_history.meta_losses == straight.meta_fit_history.meta_losses
    assert same_weights(weights(resumed), weights(straight))


def test_time_budget_stop_writes_a_checkpoint(tmp_path):
    # A budget of 0 s stops after the first iteration, which is not a checkpoint iteration.
    trainer = MetaTrainer(
        small_rule(), tiny, _config(20, checkpoint_every=10, validate_every=0), tmp_path, progress=False, time_budget=0
    )
    trainer.run()
    assert trainer.history.iteration == 1
    resumed = MetaTrainer(small_rule(), tiny, _config(20, checkpoint_every=10, validate_every=0), progress=False)
    resumed.load_checkpoint(tmp_path)
    assert resumed.history.iteration == 1
    # The budget counts over the whole run: spent, a resume takes no step (it used to take one).
    config = _config(20, checkpoint_every=10, validate_every=0)
    spent = MetaTrainer(small_rule(), tiny, config, tmp_path, progress=False, time_budget=0)
    spent.load_checkpoint(tmp_path)
    spent.run()
    assert spent.history.iteration == 1
    larger = MetaTrainer(small_rule(), tiny, config, tmp_path, progress=False, time_budget=3600)
    larger.load_checkpoint(tmp_path)
    larger.run()
    assert larger.history.iteration == 20


def _dropout_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 1))


def _batchnorm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


def test_batchnorm_statistics_follow_each_instance_and_leave_the_model_alone():
    # The running statistics advance once per step taken (not for the loss measured after a
    # truncation's last step), in the run's own copies: the module the factory built keeps its
    # initial buffers, which a fresh instance of the same seed starts from.
    trainer = MetaTrainer(small_rule(), make_tiny(model=_batchnorm_model), _config(2, steps=6), progress=False)
    run = trainer._new_run(0, 5, 6)
    fresh = {k: v.clone() for k, v in run.instance.model.state_dict().items() if "running" in k or "tracked" in k}
    while run.steps_done < run.horizon:
        trainer._unroll([run])
    assert int(run.buffers["1.num_batches_tracked"]) == 6
    assert not torch.equal(run.buffers["1.running_mean"], fresh["1.running_mean"])
    assert all(torch.equal(run.instance.model.state_dict()[k], v) for k, v in fresh.items())
    # The same statistics as six steps of the rule through rollout (whose rule steps may run
    # the fused kernel: equal to rounding).
    from learned_optim.meta_fit import _rollout

    _, _, _, (_, end_buffers) = _rollout(trainer.rule, make_tiny(model=_batchnorm_model).sample(5), 6, 1.0)
    assert end_buffers.keys() == run.buffers.keys()
    for name, value in run.buffers.items():
        torch.testing.assert_close(end_buffers[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_model_resumes_exactly_and_leaves_the_global_rng_alone(tmp_path):
    # Dropout draws from the global RNG: meta_fit seeds it per instance and batch, so the
    # masks are the same after a resume (and whatever the caller's RNG state), and the
    # caller's RNG is left as it was.
    def task():
        return make_tiny(name="dropout", model=_dropout_model)

    total = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        before = torch.get_rng_state()
        straight_trainer = MetaTrainer(straight := small_rule(), task(), _config(total), progress=False)
        straight_trainer.run()
        assert torch.equal(torch.get_rng_state(), before)

    def crash(history):
        if history.iteration == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        MetaTrainer(small_rule(), task(), _config(total), tmp_path, progress=False, callback=crash).run()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)  # another process: another global RNG state
        trainer = MetaTrainer(resumed := small_rule(), task(), _config(total), tmp_path, progress=False)
        trainer.load_checkpoint(tmp_path)
        assert trainer.history.iteration == 4
        trainer.run()
    assert trainer.history.meta_losses == straight_trainer.history.meta_losses
    assert trainer.history.validation == straight_trainer.history.validation
    assert same_weights(weights(resumed), weights(straight))


def test_a_checkpoint_save_cut_off_at_any_point_leaves_a_consistent_checkpoint(tmp_path, monkeypatch):
    # A kill between the files of a checkpoint must leave the previous checkpoint whole, not
    # the new weights beside the old bookkeeping (which resumes silently wrong).
    import shutil

    straight = MetaTrainer(small_rule(), tiny, _config(8, checkpoint_every=2, validate_every=0), progress=False)
    straight.run()
    good = tmp_path / "good"
    MetaTrainer(small_rule(), tiny, _config(2, checkpoint_every=2, validate_every=0), good, progress=False).run()
    real_replace = os.replace
    for fail_at in range(6):
        ckpt = tmp_path / f"cut-{fail_at}"
        shutil.copytree(good, ckpt)
        trainer = MetaTrainer(small_rule(), tiny, _config(8, checkpoint_every=2, validate_every=0), progress=False)
        trainer.load_checkpoint(ckpt)
        trainer.step()
        trainer.step()
        calls = {"n": 0}

        def replace(src, dst, calls=calls, fail_at=fail_at):
            calls["n"] += 1
            if calls["n"] > fail_at:
                raise Interrupt
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with contextlib.suppress(Interrupt):
            trainer.save_checkpoint(ckpt)
        monkeypatch.setattr(os, "replace", real_replace)
        resumed = MetaTrainer(small_rule(), tiny, _config(8, checkpoint_every=2, validate_every=0), progress=False)
        resumed.load_checkpoint(ckpt)
        assert resumed.history.iteration in (2, 4)
        resumed.run()
        assert resumed.history.meta_losses == straight.history.meta_losses, fail_at
        assert same_weights(weights(resumed.rule), weights(straight.rule)), fail_at


def test_a_validation_instance_whose_first_loss_is_nan_scores_inf():
    from learned_optim.meta_fit import VALIDATION_SEED_BASE
    from learned_optim.tasks import TaskFamily, TaskInstance

    class FirstBatchNaN(TaskFamily):
        name = "first-nan"

        def sample(self, seed):
            instance = tiny.sample(seed)

            def batches():
                g = torch.Generator().manual_seed(seed)
                x, y = tiny_sampler(g)
                # Validation instances only: a family whose probe loss is NaN is refused up front.
                yield x, y * (float("nan") if seed >= VALIDATION_SEED_BASE else 1.0)
                while True:
                    yield tiny_sampler(g)

            return TaskInstance(model=instance.model, loss=instance.loss, batches=batches(), name=self.name)

    trainer = MetaTrainer(small_rule(), FirstBatchNaN(), _config(2, validation_instances=1), progress=False)
    assert trainer.validate() == float("inf")


def _cli_meta_fit(out, iterations, *extra):
    return main(
        [
            "meta-fit", "--task", "tiny_tasks:tiny", "--out", str(out), "--rule-config", '{"hidden_size": 8}',
            "--steps", "7", "--unroll", "3", "--meta-iterations", str(iterations), "--meta-lr", "0.01",
            "--checkpoint-every", "2", "--validate-every", "0", "--seed", "3", "--quiet", *extra,
        ]
    )  # fmt: skip


def test_cli_resume_equals_straight_run(tmp_path, capsys):
    with torch.random.fork_rng(devices=[]):  # the CLI seeds the global RNG
        assert _cli_meta_fit(tmp_path / "straight", 8) == 0
        assert _cli_meta_fit(tmp_path / "split", 5) == 0  # stops mid-instance (7 steps = 3 + 3 + 1)
        # Starting again without --resume must not silently clobber the checkpoint.
        capsys.readouterr()
        assert _cli_meta_fit(tmp_path / "split", 8) == 2
        assert "--resume" in capsys.readouterr().err
        assert _cli_meta_fit(tmp_path / "split", 8, "--resume") == 0
    assert "resumed at meta-iteration 5" in capsys.readouterr().err
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert same_weights(straight, resumed)
    config = (tmp_path / "split" / "config.json").read_text()
    assert "Infinity" not in config and "NaN" not in config  # written as strict JSON
    assert "--resume" in config  # the recorded command is this one, not pytest's argv


def test_cli_pes_estimator_trains_and_resumes(tmp_path, capsys):
    pes = ("--estimator", "pes", "--pes-pairs", "2", "--pes-std", "0.05")
    with torch.random.fork_rng(devices=[]):  # the CLI seeds the global RNG
        assert _cli_meta_fit(tmp_path / "straight", 6, *pes) == 0
        assert _cli_meta_fit(tmp_path / "split", 4, *pes) == 0
        assert _cli_meta_fit(tmp_path / "split", 6, *pes, "--resume") == 0
        capsys.readouterr()
        # A checkpoint of one estimator is not continued with the other.
        assert _cli_meta_fit(tmp_path / "split", 8, "--resume") == 2
        assert "estimator" in capsys.readouterr().err
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert same_weights(straight, load_file(str(tmp_path / "split" / "model.safetensors")))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # what the CLI's --seed 3 built before training
        start = weights(CoordinateLSTM(hidden_size=8))
    assert not same_weights(straight, start)


def test_cli_init_starts_from_given_weights_and_checks_the_rule(tmp_path, capsys):
    with torch.random.fork_rng(devices=[]):
        assert _cli_meta_fit(tmp_path / "a", 2) == 0
        # One meta-step of Adam at lr 1e-9 moves each weight by about 1e-9: the result is the
        # --init weights, not a fresh rule's.
        second = ["--init", str(tmp_path / "a"), "--meta-lr", "1e-9"]
        assert _cli_meta_fit(tmp_path / "b", 1, *second) == 0
    first = load_file(str(tmp_path / "a" / "model.safetensors"))
    started = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert first.keys() == started.keys()
    for key in first:
        assert torch.allclose(first[key], started[key], atol=1e-7)
    assert not torch.allclose(first["output.weight"], CoordinateLSTM(hidden_size=8).output.weight, atol=1e-3)
    assert "continues as" not in capsys.readouterr().err  # same config: nothing to say
    # A narrower rule than the 8-unit one in "a" cannot start from it: "error: ..." and exit 2.
    base = ["meta-fit", "--task", "tiny_tasks:tiny", "--init", str(tmp_path / "a"), "--meta-iterations", "0"]
    assert main([*base, "--out", str(tmp_path / "bad"), "--rule-config", '{"hidden_size": 4}']) == 2
    assert "error: --init" in capsys.readouterr().err
    # The default config (20 units) widens it, and the CLI says so.
    assert main([*base, "--out", str(tmp_path / "wide"), "--quiet"]) == 0
    assert "'hidden_size': 8" in capsys.readouterr().err
    assert load_file(str(tmp_path / "wide" / "model.safetensors"))["output.weight"].shape == (1, 20)


def test_cli_meta_fit_refuses_to_write_over_other_files(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"mine": true}')
    assert main(["meta-fit", "--task", "tiny_tasks:tiny", "--out", str(tmp_path), "--meta-iterations", "1"]) == 2
    assert "not empty and holds no meta-fit checkpoint" in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'
    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    assert main(["meta-fit", "--task", "tiny_tasks:tiny", "--out", str(file_out)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["compare", "--task", "quadratic", "--threads", "-1", "--out", str(tmp_path / "c")]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------- user tasks
def test_plain_module_task_with_sampler_and_dataloader():
    sampled = Task(model=tiny_model, loss=nn.functional.mse_loss, data=tiny_sampler, name="sampled")
    loaded = Task(model=tiny_model, loss=nn.functional.mse_loss, data=tiny_loader(), name="loaded")
    rule = meta_fit(
        small_rule(), [sampled, loaded], steps=20, unroll=5, meta_iterations=40, meta_lr=1e-2,
        validate_every=20, validation_instances=2, progress=False,
    )  # fmt: skip
    history = rule.meta_fit_history
    assert history.skipped_updates == 0
    assert all(math.isfinite(v) for v in history.meta_losses)
    assert all(torch.isfinite(p).all() for p in rule.parameters())

    # The meta-trained rule drives an ordinary training loop on the DataLoader, and ends far
    # lower than the rule it started from.
    def train(trained_rule):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = tiny_model()
            optimizer = LearnedOptimizer(model.parameters(), pretrained=trained_rule)
            with torch.no_grad():
                start = nn.functional.mse_loss(model(TRAIN_X), TRAIN_Y).item()
            for _ in range(3):
                for x, y in tiny_loader():
                    optimizer.zero_grad()
                    nn.functional.mse_loss(model(x), y).backward()
                    optimizer.step()
        with torch.no_grad():
            return start, nn.functional.mse_loss(model(TRAIN_X), TRAIN_Y).item()

    start, end = train(rule)
    _, untrained_end = train(small_rule())
    assert math.isfinite(end) and end < 0.5 * start and end < 0.5 * untrained_end, (start, end, untrained_end)


def test_float64_model():
    def sampler(generator):
        x, y = tiny_sampler(generator)
        return x.double(), y.double()

    task = Task(model=lambda: tiny_model().double(), loss=nn.functional.mse_loss, data=sampler, name="double")
    rule = small_rule()
    before = weights(rule)
    meta_fit(rule, task, steps=6, unroll=3, meta_iterations=3, validate_every=3, validation_instances=1, progress=False)
    assert rule.meta_fit_history.skipped_updates == 0
    assert not same_weights(weights(rule), before)
    losses = rollout(rule, task.sample(EVALUATION_SEED_BASE), 4)
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)


def test_second_order_meta_gradients_of_a_momentum_rule_are_finite_where_gradients_are_zero():
    # Like MNIST's border pixels: an input that is always zero gives its weights exactly zero
    # gradients, where the momentum inputs m / sqrt(v) are 0 / 0 (a NaN second-order gradient
    # once, so every update was skipped).
    def sampler(generator):
        x, y = tiny_sampler(generator)
        return torch.cat((x, torch.zeros(len(x), 1)), dim=1), y

    task = Task(
        model=lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
        loss=nn.functional.mse_loss,
        data=sampler,
    )
    torch.manual_seed(0)
    rule = CoordinateLSTM(hidden_size=4, momentum_decays=[0.5, 0.9])
    before = weights(rule)
    meta_fit(rule, task, steps=6, unroll=3, meta_iterations=3, second_order=True, validate_every=0, progress=False)
    assert rule.meta_fit_history.skipped_updates == 0
    assert not same_weights(weights(rule), before)
    assert all(torch.isfinite(w).all() for w in rule.parameters())


# ---------------------------------------------------------------------------- errors
def _fit(task, **kwargs):
    settings = dict(steps=5, unroll=5, meta_iterations=2, validate_every=0, progress=False)
    settings.update(kwargs)
    return meta_fit(small_rule(), task, **settings)


def test_loss_returning_non_scalar():
    task = Task(model=tiny_model, loss=lambda out, y: (out - y) ** 2, data=tiny_sampler)
    with pytest.raises(TaskError, match=r"loss must return a scalar \(one-element\) tensor, got \(16, 1\)"):
        _fit(task)


def test_a_loss_of_another_signature_is_named_with_the_calling_convention():
    def loss_of_model_and_batch(model, batch):  # a common convention, not ours
        inputs, targets = batch
        return nn.functional.mse_loss(model(inputs), targets)

    task = Task(model=tiny_model, loss=loss_of_model_and_batch, data=tiny_sampler)
    with pytest.raises(TaskError, match=r"loss is called as `loss\(model\(inputs\), targets\)` and raised ValueError"):
        _fit(task)


def test_a_model_that_cannot_take_the_inputs_is_named():
    task = Task(model=lambda: nn.Linear(5, 1), loss=nn.functional.mse_loss, data=tiny_sampler)  # inputs have 3
    with pytest.raises(TaskError, match=r"the model is called on each batch's inputs.*raised RuntimeError"):
        _fit(task)


def test_model_without_parameters():
    task = Task(model=nn.Tanh, loss=nn.functional.mse_loss, data=tiny_sampler)
    with pytest.raises(TaskError, match="no trainable parameters"):
        _fit(task)


def test_model_factory_not_returning_a_module():
    task = Task(model=lambda: "not a module", loss=nn.functional.mse_loss, data=tiny_sampler)
    with pytest.raises(TaskError, match=r"model factory returned str, expected an nn\.Module"):
        _fit(task)


def test_a_module_instance_instead_of_a_factory():
    task = Task(model=nn.Linear(4, 1), loss=nn.functional.mse_loss, data=tiny_sampler)
    with pytest.raises(TaskError, match=r"model must be a factory .*got an Linear instance"):
        _fit(task)


def test_a_factory_returning_the_same_module_every_time():
    # Every instance would start from the weights the previous one was trained to (compare
    # trains instance.model in place): the second SGD run began at loss 5e-4 instead of 5.8.
    shared = tiny_model()
    task = Task(model=lambda: shared, loss=nn.functional.mse_loss, data=tiny_sampler)
    with pytest.raises(TaskError, match="returned a module whose trainable parameters it returned before"):
        task.sample(0)
    with pytest.raises(TaskError, match="returned a module whose trainable parameters it returned before"):
        _fit(task)
    layer = nn.Linear(3, 8)  # shared trainable layers inside fresh modules are as bad
    task = Task(
        model=lambda: nn.Sequential(layer, nn.Tanh(), nn.Linear(8, 1)), loss=nn.functional.mse_loss, data=tiny_sampler
    )
    with pytest.raises(TaskError, match="shared layers"):
        task.sample(0)


def test_a_shared_frozen_backbone_is_fine():
    backbone = nn.Linear(3, 8).requires_grad_(False)
    task = Task(
        model=lambda: nn.Sequential(backbone, nn.Tanh(), nn.Linear(8, 1)),
        loss=nn.functional.mse_loss,
        data=tiny_sampler,
    )
    first, second = task.sample(0), task.sample(1)
    assert first.model[0] is second.model[0] and first.model[2] is not second.model[2]
    assert math.isfinite(_fit(task).meta_fit_history.meta_losses[-1])


def test_checking_an_instance_leaves_a_shared_backbones_batchnorm_statistics_alone():
    # The first-batch checks of Task.sample and meta_fit's probe run the model in training
    # mode: a shared frozen backbone's running statistics must not move (a second identical
    # meta_fit would otherwise start from another backbone).
    backbone = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8)).requires_grad_(False)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    task = Task(
        model=lambda: nn.Sequential(backbone, nn.Tanh(), nn.Linear(8, 1)),
        loss=nn.functional.mse_loss,
        data=tiny_sampler,
        train_set=(TRAIN_X, TRAIN_Y),
    )
    task.sample(0)
    _fit(task)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("split", ["train_set", "test_set"])
def test_a_split_the_model_cannot_take_is_named_before_training(split):
    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=tiny_sampler, **{split: (TRAIN_X[:, :2], TRAIN_Y)})
    with pytest.raises(
        TaskError, match=f"{split} is evaluated as `loss\\(model\\(inputs\\), targets\\)`, which raised"
    ):
        task.sample(0)
    scalar_only_on_batches = Task(
        model=tiny_model,
        loss=lambda out, y: nn.functional.mse_loss(out, y, reduction="none" if len(y) > 64 else "mean"),
        data=tiny_sampler,
        **{split: (TRAIN_X, TRAIN_Y)},
    )
    with pytest.raises(TaskError, match=f"on {split}, loss must return a scalar"):
        scalar_only_on_batches.sample(0)


class _FamilyOf(TaskFamily):
    """A family whose ``sample`` returns ``make(seed)``: a user's mistakes."""

    name = "user-family"

    def __init__(self, make):
        self.make = make

    def sample(self, seed):
        return self.make(seed)


def test_a_family_that_samples_something_else_is_named():
    family = _FamilyOf(lambda seed: (tiny_model(), nn.functional.mse_loss))
    with pytest.raises(
        TaskError, match=r"_FamilyOf.sample\(seed\) must return a learned_optim.tasks.TaskInstance.*got tuple"
    ):
        meta_fit(small_rule(), family, steps=4, unroll=2, meta_iterations=1, progress=False, validate_every=0)
    with pytest.raises(TaskError, match=r"must return a learned_optim\.tasks\.TaskInstance"):
        compare(family, rules=[small_rule()], steps=2, seeds=1, baselines=("sgd",), grid=(0.1,), progress=False)
    batch = tiny_sampler(torch.Generator().manual_seed(0))
    with pytest.raises(TaskError, match=r"batches must be an iterator .*got list \(a list or other re-iterable"):
        TaskInstance(model=tiny_model(), loss=nn.functional.mse_loss, batches=[batch, batch])


def test_an_update_skipped_for_a_non_finite_meta_gradient_records_nan():
    rule = small_rule()
    trainer = MetaTrainer(rule, tiny, _config(1, validate_every=0), progress=False)
    # A finite meta-loss whose meta-gradient is not: a hook that poisons one weight's gradient.
    handle = next(rule.parameters()).register_hook(lambda g: g * math.nan)
    before = copy.deepcopy(rule.state_dict())
    assert math.isnan(trainer.step())
    handle.remove()
    assert trainer.history.skipped_updates == 1 and math.isnan(trainer.history.meta_losses[-1])
    assert all(torch.equal(v, before[k]) for k, v in rule.state_dict().items())


@pytest.mark.parametrize("split", ["train_set", "test_set"])
def test_a_split_that_is_not_one_pair_of_tensors(split):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(TRAIN_X, TRAIN_Y), batch_size=64)
    assert len(loader) == 2  # unpacked as (inputs, targets) = (first batch, second batch) before
    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=tiny_sampler, **{split: loader})
    with pytest.raises(TaskError, match=f"{split} must be the whole split as one pair .*got DataLoader"):
        task.sample(0)
    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=tiny_sampler, **{split: (TRAIN_X,)})
    with pytest.raises(TaskError, match=f"{split} must be .*got tuple of length 1"):
        _fit(task)


@pytest.mark.parametrize("source", ["list", "sampler"])
def test_a_later_batch_that_is_not_a_pair(source):
    # Only the first batch is tried before meta-training; a later bad one must still be named.
    good = tiny_sampler(torch.Generator().manual_seed(0))
    if source == "list":
        data = [good, good, (*good, good[1])]
        message = r"task 'tiny': batch 3 must be a pair \(inputs, targets\), got tuple of length 3"
    else:
        calls = itertools.count()
        data = lambda g: tiny_sampler(g) if next(calls) < 2 else "a string"  # noqa: E731
        message = r"task 'tiny': batch \d+ must be a pair \(inputs, targets\), got str"  # of a later instance
    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=data, name="tiny")
    with pytest.raises(TaskError, match=message):
        _fit(task)


def test_a_model_with_sparse_gradients():
    def model() -> nn.Module:
        return nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 1))

    data = lambda g: (torch.randint(0, 10, (16, 2), generator=g), torch.randn(16, 1, generator=g))  # noqa: E731
    task = Task(model=model, loss=nn.functional.mse_loss, data=data, name="embed")
    with pytest.raises(TaskError, match=r"module '0' makes sparse gradients.*sparse=False"):
        _fit(task)


@pytest.mark.parametrize("endless", [False, True])
def test_one_shot_iterators_are_refused(endless):
    # Even an endless one: instances would share one stream, so none could be replayed.
    seeds = itertools.count() if endless else range(4)
    batches = (tiny_sampler(torch.Generator().manual_seed(i)) for i in seeds)
    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=batches)
    with pytest.raises(TaskError, match=r"data is a one-shot iterator \(generator\)"):
        _fit(task, steps=10, meta_iterations=4)


def test_data_that_runs_out():
    class TwoBatchesOnce:  # an iterable that is empty the second time round
        def __init__(self):
            self.batches = [tiny_sampler(torch.Generator().manual_seed(i)) for i in range(2)]

        def __iter__(self):
            batches, self.batches = self.batches, []
            return iter(batches)

    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=TwoBatchesOnce())
    with pytest.raises(TaskError, match="data ran out after"):
        _fit(task, steps=10, meta_iterations=4)


def test_a_sampler_of_another_signature_is_named_with_the_calling_convention():
    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=lambda: tiny_sampler(torch.Generator()))
    with pytest.raises(TaskError, match=r"sampler is called as `data\(generator\)`.*raised TypeError at batch 1"):
        _fit(task)


class _UsesHeadOnOddBatches(nn.Module):
    def __init__(self, always_unused: bool):
        super().__init__()
        self.body = nn.Linear(3, 1)
        self.head = nn.Linear(1, 1)
        self.always_unused = always_unused
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.body(x)
        # The first call (the task check) uses the head; from the second on it skips it every other call.
        return self.head(out) if not self.always_unused and self.calls % 2 else out


@pytest.mark.parametrize("always_unused", [True, False])
def test_parameters_the_loss_does_not_reach_are_named(always_unused):
    task = Task(
        model=lambda: _UsesHeadOnOddBatches(always_unused),
        loss=nn.functional.mse_loss,
        data=tiny_sampler,
        name="sometimes",
    )
    message = r"task 'sometimes': trainable parameter\(s\) 'head.weight', 'head.bias' get no gradient.*requires_grad_"
    with pytest.raises(TaskError, match=message):
        _fit(task, steps=6, unroll=3)


def test_a_task_family_whose_batches_run_out_is_named():
    class Finite(TaskFamily):
        name = "finite"

        def sample(self, seed):
            batches = iter([tiny_sampler(torch.Generator().manual_seed(seed + i)) for i in range(3)])
            return TaskInstance(model=tiny_model(), loss=nn.functional.mse_loss, batches=batches, name="finite")

    with pytest.raises(TaskError, match=r"task 'finite': the instance's batches ran out; .* must be endless"):
        _fit(Finite(), steps=10, unroll=5)


def test_empty_data():
    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=[])
    with pytest.raises(TaskError, match="ran out after 0 batch"):
        _fit(task)


def test_a_single_pair_of_tensors_as_data_is_named_with_the_fix():
    task = Task(model=tiny_model, loss=nn.functional.mse_loss, data=(TRAIN_X, TRAIN_Y))
    with pytest.raises(
        TaskError, match=r"data is one pair of tensors .*pass a list holding it: data=\[\(inputs, targets\)\]"
    ):
        _fit(task)
    _fit(Task(model=tiny_model, loss=nn.functional.mse_loss, data=[(TRAIN_X, TRAIN_Y)]))  # the fix works


def test_a_dataloader_with_persistent_workers_is_refused_before_any_work():
    # PyTorch keeps one iterator per such loader: instances iterating it reset each other's epochs.
    factory = Counter()
    loader = DataLoader(TensorDataset(TRAIN_X, TRAIN_Y), batch_size=16, num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match=r"persistent_workers=True.*build it with persistent_workers=False"):
        _fit(make_tiny(model=factory, data=loader))
    assert factory.calls == 0


@pytest.mark.parametrize(
    ("setting", "error", "message"),
    [
        ({"checkpoint_dir": "FILE"}, ValueError, r"checkpoint_dir '.*a-file': it exists and is not a folder"),
        ({"checkpoint_dir": "FILE/sub"}, ValueError, r"checkpoint_dir '.*a-file/sub': .*a-file exists and is not a"),
        ({"checkpoint_dir": 5}, TypeError, "checkpoint_dir must be a folder path"),
        ({"callback": 5}, TypeError, "callback must be a function called with the history .* got int"),
        ({"validation_lr_scales": 1.0}, TypeError, r"validation_lr_scales must be a sequence of .*got 1.0"),
        ({"validation_lr_scales": "1"}, TypeError, r"validation_lr_scales must be a sequence of .*got '1'"),
    ],
)
def test_bad_arguments_are_named_before_any_work(tmp_path, setting, error, message):
    (tmp_path / "a-file").write_text("x")
    if isinstance(setting.get("checkpoint_dir"), str):
        setting = {"checkpoint_dir": str(tmp_path / setting["checkpoint_dir"].replace("FILE", "a-file"))}
    factory = Counter()
    with pytest.raises(error, match=message):
        _fit(make_tiny(model=factory), validate_every=1, **setting)
    assert factory.calls == 0  # no instance was built, let alone trained
    assert (tmp_path / "a-file").read_text() == "x"


def test_resume_without_checkpoint_dir():
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        _fit("quadratic", resume=True)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"unroll": 0}, "unroll must be an integer >= 1, got 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"meta_iterations": 2.5}, "meta_iterations must be an integer >= 0, got 2.5"),
        ({"instances": 2.5}, "instances must be an integer >= 1, got 2.5"),
        ({"meta_lr": float("inf")}, "meta_lr must be a finite number, got inf"),
        ({"lr_scale_range": float("inf")}, "lr_scale_range must be a finite number, got inf"),
        ({"steps": "10"}, "steps must be an integer >= 1, got '10'"),
        ({"meta_loss": "bogus"}, "meta_loss must be one of 'log', 'mean', 'ramp', 'log-ramp', 'final', got 'bogus'"),
        ({"meta_lr": 0.0}, "meta_lr must be > 0"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"log_floor": 1.0}, r"log_floor must be in \[0, 1\), got 1.0"),
        ({"lr_scale_range": 0.5}, "lr_scale_range must be >= 1, got 0.5"),
        ({"validation_steps": -1}, "validation_steps must be an integer >= 0, got -1"),
        ({"validation_lr_scales": ()}, "validation_lr_scales must be a non-empty sequence of finite numbers > 0"),
        ({"validation_lr_scales": (1.0, 0.0)}, r"validation_lr_scales .* got \(1.0, 0.0\)"),
        ({"validation_lr_scales": (float("inf"),)}, "validation_lr_scales must be"),
        ({"estimator": "es"}, "estimator must be one of 'tbptt', 'pes', got 'es'"),
        ({"estimator": "pes", "pes_pairs": 0}, "pes_pairs must be an integer >= 1, got 0"),
        ({"estimator": "pes", "pes_std": 0.0}, "pes_std must be a finite number > 0, got 0.0"),
        ({"pes_std": -1.0}, "pes_std must be a finite number > 0, got -1.0"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, 9223372036854775807\]"),
        ({"estimator": "pes", "second_order": True}, "forward only"),
        ({"estimator": "pes", "meta_grad_fraction": 0.5}, "forward only"),
        ({"clip_grad_norm": -1.0}, r"clip_grad_norm must be >= 0 \(0: no clipping\), got -1.0"),
        ({"ramp_power": -1.0}, r"ramp_power must be in \[0, 16\], got -1.0"),
        ({"ramp_power": float("nan")}, "ramp_power must be a finite number"),
        ({"validation_metric": "last"}, "validation_metric must be one of 'objective', 'final', got 'last'"),
        ({"time_budget": float("nan")}, r"time_budget must be a finite number >= 0 \(seconds\) or None, got nan"),
        ({"time_budget": -1}, "time_budget must be a finite number >= 0"),
    ],
)
def test_invalid_config(setting, message):
    with pytest.raises(ValueError, match=message):
        _fit("quadratic", **setting)


def test_rule_and_tasks_type_errors():
    with pytest.raises(TypeError, match="UpdateRule"):
        meta_fit(nn.Linear(2, 2), "quadratic", progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tasks must be"):
        meta_fit(small_rule(), [42], progress=False)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"tasks must be .* got int"):
        meta_fit(small_rule(), 42, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        meta_fit(small_rule(), "nope", progress=False)


# ---------------------------------------------------------------------------- non-finite
def test_nan_meta_loss_skips_the_update():
    poison = {"on": False}

    def loss(out, y):
        value = nn.functional.mse_loss(out, y)
        return value * float("nan") if poison["on"] else value

    task = Task(model=tiny_model, loss=loss, data=tiny_sampler, name="poisoned")
    snapshots = [weights(rule := small_rule())]

    def callback(history):
        snapshots.append(weights(rule))
        poison["on"] = history.iteration == 3  # iteration 4 sees NaN losses

    meta_fit(
        rule, task, steps=20, unroll=5, meta_iterations=6, meta_lr=1e-2, validate_every=0,
        progress=False, callback=callback,
    )  # fmt: skip
    history = rule.meta_fit_history
    assert history.skipped_updates == 1
    assert math.isnan(history.meta_losses[3])
    assert all(math.isfinite(v) for i, v in enumerate(history.meta_losses) if i != 3)
    # snapshots[i] = weights after iteration i
    assert same_weights(snapshots[4], snapshots[3])  # the skipped iteration changed nothing
    assert not same_weights(snapshots[5], snapshots[4])  # training goes on afterwards
    assert not same_weights(snapshots[3], snapshots[2])
    assert all(torch.isfinite(v).all() for snap in snapshots for v in snap.values())


def test_exploding_rule_skips_every_update():
    rule = small_rule(output_scale=1e30)  # updates of ~1e28: the optimizee loss overflows to inf
    before = weights(rule)
    with pytest.warns(RuntimeWarning, match="all 4 meta-gradient updates were skipped") as caught:
        meta_fit(rule, tiny, steps=6, unroll=3, meta_iterations=4, validate_every=0, progress=False)
    assert caught[0].filename == __file__  # points at the meta_fit call
    history = rule.meta_fit_history
    assert history.skipped_updates == 4
    assert all(not math.isfinite(v) for v in history.meta_losses)
    assert same_weights(weights(rule), before)


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_weights_different_seed_differs():
    def fit(seed):
        rule = small_rule()
        meta_fit(rule, "quadratic", steps=10, unroll=5, meta_iterations=6, meta_lr=1e-2, validate_every=0,
                 seed=seed, progress=False)  # fmt: skip
        return weights(rule)

    first, again, other = fit(0), fit(0), fit(1)
    assert same_weights(first, again)
    assert not same_weights(first, other)


def test_lr_scale_range_draws_log_uniform_scales_for_training_instances_only():
    trainer = MetaTrainer(small_rule(), make_tiny(), _config(4, lr_scale_range=10.0), progress=False)
    scales = [trainer._new_run().lr_scale for _ in range(200)]
    assert all(0.1 <= s <= 10.0 for s in scales)
    logs = torch.log10(torch.tensor(scales))
    assert logs.min() < -0.8 and logs.max() > 0.8 and abs(float(logs.mean())) < 0.15
    # Validation instances (explicit horizon) run at the rule's own scale.
    assert trainer._new_run(0, 10**8, 7).lr_scale == 1.0
    # Off by default: no scale, and the random stream is the one of earlier versions.
    plain = MetaTrainer(small_rule(), make_tiny(), _config(4), progress=False)
    assert {plain._new_run().lr_scale for _ in range(20)} == {1.0}


def test_lr_scale_multiplies_the_updates_applied_in_meta_training():
    # Same instance, scale 3 vs 1: the first update differs by exactly that factor.
    rule = small_rule()
    trainer = MetaTrainer(rule, make_tiny(), _config(4), progress=False)
    runs = []
    for scale in (1.0, 3.0):
        run = trainer._new_run(0, 123, 7, lr_scale=scale)
        start = [p.clone() for p in run.params]
        trainer.config.unroll = 1
        trainer._unroll([run])
        runs.append([p - q for p, q in zip(run.params, start, strict=True)])
    for one, three in zip(*runs, strict=True):
        # Differences of fp32 parameters (|p| < 1) carry up to ~1.2e-7 rounding; steps are ~1e-5.
        assert torch.allclose(three, 3.0 * one, rtol=0, atol=2.5e-7)
        assert one.abs().sum() > 0


def test_log_floor_bounds_each_steps_log_ratio():
    from learned_optim.meta_fit import _log_ratio

    losses = torch.tensor([1.0, 1e-2, 1e-6])
    assert torch.allclose(_log_ratio(losses, 1.0, 0.0), torch.log(losses))
    floored = _log_ratio(losses, 1.0, 1e-3)
    assert torch.allclose(floored, torch.tensor([0.0, math.log(1e-2), math.log(1e-3)]))


def test_low_precision_losses_give_the_fp32_meta_loss():
    # fp16: the 1e-12 clamp rounds to 0 (log(0) = -inf); bf16: step indices above 256 are inexact.
    config = MetaFitConfig(steps=1000, unroll=1000, meta_loss="log-ramp")
    losses = torch.linspace(1.0, 0.0, 1000)
    expected = _objective(losses, 1.0, 1, 1000, config)
    for dtype in (torch.float16, torch.bfloat16):
        low = losses.to(dtype)
        got = _objective(low, 1.0, 1, 1000, config)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, _objective(low.float(), 1.0, 1, 1000, config), rtol=0, atol=0)
        assert torch.isfinite(got) and abs(float(got - expected)) < 0.05 * abs(float(expected))


def test_validation_steps_sets_the_validation_horizon(monkeypatch):
    import learned_optim.meta_fit as mf

    horizons = []
    real_rollout = mf._rollout

    def recording_rollout(rule, instance, steps, *args, **kwargs):
        horizons.append(steps)
        return real_rollout(rule, instance, steps, *args, **kwargs)

    monkeypatch.setattr(mf, "_rollout", recording_rollout)
    for validation_steps, expected in ((0, 7), (23, 23)):
        horizons.clear()
        MetaTrainer(small_rule(), make_tiny(), _config(2, validation_steps=validation_steps), progress=False).run()
        assert horizons and set(horizons) == {expected}


def test_validation_lr_scales_score_the_mean_over_the_multipliers():
    rule = small_rule()

    def score(scales):
        return MetaTrainer(rule, make_tiny(), _config(2, validation_lr_scales=scales), progress=False).validate()

    one, half, double = score((1.0,)), score((0.5,)), score((2.0,))
    assert len({one, half, double}) == 3  # the multiplier reaches the validation runs
    assert score((0.5, 2.0)) == pytest.approx((half + double) / 2, rel=1e-12)
    assert one == MetaTrainer(rule, make_tiny(), _config(2), progress=False).validate()  # default: 1 only


def test_cli_validation_lr_scales(tmp_path, capsys):
    assert _cli_meta_fit(tmp_path / "a", 2, "--validation-lr-scales", "0.1,1,10") == 0
    meta = json.loads((tmp_path / "a" / "config.json").read_text())["metadata"]
    assert "--validation-lr-scales 0.1,1,10" in meta["command"]
    for bad in ("0.1,x", "1,0", "1,inf"):
        with pytest.raises(SystemExit):
            _cli_meta_fit(tmp_path / "b", 2, "--validation-lr-scales", bad)
        assert "--validation-lr-scales" in capsys.readouterr().err


@pytest.mark.parametrize("meta_loss", ["ramp", "log-ramp"])
def test_ramp_meta_loss_weights_steps_linearly_across_truncations(meta_loss):
    # Across truncations, step t of a horizon T gets weight 2t / (T + 1), whatever the unroll.
    from learned_optim.meta_fit import _ramp_weights

    weights = _ramp_weights(torch.arange(1, 11, dtype=torch.float64), 10)
    assert torch.allclose(weights.mean(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(weights[1:] - weights[:-1], torch.full((9,), 2 / 11, dtype=torch.float64))

    def per_step(losses: list[float]) -> torch.Tensor:
        trace = torch.tensor(losses[1:], dtype=torch.float64)
        return torch.log(trace / losses[0]) if meta_loss == "log-ramp" else trace

    rule = small_rule()
    trainer = MetaTrainer(rule, make_tiny(), _config(4, meta_loss=meta_loss, unroll=3, steps=7), progress=False)
    run = trainer._new_run(0, 5, 7)
    reference = rollout(copy.deepcopy(rule), make_tiny().sample(5), 7)
    values = []
    while run.steps_done < run.horizon:
        values.append(float(trainer._unroll([run]).detach()))
    # Truncations of 3, 3 and 1 steps: each is the mean of its weighted losses.
    trace = per_step(reference)
    w = _ramp_weights(torch.arange(1, 8, dtype=torch.float64), 7)
    expected = [float((trace[a:b] * w[a:b]).mean()) for a, b in ((0, 3), (3, 6), (6, 7))]
    assert values == pytest.approx(expected, rel=1e-4)
    # Validation scores the whole horizon the same way.
    assert trainer.validate() == pytest.approx(
        float((per_step(rollout(rule, make_tiny().sample(10**8), 7)) * w).mean()), rel=1e-5
    )


@pytest.mark.parametrize("power", [0.0, 1.0, 3.0])
def test_ramp_power_weights_have_mean_one_and_grow_as_the_power(power):
    from learned_optim.meta_fit import _ramp_weights

    steps = torch.arange(1, 51, dtype=torch.float64)
    weights = _ramp_weights(steps, 50, power)
    assert float(weights.mean()) == pytest.approx(1.0, rel=1e-12)
    assert torch.allclose(weights / weights[-1], (steps / 50) ** power)
    # The objective weighs the losses so: a run whose last loss is lower scores lower, by more
    # the larger the power.
    config = _config(1, meta_loss="ramp", ramp_power=power, steps=50)
    flat, late_drop = torch.ones(50, dtype=torch.float64), torch.ones(50, dtype=torch.float64)
    late_drop[-1] = 0.0
    gap = float(_objective(flat, 1.0, 1, 50, config) - _objective(late_drop, 1.0, 1, 50, config))
    assert gap == pytest.approx(float(weights[-1]) / 50, rel=1e-12)


def test_final_validation_metric_scores_the_whole_split_loss_the_optimizer_reaches():
    # Independent reference: the ordinary training loop of compare.run_once with
    # LearnedOptimizer, which reports the whole-training-split loss after the last step.
    from learned_optim.compare import run_once
    from learned_optim.meta_fit import VALIDATION_SEED_BASE

    rule = small_rule()
    trainer = MetaTrainer(rule, make_tiny(), _config(2, validation_metric="final"), progress=False)
    family = make_tiny()
    initial = family.sample(VALIDATION_SEED_BASE)
    inputs, targets = initial.train_set
    with torch.no_grad():
        f0 = float(initial.loss(initial.model(inputs), targets))
    run = run_once(family, VALIDATION_SEED_BASE, lambda p: LearnedOptimizer(p, pretrained=rule), 7)
    assert trainer.validate() == pytest.approx(math.log(run.final_loss / f0), rel=1e-4)
    # A different measure from the meta-objective's, and the one a final-loss comparison ranks by.
    objective = MetaTrainer(rule, make_tiny(), _config(2), progress=False).validate()
    assert objective != pytest.approx(trainer.validate(), rel=1e-3)


def test_meta_fit_keeps_the_checkpoint_best_by_final_loss(tmp_path):
    # meta_fit's keyword reaches the trainer, and the kept weights are those of the best score.
    scores = []
    rule = meta_fit(small_rule(), make_tiny(), steps=7, unroll=3, meta_iterations=4, meta_lr=1e-2,
                    validate_every=1, validation_instances=1, validation_metric="final", progress=False,
                    callback=lambda h: scores.append(list(h.validation)))  # fmt: skip
    history = scores[-1]
    _, best = min(history, key=lambda v: v[1])
    kept = MetaTrainer(rule, make_tiny(), _config(2, validation_metric="final"), progress=False).validate()
    assert kept == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("unroll", [7, 3])
def test_final_meta_loss_is_the_whole_split_loss_at_each_truncation_end(unroll):
    # Reference: the rule run by rollout, then the whole training split's loss at the end of
    # each truncation (7 steps: one truncation, or three ending after steps 3, 6 and 7).
    from learned_optim.meta_fit import _rollout

    rule = small_rule()
    trainer = MetaTrainer(rule, make_tiny(), _config(4, meta_loss="final", unroll=unroll, steps=7), progress=False)
    run = trainer._new_run(0, 5, 7)
    values = []
    while run.steps_done < run.horizon:
        values.append(float(trainer._unroll([run]).detach()))
    expected = []
    for end in [7] if unroll == 7 else [3, 6, 7]:
        instance = make_tiny().sample(5)
        losses, names, _, (params, _) = _rollout(copy.deepcopy(rule), instance, end, 1.0)
        with torch.no_grad():
            split = torch.func.functional_call(instance.model, dict(zip(names, params, strict=True)), (TRAIN_X,))
        expected.append(math.log(float(nn.functional.mse_loss(split, TRAIN_Y)) / losses[0]))
    assert values == pytest.approx(expected, rel=1e-4)


def test_final_meta_loss_meta_training_lowers_the_final_loss():
    rule = small_rule()
    trainer = MetaTrainer(rule, make_tiny(), _config(30, meta_loss="final", steps=7, unroll=7), progress=False)
    before = trainer.validate()
    trainer.run()
    assert trainer.history.best_validation < before - 0.1
    assert trainer.validate() == pytest.approx(trainer.history.best_validation, rel=1e-9)


# ---------------------------------------------------------------------------- PES
def _flat_grad(rule: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in rule.parameters()])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_pes_estimates_the_gradient_of_the_whole_horizon():
    # Two 3-step truncations of one 6-step run: the PES estimates of both, summed, estimate
    # the exact (second-order) gradient of the sum of the two truncations' mean losses.
    def make() -> CoordinateLSTM:
        torch.manual_seed(0)
        return CoordinateLSTM(hidden_size=2, num_layers=1)

    exact_rule = make()
    exact = MetaTrainer(
        exact_rule, "quadratic", MetaFitConfig(steps=6, unroll=6, meta_loss="mean", second_order=True), progress=False
    )
    exact._unroll([exact._new_run(0, 7, 6)]).backward()
    target = 2 * _flat_grad(exact_rule)  # sum of two 3-step means = 2 x the 6-step mean

    rule = make()
    start = weights(rule)
    config = MetaFitConfig(steps=6, unroll=3, meta_loss="mean", estimator="pes", pes_pairs=400, pes_std=1e-3)
    trainer = MetaTrainer(rule, "quadratic", config, progress=False)
    run = trainer._new_run(0, 7, 6)
    value_1, first = trainer._pes_estimate([run])
    value_2, second = trainer._pes_estimate([run])
    assert run.steps_done == 6
    assert same_weights(weights(rule), start)  # perturbations are undone
    estimate = first + second
    assert _cosine(estimate, target) > 0.9
    assert 0.8 < float(estimate.norm() / target.norm()) < 1.25
    assert value_2 < value_1  # the perturbed rules still make progress on the quadratic


@pytest.mark.parametrize("names", [["log_lr0"], ["log_lr0", "param_h0", "tensor_h0", "global_h0"]])
def test_pes_estimates_the_gradient_of_a_learned_initial_state(names):
    # HierarchicalRNN's log_lr0 and *_h0 act only through the rule state an instance starts
    # with: PES particles started from the unperturbed state, so their estimate was exactly 0.
    def make() -> HierarchicalRNN:
        torch.manual_seed(0)
        rule = HierarchicalRNN(param_hidden=4, tensor_hidden=4, global_hidden=4)
        for name, p in rule.named_parameters():
            p.requires_grad_(name in names)
        return rule

    exact_rule = make()
    exact = MetaTrainer(exact_rule, tiny, MetaFitConfig(steps=6, unroll=6, second_order=True), progress=False)
    exact._unroll([exact._new_run(0, 7, 6)]).backward()
    target = torch.cat([p.grad.reshape(-1) for p in exact_rule.parameters() if p.requires_grad])
    assert target.norm() > 0

    rule = make()
    start = weights(rule)
    config = MetaFitConfig(steps=6, unroll=6, estimator="pes", pes_pairs=64, pes_std=1e-2)
    trainer = MetaTrainer(rule, tiny, config, progress=False)
    _, estimate = trainer._pes_estimate([trainer._new_run(0, 7, 6)])
    assert same_weights(weights(rule), start)  # perturbations are undone
    assert _cosine(estimate, target) > 0.8
    assert 0.6 < float(estimate.norm() / target.norm()) < 1.6


def test_pes_meta_training_lowers_the_loss_and_is_deterministic():
    def train() -> CoordinateLSTM:
        rule = small_rule()
        return meta_fit(
            rule, "quadratic", steps=20, unroll=5, meta_iterations=100, meta_lr=3e-2, estimator="pes",
            pes_pairs=4, pes_std=0.05, validate_every=0, progress=False,
        )  # fmt: skip

    family = get_task("quadratic")
    before = relative_loss(small_rule(), family)
    rule = train()
    assert rule.meta_fit_history.skipped_updates == 0
    after = relative_loss(rule, family)
    assert after < 0.5 * before, (before, after)
    assert same_weights(weights(train()), weights(rule))


@pytest.mark.parametrize("make_rule", ["lstm", "hierarchical", "lstm-batchnorm"])
def test_pes_resume_after_interruption_equals_straight_run(tmp_path, make_rule):
    from learned_optim import HierarchicalRNN

    def make():
        if make_rule.startswith("lstm"):
            return small_rule()
        torch.manual_seed(0)
        return HierarchicalRNN(param_hidden=4, tensor_hidden=4, global_hidden=4)

    config = dict(estimator="pes", pes_pairs=2, lr_scale_range=3.0, validate_every=0)
    task = make_tiny
    if make_rule == "lstm-batchnorm":
        # Each perturbed trajectory keeps its own running statistics, which the final loss reads.
        config["meta_loss"] = "final"
        task = lambda: make_tiny(model=_batchnorm_model)  # noqa: E731
    straight = MetaTrainer(make(), task(), _config(10, **config), progress=False)
    straight.run()

    def crash(history):
        if history.iteration == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        MetaTrainer(make(), task(), _config(10, **config), tmp_path, progress=False, callback=crash).run()
    resumed_rule = make()
    trainer = MetaTrainer(resumed_rule, task(), _config(10, **config), tmp_path, progress=False)
    trainer.load_checkpoint(tmp_path)
    assert trainer.history.iteration == 4
    # Mid-instance: the perturbed trajectories and accumulated perturbations come back.
    assert all(0 < run.steps_done < run.horizon for run in trainer.runs)
    assert all(len(run.particles) == 4 and run.pes_noise.abs().sum() > 0 for run in trainer.runs)
    trainer.run()
    assert trainer.history.meta_losses == straight.history.meta_losses
    assert same_weights(weights(resumed_rule), weights(straight.rule))
    assert not same_weights(weights(resumed_rule), weights(make()))


def test_pes_drops_a_diverging_instance_and_skips_the_update():
    rule = small_rule(output_scale=1e30)  # updates of ~1e28: the optimizee loss overflows to inf
    before = weights(rule)
    trainer = MetaTrainer(
        rule, tiny, MetaFitConfig(steps=6, unroll=3, estimator="pes", pes_pairs=2, validate_every=0), progress=False
    )
    assert math.isnan(trainer.step())
    assert trainer.history.skipped_updates == 1
    assert trainer.runs == []  # the diverged instance is not carried on
    assert same_weights(weights(rule), before)


@pytest.mark.parametrize("kind", ["lstm", "hierarchical"])
def test_forward_only_steps_use_the_fused_cpu_kernel_and_match_the_eager_rule(kind):
    from learned_optim.meta_fit import _Segments
    from learned_optim.weights import resolve_rule

    shipped = resolve_rule("lstm-mnist" if kind == "lstm" else "hrnn-base")
    # Saturated sigmoids give gradients that are exactly 0 or not by the last bit, which
    # step_on_zero_grad=False turns into a step or none: the trajectories would part at once.
    rule = type(shipped)(**{**shipped.config, "step_on_zero_grad": True})
    rule.load_state_dict(shipped.state_dict())
    if "cpu" not in rule.fused_impls():
        pytest.skip("the fused CPU kernel does not build here")
    model = get_task("mnist-mlp").sample(EVALUATION_SEED_BASE).model
    assert _Segments.of(rule, list(model.parameters())).kernel == "cpu"
    fused = rollout(rule, get_task("mnist-mlp").sample(EVALUATION_SEED_BASE), 30)
    eager_rule = copy.deepcopy(rule)
    eager_rule.fused_impls = lambda: ()  # what a rule without kernels gets
    assert _Segments.of(eager_rule, list(model.parameters())).kernel is None
    eager = rollout(eager_rule, get_task("mnist-mlp").sample(EVALUATION_SEED_BASE), 30)
    assert fused[0] == eager[0]
    assert fused[-1] < 0.8 * fused[0]  # it optimises
    # One step agrees to ~1e-6 (the kernel tests); 30 steps of a trajectory amplify it a little.
    assert fused == pytest.approx(eager, rel=1e-3)


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_fit_trains_the_tensor_agreement_inputs(second_order):
    rule = small_rule(momentum_decays=[0.5, 0.9], tensor_agreement=True)
    assert rule.weights[0][:, 4:6].abs().sum() > 0
    with torch.no_grad():
        rule.weights[0][:, 4:6] = 0.0  # as after init_from a rule without them
    meta_fit(
        rule, "teacher", steps=10, unroll=5, meta_iterations=3, meta_lr=1e-2, instances=2,
        second_order=second_order, validate_every=0, progress=False,
    )  # fmt: skip
    assert rule.meta_fit_history.skipped_updates == 0
    assert rule.weights[0][:, 4:6].abs().sum() > 0  # meta-gradients reached them
    assert all(torch.isfinite(p).all() for p in rule.parameters())
