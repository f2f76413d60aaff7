"""Every random generator a training step draws from, seeded per rank and captured as JSON-able data (ints and
lists of ints, no pickle) so that `--resume` continues the exact random sequence."""

from __future__ import annotations

import random

import numpy as np
import torch

RANK_STRIDE = 100_003  # rank r of a run with seed s draws from seed s + r * RANK_STRIDE


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank` (distinct ranks draw distinct cameras, samples and augmentations)."""
    return (seed + rank * RANK_STRIDE) % 2**63


def seed_everything(seed: int, generator: torch.Generator) -> None:
    """Seed Python's `random`, NumPy's global generator, torch (CPU and every CUDA device) and `generator`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator.manual_seed(seed)


def _bytes(state: torch.Tensor) -> list[int]:
    return state.to(torch.uint8).tolist()


def rng_state(generator: torch.Generator) -> dict:
    """JSON-able state of every generator `seed_everything` seeds (CUDA: each visible device)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "python": {"version": version, "state": list(internal), "gauss": python_gauss},
        "numpy": {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": _bytes(torch.get_rng_state()),
        "cuda": [_bytes(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "generator": {"device": str(generator.device), "state": _bytes(generator.get_state())},
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what `rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np.array(np_state["key"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
    generator.set_state(torch.tensor(state["generator"]["state"], dtype=torch.uint8))
