"""``lightning-refdpo``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``).

    lightning-refdpo fit --config configs/sd15_refdpo.yaml
    lightning-refdpo fit --config configs/tiny.yaml --trainer.max_steps 4

Model and data are given by ``class_path`` so a subclass from another project plugs in unchanged.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_refdpo.data import PreferenceDataModule
from lightning_refdpo.module import DiffusionDPOModule


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        DiffusionDPOModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
