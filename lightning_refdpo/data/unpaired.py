"""Unpaired labelled images for Diffusion-KTO (Li et al., arXiv 2404.04465), which learns from a
like or a dislike of each image on its own.

Schema, one image a row: ``caption`` (str), ``image`` (encoded image bytes, an ``Image`` feature,
``{"bytes", "path"}`` or a file path) and ``label`` (1: desirable, 0: undesirable; booleans read as
1 and 0). Any other label, a split of one kind only and a missing column are refused, naming the
column and the rows.

Diffusion-KTO's reference point is estimated from the desirable and the undesirable images of a
batch, so every batch must hold both kinds. Training therefore reads *couples*: item ``i`` of an
epoch couples a desirable image with an undesirable one, each keeping its own caption, and a batch
of ``B`` couples holds ``B`` images of each kind. A couple has the layout of a preference pair
(winner = the desirable image, ``caption_l`` the undesirable image's caption), so the transforms,
draws, collator and SDXL micro-conditioning of pairs apply unchanged; like a pair, a couple shares
one ``t`` and one noise. An epoch has ``max(n_desirable, n_undesirable)`` couples: every image of the
larger kind once, those of the smaller kind cycled, both kinds in an order drawn from
``(seed, epoch)`` so the couples change from epoch to epoch. The public script balances its classes
with a weighted sampler (``--positive_ratio``, 0.5 balanced); couples are the balanced case.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_refdpo.data.draws import PairDraws, hash_seed
from lightning_refdpo.data.preference import (
    PairTransform,
    caption_of,
    check_label_type,
    check_labels,
    decode_image,
)

UNPAIRED_COLUMNS = ("caption", "image", "label")
DESIRABLE, UNDESIRABLE = 1, 0


def check_unpaired_schema(dataset: Any, split: str) -> None:
    """Refuse a split without the columns ``caption``, ``image`` and ``label``, or with a label
    other than 1 and 0, naming the column (and the first bad rows)."""
    columns = dataset.column_names
    missing = [c for c in UNPAIRED_COLUMNS if c not in columns]
    if missing:
        paired = " (these look like preference pairs: set data.unpaired: false)" if "jpg_0" in columns else ""
        raise ValueError(
            f"unpaired split {split!r} lacks column(s) {', '.join(missing)}; found {', '.join(columns)}{paired}. "
            "Unpaired labelled images need caption, image and label (1: desirable, 0: undesirable)."
        )
    check_label_type(dataset, split, "label", "1 or 0")
    check_labels(dataset, split, "label", (DESIRABLE, UNDESIRABLE), "1 (desirable) or 0 (undesirable)")


class LabeledImageCouples(torch.utils.data.Dataset):
    """Couples of one desirable and one undesirable image (see the module docstring) as
    ``{"caption", "caption_l", "pixel_values" (6, H, W: desirable then undesirable), ...}``, with
    the couple's draws when ``draws`` is given (training). An undecodable image makes the couple
    ``None`` (the collator drops and counts it)."""

    def __init__(
        self,
        dataset: Any,
        transform: PairTransform,
        split: str,
        draws: PairDraws | None = None,
        seed: int = 0,
    ) -> None:
        labels = dataset["label"]
        self.kinds = {
            kind: [i for i, x in enumerate(labels) if x == kind] for kind in (DESIRABLE, UNDESIRABLE)
        }
        for kind, name in ((DESIRABLE, "desirable (label 1)"), (UNDESIRABLE, "undesirable (label 0)")):
            if not self.kinds[kind]:
                raise ValueError(
                    f"unpaired split {split!r} has no {name} image: Diffusion-KTO's reference point needs "
                    "desirable and undesirable images in every batch"
                )
        self.dataset = dataset
        self.transform = transform
        self.draws = draws
        self.seed = seed
        self.set_epoch(0)

    def __len__(self) -> int:
        return max(len(rows) for rows in self.kinds.values())

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's order of each kind (and pass the epoch on to the draws)."""
        if self.draws is not None:
            self.draws.epoch = epoch
        self.order = {
            kind: torch.randperm(
                len(rows), generator=torch.Generator().manual_seed(hash_seed(self.seed, epoch, kind))
            )
            for kind, rows in self.kinds.items()
        }

    def rows(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The desirable and the undesirable row of couple ``index``."""
        picked = []
        for kind in (DESIRABLE, UNDESIRABLE):
            rows, order = self.kinds[kind], self.order[kind]
            picked.append(self.dataset[rows[int(order[index % len(rows)])]])
        return picked[0], picked[1]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        desirable, undesirable = self.rows(index)
        try:
            images = decode_image(desirable["image"]), decode_image(undesirable["image"])
        except Exception:  # noqa: BLE001 - any undecodable image is skipped and counted, never fatal
            return None
        generator = self.draws.generator(index) if self.draws is not None else None
        couple = {
            "caption": caption_of(desirable),
            "caption_l": caption_of(undesirable),
            **self.transform(*images, generator),
        }
        return couple if self.draws is None else {**couple, **self.draws(generator)}
