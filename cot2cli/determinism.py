"""Seeds, RNG snapshots and the device: same seed, same machine, same numbers; resume included."""

from __future__ import annotations

import random
from typing import Any

import torch

from cot2cli.errors import Cot2Error


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when present, else CPU; anything else must be a device torch knows and has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise Cot2Error(f"device={name!r} is not a device: allowed auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Cot2Error(f"device={name!r} but CUDA is not available here: use device=auto or cpu")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch, and return the generator that orders the training batches."""
    random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "batches": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
