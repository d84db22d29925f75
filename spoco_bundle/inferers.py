"""Two-view inference for SPOCO training: the student sees one view, the frozen teacher the other."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

__all__ = ["TwoViewInferer"]


class TwoViewInferer(Inferer):
    """
    Runs the student on the first view with gradients and the momentum teacher on the second view without.

    Used with ``monai.engines.SupervisedTrainer`` and ``PrepareBatchExtraInput(extra_keys="image_g")``, so the
    trainer calls ``inferer(image, network, image_g)``. The returned pair is what ``SpocoLoss`` expects; keeping the
    trainer's ``network`` the plain student means ``model.pt`` holds only the student's weights.

    Args:
        teacher: the momentum teacher network (same architecture as the student).

    Shapes:
        ``inputs`` and ``second_view``: ``(B, C, *S)``; returns ``(student(inputs), teacher(second_view))``, each
        ``(B, C_out, *S)``. Without a second view (e.g. a plain supervised call) only the student output is returned.
    """

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, second_view: torch.Tensor | None = None, *args: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        student_out = network(inputs)
        if second_view is None:
            return student_out
        if second_view.shape != inputs.shape:
            raise ValueError(f"second view shape {tuple(second_view.shape)} != first view {tuple(inputs.shape)}.")
        with torch.no_grad():
            teacher_out = self.teacher(second_view)
        return student_out, teacher_out.detach()
