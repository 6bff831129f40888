"""The DeepSeek-V3 decoder: blocks, the base model and the causal-LM head.

    h = embed(ids)
    for each layer l:  h = h + MLA(norm(h));  h = h + FFN_l(norm(h))
        FFN_l = dense SwiGLU for l < first_k_dense_replace, DeepSeekMoE otherwise
    logits = lm_head(norm(h))

`DeepseekV3ForCausalLM.mtp` holds the optional Multi-Token Prediction modules (model/mtp.py); the block is
model/block.py. These are plain nn.Modules: loading, saving and generate() are attached one layer up
(dsv3/modeling.py), so nothing under dsv3/model imports the checkpoint or generation code.

Runtime choices travel as forward arguments, never globals: `mla_path` ("auto" | "naive" |
"absorbed") and `moe_dispatch` ("auto" | "grouped" | "gather"), gathered into one `RunOptions` per call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.cache import CacheStep, DynamicLatentCache, LatentCache
from dsv3.config import DeepseekV3Config
from dsv3.model.attention import build_attention_mask
from dsv3.model.block import DecoderLayer, RunOptions, run_layer
from dsv3.model.moe import MoE, RouterOutput
from dsv3.model.mtp import build_mtp_layers, mtp_forward
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import RotaryEmbedding
from dsv3.parallel.context import SINGLE, ParallelContext

logger = logging.getLogger(__name__)


class ModelOutput:
    """Dataclass outputs readable as attributes, by key, or as a tuple of the fields that are set."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)  # type: ignore[arg-type]

    def __getitem__(self, key: int | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self):  # noqa: ANN204
        return iter(self.to_tuple())


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor
    past_key_values: LatentCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None   # per layer [B, H, S, T] (output_attentions)
    router_outputs: list[RouterOutput] | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: LatentCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_outputs: list[RouterOutput] | None = None
    last_hidden_state: torch.Tensor | None = None   # final-normed, [B, S, D]; the MTP module's input


class ModelCommon:
    """Weight initialisation and the properties shared by the two model classes."""

    config: DeepseekV3Config

    @torch.no_grad()
    def init_weights(self, root: nn.Module | None = None) -> None:
        """Initialise every submodule of `root` (default: the whole model)."""
        std = self.config.initializer_range
        for module in (self if root is None else root).modules():  # type: ignore[attr-defined]
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, std=std)
                nn.init.zeros_(module.gate.e_score_correction_bias)
                nn.init.normal_(module.experts.gate_up_proj, std=std)
                nn.init.normal_(module.experts.down_proj, std=std)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.base_model().gradient_checkpointing = enable  # type: ignore[attr-defined]

    def base_model(self) -> DeepseekV3Model:
        return self if isinstance(self, DeepseekV3Model) else self.model  # type: ignore[attr-defined,return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model().embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.base_model().embed_tokens.weight.device


class DeepseekV3Model(ModelCommon, nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.parallel: ParallelContext = SINGLE   # sharded (model/parallel.py): embed_tokens holds a vocabulary slice
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LatentCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_position: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        mla_path: str = "auto",
        moe_dispatch: str = "auto",
        output_router_outputs: bool = False,
        check_inputs: bool = True,
        output_attentions: bool = False,
        options: RunOptions | None = None,
    ) -> BaseModelOutput | tuple[Any, ...]:
        """past_key_values: a LatentCache; the new tokens go to `cache_position` ([S] shared or [B, S] per row:
        the cache writes where it is told) or, by default, after each row's last cached token (rows may
        hold different numbers of tokens, see dsv3.cache). position_ids default to those slots.
        check_inputs=False skips the host reads that validate ids and detect all-ones masks
        (generate() validates once per prompt and then calls the model with it off).
        output_attentions: return each layer's attention probabilities [B, H, S, T] (computed eagerly).
        options: all of the runtime keywords at once (DeepseekV3ForCausalLM passes them so); when given, the
        individual keywords (mla_path ... output_attentions) are not read."""
        if options is None:
            options = RunOptions(mla_path, moe_dispatch, output_hidden_states, output_attentions,
                                 output_router_outputs, check_inputs)
        check_inputs = options.check_inputs
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None
            if input_ids.dim() != 2 or input_ids.numel() == 0:
                raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: expected a non-empty "
                                 "[batch, seq_len] (at least one sequence of at least one token)")
            if check_inputs and not torch.compiler.is_compiling() and input_ids.numel() > 0:
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= self.config.vocab_size:
                    raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, vocab_size="
                                     f"{self.config.vocab_size}); check the tokenizer matches the model")
            inputs_embeds = self.parallel.embed(self.embed_tokens, input_ids, self.config.vocab_size)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size or \
                inputs_embeds.numel() == 0:
            raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}: expected a non-empty "
                             f"[batch, seq_len, hidden_size={self.config.hidden_size}] (e.g. from "
                             "model.get_input_embeddings()(input_ids))")
        b, s, _ = inputs_embeds.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = past_key_values
        if cache is None and use_cache:
            cache = DynamicLatentCache.for_config(self.config)
        device = inputs_embeds.device
        if cache is not None:
            cache.check(b, inputs_embeds.dtype)
            step = cache.plan(b, s, device, cache_position)
        else:
            step = CacheStep(s, 0, s)
        if step.span > self.config.max_context_length:
            raise ValueError(f"{step.span - s} cached + {s} new tokens exceed the context of "
                             f"{self.config.max_context_length} positions (max_position_embeddings="
                             f"{self.config.max_position_embeddings}, rope_type={self.config.rope_type!r}); shorten "
                             "the prompt or max_new_tokens")
        if position_ids is None:
            position_ids = cache_position if cache_position is not None else step.slots(b, device)
        if position_ids.dim() == 1:
            position_ids = position_ids.view(1, s).expand(b, s)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < step.span:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: expected a 2-D padding "
                                 f"mask [batch={b}, cached+new={step.span}]")
            if check_inputs and not torch.compiler.is_compiling() and bool(attention_mask[:, : step.span].all()):
                attention_mask = None   # no padding: let attention use its causal fast path
        mask = build_attention_mask(attention_mask, step.start, s, device, step.positions, step.span)
        options = replace(options, unpadded=attention_mask is None)
        freqs_cis = self.rotary_emb(position_ids)
        sinks = options.sinks()
        all_hidden: list[torch.Tensor] = []
        h = inputs_embeds
        view = cache.view(step) if cache is not None else None
        checkpointed = self.gradient_checkpointing and self.training
        for layer in self.layers:
            if options.output_hidden_states:
                all_hidden.append(h)
            h = run_layer(layer, h, freqs_cis, mask, view, options, sinks, checkpointed)
        if cache is not None:
            cache.commit(step)
        h = self.norm(h)
        if options.output_hidden_states:
            all_hidden.append(h)
        out = BaseModelOutput(h, cache if use_cache else None,
                              tuple(all_hidden) if options.output_hidden_states else None,
                              tuple(sinks.attentions) if sinks.attentions is not None else None, sinks.routers)
        return out if return_dict else out.to_tuple()


class DeepseekV3ForCausalLM(ModelCommon, nn.Module):
    def __init__(self, config: DeepseekV3Config, mtp: bool | None = None) -> None:
        """mtp: build the MTP modules — None (default) when config.num_nextn_predict_layers > 0.
        from_pretrained(..., load_mtp=False) skips them (about 2% of V3's weights)."""
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        elif not self.lm_head.weight.is_meta:
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        self.mtp = build_mtp_layers(config, mtp)
        if self.mtp is not None and not self.lm_head.weight.is_meta:
            self.init_weights(self.mtp)
        # Sharded (model/parallel.py, dsv3.parallel): lm_head holds a vocabulary slice and the logits are gathered,
        # so forward returns the full vocabulary on every rank. generate() reads it too.
        self.parallel: ParallelContext = SINGLE

    @property
    def num_cache_layers(self) -> int:
        """Latent-cache slots the model writes: the decoder layers, then one per MTP module."""
        return self.config.num_hidden_layers + (len(self.mtp) if self.mtp is not None else 0)

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                    cache: LatentCache | None = None, attention_mask: torch.Tensor | None = None, k: int = 0,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k: (logits predicting t_{i+k+2}, its hidden state); see dsv3.model.mtp.mtp_forward."""
        return mtp_forward(self, hidden, next_ids, position_ids, cache, attention_mask, k, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LatentCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_position: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        mla_path: str = "auto",
        moe_dispatch: str = "auto",
        output_router_outputs: bool = False,
        check_inputs: bool = True,
        output_attentions: bool = False,
    ) -> CausalLMOutput | tuple[Any, ...]:
        if past_key_values is None and self.mtp is not None and (
                use_cache if use_cache is not None else self.config.use_cache and not self.training):
            past_key_values = DynamicLatentCache(self.num_cache_layers)   # with room for the MTP slots
        options = RunOptions(mla_path, moe_dispatch, output_hidden_states, output_attentions, output_router_outputs,
                             check_inputs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, cache_position=cache_position,
                         use_cache=use_cache, options=options)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            kept = h[:, logits_to_keep]
        logits = self.parallel.gather_vocab(self.lm_head(kept), self.config.vocab_size)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        result = CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states, out.attentions,
                                out.router_outputs, h)
        return result if return_dict else result.to_tuple()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy: logits at position t predict labels[t+1]; -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but logits cover {tuple(logits.shape[:2])}; "
                         "labels must align with input_ids (use logits_to_keep=0 when computing a loss)")
    if not torch.compiler.is_compiling() and labels.numel() > 0:
        vocab = logits.shape[-1]
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
        if bad.numel() > 0:
            raise ValueError(f"labels contain {int(bad[0])}: every label must be a token id in [0, vocab_size="
                             f"{vocab}) or {ignore_index} (ignored); mask padding with {ignore_index}")
    shift = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift.reshape(-1).to(logits.device),
                           ignore_index=ignore_index)
