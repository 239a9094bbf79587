"""Walk a Hugging Face causal LM, adapt it once, and build each user's adapters, per model family.

Owns: the list of target modules of each family (GPT-2; Llama is one more ``Family``), freezing
the base and replacing its attention projections (``AdaptedLinear``) and MLPs (``AdaptedMLP``)
once per base (``adapt_base``), each user's adapters as one module of its own (``UserAdapters``:
one LoRA per attention projection, a mixture of LoRA experts and a router per MLP), and the role
tag of every trainable parameter (``InjectionReport``). One adapted base serves every user of a
rank. Knows nothing of training or of which method runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from comigs_dist.model.lora import AdaptedLinear, LoRAFactors
from comigs_dist.model.moe import AdaptedMLP, MixtureAdapters, TanhGELU
from comigs_dist.model.paired import PAIRINGS, PairedLoRA
from comigs_dist.model.roles import ParamTag, Role
from comigs_dist.model.routing import TopKRouter
from comigs_dist.model.serving import ServedRows


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
    # 'none': one LoRA per adapted projection; 'mixer' / 'fixed': a ``PairedLoRA`` there instead (a
    # collective LoRA and the user's own), weighted per token by a mixer (FedALT) or by fixed
    # weights a method sets per phase (FedDPA)
    paired: str = "none"
    # whether ``paired`` reaches the MLP's projections too; False keeps plain LoRAs in the MLP's
    # experts whatever the attention holds, so that the mixture's router weighs whole experts
    # (FedALT with method_options.mixer=mlp)
    mlp_paired: bool = True


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
    """Every trainable parameter of one user's adapters with its role tag."""
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


@dataclass(frozen=True)
class LayerShape:
    """What the adapters of one transformer block attach to: attention targets (dotted suffix,
    key, in, out) and the MLP's projections."""
    attn: tuple[tuple[str, str, int, int], ...]
    mlp_in: tuple[tuple[int, int], ...]
    mlp_out: tuple[int, int]
    mlp_in_names: tuple[str, ...]
    mlp_out_name: str


@dataclass(frozen=True)
class BaseLayout:
    """The shapes every user's adapters of one base must have (one entry per block)."""
    family: str
    layers: tuple[LayerShape, ...]


def _get_submodule(root: nn.Module, dotted: str) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    return parent, leaf, getattr(parent, leaf)


def _attn_key(target: str) -> str:
    """The name of an attention target among a block's adapters: its last component (c_attn, q_proj)."""
    return target.rpartition(".")[2]


def adapt_base(model: nn.Module, family: str = "auto", rows: ServedRows | None = None) -> tuple[BaseLayout, ServedRows]:
    """Freeze the model and replace every attention target and MLP by its adapted version, which
    adds the adapters of whichever users a forward serves (``rows``). Returns the layout users'
    adapters must follow and the rows table the adapted modules read."""
    fam = family_of(model, family)
    rows = rows if rows is not None else ServedRows()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        blocks = fam.blocks(model)
    except AttributeError:
        raise ValueError(f"model of type {type(model).__name__} has no {fam.name} blocks; "
                         f"check model.family") from None
    if len(blocks) == 0:
        raise ValueError(f"no transformer blocks found in {type(model).__name__}")
    layers = []
    for layer, block in enumerate(blocks):
        attn = []
        for target in fam.attn_targets:
            try:
                parent, leaf, base = _get_submodule(block, target)
            except AttributeError:
                raise ValueError(f"block {layer} of {type(model).__name__} has no module {target!r}; "
                                 f"{fam.name} targets are {', '.join(fam.attn_targets)}") from None
            adapted = AdaptedLinear(base, rows, layer, _attn_key(target))
            setattr(parent, leaf, adapted)
            attn.append((target, _attn_key(target), adapted.in_features, adapted.out_features))
        mlp = getattr(block, fam.mlp_name)
        missing = [n for n in (*fam.mlp_in, fam.mlp_out) if not hasattr(mlp, n)]
        if missing:
            raise ValueError(f"the MLP of block {layer} has no {missing}; {fam.name} MLP targets are "
                             f"{', '.join((*fam.mlp_in, fam.mlp_out))}")
        adapted_mlp = AdaptedMLP(mlp, fam.mlp_in, fam.mlp_out, fam.combine(mlp), rows, layer)
        setattr(block, fam.mlp_name, adapted_mlp)
        layers.append(LayerShape(tuple(attn), tuple(adapted_mlp.in_dims), adapted_mlp.out_dim, fam.mlp_in, fam.mlp_out))
    return BaseLayout(fam.name, tuple(layers)), rows


class BlockAdapters(nn.Module):
    """One user's adapters of one transformer block: a LoRA (or a pair, ``spec.paired``) per
    attention target, a mixture per MLP (whose projections hold pairs too unless
    ``spec.mlp_paired`` is False)."""

    def __init__(self, shape: LayerShape, spec: AdapterSpec, layer: int):
        super().__init__()
        if spec.paired not in PAIRINGS:
            raise ValueError(f"AdapterSpec.paired ({spec.paired!r}) must be one of {', '.join(PAIRINGS)}")
        # built in the order of the block (attention, then the MLP's experts, then its router), so
        # a seed gives the same initial values whatever else the rank holds
        if spec.paired == "none":
            self.attn = nn.ModuleDict({key: LoRAFactors(n_in, n_out, spec.attn_rank, spec.alpha,
                                                        ParamTag(Role.GENERALIST, "attn", layer, target, -1, "A"),
                                                        ParamTag(Role.GENERALIST, "attn", layer, target, -1, "B"))
                                       for target, key, n_in, n_out in shape.attn})
        else:
            self.attn = nn.ModuleDict({key: PairedLoRA(n_in, n_out, spec.attn_rank, spec.alpha, kind="attn",
                                                       layer=layer, module=target, mixer=spec.paired == "mixer")
                                       for target, key, n_in, n_out in shape.attn})
        self.mlp = MixtureAdapters(shape.mlp_in, shape.mlp_out, shape.mlp_in_names, shape.mlp_out_name,
                                   n_experts=spec.n_experts, n_generalists=spec.n_generalists, rank=spec.rank,
                                   alpha=spec.alpha, top_k=spec.top_k, routed=spec.routed,
                                   load_balancing=spec.load_balancing, layer=layer,
                                   paired=spec.paired if spec.mlp_paired else "none")


class UserAdapters(nn.Module):
    """Everything one user trains: its adapters of every block, each parameter tagged with its role
    (``report``). A base adapted by ``adapt_base`` applies them to the rows the user owns."""

    def __init__(self, layout: BaseLayout, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(BlockAdapters(shape, spec, layer) for layer, shape in enumerate(layout.layers))
        self.report = collect_tags(self, layout.family)

    def attn_lora(self, layer: int, key: str) -> LoRAFactors:
        return self.blocks[layer].attn[key]

    def mixture(self, layer: int) -> MixtureAdapters:
        return self.blocks[layer].mlp

    def mixtures(self) -> list[MixtureAdapters]:
        return [b.mlp for b in self.blocks]


def collect_tags(adapters: nn.Module, family: str) -> InjectionReport:
    """The role tag of every parameter of a user's adapters, each declared by the module that owns
    it (LoRA factors, routers); a parameter without a tag is a bug."""
    report = InjectionReport(family=family)
    for mod_name, module in adapters.named_modules():
        if isinstance(module, LoRAFactors):
            owned = ((f"{mod_name}.{n}", t) for n, t in module.tags.items())
        elif isinstance(module, TopKRouter):
            owned = ((f"{mod_name}.weight", module.tag),)
        else:
            continue
        for full, tag in owned:
            report.tags[full] = tag
    params = dict(adapters.named_parameters())
    untagged = sorted(set(params) - set(report.tags))
    assert not untagged, f"adapter parameters without a role tag: {untagged}"
    report.params = {n: params[n] for n in report.tags}
    for p in params.values():
        p.requires_grad_(True)
    return report


def mlp_modules(model: nn.Module) -> list[AdaptedMLP]:
    """The adapted MLPs of an adapted base, in block order."""
    return [m for m in model.modules() if isinstance(m, AdaptedMLP)]
