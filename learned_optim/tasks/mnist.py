"""MNIST task families: small MLPs (Andrychowicz et al., 2016) and a small conv net.

The package vendors the 10,000-image MNIST *test* set (``learned_optim/data/mnist``, see
its README for attribution and licence). It is split deterministically: the first 8,000
images are the training split, the last 2,000 the held-out split. The full 70,000-image
MNIST can be loaded from a local folder with :func:`load_mnist_folder` and passed to the
families as ``data=``.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
from torch import Tensor, nn

from learned_optim.tasks import register_task
from learned_optim.tasks._common import (
    ACTIVATIONS,
    activation,
    check_positive_ints,
    choose,
    generator,
    minibatches,
    mlp,
    seeded_module,
)
from learned_optim.tasks.base import TaskFamily, TaskInstance

Split = tuple[Tensor, Tensor]

VENDORED_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"
N_TRAIN = 8_000
IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
N_CLASSES = 10

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _read_idx(path: Path, magic: int) -> Tensor:
    """The uint8 array stored in an IDX file, gzipped or not (told by its content, not its name:
    some browsers unpack ``.gz`` downloads but keep the name, some downloads lack the suffix)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read MNIST file {path}: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file: only {len(raw)} bytes")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise ValueError(f"{path} is not an MNIST IDX file: magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise ValueError(
            f"{path}: header announces shape {shape} ({math.prod(shape)} bytes) but holds {len(raw) - header} bytes"
        )
    if math.prod(shape) == 0:
        raise ValueError(f"{path}: the IDX header announces shape {shape}, which holds no items")
    # bytearray: torch.frombuffer warns on read-only buffers such as bytes.
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).reshape(shape)


def _load_pair(images_path: Path, labels_path: Path) -> Split:
    """Images as float32 in [0, 1], flattened to 784, and int64 labels (cached per process
    while the files are unchanged: a file replaced in place is read again)."""
    stamps = tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in (_stat(images_path), _stat(labels_path)))
    return _load_pair_cached(images_path, labels_path, stamps)


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as exc:
        raise ValueError(f"cannot read MNIST file {path}: {exc}") from exc


@lru_cache(maxsize=8)
def _load_pair_cached(images_path: Path, labels_path: Path, stamps: tuple) -> Split:
    images = _read_idx(images_path, _IMAGES_MAGIC)
    labels = _read_idx(labels_path, _LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"{images_path}: images are {tuple(images.shape[1:])}, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= N_CLASSES:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    pixels = images.reshape(-1, N_PIXELS).to(torch.float32).div_(255.0)
    return pixels, labels.to(torch.int64)


def load_mnist() -> tuple[Split, Split]:
    """The vendored MNIST data as ``((train_images, train_labels), (test_images, test_labels))``.

    The 10,000 images of the official test set are split deterministically: the first 8,000
    are the training split, the last 2,000 the held-out split. Images are float32 in [0, 1]
    of shape ``(n, 784)``; labels are int64 in 0..9. The tensors are cached and shared:
    do not modify them in place.
    """
    images, labels = _load_pair(VENDORED_DIR / "t10k-images-idx3-ubyte.gz", VENDORED_DIR / "t10k-labels-idx1-ubyte.gz")
    return (images[:N_TRAIN], labels[:N_TRAIN]), (images[N_TRAIN:], labels[N_TRAIN:])


def _find(folder: Path, stem: str) -> Path | None:
    # Accept the official names, gzipped or not, the dotted spelling some mirrors use
    # ("train-images.idx3-ubyte") and torchvision's MNIST/raw layout.
    names = (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz")
    for base in (folder, folder / "MNIST" / "raw"):
        for name in names:
            if (base / name).is_file():
                return base / name
    return None


def load_mnist_folder(path: str | Path) -> tuple[Split, Split]:
    """The full MNIST (60,000 training, 10,000 test images) from a local folder.

    The folder must hold the four official IDX files ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
    each optionally gzipped (``.gz``); torchvision's ``MNIST/raw`` subfolder also works.
    Returns ``((train_images, train_labels), (test_images, test_labels))`` in the same
    format as :func:`load_mnist`, ready for the families' ``data=`` argument.

    Raises:
        FileNotFoundError: the folder or some of the files are missing (the message lists
            the expected names).
        ValueError: a file is not a valid MNIST IDX file.
    """
    folder = Path(path).expanduser()
    expected = ", ".join(f"{name}[.gz]" for name in _MNIST_FILES)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"MNIST folder {folder} {state}; it should contain {expected}")
    found = {stem: _find(folder, stem) for stem in _MNIST_FILES}
    missing = [stem for stem, file in found.items() if file is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST folder {folder} lacks {', '.join(missing)}; expected the files {expected} "
            "(from http://yann.lecun.com/exdb/mnist/)"
        )
    paths = [found[stem] for stem in _MNIST_FILES]
    train = _load_pair(paths[0].resolve(), paths[1].resolve())
    test = _load_pair(paths[2].resolve(), paths[3].resolve())
    return train, test


def _check_data(data: tuple[Split, Split] | None) -> tuple[Split, Split]:
    if data is None:
        return load_mnist()
    try:
        (train_x, train_y), (test_x, test_y) = data
    except (TypeError, ValueError):
        raise ValueError("data must be ((train_images, train_labels), (test_images, test_labels))") from None
    for images, labels in ((train_x, train_y), (test_x, test_y)):
        if images.ndim != 2 or images.shape[1] != N_PIXELS or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"MNIST data must be images of shape (n, 784) with n labels, got {tuple(images.shape)} "
                f"images and {tuple(labels.shape)} labels"
            )
    return data


class _MNISTFamily(TaskFamily):
    """Shared plumbing: data, minibatch stream and the instance for a given model."""

    def __init__(self, batch_size: int, data: tuple[Split, Split] | None, name: str) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.name = name
        # Kept unresolved so building a family (e.g. listing tasks) does not read the files.
        self._data = data

    def _splits(self) -> tuple[Split, Split]:
        return _check_data(self._data)

    def _instance(self, seed: int, model: nn.Module, name: str, image_shape: tuple[int, ...]) -> TaskInstance:
        (train_x, train_y), (test_x, test_y) = self._splits()
        # Reshaping the contiguous cached tensors gives views, so conv inputs cost no copy.
        train_x = train_x.reshape(-1, *image_shape)
        test_x = test_x.reshape(-1, *image_shape)
        return TaskInstance(
            model=model,
            loss=nn.functional.cross_entropy,
            batches=minibatches(train_x, train_y, self.batch_size, generator(seed, "batches")),
            train_set=(train_x, train_y),
            test_set=(test_x, test_y),
            name=name,
        )


@dataclass(frozen=True)
class MLPVariations:
    """Per-instance architecture sampling for :class:`MNISTMLPFamily`.

    Each instance draws a depth from ``depths``, a width for every hidden layer from
    ``hidden_sizes`` and one activation (shared by its hidden layers) from ``activations``,
    all uniformly.
    """

    hidden_sizes: Sequence[int] = tuple(range(10, 65))
    depths: Sequence[int] = (1, 2)
    activations: Sequence[str] = ("sigmoid", "relu", "tanh")

    def __post_init__(self) -> None:
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths must be positive integers, got {self.depths}")
        if not self.activations:
            raise ValueError("activations must not be empty")
        for name in self.activations:
            activation(name)  # raises on unknown names


class MNISTMLPFamily(_MNISTFamily):
    """Cross-entropy training of an MLP on MNIST (784 inputs, 10 classes).

    The default is the 784-20-10 sigmoid network of Andrychowicz et al. (2016), minibatches
    of 128 drawn from the 8,000 training images in a seed-determined order, reshuffled
    every epoch.

    Args:
        hidden_sizes: widths of the hidden layers.
        activation: activation name after every hidden layer (sigmoid, relu, tanh, elu,
            gelu, softplus, leaky_relu).
        batch_size: training minibatch size.
        variations: if given, each instance draws its depth, widths and activation from
            these choices instead of using ``hidden_sizes`` and ``activation``; the instance
            name records the draw.
        data: ``((train_images, train_labels), (test_images, test_labels))`` to use instead
            of the vendored split (e.g. from :func:`load_mnist_folder`).
        name: label used in reports.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (20,),
        activation: str = "sigmoid",
        batch_size: int = 128,
        *,
        variations: MLPVariations | None = None,
        data: tuple[Split, Split] | None = None,
        name: str = "mnist-mlp",
    ) -> None:
        super().__init__(batch_size, data, name)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(sorted(ACTIVATIONS))}")
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden sizes must be positive, got {tuple(hidden_sizes)}")
        self.hidden_sizes = tuple(hidden_sizes)
        self.activation = activation
        self.variations = variations

    def architecture(self, seed: int) -> tuple[tuple[int, ...], str]:
        """The hidden widths and activation instance ``seed`` uses."""
        if self.variations is None:
            return self.hidden_sizes, self.activation
        gen = generator(seed, "variation")
        depth = choose(self.variations.depths, gen)
        hidden = tuple(choose(self.variations.hidden_sizes, gen) for _ in range(depth))
        return hidden, choose(self.variations.activations, gen)

    def sample(self, seed: int) -> TaskInstance:
        """The MLP instance for ``seed``."""
        hidden, act = self.architecture(seed)
        sizes = (N_PIXELS, *hidden, N_CLASSES)
        model = seeded_module(seed, partial(mlp, sizes, act))
        label = f"{self.name}[{'-'.join(map(str, sizes))} {act}]"
        return self._instance(seed, model, label, (N_PIXELS,))


class MNISTConvFamily(_MNISTFamily):
    """Cross-entropy training of a small conv net on 28x28 MNIST images.

    The network is a stack of ``kernel_size`` convolutions (padding ``kernel_size // 2``,
    given stride) with ``channels`` output channels each, an activation after each, and a
    linear head to 10 classes. Inputs have shape ``(n, 1, 28, 28)``.

    Args:
        channels: output channels of the conv layers (default two layers, 8 and 16).
        kernel_size: square kernel size.
        stride: stride of every conv layer (2 halves the resolution each layer).
        activation: activation name after every conv layer.
        batch_size: training minibatch size.
        data: alternative data in the format of :func:`load_mnist` (images flattened to 784).
        name: label used in reports.
    """

    def __init__(
        self,
        channels: Sequence[int] = (8, 16),
        kernel_size: int = 3,
        stride: int = 2,
        activation: str = "relu",
        batch_size: int = 128,
        *,
        data: tuple[Split, Split] | None = None,
        name: str = "mnist-conv",
    ) -> None:
        super().__init__(batch_size, data, name)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be positive integers, got {tuple(channels)}")
        check_positive_ints(kernel_size=kernel_size, stride=stride)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(sorted(ACTIVATIONS))}")
        self.channels = tuple(channels)
        self.kernel_size = kernel_size
        self.stride = stride
        self.activation = activation

    def build(self) -> nn.Sequential:
        """A freshly initialised network (uses the global RNG; :meth:`sample` seeds it)."""
        layers: list[nn.Module] = []
        side, in_channels = IMAGE_SIDE, 1
        padding = self.kernel_size // 2
        for out_channels in self.channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, self.kernel_size, self.stride, padding),
                activation(self.activation),
            ]
            side = (side + 2 * padding - self.kernel_size) // self.stride + 1
            in_channels = out_channels
        if side < 1:
            raise ValueError(f"{len(self.channels)} conv layers with stride {self.stride} shrink 28x28 to nothing")
        layers += [nn.Flatten(), nn.Linear(in_channels * side * side, N_CLASSES)]
        return nn.Sequential(*layers)

    def sample(self, seed: int) -> TaskInstance:
        """The conv-net instance for ``seed``."""
        model = seeded_module(seed, self.build)
        label = f"{self.name}[{'-'.join(map(str, self.channels))} k{self.kernel_size} s{self.stride} {self.activation}]"
        return self._instance(seed, model, label, (1, IMAGE_SIDE, IMAGE_SIDE))


register_task("mnist-mlp", MNISTMLPFamily)
register_task("mnist-mlp-relu", partial(MNISTMLPFamily, activation="relu", name="mnist-mlp-relu"))
register_task("mnist-mlp-40", partial(MNISTMLPFamily, hidden_sizes=(40,), name="mnist-mlp-40"))
register_task("mnist-mlp-2layer", partial(MNISTMLPFamily, hidden_sizes=(20, 20), name="mnist-mlp-2layer"))
# Full-batch gradients (the whole 8,000-image training split every step): no minibatch noise.
register_task("mnist-mlp-fullbatch", partial(MNISTMLPFamily, batch_size=8000, name="mnist-mlp-fullbatch"))
register_task("mnist-mlp-mixed", partial(MNISTMLPFamily, variations=MLPVariations(), name="mnist-mlp-mixed"))
register_task("mnist-conv", MNISTConvFamily)
