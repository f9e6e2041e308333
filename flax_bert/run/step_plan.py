"""Each step's multi-host decisions: whether to stop, save, evaluate, log, fine-tune downstream or push a Hub
revision. They are taken in `StepPlanner.decide` and nowhere else, so the order of the collectives behind them
(a reordering would deadlock a multi-host run) is seen in one place."""
from __future__ import annotations

import dataclasses

from flax_bert.run.config import RunConfig
from flax_bert.training.phases import TrainingPlan


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the loop does after one step; the same on every process."""
    log: bool
    evaluate: bool
    save: bool
    stop: bool
    downstream: bool = False  # fine-tune a copy on the --downstream_eval task
    hub_revision: bool = False  # push an export of this step to its branch of --hub_model_id

    @property
    def reads_metrics(self) -> bool:
        """Whether the step's metrics are fetched (and checked finite) before anything goes on."""
        return self.log or self.evaluate or self.save or self.stop


class StepPlanner:
    """Decides each step's StepPlan from the run's options, its plan of steps and its checkpointer.
    `evaluates`: there are validation rows; `downstream`: a --downstream_eval task is set."""

    def __init__(self, run: RunConfig, plan: TrainingPlan, checkpoints, *, evaluates: bool, downstream: bool):
        self.run, self.plan, self.checkpoints = run, plan, checkpoints
        self.evaluates, self.downstream = evaluates, downstream

    def decide(self, step: int, phase_index: int, guard) -> StepPlan:
        """In one fixed order of collectives on every process: first whether to stop (a signal on any process),
        then whether to save (due by --save_steps, or by --save_minutes on any process). The rest follows from
        the step number. The last step and a requested stop always save; with --keep_best so does every
        evaluation, whose metrics the checkpoint must carry for the best one to be kept."""
        stop = guard.should_stop(step)
        save_due = self.checkpoints.should_save(step)
        run, last = self.run, step == self.plan.total_steps
        # as the old script: --eval_steps evaluates while training, here also at the last step (its checkpoint
        # then carries the metrics --keep_best compares); --do_eval's final evaluation reuses that one
        evaluate = bool(self.evaluates and run.eval_steps and (step % run.eval_steps == 0 or last))
        every = run.downstream_eval_steps
        downstream = self.downstream and (last or bool(every and step % every == 0))
        phase_end = step == self.plan.phase_end(phase_index)  # its metrics are read before the next phase
        # a revision pushed saves its checkpoint too: the command that retries a failed upload exports it
        revision = bool(run.hub_revision_steps and step % run.hub_revision_steps == 0)
        return StepPlan(log=step % run.logging_steps == 0 or last or phase_end, evaluate=evaluate,
                        save=save_due or stop or last or (evaluate and run.keep_best) or revision, stop=stop,
                        downstream=downstream, hub_revision=revision)
