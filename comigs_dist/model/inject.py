"""Walk a Hugging Face causal LM and inject the adapters, per model family.

Owns: the list of target modules of each family (GPT-2; Llama is one more ``Family``), freezing
the base, wrapping attention projections with one LoRA each, replacing each MLP with a
mixture of LoRA experts, and collecting the role tag of every trainable parameter into an
``InjectionReport``. Knows nothing of training or of which method runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from comigs_dist.model.lora import LoRALinear
from comigs_dist.model.moe import MoELoRAMLP, TanhGELU
from comigs_dist.model.roles import ParamTag, Role


@dataclass(frozen=True)
class AdapterSpec:
    """What to inject into one user's model."""
    n_experts: int
    n_generalists: int
    rank: int
    alpha: float
    attn_rank: int
    top_k: int
    routed: bool
    load_balancing: str


@dataclass
class Family:
    """Where one model family keeps its blocks, attention projections and MLP."""
    name: str
    blocks: Callable[[nn.Module], nn.ModuleList]
    attn_targets: tuple[str, ...]            # dotted suffixes inside a block
    mlp_name: str                            # attribute of a block holding the MLP
    mlp_in: tuple[str, ...]                  # input projections of the MLP (frozen products shared)
    mlp_out: str                             # output projection of the MLP
    combine: Callable[[nn.Module], Callable[[list[torch.Tensor]], torch.Tensor]]
    d_model: Callable[[object], int]


# transformers' activations that are the tanh approximation of GELU, some written out as several
# tensor operations; TanhGELU computes the same function in one kernel (to float rounding) and
# gives the mixture its derivative, which matters because the activation runs once per expert
_TANH_GELUS = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh")


def _gpt2_combine(mlp: nn.Module):
    act = mlp.act
    if type(act).__name__ in _TANH_GELUS:
        return TanhGELU()
    return lambda pre: act(pre[0])


def _llama_combine(mlp: nn.Module):
    act = mlp.act_fn
    return lambda pre: act(pre[0]) * pre[1]


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", lambda m: m.transformer.h, ("attn.c_attn", "attn.c_proj"), "mlp",
                   ("c_fc",), "c_proj", _gpt2_combine, lambda c: c.n_embd),
    "llama": Family("llama", lambda m: m.model.layers,
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"), "mlp",
                    ("gate_proj", "up_proj"), "down_proj", _llama_combine, lambda c: c.hidden_size),
}


def family_of(model: nn.Module, requested: str = "auto") -> Family:
    name = requested
    if name == "auto":
        name = getattr(getattr(model, "config", None), "model_type", "")
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not supported; supported: {', '.join(FAMILIES)} "
                         f"(set model.family, or add a Family to comigs_dist/model/inject.py)")
    return FAMILIES[name]


@dataclass
class InjectionReport:
    """Every trainable parameter of the injected model with its role tag."""
    family: str
    tags: dict[str, ParamTag] = field(default_factory=dict)
    params: dict[str, nn.Parameter] = field(default_factory=dict)

    def select(self, predicate: Callable[[ParamTag], bool]) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs whose tag satisfies the predicate, in a fixed order."""
        return [(n, self.params[n]) for n, t in self.tags.items() if predicate(t)]

    def count(self, predicate: Callable[[ParamTag], bool] = lambda t: True) -> int:
        return sum(p.numel() for _, p in self.select(predicate))

    def counts_by_role(self) -> dict[str, int]:
        return {r.value: self.count(lambda t, r=r: t.role == r) for r in Role}


def _get_submodule(root: nn.Module, dotted: str) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    return parent, leaf, getattr(parent, leaf)


def inject_adapters(model: nn.Module, spec: AdapterSpec, family: str = "auto") -> InjectionReport:
    """Freeze the model and add one LoRA per attention target and a MoE of LoRA experts per MLP."""
    fam = family_of(model, family)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        blocks = fam.blocks(model)
    except AttributeError:
        raise ValueError(f"model of type {type(model).__name__} has no {fam.name} blocks; "
                         f"check model.family") from None
    if len(blocks) == 0:
        raise ValueError(f"no transformer blocks found in {type(model).__name__}")
    for layer, block in enumerate(blocks):
        for target in fam.attn_targets:
            try:
                parent, leaf, base = _get_submodule(block, target)
            except AttributeError:
                raise ValueError(f"block {layer} of {type(model).__name__} has no module {target!r}; "
                                 f"{fam.name} targets are {', '.join(fam.attn_targets)}") from None
            setattr(parent, leaf, LoRALinear(
                base, spec.attn_rank, spec.alpha,
                ParamTag(Role.GENERALIST, "attn", layer, target, -1, "A"),
                ParamTag(Role.GENERALIST, "attn", layer, target, -1, "B")))
        mlp = getattr(block, fam.mlp_name)
        missing = [n for n in (*fam.mlp_in, fam.mlp_out) if not hasattr(mlp, n)]
        if missing:
            raise ValueError(f"the MLP of block {layer} has no {missing}; {fam.name} MLP targets are "
                             f"{', '.join((*fam.mlp_in, fam.mlp_out))}")
        setattr(block, fam.mlp_name, MoELoRAMLP(
            mlp, fam.mlp_in, fam.mlp_out, fam.combine(mlp), n_experts=spec.n_experts,
            n_generalists=spec.n_generalists, rank=spec.rank, alpha=spec.alpha, top_k=spec.top_k,
            routed=spec.routed, load_balancing=spec.load_balancing, layer=layer))
    return collect_tags(model, fam.name)


def collect_tags(model: nn.Module, family: str) -> InjectionReport:
    """Ask every adapter module for its parameters' tags; every trainable parameter must have one."""
    report = InjectionReport(family=family)
    named = dict(model.named_parameters())
    for mod_name, module in model.named_modules():
        if not hasattr(module, "adapter_tags"):
            continue
        for rel, tag in module.adapter_tags():
            full = f"{mod_name}.{rel}" if mod_name else rel
            if full in report.tags:
                continue  # reported by an enclosing module already
            report.tags[full] = tag
            report.params[full] = named[full]
    # nested adapter modules (an ExpertLoRA inside a MoE) report the same parameter twice; the
    # first (outermost) name wins above. Every tagged parameter trains; nothing else does.
    for name, p in named.items():
        p.requires_grad_(name in report.tags)
    return report


def mlp_modules(model: nn.Module) -> list[MoELoRAMLP]:
    return [m for m in model.modules() if isinstance(m, MoELoRAMLP)]
