"""The momentum teacher: an exponential moving average of the student, updated after every training step."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

from spoco_bundle.networks import unwrap

__all__ = ["MomentumTeacherHandler"]


class MomentumTeacherHandler:
    """
    Exponential-moving-average update of the teacher after every iteration: ``g <- m * g + (1 - m) * f``.

    Only parameters are averaged (as in SPOCO); buffers, if any, are copied from the student. On a fresh start
    (iteration 0) the teacher is first set equal to the student, so its random initialisation never matters; when
    resuming, the teacher loaded from the checkpoint is kept. A student wrapped in ``DistributedDataParallel`` is
    unwrapped; as DDP keeps the student identical on all ranks (rank 0's weights are broadcast when it is wrapped,
    the all-reduced gradients are identical), every rank's teacher stays identical too.

    Args:
        teacher: the momentum teacher network ``g`` (its parameters should not require grad).
        student: the trained network ``f``; defaults to the engine's ``network`` at attach time.
        momentum: ``m``, 0.999 in the paper.
    """

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module | None = None, momentum: float = 0.999):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        self.teacher = teacher
        self.student = student
        self.momentum = momentum

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._sync_if_fresh)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _sync_if_fresh(self, engine: Engine) -> None:
        if self.student is None:  # MONAI workflows attach handlers before they set `network`, so look it up here
            self.student = engine.network  # type: ignore[attr-defined]
        self.student = unwrap(self.student)  # same parameter names as the teacher (no "module." prefix)
        if engine.state.iteration == 0:
            self.teacher.load_state_dict(self.student.state_dict())  # type: ignore[union-attr]

    @torch.no_grad()
    def __call__(self, engine: Engine | None = None) -> None:
        student_params = dict(self.student.named_parameters())  # type: ignore[union-attr]
        teacher_params = [p for _, p in self.teacher.named_parameters()]
        source = [student_params[n] for n, _ in self.teacher.named_parameters()]
        # one fused op over all tensors: g = m g + (1 - m) f
        torch._foreach_lerp_(teacher_params, [s.detach() for s in source], 1.0 - self.momentum)
        for (_, tb), (_, sb) in zip(self.teacher.named_buffers(), self.student.named_buffers()):  # type: ignore
            tb.copy_(sb)
