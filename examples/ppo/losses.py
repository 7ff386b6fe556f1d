"""The maths of PPO for the RL examples, on padded ``[B, T]`` token tensors with a ``mask``
(1 on completion tokens, 0 on padding past each completion's end): per-token rewards, GAE,
advantage whitening (optionally over all data-parallel ranks), the clipped policy and value
losses. Plain functions of tensors; nothing here knows the model or the engine."""

from __future__ import annotations

import torch
import torch.distributed as dist


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """[B, T] rewards: each sequence's score ([B]) on its last token, minus ``kl_coef * kl``
    on every token when ``kl`` ([B, T], e.g. old - reference logprobs) is given."""
    rewards = torch.zeros_like(mask)
    if kl is not None:
        rewards = rewards - kl_coef * kl * mask
    last = mask.sum(1).long() - 1  # [B] index of each completion's last token
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, right to left: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, with V and A zero past a completion's end (its last
    token is terminal, EOS or not). Returns (advantages, returns = A + V), both [B, T] and
    zero on padding."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last_adv = torch.zeros_like(rewards[:, 0])  # [B]
    num_tokens = rewards.shape[1]
    for t in reversed(range(num_tokens)):
        next_value = values[:, t + 1] if t + 1 < num_tokens else torch.zeros_like(last_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_adv = (delta + gamma * lam * last_adv) * mask[:, t]
        advantages[:, t] = last_adv
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, distributed: bool = False) -> torch.Tensor:
    """``x`` shifted and scaled to zero mean and unit variance over the masked tokens (of all
    ranks of the default group when ``distributed``: every rank must call it); zero on
    padding."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if distributed:
        dist.all_reduce(stats)
    total, total_sq, count = stats.tolist()
    count = max(count, 1.0)
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / max(count - 1.0, 1.0)
    return (x - mean) / (var**0.5 + 1e-8) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, token mean: max(-A r, -A clip(r, 1 - clip, 1 + clip)) with
    r = exp(logprobs - old_logprobs). Also clip_frac (tokens whose ratio left the band) and
    approx_kl (k3 of old from new: mean of r - 1 - log r)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():
        stats = {
            "clip_frac": float(masked_mean(((ratio - 1).abs() > clip).float(), mask)),
            "approx_kl": float(masked_mean(ratio - 1 - log_ratio, mask)),
        }
    return masked_mean(loss, mask), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, value_clip: float) -> torch.Tensor:
    """Clipped value loss, token mean: 0.5 max((V - R)^2, (V_clip - R)^2), V_clip the new
    value kept within ``value_clip`` of the one the advantages were computed with."""
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return masked_mean(loss, mask)
