"""Place trainer ranks and rollout engines with Ray, and drive them as one object.

    with TrainerCluster(cfg, arch, placement, model, run_dir) as cluster:
        samples = cluster.fleet.generate(prompts, sampling)
        result = cluster.train(pairs, iteration, step)      # TrainResult
        report = cluster.push(version)                       # SyncReport

Where everything runs is :class:`~megatron_spin.orchestrate.placement.Placement`'s decision.
Ray is started locally unless ``trainer.ray_address`` names a cluster.  Every call to the
ranks is collective, so they are always called together, and each wait is bounded
(``trainer.timeout_s``): a hung collective surfaces as an error naming the call, not as a run
that never ends.

Without Ray (``RunConfig.uses_ray``: one CPU rank on one machine, the default there) the rank is an object in
this process and the engines are its child processes: the same calls, made directly.  That
saves Ray's processes (~0.45 GB) and a second interpreter holding torch; with one rank there is
no collective that could hang, so nothing needs the timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_spin.ckpt.metadata import HF_SUBDIR, copy_identity
from megatron_spin.ckpt.run_state import ACTOR_SUBDIR
from megatron_spin.config.run import RunConfig
from megatron_spin.convert.prepare import PreparedModel
from megatron_spin.errors import ClusterError
from megatron_spin.metrics.perf import train_perf
from megatron_spin.orchestrate.engines import EngineHost, EngineLaunch, engine_log_dir
from megatron_spin.orchestrate.placement import Placement
from megatron_spin.orchestrate.rewards import build_reward_pool
from megatron_spin.orchestrate.worker import RankSpec, RankTrainResult, TrainerWorker
from megatron_spin.platform import cpu_worker_env
from megatron_spin.reward import RewardSource
from megatron_spin.rollout.client import EngineClient
from megatron_spin.rollout.fleet import RolloutFleet
from megatron_spin.rollout.launcher import EngineKind
from megatron_spin.spec.arch import ModelArch
from megatron_spin.sync.config import PushTarget, TransportKind
from megatron_spin.sync.push import PushCoordinator, SyncReport
from megatron_spin.sync.routing import FeedRoute
from megatron_spin.sync.transports import make_transport
from megatron_spin.sync.verify import ProbeGap, probe_gap

log = logging.getLogger("megatron_spin.cluster")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """One actor update, as the driver logs it."""

    stats: dict[str, float]  # loss, reward accuracy/margins, log-probs, grad norm, LR, response tokens
    ref_seconds: float  # the reporting rank's reference pass
    train_seconds: float  # the reporting rank's forward/backward and optimizer step
    perf: dict[str, float]  # throughput, model FLOPs, MFU/HFU (metrics.perf)

    def as_metrics(self) -> dict[str, float]:
        return {**self.stats, "timing/ref_logps": self.ref_seconds, "timing/train": self.train_seconds, **self.perf}


def cpu_threads(placement: Placement, colocated: bool) -> tuple[int, int]:
    """torch threads of (each trainer rank, each engine) on CPU hosts (0: torch's default, GPUs).

    Colocated, generation and training take turns (the engines sleep while the actor trains, the
    ranks wait while the engines sample), so each phase may use every core: the ranks share them
    during an update, the engines during sampling.  Disaggregated, they run at once and split."""
    if placement.gpus_per_node:
        return 0, 0
    cpus = os.cpu_count() or 1
    if colocated:
        return max(1, cpus // placement.trainer_world), max(1, cpus // placement.engines)
    split = max(1, cpus // (placement.trainer_world + placement.engines))
    return split, split


class TrainerCluster:
    def __init__(self, cfg: RunConfig, arch: ModelArch, placement: Placement, model: PreparedModel,
                 run_dir: Path, resume_step: Optional[int] = None):
        """``resume_step``: the run continues from its checkpoint at this step (rank timing files
        keep their records up to it)."""
        self.cfg, self.arch, self.placement = cfg, arch, placement
        self.timeout_s = cfg.trainer.timeout_s
        api_key = secrets.token_urlsafe(24)  # engines accept weights only from this run
        rank_threads, engine_threads = cpu_threads(placement, cfg.rollout.colocated)
        transport = cfg.rollout.sync.transport
        # Tensor pushes go by device locality: which trainer rank feeds which engine rank.
        self.route = FeedRoute.for_placement(trainer_world=placement.trainer_world, engines=placement.engines,
                                             engine_tp=placement.engine_tp, gpus_per_node=placement.gpus_per_node) \
            if transport == TransportKind.TENSOR else None
        self.target = PushTarget(
            engine_tp_size=cfg.rollout.tp_size, api_key=api_key,
            disk_dir=str(run_dir / "sync") if transport == TransportKind.DISK else None,
            side_files=str(model.megatron_dir / HF_SUBDIR), route=self.route)
        self.rank_spec = RankSpec(
            str(model.megatron_dir), cfg.actor, cfg.actor_rollout_ref.ref, cfg.algorithm.loss, cfg.rollout.sync,
            self.target, seed=cfg.trainer.seed, threads=rank_threads, timeout_s=self.timeout_s,
            metrics_dir=str(run_dir / "ranks"), resume_step=resume_step)
        self.engine_launch = EngineLaunch(
            str(model.hf_dir), host="127.0.0.1" if cfg.trainer.nnodes == 1 else "0.0.0.0", api_key=api_key,
            log_dir=engine_log_dir(str(run_dir)), threads=cfg.rollout.threads or engine_threads)
        self.workers: list = []
        self.engines: list = []
        self.fleet: Optional[RolloutFleet] = None
        self.coordinator: Optional[PushCoordinator] = None
        self.reward: Optional[RewardSource] = None  # set at start: reward-model workers are Ray actors
        self.local = not cfg.uses_ray  # the rank in this process, the engines its children
        self._started_ray = False
        self._released: set[str] = set()  # colocated: engines whose KV cache is released until the next push
        self._pg = None
        self._broken = False  # a collective call failed: the ranks are killed, not asked to shut down
        self._restarts: dict[int, int] = {}  # engine index -> times restarted
        self.ranks: list[dict] = []  # what each rank reported at set-up (node, TP/PP/DP rank, peak FLOP/s)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "TrainerCluster":
        """Start the ranks and engines; a failure tears down what had started (``with`` calls
        ``stop`` only after a start that returned)."""
        try:
            return self._start()
        except BaseException:
            self._broken = True  # a rank may still be inside the call that failed (or was interrupted)
            try:
                self.stop()
            except Exception as exc:  # the start's own error is the one to report
                log.warning("tearing down after a failed start: %s", exc)
            raise

    def _start(self) -> "TrainerCluster":
        p = self.placement
        at = self._start_local() if self.local else self._start_ray()
        urls = self._ask(self.engines, "url", what="start the rollout engines")
        master = self._ask(self.workers[:1], "rendezvous", what="rendezvous")[0]
        self.ranks = self._ask(self.workers, "setup", *master, what="set up the trainer ranks")
        log.info("trainer ranks: %s", self.ranks)
        if p.engines_in_ranks:
            urls = [r["engine_url"] for r in self.ranks if "engine_url" in r]
        r = self.cfg.rollout  # SGLang honours one seed per sample only as n seeded copies of a prompt
        seeds = r.engine == EngineKind.SGLANG and r.deterministic
        self.fleet = RolloutFleet([EngineClient(u, api_key=self.target.api_key, per_sample_seeds=seeds) for u in urls])
        self.coordinator = PushCoordinator(self.arch, self.fleet, make_transport(self.cfg.rollout.sync, self.target))
        placements = None  # CPU runs: one CPU per reward worker, anywhere
        if p.gpus_per_node and self.cfg.reward_model.type == "hf":  # pragma: no cover - GPU tier, unverified
            workers = self.cfg.reward_model.num_workers
            placements = [(at(bundle, res), gpu_ids)
                          for bundle, res, gpu_ids in (p.reward_resources(k, workers) for k in range(workers))]
        self.reward = build_reward_pool(self.cfg.reward_model, self.timeout_s, placements)
        return self

    def _engine_devices(self, i: int):
        """The simulated devices engine ``i``'s ranks hold (CPU tensor pushes), else None."""
        simulated = self.route is not None and not self.placement.gpus_per_node
        return self.route.engine_devices(i) if simulated else None

    def _start_local(self):
        """The one rank as an object here; each engine a child process of this one.  The rank
        computes with this process's allocator settings: ``platform.CPU_MALLOC_TUNABLES`` only if
        the environment set them (on the vs_trl workload they changed no step time here)."""
        p = self.placement
        if p.trainer_world != 1 or p.gpus_per_node:
            raise ClusterError(f"without Ray one CPU rank runs in the driver; the placement has {p.trainer_world} "
                               f"rank(s) on {p.gpus_per_node} GPU(s) per node")
        self.workers = [TrainerWorker(0, 1, self.rank_spec)]
        if not p.engines_in_ranks:
            for i in range(p.engines):  # one after another; each joins the list once up, so stop() reaches it
                self.engines.append(EngineHost(i, self.cfg.rollout, self.engine_launch, None, self._engine_devices(i)))
        return None  # no Ray placement: CPU only, and no reward-model workers (RunConfig checks)

    def _start_ray(self):
        """Ray actors for the ranks and engines, placed in one placement group; returns how to
        place another actor on a bundle (reward-model workers)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p, t = self.placement, self.cfg.trainer
        if not ray.is_initialized():
            if t.ray_address:
                ray.init(address=t.ray_address, log_to_driver=True)
            else:
                cpus = max(len(p.bundles()) + 1, os.cpu_count() or 1)
                # "local": never join a `ray start` cluster that happens to run on this machine.
                # No pre-started workers: every worker of ours is an actor with its own environment,
                # so Ray's one-per-CPU idle workers only cost start-up CPU and ~56 MB each.
                ray.init(address="local", num_cpus=cpus, num_gpus=p.gpus_per_node or None,
                         include_dashboard=False, log_to_driver=True,
                         _system_config={"prestart_worker_first_driver": False})
            self._started_ray = True
        bundles = p.bundles()
        self._pg = placement_group(bundles, strategy=p.strategy)
        if not self._pg.wait(timeout_seconds=min(self.timeout_s, 600)):
            raise ClusterError(f"Ray could not place {len(bundles)} bundles {bundles[:2]}... ({p.strategy}): not "
                               f"enough resources or nodes ({len(ray.nodes())} node(s), {ray.cluster_resources()})")

        # CPU ranks and engines start with the allocator settings their tensor work needs.
        env = {} if p.gpus_per_node else cpu_worker_env(os.environ)

        def at(bundle: int, resources: dict) -> dict:
            return dict(scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle),
                        **({"runtime_env": {"env_vars": env}} if env else {}), **resources)

        worker_cls = ray.remote(TrainerWorker)
        self.workers = [worker_cls.options(**at(*p.rank_resources(r))).remote(r, p.trainer_world, self.rank_spec)
                        for r in range(p.trainer_world)]
        if not p.engines_in_ranks:  # else each engine starts inside its rank (transport "shared")
            engine_cls = ray.remote(EngineHost)
            gpus = self._colocated_engine_gpus() if p.gpus_per_node and p.colocated else [None] * p.engines
            self.engines = [engine_cls.options(**at(*p.engine_resources(i))).remote(
                                i, self.cfg.rollout, self.engine_launch, gpus[i], self._engine_devices(i))
                            for i in range(p.engines)]
        return at

    def _colocated_engine_gpus(self) -> list:  # pragma: no cover - GPU tier, unverified
        """Each colocated engine's GPUs: those Ray gave the trainer ranks that feed it (Ray pins
        none for a zero-GPU engine actor, and which GPU a rank's bundle got is Ray's choice)."""
        p = self.placement  # the disk transport has no feed route, but its engines share GPUs the same way
        route = self.route or FeedRoute.for_placement(trainer_world=p.trainer_world, engines=p.engines,
                                                      engine_tp=p.engine_tp, gpus_per_node=p.gpus_per_node)
        reported = self._ask(self.workers, "gpus", what="ask the trainer ranks for their GPUs")
        try:
            return route.engine_gpus(reported)
        except ValueError as exc:
            raise ClusterError(f"colocated engines: {exc}") from None

    def stop(self) -> None:
        """Tear everything down, within a bounded time whatever state the ranks are in.

        After a clean run the ranks leave their process groups and the engines stop, each
        wait bounded.  After a failed collective call (a rank died, or one hung past the
        timeout) the surviving ranks may sit in a collective that never returns, and a polite
        shutdown would queue behind it: they are killed at once (with the helpers they forked,
        see :mod:`megatron_spin.lifetime`).  Engines stop together, not one timeout each.
        """
        if self.local:
            self._stop_local()
            return
        import ray

        if self.workers and not self._broken:
            try:
                self._get([w.shutdown.remote() for w in self.workers], "shut the trainer ranks down",
                          timeout=min(self.timeout_s, 120))
            except ClusterError as exc:
                log.warning("%s", exc)
        if self.engines:
            stops = [e.stop.remote() for e in self.engines]
            ready, pending = ray.wait(stops, num_returns=len(stops), timeout=60)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as exc:  # an engine that already died
                    log.warning("engine stop: %s", exc)
            if pending:
                log.warning("%d engine(s) did not stop within 60 s: killed", len(pending))
        self._close_clients()
        for a in self.workers + self.engines:
            ray.kill(a)
        self.workers, self.engines = [], []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _stop_local(self) -> None:
        """The rank leaves its process group (and stops its in-rank engine) even after a failed
        call: it is this process, and nothing else would; the engines' processes stop."""
        for name, stop in [("trainer rank", w.shutdown) for w in self.workers] + \
                          [(f"engine {i}", e.stop) for i, e in enumerate(self.engines)]:
            try:
                stop()
            except Exception as exc:
                log.warning("%s shutdown: %s", name, exc)
        self._close_clients()
        self.workers, self.engines = [], []

    def _close_clients(self) -> None:
        """The fleet's connections and the reward source, once (stop may run twice)."""
        fleet, reward, self.fleet, self.reward = self.fleet, self.reward, None, None
        if fleet is not None:
            fleet.close()
        if reward is not None:
            reward.close()

    def __enter__(self) -> "TrainerCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- collective calls -------------------------------------------------------------------
    def _ask(self, handles: Sequence, method: str, *args, what: str, timeout: Optional[float] = None) -> list:
        """``method(*args)`` on every one of ``handles`` (ranks or engine hosts), their answers in order.
        Without Ray the call runs here and ``timeout`` does not apply: one rank has no collective
        that could hang, and an engine's HTTP calls carry their own timeouts."""
        if not self.local:
            return self._get([getattr(h, method).remote(*args) for h in handles], what, timeout)
        try:
            return [getattr(h, method)(*args) for h in handles]
        except Exception as exc:  # as a Ray worker's exception reaches the driver: named, with its traceback
            self._broken = True
            raise ClusterError(f"{what} failed: {''.join(traceback.format_exception(exc)).rstrip()}") from exc

    def _get(self, refs, what: str, timeout: Optional[float] = None) -> Any:
        import ray

        try:
            return ray.get(refs, timeout=timeout or self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._broken = True
            raise ClusterError(f"{what}: no answer within {timeout or self.timeout_s:.0f} s "
                               "(a collective may be hung; see the worker logs)") from None
        except ray.exceptions.RayActorError as exc:  # the process is gone: Ray's text is a paragraph of ids
            self._broken = True  # the others may be stuck in a collective with it
            raise ClusterError(f"{what} failed: a trainer rank or engine process died "
                               f"({str(exc).strip().splitlines()[0]})") from None
        except ray.exceptions.RayError as exc:  # an exception in a rank: its remote traceback follows
            self._broken = True
            raise ClusterError(f"{what} failed: {exc}") from None

    def _call(self, method: str, *args, what: str) -> list:
        return self._ask(self.workers, method, *args, what=what)

    def train(self, pairs: Sequence, iteration: int, step: int) -> TrainResult:
        """One update on every rank.  Colocated engines give all their memory back while it runs,
        then take back room for the weights (the push fills it; the KV cache returns after it)."""
        # Engines inside the ranks hold nothing of their own worth releasing: their weights are the actor's.
        colocated = self.cfg.rollout.colocated and not self.placement.engines_in_ranks
        if colocated:
            # A dropped engine that answers again is back first: it must give its memory back too.
            self.fleet.probe()
            # Weights, KV cache, CUDA graphs.  An engine that fails to is dropped (a dead one holds
            # no memory; the next push restarts it), not the run.
            self.fleet.each_or_drop(lambda c: c.release_memory(), self.fleet.reachable)
            self._released = {s.client.url for s in self.fleet.reachable}
        started = time.monotonic()
        results: list[RankTrainResult] = self._call("train", list(pairs), iteration, step, what="actor update")
        seconds = time.monotonic() - started
        if colocated:
            # The trainer's cached blocks first, or the engines cannot map their memory back.
            self._call("release_device_cache", what="free the trainer's cached device memory")
            self.fleet.each(lambda c: c.resume_memory(["weights"]),
                            [s for s in self.fleet.reachable if s.client.url in self._released])
        mine = next(r for r in results if r.stats is not None)
        real = sum(2 * len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in pairs)
        p = self.placement
        perf = train_perf(self.arch, tokens=real, padded_tokens=mine.padded_tokens, seq_len=mine.seq_len,
                          seconds=seconds, devices=p.trainer_world,
                          peak_flops=self.ranks[0].get("peak_flops") if self.ranks else None,
                          recompute=self.cfg.actor.recompute, reference=self.cfg.algorithm.loss.needs_reference)
        perf["perf/rollout_devices"] = float(p.engines * (p.engine_tp if p.gpus_per_node else 1))
        return TrainResult(mine.stats, mine.ref_seconds, mine.train_seconds, perf)

    def restart_dead_engines(self) -> list[str]:
        """Start again every engine whose process has exited, on its own address (at most
        ``rollout.max_engine_restarts`` times each over the run).  A restarted engine holds the
        run's initial weights: the fleet re-admits it at the next push, which brings it to the
        actor's, and it serves from then on.  Returns the restarted engines' URLs."""
        limit = self.cfg.rollout.max_engine_restarts
        if not self.engines or not limit:
            return []
        running = self._ask(self.engines, "running", what="ask the engines whether they run",
                            timeout=min(self.timeout_s, 60))
        restarted = []
        for i, (host, alive) in enumerate(zip(self.engines, running)):
            if alive:
                continue
            done = self._restarts.get(i, 0)
            if done >= limit:
                continue  # stays dropped; the fleet goes on with the others (or fails with no engine left)
            self._restarts[i] = done + 1
            log.warning("engine %d has exited: restarting it (%d/%d)", i, done + 1, limit)
            url = self._ask([host], "restart", what=f"restart engine {i}", timeout=min(self.timeout_s, 600))[0]
            self._released.discard(url)  # a fresh engine holds all its memory
            restarted.append(url)
        return restarted

    def recover_engines(self, version: int) -> list[str]:
        """After the fleet ran out of engines: restart the dead ones and bring them to ``version``
        (a push of the actor's weights, which re-admits them).  Raises if none could be restarted."""
        if self.placement.engines_in_ranks:  # nothing to restart: the engine lives and dies with its rank
            raise ClusterError("the rollout engine inside the trainer rank (transport shared) stopped answering; "
                               "see the rank's log (" + ("the run's output" if self.local else "Ray worker log") + ")")
        restarted = self.restart_dead_engines()
        if not restarted:
            raise ClusterError("no rollout engine left, and none could be restarted (exited engines are "
                               f"restarted at most actor_rollout_ref.rollout.max_engine_restarts="
                               f"{self.cfg.rollout.max_engine_restarts} times)")
        self.push(version)
        return restarted

    def push(self, version: int) -> SyncReport:
        """The actor's weights to every reachable engine, as ``version``; colocated engines get
        their KV cache back once the weights are in (SGLang's order: weights, push, cache).
        Engines whose process exited are started again first, so the push re-admits them."""
        try:
            self.restart_dead_engines()
            plan = self.coordinator.prepare(version)
            results = self._call("send_weights", plan, what=f"weight push {version}")
            return self.coordinator.finish(plan, results)
        finally:
            # Also after a failed push (the engines serve again once one completes); an engine
            # that cannot take its cache back is dropped, not the run.
            released, self._released = self._released, set()
            self.fleet.each_or_drop(lambda c: c.resume_memory(["kv_cache", "cuda_graph"]),
                                    [s for s in self.fleet.reachable if s.client.url in released])

    def verify_push(self, sequences: Sequence[Sequence[int]]) -> ProbeGap:
        """Every serving engine's token log-probs of ``sequences`` against the actor's."""
        results = self._call("probe_logprobs", [list(s) for s in sequences], what="log-prob probe")
        ours = next(r for r in results if r is not None)
        return probe_gap(ours, [s.client for s in self.fleet.serving], sequences)

    def announce_version(self, version: int) -> None:
        """The engines already hold these weights (a fresh run starts from the same checkpoint)."""
        self.fleet.each(lambda c: c.update_weight_version(str(version)))

    def refresh_reference(self) -> None:
        self._call("refresh_reference", what="reference refresh")

    def save_checkpoint(self, staged: Path, step: int) -> None:
        self._call("save_checkpoint", str(staged), what=f"checkpoint {step}")
        # The actor's weights carry the model's identity, so that they export and serve on their own.
        copy_identity(self.rank_spec.megatron_dir, Path(staged) / ACTOR_SUBDIR)

    def load_checkpoint(self, path: Path) -> None:
        self._call("load_checkpoint", str(path), what=f"resume from {path}")
