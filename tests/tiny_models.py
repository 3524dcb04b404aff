"""Tiny real-shaped models shared by the reconstruction, granularity and activation-stage
tests: a residual CNN and an HF-like stack of layers with keyword inputs and tuple outputs."""
import torch
from torch import nn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fill(module: nn.Module, seed: int, std: float) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class TinyResNet(nn.Module):
    """stem conv -> residual block -> Linear head, on (N, 1, 6, 6) inputs; counts forwards."""

    def __init__(self, seed=0):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = ResBlock(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        _fill(self, seed, 0.4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.block(torch.relu(self.stem(x))))


BATCHES = [torch.randn(16, 1, 6, 6, generator=gen(i)) for i in range(2)]


class KwargsBlock(nn.Module):
    """HF-like: keyword inputs, a tuple output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x, mask=None):
        h = self.fc2(torch.relu(self.fc1(x)))
        return (h * mask[..., None] + x, None)


class KwargsNet(nn.Module):
    """HF-like: transformer layers in a ModuleList (no forward of its own), keyword inputs."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.layer = nn.ModuleList([KwargsBlock() for _ in range(layers)])
        _fill(self, 1, 0.5)

    def forward(self, x, mask):
        for blk in self.layer:
            x = blk(x, mask=mask)[0]
        return x


# --------------------------------------------------------------- the digits as 16 rows of 16
def fit_digit_rows(model: nn.Module, data, steps: int, lr: float, generator) -> nn.Module:
    """Train ``model`` (input (N, 16, 16): the upsampled digits' rows) with Adam on random
    mini-batches of 64 drawn from ``generator``; returns it in eval mode."""
    x, y = data.train_images.squeeze(1), data.train_labels
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def digit_rows_accuracy(model: nn.Module, data) -> float:
    """Test accuracy of a model trained by :func:`fit_digit_rows`."""
    with torch.no_grad():
        return float((model(data.test_images.squeeze(1)).argmax(1) == data.test_labels)
                     .float().mean())


def output_error_per_position(model: nn.Module, layer: nn.Module, rounded: nn.Module,
                              batches) -> float:
    """Mean squared error of ``rounded`` against ``layer`` (a module of ``model``) on the
    inputs ``layer`` gets when ``model`` runs ``batches``, per output position (the squared
    error summed over channels, over samples times positions): a rounding's layer cost on
    float inputs, computed from the layers themselves."""
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    total, rows = 0.0, 0
    with torch.no_grad():
        try:
            for b in batches:
                model(b)
        finally:
            handle.remove()
        for x in inputs:
            diff = layer(x) - rounded(x)
            total += float((diff ** 2).sum())
            rows += diff[:, 0].numel()
    return total / rows
