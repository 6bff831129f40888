"""Speculative decoding with the MTP module as the drafter (self-speculation).

Each iteration feeds the main model two tokens per row — the last emitted token `cur` and the MTP
draft `d` — in one forward:

    main([cur, d]) at positions (p, p+1)  ->  predictions y0 (for p+1) and y1 (for p+2)
    greedy:    accept = (y0 == d);  emit y0, and y1 as a bonus when accepted
    sampling:  accept with probability min(1, P(d) / Q(d)) (P main, Q draft distribution);
               on rejection emit a draw from norm(max(P - Q, 0)), else emit d and a draw from P at p+2
               — the standard rejection rule, so the output follows the main model's distribution.

The MTP module then runs over the same two positions (inputs: main hidden states and the tokens one
step further, [y0, y1]) and its prediction at the last *valid* position is the next draft.

Rows accept independently, so rows advance by 1 or 2 positions per iteration: the cache holds
explicit per-row lengths, every iteration writes each row's two tokens after its own last kept
token and then crops every row back to the tokens it kept (`cache.crop(lengths)`), so a rejected
draft's slot is reclaimed and overwritten by the next iteration. Cache slots are positions, and the
generation runs to the context limit. This works for any batch size (transformers' MTP decoding is
batch 1 only). The loop reads the host once per iteration: the stop check, together with the longest
row (which keeps the cache's read span exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.generation.sampling import SamplingParams, exponential_noise, process_logits, sample_from_probs


@dataclass
class SpeculativeStats:
    main_forwards: int          # main-model forward passes, prefill included
    drafts: int                 # draft tokens proposed (rows × iterations, finished rows excluded)
    accepted: int               # of which accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    z = process_logits(logits, params)
    if not params.do_sample:
        return z.argmax(-1)
    return sample_from_probs(torch.softmax(z, -1), generator)


@torch.no_grad()
def speculative_generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         max_new: int, sampling: SamplingParams, eos: list[int], pad: int, cache,  # noqa: ANN001
                         generator: torch.Generator | None = None, streamer=None,  # noqa: ANN001
                         ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Returns (sequences [B, T + n] with n <= max_new, stats). `cache` needs room for T + max_new tokens;
    afterwards it holds, per row, the tokens kept but the last (T + n_row - 1), as after plain generation."""
    if sampling.uses_repetition_penalty:
        raise ValueError("repetition_penalty is not supported with use_mtp=True; drop one of them")
    if getattr(model, "mtp", None) is None:
        raise ValueError("use_mtp=True needs the model's MTP module: load a checkpoint that has "
                         "model.layers.{num_hidden_layers}.* (and do not pass load_mtp=False)")
    device = input_ids.device
    b, t = input_ids.shape
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    out = torch.full((b, t + max_new + 1), pad, dtype=torch.long, device=device)
    out[:, :t] = input_ids
    count = torch.zeros(b, dtype=torch.long, device=device)     # tokens emitted per row
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)

    def emit(tokens: torch.Tensor, valid: torch.Tensor) -> None:
        nonlocal finished
        valid = valid & ~finished & (count < max_new)
        out[rows, t + count.clamp(max=max_new)] = torch.where(valid, tokens, out[rows, t + count.clamp(max=max_new)])
        if streamer is not None and b == 1 and bool(valid[0]):
            streamer.put(tokens.cpu())
        count.add_(valid.long())
        if eos_t is not None:
            finished = finished | (valid & torch.isin(tokens, eos_t))
        finished = finished | (count >= max_new)

    if streamer is not None:
        streamer.put(input_ids.cpu())
    # Prefill: the main model over the prompt, then the MTP module over the same positions.
    res = model(input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1, check_inputs=False)
    cur = _pick(res.logits[:, -1], sampling, generator)
    emit(cur, torch.ones(b, dtype=torch.bool, device=device))
    nxt = torch.cat([input_ids[:, 1:], cur[:, None]], dim=1)
    mtp_logits, _ = model.mtp_forward(res.last_hidden_state, nxt, positions, cache, attention_mask)
    q_logits = mtp_logits[:, -1]
    cap = t + max_new                      # slots any row can need: the prompt and the new tokens
    mask = torch.cat([attention_mask.long(), attention_mask.new_ones(b, max_new).long()], dim=1)   # [B, cap]
    # Without padding the steps pass no mask (causal by position): then, as in plain decoding, the CPU's MLA
    # decode kernel takes the attention (per position: MultiHeadLatentAttention._kernel_slots), and the
    # verification's logits equal those of one-token steps bit for bit.
    padded = not bool(attention_mask.all())
    pads = t - attention_mask.long().sum(1)            # left padding per row: position = slot - pads
    two = torch.arange(2, device=device)
    main_forwards, longest = 1, t
    drafts = torch.zeros((), dtype=torch.long, device=device)      # device counters: no per-step host reads
    accepted = torch.zeros((), dtype=torch.long, device=device)

    done = bool(finished.all())
    while not done:
        q = torch.softmax(process_logits(q_logits, sampling), -1) if sampling.do_sample else None
        draft = _pick(q_logits, sampling, generator)
        ids = torch.stack([cur, draft], dim=1)                               # [B, 2]
        # Each row writes [cur, draft] after its kept tokens; a finished row (whose output is final) is
        # held inside the cache so that the rows still running can reach the context limit.
        kept = t + count - 1                                                 # [B] tokens in the cache
        write = torch.where(finished, kept.clamp(max=cap - 2), kept)
        cache.crop(write, max_length=min(longest, cap - 2))
        step_pos = (write - pads)[:, None] + two                             # [B, 2] RoPE positions
        span = min(longest, cap - 2) + 2
        step_mask = mask[:, :span] if padded else None
        res = model(ids, attention_mask=step_mask, position_ids=step_pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=2, check_inputs=False)
        main_forwards += 1
        z = process_logits(res.logits[:, 0], sampling)
        if sampling.do_sample:
            p = torch.softmax(z, -1)
            ratio = p.gather(1, draft[:, None]).squeeze(1) / q.gather(1, draft[:, None]).squeeze(1).clamp_min(1e-30)
            u = exponential_noise(ratio[:, None], generator).squeeze(1).neg().exp()   # U(0,1) from Exp(1)
            accept = u <= ratio
            residual = (p - q).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
            y0 = torch.where(accept, draft, sample_from_probs(residual / residual.sum(-1, keepdim=True), generator))
        else:
            y0 = z.argmax(-1)
            accept = y0 == draft
        y1 = _pick(res.logits[:, 1], sampling, generator)
        live = ~finished
        drafts += live.sum()
        accepted += (accept & live).sum()
        emit(y0, torch.ones_like(accept))
        emit(y1, accept)
        mtp_logits, _ = model.mtp_forward(res.last_hidden_state, torch.stack([y0, y1], dim=1), step_pos, cache,
                                          step_mask)
        q_logits = torch.where(accept[:, None], mtp_logits[:, 1], mtp_logits[:, 0])
        cur = torch.where(accept, y1, y0)
        kept = t + count - 1
        done, longest = (int(v) for v in torch.stack([finished.all().long(), kept.max()]).tolist())   # 1 read
        cache.crop(kept, max_length=longest)     # reclaim the rejected drafts' slots
    if streamer is not None:
        streamer.end()
    n = int(count.max())
    return out[:, : t + n], SpeculativeStats(main_forwards, int(drafts), int(accepted))
