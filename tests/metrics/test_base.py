import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_refdpo.metrics.base import RewardScore, freeze


class ToyScore(RewardScore):
    """Mean pixel through a frozen linear layer, plus the prompt length."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = freeze(nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5)))

    def score(self, images, prompts):
        lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.float, device=self.device)
        return self.net(images.mean(dim=(2, 3))).squeeze(-1) + lengths


class Holder(nn.Module):
    """A model that holds a scorer, as a LightningModule does."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = nn.Linear(2, 2)
        self.reward = ToyScore()


def test_inputs_and_accumulation(images, pil_images, prompts):
    metric = ToyScore()
    metric.update(images[:1], prompts[:1])
    metric.update(images[1].float() / 255, prompts[1])  # one float image, one prompt string
    metric.update(pil_images[2:], prompts[2:])
    reference = ToyScore()
    reference.net.load_state_dict(metric.net.state_dict())
    reference.update(images, prompts)
    torch.testing.assert_close(metric.scores(), reference.scores())
    torch.testing.assert_close(metric.compute(), metric.scores().mean())
    metric.reset()
    assert metric.scores().numel() == 0


def test_forward_returns_the_batch_mean_and_accumulates(images, prompts):
    metric = ToyScore()
    first = metric(images[:2], prompts[:2])
    metric(images[2:], prompts[2:])
    torch.testing.assert_close(first, metric.scores()[:2].mean())
    assert metric.scores().shape == (4,)


def test_prompt_count_must_match(images, prompts):
    with pytest.raises(ValueError, match="got 4 images but 3 prompts"):
        ToyScore().update(images, prompts[:3])
    with pytest.raises(ValueError, match="ToyScore scores images against prompts"):
        ToyScore().update(images)


def test_reward_model_stays_frozen_and_in_eval_mode():
    holder = Holder().train()
    assert holder.policy.training
    assert not holder.reward.training and not holder.reward.net[1].training
    assert not any(p.requires_grad for p in holder.reward.parameters())


def test_reward_weights_stay_out_of_the_state_dict():
    holder = Holder()
    state = holder.state_dict()
    assert set(state) == {"policy.weight", "policy.bias"}
    fresh = Holder()
    fresh.load_state_dict(state)  # strict: the reward weights are not reported missing
    torch.testing.assert_close(fresh.policy.weight, holder.policy.weight)

    full = {**state, **holder.reward.net.state_dict(prefix="reward.net.")}  # a checkpoint with reward weights
    fresh.load_state_dict(full)
    torch.testing.assert_close(fresh.reward.net[0].weight, holder.reward.net[0].weight)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same reward weights on both ranks
    metric = ToyScore()
    images = torch.full((rank + 1, 3, 4, 4), 0.5)
    metric.update(images, ["x" * (10 * rank + i) for i in range(rank + 1)])
    results[rank] = (metric.scores() - metric.net(torch.full((1, 3), 0.5)).squeeze()).round().tolist()
    results[f"{rank}-local"] = len(metric.per_image)
    dist.destroy_process_group()


def test_scores_are_gathered_across_ranks():
    manager = torch.multiprocessing.Manager()
    results = manager.dict()
    # fork: the workers inherit the imports instead of paying for them again
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(_free_port(), results), nprocs=2, start_method="fork"
    )
    assert results[0] == results[1] == [0.0, 10.0, 11.0]  # rank 0's image, then rank 1's two
    assert results["0-local"] == results["1-local"] == 1  # local state is restored after the gather
