"""What the training loop does besides the step: small actions, each called after every step.

In the manner of clu's periodic actions (without its flax dependency): an action
looks at the step's :class:`Report` and acts when it is due. They run in list order
and share the report, so the order is the data flow: gather the log step's scalars,
add the online k-NN and per-class figures, write and print them, judge collapse,
then checkpoint (and stop on preemption or collapse), and trace with the profiler.

Multi-host rule: every decision that leads into a collective (save, stop, eval) is
made from values identical on all processes: the step, all-reduced metrics, Orbax's
save policies and JAX's preemption sync point.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from semppl_jax import preemption, workdir_lock
from semppl_jax.preemption import PREEMPTED_EXIT_CODE, Preempted


class CollapseError(RuntimeError):
    """``training.stop_on_collapse``: a collapse signal fired after warm-up."""


@dataclasses.dataclass
class Report:
    """One step, as the actions see it."""

    step: int
    state: Any
    metrics: dict  # device arrays, all-reduced
    scalars: dict | None = None  # host scalars, on log steps only
    collapsed: list[str] = dataclasses.field(default_factory=list)


Action = Callable[[Report], None]


def collapse_signals(scalars: dict, projection_size: int, t: Any) -> list[str]:
    """Names of the collapse signals that fire: the embedding spread far below the
    healthy ~1/sqrt(D), or the InfoNCE loss at chance (L_augm / log(candidates) ~ 1)."""
    fired = []
    floor = t.collapse_std_fraction / math.sqrt(projection_size)
    if scalars["embedding_std"] < floor:
        fired.append(f"embedding_std {scalars['embedding_std']:.4f} < {floor:.4f} "
                     f"({t.collapse_std_fraction} / sqrt({projection_size}))")
    if scalars["l_augm_ratio"] > t.collapse_loss_ratio:
        fired.append(f"l_augm_ratio {scalars['l_augm_ratio']:.4f} > {t.collapse_loss_ratio} "
                     f"(L_augm at chance)")
    return fired


@dataclasses.dataclass
class Cadence:
    """Which steps log, and which also run the online k-NN (they log too)."""

    log_every: int
    end_step: int
    total_steps: int
    eval_every: int | None = None

    def eval_due(self, step: int) -> bool:
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.total_steps)

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.end_step or self.eval_due(step)


# Monitors scored against the hidden labels of unlabelled images, by the count they need.
HIDDEN_LABEL_METRICS = {"hidden_labels": ("pseudo_label_accuracy", "probe_accuracy"),
                        "sure_hidden_labels": ("sure_pseudo_label_accuracy",)}


SUMMED_ELSEWHERE = ("loo_per_class", "hidden_labels_right")  # per-step sums other actions keep


@dataclasses.dataclass
class GatherScalars:
    """On log steps: the step's metrics to the host, refusing a non-finite state."""

    cadence: Cadence
    last: dict = dataclasses.field(default_factory=dict)

    def __call__(self, r: Report) -> None:
        if not self.cadence.log_due(r.step):
            return
        scalars = {k: v for k, v in r.metrics.items() if k not in SUMMED_ELSEWHERE}
        r.scalars = {k: float(v) for k, v in jax.device_get(scalars).items()}
        if not r.scalars.pop("finite"):
            raise FloatingPointError(f"non-finite state or loss at step {r.step} (not saved): {r.scalars}")
        for count, needing in HIDDEN_LABEL_METRICS.items():  # no hidden label to score: nothing to log
            if not r.scalars.pop(count):
                for key in needing:
                    r.scalars.pop(key)
        self.last = r.scalars


@dataclasses.dataclass
class OnlineKnnEval:
    """k-NN top-1/top-5 of the current online encoder on the test split, when due."""

    cadence: Cadence
    knn: Callable[[Any, Any], dict]

    def __call__(self, r: Report) -> None:
        if self.cadence.eval_due(r.step):
            r.scalars.update(self.knn(r.state.online_params, r.state.online_state))


@dataclasses.dataclass
class PerClassLeaveOwnOut:
    """Sums the step's per-class leave-own-out k-NN hits and votes on device (no host
    sync), and on log steps writes them (``per_class.jsonl``) and the worst class."""

    writer: Any | None  # a MetricWriter on process 0
    sums: Any = None

    def __call__(self, r: Report) -> None:
        step_sums = r.metrics["loo_per_class"]
        self.sums = step_sums if self.sums is None else self.sums + step_sums
        if r.scalars is None:
            return
        hits, votes = jax.device_get(self.sums)
        self.sums = None
        voted = votes > 0
        if voted.any():  # the class whose labelled images the queue votes worst, since the last log
            r.scalars["loo_knn_accuracy_worst_class"] = float(np.min(hits[voted] / votes[voted]))
        if self.writer:
            self.writer.write_arrays(r.step, loo_knn_correct=hits, loo_knn_voted=votes)


@dataclasses.dataclass
class CalibrationFold:
    """The pseudo-labels' accuracy on the calibration fold (labelled images kept out of the
    loss and voted like the unlabelled ones: ``dataset.calibration_per_class``) over about
    the last epoch, with a Wilson interval over the fold's images voted, logged as the
    estimate in place of the queue's (which labels that shaped the embedding bias).
    Summed on device every step (no host sync); read on log steps. The hidden-label monitors
    of the log step's batch score only its few fold images (0-3 of 128 at 1% of the images):
    noise under a name that reads as the pseudo-labels' accuracy, so they are not logged."""

    fold_size: int
    steps_per_epoch: int
    z: float = 1.96
    sums: Any = None  # [right, voted] since the last log step, on device
    steps: int = 0
    window: list = dataclasses.field(default_factory=list)  # (steps, right, voted) a log interval

    def __call__(self, r: Report) -> None:
        step_sums = jax.numpy.stack([r.metrics["hidden_labels_right"], r.metrics["hidden_labels"]])
        self.sums = step_sums if self.sums is None else self.sums + step_sums
        self.steps += 1
        if r.scalars is None:
            return
        right, voted = (float(x) for x in jax.device_get(self.sums))
        self.window.append((self.steps, right, voted))
        self.sums, self.steps = None, 0
        for key in (k for needing in HIDDEN_LABEL_METRICS.values() for k in needing):
            r.scalars.pop(key, None)
        while len(self.window) > 1 and sum(w[0] for w in self.window[1:]) >= self.steps_per_epoch:
            self.window.pop(0)  # the rest still spans an epoch
        r.scalars.update(calibration_estimate(sum(w[1] for w in self.window), sum(w[2] for w in self.window),
                                              self.fold_size, self.z))


def calibration_estimate(right: float, voted: float, fold_size: int, z: float = 1.96) -> dict[str, float]:
    """The estimate from ``right`` of ``voted`` fold images (each counted once: at most
    ``fold_size`` distinct), with its Wilson interval at ``z``."""
    from semppl_jax.vote_gate import wilson

    images = min(voted, fold_size)
    if not voted:
        return dict(calibration_images=0.0)
    p = right / voted
    low, high = (float(x) for x in wilson(p, images, z))
    return dict(calibration_images=images, pseudo_label_accuracy_estimate=p, pseudo_label_accuracy_low=low,
                pseudo_label_accuracy_high=high)


@dataclasses.dataclass
class Throughput:
    """Images a second and seconds a step since the last log step."""

    batch_size: int
    unreadable: int
    start: float = dataclasses.field(default_factory=time.time)
    images: int = 0

    def __call__(self, r: Report) -> None:
        self.images += self.batch_size
        if r.scalars is None:
            return
        now = time.time()
        r.scalars["images_per_sec"] = self.images / max(now - self.start, 1e-9)
        r.scalars["step_time_sec"] = (now - self.start) * self.batch_size / max(self.images, 1)
        r.scalars["skipped_images"] = float(self.unreadable)
        self.start, self.images = now, 0


@dataclasses.dataclass
class WriteAndPrint:
    """``metrics.jsonl`` and TensorBoard (process 0), and a progress line with the ETA."""

    writer: Any | None
    progress: Any  # metric_writers.Progress

    def __call__(self, r: Report) -> None:
        if r.scalars is None:
            return
        if self.writer:
            self.writer.write(r.step, r.scalars)
        s = r.scalars
        hidden = f" pl-acc(hidden labels) {s['pseudo_label_accuracy']:.3f}" if "pseudo_label_accuracy" in s else ""
        logging.info("%s | loss %.4f l_augm/log(B) %.3f emb-std %.4f pl-acc est %.2f [%.2f, %.2f] pl-share %.3f "
                     "sure %.2f%s queue %.2f lr %.4f%s",
                     self.progress.line(r.step, self.progress.rate(r.step)), s["loss"], s["l_augm_ratio"],
                     s["embedding_std"], s["pseudo_label_accuracy_estimate"], s["pseudo_label_accuracy_low"],
                     s["pseudo_label_accuracy_high"], s["pseudo_label_vote_share"],
                     s["sure_vote_fraction"], hidden, s["queue_fill"], s["learning_rate"],
                     f" knn-top1 {s['knn_top1']:.3f}" if "knn_top1" in s else "")


@dataclasses.dataclass
class CollapseGuard:
    """After warm-up, on log steps: the collapse signals that fire; a warning, once."""

    warmup_steps: int
    projection_size: int
    training: Any  # config.training
    warned: bool = False

    def __call__(self, r: Report) -> None:
        if r.scalars is None or r.step <= self.warmup_steps:
            return
        r.collapsed = collapse_signals(r.scalars, self.projection_size, self.training)  # all-reduced: alike
        if r.collapsed and not self.warned:
            logging.warning("collapse at step %d: %s. Lower semppl.lam or the learning rate; "
                            "training.stop_on_collapse=True stops here.", r.step, "; ".join(r.collapsed))
            self.warned = True


@dataclasses.dataclass
class CheckpointAndStop:
    """Saves on a preemption notice, a collapse stop, the last step and the save policy's
    steps (a non-finite state never); then stops on preemption or collapse."""

    ckpt: Any  # checkpointing.Checkpointer
    meta: dict
    end_step: int
    stop_on_collapse: bool

    def __call__(self, r: Report) -> None:
        # One process: its own handler's notice. Several: the step JAX's preemption service agreed on.
        preempted = preemption.local_notice() or self.ckpt.reached_preemption(r.step)
        stop_collapse = bool(r.collapsed) and self.stop_on_collapse
        if preempted or stop_collapse or r.step == self.end_step or self.ckpt.should_save(r.step):
            if not bool(jax.device_get(r.metrics["finite"])):  # replicated: the same on every process
                raise FloatingPointError(f"non-finite state at step {r.step}: not saved; the last "
                                         f"checkpoint ({self.ckpt.latest_step()}) is intact")
            workdir_lock.check_still_held(self.ckpt.directory.parent)  # one writer: never save after a takeover
            self.ckpt.save(r.step, r.state, self.meta)
        if preempted:
            logging.warning("preemption notice: saved step %d, exiting (status %d)", r.step, PREEMPTED_EXIT_CODE)
            raise Preempted(r.step)
        if stop_collapse:
            raise CollapseError(f"stopped at step {r.step} (checkpoint saved): collapse signal "
                                f"{'; '.join(r.collapsed)}")


@dataclasses.dataclass
class Profile:
    """A ``jax.profiler`` trace of steps ``first..first+num-1`` into ``logdir`` (TensorBoard's
    profile plugin reads it). The trace starts after step ``first - 1`` completes."""

    first: int
    num: int
    logdir: str
    active: bool = False

    def begin(self, start_step: int) -> None:
        """Before the run's first step: starts the trace if that step is the first traced."""
        if self.first == start_step + 1:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def __call__(self, r: Report) -> None:
        if not self.active and r.step == self.first - 1:
            jax.profiler.start_trace(self.logdir)
            self.active = True
        elif self.active and r.step >= self.first + self.num - 1:
            jax.block_until_ready(r.metrics)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profiled steps %d-%d into %s", self.first, self.first + self.num - 1, self.logdir)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
