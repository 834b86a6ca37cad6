"""Checkpoints: the model and everything needed to continue or evaluate it, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cot2cli.errors import Cot2Error
from cot2cli.model import GPT
from cot2cli.runs import CHECKPOINT_FILES, atomic_torch_save

FORMAT = "cot2-checkpoint-1"


def build_model(model_args: dict[str, Any]) -> GPT:
    try:
        return GPT(**model_args)
    except ValueError as exc:  # the model's own size checks are bad input, not a crash
        raise Cot2Error(f"model: {exc}") from exc


def model_args(model_cfg: Any, vocab_size: int, n_positions_needed: int) -> dict[str, Any]:
    """Constructor arguments from config and data; `model.n_positions` must fit the longest sequence."""
    n_positions = model_cfg.get("n_positions") or n_positions_needed
    if n_positions < n_positions_needed:
        raise Cot2Error(
            f"model.n_positions={n_positions} is too small: the sequences need {n_positions_needed} positions"
        )
    return {
        "vocab_size": vocab_size,
        "n_positions": n_positions,
        "n_layer": model_cfg.n_layer,
        "n_head": model_cfg.n_head,
        "d_model": model_cfg.d_model,
        "dropout": model_cfg.dropout,
        "smeared_keys": model_cfg.smeared_keys,
        "head_dim": model_cfg.get("head_dim"),
    }


def save_checkpoint(path: Path, **state: Any) -> None:
    atomic_torch_save({"format": FORMAT, **state}, path)


def save_epoch(run_dir: Path, state: dict[str, Any], val_acc: float, best: float) -> float:
    """End of an epoch: best.pt when val_acc beats `best`, then the last checkpoint; returns the new best."""
    if val_acc > best:
        best = val_acc
        save_checkpoint(run_dir / CHECKPOINT_FILES["best"], **state)
    save_checkpoint(run_dir / CHECKPOINT_FILES["last"], **state)
    return best


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by cot2, or fail in one line saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise Cot2Error(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise Cot2Error(f"checkpoint {path} is corrupted or unreadable ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise Cot2Error(f"{path} is not a cot2 checkpoint (expected format {FORMAT})")
    return state


def model_from_checkpoint(state: dict[str, Any], device: torch.device) -> GPT:
    model = build_model(state["model_args"])
    model.load_state_dict(state["model"])
    return model.to(device)
