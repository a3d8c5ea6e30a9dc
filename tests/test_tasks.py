"""Tests of the built-in task families (learned_optim.tasks)."""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
from pathlib import Path

import pytest
import torch
from torch import Tensor

from learned_optim.tasks import (
    TASKS,
    LossScaled,
    MLPVariations,
    MNISTConvFamily,
    MNISTMLPFamily,
    QuadraticFamily,
    ReversalFamily,
    SequenceMixFamily,
    Task,
    TaskError,
    TeacherFamily,
    XORFamily,
    call_model,
    derive_seed,
    get_task,
    load_mnist,
    load_mnist_folder,
    make_xor_dataset,
    validate_instance,
)
from learned_optim.tasks.mnist import VENDORED_DIR

EXPECTED_TASKS = {
    "quadratic",
    "mnist-mlp",
    "mnist-mlp-relu",
    "mnist-mlp-40",
    "mnist-mlp-2layer",
    "mnist-mlp-mixed",
    "mnist-mlp-fullbatch",
    "mnist-conv",
    "xor",
    "teacher",
}
# Plain-SGD learning rates that are safe for each family (the quadratic's curvature is large).
SGD_LR = {
    "quadratic": 0.002,
    "xor": 0.5,
    "teacher": 0.05,
    "transformer-reverse": 0.1,
    "transformer-mix": 0.1,
    "problem-set": 0.01,
    "problem-set-nn": 0.01,
    "problem-set-data": 0.01,
}
ALL_TASKS = sorted(TASKS)


def _loss(instance, batch) -> Tensor:
    return instance.loss(call_model(instance.model, batch[0]), batch[1])


def _batches_equal(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_registry_has_all_families():
    assert set(TASKS) >= EXPECTED_TASKS
    for name in EXPECTED_TASKS:
        assert get_task(name).name == name


@pytest.mark.parametrize("name", ALL_TASKS)
def test_instance_is_valid_and_plain_sgd_decreases_loss(name):
    instance = get_task(name).sample(0)
    validate_instance(instance, name)
    assert instance.train_set is not None
    # A fixed slice of the training split keeps the conv net's evaluations cheap.
    subset = (instance.train_set[0][:2000], instance.train_set[1][:2000])
    with torch.no_grad():
        before = _loss(instance, subset)
    assert before.ndim == 0
    assert math.isfinite(before.item())
    optimizer = torch.optim.SGD(instance.model.parameters(), lr=SGD_LR.get(name, 0.5))
    for _ in range(30):
        optimizer.zero_grad()
        loss = _loss(instance, instance.next_batch())
        assert loss.ndim == 0 and math.isfinite(loss.item())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = _loss(instance, subset)
    assert math.isfinite(after.item())
    assert after.item() < 0.99 * before.item(), f"{name}: {before.item():.4f} -> {after.item():.4f}"
    if instance.test_set is not None:
        assert math.isfinite(_loss(instance, instance.test_set).item())


@pytest.mark.parametrize("name", ALL_TASKS)
def test_same_seed_same_instance_and_batches(name):
    family = get_task(name)
    a, b = family.sample(3), family.sample(3)
    assert a.name == b.name
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for _ in range(4):
        assert _batches_equal(a.next_batch(), b.next_batch())
    assert _batches_equal(a.train_set, b.train_set)
    if a.test_set is not None:
        assert _batches_equal(a.test_set, b.test_set)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_different_seed_different_instance(name):
    family = get_task(name)
    a, b = family.sample(3), family.sample(4)
    first_a = next(iter(a.model.parameters()))
    first_b = next(iter(b.model.parameters()))
    assert first_a.shape != first_b.shape or not torch.equal(first_a, first_b)
    batch_a, batch_b = a.next_batch(), b.next_batch()
    if name == "mnist-mlp-fullbatch":  # the same data for every seed: the whole training split
        assert _batches_equal(batch_a, a.train_set) and _batches_equal(batch_b, b.train_set)
        return
    assert batch_a[0].shape != batch_b[0].shape or not _batches_equal(batch_a, batch_b)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_sampling_leaves_global_rng_untouched(name):
    family = get_task(name)
    state = torch.get_rng_state()
    instance = family.sample(7)
    for _ in range(3):
        instance.next_batch()
    assert torch.equal(torch.get_rng_state(), state)


def test_init_is_not_correlated_with_data():
    # Data and initial point come from separate streams: θ0 must not repeat W's entries.
    instance = QuadraticFamily().sample(0)
    weights, _ = instance.train_set
    theta = instance.model.theta.detach()
    assert not torch.equal(theta, weights.flatten()[: theta.numel()])


@pytest.mark.parametrize(
    ("family", "input_shape", "target_shape", "output_shape"),
    [
        (QuadraticFamily(), (10, 10), (10,), (10,)),
        (QuadraticFamily(dim=4), (4, 4), (4,), (4,)),
        (MNISTMLPFamily(), (128, 784), (128,), (128, 10)),
        (MNISTMLPFamily(hidden_sizes=(20, 20), batch_size=32), (32, 784), (32,), (32, 10)),
        (MNISTConvFamily(), (128, 1, 28, 28), (128,), (128, 10)),
        (TeacherFamily(), (64, 10), (64, 1), (64, 1)),
        (TeacherFamily(input_dim=5, output_dim=3, batch_size=16), (16, 5), (16, 3), (16, 3)),
        (XORFamily(train_size=120), (120, 10), (120,), (120,)),
        (XORFamily(dim=3, train_size=100, batch_size=25), (25, 3), (25,), (25,)),
    ],
)
def test_shapes(family, input_shape, target_shape, output_shape):
    instance = family.sample(0)
    inputs, targets = instance.next_batch()
    assert tuple(inputs.shape) == input_shape
    assert tuple(targets.shape) == target_shape
    assert inputs.dtype == torch.float32
    assert tuple(call_model(instance.model, inputs).shape) == output_shape


def test_quadratic_is_deterministic_problem():
    instance = QuadraticFamily().sample(1)
    weights, target = instance.train_set
    for _ in range(3):
        batch = instance.next_batch()
        assert torch.equal(batch[0], weights) and torch.equal(batch[1], target)
    theta = instance.model.theta.detach()
    expected = ((weights @ theta - target) ** 2).sum()
    assert torch.allclose(_loss(instance, instance.train_set), expected)
    assert [name for name, _ in instance.model.named_parameters()] == ["theta"]


def test_minibatches_cover_an_epoch_without_repeats():
    instance = MNISTMLPFamily(batch_size=1000).sample(0)
    train_x, train_y = instance.train_set
    epoch = [instance.next_batch() for _ in range(8)]
    seen_x = torch.cat([x for x, _ in epoch])
    seen_y = torch.cat([y for _, y in epoch])
    # 8 batches of 1000 are one epoch of the 8,000 images: a permutation of the training set.
    weights = torch.linspace(1, 2, 784, dtype=torch.float64)
    keys_seen = (seen_x.double() @ weights).sort().values
    keys_train = (train_x.double() @ weights).sort().values
    assert torch.allclose(keys_seen, keys_train)
    assert torch.equal(seen_y.bincount(minlength=10), train_y.bincount(minlength=10))
    assert not torch.equal(seen_x[:1000], train_x[:1000])  # shuffled, not in file order
    assert not torch.equal(instance.next_batch()[0], epoch[0][0])  # reshuffled next epoch


# --- MNIST -------------------------------------------------------------------------------


def test_vendored_mnist_files_match_md5():
    expected = {
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    readme = (VENDORED_DIR / "README.md").read_text()
    for name, md5 in expected.items():
        assert hashlib.md5((VENDORED_DIR / name).read_bytes()).hexdigest() == md5
        assert md5 in readme
    assert "CC BY-SA 3.0" in readme and "LeCun" in readme and "Cortes" in readme


def test_mnist_split():
    (train_x, train_y), (test_x, test_y) = load_mnist()
    assert train_x.shape == (8000, 784) and test_x.shape == (2000, 784)
    assert train_y.shape == (8000,) and test_y.shape == (2000,)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    for images, labels in ((train_x, train_y), (test_x, test_y)):
        assert images.min().item() == 0.0 and images.max().item() == 1.0
        assert set(labels.unique().tolist()) == set(range(10))
    assert load_mnist()[0][0].data_ptr() == train_x.data_ptr()  # cached, not re-read
    instance = MNISTMLPFamily().sample(0)
    assert instance.train_set[0].shape == (8000, 784)
    assert instance.test_set[0].shape == (2000, 784)
    assert torch.equal(instance.test_set[1], test_y)


def test_mnist_mixed_varies_across_seeds():
    family = get_task("mnist-mlp-mixed")
    archs = [family.architecture(seed) for seed in range(30)]
    assert {len(hidden) for hidden, _ in archs} == {1, 2}
    assert {act for _, act in archs} == {"sigmoid", "relu", "tanh"}
    widths = {w for hidden, _ in archs for w in hidden}
    assert len(widths) > 10 and min(widths) >= 10 and max(widths) <= 64
    names = {family.sample(seed).name for seed in range(30)}
    assert len(names) > 20
    # The instance's network is the drawn architecture, and its name says so.
    hidden, act = archs[5]
    instance = family.sample(5)
    linear_widths = [m.out_features for m in instance.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear_widths == [*hidden, 10]
    assert "-".join(map(str, (784, *hidden, 10))) in instance.name and act in instance.name
    assert family.architecture(5) == archs[5]


def test_mnist_family_arguments_are_checked():
    with pytest.raises(ValueError, match="activation"):
        MNISTMLPFamily(activation="swish-ish")
    with pytest.raises(ValueError, match="activation"):
        MLPVariations(activations=("relu", "nope"))
    with pytest.raises(ValueError, match="batch_size"):
        MNISTConvFamily(batch_size=0)


def _write_idx(path: Path, magic: int, array: Tensor) -> None:
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.numpy().tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> None:
    g = torch.Generator().manual_seed(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", 0x803, images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", 0x801, labels)


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_folder(tmp_path, gz):
    _fake_mnist(tmp_path, gz=gz)
    (train_x, train_y), (test_x, test_y) = load_mnist_folder(tmp_path)
    assert train_x.shape == (6, 784) and test_x.shape == (4, 784)
    assert train_y.dtype == torch.int64 and test_y.shape == (4,)
    assert train_x.min().item() >= 0.0 and train_x.max().item() <= 1.0
    family = MNISTMLPFamily(batch_size=2, data=((train_x, train_y), (test_x, test_y)))
    instance = family.sample(0)
    assert instance.train_set[0].data_ptr() == train_x.data_ptr()  # used as given, no copy
    assert instance.next_batch()[0].shape == (2, 784)


def test_load_mnist_folder_missing_folder_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist_folder(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError) as info:
        load_mnist_folder(tmp_path)
    message = str(info.value)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in message
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte"):
        load_mnist_folder(tmp_path)


def test_load_mnist_folder_rejects_bad_files(tmp_path):
    _fake_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(labels, 0x803, torch.zeros(6, dtype=torch.uint8))  # images magic on a labels file
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*magic"):
        load_mnist_folder(tmp_path)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz"):
        load_mnist_folder(tmp_path)
    _write_idx(labels, 0x801, torch.zeros(0, dtype=torch.uint8))  # a header announcing no items
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*holds no items"):
        load_mnist_folder(tmp_path)


def test_load_mnist_folder_tells_gzip_by_content_not_by_name(tmp_path):
    # Browsers may unpack a .gz download and keep the name, or save it gzipped without
    # the suffix: both used to fail ("magic number 0x1f8b0808", "Not a gzipped file").
    reference = tmp_path / "reference"
    reference.mkdir()
    _fake_mnist(reference, gz=True)
    expected = load_mnist_folder(reference)
    unnamed, misnamed = tmp_path / "gzipped-without-suffix", tmp_path / "plain-with-gz-suffix"
    unnamed.mkdir()
    misnamed.mkdir()
    for file in reference.iterdir():
        (unnamed / file.stem).write_bytes(file.read_bytes())
        (misnamed / file.name).write_bytes(gzip.decompress(file.read_bytes()))
    for folder in (unnamed, misnamed):
        loaded = load_mnist_folder(folder)
        assert all(torch.equal(a, b) for a, b in zip(sum(loaded, ()), sum(expected, ()), strict=True))
    truncated = unnamed / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read MNIST file .*train-images-idx3-ubyte"):
        load_mnist_folder(unnamed)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_mnist_folder(truncated)


def test_load_mnist_folder_reads_a_replaced_file_again(tmp_path):
    # The per-process cache was keyed by path only: fixing or re-downloading a file in a
    # running session (a notebook) kept returning the old data, or an old error's absence.
    _fake_mnist(tmp_path, gz=False)
    (_, train_y), _ = load_mnist_folder(tmp_path)
    new_labels = (train_y.to(torch.uint8) + 1) % 10
    _write_idx(tmp_path / "train-labels-idx1-ubyte", 0x801, new_labels)
    (_, reloaded), _ = load_mnist_folder(tmp_path)
    assert torch.equal(reloaded, new_labels.long())
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03 truncated")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated IDX header"):
        load_mnist_folder(tmp_path)


# --- XOR -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden": 0}, "hidden must be positive, got 0"),
        ({"dim": 0}, "dim must be positive, got 0"),
        ({"noise_mean": -1.0}, "noise_mean must be finite and non-negative, got -1.0"),
        ({"noise_mean": math.inf}, "noise_mean must be finite and non-negative, got inf"),
        ({"min_minority": 0.6}, r"min_minority must be in \[0, 0.5\], got 0.6"),
        ({"n_samples": 100, "train_size": 100}, r"train_size must lie in \[2, n_samples - 1 = 99\]"),
    ],
)
def test_xor_family_checks_its_arguments_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XORFamily(**kwargs)  # not only when the first instance is sampled


def test_xor_datasets_are_balanced_and_standardised():
    family = XORFamily()
    for seed in range(40):
        data = family.dataset(seed)
        train_x, train_y = data.train
        test_x, test_y = data.test
        assert train_x.shape[0] + test_x.shape[0] == 200
        assert 50 <= train_x.shape[0] <= 150
        labels = torch.cat([train_y, test_y])
        assert set(labels.unique().tolist()) <= {0.0, 1.0}
        fraction = labels.mean().item()
        assert min(fraction, 1 - fraction) >= 0.15
        assert data.minority_fraction == pytest.approx(min(fraction, 1 - fraction))
        assert torch.allclose(train_x.mean(0), torch.zeros(10), atol=1e-5)
        assert torch.allclose(train_x.std(0), torch.ones(10), atol=1e-4)
    splits = {family.dataset(seed).train[0].shape[0] for seed in range(40)}
    assert len(splits) > 10  # the split varies across instances


def test_xor_rejection_and_noise_parameters():
    strict = [make_xor_dataset(seed, min_minority=0.4) for seed in range(10)]
    assert all(d.minority_fraction >= 0.4 for d in strict)
    assert any(d.attempts > 1 for d in strict)
    assert make_xor_dataset(0, noise_mean=0.0).noise_scale == 0.0
    scales = torch.tensor([make_xor_dataset(seed, noise_mean=0.05).noise_scale for seed in range(200)])
    assert 0.03 < scales.mean().item() < 0.07
    data = make_xor_dataset(1, n_samples=50, n_train=30, dim=4)
    assert data.train[0].shape == (30, 4) and data.test[0].shape == (20, 4)
    with pytest.raises(ValueError, match="n_train"):
        make_xor_dataset(0, n_samples=10, n_train=20)


def test_xor_noise_free_labels_are_an_xor_of_two_half_spaces():
    # Without noise the classes are exactly separable by a small ReLU network: plain
    # full-batch training must get (nearly) all training points right.
    family = XORFamily(train_size=150, noise_mean=0.0)
    instance = family.sample(2)
    optimizer = torch.optim.Adam(instance.model.parameters(), lr=0.02)
    for _ in range(300):
        optimizer.zero_grad()
        _loss(instance, instance.next_batch()).backward()
        optimizer.step()
    inputs, labels = instance.train_set
    accuracy = ((instance.model(inputs) > 0).float() == labels).float().mean().item()
    assert accuracy > 0.95


# --- teacher -----------------------------------------------------------------------------


def test_teacher_targets_are_a_relu_network_of_the_inputs():
    family = TeacherFamily(n_train=256, n_test=128, noise_std=0.0)
    instance = family.sample(0)
    train_x, train_y = instance.train_set
    test_x, _ = instance.test_set
    assert train_x.shape == (256, 10) and test_x.shape == (128, 10)
    assert 0.05 < train_y.var().item() < 20.0  # non-degenerate targets
    # A student of the same shape can fit them far below the targets' variance.
    optimizer = torch.optim.Adam(instance.model.parameters(), lr=0.01)
    for _ in range(400):
        optimizer.zero_grad()
        _loss(instance, instance.next_batch()).backward()
        optimizer.step()
    assert _loss(instance, instance.train_set).item() < 0.1 * train_y.var().item()
    noisy = TeacherFamily(n_train=256, n_test=128, noise_std=0.5).sample(0)
    assert torch.equal(noisy.train_set[0], train_x)
    assert not torch.equal(noisy.train_set[1], train_y)


def test_transformer_reversal_targets_and_chance_level_start():
    family = ReversalFamily(vocab=8, length=5, width=16, heads=2, layers=1, n_train=64, n_test=16, batch_size=8)
    instance = family.sample(0)
    tokens, targets = instance.next_batch()
    assert tokens.shape == (8, 5) and tokens.dtype == torch.int64
    assert torch.equal(targets, tokens.flip(1))
    logits = call_model(instance.model, tokens)
    assert logits.shape == (8, 5, 8)
    with torch.no_grad():  # a fresh network is near chance: log(vocab)
        assert abs(_loss(instance, instance.train_set).item() - math.log(8)) < 0.5
    with pytest.raises(ValueError, match="multiple of heads"):
        ReversalFamily(width=10, heads=4)


def test_transformer_mix_targets_follow_the_drawn_operation():
    family = SequenceMixFamily(n_train=64, n_test=16, batch_size=8)
    seen_ops, seen_norms, seen_shifts = set(), set(), set()
    for seed in range(40):
        instance = family.sample(seed)
        tokens, targets = instance.train_set
        assert tokens.dtype == torch.int64 and targets.shape == tokens.shape
        assert tokens.shape[1] in family.lengths and int(tokens.max()) < max(family.vocabs)
        label = instance.name
        if "[sort " in label:
            seen_ops.add("sort")
            assert torch.equal(targets, tokens.sort(dim=1).values)
        elif "[prefix-max " in label:
            seen_ops.add("prefix-max")
            assert torch.equal(targets, tokens.cummax(dim=1).values)
        else:
            shift = int(label.split("[rotate")[1].split()[0])
            assert 1 <= shift < tokens.shape[1]
            seen_ops.add("rotate")
            seen_shifts.add(shift)
            assert torch.equal(targets, tokens.roll(-shift, dims=1))
        layer = instance.model.encoder.layers[0]
        seen_norms.add(layer.norm_first)
        assert ("pre-norm" in label) == layer.norm_first
        vocab = instance.model.readout.out_features
        with torch.no_grad():  # a fresh network starts near chance, log(vocab)
            assert abs(_loss(instance, instance.train_set).item() - math.log(vocab)) < 0.7
    assert seen_ops == {"rotate", "sort", "prefix-max"} and seen_norms == {True, False} and len(seen_shifts) > 1
    # Deterministic per seed: same draw, data and initial weights.
    a, b = family.sample(3), family.sample(3)
    assert a.name == b.name and _batches_equal(a.train_set, b.train_set)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"operations": ("reverse",)}, "operations must be"),
        ({"operations": ()}, "operations must be"),
        ({"widths": (18,)}, "multiple of heads"),
        ({"lengths": (1, 4)}, "at least 2"),
        ({"vocabs": ()}, "vocabs must be"),
        ({"norm_first": ()}, "norm_first"),
    ],
)
def test_transformer_mix_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceMixFamily(**kwargs)


def test_meta_fit_runs_on_the_transformer_task():
    from learned_optim import CoordinateLSTM
    from learned_optim.meta_fit import meta_fit

    family = ReversalFamily(vocab=6, length=4, width=8, heads=2, layers=1, n_train=64, n_test=8, batch_size=8)
    history = []
    rule = meta_fit(
        CoordinateLSTM(hidden_size=4),
        family,
        steps=4,
        unroll=2,
        meta_iterations=2,
        validate_every=0,
        progress=False,
        callback=lambda h: history.append(h.meta_losses[-1]),
    )
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    assert isinstance(rule, CoordinateLSTM)


def test_a_task_instance_is_reproducible_by_hand_as_documented():
    # docs/meta-training.md: the factory runs under manual_seed(derive_seed(s, "init")), the
    # sampler gets a generator seeded with derive_seed(s, "data").
    def sampler(g: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)

    task = Task(model=lambda: torch.nn.Linear(3, 1), loss=torch.nn.functional.mse_loss, data=sampler)
    instance = task.sample(7)
    torch.manual_seed(derive_seed(7, "init"))
    by_hand = torch.nn.Linear(3, 1)
    for a, b in zip(instance.model.parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(derive_seed(7, "data"))
    for batch in (next(instance.batches), next(instance.batches)):
        expected = sampler(g)
        assert all(torch.equal(x, y) for x, y in zip(batch, expected, strict=True))


def test_loss_scaled_multiplies_the_loss_and_keeps_the_instance():
    base = get_task("quadratic")
    fixed = LossScaled(base, 0.01, 0.01)
    assert fixed.name == "quadratic-lossx0.01" and fixed.scale_for(3) == 0.01
    plain, scaled = base.sample(3), fixed.sample(3)
    assert "loss x0.01" in scaled.name
    for p, q in zip(plain.model.parameters(), scaled.model.parameters(), strict=True):
        assert torch.equal(p, q)
    inputs, targets = plain.next_batch()
    same_inputs, same_targets = scaled.next_batch()
    assert torch.equal(inputs, same_inputs) and torch.equal(targets, same_targets)
    want = plain.loss(call_model(plain.model, inputs), targets) * 0.01
    torch.testing.assert_close(scaled.loss(call_model(scaled.model, inputs), targets), want)


def test_loss_scaled_draws_log_uniform_factors_fixed_by_the_seed():
    family = LossScaled(get_task("quadratic"), 1e-3, 1e3)
    factors = [family.scale_for(seed) for seed in range(400)]
    assert factors == [family.scale_for(seed) for seed in range(400)]
    assert all(1e-3 <= f <= 1e3 for f in factors)
    logs = torch.tensor(factors).log10()
    # Log-uniform on [-3, 3]: mean 0, standard deviation 6 / sqrt(12) = 1.73.
    assert abs(float(logs.mean())) < 0.3 and abs(float(logs.std()) - 1.73) < 0.2
    assert (logs < -2).any() and (logs > 2).any()


@pytest.mark.parametrize(
    ("args", "message"),
    [((0.0, 1.0), "0 < low <= high"), ((2.0, 1.0), "0 < low <= high"), ((1.0, math.inf), "finite")],
)
def test_loss_scaled_rejects_bad_factors(args, message):
    with pytest.raises(TaskError, match=message):
        LossScaled(get_task("quadratic"), *args)
    with pytest.raises(TaskError, match="TaskFamily"):
        LossScaled("quadratic", 1.0, 1.0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TeacherFamily(noise_std=float("nan")), "noise_std must be finite and non-negative, got nan"),
        (lambda: TeacherFamily(hidden=0), "hidden must be a positive integer, got 0"),
        (lambda: ReversalFamily(heads=True), "heads must be a positive integer, got True"),
        (lambda: SequenceMixFamily(batch_size=-1), "batch_size must be a positive integer, got -1"),
        (lambda: MNISTConvFamily(stride=0), "stride must be a positive integer, got 0"),
        (lambda: MNISTConvFamily(kernel_size=2.5), "kernel_size must be a positive integer, got 2.5"),
        (lambda: QuadraticFamily(dim=2.5), "dim must be a positive integer, got 2.5"),
        (lambda: ReversalFamily(vocab=1), "vocab must be at least 2"),
        (lambda: SequenceMixFamily(vocabs=(1, 8)), r"vocabs must be a non-empty list of integers >= 2, got \[1, 8\]"),
        (lambda: SequenceMixFamily(operations="reverse"), r"operations must be .*, got \['reverse'\]"),
    ],
)
def test_task_families_refuse_bad_arguments_when_built(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_one_operation_may_be_given_as_a_string():
    assert SequenceMixFamily(operations="sort").operations == ("sort",)


def _shuffling_loader_task(**loader_options):
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(torch.arange(40.0).view(20, 2), torch.arange(20.0).view(20, 1))
    loader = DataLoader(dataset, batch_size=4, shuffle=True, **loader_options)
    return Task(model=lambda: torch.nn.Linear(2, 1), loss=torch.nn.functional.mse_loss, data=loader, name="shuffled")


def test_a_dataloader_with_its_own_generator_gives_each_instance_its_own_reproducible_order():
    # compare() runs every optimizer on instance `seed` and expects the same batches for each:
    # with one generator shared by all instances, each draw shifted every later instance's order.
    generator = torch.Generator().manual_seed(0)
    task = _shuffling_loader_task(generator=generator)
    before = generator.get_state()

    def targets(instance, n):
        return [instance.next_batch()[1].flatten().tolist() for _ in range(n)]

    alone = targets(task.sample(5), 12)  # three epochs
    first, other = task.sample(5), task.sample(6)
    interleaved = []
    for _ in range(12):
        interleaved += targets(first, 1)
        targets(other, 1)
    assert interleaved == alone
    assert targets(task.sample(6), 12) != alone  # other seeds shuffle otherwise
    assert torch.equal(generator.get_state(), before)  # the user's generator is left as it was


def test_a_dataloader_with_persistent_workers_is_refused():
    task = _shuffling_loader_task(num_workers=1, persistent_workers=True)
    with pytest.raises(TaskError, match="persistent_workers=True"):
        task.sample(0)
