"""Users' models: one frozen Hugging Face causal LM per rank, adapted once, and each user's adapters.

``build_base_model`` loads or builds the frozen base (a hub name or path, or a built-in config);
``build_adapted_base`` adapts it (``AdaptedBase``: it can serve any users' adapters);
``build_user_model`` builds one user's adapters over such a base and wraps them in a ``UserModel``
whose ``forward`` returns the cross-entropy (over chunks of tokens, ``head.py``) and the
load-balancing loss; ``forward_users`` runs several users' batches through the base in one
forward (packed users).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import torch
from torch import nn

from comigs_dist.model.head import lm_cross_entropy, output_head, token_sums
from comigs_dist.model.inject import (AdapterSpec, BaseLayout, InjectionReport, UserAdapters, adapt_base,
                                      mlp_modules)
from comigs_dist.model.roles import ParamTag, Role

if TYPE_CHECKING:
    from comigs_dist.config.users import UserSpec
    from comigs_dist.model.shared_base import SharePlan

BUILTIN_MODELS = ("embedded", "tiny", "gpt2-random", "llama-tiny")


def _zero_dropout(config) -> None:
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
                "dropout", "summary_first_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)


def _construct_base(name: str, vocab_size: int, seq_len: int, meta: bool) -> nn.Module:
    """The base model as configured; ``meta=True`` builds the same modules on the meta device
    (shapes only, no weights: what a rank that maps a shared base needs)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    from comigs_dist.pretrain import _quiet_gpt2_config

    hf_logging.disable_progress_bar()  # one bar per rank per load is noise
    where = torch.device("meta") if meta else contextlib.nullcontext()
    if name in ("tiny", "gpt2-random", "llama-tiny"):
        with torch.random.fork_rng(devices=[]), where:
            torch.manual_seed(1234)
            if name == "tiny":
                return GPT2LMHeadModel(_quiet_gpt2_config(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size,
                                                          n_positions=max(seq_len, 64)))
            if name == "gpt2-random":
                return GPT2LMHeadModel(_quiet_gpt2_config(vocab_size=max(vocab_size, 50257)))
            from transformers import LlamaConfig, LlamaForCausalLM
            return LlamaForCausalLM(LlamaConfig(
                hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max(seq_len, 64),
                bos_token_id=0, eos_token_id=0, pad_token_id=0))
    config = AutoConfig.from_pretrained(name)
    _zero_dropout(config)
    if meta:
        with where:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32)


def _check_base(model: nn.Module, name: str, vocab_size: int, seq_len: int) -> nn.Module:
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if model_vocab < vocab_size:
        raise ValueError(f"the data uses token ids up to {vocab_size - 1} but model {name!r} has a vocabulary of "
                         f"{model_vocab}: prepare the data with the model's tokenizer or choose a matching model.name")
    n_pos = getattr(model.config, "n_positions", getattr(model.config, "max_position_embeddings", seq_len))
    if seq_len > n_pos:
        raise ValueError(f"train.seq_len ({seq_len}) exceeds the context of model {name!r} ({n_pos}); lower "
                         f"train.seq_len")
    model.eval()  # no dropout anywhere; autograd still works
    return model


def _describe_tokenizer(tok: dict) -> str:
    if tok.get("kind") == "synthetic":
        return f"the embedded synthetic corpus's {tok.get('vocab_size')} tokens"
    return (f"{tok.get('kind')} {tok.get('name')} (vocabulary {tok.get('vocab_size')}, "
            f"end-of-text id {tok.get('eot_id')})")


def check_model_matches_data(name: str, meta: dict, data_path: str = "the dataset") -> None:
    """Refuse a dataset tokenized differently from the model, wherever that can be told from the
    model's config and tokenizer files without loading weights (a prepared dataset records its
    tokenizer in meta.json). Built-in random models take the data's vocabulary and pass."""
    data_tok = meta.get("tokenizer") or {}
    data_vocab = int(meta.get("vocab_size", data_tok.get("vocab_size", 0)))
    fix = (f"prepare the data with the model's tokenizer (`python -m comigs_dist.data prepare ... --tokenizer "
           f"<its name or path>`) or choose a model.name trained with {data_tok.get('name', 'that tokenizer')}")
    if name == "embedded":
        if data_tok and data_tok.get("kind") != "synthetic":
            raise ValueError(f"model.name=embedded knows only the synthetic corpus's 256 tokens, but {data_path} holds "
                             f"text tokenized with {_describe_tokenizer(data_tok)}; use a base trained on that "
                             f"tokenizer (model.name=gpt2, or a small one from `python -m comigs_dist.pretrain`), "
                             f"or data.path=embedded")
        return
    if name in BUILTIN_MODELS or not data_tok:
        return
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception:  # not reachable offline: build_base_model reports the loading problem itself
        return
    model_vocab = int(getattr(config, "vocab_size", 0) or 0)
    if model_vocab and data_vocab > model_vocab:
        raise ValueError(f"{data_path} was tokenized with {_describe_tokenizer(data_tok)} but model {name!r} has a "
                         f"vocabulary of {model_vocab}; {fix}")
    from comigs_dist.data.tokenizer import checkpoint_tokenizer
    model_tok = checkpoint_tokenizer(name)
    if data_tok.get("kind") == "synthetic":
        if model_tok and model_tok.get("kind") != "synthetic":
            raise ValueError(f"{data_path} is the embedded synthetic corpus but model {name!r} was trained with "
                             f"{_describe_tokenizer(model_tok)}; use data.path=<a prepared text dataset>")
        return
    if model_tok and model_tok.get("fingerprint") and data_tok.get("fingerprint") \
            and model_tok["fingerprint"] != data_tok["fingerprint"]:
        raise ValueError(f"{data_path} was tokenized with {_describe_tokenizer(data_tok)} but model {name!r} uses "
                         f"{_describe_tokenizer(model_tok)}: the ids mean different text; {fix}")
    eos = getattr(config, "eos_token_id", None)
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    if data_tok.get("eot_id") is not None and eos_ids and data_tok["eot_id"] not in eos_ids:
        raise ValueError(f"{data_path} was tokenized with {_describe_tokenizer(data_tok)} but model {name!r} ends "
                         f"text with id {sorted(eos_ids)}: different tokenizers; {fix}")
    if model_vocab > 1.1 * data_vocab + 128:  # padding rounds a vocabulary up a little, never by a tenth
        raise ValueError(f"{data_path} was tokenized with {_describe_tokenizer(data_tok)} but model {name!r} has a "
                         f"vocabulary of {model_vocab}, far larger: probably another tokenizer; {fix}")


def build_base_model(name: str, vocab_size: int, seq_len: int, share: "SharePlan | None" = None) -> nn.Module:
    """The frozen base. Built-in random configs are initialised from a fixed seed so that every
    user (rank) holds the same base. With a ``share`` plan the weights are mapped read-only from
    one file per host (``shared_base.py``) instead of held privately; the values are the same."""
    if name == "embedded":
        from comigs_dist.synthetic import ensure_embedded_base
        name = str(ensure_embedded_base())
    if share is None:
        return _check_base(_construct_base(name, vocab_size, seq_len, meta=False), name, vocab_size, seq_len)
    from comigs_dist.model.shared_base import load_shared
    identity = {"name": name, "vocab_size": vocab_size, "torch": torch.__version__}
    return load_shared(identity,
                       build_private=lambda: _check_base(_construct_base(name, vocab_size, seq_len, meta=False),
                                                         name, vocab_size, seq_len),
                       build_skeleton=lambda: _check_base(_construct_base(name, vocab_size, seq_len, meta=True),
                                                          name, vocab_size, seq_len),
                       plan=share)


@dataclass
class StepLoss:
    ce: torch.Tensor
    lb: torch.Tensor


# tokens per chunk of the output projection and loss (train.loss_chunk): GPT-2's fp32 logits of
# 128 tokens take 25.7 MB, under glibc's 32 MiB limit above which every allocation is fresh pages
DEFAULT_LOSS_CHUNK = 128


class AdaptedBase(nn.Module):
    """A frozen base LM whose attention projections and MLPs apply the adapters of the users a
    forward serves (``serving``). One per rank, whatever the number of users it hosts."""

    def __init__(self, lm: nn.Module, family: str = "auto"):
        super().__init__()
        self.lm = lm
        self.layout, self.rows = adapt_base(lm, family)

    @property
    def family(self) -> str:
        return self.layout.family

    def serving(self, users):
        """Within the block, forwards serve ``users`` = [(UserAdapters, batch rows)] in batch order."""
        return self.rows.serve(users)

    def logits_for(self, users: Sequence[UserAdapters], xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The logits of every user's batch, one forward; rows in the order of ``users``."""
        x = xs[0] if len(xs) == 1 else torch.cat(list(xs))
        with self.serving([(a, xi.shape[0]) for a, xi in zip(users, xs)]):
            return self.lm(input_ids=x, use_cache=False).logits

    def hidden_for(self, users: Sequence[UserAdapters], xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The final hidden states (B, T, D) of every user's batch, one forward (what the output
        projection reads); rows in the order of ``users``."""
        x = xs[0] if len(xs) == 1 else torch.cat(list(xs))
        with self.serving([(a, xi.shape[0]) for a, xi in zip(users, xs)]):
            return self.lm.base_model(input_ids=x, use_cache=False).last_hidden_state

    def lm_loss(self, hidden: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        """Mean cross-entropy of the targets y (B, T) given the final hidden states, ``chunk``
        tokens' logits at a time (0 = all at once)."""
        weight, bias = output_head(self.lm)
        return lm_cross_entropy(hidden, weight, bias, y, chunk)

    @torch.no_grad()
    def cast_frozen_(self, dtype: torch.dtype) -> None:
        """Store the frozen base in ``dtype`` (e.g. bf16 on a GPU); users' adapters are not part of it."""
        for p in self.lm.parameters():
            if p.dtype != dtype and p.is_floating_point():
                p.data = p.data.to(dtype)


class UserModel(nn.Module):
    """One user's adapters over a (possibly shared) adapted base; ``forward(x, y)`` -> StepLoss(ce, lb).
    ``loss_chunk``: tokens whose logits exist at once in the loss (0 = a whole micro-batch's)."""

    def __init__(self, base: AdaptedBase, adapters: UserAdapters, loss_chunk: int = DEFAULT_LOSS_CHUNK):
        super().__init__()
        self.base = base
        self.adapters = adapters
        self.report: InjectionReport = adapters.report
        self.spec: AdapterSpec = adapters.spec
        self.loss_chunk = loss_chunk
        # set by a method whose evaluation forwards depend on the batch (FedDPA's instance-wise
        # adapter weights): x -> a context manager entered around each evaluation batch
        self.eval_context: Callable[[torch.Tensor], ContextManager] | None = None

    @property
    def lm(self) -> nn.Module:
        """The frozen Hugging Face model underneath (shared with the rank's other users)."""
        return self.base.lm

    @property
    def moe(self) -> list:
        """This user's mixture of every MLP layer (experts, router, last routing statistics)."""
        return self.adapters.mixtures()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, D): what the output projection reads."""
        return self.base.hidden_for([self.adapters], [x])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.logits_for([self.adapters], [x])

    def lm_loss(self, hidden: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the targets y (B, T) given the final hidden states."""
        return self.base.lm_loss(hidden, y, self.loss_chunk)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> StepLoss:
        ce = self.lm_loss(self.hidden(x), y)
        return StepLoss(ce=ce, lb=self.load_balancing_loss())

    def token_sums(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """(summed cross-entropy, correct argmax predictions, tokens) of one evaluation batch."""
        weight, bias = output_head(self.lm)
        with self.eval_context(x) if self.eval_context is not None else contextlib.nullcontext():
            return token_sums(self.hidden(x), weight, bias, y, self.loss_chunk)

    def load_balancing_loss(self) -> torch.Tensor:
        """Mean over MoE layers of the last forward's load-balancing losses."""
        losses = [m.aux_loss for m in self.moe if m.aux_loss is not None]
        if not losses:
            return torch.zeros(())
        return torch.stack([l.float() for l in losses]).mean()

    def routing_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: (mean router probability per expert, routing share per expert) of the last forward."""
        return [m.last_stats for m in self.moe]

    def set_trainable(self, predicate) -> list[nn.Parameter]:
        """requires_grad on exactly the tagged parameters the predicate selects; returns them."""
        chosen = []
        for name, tag in self.report.tags.items():
            p = self.report.params[name]
            on = bool(predicate(tag))
            p.requires_grad_(on)
            if on:
                chosen.append(p)
        return chosen

    def cast_frozen_(self, dtype: torch.dtype) -> None:
        """Store the frozen base in ``dtype``; this user's adapters and router stay fp32."""
        self.base.cast_frozen_(dtype)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every adapter and router tensor by name (what a checkpoint holds)."""
        return {n: p.detach() for n, p in self.report.params.items()}


def forward_users(models: Sequence[UserModel], xs: Sequence[torch.Tensor],
                  ys: Sequence[torch.Tensor]) -> list[StepLoss]:
    """Packed users: every user's batch through the shared base in one forward; each user's loss
    (its mean token cross-entropy and its load-balancing loss) as if it had run alone. The sum of
    the losses back-propagates to each user's own adapters only."""
    base = models[0].base
    if any(m.base is not base for m in models):
        raise ValueError("forward_users packs users of one adapted base; these models hold different bases")
    hidden = base.hidden_for([m.adapters for m in models], xs)
    return [StepLoss(ce=m.lm_loss(rows, y), lb=m.load_balancing_loss())
            for m, rows, y in zip(models, hidden.split([x.shape[0] for x in xs]), ys)]


def adapter_spec_for(cfg, user: UserSpec, routed: bool) -> AdapterSpec:
    """The adapters the configuration gives one user (``config.resolve_users``), before its
    method's changes (``Method.adapter_spec``)."""
    return AdapterSpec(n_experts=user.n_experts, n_generalists=user.n_generalists, rank=user.lora_rank,
                       alpha=cfg.lora.alpha, attn_rank=cfg.lora.attn_rank, top_k=user.top_k, routed=routed,
                       load_balancing=cfg.moe.load_balancing)


def build_adapted_base(cfg, vocab_size: int, share: "SharePlan | None" = None) -> AdaptedBase:
    """The rank's frozen base, adapted once so that it can serve any of the rank's users."""
    return AdaptedBase(build_base_model(cfg.model.name, vocab_size, cfg.train.seq_len, share), cfg.model.family)


def build_adapters(layout: BaseLayout, spec: AdapterSpec, seed: int) -> UserAdapters:
    """One user's adapters, initialised from ``seed`` (the global generator is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UserAdapters(layout, spec)


def build_user_model(cfg, user: UserSpec, vocab_size: int, routed: bool, spec: AdapterSpec | None = None,
                     share: "SharePlan | None" = None, base: AdaptedBase | None = None) -> UserModel:
    """This user's adapters (``spec``, default: what cfg says for ``user``) over ``base`` (default: a
    base built here); adapter and router inits draw from the user's ``adapters`` stream (``seeds.derive_seed``).
    ``share``: map the frozen base from the host's shared copy (see ``shared_base.plan_sharing``)
    when the base is built here."""
    from comigs_dist.seeds import derive_seed
    base = base if base is not None else build_adapted_base(cfg, vocab_size, share)
    spec = spec or adapter_spec_for(cfg, user, routed)
    adapters = build_adapters(base.layout, spec, derive_seed(cfg.seed, user.user_idx, "adapters"))
    return UserModel(base, adapters, cfg.train.loss_chunk)


def wrap_user_model(model: nn.Module, spec: AdapterSpec, family: str = "auto", seed: int | None = None,
                    loss_chunk: int = DEFAULT_LOSS_CHUNK) -> UserModel:
    """Adapt the Hugging Face ``model`` and give it one user's adapters (tests, analysis); the
    adapters draw from the global generator unless ``seed`` is given."""
    base = AdaptedBase(model, family)
    adapters = build_adapters(base.layout, spec, seed) if seed is not None else UserAdapters(base.layout, spec)
    return UserModel(base, adapters, loss_chunk)


__all__ = ["AdaptedBase", "AdapterSpec", "InjectionReport", "ParamTag", "Role", "UserAdapters", "UserModel",
           "build_adapted_base", "build_adapters", "build_base_model", "build_user_model", "check_model_matches_data",
           "forward_users", "mlp_modules", "wrap_user_model"]
