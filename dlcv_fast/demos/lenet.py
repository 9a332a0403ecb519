"""LeNet-5 trained with dlcv_fast's convolution and pooling on scikit-learn's handwritten
digits (``sklearn.datasets.load_digits``: 1797 images of 8x8 pixels, 16 grey levels),
resized to 32x32. Prints the test accuracy and writes a PNG of the loss and accuracy
curves."""

from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.nn.functional as F

from dlcv_fast.models import lenet5


@dataclasses.dataclass
class History:
    train_loss: list[float] = dataclasses.field(default_factory=list)
    test_loss: list[float] = dataclasses.field(default_factory=list)
    train_acc: list[float] = dataclasses.field(default_factory=list)
    test_acc: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def load_digits_32(test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): images (N, 1, 32, 32) scaled to [0, 1] and
    normalised with the training set's mean and std; a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed,
        stratify=digits.target)
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[train_idx], (x_test - mean) / std, y[test_idx]


@torch.no_grad()
def evaluate(model, x, y, batch: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        logits = model(x[i:i + batch])
        loss += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    return loss / len(y), correct / len(y)


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (the digits are centred; this is the only
    augmentation)."""
    dy, dx = (torch.randint(-2, 3, (2,), generator=generator)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(epochs: int = 10, batch: int = 64, lr: float = 3e-3, seed: int = 0,
          progress: bool = True, limit: int | None = None) -> tuple[torch.nn.Module, History]:
    """Trains LeNet-5 (Adam, cosine learning rate) and evaluates it after every epoch.
    ``limit`` caps the training set (the quick mode of the tests)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_32(seed=seed)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    model = lenet5(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    hist = History()
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="LeNet-5 on digits", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=generator)
        total_loss, correct = 0.0, 0
        for i in range(0, len(y_train), batch):
            idx = perm[i:i + batch]
            logits = model(_shift(x_train[idx], generator))
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
            bar.update(1)
        # training metrics: running means over the epoch's (augmented) batches
        hist.train_loss.append(total_loss / len(y_train))
        hist.train_acc.append(correct / len(y_train))
        test_loss, test_acc = evaluate(model, x_test, y_test)
        hist.test_loss.append(test_loss)
        hist.test_acc.append(test_acc)
        bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", test_acc=f"{test_acc:.3f}")
    bar.close()
    hist.seconds = time.perf_counter() - start
    return model, hist


def plot(hist: History, path: str) -> None:
    """Loss and accuracy per epoch, train and test, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(hist.train_loss) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, hist.train_loss, label="train")
    ax1.plot(epochs, hist.test_loss, label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="loss")
    ax2.plot(epochs, [100 * a for a in hist.train_acc], label="train")
    ax2.plot(epochs, [100 * a for a in hist.test_acc], label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LeNet-5 (dlcv_fast layers) on scikit-learn digits, 32x32")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(epochs: int = 10, out: str = "demo_output/lenet5_digits.png", quick: bool = False,
         progress: bool = True) -> float:
    """Trains, prints the test accuracy and the time, writes the PNG; returns the test
    accuracy. ``quick``: 4 epochs on 500 training images (for the tests)."""
    if quick:
        model, hist = train(epochs=4, limit=500, progress=progress)
    else:
        model, hist = train(epochs=epochs, progress=progress)
    print(f"trained {len(hist.train_loss)} epochs in {hist.seconds:.1f} s")
    print(f"test accuracy: {100 * hist.test_acc[-1]:.2f}%")
    plot(hist, out)
    print(f"wrote {out}")
    return hist.test_acc[-1]
