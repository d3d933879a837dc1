"""Tiny torch modules for the pruning unit tests (untrained; fast). ``python_factory`` writes a factory file."""
from __future__ import annotations

from pathlib import Path


def residual(width: int = 24):
    """Two residual blocks tied by adds, a 1x1 projection, GAP, linear 5; input [N,3,16,16]."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.a1 = nn.Conv2d(width, width, 3, padding=1)
            self.a2 = nn.Conv2d(width, width, 3, padding=1)
            self.down = nn.Conv2d(width, 2 * width, 1, stride=2)
            self.b1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
            self.b2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
            self.fc = nn.Linear(2 * width, 5)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
            x = torch.relu(self.down(x) + self.b2(torch.relu(self.b1(x))))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    return Tiny()


def not_exportable():
    """Runs in eager mode but leaves the graph through numpy: torch.onnx.export cannot trace it."""
    import torch
    from torch import nn

    class Escapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x)).mean((2, 3))
            y = torch.from_numpy(y.detach().numpy().copy())  # a data-dependent escape from the graph
            return self.fc(y)

    torch.manual_seed(0)
    return Escapes()


FACTORY_FILE = '''
import sys
sys.path.insert(0, {here!r})
import prune_models

def build():
    return prune_models.residual()

def escapes():
    return prune_models.not_exportable()

def not_a_module():
    return 42
'''


def python_factory(folder: Path) -> Path:
    """A user's factory file (``factories.py:build``) and matching weights ``w.pt``."""
    import torch

    path = Path(folder) / "factories.py"
    path.write_text(FACTORY_FILE.format(here=str(Path(__file__).parent)))
    torch.save(residual().state_dict(), Path(folder) / "w.pt")
    return path
