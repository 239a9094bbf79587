"""What the adapters and routers cost, counted from the model a configuration builds.

Owns the forward-FLOP count (following appendix B of Chowdhery et al. 2023, which the paper's
appendix B.1 cites: 2 FLOPs per multiply-accumulate of every matrix product, the attention score
and value products over the full context, nothing for norms, activations or softmax), the router
memory, and the bytes each user moves per round. The model is built on the meta device (shapes
only, no weights, no download of weights), its adapters injected as in training, and the count
walks the modules, so it follows whatever the injection builds.

Per token, with T the context (train.seq_len), d the attention width and L the layers:
  base      sum over frozen projections and the LM head of 2 * in * out, plus 4 * T * d per layer
  LoRA      2 * r * (in + out) per adapted projection (x A^T, then B^T)
  experts   k selected experts per token with a router (top-k), every expert without one
  router    2 * d_model * n_experts per MoE layer
The frozen MLP products are counted once per token, as moe.py computes them once whatever k is.

Knows nothing of training or of process groups.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from comigs_dist import tables
from comigs_dist.analyze import AnalysisError

MIB = 2 ** 20

# Appendix B.1 of the paper (arXiv 2409.13931 v3, "000"), GPT-2 124M, 128-token sequences. Its "MB"
# are MiB: 1.41 MB = 737,280 bf16 parameters, 0.035 MB = 18,432 bf16 router parameters.
PAPER = {
    "base_gflops": 32.0,
    "one_set_mflops": 166.0, "one_set_pct": 0.52,
    "two_sets_mflops": 490.0, "two_sets_pct": 1.53,
    "comigs_mflops": 495.0, "comigs_pct": 1.55, "router_mflops": 5.0,
    "router_mib_bf16": 0.035,
    "comm_mib_bf16": 1.41,
}
GPT2_124M = dict(n_layers=12, d_model=768, vocab=50257)


@dataclass
class FlopCount:
    """Forward FLOPs per token of one model, split by where they are spent."""
    base_matmul: int = 0        # frozen projections and the LM head
    lm_head: int = 0            # (part of base_matmul)
    attention: int = 0          # score and value products
    attn_lora: int = 0          # LoRA on attention projections
    experts: int = 0            # LoRA experts in the MLPs (the active ones)
    router: int = 0

    @property
    def base(self) -> int:
        return self.base_matmul + self.attention

    @property
    def added(self) -> int:
        return self.attn_lora + self.experts + self.router


@dataclass
class ModelReport:
    label: str
    flops_per_token: FlopCount
    seq_len: int
    params_by_role: dict[str, int]
    router_params: int
    shared_params: int = 0
    shared_attn_params: int = 0
    shared_expert_params: int = 0
    shared_by_group: dict[str, int] = field(default_factory=dict)   # group -> shared parameters in it
    # group -> what Method.wire says its collectives send in a round in which the method
    # aggregates (dist.collective_bytes: PCL's gather sends a flag too)
    wire: dict[str, tuple] | None = None   # None: a reference model, priced as a mean of its shared tensors
    own_by_group: dict[str, int] = field(default_factory=dict)  # Method.own_sizes: a method's own collectives
    n_experts: int = 0
    top_k: int = 0
    notes: list[str] = field(default_factory=list)

    def per_sequence(self, n: int) -> int:
        return n * self.seq_len

    @property
    def added_pct(self) -> float:
        return 100.0 * self.flops_per_token.added / self.flops_per_token.base


# --------------------------------------------------------------------------------------------
# building shapes
# --------------------------------------------------------------------------------------------

def _vocab_size(cfg) -> int:
    if cfg.data.path == "embedded":
        from comigs_dist.synthetic import VOCAB_SIZE
        return VOCAB_SIZE
    from comigs_dist.data import read_meta
    return int(read_meta(cfg.data.path)["vocab_size"])


def build_shape_model(cfg, vocab_size: int) -> nn.Module:
    """The frozen base on the meta device: every shape, no memory, no weights read."""
    from comigs_dist.model import BUILTIN_MODELS, build_base_model
    name = cfg.model.name
    with torch.device("meta"):
        if name == "embedded":
            # its shapes are fixed: no need to pretrain it (a minute) to count them
            from transformers import GPT2LMHeadModel
            from comigs_dist.pretrain import _quiet_gpt2_config
            from comigs_dist.synthetic import BASE_CONFIG
            return GPT2LMHeadModel(_quiet_gpt2_config(**BASE_CONFIG)).eval()
        if name in BUILTIN_MODELS:
            return build_base_model(name, vocab_size, cfg.train.seq_len)
        from transformers import AutoConfig, AutoModelForCausalLM
        try:
            config = AutoConfig.from_pretrained(name)
        except OSError as exc:
            raise AnalysisError(f"model.name ({name!r}): its config cannot be read ({exc}); give a local "
                                f"checkpoint directory or a built-in name ({', '.join(BUILTIN_MODELS)})") from None
        return AutoModelForCausalLM.from_config(config).eval()


def _is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _lora_flops(lora) -> int:
    if hasattr(lora, "first"):  # a PairedLoRA (FedALT, FedDPA): both halves, and a mixer's logits
        mixer = 2 * lora.mixer.weight.numel() if lora.mixer is not None else 0
        return _lora_flops(lora.first) + _lora_flops(lora.second) + mixer
    r, n_in = lora.lora_A.shape
    n_out = lora.lora_B.shape[0]
    return 2 * r * (n_in + n_out)


def _attention_width(config) -> int:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads * head_dim


def count_flops(model, seq_len: int) -> FlopCount:
    """Forward FLOPs per token of one user's model (a ``UserModel``; see the module docstring)."""
    from comigs_dist.model.lora import in_out_features
    c = FlopCount()
    for m in model.lm.modules():
        if _is_projection(m):
            n_in, n_out = in_out_features(m)
            c.base_matmul += 2 * n_in * n_out
    for block in model.adapters.blocks:
        c.attn_lora += sum(_lora_flops(lora) for lora in block.attn.values())
        m = block.mlp
        per_expert = [sum(_lora_flops(l) for l in (*e.in_loras, e.out_lora)) for e in m.experts]
        if m.router is None:
            c.experts += sum(per_expert)           # no router: every expert, uniformly mixed
        else:
            # top-k: k experts per token; the experts of one layer share their shapes
            c.experts += m.router.top_k * sum(per_expert) // len(per_expert)
            c.router += 2 * m.router.weight.shape[1] * m.router.weight.shape[0]
    head = model.lm.get_output_embeddings()
    if head is not None:
        n_in, n_out = in_out_features(head)
        c.lm_head = 2 * n_in * n_out
    c.attention = len(model.adapters.blocks) * 4 * seq_len * _attention_width(model.lm.config)
    return c


def report_for(base: nn.Module, spec, label: str, seq_len: int, family: str, is_shared=None,
               group_of=None, own_sizes=None) -> ModelReport:
    from comigs_dist.model import wrap_user_model
    from comigs_dist.model.roles import Role
    with torch.device("meta"):
        model = wrap_user_model(copy.deepcopy(base), spec, family)
    report = model.report
    shared = [n for n, t in report.tags.items() if is_shared is not None and is_shared(t)]
    numel = lambda names: sum(report.params[n].numel() for n in names)
    out = ModelReport(label=label, flops_per_token=count_flops(model, seq_len), seq_len=seq_len,
                      params_by_role=report.counts_by_role(),
                      router_params=report.count(lambda t: t.role == Role.ROUTER),
                      shared_params=numel(shared),
                      shared_attn_params=numel([n for n in shared if report.tags[n].kind == "attn"]),
                      shared_expert_params=numel([n for n in shared if report.tags[n].kind == "expert"]),
                      shared_by_group={g: numel([n for n in shared if group_of(report.tags[n]) == g])
                                       for g in sorted({group_of(report.tags[n]) for n in shared})} if group_of else {},
                      n_experts=spec.n_experts,
                      top_k=spec.top_k if spec.routed and spec.n_experts > 1 else spec.n_experts,
                      own_by_group=own_sizes(model) if own_sizes is not None else {})
    return out


@dataclass
class Overhead:
    model_name: str
    family: str
    n_layers: int
    d_model: int
    vocab: int
    seq_len: int
    method: str
    n_users: int
    comm_dtype: str
    groups: dict[str, tuple[int, ...]]  # sharing group -> its users
    count: bool                         # one contributor-count element per mean (train.counts_contributors:
                                        # guard.nan=skip, comm.weights=tokens, partial participation)
    references: list[ModelReport]       # one and two LoRA sets without a router (the paper's FedAvg rows)
    users: list[tuple[list[int], ModelReport]]   # configured model: (users it stands for, report)
    notes: list[str]
    rounds: int = 0                     # train.rounds
    aggregations: int = 0               # the syncs that move bytes over the run (Method.wire round by round)

    @property
    def is_gpt2_124m(self) -> bool:
        return (self.n_layers, self.d_model, self.vocab) == tuple(GPT2_124M.values())


def compute_overhead(cfg, n_users: int | None = None) -> Overhead:
    """The report for every distinct user model of a configuration."""
    from comigs_dist.config import inferred_n_users, resolve_users
    from comigs_dist.methods import get_method
    from comigs_dist.train import counts_contributors
    from comigs_dist.model import adapter_spec_for
    from comigs_dist.model.inject import FAMILIES, family_of
    notes = []
    n = n_users or inferred_n_users(cfg)
    if n is None:
        n = 4
        notes.append("n_users is not set: 4 users assumed (the paper's N); set n_users=N to change it")
    specs = resolve_users(cfg, n)
    method = get_method(cfg.method, cfg, specs)
    base = build_shape_model(cfg, _vocab_size(cfg))
    fam = family_of(base, cfg.model.family).name
    seq_len = cfg.train.seq_len
    spec0 = adapter_spec_for(cfg, specs[0], method.routed)
    refs = [report_for(base, replace(spec0, n_experts=1, n_generalists=1, top_k=1, routed=False),
                       "one LoRA set, FedAvg with one LoRA (attention + 1 MLP LoRA)", seq_len, fam),
            report_for(base, replace(spec0, n_experts=2, n_generalists=1, top_k=2, routed=False),
                       "two LoRA sets, FedAvg/Local 2x LoRA (attention + 2 MLP LoRAs, uniform mix)", seq_len, fam)]
    groups = {g: tuple(m) for g, m in method.sharing_groups(n).items()}
    by_spec: dict = {}
    for user in range(n):
        # users with one model and the same groups for every shared tensor cost the same
        spec = method.adapter_spec(cfg, user, adapter_spec_for(cfg, specs[user], method.routed))
        by_spec.setdefault((spec, _group_signature(method, user, spec)), []).append(user)
    users = []
    for (spec, _), members in by_spec.items():
        who = f"user {members[0]}" if len(members) == 1 else f"users {','.join(map(str, members))}"
        label = f"{cfg.method}, {who}: {spec.n_experts} expert{'s' if spec.n_experts > 1 else ''}, rank {spec.rank}"
        # a method that never aggregates (the local baselines) moves nothing per round
        rep = report_for(base, spec, label, seq_len, fam, method.is_shared if method.aggregates else None,
                         lambda tag, u=members[0]: method.group_of(tag, u), method.own_sizes)
        rep.wire = method.wire({**rep.shared_by_group, **rep.own_by_group})
        users.append((members, rep))
    vocab = base.get_output_embeddings().weight.shape[0]
    # round 0's common start moves nothing counted (Centralized's gradient means in round 0 do);
    # a closing aggregation (FedDPA) comes on top
    shared = users[0][1].shared_by_group
    aggregations = (sum(bool(method.wire(shared, r)) for r in range(cfg.train.rounds))
                    + int(method.aggregates and method.aggregates_after_training)) if shared else 0
    return Overhead(rounds=cfg.train.rounds, aggregations=aggregations,
                    model_name=cfg.model.name, family=fam, n_layers=len(FAMILIES[fam].blocks(base)),
                    d_model=_attention_width(base.config), vocab=vocab, seq_len=seq_len, method=cfg.method,
                    n_users=n, comm_dtype=cfg.comm.dtype, groups=groups, count=counts_contributors(cfg, n),
                    references=refs, users=users, notes=notes)


def _group_signature(method, user: int, spec) -> tuple:
    """The group of each kind of shared tensor of one user (attention LoRA, then each expert)."""
    from comigs_dist.model.roles import ParamTag, Role
    tags = [ParamTag(Role.GENERALIST, "attn", 0, "")] + [
        ParamTag(Role.GENERALIST if x < spec.n_generalists else Role.SPECIALIST, "expert", 0, "", x)
        for x in range(spec.n_experts)]
    return tuple(method.group_of(t, user) if method.is_shared(t) else None for t in tags)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------

BYTES = {"bf16": 2, "fp32": 4}


def bytes_per_round(rep: ModelReport, dtype: str, mode: str, groups: dict[str, tuple[int, ...]],
                    count: bool = False) -> tuple[int, int]:
    """(sent, received) bytes per user in a round in which the method aggregates, as dist counts
    them (dist.round_bytes): per group, the buffer up and the mean down (server), or the buffer
    delivered to each of the group's N members and N buffers received (all2all, and a method's
    gather whatever ``mode`` says); summed over the user's groups."""
    from comigs_dist.dist import collective_bytes
    sent = received = 0
    layout = rep.wire if rep.wire is not None else {g: (numel, None) for g, numel in rep.shared_by_group.items()}
    for group, spec in layout.items():
        _, s, r = collective_bytes(spec, mode, dtype, len(groups[group]), count)
        sent, received = sent + s, received + r
    return sent, received


def _flops(x: float) -> str:
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}FLOPs"
    return f"{x:.0f} FLOPs"


def _bytes(x: float) -> str:
    for unit, scale, least in (("MiB", MIB, 10 * 1024), ("KiB", 1024, 1024)):
        if abs(x) >= least:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} B"


def format_overhead(o: Overhead) -> str:
    T = o.seq_len
    paper = o.is_gpt2_124m
    base = o.references[0].flops_per_token
    lines = [f"overhead of {o.method} on model {o.model_name} ({o.family}: {o.n_layers} layers, width {o.d_model}, "
             f"vocabulary {o.vocab}), sequences of T = {T} tokens, {o.n_users} users",
             "", "forward FLOPs per sequence (matmuls only, as in Chowdhery et al. 2023, appendix B)",
             f"  base model: {_flops(base.base * T)} = projections {_flops((base.base_matmul - base.lm_head) * T)} "
             f"+ LM head {_flops(base.lm_head * T)} + attention products {_flops(base.attention * T)}"
             + (f"   [paper: {PAPER['base_gflops']:.0f} GFLOPs]" if paper else "")]
    for ref, key in zip(o.references, ("one_set", "two_sets")):
        f = ref.flops_per_token
        extra = f"   [paper: +{PAPER[key + '_mflops']:.0f} MFLOPs (+{PAPER[key + '_pct']:.2f}%)]" if paper else ""
        lines.append(f"  {ref.label}: +{_flops(f.added * T)} (+{ref.added_pct:.2f}%){extra}")
    for members, rep in o.users:
        f = rep.flops_per_token
        extra = (f"   [paper, CoMiGS-1G1S: +{PAPER['comigs_mflops']:.0f} MFLOPs (+{PAPER['comigs_pct']:.2f}%), "
                 f"router {PAPER['router_mflops']:.0f} MFLOPs]" if paper else "")
        lines.append(f"  {rep.label}: +{_flops(f.added * T)} (+{rep.added_pct:.2f}%) = attention LoRA "
                     f"{_flops(f.attn_lora * T)} + experts {_flops(f.experts * T)} (top-{rep.top_k} of "
                     f"{rep.n_experts}) "
                     f"+ router {_flops(f.router * T)}{extra}")
    lines += ["", "router memory"]
    for members, rep in o.users:
        extra = f"   [paper: {PAPER['router_mib_bf16']} MB in bf16]" if paper else ""
        lines.append(f"  {rep.label}: {rep.router_params:,} parameters = {_bytes(rep.router_params * 2)} (bf16), "
                     f"{_bytes(rep.router_params * 4)} (fp32){extra}")
    lines += ["", f"communication per user and round (the shared parameters, delivered payload as "
                  f"comigs_dist.dist counts it; "
                  f"this run's comm.dtype is {o.comm_dtype})"]
    for members, rep in o.users:
        lines.append(f"  {rep.label}: {rep.shared_params:,} shared parameters = attention LoRA "
                     f"{rep.shared_attn_params:,} + experts {rep.shared_expert_params:,}")
        if len(rep.shared_by_group) > 1:
            lines.append("    groups: " + ", ".join(f"{g} ({len(o.groups[g])} users) {numel:,}"
                                                    for g, numel in rep.shared_by_group.items()))
        rows = []
        for mode in ("server", "all2all"):
            cells = [mode]
            for dtype in ("bf16", "fp32"):
                sent, received = bytes_per_round(rep, dtype, mode, o.groups, o.count)
                cells += [_bytes(sent), _bytes(received)]
            rows.append(cells)
        lines.append(tables.format_table(("mode", "bf16 sent", "bf16 received", "fp32 sent", "fp32 received"), rows,
                                         "<>>>>", indent="    "))
        from comigs_dist.dist import collectives
        kinds = [kind for spec in (rep.wire or {}).values() for _, _, kind in collectives(spec)]
        for group, spec in (rep.wire or {}).items():
            if group in rep.own_by_group:  # a method's own collectives (Method.own_sizes)
                what = " and ".join({"all2all": "a gather", "sum": "a sum"}.get(k, "a mean")
                                    for _, _, k in collectives(spec))
                lines.append(f"    and its own collectives in {group}: {what} of {collectives(spec)[0][0]:,} "
                             f"elements each")
        if "all2all" in kinds:
            lines.append(f"    {o.method}'s gather delivers every member's payload to every member whatever "
                         f"comm.mode says" + (" (both rows alike)" if set(kinds) == {"all2all"} else ""))
        if "gradients" in kinds:
            lines.append(f"    {o.method} averages the gradients after each of its {kinds.count('gradients')} expert "
                         f"steps per round, in fp32 and server-style whatever comm.mode and comm.dtype say (every "
                         f"cell alike)")
        if paper:
            lines.append(f"    [paper: {PAPER['comm_mib_bf16']} MB in bf16, which is the generalist experts alone "
                         f"({_bytes(rep.shared_expert_params * 2)} here); the attention LoRA, also shared, adds "
                         f"{_bytes(rep.shared_attn_params * 2)} (baselines.md section 2)]")
    if o.aggregations != max(0, o.rounds - 1) and any(rep.wire for _, rep in o.users):
        lines.append(f"  {o.method} aggregates {o.aggregations} times over train.rounds={o.rounds} (not once per round "
                     f"after the first): a run sends {o.aggregations} x the figures above")
    if paper:
        lines += ["", "The paper's MB are MiB (1.41 MB = 737,280 bf16 parameters). This count reproduces its two-set "
                      "and CoMiGS-1G1S figures within 0.2%, not its one-set figure (166 MFLOPs)."]
    lines += [f"note: {n}" for n in o.notes]
    return "\n".join(lines)


def overhead_json(o: Overhead) -> dict:
    def rep(r: ModelReport) -> dict:
        d = asdict(r)
        f = r.flops_per_token
        d["flops_per_token"] = {**asdict(f), "base": f.base, "added": f.added}
        d["flops_per_sequence"] = {k: v * r.seq_len for k, v in d["flops_per_token"].items()}
        d["added_pct"] = r.added_pct
        d["router_bytes"] = {k: r.router_params * b for k, b in BYTES.items()}
        d["bytes_per_round"] = {mode: {dtype: dict(zip(("sent", "received"),
                                                       bytes_per_round(r, dtype, mode, o.groups, o.count)))
                                       for dtype in BYTES} for mode in ("server", "all2all")}
        return d
    return {"model": o.model_name, "family": o.family, "n_layers": o.n_layers, "d_model": o.d_model, "vocab": o.vocab,
            "seq_len": o.seq_len, "method": o.method, "n_users": o.n_users, "comm_dtype": o.comm_dtype,
            "groups": {g: list(m) for g, m in o.groups.items()}, "rounds": o.rounds, "aggregations": o.aggregations,
            "references": [rep(r) for r in o.references],
            "users": [{"users": members, **rep(r)} for members, r in o.users],
            "paper": PAPER if o.is_gpt2_124m else None, "notes": o.notes}


def run_overhead(args) -> None:
    from comigs_dist.config import load_config
    cfg = load_config(args.config, args.overrides)
    o = compute_overhead(cfg)
    print(format_overhead(o))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(overhead_json(o), indent=2))
        print(f"wrote {args.json}")
