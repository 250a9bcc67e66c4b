"""The run configuration: one typed tree of the components' own config records, read from Hydra.

    cfg = load_run_config(hydra_cfg)     # RunConfig, or ConfigError naming the dotted key

The YAML (``conf/spin_trainer.yaml``) has the sections users of RL post-training recipes know:
``data``, ``actor_rollout_ref`` (``model``, ``actor``, ``ref``, ``rollout``), ``reward_model``,
``algorithm`` and ``trainer``.  Each leaf record belongs to the component that reads it —
``data.DataConfig``, ``train.ActorConfig`` (with ``OptimConfig`` and ``spec.Precision``),
``sync.SyncConfig`` (the rollout section's ``sync``), ``loss.LossConfig`` and
``pairs.PairConfig`` (the algorithm section's ``loss`` and ``pairs``), ``reward.RewardConfig``
— and this module only composes them: nothing is copied into a second record.  Every record
validates itself when built; a key that is not in the schema, a value of the wrong type and a
value that breaks a rule are all refused before anything starts, with the dotted key.
Cross-section rules (SPIN needs n >= 1, CPU runs need the embedded engine…) are checked here.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import math
import types
import typing
from typing import Any, Mapping, Optional

from megatron_spin.data.config import DataConfig
from megatron_spin.errors import ConfigError, as_enum, coerce_enums, require
from megatron_spin.loss.config import LossConfig
from megatron_spin.metrics.logger import LoggerKind
from megatron_spin.pairs.config import PairConfig
from megatron_spin.reward.config import RewardConfig
from megatron_spin.rollout.launcher import Colocation, EngineKind, Quantization
from megatron_spin.spec.precision import DType
from megatron_spin.sync.config import SyncConfig, TransportKind
from megatron_spin.train.config import ActorConfig, RefConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = "packaged:smollm2"  # an HF model directory, or a packaged model
    megatron_dir: Optional[str] = None  # converted checkpoint (default: converted into the cache on first use)

    def __post_init__(self) -> None:
        require(bool(self.path), "path", "required: an HF model directory, or packaged:smollm2 (the presets leave "
                "it to you: actor_rollout_ref.model.path=/models/...)")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    engine: EngineKind = EngineKind.EMBEDDED
    num_engines: int = 1  # disaggregated; colocated GPU runs have one engine per tp_size GPUs
    tp_size: int = 1  # GPUs per engine (SGLang)
    n: int = 4  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    placement: Colocation = Colocation.COLOCATED
    mem_fraction_static: Optional[float] = None  # SGLang's static memory fraction (None: SGLang's choice)
    threads: int = 0  # embedded engine: torch threads per engine (0: the cores left by the trainer ranks)
    max_off_policy_steps: int = 0  # accept samples this many pushes old
    quantization: Optional[Quantization] = None  # sglang, experimental: serve FP8 quantised from bf16 pushes
    # sglang: deterministic inference, so per-sample seeds apply and a resumed run draws the samples
    # the uninterrupted one would have (slower kernels).  The embedded engine always seeds.
    deterministic: bool = False
    # A dead engine (its process gone) is started again on its address, given the current weights
    # and re-admitted, at most this many times per engine over the run (0: it stays dropped).
    max_engine_restarts: int = 3
    sync: SyncConfig = SyncConfig()

    def __post_init__(self) -> None:
        coerce_enums(self, engine=EngineKind, placement=Colocation, quantization=Quantization)
        for key in ("num_engines", "tp_size", "n"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.engine == EngineKind.SGLANG or self.tp_size == 1, "tp_size",
                "the embedded engine runs at tp_size=1")
        require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.max_off_policy_steps in (0, 1), "max_off_policy_steps", "0 (on-policy) or 1")
        require(self.mem_fraction_static is None or 0 < self.mem_fraction_static < 1, "mem_fraction_static",
                "must be in (0, 1) or null")
        require(self.threads >= 0, "threads", "must be >= 0")
        require(self.max_engine_restarts >= 0, "max_engine_restarts", f"must be >= 0, got {self.max_engine_restarts}")
        require(self.quantization is None or self.engine == EngineKind.SGLANG, "quantization",
                "only SGLang engines quantise (the embedded engine serves the trainer's dtype)")
        require(self.quantization is None or self.sync.dtype in (None, DType.BFLOAT16, DType.FLOAT16), "sync.dtype",
                "an FP8-serving engine quantises what it receives: send bfloat16 (or float16)")

    @property
    def colocated(self) -> bool:
        return self.placement == Colocation.COLOCATED

    @property
    def engines_in_ranks(self) -> bool:
        """The engine runs inside the trainer rank (transport ``shared``), not in a process of its own."""
        return self.sync.transport == TransportKind.SHARED


@dataclasses.dataclass(frozen=True)
class ActorRolloutRefConfig:
    model: ModelConfig = ModelConfig()
    actor: ActorConfig = ActorConfig()
    ref: RefConfig = RefConfig()
    rollout: RolloutConfig = RolloutConfig()


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    loss: LossConfig = LossConfig()
    pairs: PairConfig = PairConfig()
    spin: bool = False  # chosen = the data's ground-truth response, rejected = the policy's sample


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    nnodes: int = 1
    n_gpus_per_node: int = 0  # 0: CPU ranks
    cpu_ranks: int = 0  # CPU runs: trainer ranks (a multiple of TP*PP; the rest is DP). 0: TP*PP
    total_training_steps: int = 10
    save_freq: int = 0  # 0: save at the end only; -1: never (a requested stop still saves)
    test_freq: int = 0  # held-out reward every N steps (0: before and after only)
    ref_update_freq: int = 0  # copy the actor into the reference every N steps (0: never)
    logger: tuple[LoggerKind, ...] = (LoggerKind.CONSOLE, LoggerKind.JSONL)
    project_name: str = "megatron_spin"
    experiment_name: str = "run"
    default_local_dir: str = "runs/${trainer.project_name}/${trainer.experiment_name}"
    resume: str = "auto"  # auto | disable | a checkpoint directory
    ray_address: Optional[str] = None  # None: start a local Ray; "auto" or host:port: join a cluster
    # Ray places the workers (true), or the one CPU rank runs inside the driver process and the
    # engines are its children (false); null: without Ray wherever that is possible (RunConfig.uses_ray).
    use_ray: Optional[bool] = None
    seed: int = 1234
    timeout_s: float = 3600.0  # per Ray worker call (hangs surface as errors); a rank in the driver has none

    def __post_init__(self) -> None:
        object.__setattr__(self, "logger", tuple(as_enum(LoggerKind, x, "logger") for x in self.logger))
        for key in ("nnodes", "total_training_steps"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("n_gpus_per_node", "cpu_ranks", "test_freq", "ref_update_freq"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.save_freq >= -1, "save_freq", f"must be >= 1 (every N steps), 0 (at the end) or -1 (never), got {self.save_freq}")
        require(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.nnodes == 1 or self.ray_address is not None, "ray_address",
                f"a run on trainer.nnodes={self.nnodes} nodes joins a Ray cluster spanning them: give its address "
                "(slurm/launch.sh starts one and sets it)")
        require(bool(self.resume), "resume", "auto, disable or a checkpoint directory")
        require(self.use_ray is not False or self.ray_address is None, "use_ray",
                f"false runs without Ray, so there is no cluster to join at ray_address={self.ray_address}")

    def saves_after(self, step: int, stopping: bool) -> bool:
        """Whether step ``step`` ends with a checkpoint: every ``save_freq`` steps and at the last
        step (``save_freq`` 0: the last only), never with -1, and always when a stop was requested
        (the stop message promises that the same command resumes)."""
        periodic = self.save_freq > 0 and step % self.save_freq == 0
        return periodic or (self.save_freq >= 0 and step == self.total_training_steps) or stopping


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

    def __post_init__(self) -> None:
        """The rules that span sections (each record checked its own when it was built)."""
        require(self.rollout.n >= (1 if self.algorithm.spin else 2), "actor_rollout_ref.rollout.n",
                "online DPO needs n >= 2 samples per prompt to form pairs")
        mp = self.actor.tp * self.actor.pp
        require(self.trainer.cpu_ranks % mp == 0, "trainer.cpu_ranks",
                f"a multiple of TP*PP={mp} (the ranks beyond one model replica are data-parallel), "
                f"got {self.trainer.cpu_ranks}")
        if self.rollout.engines_in_ranks:
            self._check_shared()
        if self.trainer.use_ray is False:
            for problem in self._needs_ray():
                require(False, "trainer.use_ray", f"false: {problem}")
        if self.trainer.n_gpus_per_node == 0:
            require(self.rollout.engine == EngineKind.EMBEDDED, "actor_rollout_ref.rollout.engine",
                    "sglang needs GPUs (trainer.n_gpus_per_node > 0); use the embedded engine on the CPU")
            # The ranks themselves refuse FP8 without TE + CUDA when they build the model; on CPU ranks
            # it can never work, so say so before anything starts.
            require(self.actor.precision.fp8 is None, "actor_rollout_ref.actor.precision.fp8",
                    "FP8 needs TransformerEngine on CUDA GPUs; this run has CPU ranks (trainer.n_gpus_per_node=0). "
                    "Remove it, or run on GPUs with TransformerEngine installed (see the README's GPU section)")
        else:
            require(self.trainer.cpu_ranks == 0, "trainer.cpu_ranks",
                    "is for CPU runs; on GPUs every GPU of trainer.nnodes x n_gpus_per_node is a trainer rank")
            transport = self.rollout.sync.transport
            require(transport != TransportKind.TENSOR or self.rollout.colocated, "actor_rollout_ref.rollout.sync.transport",
                    "tensor needs colocated engines on GPUs (rollout.placement=colocated): an engine opens CUDA IPC "
                    "handles only from GPUs it can see; disaggregated engines take disk or distributed")
            require(transport != TransportKind.DISTRIBUTED or not self.rollout.colocated,
                    "actor_rollout_ref.rollout.sync.transport",
                    "distributed with colocated engines would put a pusher and an engine rank on one GPU in one NCCL "
                    "group, which NCCL refuses (Duplicate GPU detected); colocated engines take tensor")

    def _check_shared(self) -> None:
        """The shared transport puts the engine inside the one trainer rank, reading its parameters."""
        key = "actor_rollout_ref.rollout.sync.transport"
        r, t = self.rollout, self.trainer
        require(t.n_gpus_per_node == 0 and t.nnodes == 1, key,
                "shared runs the embedded engine inside the trainer rank on the CPU (trainer.n_gpus_per_node=0, "
                "nnodes=1); GPU engines take tensor, disk or distributed")
        require(self.actor.tp * self.actor.pp == 1 and t.cpu_ranks in (0, 1), key,
                f"shared needs one trainer rank holding the whole model (TP=PP=1, cpu_ranks 0 or 1); got "
                f"TP={self.actor.tp}, PP={self.actor.pp}, cpu_ranks={t.cpu_ranks}")
        require(r.num_engines == 1 and r.colocated, key,
                "shared means one engine colocated in the rank (rollout.num_engines=1, rollout.placement=colocated)")
        require(r.sync.dtype is None, "actor_rollout_ref.rollout.sync.dtype",
                "must be null with shared: the engine reads the actor's parameters in their own dtype")
        require(r.threads == 0, "actor_rollout_ref.rollout.threads",
                "must be 0 with shared: the engine computes with the rank's torch threads (one pool per process)")

    def _needs_ray(self) -> list[str]:
        """Why this run needs Ray to place its workers (none: its one CPU rank can run inside the
        driver process, its engines as the driver's children)."""
        t, problems = self.trainer, []
        if t.n_gpus_per_node or t.nnodes != 1 or t.ray_address is not None:
            problems.append("without Ray one CPU rank runs inside the driver (trainer.n_gpus_per_node=0, nnodes=1, "
                            "no ray_address); GPU and multi-node runs place their workers with Ray")
        if self.actor.tp * self.actor.pp != 1 or t.cpu_ranks not in (0, 1):
            problems.append(f"without Ray one trainer rank runs (TP=PP=1, cpu_ranks 0 or 1); got TP={self.actor.tp}, "
                            f"PP={self.actor.pp}, cpu_ranks={t.cpu_ranks}")
        if self.reward_model.type == "hf":
            problems.append("an HF reward model (reward_model.type=hf) runs in Ray workers; use a rule or remote "
                            "reward without Ray")
        return problems

    @property
    def uses_ray(self) -> bool:
        """Whether Ray places the workers: ``trainer.use_ray``, or where it is null (the default),
        only a run that needs it (several ranks, GPUs, nodes, HF reward workers)."""
        return self.trainer.use_ray if self.trainer.use_ray is not None else bool(self._needs_ray())


# -- reading a (Hydra / OmegaConf) mapping into the records ------------------------------------
def _convert(tp: Any, value: Any, key: str, nullable: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        errors = []
        for option in options:  # the first type the value fits (beta: a float, or one per iteration)
            try:
                return _convert(option, value, key, nullable=type(None) in typing.get_args(tp))
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if isinstance(value, (str, int, float)):
            value = [value]
        if isinstance(value, str) or not isinstance(value, collections.abc.Sequence):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return as_enum(tp, value, key, nullable)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(key, f"expected {tp.__name__}, got {value!r}")
        return value
    return value


def _build(cls, mapping: Any, prefix: str):
    if mapping is None:
        return cls()
    if not isinstance(mapping, Mapping):
        raise ConfigError(prefix, f"expected a section, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - fields)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}".lstrip("."), f"unknown key (known: {sorted(fields)})")
    kwargs = {name: _convert(hints[name], mapping[name], f"{prefix}.{name}".lstrip("."))
              for name in fields & set(mapping)}
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # the record's own rule, keyed relative to the record
        raise exc.under(prefix) from None


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
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        # Presets leave site-specific keys (model path, data files) as ``???``: name them all.
        missing = sorted(k for k in missing_keys(OmegaConf.to_container(cfg, resolve=False))
                         if not k.startswith("hydra."))
        if missing:
            raise ConfigError(missing[0], f"required, the preset leaves it to you (give it on the command line, "
                                          f"e.g. {missing[0]}=...); all missing: {', '.join(missing)}")
        cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg.pop("hydra", None)  # Hydra's own settings, not the run's
    return _build(RunConfig, cfg, "")


def to_dict(cfg: RunConfig) -> dict:
    """Plain data (for saving the resolved config with the run); enums as their values."""
    def plain(x):
        if isinstance(x, enum.Enum):
            return x.value
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))
