"""``StableDiffusion3DPOModule``: the DPO module on the SD3 / SD3.5 backbone (``backbones/sd3.py``)."""

from __future__ import annotations

from typing import Any

from lightning_refdpo.backbones import StableDiffusion3Backbone
from lightning_refdpo.module import DiffusionDPOModule

FLOW_DPO_BETA = 100.0
"""Default ``beta`` on the velocity margin. The public Diffusion-DPO runs on SD3.5 Medium
(flow_grpo's ``config/dpo.py``, verl-omni's SD3.5 DPO example) use ``beta = 100`` with this margin
(the 0.5 kept, per-element mean velocity error, target ``eps - x_0``). The velocity error is the
noise error divided by ``(1 - sigma)^2``, so margins are larger than SD1.5's for the same model
change and ``beta`` is smaller than SD1.5's 5000."""


class StableDiffusion3DPOModule(DiffusionDPOModule):
    """Diffusion-DPO and the method of arXiv 2505.18736 for SD3 / SD3.5 (rectified flow, MMDiT).

    Args:
        pretrained_model_name_or_path: hub id or folder in the ``StableDiffusion3Pipeline`` layout.
        beta: see :data:`FLOW_DPO_BETA`.
        use_t5: load and use the T5 encoder; ``False`` feeds zeros for its sequence (SD3 without T5).
        max_sequence_length: T5 tokens per prompt (256, the pipeline's default).
        lora_target_modules: default: the attention projections of both streams (``to_q``, ``to_k``,
            ``to_v``, ``to_out.0`` and the context stream's ``add_q_proj``, ``add_k_proj``,
            ``add_v_proj``, ``to_add_out``), as diffusers' ``train_dreambooth_lora_sd3.py``.
        **kwargs: every other argument of :class:`DiffusionDPOModule`.
    """

    backbone_class = StableDiffusion3Backbone

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-3.5-medium",
        beta: float = FLOW_DPO_BETA,
        use_t5: bool = True,
        max_sequence_length: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained_model_name_or_path=pretrained_model_name_or_path, beta=beta, **kwargs)

    def backbone_options(self) -> dict[str, Any]:
        return {"use_t5": self.hparams.use_t5, "max_sequence_length": self.hparams.max_sequence_length}
