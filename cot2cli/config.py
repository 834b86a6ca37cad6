"""Structured configs: the schema behind every YAML file in conf/.

Each stage has one dataclass; each config group (task/, model/, method/, rl/) has one per
option kind. Every field carries its help text, and the defaults are the fast laptop
settings; `experiment=paper_*` files switch to the paper's hyperparameters. Hydra checks
overrides against these types before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from types import SimpleNamespace
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


def _help(text: str, default: Any = MISSING) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


class Choice(str, Enum):
    """A closed set of names; prints as its plain value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class MethodName(Choice):
    cot2 = "cot2"
    discrete = "discrete"
    nocot = "nocot"
    coconut = "coconut"


class Schedule(Choice):
    constant = "constant"
    cosine = "cosine"


class Feed(Choice):
    teacher = "teacher"
    self = "self"


@dataclass
class PathsConfig:
    outputs: str = _help("outputs tree root (data/ runs/ sweeps/); env COT2_OUTPUTS", "${oc.env:COT2_OUTPUTS,outputs}")


@dataclass
class RunConfig:
    name: str | None = _help("run directory name; default: a timestamp. Reusing a name resumes that run", None)


@dataclass
class ModelConfig:
    n_layer: int = _help("transformer blocks", 2)
    n_head: int = _help("attention heads per block (must divide d_model unless head_dim is set)", 2)
    d_model: int = _help("embedding width d", 32)
    n_positions: int | None = _help("position table size (null = what the task's sequences need)", None)
    dropout: float = _help("dropout on embeddings, attention and MLP outputs", 0.1)
    smeared_keys: bool = _help(
        "each attention key takes a learned share of its predecessor's (not in GPT-2): lets the graph tasks'"
        " edge lookups be learned within a CPU budget",
        False,
    )
    head_dim: int | None = _help("width of each attention head (null = d_model // n_head, as in GPT-2)", None)


@dataclass
class MethodConfig:
    name: MethodName = _help("cot2 (CSFT) | discrete (CoT SFT) | nocot | coconut", MethodName.cot2)
    budget: int | None = _help("cot2: supervision budget B, traces per target (null = every trace)", None)
    feed: Feed = _help("cot2: teacher = feed alpha*_t (one parallel pass); self = feed own softmax", Feed.teacher)
    self_feed_from_epoch: int | None = _help("cot2: curriculum, switch feed teacher -> self at this epoch", None)
    supervised_steps: list[int] | None = _help("cot2: 1-based steps with a KL term (null = all)", None)
    epochs_per_stage: int = _help("coconut: epochs before one more discrete step becomes continuous", 5)
    reset_optimizer: bool = _help("coconut: clear the AdamW moments when a stage begins, as Coconut does", True)
    dropout: float | None = _help("dropout while training this method, in place of model.dropout (null = "
                                  "model.dropout); coconut sets 0: its noise on each fed-back hidden state "
                                  "compounds along the chain of thoughts", None)


@dataclass
class OptimConfig:
    epochs: int = _help("passes over the training split", 100)
    batch_size: int = _help("examples per optimisation step", 16)
    lr: float = _help("AdamW learning rate", 1e-3)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    beta2: float = _help(
        "AdamW second-moment decay; 0.95 adapts sooner when gradients grow, as when a lookup starts to form", 0.999
    )
    grad_clip: float = _help("max gradient norm (0 = off)", 1.0)
    schedule: Schedule = _help("learning rate: constant | cosine (decays to 10% of lr)", Schedule.cosine)
    warmup_epochs: int = _help("epochs of linear warm-up", 0)


@dataclass
class GenerateConfig:
    stage: str = "generate"
    task: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class RunSettings:
    """What every stage that writes a run directory shares."""

    seed: int = _help("seed of everything random in the run: initialisation, batch order, dropout, sampling", 0)
    device: str = _help("auto (CUDA when present) | cpu | cuda | cuda:N", "auto")
    threads: int = _help("CPU threads for torch; 1 is fastest for these tiny models and leaves cores to sweeps", 1)
    eval_batch_size: int = _help("examples per batch when evaluating the validation split", 4096)
    run: RunConfig = field(default_factory=RunConfig)
    resume: str | None = _help("continue this run (name or path) from its last checkpoint", None)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class TrainConfig(RunSettings):
    stage: str = "train"
    task: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# -- cot2 rl (GRPO) ---------------------------------------------------------------------
class SamplerName(Choice):
    mts = "mts"
    dirichlet = "dirichlet"


class CheckpointName(Choice):
    best = "best"
    last = "last"


@dataclass
class GRPOConfig:
    name: SamplerName = _help("how a continuous step is sampled: mts (K tokens) | dirichlet", SamplerName.mts)
    K: int = _help("mts: tokens drawn per continuous step (1 = discrete CoT sampling)", 3)
    normalize: bool = _help("mts: draw from softmax(z / K) rather than softmax(z)", True)
    gamma: float = _help("dirichlet: alpha ~ Dirichlet(gamma * p) over tokens with p >= 1e-3", 1.0)
    group_size: int = _help("G: rollouts per prompt; advantages are normalised within each group", 8)
    batch_size: int = _help("prompts per rollout batch; each batch is batch_size * G rollouts", 16)
    epochs: int = _help("passes over the training prompts (MNNS: deterministic accuracy peaks after 1-2)", 2)
    prompts_per_epoch: int | None = _help("train prompts drawn per epoch (null = all of them)", None)
    ppo_epochs: int = _help("gradient steps per rollout batch against the same pi_old (1 = the reference)", 1)
    clip_eps: float = _help("PPO clipping: ratios pi / pi_old outside [1 - eps, 1 + eps] stop the gradient", 0.1)
    kl_coef: float = _help("weight of the k3 KL to the starting policy (0 = off)", 0.0)
    lr: float = _help("AdamW learning rate", 5e-6)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    grad_clip: float = _help("max gradient norm (0 = off)", 0.0)


@dataclass
class RLConfig(RunSettings):
    stage: str = "rl"
    init_from: str | None = _help("the completed cot2 or discrete run (name or path) to start from", None)
    init_checkpoint: CheckpointName = _help("which checkpoint of init_from: best | last", CheckpointName.best)
    rl: GRPOConfig = field(default_factory=GRPOConfig)
    task: Any = _help("copied from init_from's run (its task and dataset); not set by hand", None)
    model: Any = _help("copied from init_from's run", None)
    method: Any = _help("copied from init_from's run: decides the deterministic decoding (val_acc)", None)


# -- cot2 eval --------------------------------------------------------------------------
class SplitName(Choice):
    train = "train"
    valid = "valid"
    test = "test"


@dataclass
class EvalSettings:
    split: SplitName = _help("split to score: valid | test | train", SplitName.valid)
    pass_k: list[int] = _help("k of pass@k and majority@k (each <= n_samples)", [1, 2, 4, 8, 16])
    temperatures: list[float] = _help("sampling temperatures T (steps and answer)", [0.8, 1.0])
    n_samples: int = _help("samples per instance behind pass@k / majority@k (>= the largest k)", 32)
    mts_K: list[int] = _help("cot2 models: K of multi-token sampling (tokens averaged per step)", [1, 3, 6])
    sample_answer: bool = _help("sample the answer token at T too (false = its argmax)", True)
    mass_threshold: float = _help("a reachable state counts as held by a continuous token at this mass", 0.01)
    show: int = _help("print the top states of each continuous token for this many instances", 0)
    source: str | None = _help("score on the run's task imported from this file instead (task.source, e.g. "
                               "Coconut's ProsQA JSON); prompts are left-padded to the training width", None)
    batch_size: int = _help("rollouts per forward pass (bounds memory)", 8192)


@dataclass
class EvalConfig:
    stage: str = "eval"
    run: str | None = _help("the run to evaluate (name or path)", None)
    checkpoint: CheckpointName = _help("best (best.pt) | last (checkpoint.pt)", CheckpointName.best)
    eval: EvalSettings = field(default_factory=EvalSettings)
    seed: int = _help("seed of the sampling: the same command gives the same numbers", 0)
    device: str = _help("auto (CUDA when present) | cpu | cuda | cuda:N", "auto")
    threads: int = _help("CPU threads for torch", 1)
    paths: PathsConfig = field(default_factory=PathsConfig)


def plain(node: Any) -> SimpleNamespace:
    """A config node as a plain object, for hot loops: same attribute names, no OmegaConf lookups."""
    return SimpleNamespace(**OmegaConf.to_container(node, resolve=True)) if OmegaConf.is_config(node) else node


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore; YAML files extend them (`- /schema/<group>/<name>@_here_`)."""
    from tasks import REGISTRY

    cs = ConfigStore.instance()
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/method", name="method", node=MethodConfig)
    cs.store(name="rl_schema", node=RLConfig)
    cs.store(group="schema/rl", name="rl", node=GRPOConfig)
    for name, task_cls in REGISTRY.items():
        cs.store(group="schema/task", name=name, node=task_cls.Config)
