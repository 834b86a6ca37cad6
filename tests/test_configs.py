"""Every config in conf/ composes and validates: each primary config with each option of each group it
uses, each experiment file, each launcher; unknown keys and wrong types fail before any work starts.
Files are discovered, so a new config file is tested by adding it."""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf

from cot2cli.config import register_configs
from tasks import get_task

CONF = Path(str(files("cot2cli.conf")))
NOT_CHOICES = {"hydra", "experiment"}  # hydra: Hydra's own; experiment: tested on its own below


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def primaries() -> list[str]:
    return sorted(p.stem for p in CONF.glob("*.yaml"))


def groups(primary: str) -> list[str]:
    """The config groups in a primary config's defaults list (`- task: mnns` -> task)."""
    defaults = yaml.safe_load((CONF / f"{primary}.yaml").read_text()).get("defaults", [])
    return [next(iter(d)) for d in defaults if isinstance(d, dict)]


CHOICES = [(p, g, o) for p in primaries() for g in groups(p) if g not in NOT_CHOICES for o in options(g)]
EXPERIMENTS = options("experiment")
LAUNCHERS = options("hydra/launcher")
WITH_EXPERIMENTS = [p for p in primaries() if "experiment" in groups(p)]


# cot2's launcher files complete the plugins' schemas of the same name on purpose (see cot2cli.stages).
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register_configs()
    with initialize_config_module(config_module="cot2cli.conf", version_base="1.3"):
        yield


def validated(primary: str, overrides: list[str]):
    """Compose, resolve every interpolation, and build the task the config names, as a stage would."""
    cfg = compose(config_name=primary, overrides=overrides)
    OmegaConf.to_container(cfg, resolve=True)
    if OmegaConf.select(cfg, "task.name"):
        get_task(cfg.task)
    return cfg


@pytest.mark.parametrize("primary", primaries())
def test_primary_config_composes(primary):
    assert validated(primary, []).stage == primary


@pytest.mark.parametrize("primary, group, option", CHOICES, ids=[f"{p}-{g}={o}" for p, g, o in CHOICES])
def test_each_group_option_composes(primary, group, option):
    cfg = validated(primary, [f"{group}={option}"])
    assert cfg[group] is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_composes_with_a_primary_config(experiment):
    """An experiment sets one stage's keys (paper_mnns: train, paper_grpo: rl); it must compose with one."""
    composed, failures = [], []
    for primary in WITH_EXPERIMENTS:
        try:
            validated(primary, [f"experiment={experiment}"])
            composed.append(primary)
        except ConfigCompositionException as exc:
            failures.append(f"{primary}: {exc}")
    assert composed, f"experiment={experiment} composes with no primary config: {failures}"


def launcher_schema(name: str) -> type:
    """The launcher plugin's own dataclass, which cot2's hydra/launcher/<name>.yaml replaces."""
    from hydra.core.config_store import ConfigStore

    node = ConfigStore.instance().load(f"hydra/launcher/{name}.yaml").node
    return OmegaConf.get_type(node)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_files_are_complete_and_typed(name):
    """cot2's file shadows the plugin's schema: it must name every field of it (Hydra is to stop merging the
    two), no other, each with a value of the field's type; and compose with overrides from the command line."""
    ours = OmegaConf.load(CONF / "hydra" / "launcher" / f"{name}.yaml")
    schema = launcher_schema(name)
    assert set(ours) == {f.name for f in dataclasses.fields(schema)}
    OmegaConf.merge(OmegaConf.structured(schema), ours)
    get_class(ours._target_)
    key = "n_jobs" if name == "joblib" else "timeout_min"
    cfg = compose("train", overrides=[f"hydra/launcher={name}", f"hydra.launcher.{key}=7"], return_hydra_config=True)
    assert cfg.hydra.launcher[key] == 7
    assert cfg.hydra.launcher._target_ == ours._target_


def test_slurm_launcher_resources_are_overridable():
    overrides = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=30",
                 "hydra.launcher.cpus_per_task=8", "hydra.launcher.gpus_per_node=0", "hydra.launcher.mem_gb=4"]
    launcher = compose("train", overrides=overrides, return_hydra_config=True).hydra.launcher
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task) == ("debug", 30, 8)
    assert (launcher.gpus_per_node, launcher.mem_gb) == (0, 4)
    with pytest.raises(ConfigCompositionException):
        compose("train", overrides=[*overrides, "hydra.launcher.timeout_min=soon"], return_hydra_config=True)


@pytest.mark.parametrize(
    "override",
    ["optim.nokey=1", "optim.epochs=abc", "model.d_model=1.5", "method.name=nosuch", "seed=zero", "task.nokey=1"],
)
def test_unknown_key_or_wrong_type_fails(override):
    with pytest.raises(ConfigCompositionException):
        compose("train", overrides=[override])


def test_unknown_key_in_a_yaml_file_fails(tmp_path):
    """A config file with a key the schema lacks is refused like a command-line override."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\noptim:\n  epoch: 3\n")
    with pytest.raises(ConfigCompositionException):
        compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"])
    (tmp_path / "experiment" / "typed.yaml").write_text("# @package _global_\noptim:\n  epochs: many\n")
    with pytest.raises(ConfigCompositionException):
        compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "experiment=typed"])
